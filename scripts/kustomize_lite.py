#!/usr/bin/env python3
"""Render a kustomization as `kubectl kustomize DIR` does, for the few kustomize features Tessera's
manifests (deploy/k8s) use, so they can be rendered and checked where neither kubectl nor
kustomize is installed (the default test suite, offline).

    python scripts/kustomize_lite.py deploy/k8s/overlays/dev > dev.yaml

Supported, and nothing else (anything else fails with a message naming it, never a silent
difference from kustomize):
  resources            YAML files (several documents each) and directories holding a kustomization
  namespace            set on every namespaced object
  labels               `pairs` added to metadata.labels (not to selectors nor templates)
  images               name -> newName / newTag / digest, on the containers of pod templates
  patches              strategic merge patches (`path:` or inline `patch:`) that name their target
                       by kind and metadata.name: Deployments, DaemonSets, StatefulSets
  configMapGenerator   `literals` and `files`; behavior create, merge or replace
  secretGenerator      the same, type Opaque
  generatorOptions     only `disableNameSuffixHash: true` (no content hash in generated names)

scripts/k8s_validate.sh renders with this only where neither kubectl nor kustomize is found, and
e2e-tests/test_k8s_manifests.py checks that both give the same objects where kubectl is.
"""

from __future__ import annotations

import base64
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches",
                  "configMapGenerator", "secretGenerator", "generatorOptions"}
# Kinds whose namespace and label rules are known here; cluster-scoped ones get no namespace.
SUPPORTED_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "DaemonSet", "StatefulSet"}
CLUSTER_SCOPED = {"Namespace"}
PATCHABLE_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}
WORKLOAD_KINDS = PATCHABLE_KINDS
# Strategic merge: the lists of a pod template that merge element by element on a key (the
# patchMergeKey of the Kubernetes API); every other list is replaced whole, as the API does.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
# kustomize's default ("legacy") output order: these kinds first, in this order, then the rest.
ORDER_FIRST = ["Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
               "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
               "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
               "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget"]


class KustomizeError(Exception):
    """A kustomization this renderer cannot render (a missing file, or a feature it lacks)."""


def _load_docs(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or not (d.get("metadata") or {}).get("name"):
            raise KustomizeError(f"{path}: every document must be an object with kind and metadata.name")
    return docs


def _kustomization(root: Path) -> Obj:
    for name in KUSTOMIZATION_FILES:
        if (root / name).is_file():
            k = yaml.safe_load((root / name).read_text()) or {}
            unknown = sorted(set(k) - SUPPORTED_KEYS)
            if unknown:
                raise KustomizeError(f"{root / name}: {', '.join(unknown)}: not supported by kustomize_lite "
                                     "(use kubectl kustomize, or keep the manifests to the features it lists)")
            return k
    raise KustomizeError(f"{root}: no kustomization.yaml")


def _key(o: Obj) -> tuple[str, str]:
    return o["kind"], o["metadata"]["name"]


def _generated(root: Path, gen: Obj, kind: str) -> Obj:
    unknown = sorted(set(gen) - {"name", "literals", "files", "behavior", "type"})
    if unknown:
        raise KustomizeError(f"{root}: {kind} generator {gen.get('name')!r}: {', '.join(unknown)}: not supported")
    if kind == "ConfigMap" and "type" in gen:
        raise KustomizeError(f"{root}: ConfigMap generator {gen['name']!r}: type: not supported")
    data: dict[str, str] = {}
    for lit in gen.get("literals") or []:
        k, sep, v = str(lit).partition("=")
        if not sep or not k:
            raise KustomizeError(f"{root}: {kind} {gen['name']!r}: literal {lit!r} is not KEY=VALUE")
        data[k] = v
    for entry in gen.get("files") or []:
        k, sep, rel = str(entry).partition("=")
        if not sep:
            k, rel = Path(entry).name, entry
        f = root / rel
        if not f.is_file():
            raise KustomizeError(
                f"{kind} {gen['name']!r}: {f} does not exist. The credentials are generated, never committed: "
                f"run `TESSERA_SECRETS_DIR={f.parent} scripts/compose_secrets.sh` first")
        data[k] = f.read_text()
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}}
    if kind == "Secret":
        obj["type"] = gen.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        obj["data"] = data
    return obj


