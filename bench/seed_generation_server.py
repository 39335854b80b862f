"""The seed's generation path, re-implemented as a minimal OpenAI-compatible streaming server (a benchmark baseline).

What the seed (the paper's reference code) did at generation time, and what this server therefore does:

* one request at a time: a global lock around each whole generation;
* NO KV cache (the seed loaded the model with ``use_cache=False``): every new token re-runs the full forward over
  the prompt plus everything generated so far, so step ``t`` costs a forward over ``prompt + t`` tokens;
* the HPR edit sits on each enabled decoder layer's output and, in the seed's "generation mode", edits only the
  last position of each forward pass. Per call it builds the h×h Householder matrix ``H = I − 2 w wᵀ / (wᵀw)``,
  reflects by matmul ``r = x H``, takes γ = ∠(x, r) through arccos, rotates with
  ``x' = sin θ / sin γ · r + sin(γ − θ) / sin γ · x`` and keeps/rotates rows through diagonal sign matrices.

It is deliberately NOT our editor (``hpr.editing``) and NOT our O(h) rotation (``hpr.householder``): only the
adapter's weights are loaded through :class:`hpr.checkpoint.HPRAdapter` (our format or the seed's), so both servers
edit with the same probe and angle network. Greedy decoding when ``temperature`` is 0 (what the benchmarks use),
else temperature / top-p sampling.

Run:  .venv/bin/python bench/seed_generation_server.py --adapter runs/truthfulqa/checkpoint --port 8102
Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (``stream`` or not,
``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stream_options.include_usage`` and the ``ignore_eos``
extension). Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from torch import Tensor, nn

from hpr.checkpoint import HPRAdapter
from hpr.decoder_layers import find_decoder_layers
from hpr.householder import HPRLayer
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model

log = logging.getLogger("seed_generation_server")
EPSILON = 1e-7  # the seed clamps cos(γ) to [−1 + ε, 1 − ε] before arccos


# --- the seed's edit: h×h Householder matrix, last position only -----------------------------------------------


def householder_matrix(w: Tensor) -> Tensor:
    """(1, h) normal → (h, h) reflection ``I − 2 wᵀw / |w|²``, built on every call as the seed did."""
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    matrix: Tensor = eye - 2 * (w.T @ w) / (torch.norm(w, dim=-1) ** 2)
    return matrix


def seed_angle(a: Tensor, b: Tensor) -> Tensor:
    """(..., h), (..., h) → (..., 1) angle in radians through a clamped arccos."""
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    return torch.arccos(cos.clamp(-1 + EPSILON, 1 - EPSILON))


def seed_apply_guidance(module: HPRLayer, x: Tensor, alpha: float) -> Tensor:
    """The seed's ``apply_guidance`` on (b, s, h) activations: probe sign, angle, h×h reflection, rotation."""
    b, s, h = x.shape
    sign = torch.sigmoid(module.probe(x)).round()  # (b, s, 1): 1 = already positive, keep
    angle = module.angle(x).unsqueeze(-1) * alpha  # (b, s, 1)
    reflected = x @ householder_matrix(module.probe.weight)  # (b, s, h) @ (h, h)
    gamma = seed_angle(x, reflected)  # (b, s, 1)
    rotated = torch.sin(angle) / torch.sin(gamma) * reflected + torch.sin(gamma - angle) / torch.sin(gamma) * x
    keep = torch.diag_embed(sign.squeeze(-1).reshape(s, b))  # (s, b, b)
    edit = torch.diag_embed((1 - sign).squeeze(-1).reshape(s, b))  # (s, b, b)
    out = keep @ x.reshape(s, b, h) + edit @ rotated.reshape(s, b, h)  # (s, b, h)
    return out.reshape(b, s, h)


class SeedLastTokenEdit:
    """Forward hooks on the enabled decoder layers; each edits the last position of the layer's output."""

    def __init__(self, model: nn.Module, adapter: HPRAdapter, layers: list[int], alpha: float) -> None:
        self.layers = layers
        self.handles = []
        blocks = find_decoder_layers(model)
        for index in layers:
            self.handles.append(blocks[index].register_forward_hook(self._hook(adapter.layer(index), alpha)))

    @staticmethod
    def _hook(module: HPRLayer, alpha: float) -> Callable[..., Any]:
        def hook(_layer: nn.Module, _args: Any, output: Any) -> Any:
            hidden = output if isinstance(output, Tensor) else output[0]  # (b, T, h)
            b, _, h = hidden.shape
            last = hidden[:, -1, :].reshape(b, 1, h)
            hidden[:, -1, :] = seed_apply_guidance(module, last.float(), alpha).reshape(b, h).to(hidden.dtype)
            return output

        return hook


# --- generation: no KV cache, one request at a time --------------------------------------------------------------


