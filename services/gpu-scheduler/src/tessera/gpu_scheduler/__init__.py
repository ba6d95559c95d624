"""Tessera GPU scheduler: time-slicing, packing and migration of training jobs.

The replica starts, connects NATS, registers in the control store and serves
gRPC health and reflection; its API (job scheduling) is not served yet.
"""
