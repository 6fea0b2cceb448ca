"""Typed records at the scheduler -> runner seam: what one step runs, row by row.

The scheduler fills a ``ScheduledBatch`` from its queues and block tables; the runner turns it
into device arrays (runner.py) and never looks at a ``Sequence``. The engine keeps the
sequences beside the rows (``DecodeRow.seq`` / ``ChunkRow.seq``) to route the sampled tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np


class SamplingRow(NamedTuple):
    """One row's sampling parameters, in SamplingArrays.from_rows order (the defaults: an idle
    row, greedy with no penalties)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


IDLE_ROW = SamplingRow()


@dataclasses.dataclass
class DecodeRow:
    """One running sequence's next token."""

    seq: Any  # the engine's Sequence (opaque to the runner)
    row: int  # sequence row in the device-side state
    position: int  # position of the token fed in (its KV is written there)
    table: list[int]  # KV pages of the sequence
    adapter_slot: int  # device-pool slot (0 = base model)
    sampling: SamplingRow
    allowed: np.ndarray | None = None  # [ceil(V/32)] uint32 token bitmask (structured.py)
    bias: tuple[tuple[int, float], ...] = ()  # (token, logit bias) pairs (logit_bias)


@dataclasses.dataclass
class ChunkRow:
    """A chunk of a prompt (or of a preempted sequence's tokens, recomputed)."""

    seq: Any
    row: int
    tokens: list[int]  # the chunk's token ids
    start: int  # position of the chunk's first token
    table: list[int]
    adapter_slot: int
    sampling: SamplingRow
    final: bool  # the chunk ends the prompt: its last token's logits are sampled
    out_from: int  # positions >= out_from are earlier outputs (recompute after preemption)
    cpu_assist: bool = False  # the adapter is still loading: deltas may come from the CPU
    first: bool = False  # the sequence's first chunk (after a prefix-cache hit, start > 0)
    allowed: np.ndarray | None = None  # a final chunk's token bitmask (structured.py)
    bias: tuple[tuple[int, float], ...] = ()  # a final chunk's (token, logit bias) pairs
    score_next: list[int] | None = None  # prompt_logprobs: the token after each (-1: none)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclasses.dataclass
class ScheduledBatch:
    decode: list[DecodeRow]
    chunks: list[ChunkRow]
    preempted: list[Any] = dataclasses.field(default_factory=list)  # sequences sent back

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(len(c.tokens) for c in self.chunks)

    @property
    def rows(self) -> list[DecodeRow | ChunkRow]:
        """Sample rows in the step's order: decode rows, then chunk rows."""
        return [*self.decode, *self.chunks]

    def __bool__(self) -> bool:
        return bool(self.decode or self.chunks)


@dataclasses.dataclass
class CpuPlan:
    """Where each chunk row's LoRA deltas come from, per layer, for a step with cold rows:
    ``dev_adapter[layer, chunk]`` is the pool slot (0: the CPU workers serve that layer);
    ``need[layer, group]``: a cold row needs the workers' deltas there (lora_hooks.GROUPS)."""

    dev_adapter: np.ndarray  # [layers, chunks]
    need: np.ndarray  # [layers, groups] bool
    plan_id: int
    plan: Any  # cpu_assist.PrefillPlan
