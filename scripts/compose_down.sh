#!/usr/bin/env bash
# Stop and remove the compose stack: containers, network and volumes (NATS and Redis data).
#   scripts/compose_down.sh
set -euo pipefail
# shellcheck source=scripts/compose_env.sh
. "$(dirname "${BASH_SOURCE[0]}")/compose_env.sh"

"${COMPOSE[@]}" down -v -t 10 >/dev/null 2>&1 || true
# Whatever compose left (a replica it no longer knows of after a --scale change).
left=$("$ENGINE" ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" 2>/dev/null || true)
if [ -n "$left" ]; then
  # shellcheck disable=SC2086
  "$ENGINE" rm -f -t 10 $left >/dev/null
fi
for v in nats-data redis-data; do
  "$ENGINE" volume rm -f "${COMPOSE_PROJECT_NAME}_$v" >/dev/null 2>&1 || true
done
"$ENGINE" network rm -f "${COMPOSE_PROJECT_NAME}_default" >/dev/null 2>&1 || true
echo "compose_down: done"
