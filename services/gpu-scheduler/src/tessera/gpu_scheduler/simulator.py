"""Discrete-event simulator: replays a trace through a :mod:`policy` with modelled costs.

Events are arrivals, completions and scheduling ticks (one per quantum while jobs
are in the system). At each event the policy is asked where jobs should run, and the
difference is applied with the costs of :mod:`profiles`: a resumed job spends its
suspend + resume time holding its GPUs without progress, a migrated job its
migration time; packed jobs run at their profiled packed speed, spread jobs at
``CROSS_NODE`` speed. Deterministic: the same trace, policy and seed give the same
numbers (the seed draws each job's final accuracy for early feedback).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tessera.gpu_scheduler import profiles
from tessera.gpu_scheduler.policy import JobView, Node, Policy, nodes_of, plan_actions
from tessera.gpu_scheduler.trace import TraceJob

METRICS = """\
metrics (times from the first arrival; JCT = finish - arrival):
  utilization   useful GPU compute / (GPUs x makespan). Useful compute of a job is what the progress it
                made would use alone, local, on the GPUs it asked for: progress x GPUs asked x the
                application's profiled utilization (profiles.py). Packing counts by the progress both jobs
                make; GPUs a grown job holds beyond its ask count only by the speed-up they give; a job
                restoring (suspend/resume, migration) or slowed by a spread placement counts only what it
                gets done. The numerator is the same for every policy: the ratio of two policies'
                utilizations is the inverse ratio of their makespans.
  allocation    GPU-time held by jobs / (GPUs x makespan); allocation_while_waiting: the same over the
                time some job waits.
  queueing      first start - arrival; time to first feedback: per group, arrival of its first job to
                the first accuracy report of its last."""

FEEDBACK_EVERY = 0.05  # a job reports accuracy every 5% of its work (an epoch-like evaluation)
EPS = 1e-9


@dataclass
class _Job:
    view: JobView
    app: str
    work: float  # seconds alone at the GPUs asked for
    quality: float  # final accuracy
    remaining: float = 0.0
    overhead_until: float = 0.0
    first_start: float | None = None
    first_feedback: float | None = None
    finish: float | None = None
    next_feedback: float = FEEDBACK_EVERY
    suspended_once: bool = False

    def progress(self) -> float:
        return 1.0 - self.remaining / self.work


@dataclass
class SimResult:
    policy: str
    gpus: int
    jobs: int
    avg_jct_h: float
    median_jct_h: float
    p95_jct_h: float
    makespan_h: float
    utilization: float
    allocation: float
    allocation_while_waiting: float
    avg_queueing_delay_h: float
    groups: int
    avg_time_to_first_feedback_h: float
    suspensions: int
    migrations: int
    packings: int
    jcts_h: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d.pop("jcts_h")
        return d


def _p(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return 0.0
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_nodes(gpus: int, gpus_per_node: int) -> list[Node]:
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError("--gpus and --gpus-per-node must be >= 1")
    nodes, left, i = [], gpus, 0
    while left > 0:
        n = min(gpus_per_node, left)
        nodes.append(Node(f"n{i:02d}", n))
        left -= n
        i += 1
    return nodes


def simulate(trace: Sequence[TraceJob], policy: Policy, *, gpus: int, gpus_per_node: int = 4, seed: int = 0,
             elastic: bool = True, max_time_s: float = 1e8,
             on_progress: Callable[[int, int], None] | None = None) -> SimResult:
    """Replay ``trace`` under ``policy``; ``on_progress(finished, total)`` is told each time a job finishes."""
    nodes = make_nodes(gpus, gpus_per_node)
    too_big = [t.name for t in trace if t.gpus > gpus]
    if too_big:
        raise ValueError(f"{len(too_big)} job(s) ask for more than the {gpus} GPUs simulated (first: {too_big[0]})")
    rng = random.Random(seed)
    pending = sorted(trace, key=lambda t: (t.arrival, t.name))
    jobs: dict[str, _Job] = {}
    active: list[_Job] = []
    done: list[_Job] = []
    t = 0.0
    i_arr = 0
    gpu_area = 0.0  # integral of compute used over time
    alloc_area = 0.0
    waiting_area = waiting_busy_area = 0.0  # while some job waits: time, and GPU-time allocated
    suspensions = migrations = packings = 0
    min_nodes_cache: dict[int, int] = {}

    def min_nodes(g: int) -> int:
        if g not in min_nodes_cache:
            min_nodes_cache[g] = math.ceil(g / gpus_per_node)
        return min_nodes_cache[g]

    def pair_speed(a: JobView, b: JobView) -> float | None:
        sa, sb = profiles.packed_speeds(a.app, b.app)
        return sa + sb

    def rates() -> dict[str, float]:
        """Progress per second of each running job (1.0 = alone, local, on the GPUs it asked for)."""
        share: dict[tuple[str, int], list[_Job]] = {}
        for j in active:
            for s in j.view.slots:
                share.setdefault(s, []).append(j)
        out: dict[str, float] = {}
        for j in active:
            v = j.view
            if not v.slots:
                continue
            r = 1.0
            if len(v.slots) > v.gpus:  # grown
                r *= (len(v.slots) / v.gpus) ** profiles.GROW_EXPONENT
            if len(nodes_of(v.slots)) > min_nodes(len(v.slots)):
                r *= profiles.CROSS_NODE
            others = {o.view.job_id: o for s in v.slots for o in share[s] if o is not j}
            if others:
                o = next(iter(others.values()))
                r *= profiles.packed_speeds(j.app, o.app)[0]
            out[v.job_id] = r
        return out


    while i_arr < len(pending) or active:
        while i_arr < len(pending) and pending[i_arr].arrival <= t + EPS:
            tj = pending[i_arr]
            i_arr += 1
            view = JobView(tj.name, tj.gpus, tj.arrival, group=tj.group, app=tj.app, elastic=elastic)
            work = tj.duration_s
            j = _Job(view, tj.app, work, quality=0.6 + 0.4 * rng.random(), remaining=work)
            jobs[tj.name] = j
            active.append(j)
        views = [j.view for j in active]
        decision = policy.schedule(t, nodes, views, pair_speed)
        for a in plan_actions(views, decision):
            j = jobs[a.job_id]
            v = j.view
            if a.kind == "suspend":
                v.slots, v.last_ran = (), t
                j.suspended_once = True
                suspensions += 1
            elif a.kind == "start":
                if j.first_start is None:
                    j.first_start = t
                elif j.suspended_once:
                    j.overhead_until = t + profiles.suspend_resume_s(j.app)
                if any(s in o.view.slots for o in active if o is not j for s in a.slots):
                    packings += 1
                v.slots, v.run_started = a.slots, t
            elif a.kind == "migrate":
                j.overhead_until = t + profiles.migration_s(j.app)
                v.slots = a.slots
                migrations += 1
            else:  # resize (grow / shrink within the node): a checkpoint-restart
                j.overhead_until = t + profiles.suspend_resume_s(j.app)
                v.slots = a.slots
        for jid in decision.stop:
            j = jobs[jid]
            j.finish = t
            active.remove(j)
            done.append(j)
            if on_progress is not None:
                on_progress(len(done), len(trace))
        r = rates()
        # the next event
        nxt = t + policy.quantum
        if i_arr < len(pending):
            nxt = min(nxt, pending[i_arr].arrival)
        for j in active:
            if j.view.job_id in r:
                nxt = min(nxt, max(t, j.overhead_until) + j.remaining / r[j.view.job_id])
        nxt = max(nxt, t + 1e-6)
        if nxt > max_time_s:
            raise RuntimeError(f"simulation did not finish within {max_time_s:g}s of simulated time")
        allocated = len({s for j in active for s in j.view.slots})
        waiting = any(not j.view.slots for j in active)
        # advance
        dt = nxt - t
        if waiting:
            waiting_area += dt
            waiting_busy_area += allocated * dt
        for j in list(active):
            v = j.view
            if not v.slots:
                continue
            v.attained += len(v.slots) * dt
            rate = r[v.job_id]
            start = max(t, j.overhead_until)
            run_dt = max(0.0, nxt - start)
            before = j.progress()
            j.remaining -= rate * run_dt
            # useful compute: what the progress made would use alone on the GPUs asked for (their profiled
            # utilization). Packing counts by the progress both jobs make; GPUs a grown job holds beyond its
            # ask count only by the speed-up they give, and a stalled or slowed (spread) job by what it gets done.
            gpu_area += v.gpus * profiles.profile(j.app).util * rate * run_dt
            after = 1.0 if j.remaining <= j.work * 1e-9 else j.progress()
            while j.next_feedback <= after + EPS and j.next_feedback <= 1.0:
                when = start + (j.next_feedback - before) * j.work / rate if rate > 0 else nxt
                if j.first_feedback is None:
                    j.first_feedback = when
                v.accuracy = j.quality * (1 - math.exp(-4 * j.next_feedback))
                j.next_feedback += FEEDBACK_EVERY
            if j.remaining <= j.work * 1e-9:
                j.finish = nxt
                active.remove(j)
                done.append(j)
                if on_progress is not None:
                    on_progress(len(done), len(trace))
        alloc_area += allocated * dt
        t = nxt
    first = min(j.view.arrival for j in done)
    makespan = max(j.finish or 0.0 for j in done) - first
    jcts = [((j.finish or 0.0) - j.view.arrival) / 3600 for j in done]
    delays = [((j.first_start if j.first_start is not None else (j.finish or 0.0)) - j.view.arrival) / 3600 for j in done]
    groups: dict[str, list[_Job]] = {}
    for j in done:
        if j.view.group:
            groups.setdefault(j.view.group, []).append(j)
    ttff = [max((m.first_feedback if m.first_feedback is not None else (m.finish or 0.0)) for m in ms)
            - min(m.view.arrival for m in ms) for ms in groups.values()]
    return SimResult(
        policy=policy.name, gpus=gpus, jobs=len(done),
        avg_jct_h=statistics.fmean(jcts), median_jct_h=_p(jcts, 0.5), p95_jct_h=_p(jcts, 0.95),
        makespan_h=makespan / 3600, utilization=gpu_area / (gpus * makespan) if makespan else 0.0,
        allocation=alloc_area / (gpus * makespan) if makespan else 0.0,
        allocation_while_waiting=waiting_busy_area / (gpus * waiting_area) if waiting_area else 1.0,
        avg_queueing_delay_h=statistics.fmean(delays), groups=len(groups),
        avg_time_to_first_feedback_h=(statistics.fmean(ttff) / 3600) if ttff else 0.0,
        suspensions=suspensions, migrations=migrations, packings=packings, jcts_h=jcts,
    )
