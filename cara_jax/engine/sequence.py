"""A request's life in the engine: prompt, adapter, KV progress, generated tokens, stop handling."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

from cara_jax.engine.batch import SamplingRow
from cara_jax.sampling_params import SamplingParams
from cara_jax.tokenizer import IncrementalDetokenizer

MIXED_LABEL = "(mixture)"


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class RequestOutput:
    """One streamed delta of a request (the final one has ``finished=True``)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    # per new token when requested: {"token_id", "logprob", "top": [(token_id, logprob), ...]}
    logprobs: list[dict] | None = None
    error: str | None = None  # why, when finish_reason == "error"
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # prompt_logprobs: [None, then per prompt token {"token_id", "logprob", "rank", "top"}],
    # on the request's first delta with tokens
    prompt_logprobs: list[dict | None] | None = None


@dataclasses.dataclass(frozen=True)
class AdapterUse:
    """What a request runs on: nothing (the base model), a registered adapter, or a mixture."""

    label: str | None = None  # the adapter's name, a mixture's description
    content_hash: str | None = None  # content, or the mixture's key
    rank: int = 0  # cost rank: a mixture's is its members' summed
    mixture: tuple[tuple[str, str, float], ...] | None = None  # (name, content hash, weight)


@dataclasses.dataclass
class AdapterHold:
    """A sequence's claim on its adapter and how its cold start went (written by residency)."""

    acquired: bool = False  # holds a reference in the device pool
    handle: Any = None  # the pool entry's load handle that reference was taken on
    slot: int = 0  # device-pool slot (0 = base model)
    cold: bool = False  # the adapter was not resident when the request first asked for it
    cpu_assist: bool = False  # prefilled (or to be) with CPU-computed deltas; decodes once loaded
    no_cpu_assist: bool = False  # a CPU-assisted attempt failed: wait for the load instead
    mode: str | None = None  # sync | cpu_assist, as it went for this request
    reason: str | None = None  # cold_start.REASONS (auto)
    detail: str | None = None  # the predictions behind auto's choice


