"""Shared pieces of the grouped-LoRA Pallas kernels: tile choice, the call wrapper, poisoning.

All kernels target the Pallas Triton lowering on GPU (see docs/pallas_kernels.md) and run through
the Pallas interpreter on CPU. Triton wants every loaded or stored tensor to have a power-of-two
size, so tiles are powers of two that divide the model dims, and index tables are padded with
row 0 (the pool's zero row) to a power-of-two width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Elements of one program's main tile (e.g. 16 rank rows x 512 columns). Large enough for
# wide vector loads, small enough to stay in registers with 4 warps.
TILE_ELEMS = 8192
MIN_TILE = 16  # Triton dots need >= 16 in every dim; narrower tiles waste the load width


def triton_params(num_warps: int = 4, num_stages: int = 2):
    """Compiler params that select the Triton lowering of ``pallas_call`` (None if gone)."""
    try:
        from jax.experimental.pallas import triton as plt
    except ImportError:  # a future JAX without the Triton backend
        return None
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def available() -> bool:
    """Whether this JAX still ships the Pallas Triton backend the kernels are written for."""
    return triton_params() is not None


def pow2_tile(dim: int, cap: int) -> int:
    """Largest power of two <= cap dividing dim, so tiles never need masks."""
    t = 1
    while t * 2 <= cap and dim % (t * 2) == 0:
        t *= 2
    return t


def next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def supports(*dims: int) -> bool:
    """Whether every feature dim splits into power-of-two tiles of at least MIN_TILE."""
    return all(d % MIN_TILE == 0 for d in dims)


def check_dims(**dims: int) -> None:
    bad = {k: v for k, v in dims.items() if v % MIN_TILE}
    if bad:
        raise ValueError(f"Pallas LoRA kernels need feature dims divisible by {MIN_TILE}: {bad}")


def take(a: jax.Array, idx: jax.Array, clip: bool = False) -> jax.Array:
    """a[idx] along axis 0 for an index array of any shape, as one plain gather.

    jnp indexing also emits the arithmetic that wraps negative indices, per call; in an engine
    step that gathers thousands of times (views, pool rows, pages) that made a third of the
    program. Indices here are never negative: in range, or (``clip``) clamped to the last row."""
    mode = jax.lax.GatherScatterMode.CLIP if clip else jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
    dnums = jax.lax.GatherDimensionNumbers(
        offset_dims=tuple(range(idx.ndim, idx.ndim + a.ndim - 1)),
        collapsed_slice_dims=(0,),
        start_index_map=(0,),
    )
    return jax.lax.gather(a, idx[..., None], dnums, (1, *a.shape[1:]), mode=mode)


def pad_cols(idx: jax.Array, width: int) -> jax.Array:
    """Pad an index table's last dim with row 0 (the pool's zero row)."""
    extra = width - idx.shape[-1]
    if extra <= 0:
        return idx
    return jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, extra)])


def f32(v: jax.Array) -> jax.Array:
    return v.astype(jnp.float32)


def call(
    kernel: Callable[..., None],
    args: Sequence[jax.Array],
    in_specs: Sequence[pl.BlockSpec],
    out_shape: jax.ShapeDtypeStruct,
    out_spec: pl.BlockSpec,
    grid: tuple[int, ...],
    *,
    interpret: bool,
    poison: bool,
    name: str,
    num_warps: int = 4,
) -> jax.Array:
    """pallas_call with one output; ``poison`` aliases the output onto a NaN-filled buffer.

    Poisoning makes an element the kernel forgot to write show up as NaN, on GPU as well as in
    the interpreter (which would otherwise start from its own fill value).
    """
    n_in = len(args)
    aliases: dict[int, int] = {}
    if poison:
        args = [*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype)]
        in_specs = [*in_specs, out_spec]
        aliases = {n_in: 0}

        def body(*refs):
            kernel(*refs[:n_in], refs[-1])  # refs[n_in] is the aliased poison input

    else:
        body = kernel
    return pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=grid,
        in_specs=list(in_specs),
        out_specs=out_spec,
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=None if interpret else triton_params(num_warps),
        name=name,
    )(*args)


def whole(shape: tuple[int, ...]) -> pl.BlockSpec:
    """The whole array as one block: pools and index tables that kernels gather from."""
    zeros = (0,) * len(shape)
    return pl.BlockSpec(shape, lambda *_: zeros)
