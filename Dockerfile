# longrope-serve for CUDA GPU hosts (vllm==0.32.*). The install step is scripts/install.sh, the same
# script `make serve`, `make test` and CI run (there with the CPU variant).
#   docker build -t longrope-serve .
#   docker run --gpus all -p 8000:8000 -v models:/models -v registry:/registry \
#       -e LONGROPE_MODEL=/models/my-model longrope-serve
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LONGROPE_CACHE_DIR=/models/cache \
    LONGROPE_REGISTRY=/registry \
    LONGROPE_HOST=0.0.0.0 \
    LONGROPE_PORT=8000 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 longrope \
    && mkdir -p /models /registry /opt/venv && chown longrope:longrope /models /registry /opt/venv

WORKDIR /app
COPY --chown=longrope:longrope pyproject.toml README.md ./
COPY --chown=longrope:longrope scripts ./scripts
COPY --chown=longrope:longrope factors ./factors
COPY --chown=longrope:longrope server ./server
COPY --chown=longrope:longrope clients ./clients
USER longrope
RUN LONGROPE_VARIANT=cuda LONGROPE_VENV=/opt/venv LONGROPE_EDITABLE=0 bash scripts/install.sh

VOLUME ["/models", "/registry"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${LONGROPE_PORT}/health" || exit 1
ENTRYPOINT ["longrope-serve"]
CMD []
