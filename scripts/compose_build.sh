#!/usr/bin/env bash
# Build every image of the compose stack through the Dockerfile's local path
# (TESSERA_BASE=local): no registry, and no network inside the builds.
#   1. the Debian base image (deploy/base/build-base.sh: debootstrap from this machine's apt sources),
#   2. the wheelhouse on the host (scripts/compose_wheelhouse.sh: third-party wheels only),
#   3. the nine Tessera images, one target each of the Dockerfile (its shared stages, the
#      venv with every third-party dependency among them, are built once and then cached),
#   4. nats and redis from the base image (deploy/images/*) when .env's upstream images cannot be pulled.
#
#   scripts/compose_build.sh              # ENGINE=podman (default) or ENGINE=docker
#
# With a registry, none of this is needed: `docker compose up -d --build` builds the same
# targets from python:3.11-slim-bookworm and PyPI (the Dockerfile's default, public path).
# Layers are cached by the engine: a second run with no change takes seconds.
set -euo pipefail
# shellcheck source=scripts/compose_env.sh
. "$(dirname "${BASH_SOURCE[0]}")/compose_env.sh"

t0=$SECONDS
base=$(ENGINE=$ENGINE deploy/base/build-base.sh)
echo "compose_build: base $base ($((SECONDS - t0))s)"
TESSERA_IMAGE_PYTHON_FULL=$("$ENGINE" run --rm --network none "$base" python3 -c 'import platform; print(platform.python_version())') \
  scripts/compose_wheelhouse.sh deploy/wheelhouse

build() {  # build <tag> <dockerfile> [--build-arg ...]
  local tag=$1 file=$2; shift 2
  local t=$SECONDS
  "$ENGINE" build -q --layers -f "$file" -t "$tag" "$@" . >/dev/null
  echo "compose_build: $tag ($((SECONDS - t))s)"
}
prefix=$TESSERA_IMAGE_PREFIX tag=$TESSERA_IMAGE_TAG
local_path=(--build-arg TESSERA_BASE=local --build-arg "LOCAL_BASE_IMAGE=$base"
            --build-context wheelhouse=deploy/wheelhouse)
for image in "${TESSERA_IMAGES[@]}"; do
  args=(--target "$image" "${local_path[@]}")
  # the gRPC port of .env (CONTROL_STORE_PORT, ...), where .env has one for this image
  port_var=$(echo "${image//-/_}_PORT" | tr '[:lower:]' '[:upper:]')
  [ -z "${!port_var:-}" ] || args+=(--build-arg "GRPC_PORT=${!port_var}")
  build "$prefix$image:$tag" Dockerfile "${args[@]}"
done
for infra in nats redis; do
  var=$(echo "${infra}_IMAGE" | tr '[:lower:]' '[:upper:]')
  if have_image "${!var}"; then
    echo "compose_build: $infra uses ${!var}"
  else
    build "$prefix$infra:$tag" "deploy/images/$infra/Dockerfile" --build-arg "BASE_IMAGE=$base"
  fi
done
echo "compose_build: done in $((SECONDS - t0))s"
