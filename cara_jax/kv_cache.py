"""KV cache for continuous batching: one contiguous row per decode slot.

Layout: per layer, K and V arrays of shape [num_slots, kv_heads, max_len, head_dim] (head-major,
so a decode step reads each head's keys contiguously without transposing the cache). A running
sequence owns one slot for its lifetime; prefill writes positions [0, len) of its slot and every
decode step writes one position. Why slots rather than paged blocks (see docs/kv_cache.md):
- XLA has no paged-attention primitive on CPU; a page-table gather would copy every sequence's KV
  each step, while a slot row is read in place by a static slice [:n_rows, :kv_len];
- the decode batch is "slots 0..n-1" with n bucketed, slots handed out lowest-first so live rows
  stay packed at the front, and kv_len bucketed to the longest live sequence: the step reads only
  what it needs and compiles once per (n, kv_len) bucket;
- the cost is memory reserved per slot (max_len tokens each), bounded by num_slots x max_len.
"""

from __future__ import annotations

import dataclasses
import heapq

import jax
import jax.numpy as jnp

from cara_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer key/value buffers, donated to and returned by every jitted step."""

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def num_slots(self) -> int:
        return int(self.k[0].shape[0])

    @property
    def max_len(self) -> int:
        return int(self.k[0].shape[2])

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, num_slots: int, max_len: int, dtype: jnp.dtype = jnp.float32
    ) -> KVCache:
        shape = (num_slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        )

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.k + self.v)


class NoFreeSlotError(RuntimeError):
    """Every decode slot is taken."""


class SlotAllocator:
    """Hands out the lowest free slot, so live rows stay packed at the front of the cache."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        self._used: set[int] = set()

    def alloc(self) -> int:
        if not self._free:
            raise NoFreeSlotError(f"all {self.num_slots} slots are in use")
        s = heapq.heappop(self._free)
        self._used.add(s)
        return s

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def high_water(self) -> int:
        """1 + the highest slot in use (0 when empty): the decode rows a step must cover."""
        return max(self._used) + 1 if self._used else 0
