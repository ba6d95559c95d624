"""Auto-tuning: the search, the cost model, the tuning log and its use by later compiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tessera.compiler.api import compile as compile_module
from tessera.compiler.frontend import from_torch
from tessera.compiler.ir import Op
from tessera.compiler.passes import run_passes
from tessera.compiler.tune import (
    FileTuningLog,
    Tuner,
    anchor_of,
    features,
    logged_knobs,
    merge_record,
    space,
    workload_key,
)


class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(96, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def fused_node(model: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    g = run_passes(from_torch(model.eval(), [x]))
    return g, next(i for i, n in enumerate(g.nodes) if n.op is Op.FUSED and anchor_of(n) == "matmul")


def test_search_space_features_and_model_guided_search(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g, i = fused_node(Lin(), torch.randn(48, 96))
    node = g.nodes[i]
    assert set(space(node)) == {"mm_rows", "mm_cols", "mm_kunroll", "mm_ukernel", "mm_pack", "mm_order"}
    tuner = Tuner(node, cache_dir=str(tmp_path), seed=0)
    f1 = tuner.feature({"mm_rows": 1, "mm_cols": 8, "mm_kunroll": 1, "mm_ukernel": 0, "mm_pack": 0, "mm_order": 0})
    f2 = tuner.feature({"mm_rows": 6, "mm_cols": 16, "mm_kunroll": 4, "mm_ukernel": 1, "mm_pack": 1, "mm_order": 1})
    assert len(f1) == len(f2) and f1 != f2  # features of the lowered loop programs differ
    seen: list[tuple[int, int, float]] = []
    res = tuner.tune(5, strategy="model", top_k=2, progress=lambda d, t, b: seen.append((d, t, b)))
    assert len(res.trials) == 5 and [d for d, _, _ in seen] == list(range(1, 6))  # the 5th proposed by the trained model
    assert res.history == sorted(res.history) and res.best.gflops == res.history[-1] > 0
    assert len({tuple(sorted(m.knobs.items())) for m in res.trials}) == 5  # no candidate measured twice


def test_every_candidate_computes_the_same_result(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Lin().eval(), torch.randn(13, 96)
    ref = model(x).detach().numpy()
    g, i = fused_node(model, x)
    tuner = Tuner(g.nodes[i], seed=3)
    for _ in range(3):
        knobs = tuner.random_knobs()
        cm = compile_module(model, [x], cache_dir=str(tmp_path), knobs={i: knobs})
        np.testing.assert_allclose(cm(x.numpy()), ref, rtol=1e-4, atol=1e-5, err_msg=str(knobs))


def test_logged_schedules_are_used_by_later_compiles(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Lin().eval(), torch.randn(48, 96)
    log = FileTuningLog(tmp_path / "tuning.json")
    tuned = compile_module(model, [x], cache_dir=str(tmp_path), tuning_log=log, tune_trials=4)
    assert tuned.stats["tuned_kernels"] == 1
    g, i = fused_node(model, x)
    rec = log.get(workload_key(g.nodes[i]))
    assert rec is not None and rec["trials"] >= 4 and rec["gflops"] > 0
    # another model with the same workload (other weights) picks the logged schedule up
    other = Lin().eval()
    again = compile_module(other, [x], cache_dir=str(tmp_path), tuning_log=log)
    assert again.stats["tuned_kernels"] == 1 and logged_knobs(g, log) == {i: rec["knobs"]}
    np.testing.assert_allclose(again(x.numpy()), other(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert features  # the feature extractor is the model's input (covered above)


def test_tuning_resumes_from_the_log(tmp_path: Path) -> None:
    """Each trial is logged as it is measured; a later tuning with a larger budget measures only the rest."""
    torch.manual_seed(0)
    model, x = Lin().eval(), torch.randn(48, 96)
    log = FileTuningLog(tmp_path / "tuning.json")
    g, i = fused_node(model, x)
    key = workload_key(g.nodes[i])
    seen: list[tuple[int, int]] = []
    compile_module(model, [x], cache_dir=str(tmp_path), tuning_log=log, tune_trials=3,
                   tune_progress=lambda _l, d, t, _b: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    first = log.get(key)
    assert first is not None and first["trials"] == 3
    seen.clear()
    compile_module(model, [x], cache_dir=str(tmp_path), tuning_log=log, tune_trials=3,
                   tune_progress=lambda _l, d, t, _b: seen.append((d, t)))
    assert seen == [(3, 3)]  # nothing left to measure
    seen.clear()
    compile_module(model, [x], cache_dir=str(tmp_path), tuning_log=log, tune_trials=5,
                   tune_progress=lambda _l, d, t, _b: seen.append((d, t)))
    assert seen == [(4, 5), (5, 5)]
    again = log.get(key)
    assert again is not None and again["trials"] == 5 and again["gflops"] >= first["gflops"]


def test_log_records_keep_the_best_schedule_and_the_most_trials() -> None:
    old = {"knobs": {"a": 1}, "gflops": 10.0, "trials": 4}
    assert merge_record(None, old) == old
    assert merge_record(old, {"knobs": {"a": 2}, "gflops": 5.0, "trials": 4}) is None
    assert merge_record(old, {"knobs": {"a": 2}, "gflops": 5.0, "trials": 6}) == {**old, "trials": 6}
    assert merge_record(old, {"knobs": {"a": 3}, "gflops": 12.0, "trials": 2}) == {"knobs": {"a": 3}, "gflops": 12.0, "trials": 4}
