#!/usr/bin/env bash
# Build the wheelhouse the images' local path installs from (no registry, no network in the
# builds), on the host, with pip: every third-party dependency of libs/api, libs/common,
# libs/sdk and the services (torch and scikit-learn included, where a service declares them),
# plus setuptools and wheel to build Tessera's own packages inside the images. The Dockerfile
# (TESSERA_BASE=local) takes DIR as its `wheelhouse` build context and installs with
# `pip --no-index`; it builds Tessera's own wheels itself, from the source tree.
#
#   scripts/compose_wheelhouse.sh [DIR]      # default DIR: deploy/wheelhouse (git-ignored)
#
# Wheels are kept between runs in $TESSERA_CACHE_DIR/wheelhouse (default
# /var/cache/tessera/wheelhouse); pip's own configuration (index, find-links) is used as
# it is. Writes DIR/requirements.txt: the pinned third-party set, and nothing of Tessera's
# own, so that a code change leaves DIR (and the images' dependency layers) as they are.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-deploy/wheelhouse}
CACHE=${TESSERA_CACHE_DIR:-/var/cache/tessera}/wheelhouse
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PY=$(command -v "$PY")
case $PY in /*) ;; *) PY=$PWD/$PY ;; esac

# Must match the images' Python (Debian's python3 in the base image) in major.minor;
# TESSERA_IMAGE_PYTHON_FULL (e.g. 3.11.2) names its exact release (compose_build.sh sets it).
want=${TESSERA_IMAGE_PYTHON:-3.11}
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$have" != "$want" ]; then
  echo "compose_wheelhouse: $PY is Python $have; the images run Python $want" >&2
  exit 1
fi

mkdir -p "$CACHE" "$OUT"
PKGS=(libs/api libs/common libs/sdk services/control-store services/object-store services/task-scheduler
      services/compiler services/gpu-scheduler services/serving services/gateway services/dashboard)
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Pip builds from a clean copy of the sources: nothing is written into the tree, and no
# stale build/ or egg-info of the tree gets into a wheel.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar --exclude=build --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache -cf - "${PKGS[@]}" \
  | tar -C "$src" -xf -
SRC_PKGS=("${PKGS[@]/#/$src/}")

# Tessera's own wheels are built by the image build; drop those an earlier version left here.
rm -rf "$OUT/tessera"
# Nothing to do when the packages' metadata, this script and the target Python are unchanged.
key=$(cat "${PKGS[@]/%//pyproject.toml}" "$0" <(echo "${TESSERA_IMAGE_PYTHON_FULL:-} ${TESSERA_TORCH_INDEX:-}") | sha256sum | cut -c1-16)
if [ -f "$OUT/requirements.txt" ] && [ "$(cat "$OUT/.key" 2>/dev/null)" = "$key" ]; then
  echo "compose_wheelhouse: $OUT is up to date"
  exit 0
fi
rm -f "$OUT/.key"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's own configuration finds the packages; TESSERA_TORCH_INDEX (e.g. PyTorch's CPU index) is added
# as an extra index when set, for the CPU-only torch wheel.
extra=()
[ -z "${TESSERA_TORCH_INDEX:-}" ] || extra=(--extra-index-url "$TESSERA_TORCH_INDEX")
"$PY" -m pip wheel -q --no-build-isolation --wheel-dir "$CACHE" --find-links "$CACHE" "${extra[@]}" \
  setuptools wheel "${SRC_PKGS[@]}" 2> >(grep -v "is neither a file nor a directory" >&2)

# The resolved set: what `pip install --dry-run` picks for the packages, from the cache only.
# The host's Python may differ from the image's in its patch release (markers such as
# python_full_version < "3.11.3"): requirements that only the image's Python needs are
# added, built into the cache, and the set is resolved again.
IMAGE_PY=${TESSERA_IMAGE_PYTHON_FULL:-}
work=$(mktemp -d)
trap 'rm -rf "$work" "$src"' EXIT
: >"$work/extra.txt"
for round in 1 2 3; do
  "$PY" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$CACHE" --report "$work/report.json" \
    setuptools wheel "${SRC_PKGS[@]}" -r "$work/extra.txt" 2> >(grep -v "is neither a file nor a directory" >&2)
  rc=0
  "$PY" - "$work/report.json" "$IMAGE_PY" "$work/extra.txt" <<'PY' || rc=$?
import json, sys
from pathlib import Path
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

report, image_py, extra_file = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], Path(sys.argv[3])
host = default_environment()
image = dict(host, python_full_version=image_py or host["python_full_version"])
have = {canonicalize_name(i["metadata"]["name"]) for i in report["install"]}
extra = set(extra_file.read_text().split())
for item in report["install"]:
    for spec in item["metadata"].get("requires_dist", []):
        r = Requirement(spec)
        if r.marker and r.marker.evaluate(dict(image, extra="")) and not r.marker.evaluate(dict(host, extra="")) \
                and canonicalize_name(r.name) not in have:
            r.marker = None
            extra.add(str(r).replace(" ", ""))
extra_file.write_text("".join(f"{e}\n" for e in sorted(extra)))
sys.exit(10 if {canonicalize_name(Requirement(e).name) for e in extra} - have else 0)
PY
  [ "$rc" -ne 0 ] || break
  [ "$rc" -eq 10 ] || exit "$rc"
  [ "$round" -lt 3 ] || { echo "compose_wheelhouse: could not close the set for Python $IMAGE_PY" >&2; exit 1; }
  "$PY" -m pip wheel -q --no-build-isolation --wheel-dir "$CACHE" --find-links "$CACHE" "${extra[@]}" \
    -r "$work/extra.txt" 2> >(grep -v "is neither a file nor a directory" >&2)
done
"$PY" - "$work/report.json" "$CACHE" "$OUT" <<'PY'
import json, re, shutil, sys
from pathlib import Path
from urllib.parse import unquote, urlparse

report, cache, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])
def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
pins, keep = [], set()
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if norm(name).startswith("tessera"):
        continue  # built from source inside each service image
    wheel = Path(unquote(urlparse(item["download_info"]["url"]).path))
    if wheel.suffix != ".whl":
        sys.exit(f"compose_wheelhouse: {name} {version} is not a wheel: {wheel}")
    keep.add(wheel.name)
    if not (out / wheel.name).exists():
        shutil.copy2(cache / wheel.name if (cache / wheel.name).exists() else wheel, out / wheel.name)
    pins.append(f"{name}=={version}")
for stale in out.glob("*.whl"):
    if stale.name not in keep:
        stale.unlink()
(out / "requirements.txt").write_text("".join(f"{p}\n" for p in sorted(pins, key=str.lower)))
print(f"compose_wheelhouse: {len(pins)} wheels in {out}")
PY
echo "$key" >"$OUT/.key"
