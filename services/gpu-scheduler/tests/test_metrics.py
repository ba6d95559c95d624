"""The GPU scheduler's metrics: jobs by state, suspensions, migrations and mini-batch times, read from the live
scheduler's jobs (agents as plain reports, as in test_scheduler_strays)."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tessera.gpu_scheduler.server import observe_scheduler

from .test_scheduler_strays import CKPT, Cluster, _running_on_a


def _read(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    data = reader.get_metrics_data()
    assert data is not None
    return {(m.name, tuple(sorted(p.attributes.items()))): p.value  # type: ignore[union-attr]
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            for p in m.data.data_points}


async def test_jobs_by_state_migrations_and_minibatch_times() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    c = Cluster("gandiva")
    observe_scheduler(c.sched, meter_provider=provider)
    before = _read(reader)
    assert before[("tessera.gpu.jobs", (("tessera.gpu.job.state", "running"),))] == 0
    assert before[("tessera.gpu.migrations", ())] == 0

    jid = await _running_on_a(c)
    c.reports["a"]["jobs"][jid].update(minibatch_s=0.25, step=32)
    await c.beat("a")
    await c.sched.tick()
    got = _read(reader)
    assert got[("tessera.gpu.jobs", (("tessera.gpu.job.state", "running"),))] == 1
    assert got[("tessera.gpu.jobs", (("tessera.gpu.job.state", "queued"),))] == 0
    assert got[("tessera.gpu.job.minibatch.duration", (("tessera.gpu.job.group", ""), ("tessera.gpu.job.id", jid)))] \
        == 0.25

    await c.sched.migrate(jid, "b")
    await c.sched.tick()
    await c.beat("b")  # the target, started ahead, waits for the checkpoint
    await c.sched.tick()
    c.reports["a"]["jobs"][jid].update(state="exited", rc=75, step=33, ckpt_oid=CKPT, ckpt_step=33)
    await c.beat("a")
    await c.sched.tick()
    got = _read(reader)
    assert got[("tessera.gpu.migrations", ())] == 1
    assert got[("tessera.gpu.suspensions", ())] == 0
    assert got[("tessera.gpu.jobs", (("tessera.gpu.job.state", "running"),))] == 1  # now on b
    provider.shutdown()
