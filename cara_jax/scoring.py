"""Logits at every position of whole sequences: scoring, and the parity tests against HF.

Runs the serving model itself (model.py) on a flat batch whose rows are whole sequences in the
chunk view (ragged.py), over a paged cache just large enough for them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cara_jax.adapters.multi_lora import (
    BLOCKS_BIG,
    RANK_BLOCK,
    MultiLoraHook,
    RaggedLoraHook,
    no_vocab,
    stacked,
)
from cara_jax.kv_cache import KVCache
from cara_jax.ragged import RaggedMeta
from cara_jax.weights import LoadedModel


def _meta(b: int, t: int, block_size: int) -> RaggedMeta:
    pages = -(-t // block_size)
    n = b * t
    table = 1 + np.arange(b * pages, dtype=np.int32).reshape(b, pages)  # page 0 stays unused
    pos = np.tile(np.arange(t, dtype=np.int32), b)
    slot = (table[np.repeat(np.arange(b), t), pos // block_size] * block_size + pos % block_size)
    i32 = partial(jnp.asarray, dtype=jnp.int32)
    return RaggedMeta(
        positions=i32(pos), slot_mapping=i32(slot),
        dec_tok=i32(np.full(1, n)), dec_len=i32(np.zeros(1)), dec_table=i32(np.zeros((1, pages))),
        ch_start=i32(np.arange(b) * t), ch_len=i32(np.full(b, t)), ch_ctx=i32(np.full(b, t)),
        ch_table=i32(table), ch_tok=i32(np.arange(n).reshape(b, t)), block_size=block_size,
        pages_per_chunk=pages,
    )  # fmt: skip


@partial(jax.jit, static_argnames=("graphdef", "block_size"))
def _full_logits(graphdef, state, tokens, hook, block_size):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    meta = _meta(b, t, block_size)
    pages = 1 + b * (-(-t // block_size))
    cache = KVCache.allocate(model.cfg, pages, block_size, model.dtype)
    if isinstance(hook, MultiLoraHook):
        r = hook.rank_bucket
        w = -(-r // RANK_BLOCK) * RANK_BLOCK
        idx = {p: jnp.pad(rows[hook.adapter, :r], ((0, 0), (0, w - min(r, rows.shape[1]))))
               for p, rows in hook.slot_rows.items() if p in hook.a}  # fmt: skip
        blocks = {p: jnp.zeros((BLOCKS_BIG, RANK_BLOCK), jnp.int32) for p in idx}  # decode: unused
        own = {p: jnp.zeros((BLOCKS_BIG,), jnp.int32) for p in idx}
        unused = {p: jnp.zeros((1,), jnp.int32) for p in idx}  # bgmv's table
        hook = RaggedLoraHook(
            a=stacked(hook.a), b=stacked(hook.b), dec_rows=blocks, dec_ent=unused, dec_own=own,
            dec_w={p: jnp.ones((BLOCKS_BIG, RANK_BLOCK), jnp.float32) for p in idx},
            dec_bucket={p: jnp.int32(0) for p in idx}, ch_idx=idx,
            ch_w={p: jnp.ones(v.shape, jnp.float32) for p, v in idx.items()},
            ch_bucket={p: jnp.int32(w // RANK_BLOCK) for p in idx}, meta=meta,
            strategy="mbgmv", backend=hook.backend,
            dora_g={p: jnp.ones((len(hook.b[p]), 1, hook.b[p][0].shape[1]), jnp.float32)
                    for p in idx},
            tok_dora=jnp.zeros((b * t,), jnp.int32), dora_on=jnp.asarray(False),
            **no_vocab(model.cfg.vocab_size, model.cfg.hidden_size, 1, b * t),
        )  # fmt: skip
    h, _ = model(tokens.reshape(-1), cache, meta, hook)
    return model.logits(h).reshape(b, t, -1)


def full_logits(
    loaded: LoadedModel, tokens: np.ndarray, hook: MultiLoraHook | None = None, block_size=16
) -> jax.Array:
    """Logits [B, T, V] at every position of equal-length sequences; ``hook`` gives row i the
    adapter slot ``hook.adapter[i]`` (DevicePool.hook, pool_index.py)."""
    return _full_logits(
        loaded.graphdef, loaded.state, jnp.asarray(tokens, jnp.int32), hook, block_size
    )
