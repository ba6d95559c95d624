#!/usr/bin/env bash
# Make this machine able to run Tessera's compose stack with podman (as root):
#   - Debian's podman, runc, debootstrap, catatonit (compose's `init: true`) and networking,
#   - podman-compose from PyPI in its own venv (Debian's 1.0.3 has no --scale),
#   - /etc/containers/containers.conf from deploy/podman/containers.conf
#     (runtime runc, cgroup manager cgroupfs, events logger file, default ulimits),
#   - a smoke test: `podman info`.
#
#   deploy/podman/setup.sh      # exit 0: ready; exit 3: podman cannot run here (the reason on stderr)
#
# Prints the podman-compose command to use on its last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${TESSERA_CACHE_DIR:-/var/cache/tessera}
COMPOSE_VENV=$CACHE/podman-compose-venv
PODMAN_COMPOSE_VERSION=1.6.0
APT_PACKAGES=(podman runc debootstrap catatonit netavark aardvark-dns slirp4netns fuse-overlayfs uidmap iptables)

cannot() { echo "podman cannot run here: $*" >&2; exit 3; }

[ "$(id -u)" -eq 0 ] || cannot "needs root (rootful podman)"
command -v apt-get >/dev/null 2>&1 || cannot "not a Debian-like system (no apt-get)"

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
    || { sleep 10; apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
    || cannot "apt-get install ${missing[*]} failed"
elif ! apt-get indextargets 'Identifier: Packages' 2>/dev/null | grep -q .; then
  apt-get update -qq || true  # debootstrap's mirror is read from the apt lists
fi

mkdir -p /etc/containers
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
clamp() {  # clamp VALUE HARD_LIMIT
  if [ "$2" = unlimited ] || [ "$1" -le "$2" ]; then echo "$1"; else echo "$2"; fi
}
nofile=$(clamp 16384 "$(ulimit -Hn)") nproc=$(clamp 16384 "$(ulimit -Hu)")
sed -e "s/\"nofile=16384:16384\"/\"nofile=$nofile:$nofile\"/" -e "s/\"nproc=16384:16384\"/\"nproc=$nproc:$nproc\"/" \
  "$here/containers.conf" >"$conf"
if ! cmp -s "$conf" /etc/containers/containers.conf; then
  if [ -f /etc/containers/containers.conf ] && ! grep -q 'deploy/podman/setup.sh' /etc/containers/containers.conf; then
    cp /etc/containers/containers.conf "/etc/containers/containers.conf.before-tessera"
    echo "setup: kept the previous /etc/containers/containers.conf as containers.conf.before-tessera" >&2
  fi
  install -m 0644 "$conf" /etc/containers/containers.conf
fi

if [ ! -x "$COMPOSE_VENV/bin/podman-compose" ] \
   || [ "$("$COMPOSE_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("podman-compose"))' 2>/dev/null)" != "$PODMAN_COMPOSE_VERSION" ]; then
  rm -rf "$COMPOSE_VENV"
  python3 -m venv "$COMPOSE_VENV" || cannot "python3 -m venv failed (python3-venv missing?)"
  "$COMPOSE_VENV/bin/pip" install -q --disable-pip-version-check "podman-compose==$PODMAN_COMPOSE_VERSION" \
    || cannot "pip install podman-compose==$PODMAN_COMPOSE_VERSION failed"
fi

out=$(timeout 120 podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Host.EventLogger}}' 2>&1) \
  || cannot "podman info failed: $out"
echo "setup: podman $(podman version --format '{{.Client.Version}}') ($out)" >&2
echo "$COMPOSE_VENV/bin/podman-compose"
