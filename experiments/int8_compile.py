"""Would int8 weights or ``torch.compile`` make batch-1 decode faster on this CPU? HF ``generate``, four ways.

SmolLM2 fp32 at batch 1, greedy, ``--tokens`` new tokens, ``--threads`` torch threads; best of ``--reps``:
fp32 eager, fp32 compiled (``torch.compile`` of the forward with HF's static cache), int8 weight-only eager and
compiled (``hpr.model.quantize_weights``, as ``hpr-serve --quantization int8``: torchao ``Int8WeightOnlyConfig``,
the LM head left fp32). Also checks that the first 10 greedy tokens agree. torchao is an optional dependency of
hpr-serve (``pip install 'hpr-serve[int8]'``; 0.18.0 was measured), or pass ``--no-int8``.
Compiling takes a minute or more per variant on 2 cores.

    .venv/bin/python experiments/int8_compile.py [--tokens 48] [--threads 1] [--reps 3] [--no-int8]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from hpr.model import EMBEDDED_MODEL_ID, load_model, quantize_weights


def bench(model: Any, ids: torch.Tensor, tokens: int, reps: int, **kwargs: Any) -> tuple[list[float], list[int]]:
    rates = []
    out = ids
    for _ in range(reps):
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)
        rates.append(tokens / (time.perf_counter() - t))
    return rates, out[0, ids.shape[1] : ids.shape[1] + 10].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-int8", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(EMBEDDED_MODEL_ID, "cpu", "float32")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    models = {"fp32": loaded.model}
    if not args.no_int8:
        models["int8"] = copy.deepcopy(loaded.model)
        quantize_weights(models["int8"], "int8")  # as hpr-serve --quantization int8 does
    load = os.getloadavg()[0]
    print(f"batch 1, {args.tokens} tokens, {args.threads} thread(s), best of {args.reps}; load {load:.2f}")
    reference = None
    with torch.inference_mode():
        for name, model in models.items():
            for compiled in (False, True):
                kwargs: dict[str, Any] = {}
                started = time.perf_counter()
                if compiled:
                    model.forward = torch.compile(model.forward, dynamic=False)
                    kwargs["cache_implementation"] = "static"
                    bench(model, ids, args.tokens, 1, **kwargs)  # compiles
                warm = time.perf_counter() - started
                rates, first = bench(model, ids, args.tokens, args.reps, **kwargs)
                reference = reference or first
                label = f"{name} {'compiled' if compiled else 'eager'}"
                extra = f"; compile + first run {warm:.0f} s" if compiled else ""
                print(
                    f"{label:14s} {max(rates):5.1f} tok/s (runs {', '.join(f'{r:.1f}' for r in rates)}); "
                    f"first tokens {'same' if first == reference else 'DIFFER'}{extra}",
                    flush=True,
                )
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