def _generate(root: Path, k: Obj, objs: list[Obj]) -> None:
    opts = k.get("generatorOptions") or {}
    if set(opts) - {"disableNameSuffixHash"}:
        raise KustomizeError(f"{root}: generatorOptions: only disableNameSuffixHash is supported")
    for field, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for gen in k.get(field) or []:
            new = _generated(root, gen, kind)
            behavior = gen.get("behavior", "create")
            existing = [o for o in objs if _key(o) == _key(new)]
            if behavior == "create":
                if existing:
                    raise KustomizeError(f"{root}: {kind} {new['metadata']['name']!r} exists already "
                                         "(behavior: merge or replace)")
                if opts.get("disableNameSuffixHash") is not True:
                    raise KustomizeError(f"{root}: generated names with a content hash are not supported: "
                                         "set generatorOptions.disableNameSuffixHash: true")
                objs.append(new)
            elif behavior in ("merge", "replace"):
                if not existing:
                    raise KustomizeError(f"{root}: {kind} {new['metadata']['name']!r}: nothing to {behavior}")
                old = existing[0]
                old["data"] = {**(old.get("data") or {}), **new["data"]} if behavior == "merge" else new["data"]
            else:
                raise KustomizeError(f"{root}: {kind} generator behavior {behavior!r}: not supported")


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (a copy): maps merge, null deletes, keyed lists merge."""
    if isinstance(patch, dict) and isinstance(base, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if str(k).startswith("$"):
                raise KustomizeError(f"strategic merge directive {k!r}: not supported")
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and field in MERGE_KEYS:
        # As kustomize orders them: the patch's elements first (merged into their match, in
        # the patch's order), then the base's elements the patch does not name.
        key = MERGE_KEYS[field]
        out_list = []
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"patch: an element of {field} lacks its merge key {key!r}")
            hits = [b for b in base if isinstance(b, dict) and b.get(key) == item[key]]
            out_list.append(_merge(hits[0], item, field) if hits else copy.deepcopy(item))
        named = {item[key] for item in patch}
        out_list.extend(copy.deepcopy(b) for b in base if not (isinstance(b, dict) and b.get(key) in named))
        return out_list
    return copy.deepcopy(patch)


def _patch(root: Path, k: Obj, objs: list[Obj]) -> None:
    for entry in k.get("patches") or []:
        unknown = sorted(set(entry) - {"path", "patch"})
        if unknown or len(entry) != 1:
            raise KustomizeError(f"{root}: patches entry {entry!r}: only one of path or patch, without target "
                                 "or options, is supported (a strategic merge patch names its object)")
        text = (root / entry["path"]).read_text() if "path" in entry else entry["patch"]
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict) or doc.get("kind") not in PATCHABLE_KINDS:
                raise KustomizeError(f"{root}: patch {entry}: only strategic merge patches of "
                                     f"{', '.join(sorted(PATCHABLE_KINDS))} are supported")
            hits = [i for i, o in enumerate(objs) if _key(o) == _key(doc)]
            if len(hits) != 1:
                raise KustomizeError(f"{root}: patch target {doc['kind']}/{doc['metadata'].get('name')}: "
                                     f"{len(hits)} objects match")
            objs[hits[0]] = _merge(objs[hits[0]], doc)


def _split_image(image: str) -> tuple[str, str, str]:
    """``name[:tag][@digest]`` -> (name, tag, digest); a registry's port is part of the name."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1:], digest
    return rest, "", digest


def _images(root: Path, k: Obj, objs: list[Obj]) -> None:
    for img in k.get("images") or []:
        unknown = sorted(set(img) - {"name", "newName", "newTag", "digest"})
        if unknown:
            raise KustomizeError(f"{root}: images entry {img.get('name')!r}: {', '.join(unknown)}: not supported")
        for o in objs:
            if o["kind"] not in WORKLOAD_KINDS:
                continue
            spec = o["spec"]["template"]["spec"]
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                name, tag, digest = _split_image(c["image"])
                if name != img["name"]:
                    continue
                name = img.get("newName", name)
                if "digest" in img:
                    c["image"] = f"{name}@{img['digest']}"
                elif "newTag" in img:
                    c["image"] = f"{name}:{img['newTag']}"
                else:
                    c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def build(root: Path) -> list[Obj]:
    """The objects the kustomization in ``root`` renders to, in kustomize's output order."""
    k = _kustomization(root)
    objs: list[Obj] = []
    for res in k.get("resources") or []:
        p = root / res
        if p.is_dir():
            objs.extend(build(p))
        elif p.is_file():
            objs.extend(_load_docs(p))
        else:
            raise KustomizeError(f"{root}: resource {res!r} is neither a file nor a directory here "
                                 "(remote resources are not supported)")
    for o in objs:
        if o["kind"] not in SUPPORTED_KINDS:
            raise KustomizeError(f"{root}: kind {o['kind']}: not supported by kustomize_lite")
    _generate(root, k, objs)
    _patch(root, k, objs)
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    for entry in k.get("labels") or []:
        if set(entry) - {"pairs"}:
            raise KustomizeError(f"{root}: labels: only pairs (no includeSelectors/includeTemplates) is supported")
        for o in objs:
            o["metadata"].setdefault("labels", {}).update({str(a): str(b) for a, b in entry["pairs"].items()})
    _images(root, k, objs)
    if len({_key(o) for o in objs}) != len(objs):
        raise KustomizeError(f"{root}: two objects share a kind and name")

    def order(o: Obj) -> tuple[int, str, str, str]:
        rank = ORDER_FIRST.index(o["kind"]) if o["kind"] in ORDER_FIRST else len(ORDER_FIRST)
        return rank, o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]

    return sorted(objs, key=order)


def render(root: Path) -> str:
    return yaml.safe_dump_all(build(root), sort_keys=True, default_flow_style=False)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: kustomize_lite.py DIR", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(render(Path(argv[0])))
    except KustomizeError as e:
        print(f"kustomize_lite: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
