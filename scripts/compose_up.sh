#!/usr/bin/env bash
# Start the compose stack under podman (or ENGINE=docker) and wait until every container is ready.
#
#   scripts/compose_up.sh [--scale SERVICE=N]...  # e.g. --scale node=2 --scale serving=2
#
# Images must be built (scripts/compose_build.sh). The credentials (token, NATS and Redis
# passwords) are generated first when missing (scripts/compose_secrets.sh). podman-compose ignores
# `condition: service_healthy`, so the services start in dependency order:
# nats, redis (and jaeger) → control-store → the nodes and the other services, and each step waits for
# readiness through the health protocols (scripts/compose_wait.py: grpc.health.v1 for
# Tessera's services). Where .env's upstream nats/redis images cannot be pulled, the
# ones built from the base image are used; where Jaeger's cannot, the stack runs
# without Jaeger (services still export, nothing collects) and says so.
set -euo pipefail
# shellcheck source=scripts/compose_env.sh
. "$(dirname "${BASH_SOURCE[0]}")/compose_env.sh"

scale=()
while [ $# -gt 0 ]; do
  case $1 in
    --scale) scale+=(--scale "$2"); shift 2 ;;
    --scale=*) scale+=(--scale "${1#--scale=}"); shift ;;
    *) echo "usage: $0 [--scale SERVICE=N]..." >&2; exit 2 ;;
  esac
done
for ((i = 1; i < ${#scale[@]}; i += 2)); do
  case ${scale[i]} in
    control-store=1|gateway=1) ;;
    control-store=*|gateway=*) echo "compose_up: ${scale[i]%%=*} runs as one replica (see docker-compose.yml)" >&2; exit 2 ;;
  esac
done

t0=$SECONDS
scripts/compose_secrets.sh
for infra in nats redis; do
  var=$(echo "${infra}_IMAGE" | tr '[:lower:]' '[:upper:]')
  if ! have_image "${!var}"; then
    export "$var=$TESSERA_IMAGE_PREFIX$infra:$TESSERA_IMAGE_TAG"
  fi
  echo "compose_up: $infra image ${!var}"
done
infra=(nats redis)
if have_image "$JAEGER_IMAGE"; then
  infra+=(jaeger)
else
  echo "compose_up: Jaeger image $JAEGER_IMAGE is not available (not local, pull failed): running without Jaeger;" \
       "spans go to $OTEL_COLLECTOR_ENDPOINT"
fi

# podman without systemd logs that it cannot schedule healthchecks: expected, compose_wait.py checks instead.
up() {
  "${COMPOSE[@]}" up -d --no-deps --no-build "$@" 2> >(grep -v -e 'systemd connection' -e 'connect to syslog' >&2) >/dev/null
}
wait_ready() { "$PY" scripts/compose_wait.py --timeout "${TESSERA_COMPOSE_WAIT_S:-180}" "$@"; }

up "${infra[@]}"
wait_ready "${infra[@]}"
up control-store
wait_ready control-store
others=(node task-scheduler compiler gpu-scheduler serving gateway dashboard)
# One `up` per scaled service (podman-compose keeps only the last of several --scale options), then the rest.
scaled=" "
for ((i = 1; i < ${#scale[@]}; i += 2)); do
  up --scale "${scale[i]}" "${scale[i]%%=*}"
  scaled+="${scale[i]%%=*} "
done
rest=()
for svc in "${others[@]}"; do
  case $scaled in *" $svc "*) ;; *) rest+=("$svc") ;; esac
done
[ ${#rest[@]} -eq 0 ] || up "${rest[@]}"
expect=("${others[@]}")
for ((i = 1; i < ${#scale[@]}; i += 2)); do expect+=("${scale[i]}"); done
wait_ready "${expect[@]}"
echo "compose_up: stack ready in $((SECONDS - t0))s (the gateway on ${HOST_BIND_ADDRESS}:${GATEWAY_HOST_PORT}, HTTP on ${HOST_BIND_ADDRESS}:${GATEWAY_HTTP_HOST_PORT})"
