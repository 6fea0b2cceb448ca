"""Scaled and mixed adapters in the device pool (adapters/mixture.py says what they mean): a
mixture is a slot of its own whose table lists its members' rows one after another, each with
its weight, holding one reference on each member. ``PoolMixtures`` is mixed into ``DevicePool``.
"""

from __future__ import annotations

import numpy as np

from cara_jax.adapters.packed import PackedAdapter
from cara_jax.adapters.peft import LoraAdapter
from cara_jax.adapters.pool_load import LoadHandle, MixHandle, _Entry


class PoolFullError(RuntimeError):
    """The adapter cannot fit: every resident adapter is in use or pinned."""


class PoolMixtures:
    """``acquire_mix`` and its tables (needs the pool's ``lock``, ``stats``, ``_entries``,
    ``acquire``, ``release``, ``handle_of``, ``_make_room``, ``_free_slots``, the slot tables,
    ``groups``, ``config``, ``projections`` and the DoRA and vocabulary rows)."""

    def acquire_mix(
        self, key: str, members: list[tuple[LoraAdapter | PackedAdapter, float]]
    ) -> MixHandle:
        """Hold the mixture ``key`` (its members at their weights), acquiring each member
        (starting their loads) and giving the mixture a slot whose rows are theirs; until
        ``release``. ValueError when a projection's summed rank exceeds max_rank."""
        with self.lock:
            e = self._entries.get(key)
            if e is not None:
                self.stats.hits += 1
                e.refcount += 1
                self._entries.move_to_end(key)
                return e.handle
        held: list[str] = []
        handles: list[LoadHandle] = []
        try:
            for adapter, _ in members:
                handles.append(self.acquire(adapter))
                held.append(adapter.content_hash)
            with self.lock:
                e = self._entries.get(key)
                if e is not None:  # another thread made it meanwhile
                    for h in held:
                        self.release(h)
                    e.refcount += 1
                    return e.handle
                if any(h not in self._entries for h in held):  # a member's load failed already
                    raise PoolFullError("a member of the mixture was dropped (its load failed)")
                tables, ranks = self._mix_tables(members)
                dora = self._mix_dora(held)
                self._make_room({}, dora=dora is not None)
                slot = self._free_slots.pop()
                if dora is not None:
                    self._dora_take(slot, *dora)
                self._vocab_mix(slot, [(self._entries[a.content_hash].slot, float(w))
                                       for a, w in members])  # fmt: skip
                self.stats.misses += 1
                for p in self.projections:
                    rows, wts = tables[p]
                    self._slot_rows[p][slot] = 0
                    self._slot_w[p][slot] = 1.0
                    self._slot_rows[p][slot, : len(rows)] = rows
                    self._slot_w[p][slot, : len(rows)] = wts
                    self._slot_rank[p][slot] = len(rows)
                self._mix_slots.add(slot)
                self._table_dev = None
                handle = MixHandle(key, handles, self.groups)
                packed = PackedAdapter(key, ranks, [], "mixture")
                self._entries[key] = _Entry(packed, slot, {}, handle, 1, members=tuple(held))
                return handle
        except BaseException:
            for h, handle in zip(held, handles, strict=False):
                if self.handle_of(h) is handle:  # still the entry this reference was taken on
                    self.release(h)
            raise

    def _mix_tables(self, members) -> tuple[dict, dict[str, int]]:
        """Per projection, (pool rows, weights) of a mixture's slot: each member's rows in turn."""
        tables, ranks = {}, {}
        for p in self.projections:
            rows, wts = [], []
            for adapter, w in members:
                r = self._entries[adapter.content_hash].rows.get(p)
                if r is not None:
                    rows.extend(int(x) for x in r)
                    wts.extend([float(w)] * len(r))
            if len(rows) > self.config.max_rank:
                raise ValueError(f"the mixture's summed rank on {p} is {len(rows)}, over the "
                                 f"pool's max_rank {self.config.max_rank}")  # fmt: skip
            tables[p] = (np.asarray(rows, np.int32), np.asarray(wts, np.float32))
            if rows:
                ranks[p] = len(rows)
        return tables, ranks

    def _mix_dora(self, held: list[str]) -> tuple[dict, dict, bool] | None:
        """A mixture's DoRA (dora.py): one member at a scale keeps its magnitudes; several
        take ‖W‖ on every module any of them has; None without DoRA members."""
        packed = [self._entries[h].adapter for h in held]
        dora = [p.dora for p in packed]
        if not any(dora):
            return None
        if not all(dora):
            raise ValueError("a mixture of DoRA and plain LoRA adapters is not served")
        if len(packed) == 1:
            return packed[0].magnitudes, packed[0].dora_layers, False
        layers: dict[str, set[int]] = {}
        for p in packed:
            for q, ls in p.dora_layers.items():
                layers.setdefault(q, set()).update(ls)
        return {}, {q: sorted(v) for q, v in layers.items()}, True
