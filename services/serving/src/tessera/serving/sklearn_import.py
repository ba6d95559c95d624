"""Fitted scikit-learn pipelines to the IR (run on the client: only the IR travels).

Supported (white box: operators the engine runs itself):

- composition: Pipeline, FeatureUnion, ColumnTransformer;
- text: CountVectorizer, TfidfVectorizer, HashingVectorizer, TfidfTransformer;
- preprocessing: StandardScaler, MinMaxScaler, MaxAbsScaler, Normalizer, OneHotEncoder,
  SimpleImputer (numeric), PolynomialFeatures, KBinsDiscretizer; decomposition: PCA, TruncatedSVD;
- models: LogisticRegression, LinearSVC, RidgeClassifier, SGDClassifier, LinearRegression, Ridge,
  Lasso, ElasticNet, SGDRegressor; DecisionTree, ExtraTrees, RandomForest, GradientBoosting and
  HistGradientBoosting classifiers and regressors; MLPClassifier, MLPRegressor; LightGBM's
  LGBMClassifier/LGBMRegressor and XGBoost's XGBClassifier/XGBRegressor when those packages
  are installed.

Any other step (or an option of a supported one that the IR cannot express) becomes an
opaque ``blackbox`` node: its pickle, run by the server in a worker process, with an
:class:`OpaqueStepWarning`. ``strict=True`` raises :class:`UnsupportedEstimatorError`
naming the step instead.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError
from tessera.serving.ir import HEADS, Field, Graph, Node, Pipeline, encode_terms

log = logging.getLogger(__name__)


class UnsupportedEstimatorError(InvalidArgumentError):
    """The pipeline holds an estimator (or an option of one) that the IR cannot express."""


class OpaqueStepWarning(UserWarning):
    """A step the IR cannot express is served as an opaque stage (its pickle, in a worker process)."""


def _name(est: Any) -> str:
    return type(est).__name__


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


class _Importer:
    def __init__(self, *, strict: bool = False) -> None:
        self.p = Pipeline(Graph([], [], ""), {})
        self.n = 0
        self.fields: dict[str, str] = {}
        self.strict = strict
        self.opaque: list[str] = []  # the steps served as opaque stages

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
        """Apply one step to ``cur``: a ('fields', [names], kind) selection or a node id. A step
        the IR cannot express becomes an opaque stage (``strict``: the error naming it)."""
        n_nodes, had = len(self.p.graph.nodes), set(self.p.params)
        try:
            return self._step(est, cur)
        except UnsupportedEstimatorError as e:
            if self.strict:
                raise
            del self.p.graph.nodes[n_nodes:]  # what the failed translation had added
            for h in set(self.p.params) - had:
                del self.p.params[h]
            return self.blackbox(est, cur, str(e))

    def blackbox(self, est: Any, cur: Any, reason: str) -> str:
        from sklearn.base import is_classifier, is_regressor

        model = is_classifier(est) or is_regressor(est)
        attrs: dict[str, Any] = {"estimator": _name(est), "kind": "model" if model else "transform"}
        if isinstance(cur, tuple) and cur[2] == "text":
            if len(cur[1]) != 1:
                raise UnsupportedEstimatorError(f"{_name(est)}: an opaque text step must read one column") from None
            x = self.add("columns", [], {"fields": [self.field(cur[1][0], "text")], "categorical": True}, {})
            attrs["text"] = True
        else:
            categorical = isinstance(cur, tuple) and any(self.fields.get(n) == "category" for n in cur[1])
            x = self.materialize(cur, categorical=categorical)
        if model and getattr(est, "classes_", None) is not None:
            attrs["classes"] = [_jsonable(c) for c in np.asarray(est.classes_).tolist()]
        try:
            blob = pickle.dumps(est, protocol=5)
        except Exception as e:  # a lambda inside, an open file
            raise UnsupportedEstimatorError(f"{reason}; and {_name(est)} cannot be pickled to run as an opaque stage "
                                            f"({type(e).__name__}: {e})") from None
        msg = (f"{_name(est)} runs as an opaque stage (its pickle, in a worker process of the server): {reason}. "
               "strict=True refuses it instead")
        warnings.warn(msg, OpaqueStepWarning, stacklevel=4)
        log.warning("%s", msg)
        self.opaque.append(_name(est))
        return self.add("blackbox", [x], attrs, {"pickle": np.frombuffer(blob, dtype=np.uint8)})

    def _step(self, est: Any, cur: Any) -> Any:
        from sklearn.compose import ColumnTransformer
        from sklearn.decomposition import PCA, TruncatedSVD
        from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer, TfidfTransformer
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import FeatureUnion
        from sklearn.pipeline import Pipeline as SkPipeline
        from sklearn.preprocessing import (
            KBinsDiscretizer,
            MaxAbsScaler,
            MinMaxScaler,
            Normalizer,
            OneHotEncoder,
            PolynomialFeatures,
            StandardScaler,
        )

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
        if isinstance(est, (MinMaxScaler, MaxAbsScaler, Normalizer, SimpleImputer, PolynomialFeatures,
                            KBinsDiscretizer, PCA, TruncatedSVD)):
            return self.transform(est, self.materialize(cur))
        return self.model(est, self.materialize(cur))

    def transform(self, est: Any, x: str) -> str:
        """The numeric preprocessing and decomposition steps."""
        from sklearn.decomposition import PCA, TruncatedSVD
        from sklearn.impute import SimpleImputer
        from sklearn.preprocessing import KBinsDiscretizer, MaxAbsScaler, MinMaxScaler, Normalizer, PolynomialFeatures

        f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        if isinstance(est, MinMaxScaler):
            clip = [float(v) for v in est.feature_range] if est.clip else None
            return self.add("affine", [x], {"clip": clip}, {"mul": f64(est.scale_), "add": f64(est.min_)})
        if isinstance(est, MaxAbsScaler):
            return self.add("scale", [x], {}, {"scale": f64(est.scale_)})
        if isinstance(est, Normalizer):
            return self.add("normalize", [x], {"norm": est.norm}, {})
        if isinstance(est, SimpleImputer):
            return self.impute(est, x)
        if isinstance(est, PolynomialFeatures):
            return self.add("poly", [x], {}, {"powers": np.asarray(est.powers_, dtype=np.int64)})
        if isinstance(est, KBinsDiscretizer):
            inner = [f64(e)[1:-1] for e in est.bin_edges_]
            offsets = np.concatenate([[0], np.cumsum([e.size for e in inner])]).astype(np.int64)
            edges = np.concatenate(inner) if inner else np.zeros(0)
            return self.add("kbins", [x], {"encode": est.encode}, {"edges": edges, "edge_offsets": offsets})
        if isinstance(est, PCA):
            divisor = None
            if est.whiten:
                divisor = np.sqrt(f64(est.explained_variance_))
                eps = np.finfo(divisor.dtype).eps
                divisor[divisor < eps] = eps
            return self.add("project", [x], {}, {"components": f64(est.components_), "mean": f64(est.mean_),
                                                 "divisor": divisor})
        assert isinstance(est, TruncatedSVD)
        return self.add("project", [x], {}, {"components": f64(est.components_)})

    def impute(self, est: Any, x: str) -> str:
        mv = est.missing_values
        if isinstance(mv, float) and np.isnan(mv):
            missing: Any = "nan"
        elif isinstance(mv, (int, float)) and not isinstance(mv, bool):
            missing = float(mv)
        else:
            raise UnsupportedEstimatorError(f"SimpleImputer(missing_values={mv!r}) is not supported (NaN or a number)")
        stats = np.asarray(est.statistics_)
        if stats.dtype.kind not in "fiu":
            raise UnsupportedEstimatorError("SimpleImputer over non-numeric columns is not supported")
        stats = stats.astype(np.float64)
        keep = None
        if not est.keep_empty_features and np.isnan(stats).any():
            keep = np.flatnonzero(~np.isnan(stats)).tolist()
        attrs: dict[str, Any] = {"missing": missing, "keep": keep}
        if est.add_indicator:
            attrs["indicator"] = [int(i) for i in est.indicator_.features_]
        return self.add("impute", [x], attrs, {"fill": stats})

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
                sub = ("fields", sel, "text")
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
        from sklearn import tree as sk_tree
        from sklearn.neural_network import MLPClassifier, MLPRegressor

        if isinstance(est, (en.GradientBoostingClassifier, en.GradientBoostingRegressor)):
            return self.boosting(est, x)
        if isinstance(est, (en.RandomForestClassifier, en.RandomForestRegressor, en.ExtraTreesClassifier,
                            en.ExtraTreesRegressor)):
            return self.forest(est, list(est.estimators_), x)
        if isinstance(est, (sk_tree.DecisionTreeClassifier, sk_tree.DecisionTreeRegressor)):  # ExtraTree* too
            return self.forest(est, [est], x)
        if isinstance(est, (en.HistGradientBoostingClassifier, en.HistGradientBoostingRegressor)):
            return self.hist_boosting(est, x)
        if isinstance(est, (MLPClassifier, MLPRegressor)):
            return self.mlp(est, x)
        mod = type(est).__module__
        if mod.startswith("lightgbm.") and _name(est) in ("LGBMClassifier", "LGBMRegressor"):
            return self.lightgbm(est, x)
        if mod.startswith("xgboost.") and _name(est) in ("XGBClassifier", "XGBRegressor"):
            return self.xgboost(est, x)
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
        feats, thr, left, right, vals, roots, miss = [], [], [], [], [], [], []
        off = 0
        for t, v in zip(trees, values, strict=True):
            tr = t.tree_
            roots.append(off)
            miss.append(np.asarray(getattr(tr, "missing_go_to_left", np.zeros(tr.node_count)), dtype=np.uint8))
            feats.append(tr.feature.astype(np.int64))
            thr.append(tr.threshold.astype(np.float64))
            lc = tr.children_left.astype(np.int64)
            rc = tr.children_right.astype(np.int64)
            left.append(np.where(lc >= 0, lc + off, -1))
            right.append(np.where(rc >= 0, rc + off, -1))
            vals.append(v)
            off += tr.node_count
        return {"feature": np.concatenate(feats), "threshold": np.concatenate(thr), "left": np.concatenate(left),
                "right": np.concatenate(right), "value": np.concatenate(vals), "roots": np.asarray(roots, dtype=np.int64),
                "missing_left": np.concatenate(miss)}

    def hist_boosting(self, est: Any, x: str) -> str:
        return _hist_boosting(self, est, x)

    def mlp(self, est: Any, x: str) -> str:
        return _mlp(self, est, x)

    def lightgbm(self, est: Any, x: str) -> str:
        return _lightgbm(self, est, x)

    def xgboost(self, est: Any, x: str) -> str:
        return _xgboost(self, est, x)

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

    def forest(self, est: Any, trees: list[Any], x: str) -> str:
        """A forest (the mean of its trees) or one decision tree."""
        from sklearn.base import is_classifier

        clf = is_classifier(est)
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


def import_sklearn(est: Any, *, text_field: str = "text", strict: bool = False) -> Pipeline:
    """The IR of a fitted scikit-learn estimator or pipeline.

    Text pipelines (whose first step is a vectorizer or a FeatureUnion of them) read one
    text field, ``text_field``; tabular ones read the columns they were fitted on, named
    by ``feature_names_in_`` when fitted on a DataFrame, else ``x0``, ``x1``, ...

    A step the IR cannot express runs as an opaque stage, with an :class:`OpaqueStepWarning`;
    ``strict=True`` raises :class:`UnsupportedEstimatorError` naming it instead.
    """
    from sklearn.base import is_classifier, is_regressor

    if not (is_classifier(est) or is_regressor(est)):
        raise UnsupportedEstimatorError(f"{_name(est)} is not a fitted classifier or regressor pipeline")
    imp = _Importer(strict=strict)
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
    last = imp.p.graph.node(out) if isinstance(out, str) else None
    if last is None or not (last.op in HEADS or (last.op == "blackbox" and last.attrs.get("kind") == "model")):
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


def _leaf_links(left: np.ndarray, right: np.ndarray, leaf: np.ndarray, off: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.where(leaf, -1, left.astype(np.int64) + off), np.where(leaf, -1, right.astype(np.int64) + off))


def _tree_params(nodes: list[dict[str, np.ndarray]], outputs: list[int]) -> dict[str, np.ndarray]:
    """Trees given as per-tree arrays (feature, threshold, left, right, value, missing_left; local
    indices, leaf where ``leaf``) packed into the ``trees`` operator's parameters."""
    feats, thr, left, right, vals, miss, roots = [], [], [], [], [], [], []
    off = 0
    for t in nodes:
        roots.append(off)
        leaf = t["leaf"].astype(bool)
        lc, rc = _leaf_links(t["left"], t["right"], leaf, off)
        feats.append(np.where(leaf, 0, t["feature"]).astype(np.int64))
        thr.append(np.asarray(t["threshold"], dtype=np.float64))
        left.append(lc)
        right.append(rc)
        vals.append(np.asarray(t["value"], dtype=np.float64).reshape(-1, 1))
        miss.append(np.asarray(t["missing_left"], dtype=np.uint8))
        off += leaf.size
    return {"feature": np.concatenate(feats), "threshold": np.concatenate(thr), "left": np.concatenate(left),
            "right": np.concatenate(right), "value": np.concatenate(vals), "roots": np.asarray(roots, dtype=np.int64),
            "missing_left": np.concatenate(miss), "tree_output": np.asarray(outputs, dtype=np.int64)}


