"""SGMV: prefill LoRA delta for tokens sorted into contiguous segments, one adapter per segment.

Layout (same as cara_jax.adapters.multi_lora.sgmv): x [M, in] in G contiguous segments of sizes
group_sizes [G] (tokens past their sum get zero); seg_idx [G, R] pool rows of each segment's
adapter (padding -> row 0); pool rows a [N, in], b [N, out]. Result [M, out] float32:
out[m] = (x[m] . a[seg_idx[g]]^T).astype(b.dtype) . b[seg_idx[g]] for m in segment g.

Prefill has >= 16 tokens per tile, so both halves use tensor-core dots:
- shrink, grid (M/BM, in/KC): token tile [BM, KC] x gathered A rows [R, KC]^T in BK steps, for
  each of the (usually one) segments overlapping the tile; tokens outside a segment are zeroed
  per segment. Split-K partials [in/KC, M, R] float32, summed by XLA and rounded to b.dtype
  (the reference's rounding) into v [M, R]: the split gives M/BM * in/KC programs, where one
  program per token tile would leave most of the GPU idle for a few hundred tokens.
- expand, grid (M/BM, out/BO): v tile [BM, R] x gathered B rows [R, BO] per overlapping segment.
Segment bounds per token tile are computed outside the kernels (searchsorted on G+1 ints), so
the kernels see a data-dependent loop over [g_lo, g_hi) and nothing recompiles per batch mix.
R is padded to >= 16 with row 0 (Triton dots need >= 16 in every dim).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import call, check_dims, next_pow2, pad_cols, pow2_tile, whole

_NT = (((1,), (1,)), ((), ()))  # x [m, k] . a [r, k] -> [m, r]
_NN = (((1,), (0,)), ((), ()))  # v [m, r] . b [r, o] -> [m, o]


def sgmv_ref(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    seg_idx: jax.Array,
    group_sizes: jax.Array,
    seg_w: jax.Array | None = None,
) -> jax.Array:
    """The reference (the engine's jnp path: multi_lora.sgmv is this function).

    x [M, in] sorted into G contiguous segments of sizes group_sizes [G]; seg_idx [G, R] pool
    rows of each segment's adapter; seg_w [G, R] (optional) the weight of each rank row
    -> [M, out] float32."""
    a_g = jnp.swapaxes(a[seg_idx], 1, 2)  # [G, in, R]
    v = jax.lax.ragged_dot(x, a_g, group_sizes, preferred_element_type=jnp.float32)
    if seg_w is not None:
        v = v * token_weights(seg_w, group_sizes, x.shape[0])
    return jax.lax.ragged_dot(
        v.astype(b.dtype), b[seg_idx], group_sizes, preferred_element_type=jnp.float32
    )


def token_weights(seg_w: jax.Array, group_sizes: jax.Array, m: int) -> jax.Array:
    """[m, R] each token's segment's rank-row weights (tokens past the segments: the last's,
    harmless: they are zero)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    seg = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")
    return seg_w.astype(jnp.float32)[jnp.minimum(seg, seg_w.shape[0] - 1)]


def _inside(starts_ref, ends_ref, g, m):
    return (m >= starts_ref[g]) & (m < ends_ref[g])


def _shrink_kernel(glo_ref, ghi_ref, starts_ref, ends_ref, seg_ref, x_ref, a_ref, part_ref, *,
                   bm: int, bk: int, kc: int, dtype):  # fmt: skip
    i, q = pl.program_id(0), pl.program_id(1)
    m = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    r = part_ref.shape[2]

    def seg(g, acc):
        rows = seg_ref[g, :]  # [R]

        def kstep(k, vg):
            xt = x_ref[:, pl.ds(pl.multiple_of(k * bk, bk), bk)].astype(dtype)  # [BM, BK]
            at = a_ref[rows, pl.ds(pl.multiple_of(q * kc + k * bk, bk), bk)].astype(dtype)
            return vg + jax.lax.dot_general(xt, at, _NT, preferred_element_type=jnp.float32)

        vg = jax.lax.fori_loop(0, kc // bk, kstep, jnp.zeros((bm, r), jnp.float32))
        return acc + jnp.where(_inside(starts_ref, ends_ref, g, m)[:, None], vg, 0.0)

    acc = jax.lax.fori_loop(glo_ref[0], ghi_ref[0], seg, jnp.zeros((bm, r), jnp.float32))
    part_ref[0, :, :] = acc


def _expand_kernel(glo_ref, ghi_ref, starts_ref, ends_ref, seg_ref, v_ref, b_ref, o_ref, *,
                   bm: int, bo: int):  # fmt: skip
    i, j = pl.program_id(0), pl.program_id(1)
    m = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    cols = pl.ds(pl.multiple_of(j * bo, bo), bo)
    v = v_ref[...]  # [BM, R] in b.dtype

    def seg(g, acc):
        vm = jnp.where(_inside(starts_ref, ends_ref, g, m)[:, None], v, jnp.zeros_like(v))
        bt = b_ref[seg_ref[g, :], cols]  # [R, BO]
        return acc + jax.lax.dot_general(vm, bt, _NN, preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(glo_ref[0], ghi_ref[0], seg, jnp.zeros((bm, bo), jnp.float32))


def tiles(m: int, din: int, dout: int, r: int) -> tuple[int, int, int, int]:
    """(BM, KC, BK, BO): token tile, shrink K chunk per program and K step, expand out tile."""
    bm = 16 if m <= 16 else 32 if m <= 64 else 64
    kc = pow2_tile(din, 512)
    bk = pow2_tile(kc, 128 if r <= 64 else 64)
    bo = pow2_tile(dout, 128 if r <= 64 else 64)
    return bm, kc, bk, bo


@partial(jax.jit, static_argnames=("interpret", "poison"))
def sgmv(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    seg_idx: jax.Array,
    group_sizes: jax.Array,
    seg_w: jax.Array | None = None,
    *,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Pallas SGMV: x [M, in], seg_idx [G, R], group_sizes [G] (seg_w [G, R] optional: the
    rank rows' weights, applied between the calls) -> [M, out] float32."""
    mtok, din = x.shape
    dout = b.shape[1]
    check_dims(din=din, dout=dout)
    g_count = seg_idx.shape[0]
    r = max(16, next_pow2(seg_idx.shape[1]))
    seg_idx = pad_cols(seg_idx.astype(jnp.int32), r)
    bm, kc, bk, bo = tiles(mtok, din, dout, r)
    mp = -(-mtok // bm) * bm
    xp = jnp.pad(x, ((0, mp - mtok), (0, 0))) if mp != mtok else x
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    first = jnp.arange(mp // bm, dtype=jnp.int32) * bm
    # segments overlapping token tile [first, first + bm): g_lo <= g < g_hi
    g_lo = jnp.searchsorted(ends, first, side="right").astype(jnp.int32)
    g_hi = jnp.minimum(jnp.searchsorted(ends, first + bm - 1, side="right") + 1, g_count)
    g_hi = jnp.maximum(g_hi, g_lo).astype(jnp.int32)
    dtype = jnp.promote_types(x.dtype, a.dtype)
    tables = [g_lo, g_hi, starts, ends, seg_idx]
    table_specs = [
        pl.BlockSpec((1,), lambda i, *_: (i,)),
        pl.BlockSpec((1,), lambda i, *_: (i,)),
        whole(starts.shape),
        whole(ends.shape),
        whole(seg_idx.shape),
    ]
    part = call(
        partial(_shrink_kernel, bm=bm, bk=bk, kc=kc, dtype=dtype),
        [*tables, xp, a],
        [*table_specs, pl.BlockSpec((bm, kc), lambda i, q: (i, q)), whole(a.shape)],
        jax.ShapeDtypeStruct((din // kc, mp, r), jnp.float32),
        pl.BlockSpec((1, bm, r), lambda i, q: (q, i, 0)),
        (mp // bm, din // kc),
        interpret=interpret,
        poison=poison,
        name="sgmv_shrink",
    )
    v = jnp.sum(part, axis=0)
    if seg_w is not None:
        w = jnp.pad(seg_w.astype(jnp.float32), ((0, 0), (0, r - seg_w.shape[1])))
        v = v * token_weights(w, group_sizes, mp)
    v = v.astype(b.dtype)  # the reference rounds v to b's dtype
    out = call(
        partial(_expand_kernel, bm=bm, bo=bo),
        [*tables, v, b],
        [*table_specs, pl.BlockSpec((bm, r), lambda i, j: (i, 0)), whole(b.shape)],
        jax.ShapeDtypeStruct((mp, dout), jnp.float32),
        pl.BlockSpec((bm, bo), lambda i, j: (i, j)),
        (mp // bm, dout // bo),
        interpret=interpret,
        poison=poison,
        name="sgmv_expand",
    )
    return out[:mtok] if mp != mtok else out
