"""Tessera compiler: PyTorch models to fused, generated C kernels.

The replica starts, connects NATS, registers in the control store and serves
gRPC health and reflection; its API (compilation) is not served yet.
"""
