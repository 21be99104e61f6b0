#!/usr/bin/env bash
# System tools the test suite needs beyond the Python venv: Debian's `prometheus` (tests/deploy starts a
# real Prometheus on loopback that scrapes a real server). `make test` runs this, so CI (`.ci/run`) and a
# clean clone get it too. Idempotent and quiet: when every tool is present it does nothing.
#
#   LONGROPE_SKIP_TEST_TOOLS=1   do nothing (the tests that need a missing tool then fail and say which)
set -euo pipefail

if [ "${LONGROPE_SKIP_TEST_TOOLS:-0}" = "1" ]; then
  exit 0
fi

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" = "0" ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install-test-tools.sh: need Debian package(s) ${missing[*]} but am neither root nor allowed" \
       "password-less sudo; install them (apt-get install ${missing[*]}) or set LONGROPE_SKIP_TEST_TOOLS=1" >&2
  exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-tools.sh: need ${missing[*]} and found no apt-get; install them with this system's" \
       "package manager (the tests look for the 'prometheus' binary on PATH)" >&2
  exit 2
fi

echo "install-test-tools.sh: installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
APT=("${SUDO[@]}" apt-get -y -q -o Dpkg::Use-Pty=0)
log="$(mktemp)"
# A fresh machine may have no package lists yet: try as is first (fast), then update and retry.
if ! "${APT[@]}" install --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
  "${APT[@]}" update >>"$log" 2>&1 || true
  if ! "${APT[@]}" install --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install-test-tools.sh: apt-get install ${missing[*]} failed (log above)" >&2
    rm -f "$log"
    exit 1
  fi
fi
rm -f "$log"
# The package's service is not wanted: the tests start their own Prometheus on a free loopback port.
for tool in "${missing[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-test-tools.sh: $tool still not on PATH" >&2; exit 1; }
done
echo "install-test-tools.sh: done ($(prometheus --version 2>&1 | head -n 1))"
