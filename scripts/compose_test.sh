#!/usr/bin/env bash
# The compose part of CI: run the compose e2e tests (e2e-tests/test_compose.py) against the
# real compose stack under podman, with two serving replicas, then tear the stack down.
#
#   scripts/compose_test.sh        # make compose-test; needs root and a Debian-like host
#
# Steps (each timed): podman setup (deploy/podman/setup.sh), base image (debootstrap),
# smoke test (a container runs on a compose-style network), image builds
# (scripts/compose_build.sh), `compose_up.sh --scale node=2 --scale serving=2`, pytest -m compose (the demo story from the host among them), down.
# Where podman cannot be installed or cannot run containers here, the compose part is
# reported as SKIPPED with the reason and the same tests run against `tessera up`
# instead. Once podman runs, any failure (build, start, a test) fails this script.
set -euo pipefail
# shellcheck source=scripts/compose_env.sh
. "$(dirname "${BASH_SOURCE[0]}")/compose_env.sh"

t0=$SECONDS
phase() { echo "compose_test: $1 ($((SECONDS - t0))s so far)"; }
tests() { "$PY" -m pytest -q -m compose e2e-tests/test_compose.py -rs "$@"; }
skip() {
  echo "compose: SKIPPED ($*)"
  echo "compose_test: running the compose e2e tests against \`tessera up\` instead"
  TESSERA_E2E_STACK=up tests
  exit $?
}

[ "$ENGINE" = podman ] || [ "$ENGINE" = docker ] || { echo "ENGINE must be podman or docker" >&2; exit 2; }
if [ "$ENGINE" = podman ]; then
  err=$(mktemp)
  if ! deploy/podman/setup.sh >/dev/null 2>"$err"; then
    reason=$(grep -v 'is neither a file nor a directory' "$err" | tail -n 3 | tr '\n' ' ')
    rm -f "$err"
    skip "${reason:-deploy/podman/setup.sh failed}"
  fi
  rm -f "$err"
  [ -x "$PODMAN_COMPOSE" ] || PODMAN_COMPOSE=$TESSERA_CACHE_DIR/podman-compose-venv/bin/podman-compose
  COMPOSE[0]=$PODMAN_COMPOSE
elif ! docker info >/dev/null 2>&1; then
  skip "no Docker engine answers (docker info failed)"
fi
phase "engine ready"

base=$(deploy/base/build-base.sh 2>/tmp/tessera-base.err) \
  || skip "the base image could not be built (debootstrap from this machine's apt sources): $(tail -n 3 /tmp/tessera-base.err | tr '\n' ' ')"
phase "base image $base"
smoke=tessera-smoke-$$
"$ENGINE" network create "$smoke" >/dev/null 2>&1 || true
if ! out=$(timeout 120 "$ENGINE" run --rm --network "$smoke" "$base" true 2>&1); then
  "$ENGINE" network rm -f "$smoke" >/dev/null 2>&1 || true
  skip "$ENGINE cannot run a container on a bridge network here: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
fi
"$ENGINE" network rm -f "$smoke" >/dev/null 2>&1 || true
phase "smoke test passed"

scripts/compose_build.sh
phase "images built"

scripts/compose_down.sh >/dev/null  # nothing left from an earlier run
# Where Jaeger's image cannot be pulled, the services' spans go to a receiver on the host (reached from the
# containers as host.containers.internal), whose span file the tests read to assert the trace edges.
sink=""
if ! have_image "$JAEGER_IMAGE"; then
  port=${OTLP_SINK_PORT:-14317}
  export TESSERA_E2E_OTLP_SPANS=${TMPDIR:-/tmp}/tessera-compose-spans-$$.jsonl
  : >"$TESSERA_E2E_OTLP_SPANS"
  "$PY" scripts/otlp_sink.py --port "$port" --out "$TESSERA_E2E_OTLP_SPANS" &
  sink=$!
  export OTEL_COLLECTOR_ENDPOINT=http://host.containers.internal:$port
  phase "no Jaeger image: spans go to the tests' receiver on port $port"
fi
on_exit() {
  rc=$?
  if [ "$rc" -ne 0 ]; then
    for c in $("$ENGINE" ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" 2>/dev/null); do
      echo "--- logs of $("$ENGINE" inspect --format '{{.Name}}' "$c")"
      "$ENGINE" logs --tail 30 "$c" 2>&1 || true
    done
  fi
  scripts/compose_down.sh
  [ -z "$sink" ] || kill "$sink" 2>/dev/null || true  # after the services flushed their last spans
  phase "stack down"
  exit "$rc"
}
trap on_exit EXIT
scripts/compose_up.sh --scale node=2 --scale serving=2
phase "stack up"

# the tests' clients (SDK, CLI, raw channels) send the stack's token
TESSERA_AUTH_TOKEN_FILE=$PWD/${TESSERA_SECRETS_DIR#./}/auth_token \
TESSERA_E2E_STACK=compose TESSERA_E2E_ENGINE=$ENGINE \
TESSERA_E2E_CONTROL_STORE=$HOST_BIND_ADDRESS:$GATEWAY_HOST_PORT \
TESSERA_E2E_JAEGER_URL=http://$HOST_BIND_ADDRESS:$JAEGER_UI_PORT \
  tests
phase "tests passed"
