"""kvgate: KV-cache-aware global scheduling for LLM chat on GPU fleets."""

__version__ = "0.1.0"
