"""A server command as a subprocess on loopback: start it, wait until ``GET /health`` answers 200, pause, stop.

The one way this project starts a server it then talks to over HTTP. :class:`trainer.gen_client.LocalServer`
(``hpr-serve``, for ``hpr-train eval-gen`` and the bench/ and docs/ scripts that start our server) is one;
``bench/server_process.py`` uses it for the benchmarks that compare servers (``hpr-serve``, ``transformers
serve``, vLLM, the seed's server). It lives in ``trainer/`` because that is the installed package that needs it:
``trainer/`` and ``server/`` never import each other, and ``hpr/`` is the edit core, not a process manager.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from trainer.errors import TrainerError

POLL_SECONDS = 0.5  # between health checks while the server starts


class ServerStartError(TrainerError):
    """The server exited during startup, or was not healthy in time; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """One server: ``command`` is run with ``{port}`` substituted; ``base_url`` ends in ``/v1``.

    Its output goes to ``<log_dir>/<name>.log`` (the command first), so a failure to start can be shown. It runs
    in a session of its own, so :meth:`pause` and :meth:`stop` reach every process it starts. As a context
    manager: started and healthy inside the block (within ``startup_timeout``), stopped after it.
    """

    name: str
    command: list[str]
    log_dir: Path
    model: str  # the `model` field requests send for the base model
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    threads: int | None = None  # torch intra-op threads (OMP_NUM_THREADS, MKL_NUM_THREADS); None: the default
    env: dict[str, str] = field(default_factory=dict)  # more environment for the server process
    cwd: Path | None = None  # the server's working directory; None: this process's
    startup_timeout: float = 300.0  # seconds, for the context manager
    stop_timeout: float = 20.0  # seconds to wait after SIGTERM (and again after SIGKILL)

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> None:
        cmd = [part.replace("{port}", str(self.port)) for part in self.command]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        env.update(self.env)
        with self.log_file.open("wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True, env=env
            )

    def wait_healthy(self, timeout: float) -> None:
        """Poll ``GET /health`` until 200; :class:`ServerStartError` with the log's tail if the process exits or
        ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerStartError(self._failure("exited during startup"))
            try:
                if httpx.get(self.root_url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(POLL_SECONDS)
        raise ServerStartError(self._failure(f"not healthy after {timeout:.0f} s"))

    def pause(self) -> None:
        """SIGSTOP the server (and its process group) so an idle server takes no CPU from the one measured."""
        if self.proc is not None and self.proc.poll() is None and not self.paused:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the process group, SIGKILL it if it has not exited after ``timeout`` (default ``stop_timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        timeout = self.stop_timeout if timeout is None else timeout
        self.resume()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads), from /proc; NaN if unknown."""
        if self.proc is None:
            return float("nan")
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in ticks

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _failure(self, what: str) -> str:
        return f"{self.name} {what}; its log ({self.log_file}) ends:\n{self.log_tail()}"

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_healthy(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()
