"""The on-disk activation store: safetensors shards plus a manifest that lists only complete shards.

Layout of one store directory (one per split, e.g. ``activations/train``)::

    manifest.json            settings fingerprint, model shape, dtype, and the list of complete shards
    shard-00000.safetensors  one group of questions:
        activations    (N, L, h) float16|float32   decoder-layer outputs of every stored response token
        answer_offsets (A + 1,)  int64   response tokens of answer a are rows offsets[a]:offsets[a + 1]
        answer_label   (A,)      int64   1 = correct / positive, 0 = incorrect / negative
        answer_question(A,)      int64   question index in the source data
        pair_answers   (P, 2)    int64   (positive answer, negative answer), local to the shard
        pair_start     (P,)      int64   first aligned response position used (after their shared token prefix)
        pair_length    (P,)      int64   aligned positions used: positions start .. start + length - 1

A shard is written to a temporary file, fsynced and renamed; only then is the manifest (also written
atomically) updated to list it. A shard file that the manifest does not list — a crash or a full disk midway —
is never read and is overwritten on resume.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from hpr.atomic_write import atomic_write as write_file_atomically
from trainer.errors import StoreError

MANIFEST = "manifest.json"
STORE_VERSION = 1
SHARD_KEYS = (
    "activations",
    "answer_offsets",
    "answer_label",
    "answer_question",
    "pair_answers",
    "pair_start",
    "pair_length",
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _disk_error(target: Path, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(
            f"{target}: no space left on the device while writing activations; nothing partial was kept. "
            "Free some space (or pass another --out) and re-run: completed shards are reused."
        )
    return StoreError(f"{target}: cannot write: {exc}")


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """:func:`hpr.atomic_write.atomic_write`, with disk errors (a full disk above all) as a :class:`StoreError`
    that says what to do."""
    try:
        write_file_atomically(target, write)
    except OSError as exc:
        raise _disk_error(target, exc) from exc


@dataclass
class ShardInfo:
    file: str
    questions: list[int]
    tokens: int
    answers: int
    pairs: int
    bytes: int


class ActivationStore:
    """One store directory. ``settings`` fingerprint the extraction; a mismatch on resume is an error."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.manifest: dict[str, Any] = {}
        self.shards: list[ShardInfo] = []
        if (self.directory / MANIFEST).is_file():
            self._load_manifest()

    def _load_manifest(self) -> None:
        file = self.directory / MANIFEST
        try:
            data = json.loads(file.read_text())
            self.shards = [ShardInfo(**s) for s in data["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{file}: corrupt manifest ({exc}); delete the directory to extract again") from exc
        self.manifest = data

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def open_for_writing(self, settings: dict[str, Any]) -> None:
        """Start or resume: keep the listed shards if ``settings`` match, else refuse (never mix settings)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.manifest:
            if self.manifest.get("settings") != settings:
                raise StoreError(
                    f"{self.directory / MANIFEST}: this store was extracted with other settings "
                    f"({self.manifest.get('settings')}); use another --out or delete the directory"
                )
            # A shard file must be listed and have the listed size; anything else is left over from a crash.
            self.shards = [s for s in self.shards if self._shard_ok(s)]
        else:
            self.manifest = {"version": STORE_VERSION, "settings": settings, "shards": [], "complete": False}
            self.shards = []
        listed = {s.file for s in self.shards}
        for stray in self.directory.glob("*.safetensors"):
            if stray.name not in listed:
                stray.unlink()
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink()

    def _shard_ok(self, shard: ShardInfo) -> bool:
        path = self.directory / shard.file
        return path.is_file() and path.stat().st_size == shard.bytes

    def done_questions(self) -> set[int]:
        return {q for s in self.shards for q in s.questions}

    def write_shard(self, index: int, questions: list[int], tensors: dict[str, Tensor]) -> None:
        missing = [k for k in SHARD_KEYS if k not in tensors]
        if missing:
            raise StoreError(f"shard {index}: missing tensors {missing}")
        target = self.directory / shard_name(index)
        data = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(target, lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))
        info = ShardInfo(
            file=target.name,
            questions=questions,
            tokens=int(tensors["activations"].shape[0]),
            answers=int(tensors["answer_label"].shape[0]),
            pairs=int(tensors["pair_answers"].shape[0]),
            bytes=target.stat().st_size,
        )
        self.shards = [s for s in self.shards if s.file != info.file] + [info]
        self._write_manifest()

    def mark_complete(self, summary: dict[str, Any]) -> None:
        self.manifest["complete"] = True
        self.manifest["summary"] = summary
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["shards"] = [vars(s) for s in sorted(self.shards, key=lambda s: s.file)]
        text = json.dumps(self.manifest, indent=2, sort_keys=True) + "\n"
        atomic_write(self.directory / MANIFEST, lambda tmp: Path(tmp).write_text(text))

    # --- reading ------------------------------------------------------------------------------------------------

    def require_complete(self) -> None:
        if not self.complete:
            raise StoreError(f"{self.directory}: activation store is missing or incomplete; run `hpr-train extract`")

    def load_shard(self, shard: ShardInfo) -> dict[str, Tensor]:
        path = self.directory / shard.file
        if not self._shard_ok(shard):
            raise StoreError(f"{path}: shard missing or of the wrong size; run `hpr-train extract` to redo it")
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise StoreError(f"{path}: cannot read shard: {exc}") from exc
        missing = [k for k in SHARD_KEYS if k not in data]
        if missing:
            raise StoreError(f"{path}: shard lacks tensors {missing}")
        return data

    def iter_shards(self) -> Iterator[dict[str, Tensor]]:
        for shard in self.shards:
            yield self.load_shard(shard)

    @property
    def num_pairs(self) -> int:
        return sum(s.pairs for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


def empty_shard(num_layers: int, hidden: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """A valid shard with no data (a group of questions whose pairs were all dropped)."""
    return {
        "activations": torch.zeros(0, num_layers, hidden, dtype=dtype),
        "answer_offsets": torch.zeros(1, dtype=torch.long),
        "answer_label": torch.zeros(0, dtype=torch.long),
        "answer_question": torch.zeros(0, dtype=torch.long),
        "pair_answers": torch.zeros(0, 2, dtype=torch.long),
        "pair_start": torch.zeros(0, dtype=torch.long),
        "pair_length": torch.zeros(0, dtype=torch.long),
    }
