"""Scheduling policies: Gandiva, and the FIFO and LAS baselines.

Pure code: events in, decisions out. A policy looks at the cluster (nodes and
their GPU slots) and the jobs (what they asked for, where they run, how much
service they got, what they reported) and returns the placement it wants now.
It has no clock, no I/O and no randomness of its own; the live scheduler
(:mod:`tessera.gpu_scheduler.scheduler`) and the trace simulator
(:mod:`tessera.gpu_scheduler.simulator`) both call :meth:`Policy.schedule`, and
turn the difference between the current and the wanted placement into actions
with :func:`plan_actions` (start, resume, suspend, migrate).

Gandiva (Xiao et al., OSDI 2018), as implemented here:

- exclusive placement, locality first (a job on the fewest nodes that can hold it),
  while the GPUs asked for fit the cluster;
- round-robin time-slicing with a quantum when they do not: every quantum the
  jobs that waited longest are switched in and those that ran a full quantum out;
- packing: a waiting job shares the GPUs of a running job of the same size when
  introspection (measured, or a profile in the simulator) says that the two
  together run faster than one alone; a pair measured slower is unpacked;
- migration: when a job can only be placed across nodes although a
  re-arrangement would give every job its locality, running jobs are moved;
- grow-shrink: with nothing waiting, an elastic job grows up to four times its GPUs
  (within its node; a job over several nodes also onto free nodes, never over more
  nodes than the GPUs need), and shrinks back as soon as anything waits;
- early feedback for multi-jobs (a hyper-parameter search sharing a group id):
  jobs whose reported accuracy trails the group's best are deprioritized, and
  optionally stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

Slot = tuple[str, int]  # (node id, GPU index)
Placement = tuple[Slot, ...]

POLICIES = ("gandiva", "fifo", "las")


@dataclass(frozen=True)
class Node:
    node_id: str
    gpus: int


@dataclass
class JobView:
    """What a policy knows of one job that has not finished."""

    job_id: str
    gpus: int
    arrival: float
    priority: int = 0
    group: str = ""
    app: str = ""
    elastic: bool = False
    slots: Placement = ()  # where it runs now; () when queued or suspended
    run_started: float = 0.0  # when its current run began (time-slicing quantum)
    last_ran: float | None = None  # when it last stopped running; None: never ran
    attained: float = 0.0  # GPU-seconds received so far (LAS)
    accuracy: float | None = None  # last reported accuracy (early feedback)
    held: bool = False  # suspended by an administrator: never placed
    target: str = ""  # node an administrator asked it to migrate to
    home: str = ""  # node where it waits suspended (resuming there is cheapest)

    @property
    def running(self) -> bool:
        return bool(self.slots)


#: Combined normalized throughput of two jobs packed on the same GPUs (1.0 = one job alone), or None if unknown.
PairSpeed = Callable[[JobView, JobView], "float | None"]


@dataclass
class Decision:
    placements: dict[str, Placement] = field(default_factory=dict)  # jobs that should run, and where
    stop: dict[str, str] = field(default_factory=dict)  # jobs to stop for good, with the reason


@dataclass(frozen=True)
class Action:
    kind: str  # start | suspend | migrate | resize
    job_id: str
    slots: Placement = ()  # new slots (start, migrate, resize)
    previous: Placement = ()  # old slots (suspend, migrate, resize)


def _unknown_pair(_a: JobView, _b: JobView) -> float | None:
    return None


def nodes_of(slots: Iterable[Slot]) -> set[str]:
    return {n for n, _ in slots}


def min_nodes(gpus: int, nodes: Sequence[Node]) -> int:
    """The fewest nodes that can hold ``gpus`` GPUs (largest nodes first)."""
    left, count = gpus, 0
    for n in sorted(nodes, key=lambda n: -n.gpus):
        if left <= 0:
            break
        left -= n.gpus
        count += 1
    return count if left <= 0 else math.inf  # type: ignore[return-value]


class Policy:
    """Base: greedy exclusive placement with locality. Subclasses choose who runs."""

    name = "base"

    def __init__(self, *, quantum: float = 60.0) -> None:
        if quantum <= 0:
            raise ValueError("quantum must be positive")
        self.quantum = quantum

    # ----------------------------------------------------------------- interface
    def schedule(self, now: float, nodes: Sequence[Node], jobs: Sequence[JobView],
                 pair_speed: PairSpeed = _unknown_pair) -> Decision:
        raise NotImplementedError

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def capacity(nodes: Sequence[Node]) -> int:
        return sum(n.gpus for n in nodes)

    @staticmethod
    def _free_map(nodes: Sequence[Node]) -> dict[str, list[int]]:
        return {n.node_id: list(range(n.gpus)) for n in nodes}

    @staticmethod
    def _valid(slots: Placement, free: dict[str, list[int]]) -> bool:
        return bool(slots) and all(n in free and g in free[n] for n, g in slots) and len(set(slots)) == len(slots)

    @staticmethod
    def _take(slots: Placement, free: dict[str, list[int]]) -> None:
        for n, g in slots:
            free[n].remove(g)

    @staticmethod
    def _fit(gpus: int, free: dict[str, list[int]], *, prefer: str = "", spread: bool = True) -> Placement | None:
        """Best fit on one node (``prefer`` first if it fits); else, if ``spread``, the fewest nodes."""
        fits = [n for n, f in free.items() if len(f) >= gpus]
        if fits:
            node = prefer if prefer in fits else min(fits, key=lambda n: (len(free[n]), n))
            return tuple((node, g) for g in free[node][:gpus])
        if not spread or sum(len(f) for f in free.values()) < gpus:
            return None
        out: list[Slot] = []
        for n in sorted(free, key=lambda n: (-len(free[n]), n)):
            for g in free[n]:
                if len(out) < gpus:
                    out.append((n, g))
        return tuple(out)

    def _place(self, run: Sequence[JobView], nodes: Sequence[Node], *, migrate: bool) -> dict[str, Placement]:
        """Slots for every job of ``run`` (whose GPUs fit the cluster): running jobs keep theirs.

        With ``migrate``, a placement that leaves a job spread over more nodes than it needs is
        redone from scratch (largest jobs first, each preferring its current node): the jobs whose
        slots change are migrated, for locality and against fragmentation.
        """
        free = self._free_map(nodes)
        out: dict[str, Placement] = {}
        for j in run:
            cur = j.slots[: j.gpus]
            if cur and self._valid(cur, free):
                out[j.job_id] = cur
                self._take(cur, free)
        for j in sorted((j for j in run if j.job_id not in out), key=lambda j: -j.gpus):
            if j.home and not j.target and j.home in free:
                # a suspended job waits for a GPU of its own node (where its process is) rather than
                # moving: time slices rotate per node; moves are for migrations
                slots = self._fit(j.gpus, {j.home: free[j.home]}, spread=False)
            else:
                slots = self._fit(j.gpus, free, prefer=j.target or j.home)
            if slots is None:
                continue
            out[j.job_id] = slots
            self._take(slots, free)
        if not migrate or not any(len(nodes_of(s)) > min_nodes(len(s), nodes) for s in out.values()):
            return out
        # Re-arrange: biggest first, each on its current node when that node still has room.
        free = self._free_map(nodes)
        again: dict[str, Placement] = {}
        for j in sorted(run, key=lambda j: (-j.gpus, j.arrival, j.job_id)):
            cur_nodes = nodes_of(j.slots)
            prefer = next(iter(cur_nodes)) if len(cur_nodes) == 1 else ""
            keep = j.slots[: j.gpus]
            slots = keep if keep and len(cur_nodes) == 1 and self._valid(keep, free) else self._fit(j.gpus, free, prefer=prefer)
            if slots is None:
                return out  # the re-arrangement does not hold everyone: keep the first placement
            again[j.job_id] = slots
            self._take(slots, free)
        spread_before = sum(len(nodes_of(s)) > min_nodes(len(s), nodes) for s in out.values())
        spread_after = sum(len(nodes_of(s)) > min_nodes(len(s), nodes) for s in again.values())
        return again if spread_after < spread_before else out


class FifoPolicy(Policy):
    """Kubernetes/YARN-like: first come first served, exclusive, never preempts, no backfill."""

    name = "fifo"

    def schedule(self, now: float, nodes: Sequence[Node], jobs: Sequence[JobView],
                 pair_speed: PairSpeed = _unknown_pair) -> Decision:
        cap = self.capacity(nodes)
        run = [j for j in jobs if j.running and not j.held]
        used = sum(j.gpus for j in run)
        for j in sorted((j for j in jobs if not j.running and not j.held), key=lambda j: (j.arrival, j.job_id)):
            if j.gpus > cap:
                continue
            if used + j.gpus > cap:
                break  # head-of-line: the first waiting job blocks the others
            run.append(j)
            used += j.gpus
        placed = self._place(run, nodes, migrate=False)
        return Decision(placements=placed)


class LasPolicy(Policy):
    """Tiresias-like least attained service: preemptive, exclusive, GPU-seconds received decide.

    A running job keeps its GPUs for at least one quantum, so jobs do not thrash.
    """

    name = "las"

    def schedule(self, now: float, nodes: Sequence[Node], jobs: Sequence[JobView],
                 pair_speed: PairSpeed = _unknown_pair) -> Decision:
        cap = self.capacity(nodes)
        live = [j for j in jobs if not j.held and j.gpus <= cap]
        protected = [j for j in live if j.running and now - j.run_started < self.quantum]
        rest = sorted((j for j in live if j not in protected), key=lambda j: (j.attained, j.arrival, j.job_id))
        run, used = list(protected), sum(j.gpus for j in protected)
        for j in rest:
            if used + j.gpus <= cap:
                run.append(j)
                used += j.gpus
        return Decision(placements=self._place(run, nodes, migrate=False))


class GandivaPolicy(Policy):
    """Gandiva: time-slicing, packing, migration, grow-shrink, early feedback (see the module doc).

    Args:
        quantum: seconds of a time slice.
        pack_threshold: combined throughput two jobs must reach together to stay packed.
        explore_packing: pack a pair that nobody has measured yet, to measure it.
        feedback_margin: a group job whose accuracy is below ``best * (1 - margin)`` is deprioritized.
        stop_below: if set, one whose accuracy is below ``best * stop_below`` is stopped.
        grow: let elastic jobs grow while nothing waits.
        grow_factor: how many times its GPUs an elastic job may grow to.
    """

    name = "gandiva"

    def __init__(self, *, quantum: float = 60.0, pack_threshold: float = 1.1, explore_packing: bool = True,
                 feedback_margin: float = 0.1, stop_below: float | None = None, grow: bool = True,
                 grow_factor: float = 4.0) -> None:
        super().__init__(quantum=quantum)
        self.pack_threshold = pack_threshold
        self.explore_packing = explore_packing
        self.feedback_margin = feedback_margin
        self.stop_below = stop_below
        self.grow = grow
        if grow_factor < 1:
            raise ValueError("grow_factor must be >= 1")
        self.grow_factor = grow_factor

    def _feedback(self, jobs: Sequence[JobView]) -> tuple[set[str], dict[str, str]]:
        demoted: set[str] = set()
        stop: dict[str, str] = {}
        groups: dict[str, list[JobView]] = {}
        for j in jobs:
            if j.group:
                groups.setdefault(j.group, []).append(j)
        for members in groups.values():
            scored = [j for j in members if j.accuracy is not None]
            if len(scored) < 2:
                continue
            best = max(float(j.accuracy or 0.0) for j in scored)
            for j in scored:
                acc = float(j.accuracy or 0.0)
                if self.stop_below is not None and acc < best * self.stop_below:
                    stop[j.job_id] = f"early feedback: accuracy {acc:.3f} below {self.stop_below:g} x group best {best:.3f}"
                elif acc < best * (1 - self.feedback_margin):
                    demoted.add(j.job_id)
        return demoted, stop

    def schedule(self, now: float, nodes: Sequence[Node], jobs: Sequence[JobView],
                 pair_speed: PairSpeed = _unknown_pair) -> Decision:
        cap = self.capacity(nodes)
        demoted, stop = self._feedback(jobs)
        live = [j for j in jobs if not j.held and j.gpus <= cap and j.job_id not in stop]

        def prio(j: JobView) -> int:
            return j.priority - (1 if j.job_id in demoted else 0)

        demand = sum(j.gpus for j in live)
        if demand <= cap:
            run = sorted(live, key=lambda j: (-prio(j), j.arrival, j.job_id))
            waiting: list[JobView] = []
        else:
            # Round robin: unfinished slices first, then those that waited longest, then those whose slice is over.
            def rr(j: JobView) -> tuple[int, int, float, str]:
                if j.running and now - j.run_started < self.quantum:
                    return (-prio(j), 0, j.run_started, j.job_id)
                if not j.running:
                    return (-prio(j), 1, j.arrival if j.last_ran is None else j.last_ran, j.job_id)
                return (-prio(j), 2, j.run_started, j.job_id)

            run, waiting, used = [], [], 0
            for j in sorted(live, key=rr):
                if used + j.gpus <= cap:
                    run.append(j)
                    used += j.gpus
                else:
                    waiting.append(j)
        placed = self._place(run, nodes, migrate=True)
        waiting += [j for j in run if j.job_id not in placed]
        # Administrators' migrations: move to the target node when it has room.
        for j in run:
            if j.target and j.job_id in placed and nodes_of(placed[j.job_id]) != {j.target}:
                busy = {s for jid, s_ in placed.items() if jid != j.job_id for s in s_}
                room = [g for nd in nodes if nd.node_id == j.target for g in range(nd.gpus) if (j.target, g) not in busy]
                if len(room) >= j.gpus:
                    placed[j.job_id] = tuple((j.target, g) for g in room[: j.gpus])
        # Packing: a waiting job shares the GPUs of a running job of its size when the pair gains.
        if waiting:
            by_id = {j.job_id: j for j in live}
            hosts = [by_id[jid] for jid in placed if jid in by_id]
            shared: set[str] = set()
            for w in sorted(waiting, key=lambda j: (-prio(j), j.last_ran if j.last_ran is not None else j.arrival)):
                for h in hosts:
                    if h.job_id in shared or h.gpus != w.gpus or w.job_id == h.job_id:
                        continue
                    if w.running and tuple(w.slots) != tuple(placed[h.job_id]):
                        continue  # never move a running job just to pack it: it is time-sliced out instead
                    if w.home and nodes_of(placed[h.job_id]) != {w.home}:
                        continue  # nor a suspended one away from the node where it waits
                    gain = pair_speed(h, w)
                    if (gain is None and self.explore_packing) or (gain is not None and gain >= self.pack_threshold):
                        placed[w.job_id] = placed[h.job_id]
                        shared.update((h.job_id, w.job_id))
                        break
        elif self.grow:
            self._grow(placed, {j.job_id: j for j in live}, nodes)
        return Decision(placements=placed, stop=stop)

    def _grow(self, placed: dict[str, Placement], jobs: dict[str, JobView], nodes: Sequence[Node]) -> None:
        """Nothing waits: elastic jobs take free GPUs, up to ``grow_factor`` times their ask, without losing locality.

        A job first keeps the GPUs it already grew into (no resize back and forth), then takes
        free GPUs of its own nodes; a job over several nodes also takes those of the emptiest other
        nodes, up to the largest count that still spans no more nodes than that many GPUs need. A
        job on one node stays on it (it learns its new GPUs at a mini-batch boundary, no restart).
        Oldest jobs grow first.
        """
        busy = {s for slots in placed.values() for s in slots}
        for jid in sorted(placed, key=lambda k: (jobs[k].arrival, k)):
            j = jobs[jid]
            cur = placed[jid]
            if not j.elastic or len(nodes_of(cur)) > min_nodes(len(cur), nodes):
                continue
            want = int(self.grow_factor * j.gpus) - len(cur)
            free = {n.node_id: [g for g in range(n.gpus) if (n.node_id, g) not in busy] for n in nodes}
            if want <= 0 or not any(free.values()):
                continue
            mine = nodes_of(cur)
            kept = [s for s in j.slots[j.gpus:] if s not in busy and s not in cur]
            own = [(n, g) for n in sorted(mine) for g in free[n]]
            others = [(n, g) for n in sorted(set(free) - mine, key=lambda n: (-len(free[n]), n)) for g in free[n]
                      ] if len(mine) > 1 else []
            order = list(dict.fromkeys(kept + own + others))
            best: Placement = ()
            for k in range(1, min(want, len(order)) + 1):
                grown = cur + tuple(order[:k])
                if len(nodes_of(grown)) <= min_nodes(len(grown), nodes):
                    best = grown
            if best:
                placed[jid] = best
                busy.update(best)


def make_policy(name: str, **kwargs: object) -> Policy:
    """The policy called ``name`` (gandiva | fifo | las)."""
    quantum = float(kwargs.pop("quantum", 60.0))  # type: ignore[arg-type]
    if name == "gandiva":
        return GandivaPolicy(quantum=quantum, **kwargs)  # type: ignore[arg-type]
    if kwargs:
        raise ValueError(f"policy {name!r} takes no options {sorted(kwargs)}")
    if name == "fifo":
        return FifoPolicy(quantum=quantum)
    if name == "las":
        return LasPolicy(quantum=quantum)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


def plan_actions(jobs: Sequence[JobView], decision: Decision) -> list[Action]:
    """The actions that turn the current placement into ``decision``: suspends first, then starts."""
    suspends: list[Action] = []
    moves: list[Action] = []
    for j in jobs:
        want = decision.placements.get(j.job_id, ())
        if j.job_id in decision.stop:
            continue
        if j.running and not want:
            suspends.append(Action("suspend", j.job_id, previous=j.slots))
        elif not j.running and want:
            moves.append(Action("start", j.job_id, slots=want))
        elif j.running and want and tuple(want) != tuple(j.slots):
            kind = "resize" if nodes_of(want) == nodes_of(j.slots) and set(j.slots[: j.gpus]) <= set(want) else "migrate"
            if kind == "resize" and set(want) == set(j.slots):
                continue
            moves.append(Action(kind, j.job_id, slots=want, previous=j.slots))
    return suspends + moves
