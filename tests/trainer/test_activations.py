"""Extraction: exact layer outputs on response tokens, the 75 % rule, shards, resume after a crash, full disk."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from hpr.decoder_layers import capture_layer_outputs
from trainer import store as store_module
from trainer.activations import ExtractOptions, Extractor, align_pair, store_settings
from trainer.data import Question
from trainer.errors import StoreError
from trainer.prompts import encode_all
from trainer.store import ActivationStore


def extract(model, tokenizer, questions, directory: Path, **options):  # type: ignore[no-untyped-def]
    opts = ExtractOptions(store_dtype="float32", **options)
    enc = encode_all(tokenizer, questions, "chat")
    store = ActivationStore(directory)
    summary = Extractor(model, opts).run(enc, store, store_settings("tiny", opts, {"n": len(enc)}), progress=False)
    return enc, store, summary


def test_identical_share_counts_equal_aligned_tokens_over_the_shorter_response() -> None:
    al = align_pair([1, 2, 3, 4, 9, 9], [1, 2, 5, 4], keep_shared_prefix=False)
    assert al.identical_share == 0.75 and al.start == 2 and al.length == 2
    assert align_pair([1, 2, 3], [1, 7, 3], keep_shared_prefix=True).start == 0


def test_stored_activations_equal_each_layers_output_of_a_plain_forward(
    tiny_model, char_tokenizer, small_questions, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    enc, store, summary = extract(tiny_model, char_tokenizer, small_questions, tmp_path / "s")
    assert store.complete and summary["pairs_kept"] > 0
    shard = store.load_shard(store.shards[0])
    offsets, qids = shard["answer_offsets"], shard["answer_question"]
    q = enc[0]
    n_layers = tiny_model.config.num_hidden_layers
    # answer 0 of question 0 is stored first: compare with a forward over prompt + answer, no cache
    ids = list(q.prompt_ids) + list(q.answers[0])
    with torch.no_grad(), capture_layer_outputs(tiny_model, range(n_layers)) as cap:
        tiny_model(input_ids=torch.tensor([ids]))
        expected = torch.stack([cap[layer][0, len(q.prompt_ids) :] for layer in range(n_layers)], dim=1)  # (T, L, h)
    assert int(qids[0]) == 0
    got = shard["activations"][offsets[0] : offsets[1]]
    assert torch.allclose(got, expected, atol=1e-5)


def test_pairs_at_least_75_percent_identical_are_dropped(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    q = Question(0, "Q?", ("The answer is yes.",), ("The answer is no..", "Something else entirely."))
    _, store, summary = extract(tiny_model, char_tokenizer, [q], tmp_path / "s")
    assert summary["pairs_dropped_identical"] == 1 and summary["pairs_kept"] == 1
    shard = store.load_shard(store.shards[0])
    assert shard["answer_label"].tolist() == [1, 0]  # the dropped answer is not stored


def test_resume_skips_complete_shards_and_ignores_a_partial_one(
    tiny_model, char_tokenizer, small_questions, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "s"
    _, reference, _ = extract(tiny_model, char_tokenizer, small_questions, tmp_path / "ref", shard_mb=1)
    writes = []
    original = store_module.save_file

    def crash_on_second(tensors, path, metadata=None):  # type: ignore[no-untyped-def]
        writes.append(path)
        if len(writes) == 2:
            Path(path).write_bytes(b"half a shard")  # the process dies mid-write
            raise KeyboardInterrupt
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(store_module, "save_file", crash_on_second)
    # 1 MiB shards hold one question each here (char tokens, h=64, 4 layers: ~1 KB/token ... force 3 shards)
    monkeypatch.setattr("trainer.activations.plan_shards", lambda plans, b, mb: [[p] for p in plans])
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_model, char_tokenizer, small_questions, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"] and not manifest["complete"]
    (directory / "shard-00001.safetensors").write_bytes(b"truncated garbage that looks like a shard")

    monkeypatch.setattr(store_module, "save_file", original)
    writes.clear()
    _, store, summary = extract(tiny_model, char_tokenizer, small_questions, directory)
    assert summary["shards_reused"] == 1 and store.complete
    got = torch.cat([store.load_shard(s)["activations"] for s in store.shards])
    want = torch.cat([reference.load_shard(s)["activations"] for s in reference.shards])
    assert torch.allclose(got, want, atol=1e-5)


def test_full_disk_gives_a_clear_error_and_no_complete_looking_shard(
    tiny_model, char_tokenizer, small_questions, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    def no_space(tensors, path, metadata=None):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "save_file", no_space)
    directory = tmp_path / "s"
    with pytest.raises(StoreError, match="no space left") as info:
        extract(tiny_model, char_tokenizer, small_questions, directory)
    assert "shard-00000.safetensors" in str(info.value)
    assert not list(directory.glob("*.safetensors")) and not list(directory.glob(".*"))
    assert not ActivationStore(directory).complete


def test_store_refuses_to_mix_settings(tiny_model, char_tokenizer, small_questions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    extract(tiny_model, char_tokenizer, small_questions, tmp_path / "s")
    with pytest.raises(StoreError, match="other settings"):
        extract(tiny_model, char_tokenizer, small_questions, tmp_path / "s", max_identical=0.5)