def _node_arrays(rows: list[tuple[int, float, int, int, float, int, int]]) -> dict[str, np.ndarray]:
    cols = list(zip(*rows, strict=True))
    names = ("feature", "threshold", "left", "right", "value", "missing_left", "leaf")
    return {n: np.asarray(c) for n, c in zip(names, cols, strict=True)}


def _depth(nodes: list[dict[str, np.ndarray]]) -> int:
    """Longest root-to-leaf path over the trees (nodes in local indices)."""
    best = 0
    for t in nodes:
        leaf = t["leaf"].astype(bool)
        depth = np.zeros(leaf.size, dtype=np.int64)
        todo = [0]
        while todo:
            i = todo.pop()
            if not leaf[i]:
                for c in (int(t["left"][i]), int(t["right"][i])):
                    depth[c] = depth[i] + 1
                    todo.append(c)
        best = max(best, int(depth.max()))
    return best


def _hist_boosting(imp: _Importer, est: Any, x: str) -> str:
    from sklearn.base import is_classifier

    if getattr(est, "is_categorical_", None) is not None and np.any(est.is_categorical_):
        raise UnsupportedEstimatorError(f"{_name(est)} with categorical features is not supported")
    if getattr(est, "_preprocessor", None) is not None:
        raise UnsupportedEstimatorError(f"{_name(est)} with categorical features is not supported")
    clf = is_classifier(est)
    if clf and est.loss != "log_loss":
        raise UnsupportedEstimatorError(f"{_name(est)}(loss={est.loss!r}) is not supported")
    if not clf and est.loss not in ("squared_error", "absolute_error", "quantile"):
        raise UnsupportedEstimatorError(f"{_name(est)}(loss={est.loss!r}) is not supported (its link is not identity)")
    trees, outs = [], []
    for it in est._predictors:
        for k, pred in enumerate(it):
            nd = pred.nodes
            trees.append({"feature": nd["feature_idx"], "threshold": nd["num_threshold"], "left": nd["left"],
                          "right": nd["right"], "value": nd["value"], "missing_left": nd["missing_go_to_left"],
                          "leaf": nd["is_leaf"]})
            outs.append(k)
    k = int(est.n_trees_per_iteration_)
    base = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
    attrs: dict[str, Any] = {"combine": "sum", "scale": 1.0, "base": base.tolist(), "n_outputs": k,
                             "n_features": int(est.n_features_in_), "max_depth": _depth(trees),
                             "input_dtype": "float64"}
    if clf:
        attrs.update(proba="logistic", classes=[_jsonable(c) for c in est.classes_.tolist()])
    return imp.add("trees", [x], attrs, dict(_tree_params(trees, outs)))


