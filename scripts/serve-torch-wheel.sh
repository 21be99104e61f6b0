#!/usr/bin/env bash
# Serve torch's CPU wheel to an image build from a throw-away PEP 503 simple index on 127.0.0.1
# (scripts/build-image.sh runs it when PyTorch's CPU index cannot be reached; the build runs with
# --network=host, so 127.0.0.1 is the host).
#
#   bash scripts/serve-torch-wheel.sh VERSION DIR PIDFILE    prints the index URL (http://127.0.0.1:PORT/simple)
#
# The wheel comes from wherever the host's pip finds it (its find-links, indexes or cache): `pip download`
# of torch==VERSION+cpu for CPython 3.11 on this machine's architecture. The server is left running in the
# background; its pid goes to PIDFILE and the caller stops it.
set -euo pipefail

VERSION="$1"
DIR="$2"
PIDFILE="$3"
PY="$(command -v python3.11 || command -v python3)"
ARCH="$(uname -m)"
mkdir -p "$DIR/files" "$DIR/simple/torch"
if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
  --abi cp311 --platform "manylinux_2_28_$ARCH" -d "$DIR/files" "torch==$VERSION+cpu" >"$DIR/pip.log" 2>&1; then
  tail -n 20 "$DIR/pip.log" >&2
  echo "serve-torch-wheel.sh: the host's pip cannot get torch==$VERSION+cpu (log above); put the wheel into a" \
       "folder and set PIP_FIND_LINKS to it, or make https://download.pytorch.org/whl/cpu reachable" >&2
  exit 1
fi
wheel="$(cd "$DIR/files" && ls torch-"$VERSION"+cpu-*.whl | head -n 1)"
sha="$(sha256sum "$DIR/files/$wheel" | cut -d' ' -f1)"
printf '<!DOCTYPE html>\n<html><body>\n<a href="../../files/%s#sha256=%s">%s</a>\n</body></html>\n' \
  "$wheel" "$sha" "$wheel" >"$DIR/simple/torch/index.html"
# A fixed port when free: the index URL is a build argument, part of the install layer's cache key.
port="$("$PY" - "${LONGROPE_TORCH_INDEX_PORT:-38611}" <<'PYEOF'
import socket, sys
for want in (int(sys.argv[1]), 0):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", want))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
PYEOF
)"
"$PY" -m http.server "$port" --bind 127.0.0.1 --directory "$DIR" >"$DIR/http.log" 2>&1 &
echo $! >"$PIDFILE"
for _ in $(seq 50); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$port/simple/torch/" 2>/dev/null; then
    echo "http://127.0.0.1:$port/simple"
    exit 0
  fi
  sleep 0.1
done
echo "serve-torch-wheel.sh: the index on 127.0.0.1:$port did not answer" >&2
exit 1
