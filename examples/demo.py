"""The Tessera demo: one story across the six services, in one trace.

    python examples/demo.py [--keep] [--small] [--address HOST:PORT]

A CartPole policy goes from rollouts to answers:

1. tasks and actors: expert rollout actors play simulated cart-poles in parallel and a task
   merges their states and actions into a dataset in the object store;
2. GPU scheduler: three training jobs (a learning-rate sweep) read that dataset by its id and
   train a small MLP, checkpointing into the object store every 50 mini-batches; three jobs on
   two GPU slots are time-sliced (suspended and resumed at mini-batch boundaries);
3. compiler: the best job's final checkpoint is compiled into fused C kernels and run;
4. serving: the policy is deployed beside 50 text pipelines and answers queries.

Everything runs under one root span, so the whole story is one trace: the SDKs, gRPC, NATS
(traceparent headers), the GPU job's process (``TRACEPARENT`` in its environment) and the
compile jobs taken from JetStream all continue it. The summary ends with the trace id.

Uses the cluster that ``tessera up`` started if one is running; otherwise starts one
(``tessera up --nodes 2 --gpus-per-node 1``, a 3 s time slice) and stops it at the end unless
``--keep``. Spans go to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a collector or Jaeger on :4317).
``--address`` runs it against a cluster somewhere else, e.g. the compose stack from its host
(``--address localhost:50051``: the gateway, through which every call then goes). ``--small`` tells the same story, with the same trace, in less time (fewer mini-batches and
text pipelines; the e2e test runs it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry import trace

import tessera
from tessera.common.telemetry import current_trace_id, setup_tracing, shutdown_tracing

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cartpole_policy as story  # noqa: E402

JOB_ENTRY = f"{HERE / 'cartpole_policy.py'}:train"
SWEEP = ("0.003", "0.01", "0.03")  # learning rates: three jobs on two GPU slots


@dataclass(frozen=True)
class Plan:
    episodes: int = 25  # per rollout actor (four actors)
    steps: int = 200  # mini-batches per training job
    checkpoint_every: int = 50
    step_sleep_s: float = 0.02  # a heavier model's mini-batch time, so that time slices show
    text_pipelines: int = 50


FULL, SMALL = Plan(), Plan(episodes=10, steps=120, checkpoint_every=40, step_sleep_s=0.02, text_pipelines=10)
REVIEWS = [
    ("the food was great and the staff friendly", "pos"), ("awful service, cold food", "neg"),
    ("loved the view, will come again", "pos"), ("rude waiter and a dirty table", "neg"),
    ("tasty, quick and cheap", "pos"), ("bland soup, slow kitchen", "neg"), ("great value, clean room", "pos"),
    ("never again, noisy and dirty", "neg"), ("friendly people, great coffee", "pos"), ("bad, bad, bad", "neg"),
    ("quiet room and a lovely breakfast", "pos"), ("overpriced and bland", "neg"),
]
PROBES = np.array([  # cart-pole states to ask the policy about: x, v, theta, omega
    [0.0, 0.0, 0.05, 0.0], [0.0, 0.0, -0.05, 0.0], [0.5, 0.2, 0.01, -0.3], [-0.3, -0.5, -0.02, 0.4],
    [1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0], [0.0, 0.3, -0.03, 0.2], [0.2, -0.1, 0.08, 0.5],
], dtype=np.float32)


def tessera_cli(*args: str, env: dict[str, str] | None = None) -> int:
    return subprocess.call([str(BIN / "tessera"), *args], env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    ap.add_argument("--small", action="store_true", help="fewer mini-batches and pipelines: the same story, faster")
    ap.add_argument("--address", help="a running cluster's control store or gateway (host:port); nothing is started")
    args = ap.parse_args()

    if args.address:  # every client below finds the cluster through TESSERA_ADDRESS
        os.environ["TESSERA_ADDRESS"] = args.address
        return run_demo(SMALL if args.small else FULL)
    started_here = False
    if tessera_cli("status") != 0:
        print("== bringing Tessera up: 2 nodes, 1 GPU slot each")
        env = {"TESSERA_GPU_SCHEDULER_QUANTUM_S": "3", **os.environ}
        if tessera_cli("up", "--nodes", "2", "--gpus-per-node", "1", env=env) != 0:
            return 1
        started_here = True
    try:
        return run_demo(SMALL if args.small else FULL)
    finally:
        if started_here and not args.keep:
            print("\n== stopping Tessera")
            tessera_cli("down")


Row = tuple[str, str, float, str]


def run_demo(plan: Plan = FULL, log: Callable[[str], None] = lambda line: print(line, flush=True)) -> int:
    setup_tracing("tessera-demo")
    tracer = trace.get_tracer("tessera.demo")
    rows: list[Row] = []
    out: dict[str, Any] = {}

    def step(name: str, service: str, fn: Callable[[], str]) -> None:
        log(f"\n== {name} ({service})")
        t0 = time.perf_counter()
        with tracer.start_as_current_span(name, attributes={"tessera.demo.service": service}):
            result = fn()
        rows.append((name, service, time.perf_counter() - t0, result))

    try:
        with tracer.start_as_current_span("tessera demo: a CartPole policy from rollouts to serving"):
            trace_id = current_trace_id()
            step("cluster", "control-store", lambda: cluster(log))
            tessera.init(name="tessera-demo")
            try:
                step("rollouts into a dataset", "task-scheduler", lambda: rollouts(plan, log, out))
                step("train, time-sliced", "gpu-scheduler", lambda: train(plan, log, out))
            finally:
                tessera.shutdown()
            step("compile the policy", "compiler", lambda: compile_policy(log, out))
            step("serve it beside text pipelines", "serving", lambda: serve(plan, log, out))
    finally:
        shutdown_tracing()

    print("\n== summary")
    width = max(len(r[0]) for r in rows)
    print(f"   {'step'.ljust(width)}  {'service':14} {'time':>6}  result")
    for name, service, dt, result in rows:
        print(f"   {name.ljust(width)}  {service:14} {dt:5.1f}s  {result}")
    print(f"\n   trace id: {trace_id}")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint:
        print(f"   spans exported to {endpoint}; in Jaeger: http://localhost:16686/trace/{trace_id}")
    else:
        print("   no spans exported: start Jaeger (docker run -d -p 4317:4317 -p 16686:16686 jaegertracing/jaeger),\n"
              "   then run the demo (and `tessera up`) with OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 and open\n"
              "   http://localhost:16686/trace/<trace id>")
    return 0


# ---------------------------------------------------------------------- the steps


def cluster(log: Callable[[str], None]) -> str:
    with tessera.connect() as c:
        services = sorted({i.service for i in c.instances()})
        log(f"   control store at {c.address}; registered services: {', '.join(services)}")
    return f"{len(services)} services registered"


def rollouts(plan: Plan, log: Callable[[str], None], out: dict[str, Any]) -> str:
    """Four expert actors play in parallel; a task merges what they saw into one dataset object."""
    actors = [story.ExpertRollouts.remote(i, 0.3) for i in range(4)]
    parts = [a.collect.remote(plan.episodes) for a in actors]
    dataset = story.merge.remote(*parts)
    n = len(tessera.get(dataset, timeout=120)["action"])
    for a in actors:
        tessera.kill(a)
    out["dataset"] = dataset
    log(f"   {len(actors)} rollout actors, {len(actors) * plan.episodes} episodes: {n} labelled states "
        f"in object {dataset.hex()[:16]}")
    return f"{n} states from {len(actors) * plan.episodes} episodes, object {dataset.hex()[:12]}"


def train(plan: Plan, log: Callable[[str], None], out: dict[str, Any]) -> str:
    """The sweep: one job per learning rate, all reading the dataset by id; time-sliced on two slots."""
    from tessera.gpu import GpuClient
    from tessera.gpu.client import job_to_dict

    done = ("SUCCEEDED", "FAILED", "KILLED")
    with GpuClient() as g:
        slots = sum(n.gpus for n in g.cluster().nodes if n.alive)
        ids = [g.submit(entry_point=JOB_ENTRY, name=f"policy-lr{lr}",
                        args=[out["dataset"].hex(), str(plan.steps), lr, "0", str(plan.step_sleep_s),
                              str(plan.checkpoint_every)])
               for lr in SWEEP]
        log(f"   {len(ids)} jobs on {slots} GPU slot(s), {plan.steps} mini-batches each, "
            f"a checkpoint every {plan.checkpoint_every}")
        def status() -> list[dict[str, Any]]:
            found = {j.job_id: job_to_dict(j) for j in g.list()}
            return [found[i] for i in ids]

        deadline, last = time.monotonic() + 240, 0.0
        while True:
            jobs = status()
            if all(j["state"] in done for j in jobs) or time.monotonic() > deadline:
                break
            if time.monotonic() - last >= 3.0:
                last = time.monotonic()
                log("   " + " | ".join(f"{j['name']} {j['state'].lower():9} {j['step']:3d}" for j in jobs))
            time.sleep(1.0)
        for j in jobs:
            if j["state"] not in done:
                g.kill(j["job_id"])
        # the last checkpoint lands in the object store as the job exits: wait for it
        end = time.monotonic() + 20
        while time.monotonic() < end and any(j["state"] == "SUCCEEDED" and j["checkpoint_step"] < plan.steps for j in jobs):
            time.sleep(0.5)
            jobs = status()
        for j in jobs:
            m = j["metrics"]
            log(f"   {j['name']}: {j['state']}, {j['step']} mini-batches, {j['suspensions']} suspensions, node "
                f"{str(j['node_id'])[:8]}, checkpoint of step {j['checkpoint_step']} in object "
                f"{j['checkpoint_object_id'][:12] or '-'}, accuracy "
                f"{m.get('accuracy', 0):.3f}, balances {m.get('balance', 0):.0f}/{story.MAX_STEPS} steps")
        ok = [j for j in jobs if j["state"] == "SUCCEEDED" and j["checkpoint_step"] >= plan.steps]
        if not ok:
            raise RuntimeError(f"no training job finished with its final checkpoint: {jobs}")
        best = max(ok, key=lambda j: (j["metrics"].get("balance", 0), j["metrics"].get("accuracy", 0)))
        out["state"] = g.checkpoint(best["job_id"])
        out["best"] = best
    suspensions = sum(j["suspensions"] for j in jobs)
    return (f"{len(ok)}/{len(jobs)} jobs done, {suspensions} suspensions; best {best['name']} "
            f"accuracy {best['metrics'].get('accuracy', 0):.3f}")


def compile_policy(log: Callable[[str], None], out: dict[str, Any]) -> str:
    """The best job's final checkpoint, compiled by a compiler replica and run there."""
    import torch

    from tessera.compiler.client import CompilerClient

    model = story.policy_model()
    model.load_state_dict(out["state"]["models"][0])
    model.eval()
    out["model"] = model
    x = torch.from_numpy(PROBES)
    with torch.no_grad():
        ref = model(x).numpy()
    with CompilerClient(timeout=300) as c:
        t0 = time.perf_counter()
        info = c.compile(model, [x])
        built = time.perf_counter() - t0
        (y,) = c.run(info.artifact_id, [PROBES])
    err = float(np.abs(y - ref).max())
    out["compiled_actions"] = y.argmax(1)
    log(f"   weights of step {out['state']['step']}: artifact {info.artifact_id[:12]} built by {info.compiled_by} "
        f"in {built:.1f}s, {len(info.kernels)} kernels ({', '.join(k.label for k in info.kernels)})")
    log(f"   run on the service: max |compiled - torch| = {err:.1e}")
    return f"{len(info.kernels)} kernels, max error {err:.0e}"


