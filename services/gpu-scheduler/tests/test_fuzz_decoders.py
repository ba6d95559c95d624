"""What the GPU scheduler and its node agents decode from NATS, fuzzed: commands and their replies.

Anyone connected to NATS can publish on ``tessera.gpu.agent.<node>.cmd``. A command is a JSON
object; anything else is refused with InvalidArgumentError (a list, a number or bytes that are
not UTF-8 once failed inside the agent and came back as INTERNAL).
"""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tessera.common.errors import InvalidArgumentError
from tessera.gpu_scheduler.server import decode_message

leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
documents = st.recursive(leaf, lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=6), x, max_size=3),
                         max_leaves=10)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(data=st.one_of(st.binary(max_size=100), documents.map(lambda d: json.dumps(d).encode())))
@example(data=b"[1, 2]")  # a list: AttributeError in the agent (INTERNAL)
@example(data=b"\xff\xfe")  # not UTF-8
@example(data=b"[" * 100_000)  # nested past the recursion limit
def test_commands_decode_to_an_object_or_say_why(data: bytes) -> None:
    try:
        doc = decode_message(data, "a command")
    except InvalidArgumentError as e:
        assert "a command" in str(e)
        return
    assert isinstance(doc, dict) and doc == json.loads(data)
