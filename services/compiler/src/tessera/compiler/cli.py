"""``tessera compile MODEL.py:NAME --shape 1,3,224,224``: compile a model here, with progress,
then print the fused graph and each kernel's time.

NAME is a ``torch.nn.Module`` subclass (built with no arguments), an instance, or a function
returning one. ``--shape`` once per input (``--dtype int64`` for index inputs).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(sub: Any) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("compile", help="compile a PyTorch model to fused C kernels; print the fused graph and kernel times")
    p.add_argument("model", nargs="?", help="MODEL.py:NAME (a Module class, instance or factory)")
    p.add_argument("--shape", action="append", default=[], help="an input shape, e.g. 1,3,224,224 (once per input)")
    p.add_argument("--list-ops", action="store_true", help="print the torch modules, functions and methods the compiler "
                                                            "covers, and exit")
    p.add_argument("--strict", action="store_true", help="refuse a model with ops the compiler does not cover (default: "
                                                          "those run in torch, the rest compiles)")
    p.add_argument("--no-eager-check", action="store_true", help="do not time compiled subgraphs against torch eager "
                                                                 "(by default one slower compiled stays in torch)")
    p.add_argument("--dtype", action="append", default=[], help="an input dtype (float32 or int64), in input order")
    p.add_argument("--repeat", type=int, default=20, help="runs to time")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with torch")
    p.add_argument("--cache-dir", default=None, help="compile cache directory")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="auto-tune the conv/matmul kernels with this many measured trials in all (best schedules are logged)")
    p.add_argument("--tuning-log", default=None, help="JSON tuning log (default: the cluster's control store if one runs, "
                                                       "else tuning.json in the compile cache)")
    return run


class Spinner:
    """One status line, redrawn while a step runs."""

    def __init__(self) -> None:
        self.msg, self.t0 = "", time.perf_counter()
        self._stop = threading.Event()
        self._tty = sys.stderr.isatty()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        frames = "|/-\\"
        i = 0
        while not self._stop.wait(0.1):
            if self._tty and self.msg:
                sys.stderr.write(f"\r{frames[i % 4]} {self.msg} ({time.perf_counter() - self.t0:.1f}s)\033[K")
                sys.stderr.flush()
            i += 1

    def step(self, msg: str) -> None:
        if not self._tty:
            print(f"... {msg}", file=sys.stderr)
        self.msg = msg

    def done(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._tty:
            sys.stderr.write("\r\033[K")


def load_model(spec: str) -> Any:
    import torch

    path, _, name = spec.partition(":")
    if not name or not Path(path).is_file():
        raise SystemExit(f"tessera compile: expected MODEL.py:NAME with an existing file, got {spec!r}")
    mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    mod_spec.loader.exec_module(module)
    obj = getattr(module, name, None)
    if obj is None:
        raise SystemExit(f"tessera compile: {path} has no {name!r}")
    if isinstance(obj, torch.nn.Module):
        return obj
    model = obj()
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"tessera compile: {name} did not give a torch.nn.Module")
    return model


def tuning_log(args: argparse.Namespace) -> Any:
    from tessera.compiler.tune import FileTuningLog

    if args.tuning_log:
        return FileTuningLog(args.tuning_log)
    try:
        from tessera.client import Client
        from tessera.compiler.server import ControlStoreTuningLog

        client = Client(timeout=5.0)
        client.kv_list("compiler_tuning", timeout=2.0)  # reachable?
        return ControlStoreTuningLog(client)
    except Exception:  # no cluster: the compile cache's file
        return None


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from tessera.common.errors import InvalidArgumentError
    from tessera.compiler.api import compile as compile_module
    from tessera.compiler.partition import PartitionedModel

    if args.list_ops:
        from tessera.compiler.frontend import supported_ops

        print("\n".join(supported_ops()))
        return 0
    if not args.model or not args.shape:
        print("tessera compile: MODEL.py:NAME and at least one --shape are needed (or --list-ops)", file=sys.stderr)
        return 2
    try:
        shapes = [tuple(int(d) for d in s.split(",")) for s in args.shape]
    except ValueError:
        print(f"tessera compile: bad --shape {args.shape}", file=sys.stderr)
        return 2
    dtypes = args.dtype + ["float32"] * (len(shapes) - len(args.dtype))
    spin = Spinner()
    try:
        spin.step(f"loading {args.model}")
        model = load_model(args.model).eval()
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randint(0, 2, s, generator=gen) if d == "int64" else torch.randn(s, generator=gen)
                  for s, d in zip(shapes, dtypes, strict=True)]
        spin.step("tracing (torch.fx)")
        log = tuning_log(args)

        def tune_bar(label: str, done: int, total: int, best: float) -> None:
            width = 24
            fill = width * done // max(total, 1)
            spin.step(f"tuning {label:<28} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} best {best:.1f} GFLOP/s")
        cm = compile_module(model, inputs, cache_dir=args.cache_dir, progress=spin.step, tuning_log=log,
                            tune_trials=args.tune, tune_progress=tune_bar, strict=args.strict,
                            keep_faster=not args.no_eager_check)
        if isinstance(cm, PartitionedModel):
            return _run_partitioned(cm, model, inputs, args, spin)
        spin.step("timing")
        per_kernel = cm.profile(*inputs, repeat=max(3, args.repeat // 2))
        total = cm.benchmark(*inputs, repeat=args.repeat)
        err = None
        if not args.no_check:
            with torch.no_grad():
                ref = model(*inputs)
            got = cm(*inputs)
            refs = ref if isinstance(ref, tuple) else (ref,)
            gots = got if isinstance(got, tuple) else (got,)
            err = max(float((g - r).abs().max()) for g, r in zip(gots, refs, strict=True))
    except InvalidArgumentError as e:
        spin.done()
        print(f"tessera compile: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        spin.done()
        if args.tune:  # every measured trial is in the log already
            print("tessera compile: tuning cancelled; the trials measured so far are logged, and the same command "
                  "resumes from them", file=sys.stderr)
        return 130
    spin.done()
    print("fused graph:")
    print(cm.graph.format())
    print()
    print(f"{'#':>3}  {'kernel':<40} {'time (us)':>10} {'GFLOP/s':>9}")
    for i, (label, t, gf) in enumerate(per_kernel):
        print(f"{i:>3}  {label:<40} {t * 1e6:>10.1f} {gf:>9.1f}")
    print()
    s = cm.stats
    if "tune_s" in s:
        print(f"tuned {s['tuned_kernels']} kernels in {s['tune_s']:.1f}s")
    elif s.get("tuned_kernels"):
        print(f"{s['tuned_kernels']} kernels use logged tuned schedules")
    print(f"compile {s['total_s']:.2f}s (passes {s['passes_s']:.2f}s, lowering {s['lower_s']:.2f}s, "
          f"gcc {s['build_s']:.2f}s{', cache hit' if cm.cache_hit else ''}); arena {cm.program.arena_size * 4 / 2**20:.1f} MiB")
    if s.get("vs_eager"):
        tc, te_ = s["vs_eager"]
        print(f"against torch eager at compile time: {tc * 1e6:.0f} us compiled, {te_ * 1e6:.0f} us eager (compiled kept)")
    print(f"whole graph: {total * 1e3:.3f} ms per call (median of {args.repeat})" +
          (f"; max |tessera - torch| = {err:.2e}" if err is not None else ""))
    del np
    return 0


def _max_error(model: Any, got: Any, inputs: list[Any]) -> float:
    import torch

    with torch.no_grad():
        ref = model(*inputs)
    refs = ref if isinstance(ref, tuple) else (ref,)
    gots = got if isinstance(got, tuple) else (got,)
    return max((float((g.float() - r.float()).abs().max()) for g, r in zip(gots, refs, strict=True)), default=0.0)


def _run_partitioned(pm: Any, model: Any, inputs: list[Any], args: argparse.Namespace, spin: Spinner) -> int:
    """Print a partitioned model: its partition (what compiled, what runs in torch and why), then each
    compiled subgraph's fused graph, and the whole model's time against torch eager."""
    import torch

    spin.step("timing")
    total = pm.benchmark(*inputs, repeat=args.repeat)
    with torch.no_grad():
        for _ in range(3):
            model(*inputs)
        eager = sorted(_timed(lambda: model(*inputs)) for _ in range(args.repeat))[args.repeat // 2]
    err = None if args.no_check else _max_error(model, pm(*inputs), inputs)
    spin.done()
    print(pm.report())
    for k, seg in enumerate(pm.segments):
        if seg.kind == "compiled":
            print()
            print(f"fused graph of subgraph [{k}]:")
            print(seg.model.graph.format())
    print()
    print(f"whole model: {total * 1e3:.3f} ms per call, torch eager {eager * 1e3:.3f} ms (median of {args.repeat})" +
          (f"; max |tessera - torch| = {err:.2e}" if err is not None else ""))
    return 0


def _timed(f: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0
