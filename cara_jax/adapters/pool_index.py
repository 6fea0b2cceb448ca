"""The step's index tables over the device pool: which pool rows each row of a step reads, per
projection and view, computed on the host once per step (multi_lora.py says what the hooks do
with them). ``PoolIndex`` is mixed into ``DevicePool``: it reads the pool's slot tables under the
pool's lock and builds nothing on the device but the small index arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cara_jax.adapters.multi_lora import BLOCKS_BIG, RANK_BLOCK, MultiLoraHook, RaggedLoraHook
from cara_jax.ragged import RaggedMeta


class PoolIndex:
    """Index tables and hooks of a step (needs the pool's ``a``, ``b``, ``lock``, ``config``,
    ``projections``, ``_slot_rows``, ``_slot_rank``, ``_slot_w``, ``_mix_slots``, ``_table_dev``
    and the DoRA rows of dora.py)."""

    def _table(self) -> tuple[dict, dict]:
        if self._table_dev is None:
            self._table_dev = (
                {p: jnp.asarray(v) for p, v in self._slot_rows.items()},
                {p: jnp.asarray(v) for p, v in self._slot_rank.items()},
            )
        return self._table_dev

    def batch_ranks(self, slots: np.ndarray) -> tuple[int, int]:
        """(max rank, max over projections of the summed rank) of the adapters in ``slots``."""
        with self.lock:
            ranks = np.stack([self._slot_rank[p][slots] for p in self.projections])
        return int(ranks.max(initial=0)), int(ranks.sum(axis=1).max(initial=0))

    def hook(
        self,
        slots: np.ndarray,
        strategy: str = "bgmv",
        rank_bucket: int | None = None,
        backend: str = "auto",
    ) -> MultiLoraHook:
        """A hook for a batch whose row i uses adapter slot ``slots[i]`` (0 = none).

        ``backend`` picks the kernels (multi_lora.BACKENDS): "auto" runs the Pallas kernels on
        GPU and the jnp references elsewhere. Call and dispatch the step while holding
        ``pool.lock``: a concurrent load donates the pool arrays it updates.
        """
        with self.lock:
            used = {int(s) for s in np.asarray(slots).reshape(-1)}
            if self._mix_slots & used or set(self._dora_of) & used or self.has_vocab(sorted(used)):
                raise ValueError("the dense hook has no per-row weights, DoRA scales or "
                                 "embedding / LM-head LoRA: scaled, mixed, DoRA and such "
                                 "adapters are served by the engine step only")  # fmt: skip
        if rank_bucket is None:
            mx, total = self.batch_ranks(slots)
            rank_bucket = rank_bucket_for(total if strategy == "mbgmv" else mx)
        rows, rank = self._table()
        return MultiLoraHook(
            a=dict(self.a),
            b=dict(self.b),
            slot_rows=rows,
            slot_rank=rank,
            adapter=jnp.asarray(slots, jnp.int32),
            strategy=strategy,
            rank_bucket=rank_bucket,
            backend=backend,
        )

    def row_index(self, proj: str, slots: np.ndarray, r: int) -> np.ndarray:
        """[len(slots), r] pool rows of each slot's adapter on ``proj`` (row 0 pads)."""
        out = np.zeros((len(slots), r), np.int32)
        with self.lock:
            cols = min(r, self.config.max_rank)
            out[:, :cols] = self._slot_rows[proj][slots, :cols]
        return out

    def row_weights(self, proj: str, slots: np.ndarray, r: int) -> np.ndarray:
        """[len(slots), r] the weight of each of those rows (1 but in scaled or mixed slots)."""
        out = np.ones((len(slots), r), np.float32)
        with self.lock:
            cols = min(r, self.config.max_rank)
            out[:, :cols] = self._slot_w[proj][slots, :cols]
        return out

    def step_blocks(
        self, proj: str, slots: np.ndarray, capacity: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """MBGMV's tables for decode rows using ``slots`` on ``proj``: (rows [capacity,
        RANK_BLOCK] the pool rows of each block, a block holding up to RANK_BLOCK rank rows of
        one decode row, each row at its own rank; own [capacity] the decode row of each block;
        weights [capacity, RANK_BLOCK] of those rows; the number of blocks). A row's blocks are contiguous, and rows on the same adapter are
        adjacent, so an adapter's pool rows are read from memory once per step and again only
        from cache. Padding: row 0 (zeros), owned by 0."""
        rows = np.zeros((capacity, RANK_BLOCK), np.int32)
        own = np.zeros(capacity, np.int32)
        wts = np.ones((capacity, RANK_BLOCK), np.float32)
        n = 0
        with self.lock:
            table, rank, weight = self._slot_rows[proj], self._slot_rank[proj], self._slot_w[proj]
            for i in np.argsort(slots, kind="stable"):
                r = int(rank[slots[i]])
                k = -(-r // RANK_BLOCK)
                if k == 0:
                    continue
                if n + k > capacity:
                    raise ValueError(f"{n + k} LoRA blocks exceed the table's {capacity}")
                flat = np.zeros(k * RANK_BLOCK, np.int32)
                flat[:r] = table[slots[i], :r]
                rows[n : n + k] = flat.reshape(k, RANK_BLOCK)
                flat_w = np.ones(k * RANK_BLOCK, np.float32)
                flat_w[:r] = weight[slots[i], :r]
                wts[n : n + k] = flat_w.reshape(k, RANK_BLOCK)
                own[n : n + k] = i
                n += k
        return rows, own, wts, n

    def ragged_hook(
        self,
        dec_slots: np.ndarray,
        ch_slots: np.ndarray,
        meta: RaggedMeta,
        strategy: str = "mbgmv",
        backend: str = "auto",
        tokens: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> RaggedLoraHook:
        """The hook of one engine step (ragged.py): decode row i uses adapter slot
        ``dec_slots[i]``, chunk row j ``ch_slots[j]`` (0 = none). Per projection and view, the
        bucket and the index tables are computed here, once per step (multi_lora.RaggedLoraHook
        says what they hold); mbgmv's block table has room for every decode row at max_rank.
        ``tokens``: the host's (dec_tok [S], ch_tok [P, Q]) of ``meta``, which place each
        row's DoRA scale on its tokens (needed when a row has a DoRA slot).
        Call and dispatch under ``pool.lock``, as for ``hook``."""
        dec_slots, ch_slots = np.asarray(dec_slots), np.asarray(ch_slots)
        width = self.index_width()
        dec_rows, dec_ent, dec_own, dec_w, dec_b = {}, {}, {}, {}, {}
        ch_idx, ch_w, ch_b = {}, {}, {}
        none = jnp.zeros((1,), jnp.int32)
        dec_dora, ch_dora = self.dora_rows(dec_slots), self.dora_rows(ch_slots)
        dora_on = bool(dec_dora.any() or ch_dora.any())
        tok_dora = np.zeros(meta.num_tokens, np.int32)
        if dora_on:
            if tokens is None:
                raise ValueError("a step with DoRA rows needs the host's token layout")
            tok_dora = token_rows(meta.num_tokens, *tokens, dec_dora, ch_dora)
        capacity = -(-len(dec_slots) * width // RANK_BLOCK // BLOCKS_BIG) * BLOCKS_BIG
        tok_slot = np.zeros(meta.num_tokens, np.int32)
        if tokens is not None:
            tok_slot = token_rows(meta.num_tokens, *tokens, dec_slots, ch_slots)
        with self.lock:
            vocab_w, tok_slot_dev, vocab_on = self.vocab_tables(tok_slot)
            if tokens is None and self.has_vocab(np.concatenate([dec_slots, ch_slots])):
                raise ValueError("a step with embedding / LM-head LoRA needs the token layout")
            # a step without a mixture's slot weighs every row 1: one cached device array per
            # shape stands for its weight tables (nothing built or copied per step)
            mixed = bool(self._mix_slots.intersection(dec_slots.tolist() + ch_slots.tolist()))
            for p in self.a:
                rank = self._slot_rank[p]
                if strategy == "mbgmv":
                    rows, own, wts, n = self.step_blocks(p, dec_slots, capacity)
                    dec_rows[p], dec_own[p] = jnp.asarray(rows), jnp.asarray(own)
                    dec_w[p] = jnp.asarray(wts) if mixed else _ones(wts.shape)
                    dec_ent[p] = none
                    dec_b[p] = jnp.asarray(n, jnp.int32)
                else:
                    dec_ent[p] = jnp.asarray(self.row_index(p, dec_slots, width))
                    dec_w[p] = (jnp.asarray(self.row_weights(p, dec_slots, width)) if mixed
                                else _ones((len(dec_slots), width)))  # fmt: skip
                    dec_rows[p] = dec_own[p] = none
                    dec_b[p] = jnp.asarray(rank_blocks(rank[dec_slots]), jnp.int32)
                ch_idx[p] = jnp.asarray(self.row_index(p, ch_slots, width))
                ch_w[p] = (jnp.asarray(self.row_weights(p, ch_slots, width)) if mixed
                           else _ones((len(ch_slots), width)))  # fmt: skip
                ch_b[p] = jnp.asarray(rank_blocks(rank[ch_slots]), jnp.int32)
        return RaggedLoraHook(
            a=dict(self.a),
            b=dict(self.b),
            dec_rows=dec_rows, dec_ent=dec_ent, dec_own=dec_own, dec_w=dec_w, dec_bucket=dec_b,
            ch_idx=ch_idx, ch_w=ch_w, ch_bucket=ch_b, meta=meta, strategy=strategy,
            backend=backend, dora_g=dict(self.dora_g),
            tok_dora=jnp.asarray(tok_dora), dora_on=jnp.asarray(dora_on),
            vocab_a=dict(self.vocab_a), vocab_b=dict(self.vocab_b), vocab_w=vocab_w,
            tok_slot=tok_slot_dev, vocab_on=vocab_on,
        )  # fmt: skip

    def index_width(self) -> int:
        """Columns of the per-row index tables: max_rank rounded up to whole RANK_BLOCKs."""
        return -(-self.config.max_rank // RANK_BLOCK) * RANK_BLOCK



_ONES: dict[tuple[int, ...], jax.Array] = {}


def _ones(shape: tuple[int, ...]) -> jax.Array:
    """A device array of float32 ones, one per shape, shared by every step that needs it."""
    a = _ONES.get(shape)
    if a is None:
        a = _ONES.setdefault(shape, jnp.ones(shape, jnp.float32))
    return a


def token_rows(
    t: int, dec_tok: np.ndarray, ch_tok: np.ndarray, dec: np.ndarray, ch: np.ndarray
) -> np.ndarray:
    """[t] each token's value of its row (``dec`` per decode row, ``ch`` per chunk row; 0 for
    padding), from the step's layout (ragged.py: indices >= t place nothing)."""
    out = np.zeros(t + 1, np.int32)  # index t: where padding rows point
    dec_tok, ch_tok = np.minimum(dec_tok, t), np.minimum(ch_tok, t)
    out[dec_tok[: len(dec)]] = dec
    out[ch_tok[: len(ch)]] = np.asarray(ch)[:, None]
    return out[:t]


def rank_blocks(ranks: np.ndarray) -> int:
    """RANK_BLOCK-wide iterations that cover the largest of ``ranks`` (0: none)."""
    return -(-int(np.max(ranks, initial=0)) // RANK_BLOCK)


def rank_bucket_for(r: int) -> int:
    """Power-of-two bucket (min 8) so the number of compiled variants stays small."""
    b = 8
    while b < r:
        b *= 2
    return b
