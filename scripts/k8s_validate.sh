#!/usr/bin/env bash
# Validate the Kubernetes manifests (deploy/k8s) offline: render the base and each overlay as
# `kubectl apply -k` would, then check every object against the Kubernetes JSON schemas of the
# release(s) in K8S_VERSIONS, strictly (an unknown field fails, as `kubectl apply` rejects it).
#
#   scripts/k8s_validate.sh                          # make k8s-validate
#   K8S_VERSIONS=1.33.0 scripts/k8s_validate.sh     # another release (1.25.0 to 1.37.0 are bundled)
#   K8S_RENDERER=lite scripts/k8s_validate.sh        # force the Python renderer
#
# Rendering: `kubectl kustomize` where kubectl is on PATH, else `kustomize build`, else the
# kubectl of the tool venv, else scripts/kustomize_lite.py (K8S_RENDERER=kubectl|kustomize|lite
# picks one). Whenever a real kustomize renders, the Python renderer renders too and its
# output is validated the same way (e2e-tests/test_k8s_manifests.py checks the two agree).
#
# The tools live in their own venv, K8S_TOOLS_VENV (default .venv-k8s, gitignored), installed
# from deploy/k8s/tools-requirements.txt the first time (from PyPI); after that no network is
# used: kubernetes-validate carries the schemas. The credentials the manifests need are generated
# afresh (scripts/compose_secrets.sh) into a copy of deploy/k8s in a temporary folder, never into
# the checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}  # the oldest release targeted (grpc probes are GA since 1.27) and the newest bundled
VENV=${K8S_TOOLS_VENV:-.venv-k8s}
REQS=deploy/k8s/tools-requirements.txt
PYTHON=${PYTHON:-python3}

if ! cmp -s "$REQS" "$VENV/.requirements" 2>/dev/null; then
  echo "k8s_validate: installing $(grep -v '^#' "$REQS" | tr '\n' ' ')into $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQS"
  cp "$REQS" "$VENV/.requirements"
fi
TOOLPY="$VENV/bin/python"

renderer=${K8S_RENDERER:-}
if [ -z "$renderer" ]; then
  if command -v kubectl >/dev/null 2>&1; then renderer=kubectl
  elif command -v kustomize >/dev/null 2>&1; then renderer=kustomize
  elif [ -x "$VENV/bin/kubectl" ]; then renderer=venv-kubectl
  else renderer=lite
  fi
fi
render() {  # render DIR with the chosen renderer
  case $renderer in
    kubectl) kubectl kustomize "$1" ;;
    kustomize) kustomize build "$1" ;;
    venv-kubectl) "$VENV/bin/kubectl" kustomize "$1" ;;
    lite) "$TOOLPY" scripts/kustomize_lite.py "$1" ;;
    *) echo "k8s_validate: K8S_RENDERER=$renderer: not one of kubectl, kustomize, venv-kubectl, lite" >&2; exit 2 ;;
  esac
}
case $renderer in
  kubectl) echo "k8s_validate: rendering with $(kubectl version --client 2>/dev/null | tr '\n' ' ')" ;;
  venv-kubectl) echo "k8s_validate: rendering with $("$VENV/bin/kubectl" version --client 2>/dev/null | tr '\n' ' ')" ;;
  kustomize) echo "k8s_validate: rendering with kustomize $(kustomize version 2>/dev/null)" ;;
  lite) echo "k8s_validate: rendering with scripts/kustomize_lite.py" ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r deploy/k8s "$work/k8s"
rm -rf "$work/k8s/base/secrets"
TESSERA_SECRETS_DIR="$work/k8s/base/secrets" scripts/compose_secrets.sh >/dev/null

count() {  # objects in a rendered file
  "$TOOLPY" -c 'import sys, yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$1"
}
status=0
for target in base overlays/dev overlays/gpu; do
  name=${target##*/}
  outs=("$work/$name.yaml")
  render "$work/k8s/$target" > "$work/$name.yaml"
  if [ "$renderer" != lite ]; then
    "$TOOLPY" scripts/kustomize_lite.py "$work/k8s/$target" > "$work/$name.lite.yaml"
    outs+=("$work/$name.lite.yaml")
  fi
  for out in "${outs[@]}"; do
    n=$(count "$out")
    for version in $VERSIONS; do
      if log=$("$VENV/bin/kubernetes-validate" --strict -k "$version" "$out" 2>&1); then
        passed=$(grep -c 'passed for resource' <<<"$log" || true)
        if [ "$passed" -ne "$n" ]; then
          printf '%s\n' "$log" >&2
          echo "k8s_validate: $target ($(basename "$out")): $passed of $n objects validated against $version" >&2
          status=1
        else
          echo "k8s_validate: $target ($(basename "$out")): $n objects valid against Kubernetes $version (strict)"
        fi
      else
        grep -v 'passed for resource' <<<"$log" >&2 || true
        echo "k8s_validate: $target ($(basename "$out")): INVALID against Kubernetes $version" >&2
        status=1
      fi
    done
  done
done
exit $status
