"""The CUDA path of the edit: a bf16 model, the edit's math in fp32, and no host sync inside the hook."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from hpr.decoder_layers import find_decoder_layers
from hpr.editing import EditPlan, HPREditor
from hpr.householder import HPRLayer
from hpr.model import LoadedModel
from tests.gpu.conftest import ADAPTER, REQUIRES_CUDA, chat_ids, smollm2_adapter

pytestmark = REQUIRES_CUDA


def test_edit_of_bf16_activations_is_computed_in_fp32() -> None:
    """CUDA on bf16 input gives what the CPU fp32 computation gives on the same values, rounded once to bf16."""
    torch.manual_seed(0)
    layer = HPRLayer(576).eval()
    x = (torch.randn(4, 9, 576) * 3).to(torch.bfloat16)  # (B, T, h)
    alpha = torch.tensor([[0.5], [1.0], [2.0], [4.0]])  # (B, 1)
    with torch.no_grad():
        reference = layer.rotate(x.float(), alpha)  # CPU, fp32 throughout
        got = layer.to("cuda").rotate(x.cuda(), alpha.cuda())
    assert got.output.dtype == torch.bfloat16 and got.theta.dtype == torch.float32
    assert torch.equal(got.rotated.cpu(), reference.rotated) and bool(reference.rotated.any())
    # θ from the angle MLP run in fp32 (bf16 arithmetic would be off by ~1e-2)
    torch.testing.assert_close(got.theta.cpu(), reference.theta, rtol=1e-5, atol=1e-5)
    expected = reference.output.to(torch.bfloat16).float()
    torch.testing.assert_close(got.output.float().cpu(), expected, rtol=2**-7, atol=1e-2)
    norms = got.output.float().norm(dim=-1).cpu() / x.float().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=2**-7, atol=0)


@contextmanager
def sync_is_an_error_inside(model: nn.Module, layers: list[int]) -> Iterator[HPREditor]:
    """An editor whose hooks on ``layers`` run with ``torch.cuda.set_sync_debug_mode("error")``: a forward hook
    registered before the editor's turns it on, one registered after turns it off."""
    blocks = find_decoder_layers(model)
    handles = [blocks[i].register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")) for i in layers]
    editor = HPREditor(model, {})
    handles += [blocks[i].register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode(0)) for i in layers]
    try:
        yield editor
    finally:
        torch.cuda.set_sync_debug_mode(0)
        editor.detach()
        for handle in handles:
            handle.remove()


def test_edit_hook_never_syncs_the_host(cuda_bf16: LoadedModel) -> None:
    """Prefill-shaped (plan compiled inside the hook) and decode-shaped forwards, two rows with different edits,
    scope generated, stats collected: any device→host sync in the hook raises."""
    adapter = smollm2_adapter(cuda_bf16)
    layers = sorted(set(adapter.config.selected_layers) | {2, 28})
    with sync_is_an_error_inside(cuda_bf16.model, layers) as editor:
        editor.add_adapter(ADAPTER, adapter)
        specs = [editor.resolve(ADAPTER, alpha=2.0), editor.resolve(ADAPTER, layers, alpha=1.0, scope="generated")]
        prompt = chat_ids(cuda_bf16, "What happens if you crack your knuckles a lot?")
        ids = torch.tensor([prompt, prompt], device="cuda")
        plan = EditPlan(specs, prompt_lengths=[len(prompt)] * 2, collect_stats=True)
        with torch.inference_mode(), editor.apply(plan):
            edited = cuda_bf16.model(input_ids=ids).logits
            cuda_bf16.model(input_ids=ids)  # the plan is compiled now: the steady state
        torch.cuda.synchronize()
    assert plan.sums is not None and float(plan.sums[:, :, 1].sum()) > 0  # (B, layers, SUMS): 1 = changed
    with torch.inference_mode():
        base = cuda_bf16.model(input_ids=ids).logits
    assert edited.dtype == torch.bfloat16 and bool(torch.isfinite(edited).all())
    assert not torch.equal(edited, base)


def test_sync_guard_catches_a_sync() -> None:
    """The guard above can fail: reading a CUDA value on the host raises under it."""
    x = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError):
        torch.cuda.set_sync_debug_mode("error")
        try:
            float(x.sum())
        finally:
            torch.cuda.set_sync_debug_mode(0)
