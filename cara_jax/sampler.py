"""Token sampling on the device, per row: greedy, temperature, top-k, top-p.

Runs inside the jitted step so sampled tokens never round-trip through the host before the
next step. Randomness is keyed by (request seed, position), so a seeded request samples the
same tokens whatever batch it shares.
"""

from __future__ import annotations

import dataclasses

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


def penalties_active(params: SamplingArrays) -> jax.Array:
    """Whether any row uses a penalty (a step without them skips their [rows, vocab] work)."""
    return (
        jnp.any(params.repetition != 1)
        | jnp.any(params.frequency != 0)
        | jnp.any(params.presence != 0)
    )


def apply_penalties(
    logits: jax.Array, counts: jax.Array, seen: jax.Array, params: SamplingArrays
) -> jax.Array:
    """vLLM's penalties: repetition (prompt + output, divides positive logits), then
    frequency and presence (output only, subtracted)."""
    rep = params.repetition[:, None]
    x = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    c = counts.astype(x.dtype)
    return x - params.frequency[:, None] * c - params.presence[:, None] * (c > 0)
