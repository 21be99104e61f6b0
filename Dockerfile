# syntax=docker/dockerfile:1
# longrope-serve for CUDA GPU hosts. The vLLM it installs is the requirement scripts/install.sh gives for
# LONGROPE_VARIANT=cuda (its ENGINE_REQ line; `make image-cuda` copies it into the image's label
# io.longrope-serve.engine, see `docker image inspect`); vLLM's CUDA wheels bring the CUDA runtime, the host
# needs the NVIDIA driver and the NVIDIA Container Toolkit. The install step is scripts/install.sh, the same
# script `make serve`, `make test` and CI run (CI with the CPU variant, see Dockerfile.cpu). docs/deploy.md.
#   make image-cuda     (or: docker build -t longrope-serve:cuda .)
#   docker run --gpus all --init -p 8000:8000 -v models:/models -v registry:/registry \
#       -e LONGROPE_ADMIN_TOKEN=... longrope-serve:cuda [any longrope-serve / vLLM option]
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# curl: HEALTHCHECK. gcc + libc6-dev: Triton compiles its small launcher stubs with the host C compiler
# the first time a kernel runs (torch.compile / CUDA graphs need it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 longrope \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin longrope \
    && mkdir -p /models /registry /opt/venv /app \
    && chown 1000:1000 /models /registry /opt/venv /app

# Configuration is by environment: every longrope-serve option reads LONGROPE_<OPTION> (README, docs/api.md).
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/models/hf \
    LONGROPE_CACHE_DIR=/models/cache \
    VLLM_CACHE_ROOT=/models/cache/vllm \
    LONGROPE_REGISTRY=/registry \
    LONGROPE_HOST=0.0.0.0 \
    LONGROPE_PORT=8000 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY --chown=1000:1000 pyproject.toml README.md ./
COPY --chown=1000:1000 scripts ./scripts
COPY --chown=1000:1000 factors ./factors
COPY --chown=1000:1000 server ./server
COPY --chown=1000:1000 clients ./clients
USER 1000:1000
# build-ca (optional): a CA bundle for pip, passed as a build secret so it never lands in a layer
# (`make image` passes the host's, for HTTPS through a proxy with its own CA; docs/deploy.md).
RUN --mount=type=cache,target=/home/longrope/.cache/pip,uid=1000,gid=1000 \
    --mount=type=secret,id=build-ca,mode=0444 \
    if [ -s /run/secrets/build-ca ]; then export PIP_CERT=/run/secrets/build-ca; fi; \
    LONGROPE_VARIANT=cuda LONGROPE_VENV=/opt/venv LONGROPE_EDITABLE=0 bash scripts/install.sh

# /models: model folders (LONGROPE_MODEL=/models/NAME) and caches (the embedded default model's conversion,
# vLLM's compile cache). /registry: hot-loaded factor sets, restored at start; share it between replicas.
VOLUME ["/models", "/registry"]
EXPOSE 8000
# Long start period: loading and compiling a large model on first start takes minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${LONGROPE_PORT}/health" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["longrope-serve"]
CMD []
