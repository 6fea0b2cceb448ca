"""The compiled write of one layer group of an adapter into the device pool: ``_write_group``
(one program per group size and write width, shared by pools of one shape in a process) and
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


@partial(jax.jit, donate_argnums=0, static_argnames=("dims", "n", "w"))
def _write_group(
    arrays: tuple[jax.Array, ...],
    idx: jax.Array,
    flat: jax.Array,
    *,
    dims: tuple[tuple[int, int], ...],
    n: int,
    w: int,
) -> tuple[jax.Array, ...]:
    """Write one layer group of an adapter into the pool, in place (the arrays are donated).

    ``arrays``: per projection, its n layers' A pools then its n layers' B pools; ``idx``
    [projections, w] the pool rows (row 0, which stays zero, pads); ``flat`` the group's packed
    payload (packed.py). One program per (group size, write width), compiled before serving.
    """
    out, off, k = [], 0, 0
    for p, (din, dout) in enumerate(dims):
        a = flat[off : off + n * w * din].reshape(n, w, din)
        off += n * w * din
        b = flat[off : off + n * w * dout].reshape(n, w, dout)
        off += n * w * dout
        for vals in (a, b):
            for layer in range(n):
                pool = arrays[k]
                out.append(pool.at[idx[p]].set(vals[layer].astype(pool.dtype)))
                k += 1
    return tuple(out)


_COMPILED_WRITES: dict[tuple, object] = {}


class PoolWriter:
    """Write programs of the pool's group sizes and widths (needs the pool's ``a``, ``b``,
    ``projections``, ``groups``, ``layout``, ``dtype``, ``config``, ``_writers``,
    ``_writer_lock``, ``_widths``, ``_writers_warm`` and ``late_compiles``)."""

    def _group_arrays(self, layers: range) -> list[tuple[list, int]]:
        """(pool list, layer) of every array a group's write replaces, in _write_group's order."""
        return [(pools[p], layer) for p in self.projections for pools in (self.a, self.b)
                for layer in layers]  # fmt: skip

    def _writer(self, g: int, width: int):
        """The compiled write of group ``g``'s size at ``width``, compiled (ahead of time, outside
        the pool lock) on first use."""
        n = len(self.groups[g])
        exe = self._writers.get((n, width))
        if exe is not None:
            return exe
        with self._writer_lock:  # warm-up and a registration may ask for the same one
            return self._compile_writer(g, n, width)

    def _compile_writer(self, g: int, n: int, width: int):
        exe = self._writers.get((n, width))
        if exe is None:
            targets = self._group_arrays(self.groups[g])
            arrays = tuple(jax.ShapeDtypeStruct(lst[layer].shape, lst[layer].dtype)
                           for lst, layer in targets)  # fmt: skip
            idx = jax.ShapeDtypeStruct((len(self.projections), width), jnp.int32)
            flat = jax.ShapeDtypeStruct((self.layout.group_elems(g, width),), self.dtype)
            key = (arrays, idx, flat, self.layout.shapes, n, width)
            exe = _COMPILED_WRITES.get(key)  # pools of one shape in a process share them
            if exe is None:
                exe = _write_group.lower(arrays, idx, flat, dims=self.layout.shapes, n=n,
                                         w=width).compile()  # fmt: skip
                _COMPILED_WRITES[key] = exe
                if self._writers_warm:
                    self.late_compiles += 1
                    log.warning("compiled an adapter write (width %d) after start-up", width)
            self._writers[(n, width)] = exe
        return exe

    def ensure_writer(self, width: int) -> int:
        """Compile the group writes of ``width`` (one per group size); returns how many were
        compiled now. Registration calls it, so that a load never waits for a compiler."""
        before = len(self._writers)
        for g in range(len(self.groups)):
            self._writer(g, width)
        return len(self._writers) - before

    def warm_writer(self) -> int:
        """Compile the group writes of every width an adapter up to ``max_rank`` can have (and
        of any adapter prepared so far), so no load or registration waits for a compiler;
        returns how many were compiled now."""
        widths = {write_width(r) for r in range(1, self.config.max_rank + 1)} | self._widths
        n = sum(self.ensure_writer(w) for w in sorted(widths))
        self._writers_warm = True
        return n
