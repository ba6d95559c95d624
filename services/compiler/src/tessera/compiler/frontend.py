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
        self.bool_ids: dict[int, bool] = {}  # IR values that are torch bool tensors (float 0/1 here)
        self.leaf_breaks: dict[str, str] = {}  # submodules torch.fx cannot trace -> where their trace broke
        nn = torch.nn
        # The one op registry: nn.Module types, functions (torch.*, F.*, operator.*, ATen overloads of a
        # torch.export program) and Tensor methods ("Tensor.view"), each mapped to its handler.
        # ``tessera compile --list-ops`` prints its keys (see :func:`supported_ops`).
        modules: dict[type, Callable[..., Any]] = {
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
        functions: dict[Any, Callable[..., Any]] = {
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
        methods: dict[str, Callable[..., Any]] = {
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
        self.ops: dict[Any, Callable[..., Any]] = {**modules, **functions, **self._aten(),
                                                   **{f"Tensor.{k}": v for k, v in methods.items()}}
        self.ops.update(self._coverage())

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

    def _coverage(self) -> dict[Any, Callable[..., Any]]:
        """Activations, clamps, comparisons, reductions, gathers, resizing, normalization, tensor lists
        and attention: handlers that build them from IR ops."""
        torch, F, nn, a = self.torch, self.F, self.torch.nn, self.torch.ops.aten  # noqa: N806
        cmp = {operator.gt: Op.GT, operator.ge: Op.GE, operator.lt: Op.LT, operator.le: Op.LE, operator.eq: Op.EQ,
               operator.ne: Op.NE, torch.gt: Op.GT, torch.ge: Op.GE, torch.lt: Op.LT, torch.le: Op.LE, torch.eq: Op.EQ,
               torch.ne: Op.NE}
        table: dict[Any, Callable[..., Any]] = {f: self._binary_of(op) for f, op in cmp.items()}
        for name, op in (("gt", Op.GT), ("ge", Op.GE), ("lt", Op.LT), ("le", Op.LE), ("eq", Op.EQ), ("ne", Op.NE)):
            table[f"Tensor.{name}"] = self._binary_of(op)
        table.update({
            # modules
            nn.Conv1d: self.m_conv1d, nn.ConvTranspose2d: self.m_conv_transpose, nn.BatchNorm1d: self.m_bn,
            nn.LeakyReLU: lambda m, x: self.leaky_relu(x, m.negative_slope), nn.ReLU6: lambda m, x: self.clamp(x, 0.0, 6.0),
            nn.Hardtanh: lambda m, x: self.clamp(x, m.min_val, m.max_val), nn.Hardswish: lambda m, x: self.hardswish(x),
            nn.Hardsigmoid: lambda m, x: self.hardsigmoid(x),
            nn.GroupNorm: lambda m, x: self.group_norm(x, m.num_groups, m.weight if m.affine else None,
                                                       m.bias if m.affine else None, m.eps),
            nn.Upsample: lambda m, x: self.interpolate(x, m.size, m.scale_factor, m.mode, m.align_corners,
                                                       m.recompute_scale_factor),
            # functions
            F.relu6: lambda x, inplace=False: self.clamp(x, 0.0, 6.0),
            F.hardtanh: lambda x, min_val=-1.0, max_val=1.0, inplace=False: self.clamp(x, min_val, max_val),
            F.leaky_relu: lambda x, negative_slope=0.01, inplace=False: self.leaky_relu(x, negative_slope),
            F.hardswish: lambda x, inplace=False: self.hardswish(x),
            F.hardsigmoid: lambda x, inplace=False: self.hardsigmoid(x),
            torch.clamp: self.clamp, torch.clip: self.clamp, torch.pow: lambda x, y: self.binary(Op.POW, x, y),
            operator.pow: lambda x, y: self.binary(Op.POW, x, y), torch.minimum: lambda x, y: self.binary(Op.MINIMUM, x, y),
            torch.max: lambda x, *a, **k: self.minmax(x, True, *a, **k),
            torch.min: lambda x, *a, **k: self.minmax(x, False, *a, **k),
            torch.amax: lambda x, dim=(), keepdim=False: self.amax(x, dim, keepdim),
            torch.amin: lambda x, dim=(), keepdim=False: self.amax(x, dim, keepdim, negate=True),
            torch.argmax: self.argmax, torch.argmin: lambda x, dim=None, keepdim=False: self.argmax(x, dim, keepdim, True),
            torch.where: self.where_, torch.gather: self.gather, F.interpolate: self.interpolate,
            F.group_norm: lambda x, num_groups, weight=None, bias=None, eps=1e-5: self.group_norm(x, num_groups, weight, bias, eps),
            F.batch_norm: lambda x, mean, var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5:
                self.f_bn(x, weight, bias, mean, var, training, momentum, eps),
            torch.stack: self.stack, torch.split: self.split, torch.chunk: self.chunk, torch.unbind: self.unbind,
            F.scaled_dot_product_attention: self.sdpa, F.conv1d: self.f_conv1d, F.conv_transpose2d: self.f_conv_transpose,
            # Tensor methods
            "Tensor.clamp": self.clamp, "Tensor.clip": self.clamp, "Tensor.pow": lambda x, y: self.binary(Op.POW, x, y),
            "Tensor.max": lambda x, *a, **k: self.minmax(x, True, *a, **k),
            "Tensor.min": lambda x, *a, **k: self.minmax(x, False, *a, **k),
            "Tensor.amax": lambda x, dim=(), keepdim=False: self.amax(x, dim, keepdim),
            "Tensor.argmax": self.argmax, "Tensor.gather": self.gather,
            "Tensor.masked_fill": lambda x, mask, value: self.where_(mask, value, x),
            "Tensor.split": self.split, "Tensor.chunk": self.chunk, "Tensor.unbind": self.unbind,
            # ATen (torch.export)
            a.hardtanh.default: lambda x, lo=-1.0, hi=1.0: self.clamp(x, lo, hi), a.clamp.default: self.clamp,
            a.leaky_relu.default: lambda x, slope=0.01: self.leaky_relu(x, slope), a.hardswish.default: self.hardswish,
            a.pow.Tensor_Scalar: lambda x, y: self.binary(Op.POW, x, y), a.pow.Tensor_Tensor: lambda x, y: self.binary(Op.POW, x, y),
            a.where.self: self.where_, a.amax.default: lambda x, dim=(), keepdim=False: self.amax(x, dim, keepdim),
            a.argmax.default: self.argmax, a.gather.default: self.gather, a.stack.default: self.stack,
            a.split.Tensor: self.split, a.unbind.int: self.unbind, a.minimum.default: lambda x, y: self.binary(Op.MINIMUM, x, y),
            a.gt.Scalar: lambda x, y: self.binary(Op.GT, x, y), a.gt.Tensor: lambda x, y: self.binary(Op.GT, x, y),
            a.lt.Scalar: lambda x, y: self.binary(Op.LT, x, y), a.lt.Tensor: lambda x, y: self.binary(Op.LT, x, y),
            a.upsample_nearest2d.vec: lambda x, size, scales=None: self.interpolate(x, size, scales, "nearest"),
            a.upsample_bilinear2d.vec: lambda x, size, align, scales=None: self.interpolate(x, size, scales, "bilinear", align),
            a.group_norm.default: lambda x, g, w=None, b=None, eps=1e-5, *_: self.group_norm(x, g, w, b, eps),
            a.scaled_dot_product_attention.default: self.sdpa,
            a.relu6.default: lambda x: self.clamp(x, 0.0, 6.0), a.hardsigmoid.default: self.hardsigmoid,
            a.chunk.default: self.chunk, a.split_with_sizes.default: self.split, a.maximum.default: self._binary_of(Op.MAXIMUM),
            a.amin.default: lambda x, dim=(), keepdim=False: self.amax(x, dim, keepdim, negate=True),
            a.argmin.default: lambda x, dim=None, keepdim=False: self.argmax(x, dim, keepdim, True),
            a.max.dim: lambda x, dim, keepdim=False: self.minmax(x, True, dim, keepdim),
            a.min.dim: lambda x, dim, keepdim=False: self.minmax(x, False, dim, keepdim),
            a.max.default: lambda x: self.amax(x), a.min.default: lambda x: self.amax(x, negate=True),
            a.ge.Scalar: self._binary_of(Op.GE), a.ge.Tensor: self._binary_of(Op.GE), a.le.Scalar: self._binary_of(Op.LE),
            a.le.Tensor: self._binary_of(Op.LE), a.eq.Scalar: self._binary_of(Op.EQ), a.eq.Tensor: self._binary_of(Op.EQ),
            a.ne.Scalar: self._binary_of(Op.NE), a.ne.Tensor: self._binary_of(Op.NE),
            a.masked_fill.Scalar: lambda x, mask, value: self.where_(mask, value, x),
            a.conv1d.default: self.f_conv1d, a.conv_transpose2d.input: self.f_conv_transpose,
        })
        return table

    # ------------------------------------------------------------------ coverage handlers

    def _binary_of(self, op: Op) -> Callable[[Any, Any], int]:
        return lambda x, y: self.binary(op, x, y)

    def clamp(self, x: Any, min: Any = None, max: Any = None) -> int:  # noqa: A002 - torch's names
        v = _V(_i(x))
        if min is not None:
            v = _V(self.binary(Op.MAXIMUM, v, min))
        if max is not None:
            v = _V(self.binary(Op.MINIMUM, v, max))
        return v.id

    def leaky_relu(self, x: Any, slope: float) -> int:
        pos = _V(self.binary(Op.MAXIMUM, x, 0.0))
        neg = _V(self.binary(Op.MUL, _V(self.binary(Op.MINIMUM, x, 0.0)), float(slope)))
        return self.binary(Op.ADD, pos, neg)

    def hardsigmoid(self, x: Any) -> int:
        return self.binary(Op.DIV, _V(self.clamp(_V(self.binary(Op.ADD, x, 3.0)), 0.0, 6.0)), 6.0)

    def hardswish(self, x: Any) -> int:
        r6 = _V(self.clamp(_V(self.binary(Op.ADD, x, 3.0)), 0.0, 6.0))
        return self.binary(Op.DIV, _V(self.binary(Op.MUL, x, r6)), 6.0)

    def _axes(self, x: int, dim: Any) -> list[int]:
        r = len(self.shape(x))
        if dim is None or (isinstance(dim, tuple | list) and not dim):
            return list(range(r))
        return sorted({int(d) % r for d in ([dim] if isinstance(dim, int) else dim)})

    def amax(self, x: Any, dim: Any = None, keepdim: bool = False, negate: bool = False) -> int:
        xi = _i(x)
        if negate:
            xi = self.unary(Op.NEG, _V(xi))
        s = self.shape(xi)
        axes = self._axes(xi, dim)
        if len(axes) == len(s) and not keepdim:  # a scalar: reduced with kept dims, then a view
            y = self.reshape(self.amax(_V(xi), dim, True), [])
            return self.unary(Op.NEG, _V(y)) if negate else y
        out = [1 if d in axes else n for d, n in enumerate(s)] if keepdim else [n for d, n in enumerate(s) if d not in axes]
        y = self.add(Op.REDUCE_MAX, [xi], out, {"axes": tuple(axes), "keepdim": bool(keepdim)})
        return self.unary(Op.NEG, _V(y)) if negate else y

    def argmax(self, x: Any, dim: Any = None, keepdim: bool = False, negate: bool = False) -> int:
        xi = _i(x)
        if dim is None:
            xi = self.reshape(xi, [-1])
            dim, keepdim = 0, False
        if negate:
            xi = self.unary(Op.NEG, _V(xi))
        s = self.shape(xi)
        ax = int(dim) % len(s)
        out = [1 if d == ax else n for d, n in enumerate(s)] if keepdim else [n for d, n in enumerate(s) if d != ax]
        return self.add(Op.ARGMAX, [xi], out, {"axis": ax, "keepdim": bool(keepdim)})

    def minmax(self, x: Any, is_max: bool, dim: Any = None, keepdim: bool = False, other: Any = None) -> Any:
        """torch.max's three forms: the whole tensor, (values, indices) along ``dim``, or elementwise."""
        if isinstance(dim, _V) or other is not None:
            return self.binary(Op.MAXIMUM if is_max else Op.MINIMUM, x, other if other is not None else dim)
        if dim is None:
            return self.amax(x, None, False, negate=not is_max)
        values = self.amax(x, dim, keepdim, negate=not is_max)
        return (_V(values), _V(self.argmax(x, dim, keepdim, negate=not is_max)))

    def where_(self, cond: Any, a: Any = None, b: Any = None) -> int:
        if a is None or b is None:
            raise UnsupportedOpError("torch.where with only a condition (a data-dependent shape)")
        ids = [_i(cond)] + [v.id if isinstance(v, _V) else _id(self, v) if not isinstance(v, int | float)
                            else self.scalar(float(v)) for v in (a, b)]
        shape = broadcast_shape(broadcast_shape(self.shape(ids[0]), self.shape(ids[1])), self.shape(ids[2]))
        return self.add(Op.WHERE, ids, shape)

    def gather(self, x: Any, dim: int, index: Any, sparse_grad: bool = False) -> int:
        xi, ii = _i(x), _i(index)
        if self.b.nodes[ii].dtype != "int64":
            raise InvalidArgumentError("gather indices must be int64")
        return self.add(Op.GATHER, [xi, ii], self.shape(ii), {"axis": int(dim) % len(self.shape(xi))})

    def interpolate(self, x: Any, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                    align_corners: bool | None = None, recompute_scale_factor: bool | None = None, antialias: bool = False) -> int:
        xi = _i(x)
        s = self.shape(xi)
        if len(s) != 4:
            raise UnsupportedOpError(f"interpolate of a rank-{len(s)} tensor (4-d only)")
        if mode not in ("nearest", "bilinear") or antialias:
            raise UnsupportedOpError(f"interpolate mode={mode!r}{' with antialias' if antialias else ''}")
        h, w = s[-2:]
        if size is not None:
            oh, ow = _pair(size)
            scale = (h / oh, w / ow)
        else:
            fh, fw = (scale_factor, scale_factor) if isinstance(scale_factor, int | float) else tuple(scale_factor)
            oh, ow = int(math.floor(h * fh)), int(math.floor(w * fw))
            scale = (h / oh, w / ow) if recompute_scale_factor else (1.0 / fh, 1.0 / fw)
        attrs = {"mode": mode, "align_corners": bool(align_corners), "scale": scale}
        return self.add(Op.RESIZE, [xi], [*s[:2], oh, ow], attrs)

    def group_norm(self, x: Any, groups: int, w: Any, b: Any, eps: float) -> int:
        xi = _i(x)
        s = self.shape(xi)
        n, c = s[0], s[1]
        if c % groups:
            raise InvalidArgumentError(f"group_norm: {c} channels do not split into {groups} groups")
        g = self.reshape(xi, [n, groups, -1])
        y = self.reshape(self.add(Op.LAYER_NORM, [g], self.shape(g), {"ndim": 1, "eps": float(eps)}), s)
        bshape = [c] + [1] * (len(s) - 2)
        if w is not None:
            y = self.binary(Op.MUL, _V(y), _V(self.reshape(_id(self, w), bshape)))
        if b is not None:
            y = self.binary(Op.ADD, _V(y), _V(self.reshape(_id(self, b), bshape)))
        return y

    def stack(self, xs: Sequence[Any], dim: int = 0) -> int:
        r = len(self.shape(_i(xs[0]))) + 1
        return self.cat([_V(self.unsqueeze(v, dim % r)) for v in xs], dim % r)

    def _pieces(self, x: Any, sizes: Sequence[int], dim: int) -> tuple[_V, ...]:
        s = self.shape(_i(x))
        d = dim % len(s)
        out, start = [], 0
        for k in sizes:
            idx = [slice(None)] * len(s)
            idx[d] = slice(start, start + k)
            out.append(_V(self.getitem(x if isinstance(x, _V) else _V(x), tuple(idx))))
            start += k
        return tuple(out)

    def split(self, x: Any, size: Any, dim: int = 0) -> tuple[_V, ...]:
        n = self.shape(_i(x))[dim]
        sizes = [int(v) for v in size] if isinstance(size, list | tuple) else [min(size, n - k) for k in range(0, n, size)]
        return self._pieces(x, sizes, dim)

    def chunk(self, x: Any, chunks: int, dim: int = 0) -> tuple[_V, ...]:
        n = self.shape(_i(x))[dim]
        return self.split(x, -(-n // chunks), dim)

    def unbind(self, x: Any, dim: int = 0) -> tuple[_V, ...]:
        s = self.shape(_i(x))
        d = dim % len(s)
        return tuple(_V(self.getitem(x, tuple([slice(None)] * d + [k]))) for k in range(s[d]))

    def sdpa(self, q: Any, k: Any, v: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False) -> int:
        if dropout_p:
            raise UnsupportedOpError(f"scaled_dot_product_attention with dropout_p={dropout_p} (a training-time op)")
        if enable_gqa:
            raise UnsupportedOpError("scaled_dot_product_attention with enable_gqa=True")
        qs, ks = self.shape(_i(q)), self.shape(_i(k))
        sc = scale if scale is not None else 1.0 / math.sqrt(qs[-1])
        s = _V(self.binary(Op.MUL, _V(self.matmul(q, _V(self.transpose(k, -2, -1)))), float(sc)))
        lq, lk = qs[-2], ks[-2]
        if is_causal:
            keep = self.b.const(np.tril(np.ones((lq, lk), np.float32)))
            s = _V(self.where_(_V(keep), s, -1e30))
        if attn_mask is not None:
            m = _i(attn_mask)
            if self.b.nodes[m].dtype == "float32" and not self.bool_ids.get(m, False):
                s = _V(self.binary(Op.ADD, s, _V(m)))
            else:
                s = _V(self.where_(_V(m), s, -1e30))
        p = _V(self.softmax(s, -1))
        return self.matmul(p, v)

    def _conv1d(self, x: Any, w: int, b: int | None, stride: Any, padding: Any, dilation: Any, groups: int) -> int:
        xi = _i(x)
        n, c, length = self.shape(xi)
        ws = self.shape(w)
        w4 = self.reshape(w, [ws[0], ws[1], 1, ws[2]])
        one = lambda v: int(v[0]) if isinstance(v, list | tuple) else v  # noqa: E731
        pad = padding if isinstance(padding, str) else (0, one(padding))
        y = self.conv(self.reshape(xi, [n, c, 1, length]), w4, b, (1, one(stride)), pad, (1, one(dilation)), groups)
        ys = self.shape(y)
        return self.reshape(y, [ys[0], ys[1], ys[3]])

    def m_conv1d(self, m: Any, x: Any) -> int:
        if m.padding_mode != "zeros":
            raise UnsupportedOpError(f"Conv1d padding_mode={m.padding_mode!r}")
        w = self.param(m.weight)
        assert w is not None
        return self._conv1d(x, w, self.param(m.bias), m.stride, m.padding, m.dilation, m.groups)

    def f_conv1d(self, x: Any, w: Any, b: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> int:
        return self._conv1d(x, _id(self, w), None if b is None else _id(self, b), stride, padding, dilation, groups)

    def conv_transpose(self, x: Any, w: Any, b: Any, stride: Any, padding: Any, output_padding: Any, groups: int,
                       dilation: Any) -> int:
        """A transposed convolution as a convolution: zeros between the input's pixels (``stride``), a border
        of ``dilation * (k - 1) - padding`` (plus ``output_padding`` after), and the kernel flipped, with its
        input and output channels swapped per group."""
        if isinstance(w, _V) or not hasattr(w, "detach"):
            raise UnsupportedOpError("conv_transpose2d with a computed weight (parameters only)")
        xi = _i(x)
        n, c, h, wd = self.shape(xi)
        wt = _np(w).astype(np.float32)
        cin, coutg, kh, kw = wt.shape
        wc = wt.reshape(groups, cin // groups, coutg, kh, kw).transpose(0, 2, 1, 3, 4).reshape(groups * coutg, cin // groups, kh, kw)
        wc = np.ascontiguousarray(wc[:, :, ::-1, ::-1])
        st, pd, op, dl = _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation)
        if st != (1, 1):
            xi = self.add(Op.DILATE, [xi], [n, c, (h - 1) * st[0] + 1, (wd - 1) * st[1] + 1], {"strides": (1, 1, *st)})
        lo = (dl[0] * (kh - 1) - pd[0], dl[1] * (kw - 1) - pd[1])
        if min(lo) < 0:
            raise UnsupportedOpError(f"conv_transpose2d with padding {list(pd)} larger than dilation * (kernel - 1)")
        if op != (0, 0):
            pads = [(0, 0), (0, 0), (lo[0], lo[0] + op[0]), (lo[1], lo[1] + op[1])]
            s = self.shape(xi)
            xi = self.add(Op.PAD, [xi], [v + a + z for v, (a, z) in zip(s, pads, strict=True)], {"pads": pads, "value": 0.0})
            lo = (0, 0)
        bid = None if b is None else _id(self, b)
        return self.conv(xi, self.b.const(wc), bid, 1, lo, dl, groups)

    def m_conv_transpose(self, m: Any, x: Any) -> int:
        if m.padding_mode != "zeros":
            raise UnsupportedOpError(f"ConvTranspose2d padding_mode={m.padding_mode!r}")
        return self.conv_transpose(x, m.weight, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)

    def f_conv_transpose(self, x: Any, w: Any, b: Any = None, stride: Any = 1, padding: Any = 0, output_padding: Any = 0,
                         groups: int = 1, dilation: Any = 1) -> int:
        return self.conv_transpose(x, w, b, stride, padding, output_padding, groups, dilation)

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
            raise UnsupportedOpError(f"{type(m).__name__} in training mode or without running statistics (call model.eval())")
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

    def trace(self, example_inputs: Sequence[Any]) -> Traced:
        """Run the fx graph on the example inputs, converting each node it can; a node that cannot be
        converted is recorded (with why and where) and its results become boundary inputs of the IR."""
        import torch
        import torch.fx

        leaves = self.leaf_breaks

        class Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: Any, qualname: str) -> bool:
                return qualname in leaves or bool(super().is_leaf_module(m, qualname))

        while True:
            tracer = Tracer()
            tracer.record_stack_traces = True
            try:
                fx_graph = tracer.trace(self.root)
                break
            except Exception as e:
                where = _trace_break(e)
                sub = _breaking_submodule(self.root, e)
                if sub is None or sub in leaves or len(leaves) >= 32:
                    raise TraceBrokenError(f"torch.fx cannot trace the model: the trace broke at {where}: "
                                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", where) from e
                leaves[sub] = where  # trace again with that submodule as one opaque call (it will run in torch)
        gm = torch.fx.GraphModule(tracer.root, fx_graph)
        conv = self
        traced = Traced(gm, self)

        class Interp(torch.fx.Interpreter):
            def run_node(self, n: Any) -> Any:
                result = super().run_node(n)
                conv.where, conv.fx_name = _where(n), n.name
                start, before = len(conv.b.nodes), dict(conv.bool_ids)
                try:
                    conv.ir[n] = conv.node(n, result, self)
                    traced.kind[n] = "ir" if _has_tensor(conv.ir[n]) else "static"
                except Exception as e:  # torch ran the node just now: whatever stops the conversion is ours
                    if n.op in ("placeholder", "output"):
                        raise
                    del conv.b.nodes[start:]  # what the handler added before it gave up
                    conv.param_ids = {k: v for k, v in conv.param_ids.items() if v < start}
                    conv.bool_ids = before
                    reason = str(e) if isinstance(e, UnsupportedOpError) else f"{type(e).__name__}: {e}"
                    traced.torch_nodes[n] = (reason, conv.where)
                    traced.kind[n] = "torch"
                    conv.ir[n] = conv.boundary(result)
                traced.ranges[n] = (start, len(conv.b.nodes))
                traced.results[n] = _dtypes(result) if traced.kind[n] != "static" else result
                return result

        self.where = self.fx_name = ""
        placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise InvalidArgumentError(f"the model takes {len(placeholders)} inputs, {len(example_inputs)} were given")
        with torch.no_grad():
            Interp(gm).run(*example_inputs)
        return traced

    def boundary(self, result: Any) -> Any:
        """A torch-run node's result as IR values: new INPUT nodes (not graph inputs) the runner binds."""
        torch = self.torch
        if isinstance(result, torch.Tensor):
            dtype = {torch.float32: "float32", torch.int64: "int64", torch.bool: "float32"}.get(result.dtype)
            if dtype is None:
                return _Opaque(str(result.dtype))
            i = self.b.add(Node(Op.INPUT, (), tuple(result.shape), dtype, name=f"{self.fx_name}_torch"))
            if result.dtype == torch.bool:
                self.bool_ids[i] = True
            return _V(i)
        if isinstance(result, tuple | list):
            vals = [self.boundary(r) for r in result]
            return tuple(vals) if isinstance(result, tuple) else vals
        return result

    def convert(self, example_inputs: Sequence[Any]) -> Graph:
        """The whole model as one IR graph; UnsupportedOpError names every op it cannot convert."""
        traced = self.trace(example_inputs)
        if traced.torch_nodes:
            raise UnsupportedOpError(traced.unsupported_message())
        return traced.whole_graph()

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
            if n.target in self.leaf_breaks:
                raise UnsupportedOpError(f"module {type(mod).__name__} at '{n.target}' cannot be traced by torch.fx: the "
                                         f"trace broke at {self.leaf_breaks[n.target]}")
            fn = self.ops.get(type(mod))
            if fn is None:
                raise UnsupportedOpError(f"unsupported module {type(mod).__name__} at '{n.target}' ({self.where})")
            out = fn(mod, *args, **kwargs)
        elif n.op == "call_function":
            fn = self.ops.get(n.target)
            if fn is None:
                raise UnsupportedOpError(f"unsupported function {_name(n.target)} at node '{n.name}' ({self.where})")
            out = fn(*args, **kwargs)
        elif n.op == "call_method":
            fn = self.ops.get(f"Tensor.{n.target}")
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
            if isinstance(result, torch.Tensor) and result.dtype == torch.bool:
                self.bool_ids[out] = True
            return _V(out)
        return out


class _V:
    """An IR value (wrapped so that it is never mistaken for a Python int)."""

    __slots__ = ("id",)

    def __init__(self, i: int) -> None:
        self.id = i


class _Opaque:
    """The result of a torch-run node the IR cannot hold (a dtype other than float32, int64 or bool)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class TraceBrokenError(UnsupportedOpError):
    """torch.fx could not trace the model (data-dependent control flow and such); ``where`` is the line."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


class Traced:
    """A model run once through the converter: per fx node, how it was handled.

    ``kind[n]``: "ir" (converted), "static" (a Python value known at trace time: sizes, shapes) or
    "torch" (left to torch; ``torch_nodes[n]`` says why and where). ``ranges[n]``: the IR nodes it
    added. ``results[n]``: the torch dtypes of its tensor results (or its value, when static).
    """

    def __init__(self, gm: Any, conv: _Converter) -> None:
        self.gm, self.conv = gm, conv
        self.kind: dict[Any, str] = {}
        self.torch_nodes: dict[Any, tuple[str, str]] = {}
        self.ranges: dict[Any, tuple[int, int]] = {}
        self.results: dict[Any, Any] = {}

    @property
    def nodes(self) -> list[Any]:
        return list(self.gm.graph.nodes)

    @property
    def output_node(self) -> Any:
        return next(n for n in self.gm.graph.nodes if n.op == "output")

    def ir(self, n: Any) -> Any:
        return self.conv.ir.get(n)

    def unsupported_message(self) -> str:
        lines = [f"  {n.name}: {why}" + ("" if where in why else f" [{where}]") for n, (why, where) in self.torch_nodes.items()]
        return f"{len(lines)} unsupported op(s):\n" + "\n".join(lines)

    def output_dtypes(self) -> list[str]:
        """The torch dtypes of the model's outputs, flattened as :meth:`whole_graph` flattens them."""
        outs = self.output_node.args[0]
        outs = list(outs) if isinstance(outs, tuple | list) else [outs]
        flat: list[str] = []
        for o in outs:
            d = self.results.get(o)
            for x in (d if isinstance(d, tuple | list) else [d]):
                flat.append(str(x).replace("torch.", "") if x is not None else "float32")
        return flat

    def whole_graph(self) -> Graph:
        outs = self.output_node.args[0]
        outs = list(outs) if isinstance(outs, tuple | list) else [outs]
        ids = []
        for o in outs:
            v = self.conv.ir.get(o)
            for x in (v if isinstance(v, tuple | list) else [v]):  # (values, indices) of torch.max and such
                if not isinstance(x, _V):
                    raise UnsupportedOpError("the model's outputs must be tensors")
                ids.append(x.id)
        return self.conv.b.build(ids)


def _dtypes(result: Any) -> Any:
    if hasattr(result, "dtype") and hasattr(result, "shape"):
        return result.dtype
    if isinstance(result, tuple | list):
        return type(result)(_dtypes(r) for r in result) if isinstance(result, list) else tuple(_dtypes(r) for r in result)
    return None


def _trace_break(e: BaseException) -> str:
    """The model's own source line where tracing stopped (the innermost frame outside torch and Tessera)."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "/tessera/compiler/" not in f.filename]
    if not frames:
        return "an unknown place"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({(f.line or '').strip()})"


def _breaking_submodule(root: Any, e: BaseException) -> str | None:
    """The path of the innermost submodule (not the root) whose own code the trace broke in, if any."""
    names = {id(m): name for name, m in root.named_modules() if name}
    tb, found = e.__traceback__, None
    while tb is not None:
        f = tb.tb_frame
        if f.f_code.co_name == "_call_impl":  # torch's Module.__call__: its self is the module being called
            me = f.f_locals.get("self")
            if me is not None and id(me) in names:
                found = names[id(me)]
        tb = tb.tb_next
    return found


def _has_tensor(x: Any) -> bool:
    if isinstance(x, _V | _Opaque):
        return True
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
    if isinstance(a, _Opaque):
        raise UnsupportedOpError(f"an input is a {a.dtype} tensor (float32, int64 and bool only)")
    if isinstance(a, int):
        return a
    raise UnsupportedOpError(f"expected a tensor, got {type(a).__name__}")


def _id(conv: _Converter, v: Any) -> int:
    if isinstance(v, _V | _Opaque):
        return _i(v)
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


def trace_torch(module: Any, example_inputs: Sequence[Any]) -> Traced:
    """Like :func:`from_torch`, but an op the compiler does not cover is recorded instead of refused
    (see :mod:`tessera.compiler.partition`); raises :class:`TraceBrokenError` when torch.fx cannot trace."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise InvalidArgumentError(f"expected a torch.nn.Module, got {type(module).__name__}")
    try:
        module = module.eval()
    except NotImplementedError:
        pass
    ex = [torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x for x in example_inputs]
    return _Converter(module).trace(ex)


def supported_ops() -> list[str]:
    """Every torch form the frontend converts (the keys of its one op registry), sorted by name."""
    import torch

    conv = _Converter(torch.nn.Identity())
    names = set()
    for key in conv.ops:
        if isinstance(key, str):
            names.add(f"torch.{key}")
        elif isinstance(key, type):
            names.add(f"{key.__module__.split('.modules')[0]}.{key.__name__}")
        elif isinstance(key, torch._ops.OpOverload):
            names.add(f"aten.{key.__name__}" if not str(key).startswith("aten") else str(key))
        else:
            names.add(_name(key).replace("_operator.", "operator.").replace("torch._C._nn.", "torch.nn.functional."))
    return sorted(names)


__all__ = ["TraceBrokenError", "Traced", "UnsupportedOpError", "from_torch", "supported_ops", "trace_torch"]
_ = ELEMENTWISE_BINARY
