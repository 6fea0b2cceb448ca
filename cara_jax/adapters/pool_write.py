"""The compiled write of one projection of one layer group of an adapter into the device pool:
``_write_projection`` (one program per group size, projection shape and write width, shared by
pools of one shape in a process; each write touches only its projection's two arrays, so the
writes of one group do not wait for each other, only for the step in flight) and
``PoolWriter``, mixed into ``DevicePool``, which compiles them before serving (device_pool.py;
pool_load.py runs them).
"""

from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp

from cara_jax.adapters.packed import write_width

log = logging.getLogger("cara_jax.adapters.device_pool")  # the pool's logger, whichever module logs


@partial(jax.jit, donate_argnums=(0, 1), static_argnames=("din", "dout", "n", "w"))
def _write_projection(
    a_pool: jax.Array,
    b_pool: jax.Array,
    first: jax.Array,
    idx: jax.Array,
    flat: jax.Array,
    *,
    din: int,
    dout: int,
    n: int,
    w: int,
) -> tuple[jax.Array, jax.Array]:
    """Write one projection of one layer group of an adapter into the pool, in place (the
    arrays are donated).

    ``a_pool`` / ``b_pool``: the projection's rows of every layer [layers, N, in] / [layers, N,
    out]; the group is layers ``first`` .. ``first + n - 1``; ``idx`` [w] the pool rows (row 0,
    which stays zero, pads); ``flat`` that projection's part of the group's packed payload
    (packed.py). One program per (group size, in, out, write width): a handful of shape
    classes (SmolLM2: four) times six widths, compiled before serving.
    """
    a = flat[: n * w * din].reshape(n, w, din)
    b = flat[n * w * din :].reshape(n, w, dout)
    layers = (first + jnp.arange(n, dtype=jnp.int32))[:, None]
    return (a_pool.at[layers, idx[None, :]].set(a.astype(a_pool.dtype)),
            b_pool.at[layers, idx[None, :]].set(b.astype(b_pool.dtype)))  # fmt: skip


_COMPILED_WRITES: dict[tuple, object] = {}


class PoolWriter:
    """Write programs of the pool's group sizes, projection shapes and widths (needs the pool's
    ``a``, ``b``, ``projections``, ``groups``, ``layout``, ``dtype``, ``config``, ``_writers``,
    ``_writer_lock``, ``_widths``, ``_writers_warm`` and ``late_compiles``)."""

    def _writer(self, g: int, p: str, width: int):
        """The compiled write of projection ``p`` for group ``g``'s size at ``width``, compiled
        (ahead of time, outside the pool lock) on first use."""
        din, dout = self.layout.shape_of(p)
        key = (len(self.groups[g]), din, dout, width)
        exe = self._writers.get(key)
        if exe is not None:
            return exe
        with self._writer_lock:  # warm-up and a registration may ask for the same one
            return self._compile_writer(g, p, key)

    def _compile_writer(self, g: int, p: str, key: tuple[int, int, int, int]):
        exe = self._writers.get(key)
        if exe is None:
            n, din, dout, width = key
            arrays = tuple(jax.ShapeDtypeStruct(x[p].shape, x[p].dtype) for x in (self.a, self.b))
            first = jax.ShapeDtypeStruct((), jnp.int32)
            idx = jax.ShapeDtypeStruct((width,), jnp.int32)
            flat = jax.ShapeDtypeStruct((n * width * (din + dout),), self.dtype)
            shared = (arrays, idx, flat, key)
            exe = _COMPILED_WRITES.get(shared)  # pools of one shape in a process share them
            if exe is None:
                exe = _write_projection.lower(*arrays, first, idx, flat, din=din, dout=dout, n=n,
                                              w=width).compile()  # fmt: skip
                _COMPILED_WRITES[shared] = exe
                if self._writers_warm:
                    self.late_compiles += 1
                    log.warning("compiled an adapter write (width %d) after start-up", width)
            self._writers[key] = exe
        return exe

    def ensure_writer(self, widths: dict[str, int]) -> int:
        """Compile the writes an adapter of these widths (per projection) needs, one per group
        size; returns how many were compiled now. Registration calls it, so that a load never
        waits for a compiler."""
        before = len(self._writers)
        for g in range(len(self.groups)):
            for p, w in widths.items():
                self._writer(g, p, w)
        return len(self._writers) - before

    def warm_writer(self) -> int:
        """Compile the writes of every width an adapter up to ``max_rank`` can have, on every
        projection shape (and of any adapter prepared so far), so no load or registration
        waits for a compiler; returns how many were compiled now."""
        widths = {write_width(r) for r in range(1, self.config.max_rank + 1)} | self._widths
        n = 0
        for w in sorted(widths):
            n += self.ensure_writer({p: w for p in self.projections})
        self._writers_warm = True
        return n