def serve(plan: Plan, log: Callable[[str], None], out: dict[str, Any]) -> str:
    """The policy as a Flour pipeline beside scikit-learn text pipelines that share one featurizer."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    from tessera.serving import Client, flour

    docs, labels = [d for d, _ in REVIEWS], np.array([y for _, y in REVIEWS])
    feat = FeatureUnion([("char", TfidfVectorizer(analyzer="char", ngram_range=(1, 3))),
                         ("word", TfidfVectorizer(ngram_range=(1, 2)))]).fit(docs)
    features = feat.transform(docs)
    names = [f"reviews-{i:02d}" for i in range(plan.text_pipelines)]
    f = flour.Flour()
    policy = f.build(f.numbers(*story.FIELDS).torch(out["model"], classes=list(story.ACTIONS)))
    with Client() as c:
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            head = LogisticRegression(C=0.5 + i * 0.2).fit(features, labels)
            c.register(name, Pipeline([("f", feat), ("m", head)]))
        c.register("cartpole-policy", policy)
        log(f"   registered {plan.text_pipelines} text pipelines and cartpole-policy on {len(c.addresses)} replica(s) "
            f"in {time.perf_counter() - t0:.1f}s; parameters held: {c.stats().param_bytes:,} bytes")
        try:
            answers = c.predict("cartpole-policy", [dict(zip(story.FIELDS, map(float, p), strict=True)) for p in PROBES])
            agree = sum(a.label == story.ACTIONS[int(k)] for a, k in zip(answers, out["compiled_actions"], strict=True))
            for p, a in list(zip(PROBES, answers, strict=True))[:4]:
                log(f"   x={p[0]:+.2f} v={p[1]:+.2f} theta={p[2]:+.3f} omega={p[3]:+.2f} -> push {a.label} "
                    f"(expert: {story.ACTIONS[story.expert_action(p)]})")
            texts = ["the staff was friendly but the soup was cold", "great coffee and a lovely view"]
            batch = c.predict_batch([(n, texts) for n in names[:3]])
            for t, *preds in zip(texts, *batch, strict=True):
                log(f"   {t!r}: " + ", ".join(f"{n} {p.label}" for n, p in zip(names[:3], preds, strict=True)))
        finally:
            for name in [*names, "cartpole-policy"]:
                c.unregister(name)
    return f"{plan.text_pipelines + 1} pipelines; policy answers agree with the compiled model {agree}/{len(PROBES)}"


if __name__ == "__main__":
    sys.exit(main())
