#!/usr/bin/env bash
# One command for a CUDA host (≤ 10 min): the `gpu`-marked tests (the edit's CUDA path in bf16 with fp32 math and
# no host sync, the engine on CUDA, a 32-stream throughput figure), then a short server benchmark (hpr-serve: no
# edit / top-5 / all layers, 32 streams × 32 tokens, 2 ABBA rounds), the vllm backend against the hf backend
# (bench/vllm_exactness.py, 32 prompts), then one summary.
#
#   bash bench/gpu_check.sh            # from the repository root, after `make setup-dev` with a CUDA torch build
#
# Environment: PY (default .venv/bin/python), OUT (default a new /tmp/hpr-gpu-check.* directory: logs, JSON).
# Exit status: 0 all passed, 1 something failed, 3 no CUDA here (nothing was run).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d /tmp/hpr-gpu-check.XXXXXX)}
mkdir -p "$OUT"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; then
    echo "gpu_check: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); nothing run"
    exit 3
fi
started=$(date +%s)

echo "gpu_check: tests (log: $OUT/pytest.log) ..."
HPR_GPU_REPORT="$OUT/throughput.json" timeout 420 "$PY" -m pytest -m gpu tests/gpu -v -s -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" >"$OUT/pytest.log" 2>&1
tests_rc=$?

echo "gpu_check: server benchmark (log: $OUT/servers.log) ..."
timeout 240 "$PY" bench/compare_servers.py --scenarios edits --rounds 2 --max-tokens 32 --time-limit 60 \
    --json "$OUT/servers.json" >"$OUT/servers.log" 2>&1
bench_rc=$?

# The vllm backend on the GPU (piecewise CUDA graphs, the edit ops between them): its texts against the hf
# backend's, per edit configuration. bf16 on both: equality is not expected to be 100 % as on the CPU in fp32.
echo "gpu_check: vllm backend vs hf backend (log: $OUT/vllm.log) ..."
timeout 420 "$PY" bench/vllm_exactness.py --device auto --prompts 32 --max-tokens 24 \
    --json "$OUT/vllm.json" >"$OUT/vllm.log" 2>&1
vllm_rc=$?
echo "vllm backend (exit $vllm_rc):"; grep -A8 '^configuration' "$OUT/vllm.log" || tail -5 "$OUT/vllm.log"

"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$started" <<'EOF'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, tests_rc, bench_rc, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"\n=== gpu_check summary ({torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"{time.time() - started:.0f} s) ===")
xml = out / "gpu-tests.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    print(f"tests: {counts['tests']} run, {counts['failures']} failed, {counts['errors']} errors, "
          f"{counts['skipped']} skipped (exit {tests_rc}{', timed out' if tests_rc == 124 else ''})")
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            print(f"  FAILED {case.get('name')}: {(bad.get('message') or '').splitlines()[0][:160]}")
else:
    print(f"tests: no report (exit {tests_rc}); see {out / 'pytest.log'}")
report = out / "throughput.json"
if report.is_file():
    r = json.loads(report.read_text())
    rows = ", ".join(f"{name} {max(v):.0f} tok/s (runs {', '.join(f'{x:.0f}' for x in v)})"
                     for name, v in r["tok_s"].items())
    print(f"engine, {r['streams']} streams × {r['tokens']} tokens: {rows}; edit / no edit {r['edit_over_no_edit']:.3f}")
servers = out / "servers.json"
if servers.is_file():
    for sc in json.loads(servers.read_text())["scenarios"]:
        print(f"server: {sc['title']}")
        for row in sc["rows"]:
            print(f"  {row['label']:<32} {row['tok_s']:8.1f} tok/s  {row['tok_per_cpu_s']:8.1f} tok/CPU-s  "
                  f"TTFT p50 {row['ttft_ms_p50']:.0f} ms  ITL p50 {row['itl_ms_p50']:.1f} ms  failed {row['failed']}")
        for t in sc["targets"]:
            print(f"  target {t['target']}: tok/s ratio {t['ratio']:.3f}, tok/CPU-s ratio {t['cpu_ratio']:.3f} "
                  f"(judged on {t['metric']}: {'met' if t['met'] else 'NOT met'}; on a GPU, tok/s is the one to read)")
else:
    print(f"server benchmark: no results (exit {bench_rc}); see {out / 'servers.log'}")
print(f"logs and JSON: {out}")
EOF
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ] || [ "$vllm_rc" -ne 0 ]; then exit 1; fi