def _mlp(imp: _Importer, est: Any, x: str) -> str:
    from sklearn.base import is_classifier

    act = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
    if est.activation not in act:
        raise UnsupportedEstimatorError(f"{_name(est)}(activation={est.activation!r}) is not supported")
    out_act = est.out_activation_
    clf = is_classifier(est)
    if clf and (out_act not in ("logistic", "softmax") or (out_act == "logistic" and est.coefs_[-1].shape[1] != 1)):
        raise UnsupportedEstimatorError(f"multi-label {_name(est)} is not supported")
    if not clf and (out_act != "identity" or est.coefs_[-1].shape[1] != 1):
        raise UnsupportedEstimatorError(f"multi-output {_name(est)} is not supported")
    spec: list[dict[str, Any]] = []
    params: dict[str, np.ndarray | None] = {}
    n = len(est.coefs_)
    for i, (w, b) in enumerate(zip(est.coefs_, est.intercepts_, strict=True)):
        params[f"w{len(spec)}"] = np.ascontiguousarray(np.asarray(w, dtype=np.float64).T)
        params[f"b{len(spec)}"] = np.asarray(b, dtype=np.float64)
        spec.append({"kind": "linear"})
        if i < n - 1 and est.activation != "identity":
            spec.append({"kind": act[est.activation]})
    attrs: dict[str, Any] = {"layers": spec, "proba": "none"}
    if clf:
        # the output activation is the probability: sigmoid of one column, or softmax
        attrs.update(proba="logistic" if out_act == "logistic" else "softmax",
                     classes=[_jsonable(c) for c in est.classes_.tolist()], outputs=["predict_proba"])
    return imp.add("mlp", [x], attrs, params)


