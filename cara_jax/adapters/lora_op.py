"""The grouped-LoRA op as a function: every row of a batch at its own adapter, differentiable.

``multi_lora_delta(x, a, b, slot_rows, slot_rank, adapter)`` is the delta of one projection for
a batch whose rows each name a pool slot (0 = no adapter). It is what the dense forward, scoring
and training use; the serving step uses the flat-batch hook (multi_lora.RaggedLoraHook) built on
the same kernels.

Why a custom VJP: the Pallas kernels have no JVP rule (the interpreter asserts in reverse mode)
and ragged_dot neither vmaps over a batch dim nor shards under Explicit mesh axes. The backward
here needs neither:
- dx is the same op with the pool's A and B swapped (g·Bᵀ·A), run by the chosen backend's kernels;
- dA and dB are per-row outer products, dv ⊗ x and v ⊗ g with v = x·Aᵀ and dv = g·Bᵀ over each
  row's own pool rows, scattered (added) into those rows; row 0, the padding row every unused
  rank position points at, gets no gradient and stays zero.
The forward for T > 1 (a prefill or a training sequence) is one batched gather-matmul per row
(``row_lora``): the same math as the segment kernel when every batch row is a segment, and it
vmaps and shards along the batch.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels.bgmv import bgmv_ref as bgmv
from pallas_kernels.common import take
from pallas_kernels.mbgmv import mbgmv_ref as mbgmv

STRATEGIES = ("bgmv", "mbgmv")
BACKENDS = ("auto", "jnp", "pallas", "pallas_interpret")


def resolve_backend(backend: str, din: int, dout: int) -> str:
    """The backend that runs a projection of shape (din, dout): "jnp", "pallas" or
    "pallas_interpret". "auto" picks compiled Pallas on GPU when the kernels support the shape
    and this JAX still has their (Triton) lowering; otherwise the jnp references."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown multi-LoRA backend {backend!r}; use one of {BACKENDS}")
    if backend != "auto":
        return backend
    if jax.default_backend() != "gpu":
        return "jnp"
    from pallas_kernels import common

    return "pallas" if common.available() and common.supports(din, dout) else "jnp"


def row_lora(
    x: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array, w: jax.Array | None = None
) -> jax.Array:
    """One adapter per row of tokens (a prefill chunk): x [P, Q, in], idx [P, R] -> [P, Q, out];
    ``w`` [P, R] (optional) weighs each rank row (a scale, a mixture's weights).

    Two batched matmuls after one gather of each row's rank rows: the segment kernel when every
    segment is a row (the chunk view of a step), with none of ragged_dot's per-group masking."""
    v = jnp.einsum("pqi,pri->pqr", x, take(a, idx), preferred_element_type=jnp.float32)
    if w is not None:
        v = v * w[:, None, :]
    return jnp.einsum(
        "pqr,pro->pqo", v.astype(b.dtype), take(b, idx), preferred_element_type=jnp.float32
    )


def mbgmv_index(
    ranks: jax.Array, slot_rows: jax.Array, adapter: jax.Array, total: int
) -> tuple[jax.Array, jax.Array]:
    """Flatten each batch row's rank rows: -> (rows [total], owner [total]); padding -> row 0."""
    ends = jnp.cumsum(ranks)
    starts = ends - ranks
    t = jnp.arange(total)
    owner = jnp.minimum(jnp.searchsorted(ends, t, side="right"), ranks.shape[0] - 1)
    offset = t - starts[owner]
    valid = t < ends[-1]
    rows = jnp.where(valid, slot_rows[adapter[owner], jnp.where(valid, offset, 0)], 0)
    return rows, jnp.where(valid, owner, 0)


