"""Which request fields this server serves, refuses, or ignores: never a 200 for a request
whose meaning it dropped.

- A field the parser serves is read where the request is parsed (request_parsing.py).
- A field known from OpenAI or vLLM that changes the answer and is not served answers 400
  ``unsupported`` naming it, unless its value asks for nothing (its default).
- A field that changes nothing here (OpenAI's ``store``, ``metadata``, ...) is accepted.
- A field nobody knows is logged once per name as ignored (clients send their own extras).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from server.protocol import bad

log = logging.getLogger("cara_serve")

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos",
    "n", "best_of", "stream", "stream_options", "user", "logprobs", "tpot_slo", "logit_bias",
    "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "skip_special_tokens", "include_stop_str_in_output", "min_tokens",
    "prompt_logprobs", "lora",
}  # fmt: skip
SERVED = {
    "completion": _COMMON | {"prompt", "suffix", "echo"},
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs",
                       "add_generation_prompt", "tools", "tool_choice", "parallel_tool_calls",
                       "chat_template_kwargs"},
}  # fmt: skip

# fields that change nothing in this server's answer
HARMLESS = {
    "store", "metadata", "service_tier", "request_id", "priority", "spaces_between_special_tokens",
    "guided_decoding_backend", "guided_whitespace_pattern", "disable_fallback",
}  # fmt: skip


def _off(default: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v == default


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


# known, not served: the value that asks for nothing passes
NOT_SERVED: dict[str, Callable[[Any], bool]] = {
    "functions": _empty,
    "function_call": _off("none"),
    "use_beam_search": _off(False),
    "length_penalty": _off(1.0),
    "bad_words": _empty,
    "allowed_token_ids": _empty,
    "truncate_prompt_tokens": _off(None),
    "return_tokens_as_token_ids": _off(False),
    "documents": _empty,
    "mm_processor_kwargs": _empty,
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _off(None),
    "prediction": _off(None),
    "reasoning_effort": _off(None),
    "web_search_options": _off(None),
    "logits_processors": _empty,
    "vllm_xargs": _empty,
    "kv_transfer_params": _empty,
    "cache_salt": _off(None),
    "echo": _off(False),  # chat only (completions serves it)
}

_logged: set[str] = set()


def check_fields(body: dict, kind: str) -> None:
    """400 for a known field this server would otherwise answer wrongly; log unknown ones."""
    served = SERVED[kind]
    for key, value in body.items():
        if key in served or key in HARMLESS:
            continue
        if key == "add_special_tokens":  # vLLM's defaults are what this server does
            if value not in (None, kind == "completion"):
                raise bad(f"`{key}` is not supported", key, code="unsupported")
            continue
        ok = NOT_SERVED.get(key)
        if ok is not None:
            if not ok(value):
                raise bad(f"`{key}` is not supported", key, code="unsupported")
            continue
        if key not in _logged and len(_logged) < 1000:
            _logged.add(key)
            log.info("ignoring the request field %r (not an OpenAI or vLLM field this "
                     "server knows)", key)  # fmt: skip
