"""Generated protobuf and gRPC code for the kvgate.v1 API (see protos/generate.py)."""
