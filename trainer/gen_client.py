"""Generating answers through an OpenAI-compatible server: ``hpr-serve`` started here, or any server at a URL.

The generation-mode evaluation never runs a generate loop of its own: answers come from the engine that serves
users, over HTTP, as chat completions (greedy). ``trainer/`` does not import ``server/``: :class:`LocalServer`
starts the ``hpr-serve`` command as a subprocess on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
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


class GenerationError(TrainerError):
    """The server refused a request, died, or answered with something that is not a chat completion."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_command() -> str:
    beside = Path(sys.executable).parent / "hpr-serve"
    found = str(beside) if beside.exists() else shutil.which("hpr-serve")
    if not found:
        raise GenerationError("the hpr-serve command is not installed (pip install -e .), or pass --base-url")
    return found


class LocalServer:
    """``hpr-serve`` on 127.0.0.1 in a subprocess, for the length of a ``with`` block; its log goes to a file.

    Also what bench/ and docs/ scripts start their server with (``extra_args``: any further ``hpr-serve`` flags)."""

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
        self.port = _free_port()
        self.command = [
            _serve_command(),
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
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
            self.command += ["--adapter", f"{name}={path}"]
        if threads:
            self.command += ["--num-threads", str(threads)]
        self.command += list(extra_args)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="hpr-eval-gen-server-", suffix=".log")[1])

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def __enter__(self) -> LocalServer:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GenerationError(f"hpr-serve exited during startup; its log ({self.log}):\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise GenerationError(f"hpr-serve not healthy after {self.startup_timeout:.0f} s; log tail:\n{self.log_tail()}")

    def __exit__(
        self, exc_type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()
        if exc_type is None:  # the log is kept (and named in the error) only when something went wrong
            self.log.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


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
