"""Control-store benchmark: the real service, real Redis and NATS, measured through gRPC.

    .venv/bin/python benchmarks/control_store_bench.py [--quick] [--json PATH]

For each shard count (1 and 2 by default) this starts a nats-server, that many
redis-server shards and ``python -m tessera.control_store`` as a separate
process, then drives it from this process with ``grpc.aio``, several calls in
flight at once. Every row reports calls/s, records/s and the per-call latency
(p50/p99) seen by the client. See benchmarks/README.md for what each row means.

Nothing here asserts on timings: the figures are reported as measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import procs
from tessera.common.rpc import MAX_MESSAGE_BYTES, health_status
from tessera.testing import nats_server, redis_server

SERVICE = "/tessera.control_store.v1.ControlStoreService/"
ROOT = Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "control_store.json"


# ----------------------------------------------------------------- parameters


@dataclass
class Plan:
    single_calls: int = 5000  # calls per single-item row
    batch_calls: int = 150  # calls per batched row
    batch: int = 1000  # items per batched call
    single_concurrency: int = 16  # calls in flight, single-item rows
    batch_concurrency: int = 4  # calls in flight, batched rows
    warmup_calls: int = 50

    @classmethod
    def quick(cls) -> Plan:
        return cls(single_calls=600, batch_calls=12, warmup_calls=10)


@dataclass
class Row:
    name: str
    method: str
    calls: int
    items_per_call: int
    concurrency: int
    seconds: float
    calls_per_s: float
    items_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int = 0
    note: str = ""
    #: CPU used during the row, in cores (CPU seconds per wall second), per process
    cpu: dict[str, float] = field(default_factory=dict)
    #: CPU microseconds the service (and Redis) spent per record: steadier than records/s
    #: when something else competes for the machine
    server_us_per_item: float = 0.0
    redis_us_per_item: float = 0.0


@dataclass
class Run:
    shards: int
    rows: list[Row] = field(default_factory=list)
    server_rss_mb: float = 0.0


# ------------------------------------------------------------------ workload

_FUNCTION_ID = bytes(range(32))
_JOB_ID = b"\x00\x00\x00\x07"


def task_spec(rng: random.Random) -> pb.TaskSpec:
    """A plain remote-function task: 16-byte id, job, function, ~100 bytes of args, one return."""
    return pb.TaskSpec(
        task_id=rng.randbytes(16),
        job_id=_JOB_ID,
        function_id=_FUNCTION_ID,
        function_name="bench.workload.process_chunk",
        args=rng.randbytes(100),
        num_returns=1,
        resources={"CPU": 1.0},
        max_retries=3,
    )


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


class Client:
    """Unary calls with pre-serialized requests (building requests is not what is measured)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        self._calls: dict[str, Any] = {}

    def call(self, method: str, resp: type[Message]) -> Any:
        if method not in self._calls:
            self._calls[method] = self.channel.unary_unary(SERVICE + method, request_serializer=None,
                                                           response_deserializer=resp.FromString)
        return self._calls[method]

    async def close(self) -> None:
        await self.channel.close()


