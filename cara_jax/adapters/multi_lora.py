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
- ``row_lora`` — a prefill chunk row: one adapter per row of tokens (the engine's chunk view).
All are plain functions usable inside any jit (the differentiable op over them,
``multi_lora_delta``, is in lora_op.py). The first three are the references that sit
beside their Pallas kernels in ``pallas_kernels`` (one copy, imported here); the kernels
(docs/pallas_kernels.md) implement the same math with the same arguments;
``backend`` picks them: "auto" (Pallas on GPU, these references elsewhere), "jnp", "pallas"
(compiled, GPU) or "pallas_interpret" (the Pallas interpreter, for tests on CPU).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cara_jax.adapters.lora_op import (  # noqa: F401  (the op's names, re-exported)
    BACKENDS,
    STRATEGIES,
    mbgmv_index,
    multi_lora_delta,
    resolve_backend,
    row_lora,
)
from cara_jax.ragged import RaggedMeta, when
from pallas_kernels.bgmv import bgmv_ref as bgmv
from pallas_kernels.common import take
from pallas_kernels.mbgmv import mbgmv_blocks_ref as mbgmv_blocks
from pallas_kernels.mbgmv import mbgmv_ref as mbgmv  # noqa: F401
from pallas_kernels.sgmv import sgmv_ref as sgmv  # noqa: F401

# rank rows per iteration of the loops that run at a step's rank (chunk rows, bgmv's decode
# rows): a rank-r adapter costs ceil(r / RANK_BLOCK) iterations, and one loop body is compiled
# whatever the largest rank
RANK_BLOCK = 16
# mbgmv's decode entries come in blocks of RANK_BLOCK rank rows of one decode row (a rank-r
# row takes ceil(r / RANK_BLOCK) blocks); its loop takes BLOCKS_BIG blocks per iteration, then
# the rest BLOCKS_SMALL at a time, so one rank-8 stream pays for 32 rank rows and 16 streams
# over ranks 8-64 take 4 iterations
BLOCKS_BIG, BLOCKS_SMALL = 8, 2
assert BLOCKS_BIG % BLOCKS_SMALL == 0  # the small loop then never slices past the table's end
# the granularity of the summed ranks mbgmv's decode runs at (cost models); the step itself
# rounds each row's rank up to RANK_BLOCK first, which the cost model's work feature does not
ENTRY_BLOCK = RANK_BLOCK * BLOCKS_SMALL


def no_vocab(vocab: int, hidden: int, slots: int, tokens: int) -> dict:
    """The vocabulary LoRA fields of a RaggedLoraHook with nothing there (one zero row)."""
    z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    return dict(
        vocab_a={"embed_tokens": z(vocab, 1), "lm_head": z(1, hidden)},
        vocab_b={"embed_tokens": z(1, hidden), "lm_head": z(1, vocab)},
        vocab_w={"embed_tokens": z(slots, 1), "lm_head": z(slots, 1)},
        tok_slot=jnp.zeros((tokens,), jnp.int32), vocab_on=jnp.zeros((2,), bool),
    )


def stacked(pools: dict) -> dict[str, jax.Array]:
    """Pool rows per projection as one [layers, N, ...] array each (per-layer lists are
    stacked; arrays are kept)."""
    return {p: v if isinstance(v, jax.Array) else jnp.stack(v) for p, v in pools.items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MultiLoraHook:
    """LoraHook over the device pool: per-row adapter slots, one delta per targeted projection."""

    # proj -> per-layer [N, in] / [N, out]: a list, or the pool's [layers, N, ...] arrays
    a: dict[str, list[jax.Array] | jax.Array]
    b: dict[str, list[jax.Array] | jax.Array]
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
    """LoraHook over the device pool for a flat token batch (ragged.py): a step pays for the
    adapters in it, at their own ranks, on the projections they target.

    Decode view (one token per row), per projection p:
    - ``mbgmv`` (default): every decode row's rank rows on p, in blocks of RANK_BLOCK rows of
      one decode row (``dec_rows`` [K, RANK_BLOCK] the pool rows, ``dec_own`` [K] the decode
      row of each block), each row at its own rank, a row's blocks contiguous and rows on one
      adapter adjacent (an adapter's pool rows come from memory once per step, then from
      cache). Work: the sum of the rows' ranks, each rounded up to RANK_BLOCK.
    - ``bgmv``: every row gathers its adapter's rows on p, up to the largest rank on p in the
      step rounded up to RANK_BLOCK (Punica-style: cost ~ rows x max rank).
    Chunk view (prefill chunks, one adapter per row): each row multiplies by its adapter's rows
    on p, up to the largest rank on p among the chunk rows rounded up to RANK_BLOCK.
    Every rank row carries a weight (``dec_w``, ``ch_w``, laid out as the row tables): 1 for a
    plain adapter, the request's scale, or each member's weight in a mixture (a mixture's slot
    lists its members' rows one after another, adapters/mixture.py), so a scaled or mixed
    request is just more rank rows in the same program.

    DoRA (adapters/dora.py): a slot of a DoRA adapter (or of a scaled or mixed one) has a row
    ``k`` > 0 in the pool's tables ``dora_g[p]`` [layers, K + 1, out] (row 0: ones); ``tok_dora``
    [T] gives each token's (its row's slot's; 0 for padding), and the projection's output (base
    plus delta) is multiplied by it in steps where ``dora_on`` (some row has a DoRA slot).

    Sizes are data, not shape: per projection and view, ``*_bucket[p]`` is, at run time, the
    number of loop iterations of RANK_BLOCK rank rows each (chunks, bgmv) or the number of
    blocks (mbgmv); 0 in both views means nothing on p and no LoRA work at all (``run_output``).
    One program thus serves base-only steps and every mix of ranks and projections. All index
    tables are computed on the host once per step (``DevicePool.ragged_hook``), not per layer.
    """

    a: dict[str, jax.Array]  # proj -> [layers, N, in]
    b: dict[str, jax.Array]  # proj -> [layers, N, out]
    # mbgmv: dec_rows [K_cap, RANK_BLOCK] pool rows of each block, dec_own [K_cap] its decode
    # row (dec_ent unused); bgmv: dec_ent [S, r_max] pool rows of each decode row (dec_rows /
    # dec_own unused)
    dec_rows: dict[str, jax.Array]
    dec_ent: dict[str, jax.Array]
    dec_own: dict[str, jax.Array]
    dec_w: dict[str, jax.Array]  # mbgmv: [K_cap, RANK_BLOCK]; bgmv: [S, r_max] float32
    dec_bucket: dict[str, jax.Array]  # proj -> () int32: mbgmv blocks, bgmv iterations (0: none)
    ch_idx: dict[str, jax.Array]  # proj -> [P, r_max] pool rows of each chunk row
    ch_w: dict[str, jax.Array]  # proj -> [P, r_max] their weights
    ch_bucket: dict[str, jax.Array]  # proj -> () int32: RANK_BLOCK blocks (0: none)
    dora_g: dict[str, jax.Array]  # proj -> [layers, K + 1, out] output scales
    tok_dora: jax.Array  # [T] int32 row of dora_g per token (0: none)
    dora_on: jax.Array  # () bool: some row of the step has a DoRA slot
    # LoRA on the embedding and the LM head (adapters/vocab_pool.py): kind -> the pool's A
    # (embed_tokens: [vocab, n], transposed; lm_head: [n, hidden]) and B ([n, hidden]; [n,
    # vocab]) tables, each slot's weight on each row [slots, n], each token's slot [T], and
    # whether some token of the step has each kind [2]
    vocab_a: dict[str, jax.Array]
    vocab_b: dict[str, jax.Array]
    vocab_w: dict[str, jax.Array]
    tok_slot: jax.Array
    vocab_on: jax.Array
    meta: RaggedMeta
    strategy: str = dataclasses.field(default="mbgmv", metadata=dict(static=True))
    backend: str = dataclasses.field(default="auto", metadata=dict(static=True))

    def _kernels(self, proj: str, layer: jax.Array):
        """(A rows, B rows, the offset of ``layer``'s rows in them, Pallas or None, interpret):
        the pool's layers seen as one flat table of rows, so that a layer (a traced index in
        the forward's scan) is an offset added to the row indices, never a copied slice."""
        a, b = self.a[proj], self.b[proj]
        n = a.shape[1]
        a, b = a.reshape(-1, a.shape[2]), b.reshape(-1, b.shape[2])
        mode = resolve_backend(self.backend, a.shape[1], b.shape[1])
        pk = None
        if mode != "jnp":
            import pallas_kernels as pk
        return a, b, layer * n, pk, mode == "pallas_interpret"

    def chunk_delta(
        self, layer: int, proj: str, x: jax.Array, idx: jax.Array, blocks: jax.Array
    ) -> jax.Array:
        """Delta of the chunk-view rows, gathered from flat x [T, in] -> [P, Q, out]; ``idx``
        [P, r_max] the rows' pool rows, ``blocks`` how many RANK_BLOCK-wide slices of it the
        step needs (0: none)."""
        a, b, off, pk, interpret = self._kernels(proj, layer)
        xc = self.meta.ch_gather(x)
        p, q = xc.shape[:2]
        sizes = jnp.full((p,), q, jnp.int32)
        wts = self.ch_w[proj]

        def block(k, acc):
            rows = jax.lax.dynamic_slice_in_dim(idx, k * RANK_BLOCK, RANK_BLOCK, axis=1) + off
            w = jax.lax.dynamic_slice_in_dim(wts, k * RANK_BLOCK, RANK_BLOCK, axis=1)
            if pk is None:
                return acc + row_lora(xc, a, b, rows, w)
            out = pk.sgmv(xc.reshape(p * q, -1), a, b, rows, sizes, w, interpret=interpret)
            return acc + out.reshape(p, q, -1)

        zero = jnp.zeros((p, q, b.shape[1]), jnp.float32)
        return jax.lax.fori_loop(0, blocks, block, zero).astype(x.dtype)

    def decode_delta(self, layer: int, proj: str, x: jax.Array) -> jax.Array:
        """Delta of the decode-view rows, gathered from flat x [T, in] -> [S, out]."""
        a, b, off, pk, interpret = self._kernels(proj, layer)
        xd = self.meta.dec_gather(x)
        s = xd.shape[0]
        if self.strategy == "bgmv":
            ent = self.dec_ent[proj]  # dec_bucket: RANK_BLOCK-wide slices of each row's rows
            wts = self.dec_w[proj]

            def block(k, acc):
                idx = jax.lax.dynamic_slice_in_dim(ent, k * RANK_BLOCK, RANK_BLOCK, axis=1) + off
                w = jax.lax.dynamic_slice_in_dim(wts, k * RANK_BLOCK, RANK_BLOCK, axis=1)
                if pk is None:
                    return acc + bgmv(xd, a, b, idx, w)
                return acc + pk.bgmv(xd, a, b, idx, w, interpret=interpret)

            zero = jnp.zeros((s, b.shape[1]), jnp.float32)
            return jax.lax.fori_loop(0, self.dec_bucket[proj], block, zero).astype(x.dtype)

        rows, own, k = self.dec_rows[proj], self.dec_own[proj], self.dec_bucket[proj]
        wts = self.dec_w[proj]

        def blocks(size: int, first: jax.Array):
            def body(i, acc):
                at = first + i * size
                br = jax.lax.dynamic_slice_in_dim(rows, at, size) + off
                bo = jax.lax.dynamic_slice_in_dim(own, at, size)
                bw = jax.lax.dynamic_slice_in_dim(wts, at, size)
                if pk is None:
                    return acc + mbgmv_blocks(xd, a, b, br, bo, bw)
                flat_own = jnp.repeat(bo, RANK_BLOCK)
                return acc + pk.mbgmv(xd, a, b, br.reshape(-1), flat_own, bw.reshape(-1),
                                      interpret=interpret)  # fmt: skip

            return body

        # the table holds a multiple of BLOCKS_BIG blocks, so no slice runs past its end
        big = k // BLOCKS_BIG
        small = (k - big * BLOCKS_BIG + BLOCKS_SMALL - 1) // BLOCKS_SMALL
        acc = jnp.zeros((s, b.shape[1]), jnp.float32)
        acc = jax.lax.fori_loop(0, big, blocks(BLOCKS_BIG, jnp.int32(0)), acc)
        acc = jax.lax.fori_loop(0, small, blocks(BLOCKS_SMALL, big * BLOCKS_BIG), acc)
        return acc.astype(x.dtype)

    def output(self, layer: int, proj: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """The projection's output y = x·W with this step's LoRA (and DoRA) applied."""
        if proj not in self.a:
            return y
        return self.run_output(layer, proj, x, y, self.ch_idx[proj])

    def run_output(
        self, layer: int, proj: str, x: jax.Array, y: jax.Array, ch_idx: jax.Array
    ) -> jax.Array:
        """y plus both views' deltas (scattered back to flat [T, out]), times each row's DoRA
        scale in a step with DoRA rows; no work at all (not even the views' gathers) when no
        row of the step has an adapter on ``proj`` (a DoRA slot that does not target ``proj``
        has scale 1 there)."""
        nd, nc = self.dec_bucket[proj], self.ch_bucket[proj]

        width = self.b[proj].shape[2]
        (p, q), s = self.meta.ch_tok.shape, self.meta.dec_tok.shape[0]

        def run():  # each view only where it has rows on proj (a decode-only step, say)
            dc = when(nc > 0, lambda: self.chunk_delta(layer, proj, x, ch_idx, nc),
                      jax.ShapeDtypeStruct((p, q, width), x.dtype))
            dd = when(nd > 0, lambda: self.decode_delta(layer, proj, x),
                      jax.ShapeDtypeStruct((s, width), x.dtype))
            out = y + self.meta.scatter(dd, dc).astype(y.dtype)
            return jax.lax.cond(self.dora_on, lambda: out * self.dora_scale(layer, proj, out),
                                lambda: out)  # fmt: skip

        return jax.lax.cond((nd > 0) | (nc > 0), run, lambda: y)

    def embed(self, tokens: jax.Array, h: jax.Array) -> jax.Array:
        """Embeddings h [T, hidden] of ``tokens`` plus each token's embedding LoRA (its A values
        at the token, times its slot's row weights, through B), in steps that have any."""
        k = "embed_tokens"

        def run():
            w = take(self.vocab_w[k], self.tok_slot)  # [T, n]
            coef = take(self.vocab_a[k], tokens, clip=True).astype(jnp.float32) * w
            return h + jnp.dot(coef, self.vocab_b[k].astype(jnp.float32)).astype(h.dtype)

        return jax.lax.cond(self.vocab_on[0], run, lambda: h)

    def head(self, x: jax.Array, tok: jax.Array, logits: jax.Array) -> jax.Array:
        """float32 ``logits`` [R, vocab] of the normed hidden states x [R, hidden] at flat
        tokens ``tok`` [R] plus their rows' LM-head LoRA, in steps that have any."""
        k = "lm_head"

        def run():
            w = take(self.vocab_w[k], take(self.tok_slot, tok, clip=True))  # [R, n]
            xa = jnp.dot(x.astype(jnp.float32), self.vocab_a[k].astype(jnp.float32).T) * w
            return logits + jnp.dot(xa, self.vocab_b[k].astype(jnp.float32))

        return jax.lax.cond(self.vocab_on[1], run, lambda: logits)

    def dora_scale(self, layer: int, proj: str, like: jax.Array) -> jax.Array:
        """[T, out] each token's DoRA output scale (1 for rows without DoRA): one gather."""
        g = self.dora_g[proj]
        rows = self.tok_dora + layer * g.shape[1]
        return take(g.reshape(-1, g.shape[2]), rows).astype(like.dtype)