def _lightgbm(imp: _Importer, est: Any, x: str) -> str:
    from sklearn.base import is_classifier

    model = est.booster_.dump_model()
    objective = str(model.get("objective", "")).split()
    obj = objective[0] if objective else ""
    clf = is_classifier(est)
    if clf:
        if obj == "binary":
            if any(o.startswith("sigmoid:") and float(o.split(":")[1]) != 1.0 for o in objective[1:]):
                raise UnsupportedEstimatorError(f"{_name(est)} with sigmoid != 1 is not supported")
        elif obj != "multiclass":
            raise UnsupportedEstimatorError(f"{_name(est)}(objective={obj!r}) is not supported")
    elif obj not in ("regression", "regression_l1", "huber", "fair", "quantile"):
        raise UnsupportedEstimatorError(f"{_name(est)}(objective={obj!r}) is not supported (its link is not identity)")
    k = int(model.get("num_tree_per_iteration", 1))
    trees, outs = [], []
    for i, info in enumerate(model["tree_info"]):
        rows: list[tuple[int, float, int, int, float, int, int]] = []  # feature threshold left right value nan_left leaf

        def visit(nd: dict[str, Any], rows: list[tuple[int, float, int, int, float, int, int]] = rows) -> int:
            me = len(rows)
            if "split_feature" not in nd:
                rows.append((0, 0.0, 0, 0, float(nd["leaf_value"]), 0, 1))
                return me
            if nd.get("decision_type", "<=") != "<=":
                raise UnsupportedEstimatorError(f"{_name(est)} with categorical splits is not supported")
            t = float(nd["threshold"])
            mt = nd.get("missing_type", "None")
            if mt == "NaN":
                nan_left = bool(nd.get("default_left", True))
            elif mt == "None":
                nan_left = 0.0 <= t  # LightGBM reads a missing value as 0 here
            else:
                raise UnsupportedEstimatorError(f"{_name(est)} with zero_as_missing is not supported")
            rows.append((int(nd["split_feature"]), t, 0, 0, 0.0, int(nan_left), 0))
            left = visit(nd["left_child"])
            right = visit(nd["right_child"])
            f, t_, _, _, v, m, lf = rows[me]
            rows[me] = (f, t_, left, right, v, m, lf)
            return me

        visit(info["tree_structure"])
        trees.append(_node_arrays(rows))
        outs.append(i % k)
    n_features = int(model.get("max_feature_idx", est.n_features_in_ - 1)) + 1
    attrs: dict[str, Any] = {"combine": "sum", "scale": 1.0, "base": [0.0] * k, "n_outputs": k,
                             "n_features": n_features, "max_depth": _depth(trees), "input_dtype": "float64"}
    if clf:
        attrs.update(proba="logistic", classes=[_jsonable(c) for c in est.classes_.tolist()],
                     outputs=["predict_proba", *(["decision_function"] if hasattr(est, "decision_function") else [])])
    return imp.add("trees", [x], attrs, dict(_tree_params(trees, outs)))


