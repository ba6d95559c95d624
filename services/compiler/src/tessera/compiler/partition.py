"""Partitioning with fallback to torch: the ops the compiler covers compile, the rest run in torch.

:func:`partition` cuts a :class:`~tessera.compiler.frontend.Traced` model, in the order of its fx
graph, into segments: maximal runs of converted nodes (one IR subgraph each, compiled) and the
nodes left to torch between them (each with why). :class:`PartitionedModel` runs the segments in
order behind one callable with the model's signature; values cross segments as torch tensors.

When torch.fx cannot trace the model at all (data-dependent control flow), the whole model is one
torch segment, and the report says where the trace broke. With ``keep_faster``, a compiled segment
measured slower than torch eager on the same nodes goes back to torch, and the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError
from tessera.compiler.frontend import _V, Traced
from tessera.compiler.ir import Graph, GraphBuilder, Node, Op


@dataclass
class Segment:
    """One piece of the model: ``kind`` "compiled" (``graph`` over IR values ``inputs`` -> ``outputs``
    of the whole trace), "torch" (``nodes`` run by torch; ``reason`` says why) or "python" (converted
    nodes that only unpack tuples: run as they are)."""

    kind: str
    nodes: list[Any]
    reason: str = ""
    graph: Graph | None = None
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    model: Any = None  # the compiled subgraph (a CompiledModel), once built
    times: tuple[float, float] | None = None  # (compiled, eager) seconds, when measured

    def label(self) -> str:
        ops = sorted({_op_name(n) for n in self.nodes})
        return ", ".join(ops[:6]) + (f", ... ({len(ops)} kinds)" if len(ops) > 6 else "")


def _op_name(n: Any) -> str:
    if n.op == "call_module":
        return str(n.target)
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    return getattr(n.target, "__name__", str(n.target))


def _ids(v: Any) -> list[int]:
    if isinstance(v, _V):
        return [v.id]
    if isinstance(v, tuple | list):
        return [i for x in v for i in _ids(x)]
    if isinstance(v, dict):
        return [i for x in v.values() for i in _ids(x)]
    return []


def partition(traced: Traced) -> list[Segment]:
    """Segments in fx order: runs of converted nodes, and the torch nodes between them."""
    segs: list[Segment] = []
    for n in traced.nodes:
        kind = traced.kind.get(n)
        if n.op in ("placeholder", "output", "get_attr") or kind == "static" or kind is None:
            continue
        want = "torch" if kind == "torch" else "compiled"
        if segs and segs[-1].kind == want:
            segs[-1].nodes.append(n)
            if want == "torch":
                segs[-1].reason += f"; {_reason(traced, n)}"
        else:
            segs.append(Segment(want, [n], _reason(traced, n) if want == "torch" else ""))
    nodes = traced.conv.b.nodes
    # which IR values each later consumer needs: IR nodes outside the run, torch nodes' args, the outputs
    fx_order = {n: k for k, n in enumerate(traced.nodes)}
    needed_after: dict[int, int] = {}  # IR id -> the last fx position that reads it

    def need(i: int, pos: int) -> None:
        needed_after[i] = max(needed_after.get(i, -1), pos)
    for n in traced.nodes:
        pos = fx_order[n]
        if traced.kind.get(n) == "torch" or n.op == "output":
            for a in n.all_input_nodes:
                for i in _ids(traced.ir(a)):
                    need(i, pos)
        elif n in traced.ranges:
            lo, hi = traced.ranges[n]
            for j in range(lo, hi):
                for i in nodes[j].inputs:
                    if i < lo:
                        need(i, pos)
    for s in segs:
        if s.kind == "compiled":
            if all(traced.ranges[n][0] == traced.ranges[n][1] for n in s.nodes):
                s.kind = "python"  # only picks values out of tuples (``out, _ = lstm(x)``): no kernel to build
            else:
                _cut(traced, s, needed_after, fx_order)
    return segs


def _reason(traced: Traced, n: Any) -> str:
    why, where = traced.torch_nodes.get(n, ("", ""))
    return f"{n.name}: {why}" + ("" if where in why else f" [{where}]")


def _cut(traced: Traced, seg: Segment, needed_after: dict[int, int], fx_order: dict[Any, int]) -> None:
    """The IR subgraph of a run of converted fx nodes: its external values become inputs (constants are
    copied in), and the values read after the run become outputs."""
    nodes = traced.conv.b.nodes
    consts = traced.conv.b.consts
    members: list[int] = []
    for n in seg.nodes:
        lo, hi = traced.ranges[n]
        members.extend(range(lo, hi))
    mset = set(members)
    last = fx_order[seg.nodes[-1]]
    b = GraphBuilder()
    local: dict[int, int] = {}

    def bind(i: int) -> int:
        if i in local:
            return local[i]
        n = nodes[i]
        if n.op is Op.CONST:
            local[i] = b.const(consts[n.attrs["key"]], n.name)
        elif i in mset:
            local[i] = b.add(Node(n.op, tuple(bind(j) for j in n.inputs), n.shape, n.dtype, dict(n.attrs), n.name))
        else:
            local[i] = b.input(n.shape, n.dtype, n.name or f"v{i}")
            seg.inputs.append(i)
        return local[i]
    for i in members:
        bind(i)
    outs = [i for i in members if needed_after.get(i, -1) > last and nodes[i].op is not Op.CONST]
    if not outs:  # nothing read later: still one output, so that the subgraph is not empty
        outs = [members[-1]]
    seg.outputs = outs
    seg.graph = b.build([local[i] for i in outs])


class PartitionedModel:
    """A model whose compiled segments run as native kernels and the rest in torch, behind the model's
    signature: tensors or numpy arrays in, the model's outputs (torch tensors, or numpy arrays for numpy
    inputs) out. Inputs are checked against the example inputs' shapes and dtypes."""

    def __init__(self, module: Any, traced: Traced | None, segments: list[Segment], input_specs: list[tuple[tuple[int, ...], Any]],
                 whole_reason: str = "") -> None:
        self.module, self.traced, self.segments = module, traced, segments
        self.input_specs = input_specs
        self.whole_reason = whole_reason  # why the whole model runs in torch, when it does

    # ------------------------------------------------------------------ calling

    def _check(self, args: Sequence[Any]) -> tuple[list[Any], bool]:
        import torch

        if len(args) != len(self.input_specs):
            raise InvalidArgumentError(f"the model takes {len(self.input_specs)} inputs, got {len(args)}")
        out, numpy_in = [], False
        for k, (a, (shape, dtype)) in enumerate(zip(args, self.input_specs, strict=True)):
            if isinstance(a, np.ndarray):
                numpy_in = True
                a = torch.from_numpy(np.ascontiguousarray(a))
            elif not isinstance(a, torch.Tensor):
                raise InvalidArgumentError(f"input {k} is a {type(a).__name__}, not a tensor or numpy array")
            if tuple(a.shape) != tuple(shape):
                raise InvalidArgumentError(f"input {k} has shape {list(a.shape)}, the model was compiled for {list(shape)}")
            out.append(convert_dtype(a, dtype, k))
        return out, numpy_in

    def __call__(self, *args: Any) -> Any:
        import torch

        ins, numpy_in = self._check(args)
        with torch.no_grad():
            res = self._run(ins)
        if numpy_in:
            return tuple(r.numpy() for r in res) if isinstance(res, tuple) else res.numpy()
        return res

    def _run(self, ins: list[Any], eager_only: bool = False) -> Any:
        if self.traced is None:
            return self.module(*ins)
        tr = self.traced
        vals: dict[int, Any] = {}
        placeholders = [n for n in tr.nodes if n.op == "placeholder"]
        for n, x in zip(placeholders, ins, strict=True):
            vals[tr.ir(n).id] = x
        for seg in self.segments:
            if seg.kind == "compiled" and not eager_only:
                outs = seg.model(*[_feed(vals[i]) for i in seg.inputs])
                outs = outs if isinstance(outs, tuple) else (outs,)
                for i, o in zip(seg.outputs, outs, strict=True):
                    vals[i] = o
            else:
                for n in seg.nodes:
                    self._torch_node(n, vals)
        return _value(tr, tr.output_node.args[0], vals)

    def _torch_node(self, n: Any, vals: dict[int, Any]) -> None:
        import torch.fx

        tr = self.traced
        assert tr is not None
        args = torch.fx.node.map_arg(n.args, lambda a: _value(tr, a, vals))
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: _value(tr, a, vals))
        if n.op == "call_module":
            result = tr.gm.get_submodule(n.target)(*args, **kwargs)
        elif n.op == "call_function":
            result = n.target(*args, **kwargs)
        elif n.op == "call_method":
            result = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise InvalidArgumentError(f"cannot run fx node {n.name} ({n.op}) in torch")
        _bind(tr.ir(n), result, vals)

    # ------------------------------------------------------------------ measuring and reporting

    def keep_faster(self, example_inputs: Sequence[Any], repeat: int = 10) -> None:
        """Time each compiled segment against torch eager on the same nodes and inputs; a segment that is
        slower compiled goes back to torch (its report line says so, with both times)."""
        import torch

        if self.traced is None:
            return
        ins, _ = self._check(example_inputs)
        vals: dict[int, Any] = {}
        tr = self.traced
        for n, x in zip([n for n in tr.nodes if n.op == "placeholder"], ins, strict=True):
            vals[tr.ir(n).id] = x
        with torch.no_grad():
            for seg in self.segments:
                if seg.kind == "compiled":
                    feed = [_feed(vals[i]) for i in seg.inputs]
                    before = dict(vals)

                    def eager(seg: Segment = seg, before: dict[int, Any] = before) -> None:
                        v = dict(before)
                        for n in seg.nodes:
                            self._torch_node(n, v)
                    def compiled(seg: Segment = seg, feed: list[Any] = feed) -> None:
                        seg.model(*feed)
                    t_c = median_time(compiled, repeat)
                    t_e = median_time(eager, repeat)
                    seg.times = (t_c, t_e)
                    if t_c > t_e:
                        seg.kind = "torch"
                        seg.reason = (f"slower compiled than in torch eager ({t_c * 1e6:.0f} us against "
                                      f"{t_e * 1e6:.0f} us): kept in torch")
                for n in seg.nodes:
                    self._torch_node(n, vals)

    def benchmark(self, *args: Any, repeat: int = 20, warmup: int = 3) -> float:
        """Median seconds of one call."""
        import torch

        ins, _ = self._check(args)
        with torch.no_grad():
            for _ in range(warmup):
                self._run(ins)
            return median_time(lambda: self._run(ins), repeat)

    def report(self) -> str:
        """The partition: each segment, compiled (kernels) or left to torch (why)."""
        if self.traced is None:
            return f"the whole model runs in torch: {self.whole_reason}"
        lines = []
        n_c = sum(s.kind == "compiled" for s in self.segments)
        n_t = sum(len(s.nodes) for s in self.segments if s.kind == "torch")
        n_p = sum(s.kind == "python" for s in self.segments)
        lines.append(f"partition: {n_c} compiled subgraph(s), {n_t} op(s) left to torch"
                     + (f", {n_p} tuple unpacking step(s)" if n_p else ""))
        for k, s in enumerate(self.segments):
            timing = f"; {s.times[0] * 1e6:.0f} us compiled, {s.times[1] * 1e6:.0f} us eager" if s.times else ""
            if s.kind == "compiled":
                kernels = len(s.model.program.calls) if s.model is not None and hasattr(s.model, "program") else "?"
                lines.append(f"  [{k}] compiled: {len(s.nodes)} op(s) -> {kernels} kernel(s): {s.label()}{timing}")
            elif s.kind == "torch":
                lines.append(f"  [{k}] torch: {len(s.nodes)} op(s): {s.label()}{timing}")
                for why in s.reason.split("; "):
                    lines.append(f"        {why}")
        return "\n".join(lines)

    @property
    def compiled_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "compiled"]


