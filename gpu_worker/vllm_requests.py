"""One vLLM request in and out: chat -> prompt token ids -> vLLM's inputs; RequestOutput -> EngineChunk.

Pure helpers with no state: the engine renders the prompt, builds vLLM's SamplingParams and
TokensPrompt from the resolved `VllmApi`, and maps every streamed RequestOutput back.  They read
vLLM's objects with `getattr` defaults, so the unit tests drive them with fakes of the same shape
and tests/integration/test_vllm_contract.py checks them against the real classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gpu_worker.engine import ChatMessage, EngineChunk, EngineError
from gpu_worker.vllm_api import VllmApi


def make_sampling_params(api: VllmApi, max_tokens: int, seed: int) -> Any:
    # DELTA: each RequestOutput carries only the new text/tokens, which is exactly an EngineChunk;
    # when the consumer lags, vLLM merges pending deltas (RequestOutput.add), so a chunk may hold
    # several tokens.
    return api.SamplingParams(max_tokens=max_tokens, output_kind=api.RequestOutputKind.DELTA, seed=seed)


def make_tokens_prompt(api: VllmApi, prompt_token_ids: list[int]) -> Any:
    # Token ids, not text: we render the chat ourselves so that the assistant prefix can be
    # appended after the generation prompt and so prompt_tokens is known before submission.
    return api.TokensPrompt(prompt_token_ids=prompt_token_ids)


def map_request_output(out: Any, prompt_len: int) -> EngineChunk:
    """One DELTA-mode `vllm.outputs.RequestOutput` -> one EngineChunk.

    prompt_tokens is ours (the ids we submitted), so it is right on every chunk; vLLM's
    num_cached_tokens is None until the prefill has been scheduled.
    """
    outputs = getattr(out, "outputs", None) or []
    completion = outputs[0] if outputs else None
    text = str(getattr(completion, "text", "") or "") if completion is not None else ""
    token_ids = getattr(completion, "token_ids", None) if completion is not None else None
    finished = bool(getattr(out, "finished", False))
    reason = getattr(completion, "finish_reason", None) if completion is not None else None
    return EngineChunk(
        text=text,
        num_tokens=len(token_ids) if token_ids is not None else 0,
        prompt_tokens=prompt_len,
        cached_tokens=int(getattr(out, "num_cached_tokens", None) or 0),
        finished=finished,
        # vLLM's strings: "stop", "length", "abort", "error" (v1/engine/__init__.py).
        finish_reason=str(reason) if finished and reason is not None else "",
    )


def normalize_token_ids(rendered: Any) -> list[int]:
    """`apply_chat_template(..., tokenize=True)` output -> list[int].

    transformers < 5 returns list[int]; transformers 5 returns a BatchEncoding (a Mapping with
    "input_ids") by default; some tokenizers return a batch of one.
    """
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    if hasattr(rendered, "tolist"):
        rendered = rendered.tolist()
    ids = list(rendered)
    if ids and isinstance(ids[0], list | tuple):
        if len(ids) != 1:
            raise EngineError(f"chat template rendered a batch of {len(ids)} prompts, expected 1")
        ids = list(ids[0])
    return [int(t) for t in ids]


def render_prompt_ids(tokenizer: Any, messages: Sequence[ChatMessage], assistant_prefix: str) -> list[int]:
    """Chat -> prompt token ids: the model's chat template plus the assistant's partial answer.

    The prefix is tokenized on its own and appended after the generation prompt, so the model
    continues the answer rather than starting a new turn.  Its tokenization can differ from what
    the model would have produced at the seam (a merge across the boundary); that costs at most
    a slightly different continuation, never a wrong prompt.
    """
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    ids = normalize_token_ids(
        tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    )
    if assistant_prefix:
        # No special tokens: the template already emitted BOS and the assistant header.
        ids.extend(int(t) for t in tokenizer.encode(assistant_prefix, add_special_tokens=False))
    return ids
