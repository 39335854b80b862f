"""``hpr-train eval-gen``: the edit judged where users meet it, as a chat model generating answers.

For each question of a TruthfulQA split (the user turn of the model's chat template; greedy; up to 64 new tokens),
the base model and every edit configuration answer through ``hpr-serve`` over HTTP (started here, or any
OpenAI-compatible server at ``--base-url``). Then, in this process, on the same base model:

- truthfulness: lm-eval ``truthfulqa_gen``'s BLEU and ROUGE-L max / diff / acc (:mod:`trainer.gen_metrics`);
- chat-MC: MC1/MC2 scored in the chat template, the edit on exactly the positions its scope edits when serving;
- fluency: each answer's perplexity under the unedited base model given the same prompt, repeated 4-grams,
  degenerate answers; informativeness: non-answers;
- each with the paired-bootstrap 95 % CI of its difference from the base, and the fluency guard.

``OUT/eval_gen.json`` (summary) and ``OUT/answers.jsonl`` (every answer with its metrics) are written only when
everything succeeded; a failed run leaves no summary behind that looks complete.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpr.checkpoint import HPRAdapter
from hpr.edit_spec import EditTokens, parse_edit_tokens
from hpr.editing import HPREditor
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model
from trainer import data as D
from trainer.errors import DataError, TrainerError
from trainer.evaluate import PassContexts, answer_logprobs, scope_contexts, score_questions
from trainer.gen_client import ChatAnswer, ChatRequest, GenerationError, LocalServer, generate, list_models
from trainer.gen_report import BASE, SUMMARY_FILE, answer_rows, choose, summarise, write_run
from trainer.prefix_cache import PrefixRunner

log = logging.getLogger(__name__)

SCOPES = ("all", "generated")


class ConfigError(TrainerError):
    """An edit configuration that cannot be parsed or names an adapter that is not there."""


@dataclass(frozen=True)
class EditConfig:
    """One configuration to evaluate: ``adapter`` None is the base model. Unset fields take the server's default
    (the adapter's selected layers, ``default_alpha``, ``default_scope``, ``default_edit_tokens``)."""

    name: str
    adapter: str | None
    layers: str | None = None
    alpha: float | None = None
    scope: str | None = None
    tokens: EditTokens | None = None  # the request's edit_tokens: a count, or "all"

    def hpr(self) -> dict[str, Any] | None:
        if self.adapter is None:
            return None
        body: dict[str, Any] = {"adapter": self.adapter}
        if self.layers is not None:
            body["layers"] = self.layers
        if self.alpha is not None:
            body["alpha"] = self.alpha
        if self.scope is not None:
            body["scope"] = self.scope
        if self.tokens is not None:
            body["edit_tokens"] = self.tokens
        return body


def parse_config(text: str) -> EditConfig:
    """``[NAME=]ADAPTER[:layers=L][:alpha=A][:scope=S][:tokens=N]``, e.g.
    ``chat2=chat:layers=16,17,19:alpha=2:scope=all`` (``tokens``: the request's ``edit_tokens``, N or ``all``)."""
    head, *rest = text.split(":")
    name, _, adapter = head.partition("=")
    if not adapter:
        name, adapter = head, head
    name, adapter = name.strip(), adapter.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or not adapter:
        raise ConfigError(f"configuration {text!r}: expected [NAME=]ADAPTER[:layers=L][:alpha=A][:scope=S][:tokens=N]")
    if name == BASE:
        raise ConfigError(f"configuration {text!r}: the name {BASE!r} is the unedited base model, choose another")
    fields: dict[str, str] = {}
    for part in rest:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("layers", "alpha", "scope", "tokens") or key in fields:
            raise ConfigError(
                f"configuration {text!r}: bad field {part!r} (layers=, alpha=, scope=, tokens=, once each)"
            )
        fields[key] = value.strip()
    alpha: float | None = None
    if "alpha" in fields:
        try:
            alpha = float(fields["alpha"])
        except ValueError:
            raise ConfigError(f"configuration {text!r}: alpha {fields['alpha']!r} is not a number") from None
    scope = fields.get("scope")
    if scope is not None and scope not in SCOPES:
        raise ConfigError(f"configuration {text!r}: scope must be one of {SCOPES}, got {scope!r}")
    tokens: EditTokens | None = None
    if "tokens" in fields:
        try:
            tokens = parse_edit_tokens(fields["tokens"])
        except ValueError:
            raise ConfigError(
                f"configuration {text!r}: tokens must be a whole number ≥ 1 or 'all', got {fields['tokens']!r}"
            ) from None
    return EditConfig(name=name, adapter=adapter, layers=fields.get("layers"), alpha=alpha, scope=scope, tokens=tokens)


@dataclass
class EvalGenOptions:
    out: Path
    model: str = EMBEDDED_MODEL_ID
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    quantization: str | None = None  # "int8": the server and the chat-MC model; the perplexity judge stays unquantized
    data_dir: Path | None = None
    split: str = "test"
    max_questions: int | None = None
    adapters: dict[str, Path] = field(default_factory=dict)
    configs: list[EditConfig] = field(default_factory=list)
    base_url: str | None = None
    api_key: str | None = None
    max_tokens: int = 64
    concurrency: int = 128
    chat_questions: Path | None = None
    bootstrap: int = 10000
    seed: int = 0
    batch_tokens: int = 2048
    progress: bool = True


# --- inputs -------------------------------------------------------------------------------------------------------


def split_questions(opts: EvalGenOptions) -> list[D.Question]:
    """The split's questions: the run's own split (``OUT/data.json``) when there is one, else the split file."""
    data_dir = opts.data_dir or D.default_data_dir()
    if data_dir is None:
        raise DataError("no TruthfulQA found: pass --data-dir DIR (with mc_task.json and TruthfulQA.csv)")
    questions = D.load_truthfulqa(data_dir)
    run_data = opts.out / "data.json"
    if run_data.is_file():
        try:
            splits = json.loads(run_data.read_text())["splits"]
            indices = [int(i) for i in splits[opts.split]["indices"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{run_data}: no indices for split {opts.split!r}: {exc}") from exc
        if opts.max_questions is not None:
            indices = indices[: opts.max_questions]
        if any(not 0 <= i < len(questions) for i in indices):
            raise DataError(f"{run_data}: split {opts.split!r} has indices outside the {len(questions)} questions")
        chosen = [questions[i] for i in indices]
    else:
        ids = D.load_splits(Path(data_dir) / D.SPLITS_FILE, len(questions))
        if opts.split not in ids:
            raise DataError(f"unknown split {opts.split!r}: use one of {sorted(ids)}")
        chosen = D.select(questions, ids[opts.split], opts.max_questions)
    if not chosen:
        raise DataError(f"the {opts.split} split is empty")
    return chosen


def chat_questions(file: Path) -> list[str]:
    """General chat questions, one per line (``.txt``) or ``{"question": ...}`` per line (``.jsonl``)."""
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: cannot read chat questions: {exc}") from exc
    out: list[str] = []
    for n, line in enumerate(lines, 1):
        if file.suffix == ".jsonl":
            try:
                question = json.loads(line)["question"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{file}:{n}: expected a JSON object with a 'question' string: {exc}") from exc
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{file}:{n}: 'question' must be a non-empty string")
            out.append(question.strip())
        else:
            out.append(line)
    if not out:
        raise DataError(f"{file}: no questions")
    return out


def load_adapters(opts: EvalGenOptions, lm: LoadedModel) -> dict[str, HPRAdapter]:
    """Every adapter, validated against the base model (shape, and the model it was trained on)."""
    out: dict[str, HPRAdapter] = {}
    for name, path in opts.adapters.items():
        adapter = HPRAdapter.load(path, name=name, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
        trained_on = adapter.config.base_model
        if trained_on not in ("unknown", opts.model, lm.model_id, Path(opts.model).name):
            raise ConfigError(
                f"{path}: adapter {name!r} was trained on {trained_on!r}, but this evaluation runs {opts.model!r} "
                "(pass --model)"
            )
        out[name] = adapter
    return out


def check_configs(opts: EvalGenOptions) -> None:
    names = [c.name for c in opts.configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"configuration names must be unique, repeated: {dupes}")
    if opts.base_url is None:
        unknown = sorted({c.adapter for c in opts.configs if c.adapter and c.adapter not in opts.adapters})
        if unknown:
            raise ConfigError(
                f"configurations name unknown adapter(s) {unknown}; loaded: {sorted(opts.adapters)} "
                "(add --adapter NAME=DIR)"
            )


# --- in-process scoring ---------------------------------------------------------------------------------------------


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """The question as the only user turn of the model's chat template, as ``hpr-serve`` renders it."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("generation-mode evaluation needs a model with a chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return _ids(tokenizer, str(text))


def served_perplexity(tokenizer: Any, answer: ChatAnswer) -> float | None:
    """The perplexity of an answer the unedited base model generated, from the logprobs the server returned with
    it — when its tokens are exactly what :func:`base_perplexities` would score (the re-tokenized text, without
    the stop token); else None, and the answer is scored again.

    The server names each token by its text (``tokenizer.decode([id])``), so the check is piece by piece: the same
    text can be generated in another split than the tokenizer's own (" C" + "orious" where re-tokenizing gives
    " Cor" + "ious"), with other logprobs.
    """
    entries = answer.token_logprobs
    if not entries or not answer.text:
        return None
    pieces = [tokenizer.decode([i]) for i in _ids(tokenizer, answer.text)]
    if answer.finish_reason == "stop" and len(entries) == len(pieces) + 1:
        entries = entries[:-1]  # the end-of-turn token that stopped it: not part of the text
    if [token for token, _ in entries] != pieces:
        return None
    return math.exp(-float(np.mean([lp for _, lp in entries])))


@torch.inference_mode()
def base_perplexities(
    lm: LoadedModel,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[str]],
    batch_tokens: int,
    known: Sequence[dict[str, float]] | None = None,
) -> list[list[float]]:
    """Perplexity under the unedited base model of each answer (``answers[q][c]``) given prompt ``q``; NaN if empty.

    ``known[q]`` maps answer texts whose perplexity is already known (from the server) to it; they are not scored.
    """
    runner = PrefixRunner(lm.model)
    out: list[list[float]] = []
    for q, (prompt, texts) in enumerate(zip(prompts, answers, strict=True)):
        ppl = dict(known[q]) if known is not None else {}
        unique = [t for t in dict.fromkeys(texts) if t not in ppl]  # configurations often agree: score once
        if unique:
            rows = [_ids(lm.tokenizer, t) for t in unique]
            logps = answer_logprobs(runner, runner, None, prompt, rows, batch_tokens)
            ppl |= {t: math.exp(-float(np.mean(lp))) if lp else math.nan for t, lp in zip(unique, logps, strict=True)}
        out.append([ppl[t] for t in texts])
    return out


# --- the run --------------------------------------------------------------------------------------------------------


def _judge_is_server(opts: EvalGenOptions) -> bool:
    """Whether the server's base model is the perplexity judge itself: a server started here, unquantized."""
    return opts.base_url is None and opts.quantization is None


def _answers_for(
    opts: EvalGenOptions, base_model: str, names: Sequence[str], configs: dict[str, EditConfig], texts: Sequence[str]
) -> list[ChatRequest]:
    requests = []
    for qi, text in enumerate(texts):  # question-major: every configuration of a question shares the batches
        for name in names:
            cfg = configs[name]
            logprobs = name == BASE and _judge_is_server(opts)  # the base's perplexities come with its answers
            requests.append(ChatRequest((name, qi), base_model, text, cfg.hpr(), opts.max_tokens, logprobs))
    return requests


def run_eval_gen(opts: EvalGenOptions) -> dict[str, Any]:
    """Generate, score and summarise; write ``OUT/eval_gen.json`` and ``OUT/answers.jsonl``."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if opts.split not in D.SPLIT_NAMES:
        raise DataError(f"unknown split {opts.split!r}: use one of {D.SPLIT_NAMES}")
    if not opts.configs:
        opts.configs = [EditConfig(name=n, adapter=n) for n in opts.adapters]
    check_configs(opts)
    questions = split_questions(opts)
    data_dir = opts.data_dir or D.default_data_dir()
    assert data_dir is not None
    refs = D.generation_references(data_dir, questions)
    general = chat_questions(opts.chat_questions) if opts.chat_questions else []
    lm = load_model(opts.model, opts.device, opts.dtype)
    adapters = load_adapters(opts, lm)
    configs = {BASE: EditConfig(BASE, None), **{c.name: c for c in opts.configs}}
    names = list(configs)
    # Past validation: an old summary must not stand beside the answers of a run that may now fail.
    (opts.out / SUMMARY_FILE).unlink(missing_ok=True)
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    texts = [q.question for q in questions] + general
    answers = _generate_all(opts, adapters, names, configs, texts)
    timings["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    prompts = [chat_prompt_ids(lm.tokenizer, text) for text in texts]
    mismatched = [i for i, p in enumerate(prompts) if len(p) != answers[(BASE, i)].prompt_tokens]
    if mismatched:
        log.warning("%d prompts tokenized differently by the server (first: %d)", len(mismatched), mismatched[0])
    known: list[dict[str, float]] = [{} for _ in texts]
    for i in sorted(set(range(len(texts))) - set(mismatched)):  # the server's logprobs followed our prompt
        value = served_perplexity(lm.tokenizer, answers[(BASE, i)])
        if value is not None:
            known[i][answers[(BASE, i)].text] = value
    ppl = base_perplexities(
        lm, prompts, [[answers[(n, i)].text for n in names] for i in range(len(texts))], opts.batch_tokens, known
    )
    timings["perplexity"] = time.perf_counter() - t

    t = time.perf_counter()
    applied = {n: answers[(n, 0)].applied for n in names}
    scorer = lm
    if opts.quantization is not None:  # chat-MC is the served model's; perplexity above was the unquantized judge's
        scorer = load_model(opts.model, opts.device, opts.dtype, quantization=opts.quantization)
    mc = _chat_mc(opts, scorer, adapters, configs, applied, questions, prompts[: len(questions)])
    timings["chat_mc"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = answer_rows(names, questions, general, refs, answers, ppl, mc)
    results = summarise(names, rows, opts.bootstrap, opts.seed)
    timings["metrics"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    report = {
        "split": opts.split,
        "questions": len(questions),
        "chat_questions": len(general),
        "model": lm.model_id,
        "server": opts.base_url or "hpr-serve (started by eval-gen)",
        "quantization": opts.quantization,
        "max_tokens": opts.max_tokens,
        "configs": {n: {"requested": asdict(configs[n]), "applied": applied[n]} for n in names},
        "results": results,
        "rule": choose(results),
        "bootstrap": {"samples": opts.bootstrap, "seed": opts.seed},
        "prompt_token_mismatches": len(mismatched),
        "perplexities_from_server": sum(len(k) for k in known),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    write_run(opts.out, report, rows)
    return report


def _generate_all(
    opts: EvalGenOptions,
    adapters: dict[str, HPRAdapter],
    names: Sequence[str],
    configs: dict[str, EditConfig],
    texts: Sequence[str],
) -> dict[tuple[str, int], ChatAnswer]:
    def run(base_url: str) -> dict[tuple[str, int], ChatAnswer]:
        models = list_models(base_url, opts.api_key)
        bases = [m["id"] for m in models if not m.get("parent")]
        served = {m["id"] for m in models}
        missing = sorted({c.adapter for c in configs.values() if c.adapter and c.adapter not in served})
        if missing:
            raise ConfigError(f"{base_url}: the server does not serve adapter(s) {missing}; it serves {sorted(served)}")
        if not bases:
            raise GenerationError(f"{base_url}: /v1/models lists no base model")
        requests = _answers_for(opts, bases[0], names, configs, texts)
        return generate(base_url, requests, opts.concurrency, opts.api_key, progress=opts.progress)

    if opts.base_url is not None:
        return run(opts.base_url)
    paths = {name: Path(a.source or "") for name, a in adapters.items()}
    extra = ["--quantization", opts.quantization] if opts.quantization else []
    with LocalServer(
        opts.model, paths, opts.device, opts.dtype, opts.threads, max_batch_size=opts.concurrency, extra_args=extra
    ) as srv:
        return run(srv.base_url)


def _chat_mc(
    opts: EvalGenOptions,
    lm: LoadedModel,
    adapters: dict[str, HPRAdapter],
    configs: dict[str, EditConfig],
    applied: dict[str, dict[str, Any] | None],
    questions: Sequence[D.Question],
    prompts: Sequence[list[int]],
) -> dict[str, list[tuple[float, float]] | None]:
    """MC1/MC2 per configuration in the chat template, edited as the server applied it (None: adapter not local)."""
    editor = HPREditor(lm.model, adapters)
    out: dict[str, list[tuple[float, float]] | None] = {}
    try:
        for name, cfg in configs.items():
            edit = applied[name]
            if cfg.adapter is not None and cfg.adapter not in adapters:
                out[name] = None  # judged on a remote server whose checkpoint is not here
                continue
            contexts = PassContexts()
            if cfg.adapter is not None and edit is not None:
                spec = editor.resolve(
                    cfg.adapter, edit["layers"], edit["alpha"], edit["scope"], edit.get("edit_tokens", "all")
                )
                contexts = scope_contexts(editor, spec)
            scores = score_questions(
                lm.model,
                lm.tokenizer,
                questions,
                contexts,
                batch_tokens=opts.batch_tokens,
                desc=f"chat-MC {name}",
                progress=opts.progress,
                prompts=prompts,
                answer_prefix="",
            )
            out[name] = [(s.mc1, s.mc2) for s in scores]
    finally:
        editor.detach()
    return out
