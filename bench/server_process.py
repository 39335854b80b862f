"""Servers under benchmark as subprocesses on loopback, and the two inputs they share.

Used by ``bench/compare_servers.py`` and the other benchmarks that start servers. :class:`ServerProcess` is
:class:`trainer.server_process.ServerProcess` (start, wait for health, pause/resume with SIGSTOP/SIGCONT, stop;
127.0.0.1 on a free port, output to a log file so a failure to start can be shown), run from the repository root.
Also builds the model directory that ``transformers serve`` can load, and the HPR adapter (trained checkpoint, else
random weights of the right shape).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.server_process import ServerProcess as _ServerProcess
from trainer.server_process import ServerStartError, free_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TRAINED_CHECKPOINT = REPO / "runs" / "truthfulqa" / "checkpoint"

__all__ = [
    "REPO",
    "TRAINED_CHECKPOINT",
    "VENV_BIN",
    "ServerProcess",
    "ServerStartError",
    "bench_adapter",
    "free_port",
    "transformers_serve_model_dir",
]


@dataclass
class ServerProcess(_ServerProcess):
    """One server under benchmark: ``command`` is run with ``{port}`` substituted, from the repository root."""

    cwd: Path | None = REPO


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
