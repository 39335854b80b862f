"""The startup log says where the model runs and in what dtype: what a user (and docker/smoke.sh) reads."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from server.runtime import build_runtime, default_engine_factory


def test_the_loaded_line_names_dtype_device_and_backend(tiny_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.runtime")
    runtime = build_runtime(tiny_settings, default_engine_factory)
    try:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
        assert len(lines) == 1
        assert "(4 layers, hidden 64, context 256; torch.float32 on cpu, backend hf)" in lines[0]
        assert "1 adapter(s) ['tiny']" in lines[0]
    finally:
        asyncio.run(runtime.engine.stop(drain_timeout=0))
