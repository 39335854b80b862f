"""CUDA-only fixtures: SmolLM2 in bf16 on the GPU and an adapter for it (the trained checkpoint when present).

Every test module here sets ``pytestmark = REQUIRES_CUDA``: marked ``gpu`` and skipped without CUDA, so on a
CPU-only machine the whole directory is collected and skipped (nothing loads).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.model import LoadedModel, load_model

REQUIRES_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TRAINED = Path(__file__).resolve().parents[2] / "runs" / "truthfulqa" / "checkpoint"
ADAPTER = "truthfulqa"


@pytest.fixture(scope="session")
def cuda_bf16() -> LoadedModel:
    return load_model(device="cuda", dtype="bfloat16")


def smollm2_adapter(loaded: LoadedModel) -> HPRAdapter:
    """``runs/truthfulqa/checkpoint`` if it exists, else random weights of SmolLM2's shape (selected 16, 17, 19)."""
    if (TRAINED / "hpr_config.json").is_file():
        return HPRAdapter.load(TRAINED, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
    torch.manual_seed(0)
    layers = list(range(loaded.num_layers))
    config = HPRConfig(
        base_model=loaded.model_id,
        hidden_size=loaded.hidden_size,
        num_layers=loaded.num_layers,
        layers=layers,
        selected_layers=[16, 17, 19],
        default_alpha=2.0,
    )
    adapter = HPRAdapter(config, name=ADAPTER)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.05)
    return adapter.eval()


def chat_ids(loaded: LoadedModel, text: str) -> list[int]:
    enc = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(enc["input_ids"])
