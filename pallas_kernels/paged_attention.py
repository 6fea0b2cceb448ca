"""Paged attention for rows of queries over a paged KV cache (decode rows and prefill chunks).

Same arguments and math as the jnp reference ``cara_jax.attention.paged_attention_rows``: row r
has ``q_len[r]`` queries at positions ``ctx[r] - q_len[r] + j`` and attends to its keys
[0, position], read page by page through ``tables[r]``; the step's new keys are already in the
cache. One program per (row, KV head): its G query heads x Q queries are one [Q*G, D] tile; a
loop over the row's pages (trip count = its own context, so short rows stop early) keeps an
online softmax in float32. Scores are vector multiply + reduce rather than dots: a decode row
has Q*G = G queries, below the 16 rows a Triton dot needs.

Layout for the Triton lowering: heads are padded so Q*G and D are powers of two; the cache is
viewed as [pages * block_size, Hkv * D] so a page of one head is a 2-D [block_size, D] load.
Not yet run on a GPU: the engine uses the jnp reference unless asked for this kernel.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import call, f32, next_pow2, whole

NEG = -1e30


def _kernel(q_ref, qlen_ref, ctx_ref, table_ref, k_ref, v_ref, o_ref, *, bs, d, g, scale):
    r = pl.program_id(0)
    h = pl.program_id(1)
    ctx = ctx_ref[r]
    qlen = qlen_ref[r]
    q = f32(q_ref[0, 0, :, :]) * scale  # [QG, D]
    qg = q.shape[0]
    qpos = ctx - qlen + jax.lax.broadcasted_iota(jnp.int32, (qg, 1), 0) // g  # [QG, 1]
    cols = pl.ds(pl.multiple_of(h * d, d), d)

    def body(p, carry):
        m, den, acc = carry
        page = table_ref[r, p]
        rows = pl.ds(pl.multiple_of(page * bs, bs), bs)
        k = f32(k_ref[rows, cols])  # [BS, D]
        v = f32(v_ref[rows, cols])
        s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)  # [QG, BS]
        kpos = p * bs + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)
        s = jnp.where(kpos <= qpos, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        w = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m - m_new)
        den = den * corr + jnp.sum(w, axis=1)
        acc = acc * corr[:, None] + jnp.sum(w[:, :, None] * v[None, :, :], axis=1)
        return m_new, den, acc

    init = (
        jnp.full((qg,), NEG, jnp.float32),
        jnp.zeros((qg,), jnp.float32),
        jnp.zeros((qg, d), jnp.float32),
    )
    _, den, acc = jax.lax.fori_loop(0, (ctx + bs - 1) // bs, body, init)
    o_ref[0, 0, :, :] = acc / jnp.maximum(den, 1e-30)[:, None]


@partial(jax.jit, static_argnames=("block_size", "interpret", "poison"))
def paged_attention(
    q: jax.Array,
    q_len: jax.Array,
    ctx: jax.Array,
    tables: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    block_size: int,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """q [R, Q, H, D]; q_len, ctx [R]; tables [R, MB]; caches [pages * block_size, Hkv, D]
    -> [R, Q, H, D] in q's dtype."""
    r, nq, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    gp = next_pow2(g) if nq * g > 1 else 1
    qq = q.reshape(r, nq, hkv, g, d)
    if gp != g:  # pad each KV head's query group to a power of two (zero queries, dropped)
        qq = jnp.pad(qq, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
    qq = qq.transpose(0, 2, 1, 3, 4).reshape(r, hkv, nq * gp, d)  # [R, Hkv, Q*Gp, D]
    kc = k_cache.reshape(-1, hkv * d)
    vc = v_cache.reshape(-1, hkv * d)
    ctx = jnp.maximum(ctx.astype(jnp.int32), 0)
    out = call(
        partial(_kernel, bs=block_size, d=d, g=gp, scale=1.0 / float(d) ** 0.5),
        [qq, q_len.astype(jnp.int32), ctx, tables.astype(jnp.int32), kc, vc],
        [
            pl.BlockSpec((1, 1, nq * gp, d), lambda i, j: (i, j, 0, 0)),
            whole((r,)),
            whole((r,)),
            whole(tables.shape),
            whole(kc.shape),
            whole(vc.shape),
        ],
        jax.ShapeDtypeStruct((r, hkv, nq * gp, d), jnp.float32),
        pl.BlockSpec((1, 1, nq * gp, d), lambda i, j: (i, j, 0, 0)),
        (r, hkv),
        interpret=interpret,
        poison=poison,
        name="paged_attention",
    )
    out = out.reshape(r, hkv, nq, gp, d)[:, :, :, :g].transpose(0, 2, 1, 3, 4)
    return out.reshape(r, nq, h, d).astype(q.dtype)
