"""``tessera.gpu``: the in-job SDK of the GPU scheduler, and its client.

In a training loop::

    from tessera import gpu

    job = gpu.init(model, optimizer, checkpoint_every=100)
    start = job.restore()                  # 0, or where a suspended / migrated run stopped
    for step in range(start, steps):
        loss = train_one_batch(step)
        job.step(loss=loss.item())         # a mini-batch boundary: suspend / resume happen here
    job.finish(accuracy=evaluate())

Submitting and watching jobs: :class:`GpuClient` (``tessera gpu submit|list|status|kill``).
"""

from tessera.gpu._job import EXIT_STOPPED, Job, current, init
from tessera.gpu.client import GpuClient

__all__ = ["EXIT_STOPPED", "GpuClient", "Job", "current", "init"]
