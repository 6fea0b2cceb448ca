"""Token sampling on the device, per row: greedy, temperature, top-k, top-p.

Runs inside the jitted step so sampled tokens never round-trip through the host before the
next step. Randomness is keyed by (request seed, position), so a seeded request samples the
same tokens whatever batch it shares.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """Per-row sampling parameters (device arrays, one entry per decode slot)."""

    temperature: jax.Array  # [S] float32; 0 = greedy
    top_k: jax.Array  # [S] int32; 0 = off
    top_p: jax.Array  # [S] float32; 1 = off
    seed: jax.Array  # [S] uint32
    min_p: jax.Array  # [S] float32; 0 = off
    presence: jax.Array  # [S] float32; 0 = off
    frequency: jax.Array  # [S] float32; 0 = off
    repetition: jax.Array  # [S] float32; 1 = off

    @classmethod
    def greedy(cls, n: int) -> SamplingArrays:
        return cls(
            temperature=jnp.zeros((n,), jnp.float32),
            top_k=jnp.zeros((n,), jnp.int32),
            top_p=jnp.ones((n,), jnp.float32),
            seed=jnp.zeros((n,), jnp.uint32),
            min_p=jnp.zeros((n,), jnp.float32),
            presence=jnp.zeros((n,), jnp.float32),
            frequency=jnp.zeros((n,), jnp.float32),
            repetition=jnp.ones((n,), jnp.float32),
        )

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> SamplingArrays:
        """Rows of (temperature, top_k, top_p, seed[, min_p, presence, frequency, repetition])."""
        defaults = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        a = np.array([tuple(r) + defaults[len(r) :] for r in rows], dtype=np.float64)
        a = a.reshape(-1, 8)
        return cls(
            temperature=jnp.asarray(a[:, 0], jnp.float32),
            top_k=jnp.asarray(a[:, 1], jnp.int32),
            top_p=jnp.asarray(a[:, 2], jnp.float32),
            seed=jnp.asarray(a[:, 3].astype(np.uint64) & 0xFFFFFFFF, jnp.uint32),
            min_p=jnp.asarray(a[:, 4], jnp.float32),
            presence=jnp.asarray(a[:, 5], jnp.float32),
            frequency=jnp.asarray(a[:, 6], jnp.float32),
            repetition=jnp.asarray(a[:, 7], jnp.float32),
        )

    def take(self, rows: jax.Array) -> SamplingArrays:
        return jax.tree_util.tree_map(lambda a: a[rows], self)


def sample(logits: jax.Array, params: SamplingArrays, positions: jax.Array) -> jax.Array:
    """Next token per row. logits [n, V] float32; params rows aligned with logits rows."""
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(row_logits, temp, top_k, top_p, seed, min_p, pos):
        x = row_logits / jnp.maximum(temp, 1e-6)
        v = x.shape[-1]
        sorted_x = jnp.sort(x)[::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
        kth = sorted_x[k - 1]
        probs = jax.nn.softmax(sorted_x)
        cum = jnp.cumsum(probs)
        # smallest prefix whose mass reaches top_p (the token crossing the line is kept)
        cutoff_idx = jnp.minimum(jnp.sum(cum - probs < top_p) - 1, v - 1)
        pth = sorted_x[cutoff_idx]
        # min_p: drop tokens less likely than min_p x the most likely one (after temperature)
        mth = sorted_x[0] + jnp.log(jnp.maximum(min_p, 1e-30))
        x = jnp.where((x < kth) | (x < pth) | ((min_p > 0) & (x < mth)), -jnp.inf, x)
        key = jax.random.fold_in(jax.random.key(seed), pos)
        return jax.random.categorical(key, x).astype(jnp.int32)

    def sample_rows(_):
        sampled = jax.vmap(draw)(
            logits,
            params.temperature,
            params.top_k,
            params.top_p,
            params.seed,
            params.min_p,
            positions,
        )
        return jnp.where(params.temperature > 0, sampled, greedy_tok)

    # An all-greedy batch (the common benchmark case) skips the per-row sort entirely.
    return jax.lax.cond(jnp.any(params.temperature > 0), sample_rows, lambda _: greedy_tok, None)


@partial(jax.jit, static_argnames=("k",))
def token_logprobs(
    logits: jax.Array, tokens: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities (of the unmodified distribution, as OpenAI reports them):
    the chosen tokens' [n], and the top-k ids [n, k] with their log-probs [n, k]."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, k)
    return chosen, top_ids, top_lp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Device-resident per-slot state carried between steps (donated to every step)."""

    last: jax.Array  # [S] int32: the token each slot feeds into its next decode step
    counts: jax.Array  # [S, V] int32: generated-token counts (presence/frequency penalties)
    seen: jax.Array  # [S, V] bool: tokens in prompt or output (repetition penalty)

    @classmethod
    def zeros(cls, num_slots: int, vocab: int) -> SlotState:
        return cls(
            last=jnp.zeros((num_slots,), jnp.int32),
            counts=jnp.zeros((num_slots, vocab), jnp.int32),
            seen=jnp.zeros((num_slots, vocab), jnp.bool_),
        )


def apply_penalties(
    logits: jax.Array,
    counts: jax.Array,
    seen: jax.Array,
    params: SamplingArrays,
    force: bool = False,
) -> jax.Array:
    """vLLM's penalties: repetition (prompt + output, divides positive logits), then
    frequency and presence (output only, subtracted). Skipped when no row uses them."""

    def penalize(x):
        rep = params.repetition[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
        c = counts.astype(x.dtype)
        return x - params.frequency[:, None] * c - params.presence[:, None] * (c > 0)

    if force:  # the caller already checked that some row uses a penalty
        return penalize(logits)
    active = (
        jnp.any(params.repetition != 1)
        | jnp.any(params.frequency != 0)
        | jnp.any(params.presence != 0)
    )
    return jax.lax.cond(active, penalize, lambda x: x, logits)
