"""Tessera object store: immutable objects in shared memory, moved between nodes over gRPC.

The replica starts, connects NATS, registers in the control store and serves
gRPC health and reflection; its API (the object API) is not served yet.
"""
