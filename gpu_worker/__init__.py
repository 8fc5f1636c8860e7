"""One GPU worker: engine protocol, simulated and vLLM engines, gRPC server, telemetry."""
