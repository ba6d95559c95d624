"""A READY artifact whose compiled bundle its object store lost (a node gone for good) turns FAILED
when a Run or GetArtifact cannot fetch it, so compiling the model again builds it anew."""

from __future__ import annotations

import asyncio

import pytest
from ports import Meta

from tessera.api.compiler.v1 import compiler_pb2 as pb
from tessera.common.errors import FailedPreconditionError
from tessera.compiler.jobs import Compiler

LOST = b"l" * 20


class LostBlobs:
    """The object store's answer for an object no live node holds: nothing comes, the get times out."""

    async def put(self, data: bytes) -> bytes:
        raise AssertionError("nothing is stored")

    async def get(self, object_id: bytes, timeout: float = 30.0) -> bytes:
        raise TimeoutError(f"object {object_id.hex()} not available within 30s")


async def _enqueue(job: bytes, dedupe: str) -> None:
    raise AssertionError("nothing is queued")


@pytest.mark.parametrize("call", ["run", "get"])
def test_a_lost_bundle_fails_the_artifact(call: str) -> None:
    meta = Meta()
    ready = pb.ArtifactInfo(artifact_id="a1", state=pb.ARTIFACT_STATE_READY, target="c", object_id=LOST,
                            inputs=[pb.TensorSpec(shape=[1], dtype="float32")])
    meta.records["a1"] = ready.SerializeToString()
    compiler = Compiler(meta, LostBlobs(), _enqueue, instance="t")

    async def go() -> None:
        if call == "run":
            await compiler.run("a1", [])
        else:
            await compiler.get("a1", include_bundle=True)

    with pytest.raises(FailedPreconditionError, match="compiled bundle is lost"):
        asyncio.run(go())
    after = pb.ArtifactInfo.FromString(meta.records["a1"])
    assert after.state == pb.ARTIFACT_STATE_FAILED and "compile it again" in after.error
    assert after.object_id == LOST and list(after.inputs) == list(ready.inputs)
