"""``--quantization int8``: torchao weight-only int8, checked against a per-channel quantization done by hand."""

from __future__ import annotations

import builtins
from typing import Any

import pytest
import torch

from hpr.model import ModelLoadError, quantize_weights
from tests.conftest import make_tiny_llama


def _by_hand(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8: scale = max |w| of the row / 127.5, round, clamp to [-128, 127]."""
    scale = weight.abs().amax(dim=1, keepdim=True) / 127.5
    return (weight / scale).round().clamp(-128, 127) * scale


def test_int8_weights_are_the_per_channel_quantization_and_the_model_stays_close() -> None:
    model = make_tiny_llama(seed=3)
    fp32 = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = torch.randint(0, 128, (2, 9))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    assert quantize_weights(model, "int8") == "int8"
    x = torch.randn(5, 1024)  # sliced to each layer's input width
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if name not in fp32:
            continue
        width = fp32[name].shape[1]
        with torch.inference_mode():
            out = module(x[:, :width])
        unquantized = x[:, :width] @ fp32[name].T
        if module is head:  # the LM head keeps its weights (int8 would cost more traffic there, see the module)
            assert torch.equal(module.weight, fp32[name]) and torch.allclose(out, unquantized, atol=1e-6)
            continue
        reference = x[:, :width] @ _by_hand(fp32[name]).T
        # Quantized (not left in fp32), and the same quantization as by hand: the output is much closer to the
        # by-hand int8 weights than to the fp32 ones (the rounding may differ on a few values at exactly .5).
        to_fp32 = (out - unquantized).abs().max().item()
        assert to_fp32 > 1e-5, name
        assert (out - reference).abs().max().item() < 0.5 * to_fp32, name
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    gap = (after - before).abs().max().item()
    assert 0 < gap < 0.05 * before.abs().max().item()


def test_unknown_method_and_missing_torchao_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_llama(seed=0)
    assert quantize_weights(model, None) is None and quantize_weights(model, "none") is None
    with pytest.raises(ModelLoadError, match="unknown quantization 'int4'"):
        quantize_weights(model, "int4")
    real_import = builtins.__import__

    def no_torchao(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ModelLoadError, match=r"needs torchao.*pip install 'hpr-serve\[int8\]'"):
        quantize_weights(model, "int8")
