"""The global placement service: policy (pure), Redis commit, telemetry ingest."""
