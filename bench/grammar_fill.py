"""What a grammar costs per token and row, by library and by schema: the CPU time of filling one row's token mask,
llguidance (what both backends use, vLLM's ``guidance`` backend) against xgrammar (vLLM's default backend, which
hpr-serve used first). Prints figures.

    .venv/bin/python bench/grammar_fill.py [--texts 6] [--json out.json]

No server and no model run: SmolLM2's tokenizer, the schema of ``bench/structured_output.py`` (records whose
``name`` has ``maxLength`` 16) and the same schema without ``maxLength``, and JSON texts that match them (random
names of 1-15 characters). For each text, a fresh matcher walks the text's tokens: fill the mask, then accept the
token. The figure is the thread CPU time of the fills divided by the tokens walked (µs per token per row), so load
from other processes does not count. A step of B constrained rows costs B times this figure in the process that
fills the masks (vLLM's engine core; our engine thread), before or alongside the forward.

Both libraries are given the same language, each through its own JSON-schema compiler: compact JSON with ", " and
": " separators (llguidance's grammar is the one hpr-serve serves, ``server.serving.structured.grammar_schema_of``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from structured_output import RECORDS

MODEL_DIR = Path.home() / ".cache" / "hpr-serve" / "models" / "smollm2-135m-instruct"
WORDS = ["Paris", "alpha", "John Smith", "x", "the best one", "Zeta", "Brave new", "q", "Lorem ipsum dolor"]


def texts(tokenizer: Any, count: int, max_tokens: int = 128) -> list[list[int]]:
    rng = random.Random(0)
    out = []
    for _ in range(count):
        items = [{"name": rng.choice(WORDS)[:12] + str(rng.randint(0, 999)), "score": rng.randint(0, 100),
                  "tags": rng.sample(["a", "b", "c"], rng.randint(0, 3))} for _ in range(20)]  # fmt: skip
        out.append(tokenizer.encode(json.dumps({"items": items}))[:max_tokens])
    return out


def walk(new_matcher: Any, fill: Any, accept: Any, walks: list[list[int]]) -> float:
    """Thread CPU µs per fill, over every token of every walk (each walk on a fresh matcher)."""
    cpu = tokens = 0
    for ids in walks:
        matcher = new_matcher()
        for token in ids:
            start = time.thread_time_ns()
            fill(matcher)
            cpu += time.thread_time_ns() - start
            tokens += 1
            if not accept(matcher, token):
                raise RuntimeError(f"the grammar refused token {token}: the text does not match the schema")
    return cpu / tokens / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=6)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()

    import llguidance
    import llguidance.hf
    import llguidance.torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from server.serving.structured import grammar_schema_of

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    vocab = 49152
    walks = texts(tokenizer, args.texts)
    unbounded: dict[str, Any] = copy.deepcopy(RECORDS)
    del unbounded["properties"]["items"]["items"]["properties"]["name"]["maxLength"]
    schemas = {"name maxLength 16": RECORDS, "no maxLength": unbounded}

    xgr_compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    xgr_mask = xgr.allocate_token_bitmask(1, vocab)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)  # type: ignore[arg-type]
    ll_mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    results: dict[str, dict[str, float]] = {}
    for label, schema in schemas.items():
        start = time.perf_counter()
        compiled = xgr_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        xgr_compile = time.perf_counter() - start
        grammar = llguidance.LLMatcher.grammar_from_json_schema(grammar_schema_of(schema))
        xgr_cost = walk(
            functools.partial(xgr.GrammarMatcher, compiled),
            lambda m: m.fill_next_token_bitmask(xgr_mask, 0),
            lambda m, t: m.accept_token(t),
            walks,
        )
        ll_cost = walk(
            functools.partial(llguidance.LLMatcher, ll_tokenizer, grammar),
            lambda m: llguidance.torch.fill_next_token_bitmask(m, ll_mask, 0),
            lambda m, t: m.consume_token(t),
            walks,
        )
        results[label] = {
            "llguidance µs/token/row": ll_cost,
            "xgrammar µs/token/row": xgr_cost,
            "xgrammar compile (s)": xgr_compile,
        }
        print(label, json.dumps({k: round(v, 3 if "(s)" in k else 1) for k, v in results[label].items()},
                                ensure_ascii=False), flush=True)  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
