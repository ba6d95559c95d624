"""PyTorch -> graph IR, through torch.fx.

The module is traced symbolically, then interpreted once on the example inputs: every fx node
runs for real (so shapes, ``x.size(0)`` and other Python values are concrete) and is mapped to
IR nodes. Parameters and buffers become constants. An op with no mapping raises
:class:`UnsupportedOpError` naming the op and where it is in the model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError
from tessera.compiler.ir import ELEMENTWISE_BINARY, Graph, GraphBuilder, Node, Op, broadcast_shape


class UnsupportedOpError(InvalidArgumentError):
    """The model uses an operation the compiler does not cover."""


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


class _Converter:
    def __init__(self, root: Any) -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812

        self.torch, self.F, self.root = torch, F, root
        self.b = GraphBuilder()
        self.ir: dict[Any, Any] = {}  # fx node -> IR value (_V) or a Python value
        self.param_ids: dict[int, int] = {}
        nn = torch.nn
        self.modules: dict[type, Callable[..., int]] = {
            nn.Conv2d: self.m_conv, nn.BatchNorm2d: self.m_bn, nn.Linear: self.m_linear,
            nn.ReLU: lambda m, x: self.unary(Op.RELU, x), nn.Sigmoid: lambda m, x: self.unary(Op.SIGMOID, x),
            nn.Tanh: lambda m, x: self.unary(Op.TANH, x), nn.SiLU: lambda m, x: self.unary(Op.SILU, x),
            nn.GELU: lambda m, x: self.unary(Op.GELU_TANH if m.approximate == "tanh" else Op.GELU, x),
            nn.Identity: lambda m, x: x, nn.Dropout: lambda m, x: x,
            nn.Flatten: lambda m, x: self.flatten(x, m.start_dim, m.end_dim),
            nn.MaxPool2d: lambda m, x: self.pool(Op.MAX_POOL, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode),
            nn.AvgPool2d: lambda m, x: self.avgpool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                                    m.divisor_override),
            nn.AdaptiveAvgPool2d: lambda m, x: self.adaptive(x, m.output_size),
            nn.Softmax: lambda m, x: self.softmax(x, m.dim),
            nn.LayerNorm: lambda m, x: self.layer_norm(x, m.normalized_shape, self.param(m.weight), self.param(m.bias), m.eps),
            nn.Embedding: lambda m, x: self.embedding(x, self.param(m.weight)),
        }
        F_ = F
        self.functions: dict[Any, Callable[..., int | Any]] = {
            operator.add: lambda a, b: self.binary(Op.ADD, a, b), torch.add: self.f_add,
            operator.sub: lambda a, b: self.binary(Op.SUB, a, b), torch.sub: lambda a, b: self.binary(Op.SUB, a, b),
            operator.mul: lambda a, b: self.binary(Op.MUL, a, b), torch.mul: lambda a, b: self.binary(Op.MUL, a, b),
            operator.truediv: lambda a, b: self.binary(Op.DIV, a, b), torch.div: lambda a, b: self.binary(Op.DIV, a, b),
            operator.neg: lambda a: self.unary(Op.NEG, a), torch.neg: lambda a: self.unary(Op.NEG, a),
            torch.maximum: lambda a, b: self.binary(Op.MAXIMUM, a, b),
            torch.relu: lambda x: self.unary(Op.RELU, x), F_.relu: lambda x, inplace=False: self.unary(Op.RELU, x),
            torch.sigmoid: lambda x: self.unary(Op.SIGMOID, x), F_.sigmoid: lambda x: self.unary(Op.SIGMOID, x),
            torch.tanh: lambda x: self.unary(Op.TANH, x), F_.tanh: lambda x: self.unary(Op.TANH, x),
            F_.silu: lambda x, inplace=False: self.unary(Op.SILU, x),
            F_.gelu: lambda x, approximate="none": self.unary(Op.GELU_TANH if approximate == "tanh" else Op.GELU, x),
            torch.exp: lambda x: self.unary(Op.EXP, x), torch.sqrt: lambda x: self.unary(Op.SQRT, x),
            torch.rsqrt: lambda x: self.unary(Op.RSQRT, x),
            torch.flatten: lambda x, start_dim=0, end_dim=-1: self.flatten(x, start_dim, end_dim),
            torch.reshape: lambda x, *shape: self.reshape(x, shape),
            torch.transpose: lambda x, a, b: self.transpose(x, a, b), torch.permute: lambda x, *p: self.permute(x, p),
            torch.cat: self.cat, torch.concat: self.cat,
            operator.getitem: self.getitem,
            torch.matmul: self.matmul, operator.matmul: self.matmul, torch.bmm: self.matmul,
            F_.linear: lambda x, w, b=None: self.linear(x, w, b),
            F_.softmax: lambda x, dim=None, _stacklevel=3, dtype=None: self.softmax(x, dim),
            torch.softmax: lambda x, dim, dtype=None: self.softmax(x, dim),
            F_.layer_norm: lambda x, shape, weight=None, bias=None, eps=1e-5: self.layer_norm(x, shape, weight, bias, eps),
            F_.max_pool2d: self.f_maxpool, F_.avg_pool2d: self.f_avgpool,
            F_.adaptive_avg_pool2d: lambda x, output_size: self.adaptive(x, output_size),
            F_.embedding: lambda x, w, *a, **k: self.embedding(x, w),
            F_.conv2d: self.f_conv, F_.dropout: lambda x, *a, **k: x,
            torch.mean: self.mean, torch.sum: self.sum, getattr: getattr,
        }
        self.functions.update(self._aten())
        self.methods: dict[str, Callable[..., int | Any]] = {
            "view": lambda x, *s: self.reshape(x, s), "reshape": lambda x, *s: self.reshape(x, s),
            "flatten": lambda x, start_dim=0, end_dim=-1: self.flatten(x, start_dim, end_dim),
            "permute": lambda x, *p: self.permute(x, p), "transpose": lambda x, a, b: self.transpose(x, a, b),
            "contiguous": lambda x: x,
            "add": lambda a, b: self.binary(Op.ADD, a, b), "sub": lambda a, b: self.binary(Op.SUB, a, b),
            "mul": lambda a, b: self.binary(Op.MUL, a, b), "div": lambda a, b: self.binary(Op.DIV, a, b),
            "relu": lambda x: self.unary(Op.RELU, x), "sigmoid": lambda x: self.unary(Op.SIGMOID, x),
            "tanh": lambda x: self.unary(Op.TANH, x), "exp": lambda x: self.unary(Op.EXP, x),
            "softmax": lambda x, dim: self.softmax(x, dim), "mean": self.mean,
            "unsqueeze": lambda x, d: self.unsqueeze(x, d), "squeeze": lambda x, d=None: self.squeeze(x, d),
            "t": lambda x: self.transpose(x, 0, 1), "matmul": self.matmul, "sum": self.sum,
        }

    def _aten(self) -> dict[Any, Callable[..., Any]]:
        """The ATen ops of a torch.export program (its module), onto the same handlers."""
        a = self.torch.ops.aten
        ident = lambda x, *_, **__: x  # noqa: E731
        table: dict[Any, Callable[..., Any]] = {
            a.conv2d.default: self.f_conv,
            a.batch_norm.default: self.f_bn,
            a.relu.default: lambda x: self.unary(Op.RELU, x), a.sigmoid.default: lambda x: self.unary(Op.SIGMOID, x),
            a.tanh.default: lambda x: self.unary(Op.TANH, x), a.silu.default: lambda x: self.unary(Op.SILU, x),
            a.gelu.default: lambda x, approximate="none": self.unary(Op.GELU_TANH if approximate == "tanh" else Op.GELU, x),
            a.exp.default: lambda x: self.unary(Op.EXP, x), a.sqrt.default: lambda x: self.unary(Op.SQRT, x),
            a.rsqrt.default: lambda x: self.unary(Op.RSQRT, x), a.neg.default: lambda x: self.unary(Op.NEG, x),
            a.add.Tensor: self.f_add, a.sub.Tensor: lambda x, y, alpha=1: self.binary(Op.SUB, x, y),
            a.mul.Tensor: lambda x, y: self.binary(Op.MUL, x, y), a.div.Tensor: lambda x, y: self.binary(Op.DIV, x, y),
            a.linear.default: lambda x, w, b=None: self.linear(x, w, b),
            a.view.default: lambda x, size: self.reshape(x, size), a.reshape.default: lambda x, size: self.reshape(x, size),
            a.flatten.using_ints: lambda x, start_dim=0, end_dim=-1: self.flatten(x, start_dim, end_dim),
            a.permute.default: lambda x, dims: self.permute(x, dims), a.transpose.int: self.transpose,
            a.t.default: lambda x: self.transpose(x, 0, 1), a.unsqueeze.default: self.unsqueeze,
            a.squeeze.dim: self.squeeze,
            a.matmul.default: self.matmul, a.mm.default: self.matmul, a.bmm.default: self.matmul,
            a.softmax.int: lambda x, dim, dtype=None: self.softmax(x, dim),
            a.layer_norm.default: lambda x, shape, w=None, b=None, eps=1e-5, cudnn=True: self.layer_norm(x, shape, w, b, eps),
            a.max_pool2d.default: self.f_maxpool, a.avg_pool2d.default: self.f_avgpool,
            a.adaptive_avg_pool2d.default: lambda x, output_size: self.adaptive(x, output_size),
            a.cat.default: self.cat, a.mean.dim: self.mean, a.sum.dim_IntList: self.sum,
            a.embedding.default: lambda w, idx, *_: self.embedding(idx, w),
            a.slice.Tensor: self.aten_slice,
            a.dropout.default: ident, a.clone.default: ident, a.contiguous.default: ident,
        }
        return table

    def f_bn(self, x: Any, w: Any, b: Any, mean: Any, var: Any, training: bool = False, momentum: float = 0.1,
             eps: float = 1e-5, cudnn: bool = True) -> int:
        if training or mean is None:
            raise UnsupportedOpError("batch_norm in training mode or without running statistics (export the model in eval mode)")
        x = _i(x)
        c = self.shape(x)[1]
        wid = _id(self, w) if w is not None else self.b.const(np.ones(c, np.float32))
        bid = _id(self, b) if b is not None else self.b.const(np.zeros(c, np.float32))
        return self.add(Op.BATCH_NORM, [x, wid, bid, _id(self, mean), _id(self, var)], self.shape(x), {"eps": float(eps)})

    def aten_slice(self, x: Any, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> Any:
        idx: list[Any] = [slice(None)] * len(self.shape(_i(x)))
        idx[dim] = slice(start, end, step)
        return self.getitem(x, tuple(idx))

    # ------------------------------------------------------------------ helpers

    def shape(self, v: int) -> tuple[int, ...]:
        return self.b.nodes[v].shape

    def param(self, t: Any) -> int | None:
        if t is None:
            return None
        key = id(t)
        if key not in self.param_ids:
            self.param_ids[key] = self.b.const(_np(t).astype(np.float32) if t.is_floating_point() else _np(t))
        return self.param_ids[key]

    def scalar(self, x: float) -> int:
        return self.b.const(np.array(x, np.float32))

    def add(self, op: Op, ins: Sequence[int], shape: Sequence[int], attrs: dict[str, Any] | None = None, dtype: str = "float32") -> int:
        return self.b.add(Node(op, tuple(ins), tuple(int(s) for s in shape), dtype, attrs or {}, self.fx_name))

    # ------------------------------------------------------------------ ops

    def unary(self, op: Op, x: Any) -> int:
        x = _i(x)
        return self.add(op, [x], self.shape(x))

    def binary(self, op: Op, a: Any, b: Any) -> int:
        if not isinstance(a, _V) and not isinstance(b, _V):
            raise UnsupportedOpError(f"{op.value} of two non-tensors")
        ia = a.id if isinstance(a, _V) else self.scalar(float(a))
        ib = b.id if isinstance(b, _V) else self.scalar(float(b))
        return self.add(op, [ia, ib], broadcast_shape(self.shape(ia), self.shape(ib)))

    def f_add(self, a: Any, b: Any, alpha: float = 1) -> int:
        if alpha != 1:
            b = _V(self.binary(Op.MUL, b, alpha))
        return self.binary(Op.ADD, a, b)

    def reshape(self, x: Any, shape: Sequence[Any]) -> int:
        x = _i(x)
        if len(shape) == 1 and isinstance(shape[0], list | tuple):
            shape = shape[0]
        shape = [int(s) for s in shape]
        total = math.prod(self.shape(x))
        if -1 in shape:
            k = shape.index(-1)
            shape[k] = total // max(1, -math.prod(shape))
        if math.prod(shape) != total:
            raise InvalidArgumentError(f"cannot reshape {list(self.shape(x))} to {shape}")
        return self.add(Op.RESHAPE, [x], shape)

    def flatten(self, x: Any, start: int = 0, end: int = -1) -> int:
        x = _i(x)
        s = list(self.shape(x))
        if not s:
            return self.reshape(x, [1])
        start, end = start % len(s), end % len(s)
        return self.reshape(x, s[:start] + [math.prod(s[start:end + 1])] + s[end + 1:])

    def unsqueeze(self, x: Any, d: int) -> int:
        x = _i(x)
        s = list(self.shape(x))
        s.insert(d % (len(s) + 1), 1)
        return self.reshape(x, s)

    def squeeze(self, x: Any, d: int | None) -> int:
        x = _i(x)
        s = list(self.shape(x))
        if d is None:
            return self.reshape(x, [v for v in s if v != 1])
        d = d % len(s)
        return self.reshape(x, s[:d] + s[d + 1:] if s[d] == 1 else s)

    def permute(self, x: Any, perm: Sequence[Any]) -> int:
        x = _i(x)
        if len(perm) == 1 and isinstance(perm[0], list | tuple):
            perm = perm[0]
        s = self.shape(x)
        perm = [int(p) % len(s) for p in perm]
        return self.add(Op.TRANSPOSE, [x], [s[p] for p in perm], {"perm": tuple(perm)})

    def transpose(self, x: Any, a: int, b: int) -> int:
        x = _i(x)
        perm = list(range(len(self.shape(x))))
        a, b = a % len(perm), b % len(perm)
        perm[a], perm[b] = perm[b], perm[a]
        return self.permute(x, perm)

    def cat(self, xs: Sequence[Any], dim: int = 0, axis: int | None = None) -> int:
        ids = [_i(v) for v in xs]
        d = (axis if axis is not None else dim) % len(self.shape(ids[0]))
        s = list(self.shape(ids[0]))
        s[d] = sum(self.shape(i)[d] for i in ids)
        return self.add(Op.CONCAT, ids, s, {"axis": d})

    def getitem(self, x: Any, idx: Any) -> Any:
        if not isinstance(x, _V):
            return x[idx]
        if not isinstance(idx, tuple):
            idx = (idx,)
        shape = self.shape(x.id)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            fill = len(shape) - (len(idx) - 1 - sum(i is None for i in idx))
            idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
        starts, steps, out, final = [], [], [], []
        d = 0
        for i in idx:
            if i is None:
                final.append(1)
                continue
            if isinstance(i, int):
                n = shape[d]
                starts.append(i % n)
                steps.append(1)
                out.append(1)
            elif isinstance(i, slice):
                r = range(*i.indices(shape[d]))
                if len(r) == 0:
                    raise UnsupportedOpError("an empty slice")
                starts.append(r.start)
                steps.append(r.step)
                out.append(len(r))
                final.append(len(r))
            else:
                raise UnsupportedOpError(f"indexing with {type(i).__name__}")
            d += 1
        for n in shape[d:]:
            starts.append(0)
            steps.append(1)
            out.append(n)
            final.append(n)
        v = x.id
        if tuple(out) != shape or any(starts) or any(s != 1 for s in steps):
            v = self.add(Op.SLICE, [v], out, {"starts": tuple(starts), "steps": tuple(steps)})
        return self.reshape(v, final) if tuple(final) != tuple(out) else v

    def matmul(self, a: Any, b: Any) -> int:
        ia, ib = _id(self, a), _id(self, b)
        sa, sb = self.shape(ia), self.shape(ib)
        if len(sa) == 1:
            ia = self.reshape(ia, [1, sa[0]])
        if len(sb) == 1:
            ib = self.reshape(ib, [sb[0], 1])
        sa, sb = self.shape(ia), self.shape(ib)
        if sa[-1] != sb[-2]:
            raise InvalidArgumentError(f"matmul of {list(sa)} and {list(sb)}")
        batch = broadcast_shape(sa[:-2], sb[:-2])
        out = self.add(Op.MATMUL, [ia, ib], [*batch, sa[-2], sb[-1]])
        return out

    def linear(self, x: Any, w: Any, b: Any) -> int:
        wid = _id(self, w)
        wt = self.add(Op.TRANSPOSE, [wid], self.shape(wid)[::-1], {"perm": (1, 0)})
        y = self.matmul(x, _V(wt))
        if b is not None:
            bid = _id(self, b)
            y = self.add(Op.ADD, [y, bid], self.shape(y))
        return y

    def m_linear(self, m: Any, x: Any) -> int:
        return self.linear(x, m.weight, m.bias)

    def conv(self, x: Any, w: int, b: int | None, stride: Any, padding: Any, dilation: Any, groups: int) -> int:
        x = _i(x)
        n, c, h, wd = self.shape(x)
        k, cg, r, s = self.shape(w)
        st, dl = _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                pd = (0, 0)
            elif all(v == 1 for v in st):
                pd = (dl[0] * (r - 1) // 2, dl[1] * (s - 1) // 2)
                if (dl[0] * (r - 1)) % 2 or (dl[1] * (s - 1)) % 2:
                    raise UnsupportedOpError("asymmetric 'same' padding")
            else:
                raise UnsupportedOpError(f"padding={padding!r} with stride {st}")
        else:
            pd = _pair(padding)
        if cg * groups != c:
            raise InvalidArgumentError(f"conv2d: input has {c} channels, weight expects {cg * groups}")
        p = (h + 2 * pd[0] - dl[0] * (r - 1) - 1) // st[0] + 1
        q = (wd + 2 * pd[1] - dl[1] * (s - 1) - 1) // st[1] + 1
        ins = [x, w] + ([b] if b is not None else [])
        return self.add(Op.CONV2D, ins, [n, k, p, q], {"stride": st, "padding": pd, "dilation": dl, "groups": int(groups)})

    def m_conv(self, m: Any, x: Any) -> int:
        x = _i(x)
        if m.padding_mode != "zeros":
            raise UnsupportedOpError(f"Conv2d padding_mode={m.padding_mode!r}")
        w = self.param(m.weight)
        assert w is not None
        return self.conv(x, w, self.param(m.bias), m.stride, m.padding, m.dilation, m.groups)

    def f_conv(self, x: Any, w: Any, b: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> int:
        return self.conv(x, _id(self, w), None if b is None else _id(self, b), stride, padding, dilation, groups)

    def m_bn(self, m: Any, x: Any) -> int:
        x = _i(x)
        if m.training or m.running_mean is None:
            raise UnsupportedOpError("BatchNorm2d in training mode or without running statistics (call model.eval())")
        c = self.shape(x)[1]
        w = self.param(m.weight) if m.weight is not None else self.b.const(np.ones(c, np.float32))
        b = self.param(m.bias) if m.bias is not None else self.b.const(np.zeros(c, np.float32))
        ins = [x, w, b, self.param(m.running_mean), self.param(m.running_var)]
        return self.add(Op.BATCH_NORM, ins, self.shape(x), {"eps": float(m.eps)})

    def pool(self, op: Op, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any = 1, ceil_mode: bool = False) -> int:
        x = _i(x)
        if ceil_mode:
            raise UnsupportedOpError("pooling with ceil_mode=True")
        k, st, pd, dl = _pair(kernel), _pair(stride or kernel), _pair(padding), _pair(dilation)
        *lead, h, w = self.shape(x)
        p = (h + 2 * pd[0] - dl[0] * (k[0] - 1) - 1) // st[0] + 1
        q = (w + 2 * pd[1] - dl[1] * (k[1] - 1) - 1) // st[1] + 1
        return self.add(op, [x], [*lead, p, q], {"kernel": k, "stride": st, "padding": pd, "dilation": dl})

    def f_maxpool(self, x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                  ceil_mode: bool = False, return_indices: bool = False) -> int:
        if return_indices:
            raise UnsupportedOpError("max_pool2d with return_indices=True")
        return self.pool(Op.MAX_POOL, x.id, kernel_size, stride, padding, dilation, ceil_mode)

    def avgpool(self, x: Any, kernel: Any, stride: Any, padding: Any, ceil_mode: bool, include_pad: bool, divisor: Any) -> int:
        x = _i(x)
        if divisor is not None or (not include_pad and any(_pair(padding))):
            raise UnsupportedOpError("avg_pool2d with divisor_override or count_include_pad=False and padding")
        return self.pool(Op.AVG_POOL, x, kernel, stride, padding, 1, ceil_mode)

    def f_avgpool(self, x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
                  count_include_pad: bool = True, divisor_override: Any = None) -> int:
        return self.avgpool(x.id, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    def adaptive(self, x: Any, out: Any) -> int:
        x = _i(x)
        *lead, h, w = self.shape(x)
        oh, ow = (out, out) if isinstance(out, int) else out
        oh, ow = oh or h, ow or w
        return self.add(Op.ADAPTIVE_AVG_POOL, [x], [*lead, oh, ow])

    def softmax(self, x: Any, dim: int | None) -> int:
        x = _i(x)
        if dim is None:
            raise UnsupportedOpError("softmax without dim")
        return self.add(Op.SOFTMAX, [x], self.shape(x), {"axis": int(dim) % len(self.shape(x))})

    def layer_norm(self, x: Any, shape: Any, w: Any, b: Any, eps: float) -> int:
        x = _i(x)
        nd = 1 if isinstance(shape, int) else len(shape)
        ins = [x] + [_id(self, v) for v in (w, b) if v is not None]
        if w is None and b is not None:
            raise UnsupportedOpError("layer_norm with a bias but no weight")
        return self.add(Op.LAYER_NORM, ins, self.shape(x), {"ndim": nd, "eps": float(eps)})

    def embedding(self, x: Any, w: Any) -> int:
        x = _i(x)
        wid = _id(self, w)
        if self.b.nodes[x].dtype != "int64":
            raise InvalidArgumentError("embedding indices must be int64")
        return self.add(Op.EMBEDDING, [x, wid], [*self.shape(x), self.shape(wid)[1]])

    def mean(self, x: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> int:
        x = _V(_i(x))
        s = self.shape(x.id)
        axes = list(range(len(s))) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        axes = [a % len(s) for a in axes]
        out = [1 if d in axes else n for d, n in enumerate(s)] if keepdim else [n for d, n in enumerate(s) if d not in axes]
        return self.add(Op.MEAN, [x.id], out, {"axes": tuple(axes), "keepdim": bool(keepdim)})

    def sum(self, x: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> int:
        m = self.mean(x, dim, keepdim)
        s = self.shape(_i(x))
        count = math.prod(s) // max(1, math.prod(self.shape(m)) if keepdim else math.prod(self.shape(m)))
        return self.binary(Op.MUL, _V(m), float(count))

    # ------------------------------------------------------------------ driving fx

    def convert(self, example_inputs: Sequence[Any]) -> Graph:
        import torch
        import torch.fx

        tracer = torch.fx.Tracer()
        tracer.record_stack_traces = True
        try:
            fx_graph = tracer.trace(self.root)
        except Exception as e:
            raise UnsupportedOpError(f"torch.fx cannot trace the model: {e}") from e
        gm = torch.fx.GraphModule(tracer.root, fx_graph)
        conv = self

        class Interp(torch.fx.Interpreter):
            def run_node(self, n: Any) -> Any:
                result = super().run_node(n)
                conv.where, conv.fx_name = _where(n), n.name
                conv.ir[n] = conv.node(n, result, self)
                return result

        self.where = self.fx_name = ""
        placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise InvalidArgumentError(f"the model takes {len(placeholders)} inputs, {len(example_inputs)} were given")
        with torch.no_grad():
            Interp(gm).run(*example_inputs)
        outs = [n for n in fx_graph.nodes if n.op == "output"][0].args[0]
        outs = list(outs) if isinstance(outs, tuple | list) else [outs]
        ids = []
        for o in outs:
            v = self.ir.get(o)
            if not isinstance(v, _V):
                raise UnsupportedOpError("the model's outputs must be tensors")
            ids.append(v.id)
        return self.b.build(ids)

    def node(self, n: Any, result: Any, interp: Any) -> Any:
        torch = self.torch
        if n.op == "placeholder":
            if not isinstance(result, torch.Tensor):
                raise InvalidArgumentError(f"input {n.name} must be a tensor")
            dtype = {torch.float32: "float32", torch.int64: "int64"}.get(result.dtype)
            if dtype is None:
                raise InvalidArgumentError(f"input {n.name} has dtype {result.dtype}: float32 or int64 only")
            return _V(self.b.input(tuple(result.shape), dtype, n.name))
        if n.op == "get_attr":
            return _V(_id(self, result)) if isinstance(result, torch.Tensor) else result
        if n.op == "output":
            return None
        out: Any
        args = torch.fx.node.map_arg(n.args, lambda a: self.ir.get(a))
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: self.ir.get(a))
        if not _has_tensor(args) and not _has_tensor(kwargs):
            return result  # Python arithmetic on sizes and such: the value is known
        if not isinstance(result, torch.Tensor) and not (isinstance(result, tuple | list)
                                                         and any(isinstance(r, torch.Tensor) for r in result)):
            return result  # x.shape, x.size(0), x.dim(): concrete Python values
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            return None  # torch.export's input guards
        if n.op == "call_module":
            mod = self.root.get_submodule(n.target)
            fn = self.modules.get(type(mod))
            if fn is None:
                raise UnsupportedOpError(f"unsupported module {type(mod).__name__} at '{n.target}' ({self.where})")
            out = fn(mod, *args, **kwargs)
        elif n.op == "call_function":
            fn = self.functions.get(n.target)
            if fn is None:
                raise UnsupportedOpError(f"unsupported function {_name(n.target)} at node '{n.name}' ({self.where})")
            out = fn(*args, **kwargs)
        elif n.op == "call_method":
            fn = self.methods.get(n.target)
            if n.target in ("size", "dim") or (fn is None and n.target == "shape"):
                return result
            if fn is None:
                raise UnsupportedOpError(f"unsupported method Tensor.{n.target} at node '{n.name}' ({self.where})")
            out = fn(*args, **kwargs)
        else:
            raise UnsupportedOpError(f"unsupported fx node kind {n.op} at '{n.name}'")
        if isinstance(out, _V):
            return out
        if isinstance(out, int) and not isinstance(out, bool) and not isinstance(result, int):
            if isinstance(result, torch.Tensor) and tuple(result.shape) != self.shape(out):
                raise InvalidArgumentError(f"shape mismatch at {n.name}: {list(result.shape)} vs {list(self.shape(out))}")
            return _V(out)
        return out


class _V:
    """An IR value (wrapped so that it is never mistaken for a Python int)."""

    __slots__ = ("id",)

    def __init__(self, i: int) -> None:
        self.id = i


def _has_tensor(x: Any) -> bool:
    if isinstance(x, _V):
        return True
    if isinstance(x, list | tuple):
        return any(_has_tensor(v) for v in x)
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    return False


def _i(a: Any) -> int:
    if isinstance(a, _V):
        return a.id
    if isinstance(a, int):
        return a
    raise UnsupportedOpError(f"expected a tensor, got {type(a).__name__}")


def _id(conv: _Converter, v: Any) -> int:
    if isinstance(v, _V):
        return v.id
    if isinstance(v, int):
        return v
    i = conv.param(v)
    assert i is not None
    return i


def _name(t: Any) -> str:
    mod = getattr(t, "__module__", "") or ""
    return f"{mod}.{getattr(t, '__name__', repr(t))}".lstrip(".")


def _where(n: Any) -> str:
    st = n.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in st.strip().splitlines() if ln.strip().startswith("File")
             and "/torch/" not in ln and "/tessera/compiler/" not in ln]
    return lines[-1] if lines else f"node {n.name}"


def from_torch(module: Any, example_inputs: Sequence[Any]) -> Graph:
    """Trace ``module`` (put in eval mode) on ``example_inputs`` (tensors or numpy arrays) into the graph IR."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise InvalidArgumentError(f"expected a torch.nn.Module, got {type(module).__name__}")
    try:
        module = module.eval()
    except NotImplementedError:  # the module of a torch.export program: already in inference form
        pass
    ex = [torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x for x in example_inputs]
    return _Converter(module).convert(ex)


__all__ = ["UnsupportedOpError", "from_torch"]
_ = ELEMENTWISE_BINARY
