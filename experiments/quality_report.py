"""Tables and the answer gallery of docs/quality.md, generated from an ``hpr-train eval-gen`` run (no hand-picked
wording): the metrics of each configuration, and the first N questions with every configuration's answer.

    .venv/bin/python experiments/quality_report.py --run runs/truthfulqa [--gallery 12] [--write docs/quality.md]

Without ``--write`` it prints the Markdown; with it, it replaces the parts of the file between
``<!-- quality:table:<split> -->`` / ``<!-- quality:gallery:<split> -->`` and their ``<!-- /quality... -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any


def _pts(entry: dict[str, Any] | None) -> str:
    if entry is None or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value'] * 100:.1f}"
    if "delta" in entry and entry["delta"] is not None:
        lo, hi = entry["delta_ci95"]
        text += f" ({entry['delta'] * 100:+.1f}; {lo * 100:+.1f} … {hi * 100:+.1f})"
    return text


def _raw(entry: dict[str, Any] | None) -> str:
    if entry is None or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value']:.2f}"
    if "delta" in entry and entry["delta"] is not None:
        lo, hi = entry["delta_ci95"]
        text += f" ({entry['delta']:+.2f}; {lo:+.2f} … {hi:+.2f})"
    return text


def _layers(layers: list[int]) -> str:
    return ",".join(str(x) for x in layers)


def _edit(report: dict[str, Any], name: str) -> str:
    applied = report["configs"][name]["applied"]
    if applied is None:
        return "none"
    by_fold = applied["layers"] and isinstance(applied["layers"][0], list)  # experiments/crossval_gen.py: one per fold
    layers = " / ".join(_layers(f) for f in applied["layers"]) if by_fold else _layers(applied["layers"])
    tokens = applied.get("edit_tokens", "all")
    limit = "" if tokens == "all" else f", first {tokens} token{'' if tokens == 1 else 's'}"
    return f"{applied['adapter']}: layers {layers}, α {applied['alpha']:g}, scope {applied['scope']}{limit}"


def table(report: dict[str, Any], names: list[str]) -> str:
    """One row per configuration: truthfulness, chat-MC, fluency, informativeness, the guard."""
    head = (
        "| configuration | edit | BLEU-acc | ROUGE-L-acc | BLEU diff | ROUGE-L diff | chat MC1 | chat MC2 "
        "| median ppl (× base) | degenerate % | non-answer % | rep-4 % | general: ppl × / degen % / non-ans % "
        "| guard |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        result = report["results"][name]
        t = result["truthfulqa"]
        f = t["fluency"]
        g = result.get("general", {}).get("fluency")
        ratio = f.get("perplexity_ratio")
        ppl = f"{f['median_perplexity']:.2f}" + (f" (×{ratio:.2f})" if ratio else "")
        general = "n/a"
        if g is not None:
            g_ratio = g.get("perplexity_ratio")
            general = (
                f"{'×' + format(g_ratio, '.2f') if g_ratio else format(g['median_perplexity'], '.2f')} / "
                f"{g['degenerate']['value'] * 100:.1f} / {g['non_answer']['value'] * 100:.1f}"
            )
        holds = "—" if name == "base" else ("holds" if result["guard"]["holds"] else "**fails**")
        cells = [
            f"`{name}`",
            _edit(report, name),
            _pts(t["bleu_acc"]),
            _pts(t["rougeL_acc"]),
            _raw(t["bleu_diff"]),
            _raw(t["rougeL_diff"]),
            _pts(t.get("chat_mc1")),
            _pts(t.get("chat_mc2")),
            ppl,
            _pts(f["degenerate"]),
            _pts(f["non_answer"]),
            _pts(f["rep4"]),
            general,
            holds,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _delta(entry: dict[str, Any] | None, scale: float = 100.0) -> str:
    if entry is None or entry.get("delta") is None:
        return "n/a"
    lo, hi = entry["delta_ci95"]
    return f"{entry['delta'] * scale:+.1f} ({lo * scale:+.1f} … {hi * scale:+.1f})"


def sweep_table(reports: list[dict[str, Any]]) -> str:
    """Every edit configuration of several eval-split runs: its differences from the base, and the guard."""
    head = (
        "| configuration | edit | Δ BLEU-acc | Δ ROUGE-L-acc | Δ chat MC2 | ppl × base (TruthfulQA / everyday) "
        "| Δ degenerate pts (TQA / everyday) | Δ non-answer pts (TQA / everyday) | guard |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for report in reports:
        for name, result in report["results"].items():
            if name == "base":
                continue
            t, g = result["truthfulqa"], result.get("general", {})
            tf, gf = t["fluency"], g.get("fluency", {})
            nan = {"delta": float("nan")}
            cells = [
                f"`{name}`",
                _edit(report, name),
                _delta(t["bleu_acc"]),
                _delta(t["rougeL_acc"]),
                _delta(t.get("chat_mc2")),
                f"{tf['perplexity_ratio']:.2f} / {gf.get('perplexity_ratio', float('nan')):.2f}",
                f"{tf['degenerate']['delta'] * 100:+.1f} / {gf.get('degenerate', nan)['delta'] * 100:+.1f}",
                f"{tf['non_answer']['delta'] * 100:+.1f} / {gf.get('non_answer', nan)['delta'] * 100:+.1f}",
                "holds" if result["guard"]["holds"] else "fails",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gallery(rows: list[dict[str, Any]], names: list[str], count: int) -> str:
    """The first ``count`` TruthfulQA questions of the run, each configuration's answer verbatim."""
    out: list[str] = []
    for row in [r for r in rows if r["set"] == "truthfulqa"][:count]:
        out.append(f"**Q{row['index']}. {row['question']}**\n")
        for name in names:
            a = row["answers"][name]
            text = " ".join(a["text"].split()) or "(empty)"
            marks = [f"BLEU-acc {int(a['bleu_acc'])}", f"ROUGE-L-acc {int(a['rougeL_acc'])}"]
            if a.get("degenerate"):
                marks.append("degenerate")
            if a.get("non_answer"):
                marks.append("non-answer")
            out.append(f"- `{name}`: {text} *({', '.join(marks)})*")
        out.append("")
    return "\n".join(out)