def convert_dtype(a: Any, dtype: Any, k: int) -> Any:
    """An input in the dtype the model was compiled for: other floating dtypes (and integers, for a
    float input) are converted; anything else is refused by name."""
    import torch

    if a.dtype == dtype:
        return a
    if dtype == torch.float32 and (a.dtype.is_floating_point or not a.dtype.is_complex and a.dtype != torch.bool):
        return a.to(torch.float32)
    if dtype == torch.int64 and not a.dtype.is_floating_point and not a.dtype.is_complex and a.dtype != torch.bool:
        return a.to(torch.int64)
    raise InvalidArgumentError(f"input {k} has dtype {str(a.dtype).replace('torch.', '')}, the model takes "
                               f"{str(dtype).replace('torch.', '')}")


def _feed(t: Any) -> Any:
    import torch

    return t.to(torch.float32) if t.dtype == torch.bool else t


def _bind(ir: Any, result: Any, vals: dict[int, Any]) -> None:
    if isinstance(ir, _V):
        vals[ir.id] = result
    elif isinstance(ir, tuple | list) and isinstance(result, tuple | list):
        for i, r in zip(ir, result, strict=False):
            _bind(i, r, vals)


def _value(tr: Traced, a: Any, vals: dict[int, Any]) -> Any:
    """An fx argument's runtime value: tensors from ``vals`` (in the dtype torch gave at trace time)."""
    import torch.fx

    if isinstance(a, torch.fx.Node):
        if a.op == "get_attr":
            return _attr(tr.gm, str(a.target))
        if tr.kind.get(a) == "static":
            return tr.results[a]
        return _restore(tr, tr.ir(a), tr.results.get(a), vals)
    if isinstance(a, tuple | list):
        return type(a)(_value(tr, x, vals) for x in a)
    if isinstance(a, dict):
        return {k: _value(tr, v, vals) for k, v in a.items()}
    return a


def _attr(root: Any, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _restore(tr: Traced, ir: Any, dtypes: Any, vals: dict[int, Any]) -> Any:
    import torch

    if isinstance(ir, _V):
        if ir.id in vals:
            t = vals[ir.id]
        else:  # a constant (a parameter passed through a converted node)
            node = tr.conv.b.nodes[ir.id]
            t = torch.from_numpy(np.array(tr.conv.b.consts[node.attrs["key"]]))
        if not isinstance(t, torch.Tensor):
            t = torch.from_numpy(t)
        return t.to(dtypes) if dtypes is not None and t.dtype != dtypes else t
    if isinstance(ir, tuple | list):
        ds = dtypes if isinstance(dtypes, tuple | list) else [None] * len(ir)
        return type(ir)(_restore(tr, i, d, vals) for i, d in zip(ir, ds, strict=False))
    return ir


def median_time(f: Callable[[], Any], repeat: int) -> float:
    f()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


__all__ = ["PartitionedModel", "Segment", "convert_dtype", "median_time", "partition"]
