"""``python -m hpr.prepare [MODEL]``: convert and cache a model once (the embedded default if none given)."""

from __future__ import annotations

import argparse
import logging
import time

from hpr.model import EMBEDDED_MODEL_ID, resolve_model_source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default=EMBEDDED_MODEL_ID, help="model id, directory or .gguf file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    model_id, source = resolve_model_source(args.model)
    print(f"{model_id}: ready in {source} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
