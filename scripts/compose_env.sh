# Sourced by scripts/compose_*.sh: the engine, the compose command and .env's values.
#   ENGINE=podman (default) or docker; COMPOSE: the compose command for that engine.
# .env is read for defaults only: a variable already in the environment wins, as with compose.
# shellcheck shell=bash
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ENGINE=${ENGINE:-podman}
TESSERA_CACHE_DIR=${TESSERA_CACHE_DIR:-/var/cache/tessera}
while IFS='=' read -r key value; do
  case $key in ''|'#'*) continue ;; esac
  [ -n "${!key+x}" ] || export "$key=$value"
done < .env
if [ "$ENGINE" = podman ]; then
  PODMAN_COMPOSE=${PODMAN_COMPOSE:-$TESSERA_CACHE_DIR/podman-compose-venv/bin/podman-compose}
  [ -x "$PODMAN_COMPOSE" ] || PODMAN_COMPOSE=$(command -v podman-compose || true)
  COMPOSE=("$PODMAN_COMPOSE" --in-pod=false -p "$COMPOSE_PROJECT_NAME" -f docker-compose.yml)
else
  COMPOSE=(docker compose -p "$COMPOSE_PROJECT_NAME" -f docker-compose.yml)
fi
# Every image of the Dockerfile (compose_build.sh builds them all): the services, gateway and node.
TESSERA_IMAGES=(control-store task-scheduler compiler gpu-scheduler serving gateway dashboard node object-store)
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# An image the engine has, or can pull now (quietly, bounded).
have_image() {
  "$ENGINE" image inspect "$1" >/dev/null 2>&1 || timeout 120 "$ENGINE" pull -q "$1" >/dev/null 2>&1
}
