#!/usr/bin/env bash
# Build the Debian base image of Tessera's containers and import it into the engine.
#
#   deploy/base/build-base.sh            # prints the image reference, e.g. localhost/tessera/debian-base:3f2a…
#
# The root file system comes from `debootstrap --variant=minbase` against this machine's
# own apt sources (read from the apt configuration, never written here), with the packages
# of packages.txt. The tag is a hash of the inputs: an image already built from the same
# inputs is reused (podman keeps it in /var/lib/containers), so a warm run costs nothing.
# Needs root, debootstrap and podman (or ENGINE=docker).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ENGINE=${ENGINE:-podman}
IMAGE_NAME=${TESSERA_BASE_IMAGE_NAME:-tessera/debian-base}

# shellcheck disable=SC1091
. /etc/os-release
suite=${TESSERA_BASE_SUITE:-${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}}
arch=$(dpkg --print-architecture)
packages=$(grep -v '^[[:space:]]*#' "$here/packages.txt" | xargs | tr ' ' ',')

key=$(cat "$here/build-base.sh" "$here/packages.txt" <(echo "$suite $arch") | sha256sum | cut -c1-16)
ref="localhost/$IMAGE_NAME:$key"
if "$ENGINE" image exists "$ref" 2>/dev/null; then
  echo "$ref"
  exit 0
fi

# The mirror this machine installs its own packages from, for $suite/main.
mirror_from_apt() {
  apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Identifier: Packages' 2>/dev/null \
    | awk -v s="$suite" '$2 == s && $3 == "main" { print $1; exit }'
}
mirror_from_sources() {  # before any `apt-get update`: read the sources files themselves
  {
    grep -hs '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      | awk -v s="$suite" '{ for (i = 2; i < NF; i++) if ($i !~ /^\[/ && $(i + 1) == s) { print $i; exit } }'
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
        { uris = ""; ok = 0
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[[:space:]]*/, "", uris) }
            if ($i ~ /^Suites:/ && (" " $i " ") ~ (" " s " ")) ok = 1
          }
          if (ok && uris != "") { split(uris, u, " "); print u[1] } }' "$f"
    done
  } | head -n1
}
mirror=${TESSERA_BASE_MIRROR:-$(mirror_from_apt)}
mirror=${mirror:-$(mirror_from_sources)}
if [ -z "$mirror" ]; then
  echo "build-base: found no apt source for $suite/main in this machine's apt configuration" >&2
  exit 1
fi

work=$(mktemp -d /var/tmp/tessera-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "build-base: debootstrap $suite ($arch) with $packages" >&2
debootstrap --variant=minbase --arch="$arch" --include="$packages" "$suite" "$work/rootfs" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -n 40 "$work/debootstrap.log" >&2; exit 1; }

# Slim it down: no package lists, caches or docs in the image.
rm -rf "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/var/cache/apt/*.bin "$work"/rootfs/var/cache/apt/archives/*.deb \
  "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/info/*
tar --numeric-owner -C "$work/rootfs" -c . \
  | "$ENGINE" import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$ref" >/dev/null
echo "$ref"