@dataclass
class SeedState:
    loaded: LoadedModel
    edit_layers: list[int]
    adapter_name: str | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def next_token(model: nn.Module, ids: list[int], temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One full forward over ``ids`` (no cache) → the next token id."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()  # (V,)
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cut = torch.cumsum(sorted_probs, 0) - sorted_probs >= top_p
        sorted_probs[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


async def generate(state: SeedState, prompt_ids: list[int], body: dict[str, Any]) -> AsyncIterator[tuple[str, int]]:
    """Yield ``(text delta, token id)`` per generated token; holds the global lock for the whole request."""
    model, tok = state.loaded.model, state.loaded.tokenizer
    max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
    temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
    top_p = float(body.get("top_p") or 1.0)
    ignore_eos = bool(body.get("ignore_eos", False))
    gen = torch.Generator().manual_seed(int(body["seed"]) if body.get("seed") is not None else 0)
    eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    async with state.lock:
        ids = list(prompt_ids)
        generated: list[int] = []
        text = ""
        for _ in range(max_tokens):
            token = await asyncio.to_thread(next_token, model, ids, temperature, top_p, gen)
            if token in eos and not ignore_eos:
                return
            ids.append(token)
            generated.append(token)
            full = tok.decode(generated, skip_special_tokens=True)
            delta, text = full[len(text) :], full
            yield delta, token


def encode_prompt(state: SeedState, body: dict[str, Any], chat: bool) -> list[int]:
    """The seed's prompt path: chat template to a string, then tokenize without extra special tokens."""
    tok = state.loaded.tokenizer
    if chat:
        messages = [
            {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else _text(m["content"])}
            for m in body["messages"]
        ]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
    return list(tok(prompt, add_special_tokens=False)["input_ids"])


def _text(parts: list[dict[str, Any]]) -> str:
    return "".join(p.get("text", "") for p in parts if p.get("type") == "text")


# --- HTTP -------------------------------------------------------------------------------------------------------


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    err = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return JSONResponse({"error": err}, status_code=status)


def _chunk(rid: str, model: str, chat: bool, delta: str | None, finish: str | None, role: bool = False) -> str:
    if chat:
        d: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
        choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish}
        obj = "text_completion"
    return json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]})


def build_app(args: argparse.Namespace) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = load_model(args.model, device="cpu", dtype=args.dtype)
        layers: list[int] = []
        name = None
        if args.adapter:
            adapter = HPRAdapter.load(args.adapter, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
            name = args.adapter_name or adapter.name
            layers = _pick_layers(adapter, args.layers)
            SeedLastTokenEdit(loaded.model, adapter, layers, args.alpha)
        log.info("seed server: model %s, edited layers %s, alpha %s", loaded.model_id, layers, args.alpha)
        app.state.seed = SeedState(loaded=loaded, edit_layers=layers, adapter_name=name)
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ready = getattr(request.app.state, "seed", None) is not None
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        state: SeedState = request.app.state.seed
        ids = [state.loaded.model_id] + ([state.adapter_name] if state.adapter_name else [])
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "owned_by": "seed"} for i in ids]})

    async def complete(request: Request, chat: bool) -> Any:
        state: SeedState = request.app.state.seed
        try:
            body = await request.json()
            prompt_ids = encode_prompt(state, body, chat)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return _error(400, f"bad request: {exc!r}")
        model = str(body.get("model") or state.loaded.model_id)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        if not body.get("stream"):
            pieces = [delta async for delta, _ in generate(state, prompt_ids, body)]
            finish = "length" if len(pieces) >= max_tokens else "stop"
            text = "".join(pieces)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            obj = "chat.completion" if chat else "text_completion"
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
                    "usage": usage(len(pieces))}  # fmt: skip

        async def frames() -> AsyncIterator[str]:
            if chat:
                yield _chunk(rid, model, chat, None, None, role=True)
            n = 0
            async for delta, _ in generate(state, prompt_ids, body):
                n += 1
                yield _chunk(rid, model, chat, delta, None)
            yield _chunk(rid, model, chat, None, "length" if n >= max_tokens else "stop")
            if usage_wanted:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield json.dumps({"id": rid, "object": obj, "model": model, "choices": [], "usage": usage(n)})
            yield "[DONE]"

        return EventSourceResponse(frames(), ping=3600)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    return app


def _pick_layers(adapter: HPRAdapter, spec: str) -> list[int]:
    if spec == "selected":
        return list(adapter.config.selected_layers)
    if spec == "all":
        return list(adapter.config.layers)
    if spec == "none":
        return []
    layers = [int(x) for x in spec.split(",") if x.strip()]
    missing = sorted(set(layers) - set(adapter.config.layers))
    if missing:
        raise SystemExit(f"--layers: {missing} have no trained module (trained: {adapter.config.layers})")
    return layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", default=EMBEDDED_MODEL_ID, help="base model (as for hpr-serve)")
    p.add_argument("--adapter", default=None, help="HPR adapter directory (ours or the seed's); none = base model")
    p.add_argument("--adapter-name", default=None, help="id under which the adapter is listed (default: dir name)")
    p.add_argument("--layers", default="selected", help="selected | all | none | comma list, e.g. 10,11,12")
    p.add_argument("--alpha", type=float, default=1.0, help="angle scale, as the seed's --alpha")
    p.add_argument("--dtype", default="float32", help="model dtype (the seed used float32 with guidance modules)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8102)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if not math.isfinite(args.alpha):
        p.error("--alpha must be finite")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
