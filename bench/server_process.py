"""Servers under benchmark as subprocesses on loopback: start, wait for health, pause/resume, stop.

Used by ``bench/compare_servers.py``. Every server binds 127.0.0.1 on a free port; its output goes to a log file
so a failure to start can be shown. Also builds the two inputs the servers share: the model directory that
``transformers serve`` can load, and the HPR adapter (trained checkpoint, else random weights of the right shape).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TRAINED_CHECKPOINT = REPO / "runs" / "truthfulqa" / "checkpoint"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """One server: ``command`` is run with ``{port}`` substituted; ``base_url`` ends in ``/v1``."""

    name: str
    command: list[str]
    log_dir: Path
    model: str  # the `model` field requests send for the base model
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    threads: int | None = None  # torch intra-op threads (OMP_NUM_THREADS), the same for every server; None: default
    env: dict[str, str] = field(default_factory=dict)  # more environment for the server process

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> None:
        cmd = [part.replace("{port}", str(self.port)) for part in self.command]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            env = dict(os.environ)
            if self.threads:
                env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
            env.update(self.env)
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True, env=env
            )

    def wait_healthy(self, timeout: float) -> None:
        """Poll ``GET /health`` until 200; raise with the log's tail if the process dies or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during startup; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def pause(self) -> None:
        """SIGSTOP the server (and its process group) so an idle server takes no CPU from the one measured."""
        if self.proc is not None and self.proc.poll() is None and not self.paused:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
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


def transformers_serve_model_dir(work_dir: Path) -> Path:
    """The converted SmolLM2 directory as ``transformers serve`` needs it.

    Our GGUF conversion writes a config.json without ``architectures``, which ``transformers serve`` requires to
    pick the model class. Rather than touch the shared cache, link its files into ``work_dir`` and add the field.
    """
    from hpr.model import resolve_model_source

    _, source = resolve_model_source("smollm2-135m-instruct")
    src = Path(source)
    target = work_dir / "smollm2-135m-instruct"
    target.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        link = target / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item)
    config = json.loads((src / "config.json").read_text())
    config.setdefault("architectures", ["LlamaForCausalLM"])
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def bench_adapter(work_dir: Path, explicit: str | None = None) -> tuple[Path, str]:
    """``(adapter directory, description)``: ``explicit``, else the trained TruthfulQA checkpoint, else random.

    The random adapter has the real shape (h = 576, all 30 layers trained, 5 selected by a random "accuracy"):
    the serving cost depends on shapes and on how many tokens the probe flags, not on what was learned.
    """
    if explicit:
        return Path(explicit), f"given: {explicit}"
    if (TRAINED_CHECKPOINT / "hpr_config.json").is_file():
        return TRAINED_CHECKPOINT, f"trained: {TRAINED_CHECKPOINT.relative_to(REPO)}"
    import torch

    from hpr.checkpoint import HPRAdapter, HPRConfig
    from hpr.model import load_model

    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    h, n = loaded.hidden_size, loaded.num_layers
    gen = torch.Generator().manual_seed(0)
    accuracy = {layer: 0.5 + 0.4 * float(torch.rand((), generator=gen)) for layer in range(n)}
    top5 = sorted(sorted(accuracy, key=lambda layer: -accuracy[layer])[:5])
    config = HPRConfig(
        base_model=loaded.model_id,
        hidden_size=h,
        num_layers=n,
        layers=list(range(n)),
        selected_layers=top5,
        probe_accuracy=accuracy,
        training={"note": "random weights for benchmarks (bench/server_process.py)"},
    )
    adapter = HPRAdapter(config, name="bench-random")
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0.0, 0.05, generator=gen)  # probe flags about half the tokens, angles near π/2
    path = adapter.save(work_dir / "random-adapter")
    return path, f"random weights (no trained checkpoint at {TRAINED_CHECKPOINT.relative_to(REPO)})"
