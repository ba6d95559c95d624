"""The per-application table the simulator models costs with (documented figures, not measurements).

Job durations: the Pollux traces give each job's application, GPUs and batch size but
not how long it trains. A job's work is ``samples`` (epochs x dataset size of the
application's usual recipe) divided by the throughput of one GPU; on ``n`` GPUs it runs
``n * scaling**log2(n)`` times faster (data-parallel efficiency per doubling, within
nodes; a job spread over more nodes than it needs runs ``CROSS_NODE`` times slower).

=============  ==========================  =========  ==========  ========  =====  ==========
application    model / dataset x epochs    samples    samples/s   scaling   util   state (MB)
                                                      per GPU
=============  ==========================  =========  ==========  ========  =====  ==========
cifar10        ResNet-18 / 50k x 100       5.0e6      1500        0.95      0.55   90
ncf            NeuMF / MovieLens-1M x 20   2.0e7      15000       0.90      0.35   40
deepspeech2    DS2 / LibriSpeech-100 x 80  2.3e6      40          0.92      0.85   350
bert           BERT-base / SQuAD x 2       1.76e5     25          0.93      0.95   1300
imagenet       ResNet-50 / ImageNet x 30   3.84e7     250         0.95      0.95   200
yolov3         YOLOv3 / VOC x 50           8.27e5     30          0.92      0.90   480
=============  ==========================  =========  ==========  ========  =====  ==========

``util`` is the fraction of a GPU's compute one job uses alone (Gandiva's
introspection figure; small models and input pipelines leave much of it idle).
Packing two jobs on the same GPUs: each runs at ``(1 - INTERFERENCE) / max(1, u1 + u2)``
of its speed alone, so a pair gains when ``u1 + u2`` stays near or under 1.
Suspend + resume costs ``0.1 s + state / 1 GB/s``; a migration ``MIGRATION_BASE_S +
state / 1 GB/s`` (process start on the new node, checkpoint moved over the network).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AppProfile:
    samples: float
    samples_per_gpu_s: float
    scaling: float
    util: float
    state_mb: float


PROFILES: dict[str, AppProfile] = {
    "cifar10": AppProfile(5.0e6, 1500.0, 0.95, 0.55, 90.0),
    "ncf": AppProfile(2.0e7, 15000.0, 0.90, 0.35, 40.0),
    "deepspeech2": AppProfile(2.3e6, 40.0, 0.92, 0.85, 350.0),
    "bert": AppProfile(1.76e5, 25.0, 0.93, 0.95, 1300.0),
    "imagenet": AppProfile(3.84e7, 250.0, 0.95, 0.95, 200.0),
    "yolov3": AppProfile(8.27e5, 30.0, 0.92, 0.90, 480.0),
}

INTERFERENCE = 0.10
CROSS_NODE = 0.80
MIGRATION_BASE_S = 2.0
GROW_EXPONENT = 0.8  # an elastic job on k times its GPUs runs k**0.8 times faster


def profile(app: str) -> AppProfile:
    try:
        return PROFILES[app]
    except KeyError:
        raise ValueError(f"unknown application {app!r}; known: {', '.join(sorted(PROFILES))}") from None


def speedup(app: str, gpus: int) -> float:
    """Throughput on ``gpus`` GPUs relative to one."""
    p = profile(app)
    if gpus <= 1:
        return 1.0
    import math

    return gpus * p.scaling ** math.log2(gpus)


def duration_s(app: str, gpus: int) -> float:
    """Seconds the job trains on the GPUs it asked for, alone and local."""
    p = profile(app)
    return p.samples / (p.samples_per_gpu_s * speedup(app, gpus))


def packed_speeds(app_a: str, app_b: str) -> tuple[float, float]:
    """Speed of each of two jobs sharing GPUs, relative to alone."""
    ua, ub = profile(app_a).util, profile(app_b).util
    f = (1 - INTERFERENCE) / max(1.0, ua + ub)
    return f, f


def suspend_resume_s(app: str) -> float:
    return 0.1 + profile(app).state_mb / 1000.0


def migration_s(app: str) -> float:
    return MIGRATION_BASE_S + profile(app).state_mb / 1000.0
