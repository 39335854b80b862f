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
    changed = 0
    for name, module in model.named_modules():
        if name not in fp32:
            continue
        expected = _by_hand(fp32[name])
        with torch.inference_mode():
            out = module(x[:, : expected.shape[1]])
        reference = x[:, : expected.shape[1]] @ expected.T
        # the by-hand rounding may differ on a value at exactly .5: one int8 step on a handful of weights
        assert torch.allclose(out, reference, atol=0.02 * reference.abs().max().item()), name
        changed += int(not torch.allclose(out, x[:, : expected.shape[1]] @ fp32[name].T, atol=1e-6))
    assert changed == len(fp32)  # every linear layer is quantized (none left fp32)
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
