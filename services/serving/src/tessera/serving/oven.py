"""The Oven: a logical graph becomes a physical plan of compiled stages.

Rules, applied in order (each a pure function of the graph, named in ``Plan.rules``):

1. ``fuse_featurizers``: a text n-gram counter, its TF-IDF transform and a concat of such
   chains (char + word n-grams of one text, say) become one featurize stage that reads
   the raw field and emits the final sparse matrix.
2. ``sparse_dot``: a linear head over a sparse block multiplies only the non-zeros.
3. ``prune_dead_features``: a linear head keeps only the columns with a non-zero weight
   (when fewer than half are live) and skips the others' entries in the product. The
   scikit-learn importer already ships such heads as live columns only (a head trained
   on a subset never saw most of a shared vocabulary), so the store keeps just those.
4. ``compile_dense``: a dense head (an MLP or torch module, a linear head over dense
   input) becomes fused C kernels built by the cluster's compiler service, when the server
   has a compiler link (:mod:`tessera.serving.compiled`); otherwise, or when the compile
   fails, it stays on numpy.

Every stage is compiled when the plan is built (lookup tables, transposed weights), never
at the first request. Source stages (those that read record fields) carry a content
``key``: two pipelines whose stages have the same key share one compiled stage in the
:class:`~tessera.serving.params.ParamStore`, and the scheduler runs it once per input.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError
from tessera.serving import models, workers
from tessera.serving.featurize import Hasher, NgramCounter, Tfidf
from tessera.serving.ir import Graph, Node
from tessera.serving.params import ParamStore

log = logging.getLogger(__name__)


@dataclass
class Stage:
    key: str
    kind: str  # featurize | columns | transform | head
    inputs: list[int]  # earlier stages; empty for source stages
    fn: Callable[..., Any]
    fields: list[str] = field(default_factory=list)  # source stages: the record fields read
    shared_key: str = ""  # set when the compiled object lives in the ParamStore's shared cache


@dataclass
class Plan:
    name: str
    graph: Graph
    stages: list[Stage]
    rules: list[str]
    shared_keys: list[str]
    extra_bytes: int  # bytes this plan owns beyond shared parameters (pruned weights)

    @property
    def sources(self) -> list[int]:
        return [i for i, s in enumerate(self.stages) if not s.inputs]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _Builder:
    def __init__(self, name: str, graph: Graph, store: ParamStore, *, prune: bool, blackbox: bool,
                 compiler: models.DenseCompiler | None) -> None:
        self.name = name
        self.compiler = compiler
        self.g = graph
        self.store = store
        self.prune = prune
        self.blackbox = blackbox
        self.stages: list[Stage] = []
        self.at: dict[str, int] = {}  # node id -> stage index
        self.rules: set[str] = set()
        self.shared: list[str] = []
        self.extra = 0
        self.consumers: dict[str, list[str]] = {}
        for n in graph.nodes:
            for i in n.inputs:
                self.consumers.setdefault(i, []).append(n.id)

    def p(self, n: Node, role: str) -> Any:
        h = n.params.get(role)
        return None if h is None else self.store.get(h)

    # -- rule 1: featurizer fusion ------------------------------------------------
    def _text_chain(self, n: Node) -> tuple[list[Node], str] | None:
        """The nodes of a text chain ending at ``n`` (ngrams [-> tfidf] or hashing) and its field."""
        if n.op in ("text_ngrams", "hashing"):
            return [n], n.attrs["field"]
        if n.op == "tfidf":
            src = self.g.node(n.inputs[0])
            if src.op == "text_ngrams" and self.consumers.get(src.id) == [n.id]:
                return [src, n], src.attrs["field"]
        return None

    def _unit(self, chain: list[Node]) -> tuple[str, Callable[[list[str]], Any]]:
        first = chain[0]
        if first.op == "hashing":
            key = _key("hashing", first.attrs)
            return key, self.store.shared(key, lambda: Hasher(first.attrs))
        ck = _key("ngrams", first.attrs, first.params)
        counter = self.store.shared(ck, lambda: NgramCounter(self.p(first, "terms"), self.p(first, "offsets"), first.attrs))
        self.shared.append(ck)
        if len(chain) == 1:
            return ck, counter
        tf = chain[1]
        tk = _key("tfidf", ck, tf.attrs, tf.params)
        idf = self.p(tf, "idf")
        t = Tfidf(tf.attrs, idf)
        return tk, lambda docs: t(counter(docs))

    def fuse(self, n: Node) -> bool:
        chains: list[list[Node]] = []
        fields: list[str] = []
        if n.op == "concat":
            for i in n.inputs:
                c = self._text_chain(self.g.node(i))
                if c is None:
                    return False
                chains.append(c[0])
                fields.append(c[1])
        else:
            one = self._text_chain(n)
            if one is None:
                return False
            chains.append(one[0])
            fields.append(one[1])
        units = [self._unit(c) for c in chains]
        key = _key("featurize", fields, [u[0] for u in units])
        flds = sorted(set(fields))
        fns = [u[1] for u in units]

        def featurize(columns: dict[str, list[Any]], n_rows: int, fns: list[Any] = fns, fields: list[str] = fields) -> Any:
            blocks = [fn(columns[f]) for fn, f in zip(fns, fields, strict=True)]
            return blocks[0] if len(blocks) == 1 else models.hstack(blocks)

        for chain in chains:
            for m in chain:
                self.at[m.id] = len(self.stages)
        self.at[n.id] = len(self.stages)
        self.stages.append(Stage(key, "featurize", [], featurize, flds))
        if len(chains) > 1 or len(chains[0]) > 1:
            self.rules.add("fuse_featurizers")
        return True

    # -- rule 4: dense heads compiled -------------------------------------------------
    def dense_input(self, node_id: str) -> bool:
        """Whether node ``node_id`` yields a dense matrix (known from the operators alone)."""
        n = self.g.node(node_id)
        if n.op == "columns":
            return not n.attrs.get("categorical", False)
        if n.op in ("affine", "impute", "poly", "project", "mlp"):
            return True
        if n.op == "kbins":
            return n.attrs.get("encode", "onehot") != "onehot"
        if n.op == "onehot":
            return not n.attrs.get("sparse_output", True)
        if n.op in ("scale", "normalize"):
            return self.dense_input(n.inputs[0])
        if n.op == "concat":
            return all(self.dense_input(i) for i in n.inputs)
        return False

    def compile_dense(self, n: Node, head: models.Linear | models.Mlp) -> Callable[..., Any]:
        """``head`` as a compiled kernel when a compiler is at hand and its input is dense."""
        if self.compiler is None or not self.dense_input(n.inputs[0]):
            return head
        layers = head.dense_layers()
        if not layers:
            return head
        kernel = self.compiler.compile(self.name, layers)
        if kernel is None:
            return head
        self.rules.add("compile_dense")
        return models.CompiledHead(head, kernel)

    # -- the rest, one stage per node -------------------------------------------------
    def node(self, n: Node) -> None:
        if n.id in self.at:
            return
        if n.op in ("text_ngrams", "hashing", "tfidf", "concat"):
            # a concat may be the head of a fusable group (its members are not yet staged)
            if all(i not in self.at or self.stages[self.at[i]].kind == "featurize" for i in n.inputs) and self.fuse(n):
                return
        a = n.attrs
        ins = [self.at[i] for i in n.inputs]
        fn: Callable[..., Any]
        kind = "transform"
        if n.op == "columns":
            cols = models.Columns(a)
            fn = cols
            self.at[n.id] = len(self.stages)
            self.stages.append(Stage(_key("columns", a), "columns", [], fn, list(a["fields"])))
            return
        if n.op == "text_ngrams":
            counter = NgramCounter(self.p(n, "terms"), self.p(n, "offsets"), a)
            self.at[n.id] = len(self.stages)
            f = a["field"]
            self.stages.append(Stage(_key("ngrams", a, n.params), "featurize", [],
                                     lambda c, k, f=f: counter(c[f]), [f]))
            return
        if n.op == "hashing":
            h = Hasher(a)
            f = a["field"]
            self.at[n.id] = len(self.stages)
            self.stages.append(Stage(_key("hashing", a), "featurize", [], lambda c, k, f=f: h(c[f]), [f]))
            return
        if n.op == "tfidf":
            fn = Tfidf(a, self.p(n, "idf"))
        elif n.op == "concat":
            fn = lambda *blocks: models.hstack(list(blocks))  # noqa: E731
        elif n.op == "scale":
            fn = models.Scale(self.p(n, "mean"), self.p(n, "scale"))
        elif n.op == "onehot":
            fn = models.OneHot(a)
        elif n.op == "linear":
            lin = models.Linear(self.p(n, "coef"), self.p(n, "intercept"), a, prune=self.prune,
                                coef_index=self.p(n, "coef_index"), coef_value=self.p(n, "coef_value"))
            self.extra += lin.nbytes
            kind = "head"
            fn = self.compile_dense(n, lin)
            if fn is lin:
                self.rules.add("sparse_dot")
            if lin.pruned:
                self.rules.add("prune_dead_features")
        elif n.op == "trees":
            roles = ("feature", "threshold", "left", "right", "value", "roots", "tree_output", "missing_left")
            fn, kind = models.Trees({r: v for r in roles if (v := self.p(n, r)) is not None}, a), "head"
        elif n.op == "mlp":
            layers = a.get("layers", [])
            ps = {r: self.p(n, r) for r in n.params}
            fn, kind = self.compile_dense(n, models.Mlp(layers, ps, a)), "head"
        elif n.op == "affine":
            fn = models.Affine(self.p(n, "mul"), self.p(n, "add"), a)
        elif n.op == "normalize":
            fn = models.Normalize(a)
        elif n.op == "impute":
            fn = models.Impute(self.p(n, "fill"), a)
        elif n.op == "poly":
            fn = models.Poly(self.p(n, "powers"))
        elif n.op == "kbins":
            fn = models.KBins(self.p(n, "edges"), self.p(n, "edge_offsets"), a)
        elif n.op == "project":
            fn = models.Project(self.p(n, "components"), self.p(n, "mean"), self.p(n, "divisor"))
        elif n.op == "blackbox":
            if not self.blackbox:
                raise InvalidArgumentError(f"node {n.id!r}: opaque steps ({a.get('estimator', '?')}) are turned off "
                                           "on this server (serving_blackbox_stages)")
            blob = self.p(n, "pickle")
            if blob.dtype != np.uint8 or blob.ndim != 1:
                raise InvalidArgumentError(f"node {n.id!r}: the pickle must be a 1-D array of bytes (|u1)")
            opaque = workers.OpaqueStage(n.params["pickle"], blob, a, workers.default_pool())
            log.warning("pipeline %s: step %s runs as an opaque stage in a worker process", self.name, opaque.estimator)
            self.rules.add("opaque_stage")
            fn, kind = opaque, "head" if opaque.kind == "model" else "transform"
        else:  # pragma: no cover - Graph.check rejects unknown ops
            raise InvalidArgumentError(f"unknown operator {n.op!r}")
        self.at[n.id] = len(self.stages)
        self.stages.append(Stage(_key(n.op, a, n.params, ins), kind, ins, fn))


def bake(name: str, graph: Graph, store: ParamStore, *, prune: bool = True, blackbox: bool = True,
         compiler: models.DenseCompiler | None = None) -> Plan:
    """Compile ``graph`` (whose parameters are in ``store``) into a plan of stages.

    ``blackbox=False`` refuses graphs with opaque steps (pickles run in a worker process);
    ``compiler`` builds dense heads into kernels (rule 4)."""
    b = _Builder(name, graph, store, prune=prune, blackbox=blackbox, compiler=compiler)
    try:
        for n in graph.nodes:
            b.node(n)
    except KeyError as e:
        raise InvalidArgumentError(f"pipeline {name!r}: missing attribute or parameter {e}") from None
    except (ValueError, TypeError, IndexError) as e:
        raise InvalidArgumentError(f"pipeline {name!r}: bad parameters: {type(e).__name__}: {e}") from None
    out = b.at[graph.output]
    if b.stages[out].kind != "head":
        raise InvalidArgumentError(f"pipeline {name!r}: the output must be a model (linear, trees, mlp, opaque model)")
    # keep only what the output needs, in order
    need: set[int] = set()
    todo = [out]
    while todo:
        i = todo.pop()
        if i not in need:
            need.add(i)
            todo.extend(b.stages[i].inputs)
    order = sorted(need)
    remap = {old: new for new, old in enumerate(order)}
    stages = []
    for old in order:
        s = b.stages[old]
        stages.append(Stage(s.key, s.kind, [remap[i] for i in s.inputs], s.fn, s.fields))
    return Plan(name, graph, stages, sorted(b.rules), sorted(set(b.shared)), b.extra)


def run(plan: Plan, columns: dict[str, list[Any]], n: int, *, sources: dict[int, Any] | None = None) -> models.Scores:
    """Run ``plan`` on ``n`` records given as columns; ``sources`` holds source-stage outputs
    computed elsewhere (shared across pipelines)."""
    outs: list[Any] = [None] * len(plan.stages)
    for i, s in enumerate(plan.stages):
        if not s.inputs:
            outs[i] = sources[i] if sources and i in sources else s.fn(columns, n)
        else:
            outs[i] = s.fn(*(outs[j] for j in s.inputs))
    result: models.Scores = outs[-1]
    return result
