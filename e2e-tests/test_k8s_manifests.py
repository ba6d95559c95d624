"""The Kubernetes manifests (deploy/k8s): render the base and both overlays and check what the
deployment relies on. Offline and fast: rendered with scripts/kustomize_lite.py (no kubectl, no
network); where kubectl is installed, its rendering must give the same objects. The schema
validation itself is `make k8s-validate` (scripts/k8s_validate.sh).
"""

from __future__ import annotations

import base64
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
TARGETS = ["base", "overlays/dev", "overlays/gpu"]
HEAD = {"control-store": 50051, "task-scheduler": 50053, "compiler": 50054, "gpu-scheduler": 50055,
        "serving": 50056, "gateway": 50050, "dashboard": 50059}
# what scripts/compose_secrets.sh writes: the generator reads these names
SECRET_FILES = {
    "auth_token": "test-token\n",
    "nats_password": "test-nats-password\n",
    "redis_password": "test-redis-password\n",
    "nats.conf": 'authorization {\n  users = [\n    { user: "tessera", password: "test-nats-password" }\n  ]\n}\n',
    "redis.conf": "requirepass test-redis-password\n",
}

_spec = importlib.util.spec_from_file_location("kustomize_lite", ROOT / "scripts" / "kustomize_lite.py")
assert _spec is not None and _spec.loader is not None
kl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kl)

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s with throwaway credentials where compose_secrets.sh puts them."""
    d = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, d, ignore=shutil.ignore_patterns("secrets"))
    (d / "base" / "secrets").mkdir()
    for name, text in SECRET_FILES.items():
        (d / "base" / "secrets" / name).write_text(text)
    return d


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[Obj]]:
    return {t: kl.build(tree / t) for t in TARGETS}


def by_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def tessera_containers(objs: list[Obj]) -> list[tuple[Obj, Obj]]:
    """(workload, container) of every container running a Tessera image."""
    return [(w, c) for w in workloads(objs) for c in w["spec"]["template"]["spec"]["containers"]
            if c["image"].startswith("tessera/")]


def env(container: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def quantity(q: str | int) -> int:
    """Bytes of a Kubernetes memory quantity (the binary and decimal suffixes used here)."""
    s = str(q)
    for suffix, mult in (("Ki", 1024), ("Mi", 1024**2), ("Gi", 1024**3), ("k", 1000), ("M", 1000**2), ("G", 1000**3)):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


@pytest.mark.parametrize("target", TARGETS)
def test_node_daemonset_shares_a_memory_backed_dev_shm_large_enough(rendered: dict[str, list[Obj]], target: str) -> None:
    ds = by_kind(rendered[target], "DaemonSet")["node"]
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].startswith("tessera/node:") and c["command"] == ["tessera", "node"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    arena = int(env(c)["TESSERA_OBJECT_STORE_MEMORY"])
    # the arena fits in /dev/shm, and /dev/shm (its pages count against the pod) in the memory limit
    assert arena < quantity(shm["sizeLimit"]) < quantity(c["resources"]["limits"]["memory"])
    # the spill directory is writable (the root filesystem is not) and as large as the capacity given
    spill = volumes[mounts[env(c)["TESSERA_OBJECT_STORE_SPILL_DIR"]]]["emptyDir"]
    assert int(env(c)["TESSERA_OBJECT_STORE_SPILL_CAPACITY"]) <= quantity(spill["sizeLimit"])
    assert {p["containerPort"] for p in c["ports"]} == {50052, 50053, 50057, 50058}
    assert env(c)["TESSERA_OBJECT_STORE_TRANSFER_PORT"] == "50058"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50053, probe


@pytest.mark.parametrize("target", TARGETS)
def test_head_services_are_deployments_with_grpc_probes_and_services(rendered: dict[str, list[Obj]], target: str) -> None:
    deployments = by_kind(rendered[target], "Deployment")
    services = by_kind(rendered[target], "Service")
    assert set(deployments) == set(HEAD)
    for name, port in HEAD.items():
        pod = deployments[name]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["image"].startswith(f"tessera/{name}:")
        assert env(c)["TESSERA_GRPC_PORT"] == str(port)
        assert env(c)["OTEL_SERVICE_NAME"] == name
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, (name, probe)
        svc = services[name]
        assert svc["spec"]["type"] == "ClusterIP"
        assert any(p["port"] == port for p in svc["spec"]["ports"])
    assert env(deployments["task-scheduler"]["spec"]["template"]["spec"]["containers"][0])[
        "TESSERA_TASK_SCHEDULER_ROLE"] == "global"
    gw = services["gateway"]["spec"]["ports"]
    assert sorted(p["port"] for p in gw) == [8000, 50050]
    (serving,) = deployments["serving"]["spec"]["template"]["spec"]["containers"]
    assert env(serving)["TESSERA_SERVING_HTTP_PORT"] == "8000"
    (gateway,) = deployments["gateway"]["spec"]["template"]["spec"]["containers"]
    assert env(gateway)["TESSERA_GATEWAY_HTTP_PORT"] == "8000"
    (dashboard,) = deployments["dashboard"]["spec"]["template"]["spec"]["containers"]
    assert env(dashboard)["TESSERA_DASHBOARD_PORT"] == "8265"
    assert sorted(p["port"] for p in services["dashboard"]["spec"]["ports"]) == [8265, 50059]


@pytest.mark.parametrize("target", TARGETS)
def test_control_store_stays_one_replica(rendered: dict[str, list[Obj]], target: str) -> None:
    cs = by_kind(rendered[target], "Deployment")["control-store"]["spec"]
    assert cs["replicas"] == 1
    assert cs["strategy"]["type"] == "Recreate"  # a rollout never runs two


@pytest.mark.parametrize("target", TARGETS)
def test_services_select_their_pods_and_name_real_ports(rendered: dict[str, list[Obj]], target: str) -> None:
    objs = rendered[target]
    for svc in by_kind(objs, "Service").values():
        sel = svc["spec"]["selector"]
        matched = [w for w in workloads(objs) if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, svc["metadata"]["name"]
        (w,) = matched
        assert sel.items() <= w["spec"]["selector"]["matchLabels"].items()
        port_names = {p.get("name") for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names, (svc["metadata"]["name"], p)


@pytest.mark.parametrize("target", TARGETS)
def test_nats_jetstream_and_redis_aof_are_statefulsets_on_volumes(rendered: dict[str, list[Obj]], target: str) -> None:
    objs = rendered[target]
    sts = by_kind(objs, "StatefulSet")
    services = by_kind(objs, "Service")
    assert set(sts) == {"nats", "redis"}
    for name, s in sts.items():
        assert services[s["spec"]["serviceName"]]["spec"]["clusterIP"] == "None", name
        (claim,) = s["spec"]["volumeClaimTemplates"]
        (c,) = s["spec"]["template"]["spec"]["containers"]
        assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/data"] == claim["metadata"]["name"]
    nats_args = sts["nats"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "-js" in nats_args and nats_args[nats_args.index("-sd") + 1] == "/data"
    redis_args = sts["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    # the addresses every Tessera process is given name these Services and ports
    cfg = by_kind(objs, "ConfigMap")["tessera-config"]["data"]
    assert cfg["TESSERA_NATS_URL"] == "nats://nats:4222"
    assert cfg["TESSERA_REDIS_URLS"] == "redis://redis:6379/0"
    assert cfg["TESSERA_CONTROL_STORE_ADDRESS"] == f"control-store:{HEAD['control-store']}"


def test_gpu_overlay_requests_gpus_and_dev_uses_virtual_slots(rendered: dict[str, list[Obj]]) -> None:
    def node(target: str) -> Obj:
        return by_kind(rendered[target], "DaemonSet")["node"]["spec"]["template"]["spec"]["containers"][0]

    gpu = node("overlays/gpu")
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(gpu)["TESSERA_NUM_GPUS"] == "1"
    assert "TESSERA_GPUS_PER_NODE" not in env(gpu)
    dev = node("overlays/dev")
    assert env(dev)["TESSERA_GPUS_PER_NODE"] == "1"
    assert "nvidia.com/gpu" not in dev["resources"].get("limits", {})
    assert int(env(dev)["TESSERA_OBJECT_STORE_MEMORY"]) < int(env(gpu)["TESSERA_OBJECT_STORE_MEMORY"])


def test_dev_overlay_runs_one_replica_of_each_head_service_from_loaded_images(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/dev"]
    assert {n: d["spec"]["replicas"] for n, d in by_kind(objs, "Deployment").items()} == dict.fromkeys(HEAD, 1)
    for w in workloads(objs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert c["imagePullPolicy"] == "IfNotPresent", w["metadata"]["name"]
    # the base scales the stateless front ends
    base = by_kind(rendered["base"], "Deployment")
    assert base["serving"]["spec"]["replicas"] == base["gateway"]["spec"]["replicas"] == 2


@pytest.mark.parametrize("target", TARGETS)
def test_tessera_containers_run_locked_down_with_otel_from_the_configmap(rendered: dict[str, list[Obj]], target: str) -> None:
    objs = rendered[target]
    cfg = by_kind(objs, "ConfigMap")["tessera-config"]["data"]
    assert cfg["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    pairs = tessera_containers(objs)
    assert len(pairs) == len(HEAD) + 1
    for w, c in pairs:
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001, name
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert {"configMapRef": {"name": "tessera-config"}} in c["envFrom"], name
        # set once, in the ConfigMap: no container overrides the collector or an address
        own = env(c)
        assert not {k for k in own if k.startswith("OTEL_EXPORTER_")}, name
        assert not {"TESSERA_NATS_URL", "TESSERA_REDIS_URLS", "TESSERA_CONTROL_STORE_ADDRESS"} & own.keys(), name
        assert own["TESSERA_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}, name
        # with a read-only root, $HOME and /tmp are writable emptyDirs
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for path in ("/tmp", "/home/tessera"):
            assert "emptyDir" in volumes[mounts[path]], (name, path)
    for w in workloads(objs):  # NATS and Redis too
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert w["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("target", TARGETS)
def test_every_credential_file_is_mounted_from_a_secret(rendered: dict[str, list[Obj]], target: str) -> None:
    objs = rendered[target]
    cfg = by_kind(objs, "ConfigMap")["tessera-config"]["data"]
    secrets = by_kind(objs, "Secret")
    for w, c in tessera_containers(objs):
        files = {k: v for k, v in {**cfg, **env(c)}.items() if k.endswith("_FILE")}
        assert "TESSERA_AUTH_TOKEN_FILE" in files and "TESSERA_NATS_PASSWORD_FILE" in files
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        for var, path in files.items():
            mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            src = volumes[mount["name"]]["secret"]
            item = path[len(mount["mountPath"]) + 1:]
            keys = {i["path"]: i["key"] for i in src.get("items", [])} or {k: k for k in secrets[src["secretName"]]["data"]}
            assert keys[item] in secrets[src["secretName"]]["data"], (w["metadata"]["name"], var)
    assert "TESSERA_REDIS_PASSWORD_FILE" in env(by_kind(objs, "Deployment")["control-store"]["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize("target", TARGETS)
def test_secret_values_come_only_from_the_generated_files(rendered: dict[str, list[Obj]], target: str) -> None:
    secrets = by_kind(rendered[target], "Secret")
    assert set(secrets) == {"tessera-credentials", "nats-config", "redis-config"}
    seen = {}
    for s in secrets.values():
        for key, value in s["data"].items():
            seen[key] = base64.b64decode(value).decode()
    assert seen == SECRET_FILES
    assert "authorization" in seen["nats.conf"] and seen["redis.conf"].startswith("requirepass ")


def test_no_secret_value_is_committed() -> None:
    for f in K8S.rglob("*.yaml"):
        if "secrets" in f.relative_to(K8S).parts:
            continue
        docs = [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
        assert not [d for d in docs if d.get("kind") == "Secret"], f"{f}: a Secret written into a manifest"
        for d in docs:
            for gen in d.get("secretGenerator") or []:
                assert "literals" not in gen and "envs" not in gen, f"{f}: {gen['name']}"
                assert all(str(p).startswith("secrets/") for p in gen["files"]), f"{f}: {gen['name']}"
    assert (K8S / "base" / ".gitignore").read_text().split() == ["secrets/"]
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "deploy/k8s/base/secrets"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=30, check=True).stdout
        assert tracked == ""
        ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/k8s/base/secrets/auth_token"], cwd=ROOT,
                                 timeout=30)
        assert ignored.returncode == 0


def test_missing_credentials_fail_naming_the_command(tmp_path: Path) -> None:
    d = tmp_path / "k8s"
    shutil.copytree(K8S, d, ignore=shutil.ignore_patterns("secrets"))
    with pytest.raises(kl.KustomizeError, match=r"secrets/auth_token does not exist.*scripts/compose_secrets\.sh"):
        kl.build(d / "overlays" / "dev")


def test_images_are_tagged_in_one_place(rendered: dict[str, list[Obj]]) -> None:
    images = {c["image"] for _, c in tessera_containers(rendered["overlays/dev"])}
    assert images == {f"tessera/{n}:0.1.0" for n in [*HEAD, "node"]}
    for f in K8S.rglob("*.yaml"):
        if f.name != "kustomization.yaml":  # the manifests name images without a tag
            assert ":0.1.0" not in f.read_text(), f


@pytest.mark.parametrize("body, what", [
    ("commonLabels: {a: b}\n", "commonLabels"),
    ("replicas: [{name: serving, count: 3}]\n", "replicas"),
    ("patches: [{path: p.yaml, target: {kind: Deployment}}]\n", "only one of path or patch"),
    ("configMapGenerator: [{name: c, envs: [x.env]}]\n", "envs"),
    ("configMapGenerator: [{name: c, literals: [A=1]}]\n", "disableNameSuffixHash"),
    ("resources: [https://example.com/x.yaml]\n", "remote resources"),
])
def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path, body: str, what: str) -> None:
    (tmp_path / "kustomization.yaml").write_text(body)
    with pytest.raises(kl.KustomizeError, match=what):
        kl.build(tmp_path)


def test_strategic_merge_follows_kustomize() -> None:
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
                            "args": ["-a"], "resources": {"limits": {"memory": "1Gi", "cpu": "1"}}}]}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}],
                             "args": ["-b"], "resources": {"limits": {"cpu": None}}}]}
    (c,) = kl._merge(base, patch)["containers"]
    # keyed lists merge (patch's elements first), other lists are replaced, null deletes
    assert c["env"] == [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}, {"name": "X", "value": "1"}]
    assert c["args"] == ["-b"]
    assert c["resources"] == {"limits": {"memory": "1Gi"}}


def _kubectl() -> str | None:
    return shutil.which("kubectl") or next(
        (str(p) for p in [ROOT / ".venv-k8s" / "bin" / "kubectl"] if p.is_file()), None)


@pytest.mark.skipif(_kubectl() is None, reason="no kubectl here (make k8s-validate installs one in .venv-k8s)")
@pytest.mark.parametrize("target", TARGETS)
def test_the_renderer_agrees_with_kubectl_kustomize(tree: Path, rendered: dict[str, list[Obj]], target: str) -> None:
    out = subprocess.run([str(_kubectl()), "kustomize", str(tree / target)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    theirs = [d for d in yaml.safe_load_all(out) if d]
    for o in theirs:  # kustomize folds long base64 lines; the API ignores the line breaks
        if o["kind"] == "Secret":
            o["data"] = {k: "".join(v.split()) for k, v in o["data"].items()}
    assert [(o["kind"], o["metadata"]["name"]) for o in theirs] == \
        [(o["kind"], o["metadata"]["name"]) for o in rendered[target]]
    assert theirs == rendered[target]
