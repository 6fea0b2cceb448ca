"""The layout of one engine step: a flat batch of tokens seen through two row views.

Every step runs T tokens (T is the token-count bucket) through the projections as one flat
[T, hidden] batch, whatever request each token belongs to. Attention and LoRA need the tokens
grouped by sequence, so the step also describes two views of the same tokens:

- the *decode view*: S rows of one token each (a running sequence's next token);
- the *chunk view*: P rows of up to Q = T tokens each (a chunk of a prompt being prefilled, so a
  long prompt spans several steps while the others keep decoding).

Each real token is in exactly one view; padding tokens are in none. Gathering into a view and
scattering back are plain index operations whose indices the host computes once per step.
Keys and values live in a paged cache (``kv_cache.py``): ``slot_mapping`` says where each token's
K/V go, and each row's block table lists its pages. Index conventions: out-of-range indices are
dropped on scatter; they are large positive values (``DROP``), never -1, which JAX would wrap.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.common import take

DROP = 1 << 30  # scatter index that lands nowhere (mode="drop")


def put(a: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """a with a[idx] = values along axis 0; out-of-range indices (``DROP``) are dropped."""
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(idx.ndim, idx.ndim + a.ndim - 1)),
        inserted_window_dims=(0,),
        scatter_dims_to_operand_dims=(0,),
    )
    return jax.lax.scatter(
        a, idx[..., None], values.astype(a.dtype), dnums,
        mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
    )  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RaggedMeta:
    """Per-token and per-row indices of one step (all int32 device arrays)."""

    positions: jax.Array  # [T] position of each token in its sequence
    slot_mapping: jax.Array  # [T] flat KV-cache row (page * block_size + offset); DROP = none
    dec_tok: jax.Array  # [S] flat index of each decode row's token; T = padding row
    dec_len: jax.Array  # [S] keys the row attends to (its context incl. this token); 0 = padding
    dec_table: jax.Array  # [S, MB] pages of each decode row
    ch_start: jax.Array  # [P] flat index of each chunk's first token
    ch_len: jax.Array  # [P] tokens in the chunk; 0 = padding row
    ch_ctx: jax.Array  # [P] keys after the chunk (its first token sits at ch_ctx - ch_len)
    ch_table: jax.Array  # [P, MB] pages of each chunk row
    ch_tok: jax.Array  # [P, Q] flat index of each chunk-view slot; T where empty
    block_size: int = dataclasses.field(default=16, metadata=dict(static=True))
    pages_per_chunk: int = dataclasses.field(default=16, metadata=dict(static=True))
    attn_backend: str = dataclasses.field(default="jnp", metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def chunk_index(self) -> tuple[jax.Array, jax.Array]:
        """([P, Q] flat index of each chunk-view slot (T where empty), [P, Q] validity)."""
        return self.ch_tok, self.ch_tok < self.num_tokens

    def if_decode(self, fn, like: jax.ShapeDtypeStruct | None = None):
        """fn() when the step has decode rows, else zeros of its shape (``like``, when the
        caller knows it): a step without decode rows (or without chunks, below) skips that
        view's work at run time."""
        return when(jnp.any(self.dec_len > 0), fn, like)

    def if_chunks(self, fn, like: jax.ShapeDtypeStruct | None = None):
        return when(jnp.any(self.ch_len > 0), fn, like)

    def dec_gather(self, x: jax.Array) -> jax.Array:
        """[T, ...] -> [S, ...] (padding rows read token 0; their results are dropped)."""
        return take(x, self.dec_tok, clip=True)

    def ch_gather(self, x: jax.Array) -> jax.Array:
        """[T, ...] -> [P, Q, ...]."""
        return take(x, self.ch_tok, clip=True)

    def scatter(self, dec: jax.Array, ch: jax.Array) -> jax.Array:
        """Decode-view [S, ...] and chunk-view [P, Q, ...] rows back to flat [T, ...] (zeros
        where a token is in neither view)."""
        out = jnp.zeros((self.num_tokens, *dec.shape[1:]), dec.dtype)
        return put(put(out, self.dec_tok, dec), self.ch_tok, ch)


def when(pred: jax.Array, fn, like: jax.ShapeDtypeStruct | None = None):
    """fn() if ``pred`` (a traced bool), else zeros of its result's shape, decided at run time:
    the branch not taken costs nothing. ``like``: that shape, when the caller knows it (else
    fn is traced once more just to learn it, which in a 30-layer step was a third of tracing)."""
    shape = like if like is not None else jax.eval_shape(fn)
    zeros = lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)  # noqa: E731
    return jax.lax.cond(pred, fn, zeros)
