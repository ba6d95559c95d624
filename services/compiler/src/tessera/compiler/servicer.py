"""gRPC <-> domain: CompilerService over :class:`~tessera.compiler.jobs.Compiler`."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc.aio

from tessera.api.compiler.v1 import compiler_pb2 as pb
from tessera.api.compiler.v1 import compiler_pb2_grpc as pb_grpc
from tessera.common.errors import InvalidArgumentError
from tessera.compiler.jobs import Compiler

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _aid(aid: str) -> str:
    if len(aid) != 32 or any(c not in "0123456789abcdef" for c in aid):
        raise InvalidArgumentError(f"artifact_id must be 32 lowercase hex digits, got {aid!r}")
    return aid


class CompilerServicer(pb_grpc.CompilerServiceServicer):
    def __init__(self, compiler: Compiler, *, max_wait_s: float) -> None:
        self.compiler = compiler
        self.max_wait_s = max_wait_s

    async def Compile(self, request: pb.CompileRequest, context: Ctx) -> pb.CompileResponse:
        info, cached = await self.compiler.submit(request)
        if request.wait and info.state != pb.ARTIFACT_STATE_READY:
            left = context.time_remaining()
            budget = self.max_wait_s if left is None else min(self.max_wait_s, max(0.0, left - 0.2))
            info = await self.compiler.wait(info.artifact_id, budget)
        return pb.CompileResponse(artifact=info, cached=cached)

    async def Run(self, request: pb.RunRequest, context: Ctx) -> pb.RunResponse:
        outs, seconds = await self.compiler.run(_aid(request.artifact_id), list(request.inputs))
        return pb.RunResponse(outputs=[pb.Tensor(shape=list(o.shape), dtype="float32", data=o.tobytes()) for o in outs],
                              run_seconds=seconds)

    async def GetArtifact(self, request: pb.GetArtifactRequest, context: Ctx) -> pb.GetArtifactResponse:
        info, bundle = await self.compiler.get(_aid(request.artifact_id), request.include_bundle)
        return pb.GetArtifactResponse(artifact=info, bundle=bundle)
