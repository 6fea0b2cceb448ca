"""Structured outputs: a grammar per request, a mask of the allowed next tokens per step.

A request may ask that its output match a JSON schema, any JSON object, a regular expression,
one of a few strings, or a Lark grammar (OpenAI's ``response_format``, vLLM's
``structured_outputs``). The grammar engine is llguidance: it compiles the constraint against
the tokenizer once per request and, given the tokens accepted so far, fills a bitmask of the
tokens allowed next (one bit per vocabulary entry, 32 per word). The mask reaches the compiled
step as data of a fixed shape, ``[rows, ceil(V / 32)]``, so a constraint costs no program.

A constrained row skips the step launched before its last token is read: the engine launches
step t+1 before the host sees step t's tokens, and the mask for t+1 depends on the token of t.
Such a row decodes every other step while the unconstrained rows keep the one-step lag
(docs/structured_outputs.md has the measured cost of both choices).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from typing import Any

import numpy as np

from cara_jax.sampling_params import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class GrammarError(InvalidRequestError):
    """The constraint does not compile (a bad schema, regex or grammar)."""


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. ``value``: the JSON schema as JSON text
    (json_schema), None (json_object), the pattern (regex), the strings (choice), or a Lark
    grammar (grammar). ``param``: the request field it came from, for error messages."""

    kind: str
    value: str | tuple[str, ...] | None = None
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown constraint {self.kind!r}; one of {KINDS}", self.param)
        if self.kind == "choice" and (not self.value or not all(
            isinstance(c, str) for c in self.value
        )):  # fmt: skip
            raise GrammarError("choice must be a non-empty list of strings", self.param)

    @classmethod
    def json_schema(cls, schema: Any, param: str = "response_format") -> GrammarSpec:
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("the JSON schema must be an object", param)
        return cls("json_schema", json.dumps(schema), param)  # key order is the output order

    def grammar_text(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint."""
        import llguidance

        if self.kind in ("json_object", "json_schema"):
            schema = {"type": "object"} if self.kind == "json_object" else json.loads(self.value)
            if isinstance(schema, bool):
                schema = {} if schema else {"not": {}}
            # compact JSON ("," and ":" with no whitespace), as OpenAI answers it:
            # with any whitespace allowed a model can spend its tokens on newlines
            schema = {**schema, "x-guidance": {"whitespace_flexible": False,
                                               **schema.get("x-guidance", {})}}  # fmt: skip
            return llguidance.grammar_from("json", json.dumps(schema))
        if self.kind == "regex":
            return llguidance.grammar_from("regex", self.value)
        if self.kind == "choice":
            alternatives = " | ".join(_lark_string(c) for c in self.value)
            return llguidance.grammar_from("lark", f"start: {alternatives}")
        return llguidance.grammar_from("lark", self.value)


def _lark_string(text: str) -> str:
    """A Lark string literal matching ``text`` exactly."""
    return json.dumps(text)


@dataclasses.dataclass
class MaskStats:
    """Host time spent making masks (the scheduler makes one per constrained row per step)."""

    masks: int = 0
    seconds: float = 0.0
    compiled: int = 0  # constraints compiled (one per constrained request)


class Constraint:
    """One request's matcher: the mask of what may come next, and the tokens taken so far."""

    def __init__(self, matcher: Any, words: int, stats: MaskStats) -> None:
        self._m = matcher
        self._mask = np.zeros((1, words), np.int32)
        self._stats = stats

    def mask(self) -> np.ndarray:
        """The allowed next tokens as ``[words]`` uint32 (bit v of word v // 32 for token v)."""
        from llguidance.numpy import fill_next_token_bitmask

        t0 = time.perf_counter()
        self._mask[:] = 0
        fill_next_token_bitmask(self._m, self._mask, 0)
        out = self._mask[0].view(np.uint32).copy()
        self._stats.masks += 1
        self._stats.seconds += time.perf_counter() - t0
        return out

    def consume(self, token: int) -> bool:
        """Take the sampled token; False if the grammar refused it (the row then ends)."""
        return bool(self._m.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing but the end of the output."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class Grammars:
    """Compiles constraints for one tokenizer and vocabulary (the llguidance tokenizer is built
    once, on the first constrained request)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        self._ll = None
        self._lock = threading.Lock()
        self.stats = MaskStats()
        self._bans: dict[frozenset[int], np.ndarray] = {}

    def ban(self, token_ids: frozenset[int]) -> np.ndarray:
        """The all-tokens mask less ``token_ids`` (min_tokens: no end before the minimum); one
        shared read-only array per set."""
        key = frozenset(int(t) for t in token_ids if 0 <= t < self.vocab_size)
        mask = self._bans.get(key)
        if mask is None:
            mask = np.full(self.words, 0xFFFFFFFF, np.uint32)
            for t in key:
                mask[t // 32] &= ~np.uint32(1 << (t % 32))
            mask.flags.writeable = False
            self._bans[key] = mask
        return mask

    def prepare(self) -> None:
        """Build the grammar engine's tokenizer now (start-up), not on the first request."""
        self._ll_tokenizer()

    def _ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance

                tok = self.tokenizer
                eos = sorted(tok.eos_token_ids)  # every id the engine stops on ends a grammar
                self._ll = llguidance.LLTokenizer(
                    tok.backend.to_str(), n_vocab=self.vocab_size, eos_token=eos or None
                )
            return self._ll

    def compile(self, spec: GrammarSpec) -> Constraint:
        import llguidance

        ll = self._ll_tokenizer()
        try:
            grammar = spec.grammar_text()
        except Exception as e:  # llguidance raises ValueError/RuntimeError on a bad input
            raise GrammarError(f"invalid {spec.kind}: {_short(e)}", spec.param) from e
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0)  # compiles it once
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.kind}: {_short(matcher.get_error())}", spec.param)
        self.stats.compiled += 1
        return Constraint(matcher, self.words, self.stats)


def _short(e: object) -> str:
    text = re.sub(r"\s+", " ", str(e)).strip()
    return text if len(text) <= 300 else text[:297] + "..."
