"""Attention over a paged KV cache for rows of queries: the jnp reference that runs everywhere.

A row is a sequence in the step with ``q_len`` new queries (1 for a decode token, a chunk for a
prefill) whose keys and values, the new ones included, are already in the cache. Query j of a
row sits at position ``ctx - q_len + j`` and attends to keys [0, position]. Keys are read page
by page through the row's block table, ``pages_per_chunk`` pages per iteration of a loop whose
trip count is the longest row's context (so a step pays for the context it has, not for the
model's maximum), combining iterations with an online softmax in float32.

The Pallas ragged paged-attention kernel for the GPU (``pallas_kernels``) computes the same
function; tests compare them in interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cara_jax.ragged import put, take

NEG = -1e30  # finite "minus infinity": a fully masked block leaves no NaN behind


def paged_attention_rows(
    q: jax.Array,
    q_len: jax.Array,
    ctx: jax.Array,
    tables: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    block_size: int,
    pages_per_chunk: int,
) -> jax.Array:
    """q [R, Q, H, D]; q_len, ctx [R]; tables [R, MB] (MB a multiple of pages_per_chunk);
    k_cache / v_cache [num_pages * block_size, Hkv, D] -> [R, Q, H, D] in q's dtype."""
    r, nq, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    span = pages_per_chunk * block_size
    kp = k_cache.reshape(-1, block_size, hkv, d)
    vp = v_cache.reshape(-1, block_size, hkv, d)
    qg = q.reshape(r, nq, hkv, g, d).astype(jnp.float32) * (1.0 / jnp.sqrt(jnp.float32(d)))
    qpos = ctx[:, None] - q_len[:, None] + jnp.arange(nq, dtype=jnp.int32)[None, :]  # [R, Q]
    n_iter = (jnp.max(ctx) + span - 1) // span

    def body(i, carry):
        m, den, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tables, i * pages_per_chunk, pages_per_chunk, 1)
        k = take(kp, pages).reshape(r, span, hkv, d).astype(jnp.float32)
        v = take(vp, pages).reshape(r, span, hkv, d).astype(jnp.float32)
        s = jnp.einsum("rqkgd,rckd->rkgqc", qg, k)
        kpos = i * span + jnp.arange(span, dtype=jnp.int32)
        mask = kpos[None, None, :] <= qpos[:, :, None]  # [R, Q, C]
        s = jnp.where(mask[:, None, None], s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        den = den * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("rkgqc,rckd->rkgqd", p, v)
        return m_new, den, acc

    init = (
        jnp.full((r, hkv, g, nq), NEG, jnp.float32),
        jnp.zeros((r, hkv, g, nq), jnp.float32),
        jnp.zeros((r, hkv, g, nq, d), jnp.float32),
    )
    _, den, acc = jax.lax.fori_loop(0, n_iter, body, init)
    out = acc / jnp.maximum(den, 1e-30)[..., None]  # [R, Hkv, G, Q, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(r, nq, h, d).astype(q.dtype)


ATTENTION_BACKENDS = ("jnp", "pallas", "pallas_interpret")


def attend_rows(q, q_len, ctx, tables, k_cache, v_cache, *, block_size: int,
                pages_per_chunk: int, backend: str = "jnp") -> jax.Array:  # fmt: skip
    """paged_attention_rows, or the Pallas kernel (``pallas_kernels.paged_attention``) that
    computes the same: "pallas" compiled (GPU), "pallas_interpret" in the interpreter (tests).
    The engine's default is the reference everywhere until the kernel has run on a GPU."""
    if backend == "jnp":
        return paged_attention_rows(q, q_len, ctx, tables, k_cache, v_cache,
                                    block_size=block_size, pages_per_chunk=pages_per_chunk)  # fmt: skip
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: use one of {ATTENTION_BACKENDS}")
    from pallas_kernels import paged_attention

    return paged_attention(q, q_len, ctx, tables, k_cache, v_cache, block_size=block_size,
                           interpret=backend == "pallas_interpret")  # fmt: skip


def write_kv(
    k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatter the step's new keys/values [T, Hkv, D] to their cache rows (DROP = padding)."""
    return put(k_cache, slot_mapping, k), put(v_cache, slot_mapping, v)