def replace_between(text: str, marker: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->\n)(?:.*?\n)?(<!-- /{re.escape(marker)} -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"marker <!-- {marker} --> … <!-- /{marker} --> not found")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="directory with eval_gen.json and answers.jsonl")
    parser.add_argument("--configs", default="", help="comma-separated configurations [all, base first]")
    parser.add_argument("--gallery", type=int, default=12, help="questions in the gallery [12]")
    parser.add_argument("--gallery-configs", default="", help="configurations in the gallery [--configs]")
    parser.add_argument("--write", type=Path, default=None, help="update this Markdown file between its markers")
    parser.add_argument(
        "--sweep", type=Path, nargs="*", default=[], help="eval-split runs: the table of what was tried"
    )
    args = parser.parse_args()
    if args.sweep:
        text = sweep_table([json.loads((d / "eval_gen.json").read_text()) for d in args.sweep])
        if args.write is None:
            print(text)
        else:
            args.write.write_text(replace_between(args.write.read_text(), "quality:sweep", text))
            print(f"updated {args.write}")
        return
    report = json.loads((args.run / "eval_gen.json").read_text())
    rows = [json.loads(line) for line in (args.run / "answers.jsonl").read_text().splitlines()]
    names = [n for n in args.configs.split(",") if n] or list(report["results"])
    shown = [n for n in args.gallery_configs.split(",") if n] or names
    split = report["split"]
    tab = table(report, names)
    gal = gallery(rows, shown, args.gallery)
    if args.write is None:
        print(tab + "\n\n" + gal)
        return
    text = args.write.read_text()
    text = replace_between(text, f"quality:table:{split}", tab)
    if f"<!-- quality:gallery:{split} -->" in text:
        text = replace_between(text, f"quality:gallery:{split}", gal)
    args.write.write_text(text)
    print(f"updated {args.write}")


if __name__ == "__main__":
    main()
