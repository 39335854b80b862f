"""GGUF conversion: the cached directory is a standard Hugging Face directory that other tools (vLLM, llama.cpp's
``convert_hf_to_gguf.py``) read, with the tied embedding stored as ``model.embed_tokens.weight``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hpr import model as hpr_model
from hpr.model import EMBEDDED_MODEL_ID, converted_gguf_dir, embedded_gguf_path

VOCAB, HIDDEN = 64, 32


def write_tiny_llama_gguf(path: Path, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 64) -> None:
    """A random float32 llama GGUF with no ``output.weight`` (a tied LM head, as in SmolLM2's GGUF) and a
    byte-free gpt2 tokenizer of ``VOCAB`` tokens."""
    import gguf

    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    letters = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 3)]  # a..z, aa..zz, aaa..
    writer.add_token_list(["<unk>", "<s>", "</s>", *letters])
    writer.add_token_types([3, 3, 3] + [1] * len(letters))  # 3: control, 1: normal
    writer.add_token_merges(["a a"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", rand(VOCAB, HIDDEN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    kv = kv_heads * HIDDEN // heads
    for layer in range(layers):
        block = {
            "attn_norm": np.ones(HIDDEN, np.float32),
            "ffn_norm": np.ones(HIDDEN, np.float32),
            "attn_q": rand(HIDDEN, HIDDEN),
            "attn_k": rand(kv, HIDDEN),
            "attn_v": rand(kv, HIDDEN),
            "attn_output": rand(HIDDEN, HIDDEN),
            "ffn_gate": rand(ffn, HIDDEN),
            "ffn_up": rand(ffn, HIDDEN),
            "ffn_down": rand(HIDDEN, ffn),
        }
        for name, array in block.items():
            writer.add_tensor(f"blk.{layer}.{name}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not a dict)


def assert_standard_tied_directory(directory: Path, vocab: int, hidden: int) -> torch.nn.Module:
    """The HF convention for a tied head (what ``save_pretrained`` writes): the embedding under its own name, no
    ``lm_head.weight``; plain transformers loads it with the head equal to the embedding. Returns that model."""
    from transformers import AutoModelForCausalLM

    shapes = weight_shapes(directory)
    assert shapes["model.embed_tokens.weight"] == (vocab, hidden)
    assert "lm_head.weight" not in shapes
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    return model


def gguf_logits(gguf_file: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPR_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return path


def test_converted_gguf_stores_tied_embedding_under_standard_name(tiny_gguf: Path) -> None:
    import gguf

    directory = converted_gguf_dir(tiny_gguf)
    model = assert_standard_tied_directory(directory, VOCAB, HIDDEN)
    token_embd = next(t for t in gguf.GGUFReader(str(tiny_gguf)).tensors if t.name == "token_embd.weight")
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(np.array(token_embd.data)))
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.equal(logits, gguf_logits(tiny_gguf, ids))


def test_cache_from_an_older_conversion_is_rebuilt(tiny_gguf: Path) -> None:
    directory = converted_gguf_dir(tiny_gguf)
    # What conversion v2 left: the tied tensor stored only as lm_head.weight, and a v2 marker.
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    marker = directory / hpr_model._CONVERTED_MARKER
    current = marker.read_text()
    assert current.startswith(f"v{hpr_model._CONVERSION_VERSION}|") and hpr_model._CONVERSION_VERSION >= 3
    marker.write_text("v2|" + current.split("|", 1)[1])

    assert converted_gguf_dir(tiny_gguf) == directory
    assert marker.read_text() == current
    assert "model.embed_tokens.weight" in weight_shapes(directory)
    assert "lm_head.weight" not in weight_shapes(directory)


@pytest.mark.slow
def test_embedded_model_directory_is_standard() -> None:
    gguf_file = embedded_gguf_path()
    directory = converted_gguf_dir(gguf_file, EMBEDDED_MODEL_ID)
    model = assert_standard_tied_directory(directory, vocab=49152, hidden=576)
    ids = torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.equal(logits, gguf_logits(gguf_file, ids))
