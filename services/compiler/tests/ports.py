"""In-memory artifact metadata for tests of the compile jobs (the domain's MetadataStore port)."""

from __future__ import annotations


class Meta:
    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}

    async def get(self, artifact_id: str) -> bytes | None:
        return self.records.get(artifact_id)

    async def put(self, artifact_id: str, value: bytes) -> None:
        self.records[artifact_id] = value