def _cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its exited children (Redis' AOF rewrites), 0 when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / _TICKS  # utime stime cutime cstime
    except (OSError, IndexError, ValueError):
        return 0.0


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuMeter:
    """CPU time of the processes taking part: this client, the service, Redis, NATS."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, float]:
        out = {name: sum(_cpu_s(p) for p in pids) for name, pids in self.pids.items()}
        t = os.times()
        out["client"] = t.user + t.system
        out["machine"] = _busy_s()
        return out

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
        """Cores used per process; ``other``: the rest of the machine (anything else running skews the row)."""
        out = {k: round((after[k] - before[k]) / wall, 2) for k in after}
        machine = out.pop("machine")
        out["other"] = round(max(0.0, machine - sum(out.values())), 2)
        return out


def _busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / _TICKS


async def measure(client: Client, name: str, method: str, resp: type[Message], requests: Sequence[bytes], *,
                  items_per_call: int, concurrency: int, check: Callable[[Any, int], None],
                  warmup: Sequence[bytes] = (), meter: CpuMeter | None = None) -> Row:
    """Send ``requests`` with ``concurrency`` calls in flight; time each call and the whole run."""
    rpc = client.call(method, resp)
    for w in warmup:
        await rpc(w, timeout=60)
    lat: list[float] = []
    errors: list[str] = []
    nxt = 0

    async def worker() -> None:
        nonlocal nxt
        while nxt < len(requests):
            i = nxt
            nxt += 1
            t0 = time.perf_counter()
            try:
                r = await rpc(requests[i], timeout=60)
            except grpc.aio.AioRpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
                continue
            lat.append(time.perf_counter() - t0)
            check(r, i)

    cpu0 = meter.sample() if meter else {}
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu = CpuMeter.cores(cpu0, meter.sample(), wall) if meter else {}
    lat.sort()
    ok = len(lat)
    return Row(
        name=name, method=method, calls=ok, items_per_call=items_per_call, concurrency=concurrency,
        seconds=round(wall, 3),
        calls_per_s=round(ok / wall, 1), items_per_s=round(ok * items_per_call / wall, 1),
        p50_ms=round(_percentile(lat, 0.50) * 1e3, 3), p99_ms=round(_percentile(lat, 0.99) * 1e3, 3),
        mean_ms=round(statistics.fmean(lat) * 1e3, 3) if lat else 0.0,
        max_ms=round(lat[-1] * 1e3, 3) if lat else 0.0,
        errors=len(errors), note=errors[0] if errors else "", cpu=cpu,
        server_us_per_item=round(cpu.get("server", 0.0) * wall / (ok * items_per_call) * 1e6, 1) if ok else 0.0,
        redis_us_per_item=round(cpu.get("redis", 0.0) * wall / (ok * items_per_call) * 1e6, 1) if ok else 0.0,
    )


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"benchmark: unexpected reply: {what}")


async def workload(address: str, plan: Plan, seed: int, only: set[str] | None,
                   pids: dict[str, list[int]]) -> list[Row]:
    rng = random.Random(seed)
    client = Client(address)
    rows: list[Row] = []
    meter = CpuMeter(pids)

    async def measure_row(*args: Any, **kw: Any) -> Row:
        return await measure(client, *args, meter=meter, **kw)

    def want(name: str) -> bool:
        return only is None or name in only

    def ser(msg: Any) -> bytes:
        return msg.SerializeToString()

    try:
        n1, nb, b = plan.single_calls, plan.batch_calls, plan.batch
        w1, wb = plan.warmup_calls, max(1, plan.warmup_calls // 25)
        c1, cb = plan.single_concurrency, plan.batch_concurrency

        # -------------------------------------------------- task-record writes
        single_specs = [task_spec(rng) for _ in range(n1)]
        batch_reqs: list[bytes] = []
        batch_ids: list[list[bytes]] = []
        for _ in range(nb):  # keep the serialized requests only: the specs themselves take far more memory
            specs = [task_spec(rng) for _ in range(b)]
            batch_ids.append([s.task_id for s in specs])
            batch_reqs.append(ser(pb.CreateTasksRequest(specs=specs)))
        warm1 = [ser(pb.CreateTasksRequest(specs=[task_spec(rng)])) for _ in range(w1)]
        warmb = [ser(pb.CreateTasksRequest(specs=[task_spec(rng) for _ in range(b)])) for _ in range(wb)]

        def created(n: int) -> Callable[[Any, int], None]:
            return lambda r, _i: _expect(r.created == n, f"created={r.created}, want {n}")

        # the later rows read and update these records, so they are always written
        rows.append(await measure_row(
            "create_tasks x1", "CreateTasks", pb.CreateTasksResponse,
            [ser(pb.CreateTasksRequest(specs=[s])) for s in single_specs],
            items_per_call=1, concurrency=c1, check=created(1), warmup=warm1))
        rows.append(await measure_row(
            f"create_tasks x{b}", "CreateTasks", pb.CreateTasksResponse,
            batch_reqs, items_per_call=b, concurrency=cb, check=created(b), warmup=warmb))

        # ----------------------------------------------------------- reads
        single_ids = [s.task_id for s in single_specs]
        all_ids = single_ids + [i for ids in batch_ids for i in ids]
        if want("get_tasks x1"):
            picks = [rng.choice(all_ids) for _ in range(n1)]
            rows.append(await measure_row(
                "get_tasks x1", "GetTasks", pb.GetTasksResponse,
                [ser(pb.GetTasksRequest(task_ids=[i])) for i in picks], items_per_call=1, concurrency=c1,
                check=lambda r, i: _expect(r.tasks[0].spec.task_id == picks[i], "wrong task returned"),
                warmup=[ser(pb.GetTasksRequest(task_ids=[i])) for i in picks[:w1]]))
        if want(f"get_tasks x{b}"):
            reqs = [ser(pb.GetTasksRequest(task_ids=rng.sample(all_ids, b))) for _ in range(nb)]
            rows.append(await measure_row(
                f"get_tasks x{b}", "GetTasks", pb.GetTasksResponse, reqs, items_per_call=b,
                concurrency=cb, check=lambda r, _i: _expect(len(r.tasks) == b, f"{len(r.tasks)} tasks"),
                warmup=reqs[:wb]))

        # --------------------------------------------------- state updates
        def updated(n: int, state: int) -> Callable[[Any, int], None]:
            return lambda r, _i: _expect(len(r.tasks) == n and r.tasks[0].state == state, "update not applied")

        node = rng.randbytes(16)
        if want("update_task_states x1"):
            rows.append(await measure_row(
                "update_task_states x1", "UpdateTaskStates", pb.UpdateTaskStatesResponse,
                [ser(pb.UpdateTaskStatesRequest(updates=[pb.TaskStateUpdate(
                    task_id=i, state=pb.TASK_STATE_SCHEDULED, node_id=node)])) for i in single_ids],
                items_per_call=1, concurrency=c1, check=updated(1, pb.TASK_STATE_SCHEDULED)))
        if want(f"update_task_states x{b}"):
            rows.append(await measure_row(
                f"update_task_states x{b}", "UpdateTaskStates", pb.UpdateTaskStatesResponse,
                [ser(pb.UpdateTaskStatesRequest(updates=[pb.TaskStateUpdate(
                    task_id=i, state=pb.TASK_STATE_SCHEDULED, node_id=node) for i in ids])) for ids in batch_ids],
                items_per_call=b, concurrency=cb, check=updated(b, pb.TASK_STATE_SCHEDULED)))

        # -------------------------------------------------------------- kv
        value = rng.randbytes(100)
        keys = [f"bench/key-{i:06d}".encode() for i in range(n1)]
        if want("kv_put x1"):
            rows.append(await measure_row(
                "kv_put x1", "KvPut", pb.KvPutResponse,
                [ser(pb.KvPutRequest(namespace="bench", key=k, value=value, overwrite=True)) for k in keys],
                items_per_call=1, concurrency=c1, check=lambda r, _i: None,
                warmup=[ser(pb.KvPutRequest(namespace="bench", key=b"warm-%d" % i, value=value, overwrite=True))
                        for i in range(w1)]))
        if want("kv_get x1"):
            if not want("kv_put x1"):
                for k in keys:
                    await client.call("KvPut", pb.KvPutResponse)(
                        ser(pb.KvPutRequest(namespace="bench", key=k, value=value, overwrite=True)))
            order = [rng.choice(keys) for _ in range(n1)]
            rows.append(await measure_row(
                "kv_get x1", "KvGet", pb.KvGetResponse,
                [ser(pb.KvGetRequest(namespace="bench", key=k)) for k in order], items_per_call=1,
                concurrency=c1, check=lambda r, _i: _expect(r.value == value, "wrong value"),
                warmup=[ser(pb.KvGetRequest(namespace="bench", key=k)) for k in order[:w1]]))
    finally:
        await client.close()
    return [r for r in rows if want(r.name)]


# -------------------------------------------------------------------- servers


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@contextlib.contextmanager
def control_store(shards: int, workdir: Path, server_src: Path | None = None,
                  ) -> Iterator[tuple[str, subprocess.Popen[bytes], dict[str, list[int]]]]:
    """nats-server + ``shards`` redis-servers + the control-store service, all on free ports."""
    with contextlib.ExitStack() as stack:
        nats = stack.enter_context(nats_server())
        redis_servers = [stack.enter_context(redis_server()) for _ in range(shards)]
        redis_urls = [r.url for r in redis_servers]
        port = procs.free_port()
        address = f"127.0.0.1:{port}"
        env = {
            **os.environ,
            "TESSERA_NATS_URL": nats.url,
            "TESSERA_REDIS_URLS": ",".join(redis_urls),
            "TESSERA_GRPC_PORT": str(port),
            "TESSERA_CONTROL_STORE_ADDRESS": address,
            "TESSERA_LOG_LEVEL": "WARNING",
        }
        for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            env.pop(k, None)
        if server_src is not None:  # another copy of the service's sources, found before the installed one
            env["PYTHONPATH"] = os.pathsep.join([str(server_src), *filter(None, [env.get("PYTHONPATH")])])
        log_path = workdir / f"control-store-{shards}.log"
        proc = procs.start([sys.executable, "-m", "tessera.control_store"], log_path=log_path, env=env)
        stack.callback(procs.stop, proc)
        deadline = time.monotonic() + 60
        while health_status(address) != "SERVING":
            failed = (f"exited with {proc.returncode}" if proc.poll() is not None
                      else "did not become SERVING within 60s" if time.monotonic() > deadline else "")
            if failed:
                tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
                raise SystemExit(f"the control store {failed}; its log ends with:\n{tail}")
            time.sleep(0.1)
        yield address, proc, {"server": [proc.pid], "redis": [r.proc.pid for r in redis_servers],
                              "nats": [nats.proc.pid]}


# ---------------------------------------------------------------------- output


def table(runs: Sequence[Run]) -> str:
    head = f"{'row':<26}{'shards':>7}{'calls':>7}{'inflight':>9}{'calls/s':>9}{'records/s':>11}" \
           f"{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}   cores: server redis nats client other" \
           f"   us/record: server redis"
    lines = [head, "-" * len(head)]
    for run in runs:
        for r in run.rows:
            c = r.cpu
            lines.append(f"{r.name:<26}{run.shards:>7}{r.calls:>7}{r.concurrency:>9}{r.calls_per_s:>9,.0f}"
                         f"{r.items_per_s:>11,.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.errors:>7}"
                         f"{c.get('server', 0):>17.2f}{c.get('redis', 0):>6.2f}{c.get('nats', 0):>5.2f}"
                         f"{c.get('client', 0):>7.2f}{c.get('other', 0):>6.2f}"
                         f"{r.server_us_per_item:>20,.0f}{r.redis_us_per_item:>6,.0f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls per row (a smoke run, noisier figures)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    ap.add_argument("--shards", default="1,2", help="comma-separated Redis shard counts to run (default 1,2)")
    ap.add_argument("--batch", type=int, help="items per batched call (default 1000)")
    ap.add_argument("--single-calls", type=int, help="calls per single-item row")
    ap.add_argument("--batch-calls", type=int, help="calls per batched row")
    ap.add_argument("--concurrency", type=int, help="calls in flight for single-item rows (default 16)")
    ap.add_argument("--batch-concurrency", type=int, help="calls in flight for batched rows (default 4)")
    ap.add_argument("--only", help="comma-separated row names to report, e.g. 'create_tasks x1000' "
                                   "(the create rows always run: the others read their records)")
    ap.add_argument("--server-src", type=Path,
                    help="run the control store from this directory (another checkout's "
                         "services/control-store/src), to compare two versions on the same machine")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hold", type=float, default=0.0,
                    help="seconds to wait once the service is up, before the rows (to attach a profiler)")
    args = ap.parse_args(argv)

    plan = Plan.quick() if args.quick else Plan()
    for a, f in (("batch", "batch"), ("single_calls", "single_calls"), ("batch_calls", "batch_calls"),
                 ("concurrency", "single_concurrency"), ("batch_concurrency", "batch_concurrency")):
        if getattr(args, a) is not None:
            setattr(plan, f, getattr(args, a))
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    shard_counts = [int(s) for s in args.shards.split(",") if s.strip()]

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        for n in shard_counts:
            print(f"== {n} Redis shard(s): starting nats-server, redis-server x{n}, control store ...", flush=True)
            with control_store(n, Path(tmp), args.server_src) as (address, proc, pids):
                print(f"   control store pid {proc.pid} at {address}", flush=True)
                if args.hold:
                    time.sleep(args.hold)
                run = Run(shards=n)
                run.rows = asyncio.run(workload(address, plan, args.seed + n, only, pids))
                run.server_rss_mb = round(_rss_mb(proc.pid), 1)
                runs.append(run)
                for r in run.rows:
                    print(f"   {r.name:<26}{r.items_per_s:>11,.0f} records/s  p50 {r.p50_ms:.2f} ms  "
                          f"p99 {r.p99_ms:.2f} ms" + (f"  ERRORS {r.errors}: {r.note}" if r.errors else ""),
                          flush=True)

    print()
    print(table(runs))
    result = {
        "benchmark": "control_store",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                 "system": platform.platform()},
        "plan": asdict(plan),
        "quick": args.quick,
        "server_src": str(args.server_src or ""),
        "runs": [{"shards": r.shards, "server_rss_mb": r.server_rss_mb, "rows": [asdict(x) for x in r.rows]}
                 for r in runs],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {args.json}")
    return 1 if any(r.errors for run in runs for r in run.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
