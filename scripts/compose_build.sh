#!/usr/bin/env bash
# Build every image of the compose stack, with no network inside the builds:
#   1. the Debian base image (deploy/base/build-base.sh: debootstrap from this machine's apt sources),
#   2. the wheelhouse on the host (scripts/compose_wheelhouse.sh),
#   3. the runtime image (deploy/runtime/Dockerfile: third-party deps from the wheelhouse),
#   4. the six service images (services/<name>/Dockerfile: Tessera's code from source),
#   5. nats and redis from the base image (deploy/images/*) when .env's upstream images cannot be pulled.
#
#   scripts/compose_build.sh              # ENGINE=podman (default) or ENGINE=docker
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
runtime=${prefix}runtime:$tag
build "$runtime" deploy/runtime/Dockerfile --build-arg "BASE_IMAGE=$base"
for svc in "${TESSERA_SERVICES[@]}"; do
  port_var=$(echo "${svc//-/_}_PORT" | tr '[:lower:]' '[:upper:]')
  build "$prefix$svc:$tag" "services/$svc/Dockerfile" --build-arg "RUNTIME_IMAGE=$runtime" --build-arg "GRPC_PORT=${!port_var}"
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
