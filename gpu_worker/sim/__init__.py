"""Simulated vLLM V1 engine: a pure state machine priced by a roofline model."""

from gpu_worker.sim.block_pool import BlockPool, BlockPoolError, block_hashes, hash_block_tokens
from gpu_worker.sim.engine import EngineConfig, JumpOutput, RequestOutput, SimEngine, StepOutput
from gpu_worker.sim.profile_report import profile_report
from gpu_worker.sim.profiles import GPUS, MODELS, GpuProfile, ModelProfile, get_gpu, get_model
from gpu_worker.sim.roofline import (
    StepCost,
    decode_run_cost,
    decode_steps_within,
    expected_experts_touched,
    kv_bytes_per_token,
    kv_capacity_blocks,
    kv_capacity_tokens,
    step_cost,
    step_time,
    weight_bytes,
    weight_bytes_read,
)
from gpu_worker.sim.tokenizer import SimTokenizer, render_chat

__all__ = [
    "GPUS",
    "MODELS",
    "BlockPool",
    "BlockPoolError",
    "EngineConfig",
    "GpuProfile",
    "JumpOutput",
    "ModelProfile",
    "RequestOutput",
    "SimEngine",
    "SimTokenizer",
    "StepCost",
    "StepOutput",
    "block_hashes",
    "decode_run_cost",
    "decode_steps_within",
    "expected_experts_touched",
    "get_gpu",
    "get_model",
    "hash_block_tokens",
    "kv_bytes_per_token",
    "kv_capacity_blocks",
    "kv_capacity_tokens",
    "profile_report",
    "render_chat",
    "step_cost",
    "step_time",
    "weight_bytes",
    "weight_bytes_read",
]