def _xgboost(imp: _Importer, est: Any, x: str) -> str:
    import json

    from sklearn.base import is_classifier

    booster = est.get_booster()
    config = json.loads(booster.save_config())
    learner = config["learner"]
    obj = learner["objective"]["name"]
    clf = is_classifier(est)
    if clf and obj not in ("binary:logistic", "multi:softprob", "multi:softmax"):
        raise UnsupportedEstimatorError(f"{_name(est)}(objective={obj!r}) is not supported")
    if not clf and obj not in ("reg:squarederror", "reg:absoluteerror", "reg:pseudohubererror", "reg:quantileerror"):
        raise UnsupportedEstimatorError(f"{_name(est)}(objective={obj!r}) is not supported (its link is not identity)")
    if learner["gradient_booster"]["name"] != "gbtree":
        raise UnsupportedEstimatorError(f"{_name(est)}(booster={learner['gradient_booster']['name']!r}) is not supported")
    k = int(learner["learner_model_param"].get("num_class", "0")) or 1
    margin = np.asarray(_xgb_base_margin(booster, learner, clf, k), dtype=np.float64)
    dumps = booster.get_dump(dump_format="json", with_stats=False)
    trees, outs = [], []
    for i, text in enumerate(dumps):
        nodes: dict[int, dict[str, Any]] = {}
        todo = [json.loads(text)]
        while todo:
            nd = todo.pop()
            nodes[int(nd["nodeid"])] = nd
            todo.extend(nd.get("children", []))
        pos = {nid: j for j, nid in enumerate(sorted(nodes))}
        rows: list[tuple[int, float, int, int, float, int, int]] = []
        for nid in sorted(nodes):
            nd = nodes[nid]
            if "leaf" in nd:
                rows.append((0, 0.0, 0, 0, float(nd["leaf"]), 0, 1))
                continue
            split = str(nd["split"])
            if not split.startswith("f") or not split[1:].isdigit():
                raise UnsupportedEstimatorError(f"{_name(est)}: split on a named feature {split!r} is not supported; "
                                                "fit it on an array")
            if "split_condition" not in nd:
                raise UnsupportedEstimatorError(f"{_name(est)} with categorical splits is not supported")
            rows.append((int(split[1:]), float(np.float32(nd["split_condition"])), pos[int(nd["yes"])],
                         pos[int(nd["no"])], 0.0, int(nd["missing"] == nd["yes"]), 0))
        trees.append(_node_arrays(rows))
        outs.append(i % k)
    attrs: dict[str, Any] = {"combine": "sum", "scale": 1.0, "base": margin.tolist(), "n_outputs": k,
                             "n_features": int(est.n_features_in_), "max_depth": _depth(trees), "cmp": "lt"}
    if clf:
        attrs.update(proba="logistic", classes=[_jsonable(c) for c in est.classes_.tolist()], outputs=["predict_proba"])
    return imp.add("trees", [x], attrs, dict(_tree_params(trees, outs)))


def _xgb_base_margin(booster: Any, learner: dict[str, Any], clf: bool, k: int) -> list[float]:
    """The margin every prediction starts from: the base score through the objective's link."""
    raw = str(learner["learner_model_param"]["base_score"]).strip("[]")
    scores = [float(v) for v in raw.split(",") if v.strip()]
    if len(scores) == 1:
        scores = scores * k
    if clf and k == 1:
        return [float(np.log(s / (1.0 - s))) for s in scores]
    return scores
