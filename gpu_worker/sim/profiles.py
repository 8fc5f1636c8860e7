"""Hardware and model profiles the roofline step-time model is computed from.

Numbers are public spec-sheet values; the efficiency factors and overheads are
calibration estimates (documented next to each default) rather than measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

_GIB = 1024**3
_MIB = 1024**2


@dataclass(frozen=True)
class GpuProfile:
    name: str
    description: str
    # Usable device memory as the driver reports it (nvidia-smi "Total", MiB-exact).
    memory_bytes: int
    # HBM bandwidth, bytes/s.
    hbm_bandwidth: float
    # Dense (no 2:4 sparsity) bf16 tensor-core peak, FLOP/s.
    peak_flops: float
    # NVLink bandwidth per GPU per direction, bytes/s (used for TP all-reduce).
    interconnect_bandwidth: float
    # Fraction of peak HBM bandwidth a decode step achieves: memory-bound GEMV/paged
    # attention kernels typically sustain 75-85% of spec bandwidth (e.g. vLLM/TGI
    # batch-1 decode on H100 lands near 6.5-7.5 ms for 16 GB of Llama-3-8B weights).
    eta_bw: float = 0.8
    # Fraction of peak FLOP/s large prefill GEMMs reach end to end; 55-65% MFU is the
    # usual range reported for bf16 inference prefill (FlashAttention-2/3 papers, MLPerf).
    eta_compute: float = 0.6
    # Per-step host cost not hidden behind the GPU: scheduling, input prep, sampling,
    # detokenisation. vLLM V1 overlaps most of it (V1 alpha blog, Jan 2025), about 1 ms
    # remains visible at small batch.
    step_overhead_s: float = 1.0e-3
    # Latency of one small all-reduce with vLLM's custom NVLink all-reduce kernel.
    allreduce_latency_s: float = 8.0e-6

    @property
    def ridge_flop_per_byte(self) -> float:
        """Hardware ridge point: arithmetic intensity above which a kernel is compute-bound."""
        return self.peak_flops / self.hbm_bandwidth


@dataclass(frozen=True)
class ModelProfile:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # Query width (num_attention_heads * head_dim): sizes attention FLOPs and TP all-reduces.
    hidden_size: int
    total_params: float
    # Parameters one token is multiplied with (== total for dense models).
    active_params: float
    max_model_len: int
    dtype_bytes: int = 2
    num_experts: int = 1
    experts_per_token: int = 1
    # Per-GPU memory vLLM keeps out of the KV cache: peak activations of a profile run at
    # max_num_batched_tokens, CUDA graphs and non-torch allocations (typ. 1.5-4 GiB).
    activation_reserve_bytes: int = 2 * _GIB

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def expert_params(self) -> float:
        """Parameters of one expert summed over all layers (0 for dense models).

        Derived from total/active counts: total = shared + E*e, active = shared + k*e.
        """
        if not self.is_moe:
            return 0.0
        return (self.total_params - self.active_params) / (self.num_experts - self.experts_per_token)

    @property
    def shared_params(self) -> float:
        """Parameters every token reads: attention, embeddings, norms, router."""
        return self.total_params - self.num_experts * self.expert_params


GPUS: dict[str, GpuProfile] = {
    "h100": GpuProfile(
        name="h100",
        description="NVIDIA H100 SXM 80 GB",
        memory_bytes=81559 * _MIB,
        hbm_bandwidth=3.35e12,
        peak_flops=989e12,
        interconnect_bandwidth=450e9,
    ),
    "h200": GpuProfile(
        name="h200",
        description="NVIDIA H200 SXM 141 GB",
        memory_bytes=143771 * _MIB,
        hbm_bandwidth=4.8e12,
        peak_flops=989e12,
        interconnect_bandwidth=450e9,
    ),
    "a100": GpuProfile(
        name="a100",
        description="NVIDIA A100 SXM 80 GB",
        memory_bytes=81920 * _MIB,
        hbm_bandwidth=2.039e12,
        peak_flops=312e12,
        interconnect_bandwidth=300e9,
        # Ampere lacks the H100's async TMA copies; attention kernels sit slightly lower.
        eta_bw=0.78,
        allreduce_latency_s=10.0e-6,
    ),
}

MODELS: dict[str, ModelProfile] = {
    "llama-3-8b": ModelProfile(
        name="llama-3-8b",
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        hidden_size=4096,
        total_params=8.03e9,
        active_params=8.03e9,
        max_model_len=8192,
    ),
    "llama-3-70b": ModelProfile(
        name="llama-3-70b",
        num_layers=80,
        num_kv_heads=8,
        head_dim=128,
        hidden_size=8192,
        total_params=70.6e9,
        active_params=70.6e9,
        max_model_len=8192,
        activation_reserve_bytes=4 * _GIB,
    ),
    "mixtral-8x7b": ModelProfile(
        name="mixtral-8x7b",
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        hidden_size=4096,
        total_params=46.7e9,
        active_params=12.9e9,
        max_model_len=32768,
        num_experts=8,
        experts_per_token=2,
        activation_reserve_bytes=3 * _GIB,
    ),
}


def get_gpu(name: str) -> GpuProfile:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU profile {name!r}; known: {', '.join(sorted(GPUS))}") from None


def get_model(name: str) -> ModelProfile:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model profile {name!r}; known: {', '.join(sorted(MODELS))}") from None
