"""Generated gRPC/protobuf stubs: run scripts/gen_protos.py."""
