"""Paged attention over scattered KV pages: the jnp reference (cara_jax/attention.py) against
dense numpy attention, and the Pallas kernel (interpreter) against the reference."""

from __future__ import annotations

import numpy as np


def test_paged_attention_matches_dense_and_the_pallas_kernel():
    import jax.numpy as jnp

    from cara_jax.attention import paged_attention_rows
    from pallas_kernels import paged_attention

    rng = np.random.default_rng(0)
    bs, hkv, g, d, pages = 4, 2, 3, 8, 40
    k_cache = rng.normal(size=(pages * bs, hkv, d)).astype(np.float32)
    v_cache = rng.normal(size=(pages * bs, hkv, d)).astype(np.float32)
    ctx = np.array([1, 7, 33, 12], np.int32)  # keys per row, new queries included
    q_len = np.array([1, 7, 5, 3], np.int32)  # a decode row, a whole prompt, two later chunks
    perm = rng.permutation(np.arange(1, pages))  # pages of a sequence are scattered
    mb = 16
    tables = np.zeros((4, mb), np.int32)
    used = 0
    for r, c in enumerate(ctx):
        n = -(-c // bs)
        tables[r, :n] = perm[used : used + n]
        used += n
    nq = 8
    q = rng.normal(size=(4, nq, hkv * g, d)).astype(np.float32)
    out = np.asarray(paged_attention_rows(
        jnp.asarray(q), jnp.asarray(q_len), jnp.asarray(ctx), jnp.asarray(tables),
        jnp.asarray(k_cache), jnp.asarray(v_cache), block_size=bs, pages_per_chunk=4,
    ))  # fmt: skip
    for r in range(4):
        rows = (tables[r][:, None] * bs + np.arange(bs)).reshape(-1)[: ctx[r]]
        k, v = k_cache[rows], v_cache[rows]  # [ctx, hkv, d]
        for j in range(q_len[r]):
            pos = ctx[r] - q_len[r] + j
            for h in range(hkv * g):
                s = k[: pos + 1, h // g] @ q[r, j, h] / np.sqrt(d)
                p = np.exp(s - s.max())
                ref = (p / p.sum()) @ v[: pos + 1, h // g]
                np.testing.assert_allclose(out[r, j, h], ref, rtol=2e-5, atol=2e-6)
    # the Pallas kernel (interpreter; poisoned output, so an unwritten element is NaN)
    args = [jnp.asarray(a) for a in (q, q_len, ctx, tables, k_cache, v_cache)]
    pk = np.asarray(paged_attention(*args, block_size=bs, interpret=True, poison=True))
    for r in range(4):
        np.testing.assert_allclose(pk[r, : q_len[r]], out[r, : q_len[r]], rtol=1e-5, atol=1e-6)
    # decode rows alone (one query each)
    one = [jnp.asarray(a) for a in (q[:, :1], np.ones(4, np.int32), ctx, tables, k_cache, v_cache)]
    np.testing.assert_allclose(
        np.asarray(paged_attention(*one, block_size=bs, interpret=True, poison=True)),
        np.asarray(paged_attention_rows(*one, block_size=bs, pages_per_chunk=4)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
