"""OpenAI response pieces: log-prob entries (completions and chat shapes), usage, finish reason."""

from __future__ import annotations

import functools

from tokenizers import decoders

from cara_jax.tokenizer import Tokenizer, _bytes_to_unicode


class TokenText:
    """Token strings and bytes for log-prob entries (byte-level BPE pieces decoded exactly)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        byte_level = isinstance(getattr(tok.backend, "decoder", None), decoders.ByteLevel)
        self._inv = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else {}
        self.piece = functools.lru_cache(maxsize=65536)(self._piece)

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tok.backend.id_to_token(int(token_id))
        if self._inv and raw and all(c in self._inv for c in raw):
            b = bytes(self._inv[c] for c in raw)
            return b.decode("utf-8", errors="replace"), list(b)
        text = self.tok.decode([int(token_id)], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))


def completion_logprobs(entries: list[dict], tt: TokenText, offset: int) -> dict:
    """Legacy completions shape: parallel arrays plus ``top_logprobs`` as {token: logprob}."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        s = tt.piece(e["token_id"])[0]
        tokens.append(s)
        lps.append(e["logprob"])
        if e["top"] is None:  # an echoed prompt's first token: nothing before it to score it
            tops.append(None)
        else:
            top = {tt.piece(i)[0]: lp for i, lp in e["top"]}
            top.setdefault(s, e["logprob"])
            tops.append(top)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def echo_entries(prompt: list[int], scores: list[dict | None], k: int) -> list[dict]:
    """An echoed prompt's tokens as log-prob entries with their top ``k``: the first has none
    (None, as OpenAI)."""
    return [{"token_id": prompt[0], "logprob": None, "top": None},
            *({"token_id": e["token_id"], "logprob": e["logprob"], "top": e["top"][:k]}
              for e in scores[1:])]  # fmt: skip


def vllm_prompt_logprobs(scores: list[dict | None], k: int, tt: TokenText) -> list:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {token id: {logprob,
    rank, decoded_token}} holding the prompt's token and the top k."""
    out: list = []
    for e in scores:
        if e is None:
            out.append(None)
            continue
        d = {str(i): {"logprob": lp, "rank": r, "decoded_token": tt.piece(i)[0]}
             for r, (i, lp) in enumerate(e["top"][:k], start=1)}  # fmt: skip
        d[str(e["token_id"])] = {"logprob": e["logprob"], "rank": e["rank"],
                                 "decoded_token": tt.piece(e["token_id"])[0]}  # fmt: skip
        out.append(d)
    return out


def chat_logprobs(entries: list[dict], tt: TokenText) -> list[dict]:
    """Chat shape: one entry per token with ``bytes`` and its ``top_logprobs`` list."""
    out = []
    for e in entries:
        s, b = tt.piece(e["token_id"])
        top = []
        for i, lp in e["top"]:
            ts, tb = tt.piece(i)
            top.append({"token": ts, "logprob": lp, "bytes": tb})
        out.append({"token": s, "logprob": e["logprob"], "bytes": b, "top_logprobs": top})
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens whose KV the prefix cache held."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's vocabulary: the engine's ``abort`` (server shutting down) reads as ``stop``."""
    return {"abort": "stop"}.get(reason, reason) if reason else None
