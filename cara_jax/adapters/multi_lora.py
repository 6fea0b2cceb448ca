"""Batched multi-LoRA deltas: pure-jnp reference kernels and the model hook that uses them.

Storage (see docs/adapters.md): for each projection and layer, the device pool holds A rows
[N, in] and B rows [N, out]; one *rank row* is the unit of allocation, so an adapter of rank r
occupies exactly r rows (no padding to a global max rank). Row 0 is all zeros: padding indices
point there and contribute nothing. ``slot_rows[proj][s, :rank]`` lists the rows of the adapter
in slot s; slot 0 means "no adapter" (rank 0).

Kernels (x is one token per batch row in decode):
- ``bgmv``  — every row gathers R rows, R = the batch's max rank (Punica-style; cost ~ B·max r);
- ``mbgmv`` — the batch's rank rows are flattened, each row at its own rank
  (S-LoRA-style; cost ~ Σ r);
- ``sgmv``  — prefill: tokens in contiguous segments per adapter, jax.lax.ragged_dot over the
  segments (segment ranks padded to the batch's max rank).
All three are plain functions usable inside any jit. The Pallas kernels (package
``pallas_kernels``, docs/pallas_kernels.md) implement the same math with the same arguments;
``backend`` picks them: "auto" (Pallas on GPU, these references elsewhere), "jnp", "pallas"
(compiled, GPU) or "pallas_interpret" (the Pallas interpreter, for tests on CPU).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from cara_jax.ragged import RaggedMeta

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


def _rows(pool: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather pool rows; indices come from the slot table and are always in range."""
    return pool.at[idx].get(mode="promise_in_bounds")


