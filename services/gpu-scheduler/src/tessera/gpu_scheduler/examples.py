"""Small training jobs for the demo, the tests and the benchmark (torch on CPU).

``train(steps, seed, out, sleep_s, checkpoint_every, accuracy)``: a seeded MLP trained with
SGD + momentum on batches drawn from torch's RNG, through the :mod:`tessera.gpu` hook; the
final weights go to ``out`` (so runs can be compared bit for bit), and the step its last
process began at to ``out + ".start"``. Each mini-batch reports its loss and the GPUs the job
holds (``gpus``: it changes when the scheduler grows or shrinks an elastic job), and, if
``accuracy`` is given, that validation accuracy (a hyper-parameter trial of known quality,
for early feedback).
"""

from __future__ import annotations

import time
from typing import Any


def tiny_model(seed: int) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt


def train(steps: str = "200", seed: str = "0", out: str = "", sleep_s: str = "0", checkpoint_every: str = "0",
          accuracy: str = "") -> None:
    import torch

    from tessera import gpu

    model, opt = tiny_model(int(seed))
    job = gpu.init(model, opt, checkpoint_every=int(checkpoint_every) or None)
    start = job.restore()
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(start, int(steps)):
        x = torch.randn(16, 32)
        y = torch.randint(0, 10, (16,))
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if float(sleep_s):
            time.sleep(float(sleep_s))
        job.step(loss=loss.item(), gpus=job.gpus, **({"accuracy": float(accuracy)} if accuracy else {}))
    acc = float((model(torch.randn(64, 32)).argmax(1) == torch.randint(0, 10, (64,))).float().mean())
    job.finish(accuracy=acc)
    if out:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
        with open(out + ".start", "w") as f:  # the step this (last) run began at: > 0 after a restore
            f.write(str(start))


def resnet18_like(num_classes: int = 1000) -> Any:
    """A ResNet-18 built from torch.nn (11.7M parameters), for the suspend/resume benchmark."""
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: Any) -> Any:
            y = self.b2(self.c2(self.b1(self.c1(x)).relu()))
            return (y + self.down(x)).relu()

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def train_resnet(steps: str = "1000", seed: str = "0", image: str = "32") -> None:
    """A ResNet-18-sized job (11.7M parameters, SGD + momentum) on small random images, for migration timing."""
    import torch

    from tessera import gpu

    torch.manual_seed(int(seed))
    model = resnet18_like(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    job = gpu.init(model, opt)
    start = job.restore()
    size = int(image)
    for _ in range(start, int(steps)):
        x, y = torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        job.step(loss=loss.item())
    job.finish()
