"""Settings from flags and ``HPR_*`` env vars, and the ``hpr-serve`` console script end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.cli import build_parser, main, parse_settings
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
HPR_SERVE = Path(sys.executable).parent / "hpr-serve"


def test_every_setting_is_a_flag() -> None:
    help_text = build_parser().format_help()
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in help_text


def test_flags_parse_into_settings(tmp_path: Path) -> None:
    settings = parse_settings(
        ["--model", "m", "--adapter", "a=/x/a", "--adapter", str(tmp_path / "b"), "--port", "9001",
         "--max-batch-size", "4", "--max-model-len", "512", "--api-key", "k1", "--api-key", "k2",
         "--cors-origin", "*", "--log-level", "DEBUG", "--num-threads", "1"]
    )  # fmt: skip
    assert settings.model == "m" and settings.port == 9001 and settings.max_batch_size == 4
    assert settings.max_model_len == 512 and settings.log_level == "debug" and settings.num_threads == 1
    assert settings.adapter_paths() == {"a": Path("/x/a"), "b": tmp_path / "b"}
    assert settings.api_keys() == {"k1", "k2"} and settings.cors_origin == ["*"]
    assert parse_settings([]).max_step_tokens == 0 and parse_settings(["--max-step-tokens", "40"]).max_step_tokens == 40


def test_env_vars_with_flags_winning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPR_MAX_QUEUE", "7")
    monkeypatch.setenv("HPR_PORT", "1234")
    monkeypatch.setenv("HPR_ADAPTER", "a=/p/a,b=/p/b")
    monkeypatch.setenv("HPR_API_KEY", '["k1", "k2"]')
    settings = parse_settings(["--port", "4321"])
    assert settings.max_queue == 7 and settings.port == 4321
    assert list(settings.adapter_paths()) == ["a", "b"] and settings.api_keys() == {"k1", "k2"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-batch-size", "many"], "--max-batch-size"),
        (["--adapter", "a=/x", "--adapter", "a=/y"], "used twice"),
        (["--adapter", "=/x"], "NAME=PATH"),
        (["--log-level", "loud"], "--log-level"),
        (["--compile-max-graphs", "0"], "--compile-max-graphs"),
        (["--max-step-tokens", "-1"], "--max-step-tokens"),
        (["--max-step-tokens", "lots"], "--max-step-tokens"),
        (["--max-step-tokens", "32"], "--max-step-tokens 32 must exceed --max-batch-size 32"),
    ],
)
def test_bad_flags_exit_2_naming_the_problem(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPR_") or k == "HPR_CACHE_DIR"}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.skipif(not HPR_SERVE.exists(), reason="hpr-serve console script not installed")
def test_hpr_serve_serves_the_sdk_and_stops_on_sigterm(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    port = _free_port()
    cmd = [str(HPR_SERVE), "--model", str(tiny_model_dir), "--adapter", f"tiny={tiny_adapter_dir}",
           "--port", str(port), "--api-key", "sk-test", "--dtype", "float32", "--log-level", "warning",
           "--num-threads", "1"]  # fmt: skip
    process = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "hpr-serve did not become ready"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
        response = client.completions.create(
            model="tiny", prompt="ab", max_tokens=3, temperature=0, extra_body={"hpr": {"layers": "all"}}
        )
        assert response.usage is not None and response.usage.completion_tokens >= 1
        assert response.model_extra is not None and response.model_extra["hpr"]["layers"] == [0, 1, 2, 3]
        # SIGTERM mid-stream: the running stream is drained to its end, then the process exits
        body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True, "stream": True}
        headers = {"Authorization": "Bearer sk-test"}
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=headers, timeout=120) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in rest[-2]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown


@pytest.mark.skipif(not HPR_SERVE.exists(), reason="hpr-serve console script not installed")
def test_hpr_serve_exits_1_when_an_adapter_cannot_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    cmd = [str(HPR_SERVE), "--model", str(tiny_model_dir), "--adapter", f"x={tmp_path / 'nothing'}",
           "--port", str(_free_port()), "--log-level", "warning"]  # fmt: skip
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    assert "nothing" in result.stderr and "adapter directory does not exist" in result.stderr


def test_engine_settings_reach_the_engine(tiny_model_dir: Path) -> None:
    from hpr.registry import AdapterRegistry
    from server.engine.engine import Engine
    from server.runtime import default_engine_factory

    def engine(*argv: str) -> Engine:
        made = default_engine_factory(parse_settings(["--model", str(tiny_model_dir), *argv]), AdapterRegistry())
        assert isinstance(made, Engine)
        return made

    plain = engine()
    assert (plain.prefill_chunk, plain.mixed_prefill, plain.max_step_tokens) == (256, True, None)
    assert plain.runner.compiled is None
    tuned = engine("--prefill-chunk", "0", "--no-mixed-prefill", "--max-step-tokens", "40", "--max-batch-size", "8")
    assert (tuned.prefill_chunk, tuned.mixed_prefill, tuned.max_step_tokens) == (None, False, 40)
    compiled = engine("--compile-decode", "--compile-max-graphs", "2", "--compile-autotune")
    assert compiled.runner.compiled is not None
    assert (compiled.runner.compiled.max_graphs, compiled.runner.compiled.mode) == (2, "max-autotune-no-cudagraphs")
    assert engine("--compile-decode").runner.compiled.mode is None  # type: ignore[union-attr]


@pytest.mark.parametrize("tuning", [True, False])
def test_malloc_tuning_comes_first_before_the_app_and_its_threads(
    tuning: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """glibc's arena cap binds only threads that have no arena yet (server.allocator): hpr-serve sets it before
    it builds anything. Here the app fails to build (a ValueError), after which nothing else runs."""
    import server.allocator
    import server.app

    calls: list[str] = []
    monkeypatch.setattr(server.allocator, "keep_freed_memory", lambda: calls.append("malloc") or "set")

    def failing_app(_settings: object) -> None:
        calls.append("app")
        raise ValueError("no app here")

    monkeypatch.setattr(server.app, "create_app", failing_app)
    argv = [] if tuning else ["--no-malloc-tuning"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "no app here" in capsys.readouterr().err
    assert calls == (["malloc", "app"] if tuning else ["app"])
