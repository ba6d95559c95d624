"""Predictions of imported scikit-learn pipelines equal scikit-learn's (1e-6), estimator by estimator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer, TfidfTransformer, TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge, SGDClassifier
from sklearn.naive_bayes import MultinomialNB
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline
from sklearn.preprocessing import (
    KBinsDiscretizer,
    MaxAbsScaler,
    MinMaxScaler,
    Normalizer,
    OneHotEncoder,
    PolynomialFeatures,
    StandardScaler,
)
from sklearn.svm import LinearSVC
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeClassifier

from tessera.common.errors import InvalidArgumentError
from tessera.serving.engine import Engine
from tessera.serving.sklearn_import import UnsupportedEstimatorError, import_sklearn

from .conftest import serve

TOL = 1e-6


def _check_classifier(sk: Any, e: Engine, X: Any) -> None:
    preds = e.predict("p", list(X))
    assert [p.label for p in preds] == sk.predict(X).tolist()
    ours = np.array([p.scores for p in preds])
    ref = sk.predict_proba(X) if hasattr(sk, "predict_proba") else sk.decision_function(X)
    ref = np.asarray(ref).reshape(len(preds), -1)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


TEXT_PIPELINES = {
    "tfidf_char_word_lr": lambda: Pipeline([
        ("f", FeatureUnion([("c", TfidfVectorizer(analyzer="char", ngram_range=(1, 3))),
                            ("w", TfidfVectorizer(ngram_range=(1, 2)))])),
        ("m", LogisticRegression(max_iter=500, C=3.0))]),
    "count_svc": lambda: make_pipeline(CountVectorizer(binary=True, stop_words=["again"]), LinearSVC()),
    "char_wb_sublinear_sgd": lambda: make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, norm="l1"),
        SGDClassifier(loss="log_loss", random_state=0)),
    "accents_count_tfidf_lr": lambda: make_pipeline(
        CountVectorizer(strip_accents="unicode", lowercase=False, ngram_range=(1, 2)), TfidfTransformer(),
        LogisticRegression(max_iter=500)),
    "hashing_hinge_sgd": lambda: make_pipeline(HashingVectorizer(n_features=2**12, analyzer="char", ngram_range=(1, 2)),
                                               SGDClassifier(random_state=0)),
}


@pytest.mark.parametrize("name", sorted(TEXT_PIPELINES))
def test_text_pipelines_match_sklearn(name: str, texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = TEXT_PIPELINES[name]().fit(docs[:300], y[:300])
    e = serve(import_sklearn(sk))
    _check_classifier(sk, e, docs[300:])


def test_binary_text_classifier_and_python_path(texts: tuple[list[str], np.ndarray], monkeypatch: Any) -> None:
    docs, y = texts
    yb = (y == "pos").astype(int)
    sk = make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 3)), LogisticRegression()).fit(docs, yb)
    _check_classifier(sk, serve(import_sklearn(sk)), docs[:100])
    from tessera.serving import native  # the fallback without a C compiler gives the same features

    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_lib", None)
    _check_classifier(sk, serve(import_sklearn(sk)), docs[:100])


def _tab_ct(scale: bool = True) -> ColumnTransformer:
    return ColumnTransformer([("num", StandardScaler() if scale else "passthrough", [0, 1, 2, 3]),
                              ("cat", OneHotEncoder(handle_unknown="ignore"), [4])])


@pytest.mark.parametrize("model", ["linreg", "ridge", "gbr", "rfr"])
def test_tabular_regressors_match_sklearn(model: str, tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, _ = tabular
    est = {"linreg": LinearRegression(), "ridge": Ridge(alpha=2.0),
           "gbr": GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=0),
           "rfr": RandomForestRegressor(n_estimators=15, max_depth=6, random_state=0)}[model]
    sk = Pipeline([("ct", _tab_ct()), ("m", est)]).fit(X[:200], y[:200])
    e = serve(import_sklearn(sk))
    preds = e.predict("p", [list(r) for r in X[200:]])
    np.testing.assert_allclose([p.value for p in preds], sk.predict(X[200:]), atol=TOL, rtol=0)


@pytest.mark.parametrize("model", ["gbc", "gbc3", "rfc", "lr"])
def test_tabular_classifiers_match_sklearn(model: str, tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, cls = tabular
    target = cls if model != "gbc3" else np.digitize(y, np.quantile(y, [0.33, 0.66]))
    est = {"gbc": GradientBoostingClassifier(n_estimators=20, random_state=0),
           "gbc3": GradientBoostingClassifier(n_estimators=15, max_depth=2, random_state=0),
           "rfc": RandomForestClassifier(n_estimators=12, random_state=0), "lr": LogisticRegression(max_iter=1000)}[model]
    sk = Pipeline([("ct", _tab_ct()), ("m", est)]).fit(X[:200], target[:200])
    e = serve(import_sklearn(sk))
    _check_classifier(sk, e, X[200:])


def test_records_by_field_name_and_unknown_category(tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, _ = tabular
    sk = Pipeline([("ct", _tab_ct()), ("m", Ridge())]).fit(X, y)
    pipe = import_sklearn(sk)
    assert [f.kind for f in pipe.graph.inputs] == ["number"] * 4 + ["category"]
    e = serve(pipe)
    rec = {"x0": 0.5, "x1": 40.0, "x2": 1.1, "x3": 0.0, "x4": "purple"}  # unknown: ignored, as sklearn does
    row = np.array([[0.5, 40.0, 1.1, 0.0, "purple"]], dtype=object)
    assert e.predict("p", [rec])[0].value == pytest.approx(sk.predict(row)[0], abs=TOL)


def test_plain_numeric_pipeline(tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, _ = tabular
    num = X[:, :4].astype(float)
    sk = make_pipeline(StandardScaler(), LinearRegression()).fit(num, y)
    e = serve(import_sklearn(sk))
    np.testing.assert_allclose([p.value for p in e.predict("p", num.tolist())], sk.predict(num), atol=TOL)


def test_unsupported_estimator_is_named_under_strict(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = make_pipeline(CountVectorizer(), MultinomialNB()).fit(docs, y)
    with pytest.raises(UnsupportedEstimatorError, match="MultinomialNB"):
        import_sklearn(sk, strict=True)
    with pytest.raises(UnsupportedEstimatorError, match="custom tokenizer"):
        import_sklearn(make_pipeline(CountVectorizer(tokenizer=str.split), LogisticRegression()).fit(docs, y),
                       strict=True)
    assert issubclass(UnsupportedEstimatorError, InvalidArgumentError)


# -- scikit-learn's bundled data sets: every added estimator against its own predictions -----------
@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_iris(return_X_y=True)
    return X, y


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_breast_cancer(return_X_y=True)
    return X, y


@pytest.fixture(scope="module")
def diabetes() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_diabetes(return_X_y=True)
    return X, y


def _split(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    cut = int(len(X) * 0.7)
    return X[order[:cut]], y[order[:cut]], X[order[cut:]]


def _check_outputs(sk: Any, e: Engine, X: np.ndarray, tol: float = TOL) -> None:
    """Labels, predict_proba and decision_function (those the model has) equal scikit-learn's."""
    preds = e.predict("p", X.tolist())
    reg = e.get("p")
    assert [p.label for p in preds] == sk.predict(X).tolist()
    assert ("predict_proba" in reg.outputs) == hasattr(sk, "predict_proba")
    if hasattr(sk, "predict_proba"):
        np.testing.assert_allclose([p.scores for p in preds], sk.predict_proba(X), atol=tol, rtol=0)
    assert ("decision_function" in reg.outputs) == hasattr(sk, "decision_function")
    if hasattr(sk, "decision_function"):
        ref = np.asarray(sk.decision_function(X)).reshape(len(X), -1)
        ours = [p.decision if p.decision is not None else p.scores for p in preds]
        np.testing.assert_allclose(ours, ref, atol=tol, rtol=0)