@dataclasses.dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    adapter_name: str | None = None  # a mixture's: its label (mixture.describe)
    content_hash: str | None = None  # adapter content this sequence holds (a mixture's key)
    rank: int = 0  # the adapter's cost rank (0 = base model): what scheduling counts
    # a scaled or mixed adapter: (name, content hash, weight) per entry (adapters/mixture.py)
    mixture: tuple[tuple[str, str, float], ...] | None = None
    status: SeqStatus = SeqStatus.WAITING
    row: int = -1  # sequence row of the device-side state while running
    num_computed: int = 0  # tokens whose KV is in the cache
    prefill_target: int = 0  # tokens to prefill before decoding (prompt, or all on recompute)
    num_sampled: int = 0  # tokens sampled so far, those still in flight included
    epoch: int = 0  # bumped when in-flight results must be dropped (CPU-assist fallback)
    preemptions: int = 0
    kv_epoch: int = 0  # bumped whenever the sequence's pages are given back
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)  # full blocks' chain
    hash_key: str | None = None  # the adapter key block_hashes were computed with
    num_cached_tokens: int | None = None  # prefix-cache hit at its first admission
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted: int = 0  # chars of text already streamed
    finish_reason: str | None = None
    hold: AdapterHold = dataclasses.field(default_factory=AdapterHold)
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    pending_logprobs: list[dict] = dataclasses.field(default_factory=list)
    constraint: Any = None  # structured.Constraint when the output must match a grammar
    awaiting_token: bool = False  # constrained: a sampled token is in flight (its mask waits)
    ban_mask: Any = None  # min_tokens: the mask without end tokens (structured.Grammars.ban)
    prompt_scores: list[dict] = dataclasses.field(default_factory=list)  # prompt tokens 1..
    prompt_scores_sent: bool = False

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The registered names this request uses (a mixture's members)."""
        if self.mixture is not None:
            return tuple(m[0] for m in self.mixture)
        return () if self.adapter_name is None else (self.adapter_name,)

    @property
    def stats_name(self) -> str | None:
        """The name its per-adapter counters go under: a mixture's go under MIXED_LABEL, so
        arbitrary weights do not grow the counters' keys."""
        return MIXED_LABEL if self.mixture is not None else self.adapter_name

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def tokens(self) -> list[int]:
        """Prompt and the outputs known so far (what a recompute prefills)."""
        return self.prompt_ids + self.output_ids

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= self.prefill_target

    def sampling_row(self) -> SamplingRow:
        p = self.params
        return SamplingRow(p.temperature, p.top_k, p.top_p, self.seed, p.min_p,
                           p.presence_penalty, p.frequency_penalty, p.repetition_penalty)  # fmt: skip

    def append(self, token: int, max_len: int) -> None:
        """Take one generated token: update text, apply stop rules (strings across tokens)."""
        self.token_times.append(time.perf_counter())
        p = self.params
        early = len(self.output_ids) < p.min_tokens  # no end before min_tokens (masked too)
        if not early and ((token in self.eos_ids and not p.ignore_eos)
                          or token in p.stop_token_ids):  # fmt: skip
            self.text += self.detok.flush()
            self.finish(reason="stop")
            return
        self.output_ids.append(token)
        before = len(self.text)
        self.text += self.detok.add(token)
        if p.stop and len(self.output_ids) >= max(p.min_tokens, 1):
            longest = max(len(s) for s in p.stop)
            start = max(0, before - longest + 1)
            hits = [(i, len(s)) for s in p.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                at, n = min(hits)
                self.text = self.text[: at + (n if p.include_stop_str_in_output else 0)]
                self.finish(reason="stop")
                return
        if len(self.output_ids) >= p.max_tokens or len(self.tokens) >= max_len:
            self.text += self.detok.flush()
            self.finish(reason="length")

    def finish(self, reason: str) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason

    def take_delta(self, new_tokens: list[int]) -> RequestOutput:
        """Text that can be streamed now; the tail that may still become a stop string waits."""
        end = len(self.text)
        if not self.finished and self.params.stop:
            end = max(self.emitted, end - (max(len(s) for s in self.params.stop) - 1))
        piece = self.text[self.emitted : end]
        self.emitted = end
        lps = None
        if self.params.logprobs is not None:
            lps, self.pending_logprobs = self.pending_logprobs[: len(new_tokens)], []
        prompt = None
        if self.params.prompt_logprobs is not None and not self.prompt_scores_sent and (
            len(self.prompt_scores) == len(self.prompt_ids) - 1
        ):
            prompt, self.prompt_scores_sent = [None, *self.prompt_scores], True
        return RequestOutput(
            self.request_id, piece, new_tokens, self.finished, self.finish_reason, lps,
            num_cached_tokens=self.num_cached_tokens or 0, prompt_logprobs=prompt,
        )

    def take_logprob(self, token: int, chosen, top_ids, top_lp) -> None:
        """The log-prob of a new token and the top k (one sampling row of the step)."""
        k = self.params.logprobs or 0
        self.pending_logprobs.append(
            {"token_id": token, "logprob": float(chosen),
             "top": [(int(i), float(v)) for i, v in zip(top_ids[:k], top_lp[:k], strict=True)]}
        )  # fmt: skip

    def score_next(self, start: int, n: int) -> list[int] | None:
        """prompt_logprobs: for the chunk of positions [start, start + n), the prompt token
        that follows each (-1 past the prompt); None when nothing in it is scored."""
        if self.params.prompt_logprobs is None or start + 1 >= len(self.prompt_ids):
            return None
        nxt = self.prompt_ids[start + 1 : start + n + 1]
        return nxt + [-1] * (n - len(nxt))

    def take_scores(self, start: int, lp, rank, top_ids, top_lp) -> None:
        """The scores of a chunk's positions (arrays over its tokens). A chunk computed again
        (after a preemption) replaces its positions' scores, so they are counted once."""
        k = self.params.prompt_logprobs or 0
        for i in range(len(lp)):
            target = start + i + 1  # the prompt token this position predicts
            if target >= len(self.prompt_ids) or target > len(self.prompt_scores) + 1:
                continue
            entry = {"token_id": self.prompt_ids[target], "logprob": float(lp[i]),
                     "rank": int(rank[i]),
                     "top": [(int(t), float(v)) for t, v in zip(top_ids[i, :k], top_lp[i, :k], strict=True)]}  # fmt: skip
            if target <= len(self.prompt_scores):
                self.prompt_scores[target - 1] = entry
            else:
                self.prompt_scores.append(entry)
