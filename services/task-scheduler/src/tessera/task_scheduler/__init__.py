"""Tessera task scheduler: Ray's bottom-up scheduler (node agents and a global scheduler).

The replica starts, connects NATS, registers in the control store and serves
gRPC health and reflection; its API (tasks, actors and their scheduling) is not served yet.
"""
