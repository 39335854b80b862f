#!/usr/bin/env bash
# End-to-end check of the image: build it, start it with an adapter mounted, wait until healthy, send a chat
# completion, a streamed one and one with per-request `hpr` layers through curl, check the answers, remove the
# container. Exits non-zero on any failure; cleans up on every exit. Prints the figures docs/docker.md reports.
#
#   docker/smoke.sh                      # docker or podman, whichever works (docker first)
#   ENGINE=podman VARIANT=cpu PORT=18000 SKIP_BUILD=1 IMAGE=hpr-serve:cpu ADAPTER_DIR=path docker/smoke.sh
#   VARIANT=cuda BUILD_ARGS='--build-arg CUDA_BASE_IMAGE=debian:bookworm' docker/smoke.sh   # CUDA image, no GPU
#   VARIANT=cuda RUN_ARGS='--gpus all' docker/smoke.sh     # on a GPU host (podman: '--device nvidia.com/gpu=all')
#
# VARIANT=cuda first checks that the image's torch is a CUDA build. Without a GPU in the container it then checks
# the fallback: the server logs that it sees no GPU and serves on the CPU in float32, and `--device cuda` stops at
# startup with a message saying why; with one, that the server runs on CUDA in bfloat16. The requests are the same.
#
# The adapter: $ADAPTER_DIR, by default runs/truthfulqa/checkpoint, when it exists (trained by `hpr-train run
# --out runs/truthfulqa`), else a random one of SmolLM2's shape (hidden 576, 30 layers) written by the image's python.
# Needs: bash, curl, python3 (only to read JSON) on the host.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-hpr-serve:smoke}
VARIANT=${VARIANT:-cpu}
PORT=${PORT:-18000}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-180}
# shellcheck disable=SC2206  # RUN_ARGS is a list of words on purpose (e.g. --gpus all)
RUN_ARGS=(${RUN_ARGS:-})
NAME=hpr-smoke-$$
BASE_MODEL=smollm2-135m-instruct
URL=http://127.0.0.1:$PORT

