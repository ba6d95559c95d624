"""The stage scheduler of a replica (after PRETZEL, section 4.3).

Every physical stage (a featurizer that pipelines share, each pipeline's head, a transform) has its own queue,
keyed by the stage's content key, so the requests of every pipeline that runs a stage meet in one queue. A
request is a job that moves through its plan as events: an event is (job, stage); when a stage's inputs are all
computed, the job's event for it enters that stage's queue. Executors (threads: the n-gram kernel and numpy
release the GIL) take a batch of events from one queue and run the stage once for all of them; a source stage
runs once over the distinct inputs of the batch, whichever pipelines asked, and reuses the rows it computed
before (:class:`~tessera.serving.cache.OutputCache`). An executor then goes on with the next stage of the jobs it
ran (their events are queued where it looks next), so a request rarely changes thread between its stages.

- Batching: a source queue is held while its requests can still wait (each request may wait its pipeline's
  latency budget, less the stage's measured cost), or until it holds a full batch. Holding pays only when more
  requests arrive meanwhile: each queue measures that (a moving average of the requests that a hold gathered,
  and of arrivals that found work in flight); while it stays low (a lone caller waiting for each answer) the
  queue is never held, and a request that finds the scheduler idle runs at once on the caller's thread, with
  no thread handoff.
- Reserved executors: ``reserved`` threads take only events of pipelines registered as latency-critical, so a
  flood of other requests, however many queue up, does not delay those. The shared executors serve every
  queue, latency-critical events first, then the queue whose oldest request has the earliest deadline.
- Back-pressure: at most ``max_queued`` records wait in source queues; past that a request gets
  RESOURCE_EXHAUSTED.
- Isolation: a stage that fails for a batch is run again for each of its jobs alone, so one bad request (an
  unknown category, say) fails only itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics

from tessera.common.errors import ResourceExhaustedError
from tessera.serving.engine import Engine, Prediction, Registered, distinct_rows, take_rows, to_predictions

log = logging.getLogger(__name__)
_meter = metrics.get_meter("tessera.serving")
_batch_records = _meter.create_histogram(
    "tessera.serving.batch.size", unit="{record}", description="Records in each batch a source stage ran",
    explicit_bucket_boundaries_advisory=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))

IDLE_WAIT_S = 1.0  # an idle executor looks at its queues at least this often (a bounded wait)
MAX_IDLE_QUEUES = 1024  # past this many queues, empty ones are dropped (stages of unregistered pipelines)
FINISH_EVERY = 8  # an executor running the next stages of a batch hands answers over at least every this many jobs
HOLD_GAIN = 0.25  # a source queue is held while its average gain from holding is at least this


@dataclass(eq=False)
class _Job:
    reg: Registered
    cols: dict[str, list[Any]]
    n: int
    deadline: float
    critical: bool
    future: asyncio.Future[list[Prediction]]
    group: object | None = None  # the requests of one PredictBatch call: batched together at each stage
    started: bool = False  # one of its source events was taken (its records no longer count as queued)
    outs: list[Any] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)  # per stage: inputs not computed yet
    failed: bool = False


_Event = tuple[_Job, int]  # a job at one stage of its plan


class _Queue:
    """The queue of one physical stage: events of every pipeline that runs it."""

    __slots__ = ("key", "source", "crit", "rest", "rows", "cost_s", "gain", "hold", "held_at", "soonest")

    def __init__(self, key: str, source: bool) -> None:
        self.key = key
        self.source = source
        self.crit: deque[_Event] = deque()  # events of latency-critical pipelines
        self.rest: deque[_Event] = deque()
        self.rows = 0  # records waiting
        self.cost_s = 0.0002  # moving average of one batch's run time
        self.gain = 1.0  # moving average of what holding this queue gathered
        self.hold = False  # held for more events (decided when the first event enters the empty queue)
        self.held_at = 0  # events queued when the hold began
        self.soonest = float("inf")  # the earliest deadline of the events waiting (a later one may come due first)

    def __len__(self) -> int:
        return len(self.crit) + len(self.rest)

    def deadline(self) -> float:
        return self.soonest

    def recompute(self) -> None:
        """The earliest deadline of what is left, after a batch was taken."""
        self.soonest = min((ev[0].deadline for dq in (self.crit, self.rest) for ev in dq), default=float("inf"))


class Scheduler:
    """The stage scheduler of every pipeline of the replica (see module doc).

    Args:
        workers: shared executor threads.
        reserved: executor threads reserved for latency-critical pipelines.
        max_batch: most records a stage runs in one batch (the requests of one PredictBatch call stay together).
        inline_rows: a request of at most this many records that finds the scheduler idle runs on the caller.
        max_queued: most records waiting in source queues.
    """

    def __init__(self, engine: Engine, *, workers: int = 2, reserved: int = 1, max_batch: int = 64,
                 inline_rows: int = 4, max_queued: int = 65536) -> None:
        if workers < 1 or reserved < 0:
            raise ValueError("a scheduler needs at least one shared executor, and no negative reservation")
        self.engine = engine
        self.workers = workers
        self.reserved = reserved
        self.max_batch = max_batch
        self.inline_rows = inline_rows
        self.max_queued = max_queued
        self.queued = 0  # records waiting in source queues
        self.batches = 0  # batches of source stages run
        self.stage_batches = 0  # batches of any stage run
        self.inline = 0  # requests run on the caller's thread
        self.batch_sizes: Counter[int] = Counter()
        self.reserved_runs = 0  # batches the reserved executors ran
        self._queues: dict[str, _Queue] = {}
        self._waiting: dict[str, _Queue] = {}  # the queues that hold events
        self._cv = threading.Condition(threading.Lock())
        self._busy = 0  # executors running a batch
        self._idle = 0  # executors waiting for work
        self._events = 0  # events in all queues
        self._crit_events = 0  # of which latency-critical
        self._callers = 0  # requests submitted and not answered yet (counted on the event loop)
        self._answers: deque[tuple[_Job, list[Prediction] | BaseException]] = deque()  # for the loop to hand out
        self._answers_lock = threading.Lock()
        self._wake_pending = False  # a call of _settle is scheduled on the loop
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        for i in range(self.workers + self.reserved):
            reserved = i >= self.workers
            t = threading.Thread(target=self._worker, args=(reserved,), daemon=True,
                                 name=f"serving-{'reserved' if reserved else 'exec'}-{i}")
            t.start()
            self._threads.append(t)

    async def stop(self) -> None:
        with self._cv:
            self._stopping = True
            pending = [ev for q in self._queues.values() for ev in (*q.crit, *q.rest)]
            for q in self._queues.values():
                q.crit.clear()
                q.rest.clear()
                q.rows = 0
            self._waiting.clear()
            self._events = 0
            self._crit_events = 0
            self.queued = 0
            self._cv.notify_all()
        for job, _ in pending:
            if not job.future.done():
                job.future.cancel()
        threads, self._threads = self._threads, []
        for t in threads:
            await asyncio.to_thread(t.join, 30.0)

    # ------------------------------------------------------------------ submission
    async def submit(self, name: str, records: Sequence[Any]) -> list[Prediction]:
        reg = self.engine.get(name)
        return await self.submit_checked(reg, self.engine.columns(reg, records), len(records))

    async def submit_checked(self, reg: Registered, cols: dict[str, list[Any]], n: int) -> list[Prediction]:
        """Predictions for ``n`` records already checked against ``reg``'s inputs."""
        return (await self.submit_many([(reg, cols, n)], together=False))[0]

    async def submit_many(self, items: Sequence[tuple[Registered, dict[str, list[Any]], int]], *,
                          together: bool = True) -> list[list[Prediction]]:
        """Requests of one call; ``together``: they run as one batch at each stage, at once (PredictBatch)."""
        assert self._loop is not None, "scheduler not started"
        loop = self._loop
        now = time.monotonic()
        total = sum(n for _, _, n in items)
        group = object() if together else None
        jobs = [_Job(reg, cols, n, now if together else now + reg.budget_ms / 1000.0, reg.critical,
                     loop.create_future(), group) for reg, cols, n in items]
        self._callers += 1
        try:
            with self._cv:
                if self.queued + total > self.max_queued:
                    raise ResourceExhaustedError(
                        f"the serving queue is full: {self.queued} records wait, {total} more would pass the limit "
                        f"of {self.max_queued} (serving_max_queued_records); retry later or on another replica")
                idle = self._busy == 0 and self._events == 0 and self._callers == 1
                inline = (idle and len(jobs) == 1 and total <= self.inline_rows
                          and not self._would_hold(jobs[0], now))
                if inline:
                    self._note_idle_arrival(jobs[0])
                else:
                    for job in jobs:
                        self._enqueue_sources(job, idle=idle)
                    if self._idle:
                        self._cv.notify_all()
            if inline:
                job = jobs[0]
                try:
                    out = self.engine.execute([(job.reg, job.cols, job.n)])
                finally:
                    with self._cv:
                        self.inline += 1
                        for _ in job.reg.plan.sources:
                            self._count_source_batch(job.n)
                # the loop's other work runs before this caller goes on; a request that arrives meanwhile finds
                # this one still in flight, and is queued (concurrent callers batch, they do not take turns here)
                await asyncio.sleep(0)
                return out
            if len(jobs) == 1:
                return [await jobs[0].future]
            return list(await asyncio.gather(*(j.future for j in jobs)))
        finally:
            self._callers -= 1

    def _would_hold(self, job: _Job, now: float) -> bool:
        for si in job.reg.plan.sources:
            q = self._queues.get(job.reg.plan.stages[si].key)
            if q is None or (q.gain >= HOLD_GAIN and job.deadline - q.cost_s > now):
                return True  # a new stage holds until its queue has learnt what holding gathers
        return False

    def _note_idle_arrival(self, job: _Job) -> None:
        """An arrival that finds the scheduler idle says holding its stages would have gathered nothing."""
        for si in job.reg.plan.sources:
            q = self._queues.get(job.reg.plan.stages[si].key)
            if q is not None:
                q.gain *= 0.8

    # ------------------------------------------------------------------ queues (under self._cv)
    def _queue(self, key: str, source: bool) -> _Queue:
        q = self._queues.get(key)
        if q is None:
            if len(self._queues) >= MAX_IDLE_QUEUES:  # forget empty queues; they are made again when used
                self._queues = {k: v for k, v in self._queues.items() if k in self._waiting}
            q = self._queues[key] = _Queue(key, source)
        return q

    def _enqueue_sources(self, job: _Job, *, idle: bool) -> None:
        plan = job.reg.plan
        job.outs = [None] * len(plan.stages)
        job.waiting = list(job.reg.n_inputs)
        for si in plan.sources:
            q = self._queue(plan.stages[si].key, True)
            if len(q):  # others wait at this stage already: holding it gathers
                q.gain = 0.8 * q.gain + 0.2
            elif idle:
                q.gain *= 0.8
            self._push(q, (job, si))
        self.queued += job.n

    def _push(self, q: _Queue, ev: _Event) -> None:
        if not len(q):
            q.hold = q.source and ev[0].group is None and q.gain >= HOLD_GAIN
            q.held_at = 0
            self._waiting[q.key] = q
        if ev[0].critical:
            q.crit.append(ev)
            self._crit_events += 1
        else:
            q.rest.append(ev)
        q.rows += ev[0].n
        q.soonest = min(q.soonest, ev[0].deadline)
        self._events += 1

    def _ready(self, q: _Queue, now: float) -> tuple[bool, float]:
        """Whether ``q`` may run now; else when it may."""
        if not q.hold or q.rows >= self.max_batch:
            return True, now
        go = q.deadline() - q.cost_s
        return go <= now, go

    def _pick(self, reserved: bool, now: float) -> tuple[_Queue | None, float | None]:
        best: _Queue | None = None
        best_rank: tuple[bool, float] = (True, float("inf"))
        until: float | None = None
        for q in self._waiting.values():
            if reserved and not q.crit:
                continue
            ok, go = self._ready(q, now)
            if not ok:
                if q.held_at == 0:
                    q.held_at = len(q)
                until = go if until is None else min(until, go)
                continue
            rank = (not q.crit, q.deadline())
            if rank < best_rank:
                best, best_rank = q, rank
        return best, until

    def _take(self, q: _Queue, reserved: bool) -> list[_Event]:
        """A batch from ``q`` (latency-critical events first; a reserved executor takes only those), and the
        bookkeeping of what it leaves."""
        if q.hold and q.held_at:
            q.gain = 0.7 * q.gain + 0.3 * (len(q) - q.held_at)
        batch: list[_Event] = []
        rows = 0
        for dq in (q.crit,) if reserved else (q.crit, q.rest):
            while dq:
                job = dq[0][0]
                if batch and rows + job.n > self.max_batch and (job.group is None or job.group is not batch[-1][0].group):
                    break
                batch.append(dq.popleft())
                rows += job.n
                if job.critical:
                    self._crit_events -= 1
        self._events -= len(batch)
        q.rows -= rows
        q.recompute()
        if q.source:
            for job, _ in batch:
                if not job.started:
                    job.started = True
                    self.queued -= job.n
        q.held_at = 0
        if not len(q):
            q.hold = False
            del self._waiting[q.key]
        return batch

    # ------------------------------------------------------------------ executors
    def _worker(self, reserved: bool) -> None:
        ran: tuple[_Queue, list[_Event], list[tuple[_Event, Any]], float] | None = None
        local: deque[_Queue] = deque()  # queues this executor just gave events to: it runs them next
        finished: list[tuple[_Job, Any]] = []
        while True:
            with self._cv:
                if ran is not None:
                    finished += self._advance(*ran, reserved=reserved, local=local)
                    ran = None
                    self._busy -= 1
                # answers are handed over before waiting, and at least every FINISH_EVERY jobs
                hand_over = len(finished) >= FINISH_EVERY
                got = None if hand_over else self._next(reserved, local, wait=not finished)
                stopping = self._stopping
            if finished and (got is None or hand_over or not local):
                self._finish(finished)
                finished = []
            if got is None:
                if stopping:
                    return
                continue
            q, batch = got
            t0 = time.monotonic()
            try:
                results = self._run(q, batch)
            except Exception as e:  # a fault here must not take the executor down, nor leave its jobs waiting
                log.exception("stage %s", q.key)
                results = [(ev, e) for ev in batch]
            ran = (q, batch, results, time.monotonic() - t0)

    def _next(self, reserved: bool, local: deque[_Queue], *, wait: bool) -> tuple[_Queue, list[_Event]] | None:
        """(Under the lock.) The next batch this executor runs: the next stage of the jobs it ran (unless
        latency-critical events wait elsewhere), else the best ready queue; waits for one (bounded) if ``wait``."""
        while not self._stopping:
            if self._crit_events == 0 or reserved:
                while local:
                    mine = local.popleft()
                    if mine.crit if reserved else len(mine):
                        self._busy += 1
                        return mine, self._take(mine, reserved)
            local.clear()
            now = time.monotonic()
            q, until = self._pick(reserved, now)
            if q is not None:
                self._busy += 1
                return q, self._take(q, reserved)
            if not wait:
                return None
            self._idle += 1
            self._cv.wait(IDLE_WAIT_S if until is None else max(0.0, min(IDLE_WAIT_S, until - now)))
            self._idle -= 1
        return None

    def _count_source_batch(self, rows: int) -> None:
        self.batches += 1
        self.batch_sizes[rows] += 1
        _batch_records.record(rows)

    def _run(self, q: _Queue, batch: list[_Event]) -> list[tuple[_Event, Any]]:
        """Run ``q``'s stage for the live events of ``batch``: each event with its output (or its error)."""
        live = [ev for ev in batch if not ev[0].failed and not ev[0].future.done()]
        if not live:
            return []
        if q.source:
            return list(zip(live, self._run_source(live), strict=True))
        out: list[tuple[_Event, Any]] = []
        for ev in live:
            try:
                out.append((ev, self.engine.run_stage(ev[0].reg, ev[1], ev[0].outs)))
            except Exception as e:
                out.append((ev, e))
        return out

    def _advance(self, q: _Queue, batch: list[_Event], results: list[tuple[_Event, Any]], dt: float, *,
                 reserved: bool, local: deque[_Queue]) -> list[tuple[_Job, Any]]:
        """(Under the lock: another executor may be running another source of the same job.) Record a batch's
        outputs and queue the stages they make ready; returns the jobs that finished or failed."""
        q.cost_s = 0.8 * q.cost_s + 0.2 * dt
        self.stage_batches += 1
        if reserved:
            self.reserved_runs += 1
        if q.source:
            self._count_source_batch(sum(ev[0].n for ev in batch))
        finished: list[tuple[_Job, Any]] = []
        for (job, i), out in results:
            if job.failed:
                continue
            if isinstance(out, BaseException):
                job.failed = True
                finished.append((job, out))
                continue
            job.outs[i] = out
            nexts = job.reg.consumers[i]
            if not nexts:  # the output stage
                finished.append((job, out))
            for j in nexts:
                job.waiting[j] -= 1
                if job.waiting[j] == 0:  # queued without waking anyone: this executor runs it next
                    nq = self._queue(job.reg.plan.stages[j].key, False)
                    if not len(nq):
                        local.append(nq)
                    self._push(nq, (job, j))
        return finished

    def _finish(self, finished: list[tuple[_Job, Any]]) -> None:
        """Answers of finished jobs (predictions from their heads' scores), handed to the event loop."""
        done: list[tuple[_Job, list[Prediction] | BaseException]] = []
        for job, out in finished:
            if isinstance(out, BaseException):
                done.append((job, out))
                continue
            try:
                done.append((job, to_predictions(out)))
            except Exception as e:
                done.append((job, e))
        self._resolve(done)

    def _run_source(self, events: list[_Event]) -> list[Any]:
        """One run of a source stage over the distinct inputs of ``events`` (each event's rows, or its error)."""
        job0, si0 = events[0]
        st = job0.reg.plan.stages[si0]
        index: dict[tuple[Any, ...], int] = {}
        uniq: list[tuple[Any, ...]] = []
        rows = [distinct_rows(st, job.cols, job.n, index, uniq) for job, _ in events]
        asked = sum(job.n for job, _ in events)
        try:
            X = self.engine.source_output(st, uniq)
        except Exception as e:
            if len(events) == 1:
                return [e]
            # one bad input must not fail the others batched with it: each alone
            return [r for ev in events for r in self._run_source([ev])]
        self.engine.note_reuse(asked, len(uniq))
        return [take_rows(X, r, len(uniq)) for r in rows]

    def _resolve(self, done: list[tuple[_Job, list[Prediction] | BaseException]]) -> None:
        """Hand answers to the event loop: one wake-up of the loop carries every answer given until it runs."""
        assert self._loop is not None
        with self._answers_lock:
            self._answers.extend(done)
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._settle)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass

    def _settle(self) -> None:
        with self._answers_lock:
            done = list(self._answers)
            self._answers.clear()
            self._wake_pending = False
        for job, res in done:
            if job.future.done():
                continue
            if isinstance(res, BaseException):
                job.future.set_exception(res)
            else:
                job.future.set_result(res)

    # ------------------------------------------------------------------ figures
    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"executors": self.workers, "reserved_executors": self.reserved, "stage_queues": len(self._queues),
                    "queued": self.queued, "batches": self.batches, "stage_batches": self.stage_batches,
                    "inline": self.inline, "reserved_runs": self.reserved_runs}
