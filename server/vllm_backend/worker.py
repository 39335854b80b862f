"""The edit inside vLLM's worker process: the adapters it holds, the step's plan, the edit op and the RPCs.

Each decoder layer of an instrumented model (:mod:`server.vllm_backend.plugin`) ends with
``torch.ops.hpr.edit_residual_(hidden, residual, layer)``. vLLM's layers return the residual stream unsummed, as
``(hidden, residual)``; the HF "layer output" that HPR edits is their sum. Where the step edits a token at that
layer, the op writes the edited sum into ``hidden`` and zeros into ``residual``, so the next layer's fused
add + norm sees exactly the edited vector; where it edits none, the op touches nothing, and an unedited request is
bit-identical to plain vLLM. The op is opaque to torch.compile: its body runs in Python at every call, reads the
plan built for the step (:func:`begin_step`), and calls the adapter's :class:`~hpr.edit_module.EditModule` — the
same math as the hf backend, never a copy.

:class:`HPRWorkerExtension` is vLLM's worker extension (``worker_extension_cls``): the frontend reaches it through
``collective_rpc`` to bind the model runner, to load and drop adapters, and to collect a request's statistics.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from hpr.checkpoint import HPRAdapter, HPRConfig, load_state
from server.vllm_backend.token_plan import RequestEdit, TokenPlan, build_token_plan

log = logging.getLogger(__name__)

MAX_KEPT_STATS = 4096  # statistics of finished requests not yet collected: the oldest are dropped past this


class WorkerEditState:
    """Everything the edit op reads, one per worker process."""

    def __init__(self) -> None:
        self.runner: Any = None  # vLLM's model runner, bound by HPRWorkerExtension.hpr_bind
        self.num_layers = 0
        self.adapters: dict[str, HPRAdapter] = {}  # worker key → adapter (float32, on the model's device)
        self.plan: TokenPlan | None = None
        self.stats: OrderedDict[str, Tensor] = OrderedDict()  # request id → (num_layers, 3) sums
        self._edits: dict[str, RequestEdit | None] = {}  # vLLM request id → its parsed edit, for running requests

    # ---- per step ---------------------------------------------------------------------------------------------
    def begin_step(self, positions: Tensor) -> None:
        """Build the plan of the forward about to run (called by the instrumented model's outer forward)."""
        self.flush()
        runner = self.runner
        if runner is None or not self.adapters:
            self.plan = None
            return
        batch = runner.input_batch
        num_reqs = int(batch.num_reqs)
        if num_reqs == 0:
            self.plan = None
            return
        vllm_ids = list(batch.req_ids[:num_reqs])
        edits: list[RequestEdit | None] = []
        prompts: list[int] = []
        known, self._edits = self._edits, {}
        for vid in vllm_ids:
            state = runner.requests.get(vid)
            if vid not in known:
                params = getattr(state, "sampling_params", None)
                known[vid] = RequestEdit.from_extra_args(params.extra_args if params is not None else None)
            self._edits[vid] = known[vid]
            edits.append(known[vid])
            prompts.append(int(getattr(state, "num_prompt_tokens", 0) or 0))
        request_ids = [e.request_id if e is not None else vid for e, vid in zip(edits, vllm_ids, strict=True)]
        if all(e is None for e in edits):
            self.plan = None
            return
        counts = runner.num_scheduled_tokens.np[:num_reqs].tolist()
        total = int(sum(counts))
        if total > positions.shape[0]:  # not this batch's forward (a dummy or padding run): nothing to edit
            self.plan = None
            return
        host_positions = positions[:total].cpu() if positions.device.type != "cpu" else positions[:total]
        self.plan = build_token_plan(
            edits, request_ids, prompts, counts, host_positions, self.num_layers, positions.device
        )

    def apply(self, hidden: Tensor, residual: Tensor | None, layer: int) -> None:
        """The edit op's body: edit this layer's tokens of the step's plan in place (see the module docstring)."""
        plan = self.plan
        if plan is None:
            return
        groups = plan.groups.get(layer)
        if not groups:
            return
        n = plan.num_tokens
        x = hidden[:n] + residual[:n] if residual is not None else hidden[:n].clone()  # (n, h): the residual stream
        for group in groups:
            module = self.adapters[group.adapter].edit_module(layer)
            if group.every_token:  # the whole step: no gather, no scatter
                result = module.edit(x, group.alpha)  # (n, h)
                x = result.output
            else:
                result = module.edit(x.index_select(0, group.tokens), group.alpha)  # (k, h)
                x.index_copy_(0, group.tokens, result.output)
            if group.rows is not None and plan.sums is not None:
                seen = torch.ones_like(group.alpha)
                update = torch.stack([seen, result.changed.float(), result.amount.float()], dim=-1)  # (k, 3)
                plan.sums[:, layer].index_add_(0, group.rows, update)
        hidden[:n].copy_(x)
        if residual is not None:
            residual[:n].zero_()

    def flush(self) -> None:
        """Move the last plan's statistics into the per-request sums."""
        plan = self.plan
        if plan is None or plan.sums is None:
            return
        for row, rid in enumerate(plan.stat_ids):
            current = self.stats.get(rid)
            self.stats[rid] = plan.sums[row].cpu().clone() if current is None else current + plan.sums[row].cpu()
            self.stats.move_to_end(rid)
        plan.sums = None
        while len(self.stats) > MAX_KEPT_STATS:
            self.stats.popitem(last=False)


STATE = WorkerEditState()


@torch.library.custom_op("hpr::edit_residual_", mutates_args=("hidden", "residual"))
def edit_residual_(hidden: Tensor, residual: Tensor, layer: int) -> None:
    """Edit the residual stream ``hidden + residual`` (num_tokens, h) of decoder layer ``layer`` in place."""
    STATE.apply(hidden, residual, layer)


@edit_residual_.register_fake
def _edit_residual_fake(hidden: Tensor, residual: Tensor, layer: int) -> None:
    return None


@torch.library.custom_op("hpr::edit_hidden_", mutates_args=("hidden",))
def edit_hidden_(hidden: Tensor, layer: int) -> None:
    """For layers that return the residual stream itself (num_tokens, h)."""
    STATE.apply(hidden, None, layer)


@edit_hidden_.register_fake
def _edit_hidden_fake(hidden: Tensor, layer: int) -> None:
    return None


class HPRWorkerExtension:
    """vLLM worker extension (``worker_extension_cls``): the RPCs of the vllm backend. ``self`` is vLLM's worker."""

    model_runner: Any

    def hpr_bind(self, num_layers: int) -> bool:
        """Let the edit op read this worker's model runner (which requests run, and where their tokens are)."""
        STATE.runner = self.model_runner
        STATE.num_layers = num_layers
        model = self.model_runner.get_model()
        return bool(getattr(model, "hpr_instrumented", False))

    def hpr_load_adapter(self, key: str, config_json: str, tensors: bytes) -> None:
        """Hold an adapter under ``key`` (its config and ``state_tensors()`` as safetensors bytes)."""
        config = HPRConfig.from_dict(json.loads(config_json))
        adapter = HPRAdapter(config, name=key)
        state = {k.removeprefix("layers."): v for k, v in load_safetensors(tensors).items()}
        load_state(adapter, state, Path(f"<adapter {key}>"))
        device = self.model_runner.device
        STATE.adapters[key] = adapter.to(device=device, dtype=torch.float32).eval().requires_grad_(False)

    def hpr_drop_adapter(self, key: str) -> None:
        STATE.adapters.pop(key, None)

    def hpr_take_stats(self, request_id: str) -> list[list[float]] | None:
        """A finished request's statistics (num_layers × (tokens, changed, amount)), forgotten once taken."""
        STATE.flush()
        sums = STATE.stats.pop(request_id, None)
        return None if sums is None else sums.tolist()
