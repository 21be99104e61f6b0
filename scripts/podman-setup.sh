#!/usr/bin/env bash
# Install and configure podman so plain `podman build|run` work on this kind of machine (scripts/build-image.sh
# runs it; idempotent, says what it does; docs/deploy.md "Building the image").
#
# What a fresh Debian bookworm VM needed (tried 2026-12-02): the packages podman, runc, catatonit (--init),
# netavark + aardvark-dns + iptables (bridge networks: `run -p`, compose), mmdebstrap (the local base) and
# uidmap; a containers.conf drop-in with runtime "runc" (crun refuses this machine's cgroup setup), nofile and
# nproc ulimits no higher than the host allows (podman's defaults fail here), without systemd the cgroupfs
# manager and a file events log, and network_backend "netavark" (Debian's podman also ships a CNI config,
# which made podman pick CNI, whose plugins are not installed). Storage: Debian's default, overlay (works
# here); LONGROPE_PODMAN_STORAGE=vfs switches to vfs where overlay cannot mount (before the first image).
# Tried as root; for another user it installs with sudo and writes the user's config (rootless podman
# also needs /etc/subuid entries; not tried here).
set -euo pipefail

say() { echo "podman-setup.sh: $*"; }
die() { echo "podman-setup.sh: $*" >&2; exit 1; }

if [ "$(id -u)" = 0 ]; then
  SUDO=()
  CONF_DIR=/etc/containers
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
  CONF_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/containers"  # rootless podman reads the user's config
else
  SUDO=(false)
  CONF_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/containers"
fi

PACKAGES=(podman runc catatonit netavark aardvark-dns iptables mmdebstrap uidmap)
[ "$(id -u)" = 0 ] || PACKAGES+=(slirp4netns fuse-overlayfs)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "need ${missing[*]} and found no apt-get; install podman (>= 4.3), runc and mmdebstrap with this system's package manager"
  "${SUDO[@]}" true 2>/dev/null || die "need the Debian packages ${missing[*]}: run as root or with password-less sudo, or install them (apt-get install ${missing[*]})"
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  APT=("${SUDO[@]}" apt-get -y -q -o Dpkg::Use-Pty=0)
  log="$(mktemp)"
  if ! "${APT[@]}" install --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    "${APT[@]}" update >>"$log" 2>&1 || true
    if ! "${APT[@]}" install --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
      tail -n 30 "$log" >&2
      rm -f "$log"
      die "apt-get install ${missing[*]} failed (log above)"
    fi
  fi
  rm -f "$log"
fi

# nofile, nproc: podman's defaults (1048576, 4194304) exceed this machine's hard limits (20000, 96362) and
# every container fails to start ("error setting rlimits"): use the host's hard limits.
cap() { if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi; }
hard="$(cap "$(ulimit -Hn)" 1048576)"
nproc="$(cap "$(cap "$(ulimit -Hu)" 4194304)" "$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)")"
CONF="$CONF_DIR/containers.conf.d/50-longrope-serve.conf"
want="$(
  echo "# Written by longrope-serve's scripts/podman-setup.sh (docs/deploy.md). Delete it to undo."
  echo "[containers]"
  echo "default_ulimits = [\"nofile=$hard:$hard\", \"nproc=$nproc:$nproc\"]"
  echo "[engine]"
  echo "runtime = \"runc\""
  if [ "$(ps -p 1 -o comm= 2>/dev/null)" != systemd ]; then
    echo "cgroup_manager = \"cgroupfs\""
    echo "events_logger = \"file\""
  fi
  echo "[network]"
  echo "network_backend = \"netavark\""
)"
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$want" ]; then
  say "writing $CONF (runtime runc, nofile $hard, nproc $nproc$([ "$(ps -p 1 -o comm=)" = systemd ] || echo ', cgroupfs: no systemd'))"
  mkdir -p "$(dirname "$CONF")"
  printf '%s\n' "$want" >"$CONF"
fi

if [ -n "${LONGROPE_PODMAN_STORAGE:-}" ]; then
  STORAGE="$CONF_DIR/storage.conf"
  if ! grep -qs "^driver = \"$LONGROPE_PODMAN_STORAGE\"" "$STORAGE"; then
    say "writing $STORAGE (driver $LONGROPE_PODMAN_STORAGE; existing images of another driver need 'podman system reset')"
    mkdir -p "$CONF_DIR"
    printf '[storage]\ndriver = "%s"\n' "$LONGROPE_PODMAN_STORAGE" >"$STORAGE"
  fi
fi

info="$(podman info --format '{{.Version.Version}} runtime={{.Host.OCIRuntime.Name}} storage={{.Store.GraphDriverName}} cgroups={{.Host.CgroupManager}} network={{.Host.NetworkBackend}}' 2>&1)" \
  || die "podman info fails after setup: $info"
case "$info" in
  *runtime=runc*) ;;
  *) die "podman does not use runc after writing $CONF ($info)" ;;
esac
say "podman $info"
