"""Pallas grouped-LoRA kernels (GPU via the Triton lowering; the Pallas interpreter on CPU).

Each kernel has the argument layout of its jnp reference in cara_jax.adapters.multi_lora, and
its own reference next to it. See docs/pallas_kernels.md.
"""

from pallas_kernels.bgmv import bgmv, bgmv_ref
from pallas_kernels.common import available, supports
from pallas_kernels.mbgmv import (
    mbgmv,
    mbgmv_blocks_ref,
    mbgmv_ref,
    mbgmv_segments,
    segments_from_owner,
)
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.sgmv import sgmv, sgmv_ref

__all__ = [
    "available", "bgmv", "bgmv_ref", "mbgmv", "mbgmv_blocks_ref", "mbgmv_ref", "mbgmv_segments",
    "paged_attention", "segments_from_owner", "sgmv", "sgmv_ref", "supports",
]  # fmt: skip