TRANSFORMS = {
    "minmax": lambda: MinMaxScaler(), "minmax_clip": lambda: MinMaxScaler(feature_range=(-1, 2), clip=True),
    "maxabs": lambda: MaxAbsScaler(), "normalizer_l1": lambda: Normalizer(norm="l1"),
    "normalizer_l2": lambda: Normalizer(), "normalizer_max": lambda: Normalizer(norm="max"),
    "poly2": lambda: PolynomialFeatures(2), "poly_interact": lambda: PolynomialFeatures(3, interaction_only=True),
    "kbins_onehot": lambda: KBinsDiscretizer(n_bins=4, quantile_method="averaged_inverted_cdf"),
    "kbins_ordinal": lambda: KBinsDiscretizer(n_bins=5, encode="ordinal", strategy="uniform"),
    "kbins_dense": lambda: KBinsDiscretizer(n_bins=3, encode="onehot-dense", strategy="kmeans"),
    "pca": lambda: PCA(n_components=3), "pca_whiten": lambda: PCA(n_components=2, whiten=True),
    "tsvd": lambda: TruncatedSVD(n_components=3, random_state=0),
    "imputer_mean": lambda: SimpleImputer(), "imputer_median_indicator": lambda: SimpleImputer(strategy="median",
                                                                                            add_indicator=True),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_match_sklearn(name: str, iris: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = iris
    X = X.copy()
    if name.startswith("imputer"):
        X[::7, 1] = np.nan  # missing values in training and at prediction time
        X[3::11, 3] = np.nan
    Xtr, ytr, Xte = _split(X, y)
    sk = make_pipeline(TRANSFORMS[name](), LogisticRegression(max_iter=2000)).fit(Xtr, ytr)
    _check_outputs(sk, serve(import_sklearn(sk, strict=True)), Xte)


def test_imputer_drops_all_missing_columns(diabetes: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = diabetes
    X = X.copy()
    X[:, 2] = np.nan
    X[::5, 0] = np.nan
    Xtr, ytr, Xte = _split(X, y)
    sk = make_pipeline(SimpleImputer(strategy="most_frequent"), StandardScaler(), Ridge()).fit(Xtr, ytr)
    e = serve(import_sklearn(sk, strict=True))
    np.testing.assert_allclose([p.value for p in e.predict("p", Xte.tolist())], sk.predict(Xte), atol=TOL, rtol=0)


CLASSIFIERS = {
    "tree": lambda: DecisionTreeClassifier(max_depth=6, random_state=0),
    "extra_tree": lambda: ExtraTreeClassifier(random_state=0),
    "extra_trees": lambda: ExtraTreesClassifier(n_estimators=20, random_state=0),
    "hgb": lambda: HistGradientBoostingClassifier(max_iter=30, random_state=0),
    "mlp": lambda: MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=800, random_state=0),
    "mlp_tanh": lambda: MLPClassifier(hidden_layer_sizes=(10,), activation="tanh", max_iter=800, random_state=0),
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize("data", ["iris", "cancer"])
def test_classifiers_match_sklearn(name: str, data: str, request: pytest.FixtureRequest) -> None:
    X, y = request.getfixturevalue(data)
    Xtr, ytr, Xte = _split(X, y)
    sk = make_pipeline(StandardScaler(), CLASSIFIERS[name]()).fit(Xtr, ytr)
    _check_outputs(sk, serve(import_sklearn(sk, strict=True)), Xte)


REGRESSORS = {
    "tree": lambda: DecisionTreeRegressor(max_depth=5, random_state=0),
    "extra_trees": lambda: ExtraTreesRegressor(n_estimators=15, max_depth=6, random_state=0),
    "hgb": lambda: HistGradientBoostingRegressor(max_iter=40, random_state=0),
    "mlp": lambda: MLPRegressor(hidden_layer_sizes=(20,), max_iter=600, random_state=0),
}


@pytest.mark.parametrize("name", sorted(REGRESSORS))
def test_regressors_match_sklearn(name: str, diabetes: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = diabetes
    Xtr, ytr, Xte = _split(X, y)
    sk = make_pipeline(StandardScaler(), REGRESSORS[name]()).fit(Xtr, ytr)
    e = serve(import_sklearn(sk, strict=True))
    assert e.get("p").outputs == []
    np.testing.assert_allclose([p.value for p in e.predict("p", Xte.tolist())], sk.predict(Xte), atol=TOL, rtol=0)


def test_trees_follow_missing_values(cancer: tuple[np.ndarray, np.ndarray]) -> None:
    """Trees fitted with NaN send missing values where scikit-learn does (HistGradientBoosting, DecisionTree)."""
    X, y = cancer
    X = X.copy()
    X[::3, 0] = np.nan
    X[1::4, 7] = np.nan
    Xtr, ytr, Xte = _split(X, y)
    for est in (HistGradientBoostingClassifier(max_iter=20, random_state=0), DecisionTreeClassifier(random_state=0)):
        sk = est.fit(Xtr, ytr)
        _check_outputs(sk, serve(import_sklearn(sk, strict=True)), Xte)


def test_sparse_text_into_truncated_svd_and_normalizer(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = make_pipeline(TfidfVectorizer(), TruncatedSVD(n_components=8, random_state=0), Normalizer(),
                       LogisticRegression(max_iter=1000)).fit(docs[:300], y[:300])
    _check_classifier(sk, serve(import_sklearn(sk, strict=True)), docs[300:])
    sk = make_pipeline(TfidfVectorizer(), MaxAbsScaler(), Normalizer(norm="max"), LinearSVC()).fit(docs[:300], y[:300])
    _check_classifier(sk, serve(import_sklearn(sk, strict=True)), docs[300:])


def test_decision_function_of_linear_and_boosting(cancer: tuple[np.ndarray, np.ndarray],
                                                  iris: tuple[np.ndarray, np.ndarray]) -> None:
    for X, y in (cancer, iris):
        Xtr, ytr, Xte = _split(X, y)
        for est in (LogisticRegression(max_iter=3000), GradientBoostingClassifier(n_estimators=10, random_state=0)):
            sk = make_pipeline(StandardScaler(), est).fit(Xtr, ytr)
            _check_outputs(sk, serve(import_sklearn(sk, strict=True)), Xte)


def test_lightgbm_models_match(cancer: tuple[np.ndarray, np.ndarray], iris: tuple[np.ndarray, np.ndarray],
                               diabetes: tuple[np.ndarray, np.ndarray]) -> None:
    lightgbm = pytest.importorskip("lightgbm", reason="lightgbm is not installed")
    for X, y in (cancer, iris):
        X = X.copy()
        X[::9, 2] = np.nan
        Xtr, ytr, Xte = _split(X, y)
        sk = lightgbm.LGBMClassifier(n_estimators=25, num_leaves=7, n_jobs=1, verbose=-1).fit(Xtr, ytr)
        _check_outputs(sk, serve(import_sklearn(sk, strict=True)), Xte)
    X, y = diabetes
    Xtr, ytr, Xte = _split(X, y)
    sk = lightgbm.LGBMRegressor(n_estimators=30, n_jobs=1, verbose=-1).fit(Xtr, ytr)
    e = serve(import_sklearn(sk, strict=True))
    np.testing.assert_allclose([p.value for p in e.predict("p", Xte.tolist())], sk.predict(Xte), atol=TOL, rtol=0)


def test_xgboost_models_match(cancer: tuple[np.ndarray, np.ndarray], iris: tuple[np.ndarray, np.ndarray],
                              diabetes: tuple[np.ndarray, np.ndarray]) -> None:
    xgboost = pytest.importorskip("xgboost", reason="xgboost is not installed")
    for X, y in (cancer, iris):
        X = X.copy()
        X[::9, 2] = np.nan
        Xtr, ytr, Xte = _split(X, y)
        sk = xgboost.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1).fit(Xtr, ytr)
        _check_outputs(sk, serve(import_sklearn(sk, strict=True)), Xte, tol=1e-5)  # XGBoost sums in float32
    X, y = diabetes
    Xtr, ytr, Xte = _split(X, y)
    sk = xgboost.XGBRegressor(n_estimators=30, max_depth=4, n_jobs=1).fit(Xtr, ytr)
    e = serve(import_sklearn(sk, strict=True))
    np.testing.assert_allclose([p.value for p in e.predict("p", Xte.tolist())], sk.predict(Xte), rtol=1e-5)
