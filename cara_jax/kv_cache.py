"""Paged KV cache: the device arrays. Which sequence owns which page is the block manager's
business (engine/block_manager.py); the model only sees pages through block tables.

Layout: K and V arrays of shape [layers, num_pages * block_size, kv_heads, head_dim]. A
token's keys go to row ``page * block_size + offset`` of each layer (its slot mapping);
attention reads a sequence's pages through its block table (attention.py). The layers are one
array so that the forward's scan over layers carries the cache and updates it in place. Page 0 is never handed out: padding
entries of block tables point at it, so a padded read stays in bounds and is masked.

Why pages rather than one row of max_len per sequence: memory is taken as a sequence grows and
returned the moment it ends, so capacity is set in bytes, long and short requests share it, and
a 3,000-token prompt fits beside many short ones in the memory that once held 8 x 512 slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cara_jax.config import ModelConfig
from cara_jax.ragged import DROP


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Key/value pages of every layer, donated to and returned by every jitted step."""

    k: jax.Array  # [layers, num_pages * block_size, kv_heads, head_dim]
    v: jax.Array

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, num_pages: int, block_size: int, dtype: jnp.dtype = jnp.float32
    ) -> KVCache:
        shape = (cfg.num_layers, num_pages * block_size, cfg.num_kv_heads, cfg.head_dim)
        # a layer's slots are offset into one flat index space, whose end marks dropped writes
        assert shape[0] * shape[1] < DROP, "KV cache too large for int32 slot indices"
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    def nbytes(self) -> int:
        return int(self.k.nbytes) + int(self.v.nbytes)


def bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype) -> int:
    """KV bytes one token takes over all layers (K and V)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
