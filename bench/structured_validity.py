"""The share of answers that parse and validate against a JSON schema, with and without ``response_format``, per edit
strength (issue 30 §3; the table in docs/quality.md). Prints figures.

    .venv/bin/python bench/structured_validity.py [--adapter runs/truthfulqa/checkpoint] [--alphas 0,1,2,4]

One hpr-serve on SmolLM2 with the adapter. For each alpha (0: the base model; else the adapter on its selected
layers, scope ``all``, every generated token), 24 chat requests ask for the weather in a city as a JSON object with
three keys (greedy, 80 tokens at most). Each answer is judged by pydantic:

- **strict**: the whole answer is the object (what ``client.chat.completions.parse()`` needs);
- **lenient** (unconstrained only): some ``{...}`` in the answer is the object (inside a code fence, say).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import TRAINED_CHECKPOINT, VENV_BIN, ServerProcess

MODEL = "smollm2-135m-instruct"
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Quito", "Seoul", "Accra", "Perth", "Dakar",
          "Lagos", "Hanoi", "Riga", "Bern", "Doha", "Kyiv", "Baku", "Suva", "Apia", "Male", "Nuuk", "Lome"]  # fmt: skip


class Weather(BaseModel):
    city: str = Field(max_length=24)
    temperature_c: int = Field(ge=-60, le=60)
    conditions: Literal["sunny", "cloudy", "rain", "snow"]


def messages(city: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply with only a JSON object with keys city, temperature_c (integer) and "
             f"conditions (sunny, cloudy, rain or snow) for the weather in {city}."}]  # fmt: skip


def strict(text: str) -> bool:
    try:
        Weather.model_validate_json(text)
    except ValidationError:
        return False
    return True


def lenient(text: str) -> bool:
    return any(strict(match) for match in re.findall(r"\{[^{}]*\}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=str(TRAINED_CHECKPOINT))
    parser.add_argument("--alphas", default="0,1,2,4")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    server = ServerProcess(
        "hpr-serve", [str(VENV_BIN / "hpr-serve"), "--adapter", f"edit={args.adapter}", "--port", "{port}",
                      "--num-threads", str(args.threads), "--max-batch-size", "24"],
        Path("/tmp/structured-validity"), MODEL, threads=args.threads,
    )  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "Weather", "schema": Weather.model_json_schema(),
                                                  "strict": True}}  # fmt: skip
    rows = []
    server.start()
    try:
        server.wait_healthy(600)
        for alpha in [float(a) for a in args.alphas.split(",")]:
            hpr = {"adapter": "edit", "alpha": alpha, "scope": "all", "edit_tokens": "all"} if alpha else None
            row: dict[str, object] = {"alpha": alpha}
            for constrained in (False, True):

                def ask(city: str, constrained: bool = constrained, hpr: dict[str, object] | None = hpr) -> str:
                    body: dict[str, object] = {"model": MODEL, "messages": messages(city), "max_tokens": 80,
                                               "temperature": 0}  # fmt: skip
                    if hpr:
                        body["hpr"] = hpr
                    if constrained:
                        body["response_format"] = fmt
                    reply = httpx.post(server.base_url + "/chat/completions", json=body, timeout=600)
                    reply.raise_for_status()
                    return str(reply.json()["choices"][0]["message"]["content"])

                with ThreadPoolExecutor(len(CITIES)) as pool:
                    texts = list(pool.map(ask, CITIES))
                key = "with response_format" if constrained else "without"
                row[f"{key}: strict"] = f"{sum(map(strict, texts))}/{len(texts)}"
                if not constrained:
                    row[f"{key}: lenient"] = f"{sum(map(lenient, texts))}/{len(texts)}"
                row[f"{key}: example"] = texts[0][:90]
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
