"""What a serving replica decodes from the wire, fuzzed: pipeline graphs (Register, and the registry's
records announced on NATS) and parameter arrays (UploadParameters).

Whatever the bytes, decoding either gives a checked graph or array or raises InvalidArgumentError
saying what is wrong; nothing else escapes (anything else is INTERNAL to a client).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tessera.common.errors import InvalidArgumentError
from tessera.serving.ir import ALLOWED_DTYPES, OPS, Graph, check_tensor

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None)

leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=6),
                 st.sampled_from(["text", "number", "category", "x", "n1", *OPS]))
anything = st.recursive(leaf, lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=6), x, max_size=3),
                        max_leaves=10)
node = st.fixed_dictionaries({"id": st.sampled_from(["n1", "n2", "x"]), "op": st.sampled_from([*OPS, "nope"])},
                             optional={"inputs": st.one_of(st.lists(st.sampled_from(["n1", "x", "text"]), max_size=2), anything),
                                       "attrs": st.one_of(st.dictionaries(st.sampled_from(["field", "fields", "classes"]),
                                                                          anything, max_size=2), anything),
                                       "params": st.one_of(st.dictionaries(st.text(max_size=4), anything, max_size=2),
                                                           anything)})
graph = st.fixed_dictionaries({"inputs": st.one_of(st.just([["text", "text"]]), anything),
                               "nodes": st.one_of(st.lists(st.one_of(node, anything), max_size=3), anything),
                               "output": st.one_of(st.sampled_from(["n1", "n2"]), anything)},
                              optional={"source": anything})
texts = st.one_of(st.text(max_size=50), graph.map(json.dumps), anything.map(json.dumps))


@SETTINGS
@given(text=texts)
@example(text='{"inputs": [], "nodes": [[1]], "output": "x"}')  # a node that is not an object: AttributeError
@example(text='{"inputs": [["t", "text"]], "nodes": [{"id": "n1", "op": "text_ngrams", "inputs": ["t"], '
              '"attrs": {"field": ["t"]}, "params": {}}], "output": "n1"}')  # an unhashable field name: TypeError
@example(text="[" * 100_000)  # nested past the recursion limit: RecursionError
def test_graph_json_decodes_or_says_why(text: str) -> None:
    try:
        g = Graph.from_json(text)
    except InvalidArgumentError:
        return
    assert g.inputs and g.output in {n.id for n in g.nodes}


@SETTINGS
@given(h=st.text(max_size=8), dtype=st.one_of(st.sampled_from(ALLOWED_DTYPES), st.text(max_size=4)),
       shape=st.lists(st.one_of(st.integers(-3, 8), st.integers(-(2**63), 2**63 - 1)), max_size=3),
       data=st.binary(max_size=64))
@example(h="h", dtype="<f8", shape=[2**62, 4], data=b"")  # numpy's product wrapped around to 0: ValueError
def test_parameter_arrays_decode_or_say_why(h: str, dtype: str, shape: list[int], data: Any) -> None:
    try:
        check_tensor(h, dtype, shape, data)
    except InvalidArgumentError:
        return
