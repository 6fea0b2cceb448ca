"""What the router guesses about a request before forwarding it: prompt tokens and TPOT SLO.

The router has no tokenizer (instances may serve different models), and routing only needs the
order of magnitude of a prompt (docs/router.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

CHARS_PER_TOKEN = 4  # the prompt-token estimate (docs/router.md)


def _text_chars(content: Any) -> int:
    """Characters of a message's content: a string, or text parts of a parts array."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(p["text"])
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return 0


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Prompt tokens without a tokenizer: token-id prompts count exactly, text counts one token
    per ``CHARS_PER_TOKEN`` characters (English BPE averages about four). Routing only needs
    the order of magnitude; a body the instance will refuse counts as 0."""
    prompt = body.get("prompt")
    if prompt is not None:
        items = prompt if isinstance(prompt, list) and not _is_ids(prompt) else [prompt]
        total = 0
        for p in items:
            if isinstance(p, str):
                total += len(p) // CHARS_PER_TOKEN
            elif isinstance(p, list) and _is_ids(p):
                total += len(p)
        return total
    messages = body.get("messages")
    if isinstance(messages, list):
        chars = sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict))
        return chars // CHARS_PER_TOKEN
    return 0


def _is_ids(xs: list) -> bool:
    return bool(xs) and all(isinstance(t, int) and not isinstance(t, bool) for t in xs)


def request_slo(body: Mapping[str, Any]) -> float | None:
    """The body's ``tpot_slo`` (seconds), if it is a valid one; the instance validates it."""
    v = body.get("tpot_slo")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
        return float(v)
    return None


def lora_names(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The adapter names of a request's ``lora`` mixture (routing only: the instance that
    serves it validates the list and answers 400 for a malformed one)."""
    entries = body.get("lora")
    if not isinstance(entries, list):
        return ()
    names = [e.get("name") for e in entries if isinstance(e, Mapping)]
    return tuple(n for n in names if isinstance(n, str))