def bgmv(x: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, in], a [N, in], b [N, out], idx [B, R] row indices -> delta [B, out]."""
    v = jnp.einsum("bi,bri->br", x, _rows(a, idx), preferred_element_type=jnp.float32)
    return jnp.einsum(
        "br,bro->bo", v.astype(b.dtype), _rows(b, idx), preferred_element_type=jnp.float32
    )


def mbgmv(x: jax.Array, a: jax.Array, b: jax.Array, rows: jax.Array, owner: jax.Array) -> jax.Array:
    """x [B, in]; rows [T] pool rows of the whole batch; owner [T] batch row of each -> [B, out]."""
    v = jnp.sum(x[owner].astype(jnp.float32) * a[rows].astype(jnp.float32), axis=-1)  # [T]
    contrib = v[:, None] * b[rows].astype(jnp.float32)
    return jax.ops.segment_sum(contrib, owner, num_segments=x.shape[0])


def sgmv(
    x: jax.Array, a: jax.Array, b: jax.Array, seg_idx: jax.Array, group_sizes: jax.Array
) -> jax.Array:
    """x [M, in] sorted into G contiguous segments of sizes group_sizes [G];
    seg_idx [G, R] pool rows of each segment's adapter -> [M, out]."""
    a_g = jnp.swapaxes(a[seg_idx], 1, 2)  # [G, in, R]
    v = jax.lax.ragged_dot(x, a_g, group_sizes, preferred_element_type=jnp.float32)
    return jax.lax.ragged_dot(
        v.astype(b.dtype), b[seg_idx], group_sizes, preferred_element_type=jnp.float32
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
    """Functional API: the LoRA delta of one projection for a batch, inside any jit.

    x [B, T, in]; a/b the pool rows of this projection and layer; slot_rows [S, R_cap] and
    slot_rank [S] the pool's slot table; adapter [B] the slot of each row (0 = none).
    T == 1 uses ``strategy`` (bgmv: rank_bucket >= the batch's max rank; mbgmv: rank_bucket >=
    the batch's total rank); T > 1 (prefill) runs sgmv with rank_bucket >= the max rank.
    ``backend`` (see BACKENDS, resolve_backend) picks the jnp references or the Pallas kernels.
    """
    bsz, t, din = x.shape
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown multi-LoRA strategy {strategy!r}; use one of {STRATEGIES}")
    mode = resolve_backend(backend, din, b.shape[1])
    pk = None
    if mode != "jnp":
        import pallas_kernels as pk
    interpret = mode == "pallas_interpret"
    if t == 1:
        x2 = x[:, 0]
        # The barriers keep XLA from fusing the index computation into the weight gathers,
        # which otherwise recomputes indices per element (10x slower on CPU).
        if strategy == "bgmv":
            idx = jax.lax.optimization_barrier(slot_rows[adapter, :rank_bucket])
            if pk is None:
                out = bgmv(x2, a, b, idx)
            else:
                out = pk.bgmv(x2, a, b, idx, interpret=interpret)
        else:
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
                rows, owner, start, count = jax.lax.optimization_barrier(
                    (rows, owner, start, count)
                )
                out = pk.mbgmv_segments(x2, a, b, rows, owner, start, count, interpret=interpret)
        return out[:, None, :].astype(x.dtype)
    seg_idx = jax.lax.optimization_barrier(slot_rows[adapter, :rank_bucket])
    sizes = jnp.full((bsz,), t, jnp.int32)
    fn = sgmv if pk is None else partial(pk.sgmv, interpret=interpret)
    out = fn(x.reshape(bsz * t, din), a, b, seg_idx, sizes)
    return out.reshape(bsz, t, -1).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MultiLoraHook:
    """LoraHook over the device pool: per-row adapter slots, one delta per targeted projection."""

    a: dict[str, list[jax.Array]]  # proj -> per-layer [N, in]
    b: dict[str, list[jax.Array]]  # proj -> per-layer [N, out]
    slot_rows: dict[str, jax.Array]  # proj -> [S, R_cap] int32
    slot_rank: dict[str, jax.Array]  # proj -> [S] int32
    adapter: jax.Array  # [B] int32 slot per batch row (0 = no adapter)
    strategy: str = dataclasses.field(default="bgmv", metadata=dict(static=True))
    rank_bucket: int = dataclasses.field(default=8, metadata=dict(static=True))
    backend: str = dataclasses.field(default="auto", metadata=dict(static=True))

    def delta(self, layer: int, proj: str, x: jax.Array) -> jax.Array | None:
        if proj not in self.a:
            return None
        return multi_lora_delta(
            x,
            self.a[proj][layer],
            self.b[proj][layer],
            self.slot_rows[proj],
            self.slot_rank[proj],
            self.adapter,
            strategy=self.strategy,
            rank_bucket=self.rank_bucket,
            backend=self.backend,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RaggedLoraHook:
    """LoraHook over the device pool for a flat token batch (ragged.py): decode-view rows run
    ``strategy`` (BGMV / MBGMV, one token each), chunk-view rows the segment kernel, each row
    with its own adapter slot."""

    a: dict[str, list[jax.Array]]  # proj -> per-layer [N, in]
    b: dict[str, list[jax.Array]]  # proj -> per-layer [N, out]
    slot_rows: dict[str, jax.Array]  # proj -> [S_pool, R_cap] int32
    slot_rank: dict[str, jax.Array]  # proj -> [S_pool] int32
    dec_adapter: jax.Array  # [S] pool slot of each decode row (0 = none)
    ch_adapter: jax.Array  # [P] pool slot of each chunk row
    meta: RaggedMeta
    strategy: str = dataclasses.field(default="bgmv", metadata=dict(static=True))
    rank_bucket: int = dataclasses.field(default=8, metadata=dict(static=True))
    backend: str = dataclasses.field(default="auto", metadata=dict(static=True))

    def chunk_delta(self, layer: int, proj: str, xc: jax.Array, adapter: jax.Array) -> jax.Array:
        """Delta of chunk-view rows xc [P, Q, in] with per-row adapter slots -> [P, Q, out]."""
        return multi_lora_delta(
            xc, self.a[proj][layer], self.b[proj][layer], self.slot_rows[proj],
            self.slot_rank[proj], adapter, strategy="bgmv", rank_bucket=self.rank_bucket,
            backend=self.backend,
        )  # fmt: skip

    def decode_delta(self, layer: int, proj: str, x: jax.Array) -> jax.Array:
        """Delta of the decode-view rows, gathered from flat x [T, in] -> [S, out]."""
        bucket = self.rank_bucket
        if self.strategy == "mbgmv":  # a bucket of summed ranks covering every row
            bucket *= self.dec_adapter.shape[0]
        d = multi_lora_delta(
            self.meta.dec_gather(x)[:, None], self.a[proj][layer], self.b[proj][layer],
            self.slot_rows[proj], self.slot_rank[proj], self.dec_adapter,
            strategy=self.strategy, rank_bucket=bucket, backend=self.backend,
        )  # fmt: skip
        return d[:, 0]

    def delta(self, layer: int, proj: str, x: jax.Array) -> jax.Array | None:
        if proj not in self.a:
            return None
        xc = self.meta.ch_gather(x)
        dc = self.chunk_delta(layer, proj, xc, self.ch_adapter)
        return self.meta.scatter(self.decode_delta(layer, proj, x), dc)
