"""MBGMV: decode LoRA delta with the batch's rank rows flattened, each row at its own rank.

Layout (same as cara_jax.adapters.multi_lora.mbgmv): x [B, in]; pool rows a [N, in], b [N, out]
(row 0 zero); rows [T] the pool rows of the whole batch, owner [T] the batch row of each
(padding: row 0, owner 0). Result [B, out] float32:
out[i] = sum over t with owner[t] == i of (x[i] . a[rows[t]]) * b[rows[t]].

Cost follows the sum of ranks, not batch x max rank:
- shrink, grid (T/BT, in/BK): each program takes BT flattened rank rows, gathers their A rows
  and their owners' x rows, and writes split-K partials v [in/BK, T] float32. Padding entries
  read the zero row and stay inside the cache.
- expand, grid (B, out/BO): batch row i walks only its own segment [start_i, start_i + count_i)
  of the flattened rows, in chunks of BE rows (a loop with a data-dependent trip count), and
  accumulates v[t] * b[rows[t]] for its out tile. Chunk lanes past the segment read row 0 and
  are zeroed, so no masked loads or stores are needed.
The expand needs each batch row's entries to be contiguous in ``rows`` (padding may sit
anywhere), which is how ``multi_lora.mbgmv_index`` lays them out; ``mbgmv`` derives the segments
from ``owner``, ``mbgmv_segments`` takes them directly.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import TILE_ELEMS, call, check_dims, f32, pow2_tile, take, whole

BE = 16  # rank rows per expand step: ranks are multiples of 8 in practice, 16 halves the steps


def mbgmv_ref(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    rows: jax.Array,
    owner: jax.Array,
    w: jax.Array | None = None,
) -> jax.Array:
    """The reference (the engine's jnp path: multi_lora.mbgmv is this function).

    x [B, in]; rows [T] pool rows of the whole batch; owner [T] batch row of each; w [T]
    (optional) the weight of each rank row -> [B, out]."""
    v = jnp.sum(take(x, owner).astype(jnp.float32) * take(a, rows).astype(jnp.float32), axis=-1)
    if w is not None:
        v = v * w
    contrib = v[:, None] * take(b, rows).astype(jnp.float32)
    return jax.ops.segment_sum(contrib, owner, num_segments=x.shape[0])


def mbgmv_blocks_ref(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    blk_rows: jax.Array,
    blk_own: jax.Array,
    blk_w: jax.Array | None = None,
) -> jax.Array:
    """MBGMV with the entries grouped in blocks: the same math as ``mbgmv_ref`` on
    (blk_rows.reshape(-1), repeat(blk_own, RB)), written as two batched matmuls.

    x [B, in]; blk_rows [K, RB] pool rows (a block holds RB rank rows of one batch row; row 0
    pads); blk_own [K] the batch row of each block; blk_w [K, RB] (optional) the weight of each
    rank row -> [B, out] float32. XLA:CPU runs the
    batched dots about twice as fast as the reference's multiply-reduce over flat entries
    (docs/adapters.md), so the engine's jnp path uses this form."""
    v = jnp.einsum(
        "ki,kri->kr", take(x, blk_own), take(a, blk_rows), preferred_element_type=jnp.float32
    )
    if blk_w is not None:
        v = v * blk_w
    e = jnp.einsum("kr,kro->ko", v, take(b, blk_rows), preferred_element_type=jnp.float32)
    return jax.ops.segment_sum(e, blk_own, num_segments=x.shape[0])


def segments_from_owner(rows: jax.Array, owner: jax.Array, bsz: int) -> tuple[jax.Array, jax.Array]:
    """(start [B], count [B]) of each batch row's entries; padding (row 0) is ignored."""
    t = jnp.arange(rows.shape[0], dtype=jnp.int32)
    valid = rows != 0
    first = jax.ops.segment_min(jnp.where(valid, t, rows.shape[0]), owner, num_segments=bsz)
    last = jax.ops.segment_max(jnp.where(valid, t, -1), owner, num_segments=bsz)
    has = last >= 0
    start = jnp.where(has, first, 0).astype(jnp.int32)
    return start, jnp.where(has, last - first + 1, 0).astype(jnp.int32)


def _shrink_kernel(rows_ref, owner_ref, x_ref, a_ref, part_ref, *, bk: int):
    k = pl.program_id(1)
    cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
    r = rows_ref[:]  # [BT]
    o = owner_ref[:]
    xt = f32(x_ref[o, cols])  # [BT, BK] the owners' x rows (x is small and cached)
    at = f32(a_ref[r, cols])  # [BT, BK] gathered A rows
    part_ref[0, :] = jnp.sum(xt * at, axis=1)


def _expand_kernel(start_ref, count_ref, rows_ref, part_ref, b_ref, o_ref, *, bo: int, ks: int):
    j = pl.program_id(1)
    s = start_ref[0]
    n = count_ref[0]
    cols = pl.ds(pl.multiple_of(j * bo, bo), bo)
    lane = jax.lax.broadcasted_iota(jnp.int32, (BE,), 0)

    def step(c, acc):
        t = s + c * BE + lane
        inside = t < s + n
        tc = jnp.where(inside, t, 0)
        r = jnp.where(inside, rows_ref[tc], 0)  # lanes past the segment read the zero row
        v = jax.lax.fori_loop(1, ks, lambda q, v: v + part_ref[q, tc], part_ref[0, tc])
        v = jnp.where(inside, v, 0.0)
        bt = f32(b_ref[r, cols])  # [BE, BO]
        return acc + jnp.sum(v[:, None] * bt, axis=0)

    acc = jax.lax.fori_loop(0, (n + BE - 1) // BE, step, jnp.zeros((bo,), jnp.float32))
    o_ref[0, :] = acc


def tiles(din: int, dout: int, t: int) -> tuple[int, int, int]:
    """(BT, BK, BO): shrink rows per program, shrink K tile, expand out tile."""
    bt = pow2_tile(t, 16)
    bk = pow2_tile(din, min(512, TILE_ELEMS // bt))
    bo = pow2_tile(dout, min(256, TILE_ELEMS // BE))  # 256: more programs at small batch
    return bt, bk, bo


@partial(jax.jit, static_argnames=("interpret", "poison"))
def mbgmv_segments(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    rows: jax.Array,
    owner: jax.Array,
    start: jax.Array,
    count: jax.Array,
    w: jax.Array | None = None,
    *,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Pallas MBGMV given each batch row's segment (start [B], count [B]) of ``rows``; ``w``
    [T] (optional) weighs each rank row, applied to the shrink's partials between the calls."""
    bsz, din = x.shape
    dout = b.shape[1]
    check_dims(din=din, dout=dout)
    rows = rows.astype(jnp.int32)
    owner = owner.astype(jnp.int32)
    total = rows.shape[0]
    if total % 8:  # padding entries (row 0, owner 0) up to a multiple of 8
        extra = 8 - total % 8
        rows, owner = jnp.pad(rows, (0, extra)), jnp.pad(owner, (0, extra))
        if w is not None:
            w = jnp.pad(w, (0, extra))
        total += extra
    bt, bk, bo = tiles(din, dout, total)
    ks = din // bk
    part = call(
        partial(_shrink_kernel, bk=bk),
        [rows, owner, x, a],
        [
            pl.BlockSpec((bt,), lambda c, k: (c,)),
            pl.BlockSpec((bt,), lambda c, k: (c,)),
            whole(x.shape),
            whole(a.shape),
        ],
        jax.ShapeDtypeStruct((ks, total), jnp.float32),
        pl.BlockSpec((1, bt), lambda c, k: (k, c)),
        (total // bt, ks),
        interpret=interpret,
        poison=poison,
        name="mbgmv_shrink",
    )
    if w is not None:  # the expand sums the split-K partials: weigh each one
        part = part * w.astype(jnp.float32)[None, :]
    return call(
        partial(_expand_kernel, bo=bo, ks=ks),
        [start.astype(jnp.int32), count.astype(jnp.int32), rows, part, b],
        [
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((1,), lambda i, j: (i,)),
            whole(rows.shape),
            whole(part.shape),
            whole(b.shape),
        ],
        jax.ShapeDtypeStruct((bsz, dout), jnp.float32),
        pl.BlockSpec((1, bo), lambda i, j: (i, j)),
        (bsz, dout // bo),
        interpret=interpret,
        poison=poison,
        name="mbgmv_expand",
    )


@partial(jax.jit, static_argnames=("interpret", "poison"))
def mbgmv(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    rows: jax.Array,
    owner: jax.Array,
    w: jax.Array | None = None,
    *,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Pallas MBGMV with the reference's arguments: x [B, in], rows/owner [T] (w [T]
    optional) -> [B, out] f32."""
    start, count = segments_from_owner(rows, owner, x.shape[0])
    return mbgmv_segments(x, a, b, rows, owner, start, count, w, interpret=interpret,
                          poison=poison)  # fmt: skip
