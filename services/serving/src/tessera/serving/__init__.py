"""Tessera serving: white-box pipelines with shared parameters and one stage scheduler.

The replica starts, connects NATS, registers in the control store and serves
gRPC health and reflection; its API (pipeline serving) is not served yet.
"""