def _batch_axes(x: jax.Array):
    """The mesh axes x's batch dim is split over when a mesh with Explicit axes is set, else
    None (no mesh, Auto axes, or an unsplit batch: plain code then shards as XLA sees fit)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
        return None
    spec = jax.typeof(x).sharding.spec
    return spec[0] if len(spec) and spec[0] is not None else None


def _per_shard(fn, axes, batched: tuple, shared: tuple, out_batched: tuple[bool, ...]):
    """fn(*batched, *shared) run on each shard of the batch (shard_map over ``axes``): batched
    arrays split along dim 0, shared ones whole on every device; outputs flagged False in
    ``out_batched`` are summed over the shards (the pool gradients)."""
    P = PartitionSpec
    batched = tuple(jax.sharding.reshard(v, P(axes)) for v in batched)
    shared = tuple(jax.sharding.reshard(v, P()) for v in shared)

    def body(*args):
        outs = fn(*args)
        return tuple(o if keep else jax.lax.psum(o, axes) for o, keep in zip(outs, out_batched, strict=True))

    return jax.shard_map(
        body,
        in_specs=(*(P(axes),) * len(batched), *(P(),) * len(shared)),
        out_specs=tuple(P(axes) if keep else P() for keep in out_batched),
        check_vma=False,  # pallas_call outputs carry no varying-axes type
    )(*batched, *shared)


def _slot_rows(slot_rows: jax.Array, adapter: jax.Array, width: int) -> jax.Array:
    """[B, width] the pool rows of each batch row's slot (a gather, so it splits with the batch)."""
    return take(slot_rows[:, :width], adapter)


def _forward(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend):
    bsz, t, din = x.shape
    mode = resolve_backend(backend, din, b.shape[1])
    pk = None
    if mode != "jnp":
        import pallas_kernels as pk
    interpret = mode == "pallas_interpret"
    if t > 1:
        idx = jax.lax.optimization_barrier(_slot_rows(slot_rows, adapter, rank_bucket))
        if pk is None:
            return row_lora(x, a, b, idx).astype(x.dtype)
        sizes = jnp.full((bsz,), t, jnp.int32)
        out = pk.sgmv(x.reshape(bsz * t, din), a, b, idx, sizes, interpret=interpret)
        return out.reshape(bsz, t, -1).astype(x.dtype)
    x2 = x[:, 0]
    # The barriers keep XLA from fusing the index computation into the weight gathers,
    # which otherwise recomputes indices per element (10x slower on CPU).
    if strategy == "bgmv":
        idx = jax.lax.optimization_barrier(_slot_rows(slot_rows, adapter, rank_bucket))
        out = bgmv(x2, a, b, idx) if pk is None else pk.bgmv(x2, a, b, idx, interpret=interpret)
        return out[:, None, :].astype(x.dtype)
    ranks = slot_rank[adapter]
    rows, owner = mbgmv_index(ranks, slot_rows, adapter, rank_bucket)
    if pk is None:
        rows, owner = jax.lax.optimization_barrier((rows, owner))
        out = mbgmv(x2, a, b, rows, owner)
    else:
        # each row's segment of the flattened rows, clipped like mbgmv_index clips
        ends = jnp.cumsum(ranks)
        start = jnp.minimum(ends - ranks, rank_bucket)
        count = jnp.minimum(ends, rank_bucket) - start
        rows, owner, start, count = jax.lax.optimization_barrier((rows, owner, start, count))
        out = pk.mbgmv_segments(x2, a, b, rows, owner, start, count, interpret=interpret)
    return out[:, None, :].astype(x.dtype)


def used_rows(
    slot_rows: jax.Array, slot_rank: jax.Array, adapter: jax.Array, t: int, strategy: str,
    rank_bucket: int,
) -> jax.Array:  # fmt: skip
    """[B, R] the pool rows each batch row reads in the forward (row 0 where it reads none):
    a row's rank rows up to rank_bucket (bgmv, sgmv), or, for mbgmv decode, those whose place in
    the batch's flattened list falls inside rank_bucket."""
    if t > 1 or strategy == "bgmv":
        return _slot_rows(slot_rows, adapter, rank_bucket)
    rows = _slot_rows(slot_rows, adapter, slot_rows.shape[1])
    ranks = take(slot_rank, adapter)
    starts = jnp.cumsum(ranks) - ranks
    r = jnp.arange(rows.shape[1])
    keep = (r[None, :] < ranks[:, None]) & (starts[:, None] + r[None, :] < rank_bucket)
    return jnp.where(keep, rows, 0)


