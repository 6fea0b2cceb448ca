"""BGMV: decode LoRA delta where every batch row gathers R pool rows (R = batch max rank bucket).

Layout (``bgmv_ref``, which the engine's jnp path uses as multi_lora.bgmv): x [B, in]; pool rows a [N, in] and
b [N, out] with row 0 zero; idx [B, R] pool rows of each batch row (padding -> row 0).
Result [B, out] float32: out[i] = (x[i] . a[idx[i]]^T).astype(b.dtype) . b[idx[i]].

Two Pallas calls, both gathering pool rows straight from HBM (nothing is materialised):
- shrink, grid (B, R/BR, in/BK): a [BR, BK] tile of gathered A rows times the x tile, reduced
  over BK -> split-K partials [B, in/BK, R] float32. Splitting K gives B*KS*R/BR programs, so
  even batch 1 fills a good part of the GPU.
- expand, grid (B, out/BO): sum the KS partials (tiny, L2-resident), round to b.dtype as the
  reference does, then a [R, BO] tile of gathered B rows -> out tile.
GEMV-shaped work is bandwidth-bound, so products are vector multiply + reduce in float32, not
tensor-core dots (which would need >= 16 rows per operand).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    TILE_ELEMS,
    call,
    check_dims,
    f32,
    next_pow2,
    pad_cols,
    pow2_tile,
    take,
    whole,
)


def bgmv_ref(
    x: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array, w: jax.Array | None = None
) -> jax.Array:
    """The reference (the engine's jnp path: multi_lora.bgmv is this function).

    x [B, in], a [N, in], b [N, out], idx [B, R] row indices -> delta [B, out] float32.
    ``w`` [B, R] (optional) weighs each rank row (a request's scale or mixture weights).
    Written as multiply-reduce rather than batched dots: XLA:CPU then fuses each row gather into
    its reduction and reads the adapter rows once, in place (a batched matrix-vector dot first
    copies the gathered rows out)."""
    f32 = jnp.float32
    v = jnp.sum(x[:, None, :].astype(f32) * take(a, idx).astype(f32), axis=-1)  # [B, R]
    if w is not None:
        v = v * w
    v = v.astype(b.dtype).astype(f32)
    return jnp.sum(v[:, :, None] * take(b, idx).astype(f32), axis=1)


def _shrink_kernel(x_ref, idx_ref, a_ref, part_ref, *, bk: int):
    k = pl.program_id(2)
    rows = idx_ref[0, :]  # [BR]
    cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
    xt = f32(x_ref[0, :])  # [BK]
    at = f32(a_ref[rows, cols])  # [BR, BK] gathered A rows
    part_ref[0, 0, :] = jnp.sum(at * xt[None, :], axis=1)


def _expand_kernel(part_ref, idx_ref, b_ref, o_ref, *, bo: int, ks: int, b_dtype):
    j = pl.program_id(1)
    v = jax.lax.fori_loop(1, ks, lambda s, acc: acc + part_ref[0, s, :], part_ref[0, 0, :])
    v = f32(v.astype(b_dtype))  # the reference rounds v to b's dtype before the expand
    rows = idx_ref[0, :]  # [R]
    bt = f32(b_ref[rows, pl.ds(pl.multiple_of(j * bo, bo), bo)])  # [R, BO]
    o_ref[0, :] = jnp.sum(v[:, None] * bt, axis=0)


def tiles(din: int, dout: int, r: int) -> tuple[int, int, int]:
    """(BR, BK, BO) for a rank bucket r (a power of two)."""
    br = min(r, 16)
    bk = pow2_tile(din, min(512, TILE_ELEMS // br))
    bo = pow2_tile(dout, min(512, TILE_ELEMS // r))
    return br, bk, bo


@partial(jax.jit, static_argnames=("interpret", "poison"))
def bgmv(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    idx: jax.Array,
    w: jax.Array | None = None,
    *,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Pallas BGMV: x [B, in], a [N, in], b [N, out], idx [B, R] -> [B, out] float32; ``w``
    [B, R] (optional) weighs the rank rows, applied to the shrink's partials between the calls."""
    bsz, din = x.shape
    dout = b.shape[1]
    check_dims(din=din, dout=dout)
    r = max(8, next_pow2(idx.shape[1]))
    if w is not None:
        w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, r - w.shape[1])))
    idx = pad_cols(idx.astype(jnp.int32), r)
    br, bk, bo = tiles(din, dout, r)
    ks = din // bk
    part = call(
        partial(_shrink_kernel, bk=bk),
        [x, idx, a],
        [
            pl.BlockSpec((1, bk), lambda i, q, k: (i, k)),
            pl.BlockSpec((1, br), lambda i, q, k: (i, q)),
            whole(a.shape),
        ],
        jax.ShapeDtypeStruct((bsz, ks, r), jnp.float32),
        pl.BlockSpec((1, 1, br), lambda i, q, k: (i, k, q)),
        (bsz, r // br, ks),
        interpret=interpret,
        poison=poison,
        name="bgmv_shrink",
    )
    if w is not None:  # the split-K sum in the expand is linear: weigh each partial
        part = part * w[:, None, :]
    return call(
        partial(_expand_kernel, bo=bo, ks=ks, b_dtype=b.dtype),
        [part, idx, b],
        [
            pl.BlockSpec((1, ks, r), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((1, r), lambda i, j: (i, 0)),
            whole(b.shape),
        ],
        jax.ShapeDtypeStruct((bsz, dout), jnp.float32),
        pl.BlockSpec((1, bo), lambda i, j: (i, j)),
        (bsz, dout // bo),
        interpret=interpret,
        poison=poison,
        name="bgmv_expand",
    )
