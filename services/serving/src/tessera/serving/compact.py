"""Model heads stored compactly: linear weights as float32.

A pipeline's own parameters are mostly its head's weights (its featurizer is shared).
:func:`with_head_dtype` converts the weights of every linear head (``coef`` or
``coef_value``) to float32 before they are uploaded, halving what each head adds to
the object store. The product is still accumulated in float64 (float32 weights times
float64 features), so predictions stay equal to the float64 pipeline's within
:data:`FLOAT32_RTOL` / :data:`FLOAT32_ATOL` (scores: probabilities or decision values;
labels too, except where two classes' scores tie within that tolerance). Intercepts,
vocabularies, idf weights, scalers and tree ensembles are left as they are (a tree's
thresholds decide branches, where rounding is not a small error).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tessera.serving.ir import Graph, Pipeline, tensor_hash

HEAD_DTYPES = ("float64", "float32")
#: Relative tolerance of a float32-head pipeline's scores against the float64 one.
FLOAT32_RTOL = 1e-5
#: Absolute tolerance of a float32-head pipeline's scores against the float64 one.
FLOAT32_ATOL = 1e-6
#: Parameter roles of the linear operator that hold its weights.
WEIGHT_ROLES = ("coef", "coef_value")


def with_head_dtype(p: Pipeline, dtype: str) -> Pipeline:
    """``p`` with its linear heads' weights stored as ``dtype`` ("float64": unchanged, "float32")."""
    if dtype not in HEAD_DTYPES:
        raise ValueError(f"head_dtype must be one of {HEAD_DTYPES}, got {dtype!r}")
    if dtype == "float64":
        return p
    params = dict(p.params)
    nodes = []
    for n in p.graph.nodes:
        if n.op == "linear":
            roles = dict(n.params)
            for role in WEIGHT_ROLES:
                h = roles.get(role)
                if h is not None and params[h].dtype == np.float64:
                    a = np.ascontiguousarray(params[h], dtype="<f4")
                    roles[role] = tensor_hash(a)
                    params[roles[role]] = a
            n = replace(n, params=roles)
        nodes.append(n)
    graph = Graph(p.graph.inputs, nodes, p.graph.output, p.graph.source)
    used = set(graph.param_hashes())
    return Pipeline(graph, {h: a for h, a in params.items() if h in used})
