"""The one server launcher (trainer/server_process.py) and LocalServer on it, with a stand-in server: a few lines of
``http.server`` that answer ``GET /health`` and print what they were started with."""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import httpx
import pytest

import trainer.gen_client as gen_client
from trainer.gen_client import LocalServer
from trainer.server_process import ServerProcess, ServerStartError

# Serves /health on the port after --port (or the last argument); prints its cwd and thread settings first.
STAND_IN = """
import http.server, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1] if "--port" in sys.argv else sys.argv[-1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
print("cwd", os.getcwd(), "omp", os.environ.get("OMP_NUM_THREADS"), "mark", os.environ.get("MARK"), flush=True)
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def _becomes_stopped(server: ServerProcess, stopped: bool, timeout: float = 10.0) -> bool:
    """Whether /proc comes to show the process stopped by a signal (state T), or running again, as ``stopped``
    says, within ``timeout`` seconds (signals are delivered asynchronously)."""
    assert server.proc is not None
    stat_file = Path(f"/proc/{server.proc.pid}/stat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (stat_file.read_text().rsplit(")", 1)[1].split()[0] == "T") == stopped:
            return True
        time.sleep(0.05)
    return False


def test_server_is_healthy_inside_the_block_and_stopped_after(tmp_path: Path) -> None:
    command = [sys.executable, "-c", STAND_IN, "{port}"]
    with ServerProcess("stand-in", command, tmp_path / "logs", "m", threads=2, env={"MARK": "x"}, cwd=tmp_path) as s:
        assert httpx.get(s.root_url + "/health").status_code == 200
        assert s.base_url == f"http://127.0.0.1:{s.port}/v1"
        assert s.cpu_seconds() >= 0.0
    assert s.proc is not None and s.proc.poll() is not None
    log = s.log_file.read_text()
    assert log.startswith(f"$ {sys.executable} -c {STAND_IN} {s.port}\n")  # the command, {port} filled in
    assert f"cwd {tmp_path} omp 2 mark x\n" in log


def test_pause_stops_the_process_group_and_stop_resumes_it_first(tmp_path: Path) -> None:
    server = ServerProcess("stand-in", [sys.executable, "-c", STAND_IN, "{port}"], tmp_path, "m")
    server.start()
    try:
        server.wait_healthy(30)
        server.pause()
        assert server.paused and _becomes_stopped(server, True)
        server.resume()
        assert not server.paused and _becomes_stopped(server, False)
        server.pause()
    finally:
        server.stop(timeout=10)
    assert server.proc is not None and server.proc.returncode is not None and not server.paused


def test_a_server_that_exits_during_startup_is_reported_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"]
    with (
        pytest.raises(ServerStartError, match=r"(?s)broken exited during startup; its log .*no model here"),
        ServerProcess("broken", command, tmp_path, "m"),
    ):
        pass


def test_a_server_that_never_answers_is_stopped_after_the_timeout(tmp_path: Path) -> None:
    server = ServerProcess("mute", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, "m")
    server.startup_timeout = 1.0
    with pytest.raises(ServerStartError, match="mute not healthy after 1 s"), server:
        pass
    assert server.proc is not None and server.proc.poll() is not None


@pytest.fixture
def stand_in_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in as the ``hpr-serve`` command LocalServer runs."""
    script = tmp_path / "hpr-serve"
    script.write_text(f"#!{sys.executable}\n{STAND_IN}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(gen_client, "_serve_command", lambda: str(script))
    return script


def test_local_server_passes_its_flags_and_drops_its_log_after_a_clean_run(stand_in_serve: Path) -> None:
    with LocalServer("tiny", {"a": Path("/adapters/a")}, threads=3, extra_args=["--max-queue", "8"]) as server:
        assert httpx.get(server.root_url + "/health").status_code == 200
        dollar, program, *flags = server.log_file.read_text().splitlines()[0].split()
    assert (dollar, program) == ("$", str(stand_in_serve))
    expected = f"--model tiny --host 127.0.0.1 --port {server.port} --device auto --dtype auto --max-batch-size 32"
    assert flags == [*expected.split(), "--log-level", "warning", "--adapter", "a=/adapters/a", "--num-threads", "3",
                     "--max-queue", "8"]  # fmt: skip
    assert not server.log_dir.exists()


@pytest.mark.usefixtures("stand_in_serve")
def test_local_server_keeps_its_log_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError, match="in the block"), LocalServer("tiny", {}) as server:
        raise RuntimeError("in the block")
    assert server.proc is not None and server.proc.poll() is not None
    assert server.log_file.is_file()
    server.log_file.unlink()
    server.log_dir.rmdir()
