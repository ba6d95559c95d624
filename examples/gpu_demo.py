"""GPU scheduler demo step: two training jobs time-sliced on one GPU slot.

Needs a stack with GPU slots: `tessera up --gpus-per-node 1` (one node, one slot). Call ``run(print_row)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

ENTRY = "tessera.gpu_scheduler.examples:train"


def run(print_row: Callable[..., None] = print) -> None:
    from tessera.gpu import GpuClient
    from tessera.gpu.client import job_to_dict

    with GpuClient() as c:
        slots = sum(n.gpus for n in c.cluster().nodes if n.alive)
        if slots < 1:
            print_row("gpu", "no GPU slots: start the stack with `tessera up --gpus-per-node 1`")
            return
        ids = [c.submit(entry_point=ENTRY, args=["150", str(i), "", "0.01"], name=f"demo-{i}") for i in range(2)]
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            jobs = [job_to_dict(c.status(j)) for j in ids]
            if all(j["state"] in ("SUCCEEDED", "FAILED", "KILLED") for j in jobs):
                break
            time.sleep(1.0)
        for j in [job_to_dict(c.status(j)) for j in ids]:
            print_row("gpu", f"job {j['name']}: {j['state']}, {j['step']} mini-batches, {j['suspensions']} time slices "
                             f"handed over, node {str(j['node_id'])[:8]} slots {j['gpu_slots']}, loss {j['metrics'].get('loss', 0):.3f}")
            if j["state"] not in ("SUCCEEDED", "FAILED", "KILLED"):
                c.kill(j["job_id"])


if __name__ == "__main__":
    run()
