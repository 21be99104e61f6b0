#!/usr/bin/env bash
# A local base image standing in for python:3.11-slim-bookworm where no registry can be reached
# (scripts/build-image.sh runs it when the pull fails): Debian bookworm minbase from the Debian mirror
# with Debian's python3.11, made by mmdebstrap and imported into the engine ($ENGINE: podman or docker).
#
#   ENGINE=podman bash scripts/make-base-image.sh [IMAGE]   (default localhost/longrope-base:bookworm-py311)
#
# python3.11-venv: install.sh makes /opt/venv. python3.11-dev: torch.compile's C++ needs Python.h (without
# it the engine's first compile fails). ca-certificates, passwd (groupadd/useradd), netbase: what the
# slim image has and the Dockerfiles use. LONGROPE_DEBIAN_MIRROR / LONGROPE_DEBIAN_SECURITY pick the mirrors.
set -euo pipefail

IMAGE="${1:-localhost/longrope-base:bookworm-py311}"
ENGINE="${ENGINE:-podman}"
MIRROR="${LONGROPE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${LONGROPE_DEBIAN_SECURITY:-${MIRROR%/debian}/debian-security}"
INCLUDE=python3.11,python3.11-venv,python3.11-dev,ca-certificates,passwd,netbase
say() { echo "make-base-image.sh: $*"; }

command -v mmdebstrap >/dev/null 2>&1 || {
  echo "make-base-image.sh: mmdebstrap is missing (apt-get install mmdebstrap; scripts/podman-setup.sh installs it)" >&2
  exit 1
}
WORK="$(mktemp -d /tmp/longrope-base.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

say "mmdebstrap --variant=minbase bookworm from $MIRROR (+ updates, security) with $INCLUDE"
t0=$SECONDS
if ! mmdebstrap --quiet --variant=minbase --include="$INCLUDE" bookworm "$WORK/rootfs.tar" \
  "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main" \
  </dev/null >"$WORK/mmdebstrap.log" 2>&1; then
  tail -n 30 "$WORK/mmdebstrap.log" >&2
  echo "make-base-image.sh: mmdebstrap failed (log above); is $MIRROR reachable? set LONGROPE_DEBIAN_MIRROR" >&2
  exit 1
fi
say "root file system: $(du -h "$WORK/rootfs.tar" | cut -f1) in $((SECONDS - t0))s; importing as $IMAGE"
# An imported tarball has no environment: give it what python:3.11-slim sets (PATH, LANG).
"$ENGINE" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3.11"]' \
  "$WORK/rootfs.tar" "$IMAGE" >/dev/null 2>"$WORK/import.log" \
  || { cat "$WORK/import.log" >&2; echo "make-base-image.sh: $ENGINE import failed" >&2; exit 1; }
"$ENGINE" run --rm --network=host "$IMAGE" python3.11 -c 'import ensurepip, sysconfig, os; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' \
  || { echo "make-base-image.sh: $IMAGE does not run python3.11 with venv and headers" >&2; exit 1; }
say "$IMAGE ready ($(("$ENGINE" run --rm --network=host "$IMAGE" python3.11 --version) 2>&1))"