def _sharded_forward(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend):
    axes = _batch_axes(x)
    if axes is None:
        return _forward(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend)

    def fn(x, adapter, a, b, slot_rows, slot_rank):
        return (_forward(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend),)

    return _per_shard(fn, axes, (x, adapter), (a, b, slot_rows, slot_rank), (True,))[0]


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _delta(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend):
    return _sharded_forward(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend)


def _delta_fwd(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend):
    out = _sharded_forward(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend)
    return out, (x, a, b, slot_rows, slot_rank, adapter)


def _delta_bwd(strategy, rank_bucket, backend, res, g):
    x, a, b, slot_rows, slot_rank, adapter = res
    axes = _batch_axes(x)
    if axes is None:
        grads = _backward(x, g, adapter, a, b, slot_rows, slot_rank, strategy, rank_bucket, backend)
    else:  # each shard's rows; the pool gradients summed over the shards

        def fn(x, g, adapter, a, b, slot_rows, slot_rank):
            return _backward(x, g, adapter, a, b, slot_rows, slot_rank, strategy, rank_bucket,
                             backend)  # fmt: skip

        grads = _per_shard(fn, axes, (x, g, adapter), (a, b, slot_rows, slot_rank),
                           (True, False, False))  # fmt: skip
    return (*grads, None, None, None)


def _backward(x, g, adapter, a, b, slot_rows, slot_rank, strategy, rank_bucket, backend):
    f32 = jnp.float32
    # dx = g·Bᵀ·A: the forward op on the swapped pool, through the same backend's kernels
    dx = _forward(g.astype(x.dtype), b, a, slot_rows, slot_rank, adapter, strategy, rank_bucket,
                  backend)  # fmt: skip
    idx = used_rows(slot_rows, slot_rank, adapter, x.shape[1], strategy, rank_bucket)
    ga, gb = take(a, idx), take(b, idx)  # [B, R, in], [B, R, out]
    v = jnp.einsum("bti,bri->btr", x, ga, preferred_element_type=f32)
    dv = jnp.einsum("bto,bro->btr", g, gb, preferred_element_type=f32)
    da_rows = jnp.einsum("btr,bti->bri", dv, x.astype(f32))
    if x.shape[1] > 1 or strategy == "bgmv":  # as the forward: v rounded to B's dtype first
        v = v.astype(b.dtype).astype(f32)  # (mbgmv's decode keeps it in float32)
    db_rows = jnp.einsum("btr,bto->bro", v, g.astype(f32))
    da = jnp.zeros(a.shape, f32).at[idx].add(da_rows).at[0].set(0.0)
    db = jnp.zeros(b.shape, f32).at[idx].add(db_rows).at[0].set(0.0)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_delta.defvjp(_delta_fwd, _delta_bwd)


def multi_lora_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    slot_rows: jax.Array,
    slot_rank: jax.Array,
    adapter: jax.Array,
    *,
    strategy: str,
    rank_bucket: int,
    backend: str = "auto",
) -> jax.Array:
    """The LoRA delta of one projection for a batch, inside any jit, differentiable in x, a, b.

    x [B, T, in]; a/b the pool rows of this projection and layer; slot_rows [S, R_cap] and
    slot_rank [S] the pool's slot table; adapter [B] the slot of each row (0 = none).
    T == 1 uses ``strategy`` (bgmv: rank_bucket >= the batch's max rank; mbgmv: rank_bucket >=
    the batch's total rank); T > 1 (prefill) runs one adapter per row with rank_bucket >= the
    max rank. ``backend`` (see BACKENDS, resolve_backend) picks the jnp references or the Pallas
    kernels; the gradient runs on the same backend.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown multi-LoRA strategy {strategy!r}; use one of {STRATEGIES}")
    resolve_backend(backend, x.shape[-1], b.shape[1])  # a bad name fails before tracing
    return _delta(x, a, b, slot_rows, slot_rank, adapter, strategy, rank_bucket, backend)
