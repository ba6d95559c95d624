"""Compiler demo step: a small CNN compiled by the cluster's compiler service, run there and here.

Needs a stack started by `tessera up`. Call ``run(print_row)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def run(print_row: Callable[..., None] = print) -> None:
    import numpy as np
    import torch
    from torch import nn

    from tessera.compiler import compile as compile_locally
    from tessera.compiler.client import CompilerClient

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10), nn.Softmax(-1),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    with CompilerClient(timeout=300) as c:
        t0 = time.perf_counter()
        info = c.compile(model, [x])
        print_row("compiler", f"artifact {info.artifact_id[:12]} built by {info.compiled_by} in {time.perf_counter() - t0:.1f}s: "
                              f"{len(info.kernels)} kernels ({', '.join(k.label for k in info.kernels)})")
        (y,) = c.run(info.artifact_id, [x.numpy()])
        print_row("compiler", f"Run on the service: max |tessera - torch| = {np.abs(y - ref).max():.1e}")
    cm = compile_locally(model, [x])
    t = cm.benchmark(x, repeat=50)
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(50):
            model(x)
        eager = (time.perf_counter() - t0) / 50
    print_row("compiler", f"in process: {t * 1e6:.0f} us per call vs torch eager {eager * 1e6:.0f} us "
                          f"(max error {np.abs(cm(x.numpy()) - ref).max():.1e})")


if __name__ == "__main__":
    run()
