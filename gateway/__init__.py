"""The public edge: Chat servicer, sessions, relay to workers, client CLI."""
