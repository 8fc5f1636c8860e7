"""The vLLM boundary: vLLM's names resolved by one lazy import, and its errors cut to one line.

vLLM is imported here, on demand, and nowhere at module level, so that the worker, its tests and
`--engine sim` run on machines without vLLM or a GPU.  Everything vLLM-shaped crosses the boundary
as `Any` (kvgate has no stubs for it); `load_vllm_api` turns each way the import can fail into one
`EngineError` line that says what is missing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from gpu_worker.engine import EngineError

VLLM_MISSING = "vLLM is not installed: pip install 'kvgate[vllm]'"
NO_GPU = "no CUDA GPU visible: --engine vllm needs one; use --engine sim"


@dataclass(frozen=True)
class VllmApi:
    """The few vLLM names the adapter uses, resolved once by `load_vllm_api`."""

    AsyncLLM: Any
    AsyncEngineArgs: Any
    SamplingParams: Any
    RequestOutputKind: Any
    TokensPrompt: Any
    StatLoggerBase: Any
    KVEventsConfig: Any
    KVEventBatch: Any
    version: str


def load_vllm_api(require_gpu: bool = True) -> VllmApi:
    """Import vLLM, or raise EngineError with one line saying what is missing."""
    try:
        import vllm
    except ModuleNotFoundError as e:
        # Only a missing `vllm` itself means "not installed"; a missing dependency of it is a
        # broken install and its name is the useful part of the message.
        if e.name is None or e.name == "vllm":
            raise EngineError(VLLM_MISSING) from None
        raise EngineError(f"vLLM failed to import (missing module {e.name!r}); reinstall kvgate[vllm]") from e
    except Exception as e:
        raise EngineError(f"vLLM failed to import: {type(e).__name__}: {one_line(e)}") from e

    if require_gpu:
        # Checked before touching vLLM's engine modules: without a GPU vLLM fails much later
        # and with a multi-page platform-detection traceback.
        try:
            # import_module keeps torch (untyped here, typed where installed) an Any for mypy.
            torch: Any = importlib.import_module("torch")
            has_gpu = bool(torch.cuda.is_available())
        except Exception:
            has_gpu = False
        if not has_gpu:
            raise EngineError(NO_GPU)

    try:
        from vllm.config import KVEventsConfig
        from vllm.distributed.kv_events import KVEventBatch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase
    except Exception as e:
        version = getattr(vllm, "__version__", "?")
        raise EngineError(
            f"vLLM {version} lacks an API kvgate uses ({type(e).__name__}: {one_line(e)}); "
            "kvgate targets vLLM 0.33"
        ) from e
    return VllmApi(
        AsyncLLM=AsyncLLM,
        AsyncEngineArgs=AsyncEngineArgs,
        SamplingParams=SamplingParams,
        RequestOutputKind=RequestOutputKind,
        TokensPrompt=TokensPrompt,
        StatLoggerBase=StatLoggerBase,
        KVEventsConfig=KVEventsConfig,
        KVEventBatch=KVEventBatch,
        version=str(getattr(vllm, "__version__", "?")),
    )


def one_line(e: BaseException) -> str:
    """The first line of an error: vLLM's can be multi-page tracebacks, ours are one line."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