say() { printf '[smoke] %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

if [[ -z ${ENGINE:-} ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null; then ENGINE=podman
    else fail "neither docker nor podman is available"; fi
fi
command -v curl >/dev/null || fail "curl is needed on the host"
command -v python3 >/dev/null || fail "python3 is needed on the host (to read JSON)"

WORK=$(mktemp -d)
cleanup() {
    local rc=$?
    if "$ENGINE" inspect "$NAME" >/dev/null 2>&1; then
        if [[ $rc -ne 0 ]]; then
            say "container logs (last 40 lines):"
            "$ENGINE" logs --tail 40 "$NAME" >&2 || true
        fi
        "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    if [[ $rc -eq 0 ]]; then say "PASS"; else say "FAILED (exit $rc)"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build ---------------------------------------------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    build=("$ENGINE" build --build-arg "VARIANT=$VARIANT" -t "$IMAGE")
    [[ $ENGINE == podman ]] && build+=(--format docker)  # keep HEALTHCHECK (OCI images drop it)
    compgen -G 'wheels/*.whl' >/dev/null && say "wheels offered to pip: $(printf '%s ' wheels/*.whl)"
    # shellcheck disable=SC2206  # BUILD_ARGS is a list of words on purpose
    build+=(${BUILD_ARGS:-} .)
    say "building: ${build[*]}"
    start=$(date +%s)
    "${build[@]}" >&2 || fail "image build failed"
    say "build: $(($(date +%s) - start)) s"
fi
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE") || fail "no image $IMAGE"
say "image $IMAGE: $((size / 1000000)) MB"

# --- CUDA image: a CUDA torch; without a GPU, an explicit --device cuda must stop with a reason ---------------------
GPU=0
if [[ $VARIANT == cuda ]]; then
    read -r torch_version torch_cuda GPU < <("$ENGINE" run --rm "${RUN_ARGS[@]}" --entrypoint python "$IMAGE" -c \
        "import torch; print(torch.__version__, torch.version.cuda, int(torch.cuda.is_available()))" 2>/dev/null) \
        || fail "cannot import torch in $IMAGE"
    [[ $torch_cuda != None ]] || fail "VARIANT=cuda but $IMAGE has a CPU build of torch ($torch_version)"
    say "torch $torch_version, built for CUDA $torch_cuda; GPU visible in the container: $([[ $GPU == 1 ]] && echo yes || echo no)"
    if [[ $GPU == 0 ]]; then
        start=$(date +%s)
        # No port, no adapters: the server must give up at startup, exit non-zero and say why.
        if out=$(timeout 300 "$ENGINE" run --rm "${RUN_ARGS[@]}" "$IMAGE" --device cuda 2>&1); then
            fail "--device cuda without a GPU started: $(tail -n 5 <<<"$out")"
        fi
        grep -q "CUDA is not available: torch .* is built for CUDA" <<<"$out" \
            || fail "--device cuda without a GPU: no clear message in: $(tail -n 20 <<<"$out")"
        say "--device cuda without a GPU stops in $(($(date +%s) - start)) s: \
$(grep -o "startup failed: .*" <<<"$out" | tail -n 1)"
    fi
fi

# --- adapter -------------------------------------------------------------------------------------------------------
mkdir -p "$WORK/adapters" && chmod 0777 "$WORK" "$WORK/adapters"
ADAPTER_DIR=${ADAPTER_DIR:-runs/truthfulqa/checkpoint}
if [[ -f $ADAPTER_DIR/hpr_config.json ]]; then
    ADAPTER=trained
    cp -r "$ADAPTER_DIR" "$WORK/adapters/$ADAPTER"
    chmod -R a+rX "$WORK/adapters"
    say "adapter: the trained $ADAPTER_DIR"
else
    ADAPTER=smoke
    "$ENGINE" run --rm --user "$(id -u):$(id -g)" -v "$WORK/adapters:/out:z" --entrypoint python "$IMAGE" -c \
        "import torch; from hpr.checkpoint import HPRAdapter, HPRConfig; torch.manual_seed(0); \
a = HPRAdapter(HPRConfig(base_model='$BASE_MODEL', hidden_size=576, num_layers=30, layers=list(range(10, 20)), \
selected_layers=[13, 14])); [p.data.normal_(0, 0.5) for p in a.parameters()]; a.save('/out/$ADAPTER')" \
        || fail "cannot write a random adapter with the image's python"
    chmod -R a+rX "$WORK/adapters"
    say "adapter: random, hidden 576, layers 10-19, selected 13-14"
fi
# Two layers for the explicit list (selected ones if possible), a run of trained layers for the range ("10-14").
read -r LAYER_LIST LAYER_RANGE LAYER_RANGE_LIST < <(python3 - "$WORK/adapters/$ADAPTER/hpr_config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
layers = sorted(config["layers"])
pick = sorted(config["selected_layers"]) if len(config["selected_layers"]) >= 2 else layers
runs, run = [], [layers[0]]
for x in layers[1:]:
    run = run + [x] if x == run[-1] + 1 else (runs.append(run) or [x])
runs.append(run)
best = max(runs, key=len)[:5]
print(json.dumps(pick[:2]).replace(" ", ""), f"{best[0]}-{best[-1]}", json.dumps(best).replace(" ", ""))
PY
)

# --- run and wait for healthy --------------------------------------------------------------------------------------
start_ns=$(date +%s%N)
"$ENGINE" run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" -v "$WORK/adapters:/adapters:ro,z" "${RUN_ARGS[@]}" "$IMAGE" \
    >/dev/null || fail "cannot start the container"
code=000
for _ in $(seq $((HEALTH_TIMEOUT * 2))); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/health" || true)
    [[ $code == 200 ]] && break
    [[ $("$ENGINE" inspect --format '{{.State.Running}}' "$NAME") == true ]] || fail "container exited before healthy"
    sleep 0.5
done
[[ $code == 200 ]] || fail "/health answered $code after ${HEALTH_TIMEOUT} s"
healthy_s=$(python3 -c "print(f'{($(date +%s%N) - $start_ns) / 1e9:.1f}')")
say "run → /health 200: $healthy_s s"
# The image's own HEALTHCHECK command must agree.
if [[ $ENGINE == podman ]]; then
    podman healthcheck run "$NAME" >/dev/null || fail "the image's HEALTHCHECK fails on a serving container"
else
    for _ in $(seq 40); do
        [[ $(docker inspect --format '{{.State.Health.Status}}' "$NAME") == healthy ]] && break
        sleep 1
    done
    [[ $(docker inspect --format '{{.State.Health.Status}}' "$NAME") == healthy ]] || fail "docker never saw healthy"
fi
say "HEALTHCHECK: healthy"
# Where the model runs, from the server's own log: the CPU image and a CUDA image without a GPU use the CPU in
# float32 (the CUDA one says why), a CUDA image with a GPU uses it in bfloat16.
"$ENGINE" logs "$NAME" >"$WORK/server.log" 2>&1
loaded=$(grep -o "loaded $BASE_MODEL .* in [0-9.]* s" "$WORK/server.log" | tail -n 1) || fail "no 'loaded' line in the log"
if [[ $VARIANT == cuda && $GPU == 1 ]]; then
    grep -q "torch.bfloat16 on cuda" <<<"$loaded" || fail "a GPU is visible but the server did not use it: $loaded"
else
    grep -q "torch.float32 on cpu" <<<"$loaded" || fail "expected float32 on the CPU: $loaded"
fi
if [[ $VARIANT == cuda && $GPU == 0 ]]; then
    grep -q "no GPU: .*using the CPU" "$WORK/server.log" || fail "the server did not log that it has no GPU"
    say "log: $(grep -o "no GPU: .*" "$WORK/server.log" | head -n 1)"
fi
say "log: $loaded"

# --- requests ------------------------------------------------------------------------------------------------------
# post BODY_JSON OUT_FILE → prints the HTTP status; the body goes to OUT_FILE, the total time to OUT_FILE.time
post() {
    curl -sS -o "$2" -w '%{http_code} %{time_total}' -H 'Content-Type: application/json' -d "$1" \
        "$URL/v1/chat/completions" >"$2.meta" || fail "curl failed: $1"
    read -r status seconds <"$2.meta"
    echo "$seconds" >"$2.time"
    echo "$status"
}
# check FILE PYTHON_EXPR: evaluates EXPR with r = the parsed JSON body; fails with the body on False
check() {
    python3 - "$1" "$2" <<'PY' || fail "check '$2' on $(head -c 600 "$1")"
import json, sys
r = json.load(open(sys.argv[1]))
sys.exit(0 if eval(sys.argv[2], {"r": r}) else 1)
PY
}
ask='"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]'

curl -sS -o "$WORK/models.json" "$URL/v1/models" || fail "GET /v1/models"
check "$WORK/models.json" "{m['id'] for m in r['data']} >= {'$BASE_MODEL', '$ADAPTER'} and \
any(m['id'] == '$ADAPTER' and m.get('parent') == '$BASE_MODEL' for m in r['data'])"
say "/v1/models lists $BASE_MODEL and adapter $ADAPTER (parent $BASE_MODEL)"

status=$(post "{\"model\": \"$BASE_MODEL\", $ask, \"max_tokens\": 16, \"temperature\": 0}" "$WORK/plain.json")
[[ $status == 200 ]] || fail "chat completion: HTTP $status: $(cat "$WORK/plain.json")"
check "$WORK/plain.json" "r['object'] == 'chat.completion' and r['choices'][0]['message']['role'] == 'assistant' \
and r['choices'][0]['message']['content'].strip() and r['usage']['completion_tokens'] > 0 and r.get('hpr') is None"
say "chat completion in $(cat "$WORK/plain.json.time") s (first request): \
$(python3 -c "import json; print(repr(json.load(open('$WORK/plain.json'))['choices'][0]['message']['content']))")"
check "$WORK/plain.json" "'paris' in r['choices'][0]['message']['content'].lower()"

curl -sS -N -o "$WORK/stream.txt" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$BASE_MODEL\", $ask, \"max_tokens\": 16, \"temperature\": 0, \"stream\": true}" \
    "$URL/v1/chat/completions" || fail "streamed chat completion"
python3 - "$WORK/stream.txt" <<'PY' || fail "stream: $(head -c 800 "$WORK/stream.txt")"
import json, sys
frames = [line[len("data: "):] for line in open(sys.argv[1]).read().splitlines() if line.startswith("data: ")]
assert frames and frames[-1] == "[DONE]", "the stream must end with data: [DONE]"
chunks = [json.loads(f) for f in frames[:-1]]
assert all(c["object"] == "chat.completion.chunk" for c in chunks)
text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
assert text.strip(), "no content in the stream"
assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks), "no finish_reason"
print(f"[smoke] streamed: {len(chunks)} chunks, {text!r}", file=sys.stderr)
PY

hpr="\"hpr\": {\"adapter\": \"$ADAPTER\", \"layers\": $LAYER_LIST, \"alpha\": 1.0, \"return_stats\": true}"
status=$(post "{\"model\": \"$BASE_MODEL\", $ask, \"max_tokens\": 16, \"temperature\": 0, $hpr}" "$WORK/edit.json")
[[ $status == 200 ]] || fail "chat completion with hpr layers $LAYER_LIST: HTTP $status: $(cat "$WORK/edit.json")"
check "$WORK/edit.json" "r['hpr']['adapter'] == '$ADAPTER' and r['hpr']['layers'] == $LAYER_LIST and \
r['hpr']['alpha'] == 1.0 and sorted(map(int, r['choices'][0]['hpr_stats'])) == $LAYER_LIST and \
all(s['tokens'] > 0 for s in r['choices'][0]['hpr_stats'].values()) and r['choices'][0]['message']['content'].strip()"
say "edited (layers $LAYER_LIST) in $(cat "$WORK/edit.json.time") s: \
$(python3 -c "import json; r = json.load(open('$WORK/edit.json')); print(repr(r['choices'][0]['message']['content']), \
{k: v['share_rotated'] for k, v in r['choices'][0]['hpr_stats'].items()})")"

status=$(post "{\"model\": \"$ADAPTER\", $ask, \"max_tokens\": 8, \"hpr\": {\"layers\": \"$LAYER_RANGE\", \"alpha\": 0.5}}" \
    "$WORK/range.json")
[[ $status == 200 ]] || fail "model=adapter with layers '$LAYER_RANGE': HTTP $status: $(cat "$WORK/range.json")"
check "$WORK/range.json" "r['hpr']['adapter'] == '$ADAPTER' and r['hpr']['layers'] == $LAYER_RANGE_LIST \
and r['hpr']['alpha'] == 0.5"
say "model=$ADAPTER with layers '$LAYER_RANGE' → edited layers $LAYER_RANGE_LIST"

status=$(post "{\"model\": \"$BASE_MODEL\", $ask, \"hpr\": {\"adapter\": \"$ADAPTER\", \"layers\": [99]}}" \
    "$WORK/bad.json")
[[ $status == 400 || $status == 422 ]] || fail "a layer out of range must answer 400, got $status: $(cat "$WORK/bad.json")"
check "$WORK/bad.json" "r['error']['message'] and r['error']['type']"
say "bad layer → $status: $(python3 -c "import json; print(json.load(open('$WORK/bad.json'))['error']['message'])")"

# --- stop ----------------------------------------------------------------------------------------------------------
"$ENGINE" stop -t 30 "$NAME" >/dev/null || fail "stop"
"$ENGINE" rm "$NAME" >/dev/null || fail "rm"
say "figures: image ${size} B, run→healthy ${healthy_s} s, first completion $(cat "$WORK/plain.json.time") s"
