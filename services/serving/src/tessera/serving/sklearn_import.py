"""Fitted scikit-learn pipelines to the IR (run on the client: only the IR travels).

Supported: Pipeline, FeatureUnion, ColumnTransformer; CountVectorizer, TfidfVectorizer,
HashingVectorizer, TfidfTransformer, StandardScaler, OneHotEncoder; LogisticRegression,
LinearSVC, LinearRegression, Ridge, SGDClassifier, SGDRegressor, GradientBoostingClassifier/
Regressor, RandomForestClassifier/Regressor. Anything else raises
:class:`UnsupportedEstimatorError` naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError
from tessera.serving.ir import Field, Graph, Node, Pipeline, encode_terms


class UnsupportedEstimatorError(InvalidArgumentError):
    """The pipeline holds an estimator (or an option of one) that the IR cannot express."""


def _name(est: Any) -> str:
    return type(est).__name__


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


class _Importer:
    def __init__(self) -> None:
        self.p = Pipeline(Graph([], [], ""), {})
        self.n = 0
        self.fields: dict[str, str] = {}

    def add(self, op: str, inputs: list[str], attrs: dict[str, Any], params: dict[str, np.ndarray | None]) -> str:
        self.n += 1
        nid = f"{op}{self.n}"
        hashes = {role: self.p.add(arr) for role, arr in params.items() if arr is not None}
        self.p.graph.nodes.append(Node(nid, op, inputs, attrs, hashes))
        return nid

    def field(self, name: str, kind: str) -> str:
        old = self.fields.get(name)
        if old is not None and old != kind:
            if {old, kind} == {"number", "category"}:
                kind = "category"  # a category field also accepts numbers
            else:
                raise UnsupportedEstimatorError(f"column {name!r} is used both as {old} and {kind}")
        self.fields[name] = kind
        return name

    # -- steps: each takes the current value ("fields" of a Columns selection, or a node id) ---
    def text(self, est: Any, fld: str) -> str:
        from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer, TfidfVectorizer

        if not isinstance(est, (CountVectorizer, HashingVectorizer)):
            raise UnsupportedEstimatorError(f"unsupported text step {_name(est)}")
        for opt in ("preprocessor", "tokenizer"):
            if getattr(est, opt) is not None:
                raise UnsupportedEstimatorError(f"{_name(est)} with a custom {opt} is not supported")
        if callable(est.analyzer):
            raise UnsupportedEstimatorError(f"{_name(est)} with a callable analyzer is not supported")
        if est.input != "content":
            raise UnsupportedEstimatorError(f"{_name(est)}(input={est.input!r}) is not supported (only 'content')")
        stop = est.get_stop_words()
        attrs: dict[str, Any] = {
            "field": self.field(fld, "text"), "analyzer": est.analyzer, "ngram_range": list(est.ngram_range),
            "lowercase": bool(est.lowercase), "strip_accents": est.strip_accents,
            "token_pattern": est.token_pattern, "stop_words": sorted(stop) if stop else [],
            "binary": bool(est.binary),
        }
        if est.strip_accents not in (None, "ascii", "unicode"):
            raise UnsupportedEstimatorError(f"{_name(est)}(strip_accents=callable) is not supported")
        if isinstance(est, HashingVectorizer):
            attrs.update(n_features=int(est.n_features), alternate_sign=bool(est.alternate_sign), norm=est.norm)
            return self.add("hashing", [], attrs, {})
        vocab = est.vocabulary_
        terms = [""] * len(vocab)
        for t, j in vocab.items():
            terms[j] = t
        chars, offsets = encode_terms(terms)
        node = self.add("text_ngrams", [], attrs, {"terms": chars, "offsets": offsets})
        if isinstance(est, TfidfVectorizer):
            return self.tfidf(est, node)
        return node

    def tfidf(self, est: Any, node: str) -> str:
        idf = est.idf_ if est.use_idf else None
        return self.add("tfidf", [node], {"norm": est.norm, "sublinear_tf": bool(est.sublinear_tf)},
                        {"idf": None if idf is None else np.asarray(idf, dtype=np.float64)})

    def step(self, est: Any, cur: Any) -> Any:
        """Apply one step to ``cur``: a ('fields', [names], kind) selection or a node id."""
        from sklearn.compose import ColumnTransformer
        from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer, TfidfTransformer
        from sklearn.pipeline import FeatureUnion
        from sklearn.pipeline import Pipeline as SkPipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        if isinstance(est, SkPipeline):
            for _, s in est.steps:
                if s is None or s == "passthrough":
                    continue
                cur = self.step(s, cur)
            return cur
        if isinstance(est, (CountVectorizer, HashingVectorizer)):
            return self.text(est, self._text_field(cur, est))
        if isinstance(est, FeatureUnion):
            if est.transformer_weights:
                raise UnsupportedEstimatorError("FeatureUnion with transformer_weights is not supported")
            parts = [self.materialize(self.step(t, cur)) for _, t in est.transformer_list if t not in ("drop", None)]
            return parts[0] if len(parts) == 1 else self.add("concat", parts, {}, {})
        if isinstance(est, ColumnTransformer):
            return self.column_transformer(est, cur)
        if isinstance(est, TfidfTransformer):
            return self.tfidf(est, self.materialize(cur))
        if isinstance(est, StandardScaler):
            mean = est.mean_ if est.with_mean else None
            scale = est.scale_ if est.with_std else None
            return self.add("scale", [self.materialize(cur)], {}, {"mean": mean, "scale": scale})
        if isinstance(est, OneHotEncoder):
            return self.onehot(est, cur)
        return self.model(est, self.materialize(cur))

    def _text_field(self, cur: Any, est: Any) -> str:
        if isinstance(cur, tuple) and len(cur[1]) == 1:
            return str(cur[1][0])
        raise UnsupportedEstimatorError(f"{_name(est)} must read exactly one text column")

    def materialize(self, cur: Any, *, categorical: bool = False) -> str:
        if isinstance(cur, tuple):
            _, names, kind = cur
            for nm in names:
                self.field(nm, "category" if categorical else "number")
            return self.add("columns", [], {"fields": list(names), "categorical": categorical}, {})
        return str(cur)

    def onehot(self, est: Any, cur: Any) -> str:
        if not isinstance(cur, tuple):
            raise UnsupportedEstimatorError("OneHotEncoder must read input columns directly")
        if est.handle_unknown not in ("error", "ignore"):
            raise UnsupportedEstimatorError(f"OneHotEncoder(handle_unknown={est.handle_unknown!r}) is not supported")
        if getattr(est, "_infrequent_enabled", False):
            raise UnsupportedEstimatorError("OneHotEncoder with infrequent categories is not supported")
        cats = [[_jsonable(c) for c in col.tolist()] for col in est.categories_]
        for col in cats:
            for c in col:
                if not isinstance(c, (str, int, float)) or (isinstance(c, float) and np.isnan(c)):
                    raise UnsupportedEstimatorError(f"OneHotEncoder category {c!r} is not supported (str or number)")
        drop = est.drop_idx_
        attrs = {"categories": cats, "handle_unknown": est.handle_unknown,
                 "drop_idx": None if drop is None else [None if d is None else int(d) for d in drop],
                 "sparse_output": bool(est.sparse_output)}
        return self.add("onehot", [self.materialize(cur, categorical=True)], attrs, {})

    def column_transformer(self, ct: Any, cur: Any) -> str:
        if not isinstance(cur, tuple):
            raise UnsupportedEstimatorError("ColumnTransformer must be the first step")
        names = cur[1]
        parts: list[str] = []
        idx_map = ct._transformer_to_input_indices
        for name, trans, _cols in ct.transformers_:
            if trans == "drop":
                continue
            idx = list(idx_map.get(name, []))
            if not idx:
                continue
            sel = [names[i] for i in idx]
            sub: Any = ("fields", sel, "number")
            identity = type(trans).__name__ == "FunctionTransformer" and trans.func is None and \
                trans.inverse_func is None  # how a fitted ColumnTransformer keeps remainder="passthrough"
            if trans == "passthrough" or identity:
                parts.append(self.materialize(sub))
                continue
            from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer

            if isinstance(trans, (CountVectorizer, HashingVectorizer)) and len(sel) == 1:
                parts.append(self.text(trans, sel[0]))
                continue
            parts.append(self.materialize(self.step(trans, sub)))
        if not parts:
            raise UnsupportedEstimatorError("ColumnTransformer selects no columns")
        return parts[0] if len(parts) == 1 else self.add("concat", parts, {}, {})

    def model(self, est: Any, x: str) -> str:
        from sklearn import ensemble as en
        from sklearn import linear_model as lm
        from sklearn.svm import LinearSVC

        if isinstance(est, (lm.LogisticRegression, LinearSVC, lm.SGDClassifier, lm.RidgeClassifier)):
            proba = "none"
            if isinstance(est, lm.LogisticRegression):
                proba = "logistic"
                if getattr(est, "multi_class", "auto") == "ovr" and len(est.classes_) > 2:
                    proba = "ovr_logistic"
            elif isinstance(est, lm.SGDClassifier) and est.loss in ("log_loss", "modified_huber"):
                if est.loss == "modified_huber":
                    raise UnsupportedEstimatorError("SGDClassifier(loss='modified_huber') is not supported")
                proba = "ovr_logistic"
            classes = [_jsonable(c) for c in est.classes_.tolist()]
            return self.linear(x, {"proba": proba, "classes": classes}, np.asarray(est.coef_, dtype=np.float64),
                               np.atleast_1d(np.asarray(est.intercept_, dtype=np.float64)))
        if isinstance(est, (lm.LinearRegression, lm.Ridge, lm.SGDRegressor, lm.Lasso, lm.ElasticNet)):
            coef = np.asarray(est.coef_, dtype=np.float64)
            if coef.ndim > 1 and coef.shape[0] > 1:
                raise UnsupportedEstimatorError(f"multi-output {_name(est)} is not supported")
            return self.linear(x, {"proba": "none"}, coef.reshape(1, -1),
                               np.atleast_1d(np.asarray(est.intercept_, dtype=np.float64)).reshape(-1))
        if isinstance(est, (en.GradientBoostingClassifier, en.GradientBoostingRegressor)):
            return self.boosting(est, x)
        if isinstance(est, (en.RandomForestClassifier, en.RandomForestRegressor)):
            return self.forest(est, x)
        raise UnsupportedEstimatorError(f"unsupported estimator {_name(est)} ({type(est).__module__})")

    def linear(self, x: str, attrs: dict[str, Any], coef: np.ndarray, intercept: np.ndarray) -> str:
        """Weights of the live columns only when most are zero (features the model never saw
        in training): what a head adds to the store is then a fraction of its dense size."""
        live = np.flatnonzero(np.any(coef != 0.0, axis=0))
        if live.size < 0.5 * coef.shape[1]:
            attrs = dict(attrs, n_features=int(coef.shape[1]))
            return self.add("linear", [x], attrs, {"coef_index": live.astype(np.int32),
                                                   "coef_value": np.ascontiguousarray(coef[:, live]),
                                                   "intercept": intercept})
        return self.add("linear", [x], attrs, {"coef": coef, "intercept": intercept})

    @staticmethod
    def _pack(trees: list[Any], values: list[np.ndarray]) -> dict[str, np.ndarray]:
        feats, thr, left, right, vals, roots = [], [], [], [], [], []
        off = 0
        for t, v in zip(trees, values, strict=True):
            tr = t.tree_
            roots.append(off)
            feats.append(tr.feature.astype(np.int64))
            thr.append(tr.threshold.astype(np.float64))
            lc = tr.children_left.astype(np.int64)
            rc = tr.children_right.astype(np.int64)
            left.append(np.where(lc >= 0, lc + off, -1))
            right.append(np.where(rc >= 0, rc + off, -1))
            vals.append(v)
            off += tr.node_count
        return {"feature": np.concatenate(feats), "threshold": np.concatenate(thr), "left": np.concatenate(left),
                "right": np.concatenate(right), "value": np.concatenate(vals), "roots": np.asarray(roots, dtype=np.int64)}

    def boosting(self, est: Any, x: str) -> str:
        from sklearn.ensemble import GradientBoostingClassifier

        if est.init_ != "zero" and type(est.init_).__name__ not in ("DummyClassifier", "DummyRegressor"):
            raise UnsupportedEstimatorError(f"{_name(est)} with init={_name(est.init_)} is not supported")
        n_stages, k = est.estimators_.shape
        trees, values, outs = [], [], []
        for s in range(n_stages):
            for c in range(k):
                t = est.estimators_[s, c]
                trees.append(t)
                values.append(t.tree_.value[:, 0, 0].astype(np.float64)[:, None])
                outs.append(c)
        packed = self._pack(trees, values)
        packed["tree_output"] = np.asarray(outs, dtype=np.int64)
        n_features = int(est.n_features_in_)
        base = est._raw_predict_init(np.zeros((1, n_features), dtype=np.float32))[0].astype(np.float64)
        attrs: dict[str, Any] = {"combine": "sum", "scale": float(est.learning_rate), "base": base.tolist(),
                                 "n_outputs": int(k), "n_features": n_features,
                                 "max_depth": int(max(t.tree_.max_depth for t in trees))}
        if isinstance(est, GradientBoostingClassifier):
            if est.loss != "log_loss":
                raise UnsupportedEstimatorError(f"GradientBoostingClassifier(loss={est.loss!r}) is not supported")
            attrs.update(proba="logistic", classes=[_jsonable(c) for c in est.classes_.tolist()])
        elif est.loss not in ("squared_error", "absolute_error", "huber", "quantile"):
            raise UnsupportedEstimatorError(f"GradientBoostingRegressor(loss={est.loss!r}) is not supported")
        return self.add("trees", [x], attrs, dict(packed))

    def forest(self, est: Any, x: str) -> str:
        from sklearn.ensemble import RandomForestClassifier

        trees = list(est.estimators_)
        clf = isinstance(est, RandomForestClassifier)
        if getattr(est, "n_outputs_", 1) != 1:
            raise UnsupportedEstimatorError(f"multi-output {_name(est)} is not supported")
        values = []
        for t in trees:
            v = t.tree_.value[:, 0, :].astype(np.float64)
            if clf:
                s = v.sum(axis=1, keepdims=True)
                s[s == 0] = 1.0
                v = v / s
            values.append(v)
        packed = self._pack(trees, values)
        packed["tree_output"] = np.zeros(len(trees), dtype=np.int64)
        params: dict[str, np.ndarray | None] = dict(packed)
        attrs: dict[str, Any] = {"combine": "mean", "n_features": int(est.n_features_in_),
                                 "max_depth": int(max(t.tree_.max_depth for t in trees))}
        if clf:
            attrs.update(proba="mean", classes=[_jsonable(c) for c in est.classes_.tolist()],
                         n_outputs=len(est.classes_))
        return self.add("trees", [x], attrs, params)


def import_sklearn(est: Any, *, text_field: str = "text") -> Pipeline:
    """The IR of a fitted scikit-learn estimator or pipeline.

    Text pipelines (whose first step is a vectorizer or a FeatureUnion of them) read one
    text field, ``text_field``; tabular ones read the columns they were fitted on, named
    by ``feature_names_in_`` when fitted on a DataFrame, else ``x0``, ``x1``, ...
    """
    from sklearn.base import is_classifier, is_regressor

    if not (is_classifier(est) or is_regressor(est)):
        raise UnsupportedEstimatorError(f"{_name(est)} is not a fitted classifier or regressor pipeline")
    imp = _Importer()
    names = getattr(est, "feature_names_in_", None)
    n_in = getattr(est, "n_features_in_", None)
    if names is not None:
        start: Any = ("fields", [str(c) for c in names], "number")
    elif n_in is not None and not _reads_text(est):
        start = ("fields", [f"x{i}" for i in range(int(n_in))], "number")
    else:
        start = ("fields", [text_field], "text")
    try:
        out = imp.step(est, start)
    except AttributeError as e:
        raise UnsupportedEstimatorError(f"{_name(est)}: not fitted or not supported ({e})") from None
    if not isinstance(out, str) or imp.p.graph.node(out).op not in ("linear", "trees", "mlp"):
        raise UnsupportedEstimatorError(f"{_name(est)} does not end in a supported model")
    # inputs in the order the pipeline was fitted on
    order = start[1]
    imp.p.graph.inputs = [Field(n, imp.fields[n]) for n in order if n in imp.fields]
    imp.p.graph.output = out
    imp.p.graph.source = f"sklearn:{_name(est)}"
    imp.p.graph.check()
    return imp.p


def _reads_text(est: Any) -> bool:
    from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer
    from sklearn.pipeline import FeatureUnion
    from sklearn.pipeline import Pipeline as SkPipeline

    first = est.steps[0][1] if isinstance(est, SkPipeline) else est
    if isinstance(first, FeatureUnion):
        return any(_reads_text(t) if isinstance(t, SkPipeline) else isinstance(t, (CountVectorizer, HashingVectorizer))
                   for _, t in first.transformer_list)
    return isinstance(first, (CountVectorizer, HashingVectorizer))
