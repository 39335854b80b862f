"""Generating answers through an OpenAI-compatible server: ``hpr-serve`` started here, or any server at a URL.

The generation-mode evaluation never runs a generate loop of its own: answers come from the engine that serves
users, over HTTP, as chat completions (greedy). ``trainer/`` does not import ``server/``: :class:`LocalServer`
starts the ``hpr-serve`` command as a subprocess on a free loopback port (:mod:`trainer.server_process`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from tqdm import tqdm

from trainer.errors import TrainerError
from trainer.server_process import ServerProcess


class GenerationError(TrainerError):
    """The server refused a request, died, or answered with something that is not a chat completion."""


def _serve_command() -> str:
    beside = Path(sys.executable).parent / "hpr-serve"
    found = str(beside) if beside.exists() else shutil.which("hpr-serve")
    if not found:
        raise GenerationError("the hpr-serve command is not installed (pip install -e .), or pass --base-url")
    return found


class LocalServer(ServerProcess):
    """``hpr-serve`` on 127.0.0.1 in a subprocess, for the length of a ``with`` block; its log goes to a temporary
    file, kept (and named in the error) only when something went wrong.

    Also what bench/ and docs/ scripts start our server with (``extra_args``: any further ``hpr-serve`` flags).
    ``threads`` becomes ``--num-threads``. A failed start raises :class:`~trainer.server_process.ServerStartError`.
    """

    def __init__(
        self,
        model: str,
        adapters: dict[str, Path],
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        max_batch_size: int = 32,
        startup_timeout: float = 300.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        command = [
            _serve_command(),
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--device",
            device,
            "--dtype",
            dtype,
            "--max-batch-size",
            str(max_batch_size),
            "--log-level",
            "warning",
        ]
        for name, path in adapters.items():
            command += ["--adapter", f"{name}={path}"]
        if threads:
            command += ["--num-threads", str(threads)]
        command += list(extra_args)
        log_dir = Path(tempfile.mkdtemp(prefix="hpr-eval-gen-server-"))
        super().__init__("hpr-serve", command, log_dir, model, startup_timeout=startup_timeout, stop_timeout=30.0)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        if exc_type is None:
            shutil.rmtree(self.log_dir, ignore_errors=True)


@dataclass(frozen=True)
class ChatRequest:
    """One greedy chat completion: ``question`` as the only user turn, edited by ``hpr`` (None = the base)."""

    key: tuple[str, int]  # (configuration name, question index)
    model: str
    question: str
    hpr: dict[str, Any] | None
    max_tokens: int
    logprobs: bool = False  # ask for each generated token's logprob


@dataclass(frozen=True)
class ChatAnswer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    applied: dict[str, Any] | None  # the `hpr` object the server says it applied
    token_logprobs: tuple[tuple[str, float], ...] | None = None  # (token text, logprob) per generated token


def _post(client: httpx.Client, request: ChatRequest, retries: int) -> ChatAnswer:
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [{"role": "user", "content": request.question}],
        "max_tokens": request.max_tokens,
        "temperature": 0,
    }
    if request.hpr is not None:
        body["hpr"] = request.hpr
    if request.logprobs:
        body["logprobs"] = True
    for attempt in range(retries + 1):
        try:
            response = client.post("/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise GenerationError(f"configuration {request.key[0]!r}: request failed: {exc}") from exc
        if response.status_code == 429 and attempt < retries:  # queue full: back off and retry
            time.sleep(float(response.headers.get("retry-after", "1")))
            continue
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise GenerationError(
                f"configuration {request.key[0]!r}: the server answered {response.status_code}: {message}"
            )
        try:
            data = response.json()
            choice = data["choices"][0]
            token_logprobs = None
            if request.logprobs:
                content = (choice.get("logprobs") or {}).get("content") or []
                token_logprobs = tuple((str(e["token"]), float(e["logprob"])) for e in content)
            return ChatAnswer(
                text=choice["message"]["content"] or "",
                finish_reason=str(choice.get("finish_reason")),
                prompt_tokens=int(data["usage"]["prompt_tokens"]),
                completion_tokens=int(data["usage"]["completion_tokens"]),
                applied=data.get("hpr"),
                token_logprobs=token_logprobs,
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise GenerationError(f"configuration {request.key[0]!r}: not a chat completion: {exc}") from exc
    raise GenerationError(f"configuration {request.key[0]!r}: still refused (429) after {retries} retries")


def generate(
    base_url: str,
    requests: Sequence[ChatRequest],
    concurrency: int = 32,
    api_key: str | None = None,
    timeout: float = 600.0,
    retries: int = 20,
    progress: bool = False,
) -> dict[tuple[str, int], ChatAnswer]:
    """Send every request, ``concurrency`` at a time (they share the server's batches); answers by key."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with (
        httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, limits=limits) as client,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        futures = {r.key: pool.submit(_post, client, r, retries) for r in requests}
        try:
            done = as_completed(futures.values())
            for future in tqdm(done, total=len(futures), desc="generate", unit="answer", disable=not progress):
                future.result()  # the first failure stops the run
            return {key: future.result() for key, future in futures.items()}
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise


def list_models(base_url: str, api_key: str | None = None) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30)
        response.raise_for_status()
        return list(response.json()["data"])
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise GenerationError(f"{base_url}: cannot list models: {exc}") from exc
