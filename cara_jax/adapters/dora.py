"""DoRA in the device pool: a per-slot output scale on each projection of each layer.

PEFT's DoRA (``use_dora``; Liu et al., 2024) splits an adapted weight into a direction and a
magnitude: a projection's output is

    y = g ⊙ (x·W + x·ΔW),    g = m / ‖W + ΔW‖_c

where ΔW is the LoRA update (scaling folded in), ``m`` the adapter's magnitude vector and
‖·‖_c the norm of each output's column over the inputs (PEFT treats it as a constant). So a
DoRA row costs a plain LoRA row plus one multiply of the output; only ``g`` needs the base
weight, and it depends on nothing but the slot: it is computed once, on the device, when a
DoRA slot is first used (its loads done), from the slot's own pool rows and weights.

What a request's scale and mixture mean, following PEFT:
- an adapter at scale s is PEFT's adapter with B scaled by s: ΔW → s·ΔW, m kept (so s = 0
  gives m/‖W‖ ⊙ x·W, not the base model);
- a mixture of DoRA adapters is what PEFT's ``add_weighted_adapter(..., "cat")`` builds: ΔW =
  Σ wᵢ·ΔWᵢ and magnitude ‖W‖_c (the merged adapter's magnitude is initialised while its B is
  zero, and the merge rewrites only A and B), so ``g = ‖W‖/‖W + ΣwᵢΔWᵢ‖``;
- a mixture of DoRA and plain adapters is refused: PEFT's result depends on the order of the
  list (the merged adapter is DoRA if the first one is).

The pool keeps ``g`` in tables ``dora_g[p]`` [layers, K + 1, out] (row 0 all ones, rows 1..K
for K DoRA slots, ``PoolConfig.dora_slots``); the step gathers each row's (multi_lora.py).
``PoolDora`` is mixed into ``DevicePool``.
"""

from __future__ import annotations

import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("cara_jax.adapters.device_pool")

BLOCK = 16  # rank rows per iteration of the update's loop (one program for every rank)


def _norms(w, a_l, b_l, rows, wts, blocks):
    """(‖W + ΔW‖, ‖W‖) per output column for ΔW = (wts·a[rows])ᵀ·b[rows], in O(rank·out)
    memory: ‖W‖² + 2·Σ b ⊙ (a·W) + Σ b ⊙ ((a·aᵀ)·b), block by block (never an [in, out]
    temporary beside W: on a large model that is hundreds of MB per projection)."""
    f32 = jnp.float32
    out = w.shape[1]

    def block(i):
        r = jax.lax.dynamic_slice_in_dim(rows, i * BLOCK, BLOCK)
        s = jax.lax.dynamic_slice_in_dim(wts, i * BLOCK, BLOCK)
        return a_l[r].astype(f32) * s[:, None], b_l[r].astype(f32)

    def outer(i, acc):
        ai, bi = block(i)
        aw = jnp.dot(ai, w.astype(f32))  # [BLOCK, out]

        def inner(j, acc2):
            aj, bj = block(j)
            return acc2 + jnp.sum(bi * ((ai @ aj.T) @ bj), axis=0)

        gram = jax.lax.fori_loop(0, blocks, inner, jnp.zeros(out, f32))
        return acc + 2.0 * jnp.sum(bi * aw, axis=0) + gram

    base = jnp.sum(jnp.square(w.astype(f32)), axis=0)
    sq = base + jax.lax.fori_loop(0, blocks, outer, jnp.zeros(out, f32))
    return jnp.sqrt(jnp.maximum(sq, 0.0)), jnp.sqrt(base)


@jax.jit
def _set_scales(g, k, base, a, b, rows, wts, blocks, mag, mask, from_base):
    """``g`` with row ``k`` set, for each projection p and layer l, to m / ‖W + ΔW‖ (ΔW from
    the slot's pool rows ``rows`` at weights ``wts``) where ``mask[p][l]``, else to 1; m is
    ``mag[p][l]`` or, where ``from_base``, ‖W‖ (a mixture's). Not donated: a failed update
    leaves the tables as they were. One loop over the layers per projection (base, pool and
    tables are stacked [layers, ...])."""
    out = {}
    for p, tab in g.items():

        def one(xs, p=p, width=tab.shape[2]):
            w, a_l, b_l, m, on = xs

            def scale():
                norm, wnorm = _norms(w, a_l, b_l, rows[p], wts[p], blocks[p])
                return jnp.where(from_base, wnorm, m) / norm

            return jax.lax.cond(on, scale, lambda: jnp.ones(width, jnp.float32))

        new = jax.lax.map(one, (base[p], a[p], b[p], mag[p], mask[p]))  # [layers, out]
        out[p] = tab.at[:, k].set(new.astype(tab.dtype))
    return out


class PoolDora:
    """DoRA rows of the pool (needs its ``cfg``, ``config``, ``projections``, ``a``, ``b``,
    ``lock``, ``_slot_rows``, ``_slot_w``, ``_slot_rank``)."""

    def _init_dora(self) -> None:
        shapes = self.cfg.projection_shapes()
        k = self.config.dora_slots
        n = self.cfg.num_layers
        self.dora_g = {p: jnp.ones((n, k + 1, shapes[p][1]), jnp.float32)
                       for p in self.projections}  # fmt: skip
        self._free_dora = list(range(k, 0, -1))
        self._dora_of: dict[int, int] = {}  # pool slot -> its row of dora_g
        # slots whose row is still to compute: (magnitudes per projection, layers per
        # projection, whether m is ‖W‖)
        self._dora_todo: dict[int, tuple[dict, dict, bool]] = {}
        self.base_kernels: dict[str, jax.Array] | None = None
        self._dora_exe = None
        self._dora_compile = threading.Lock()

    def set_base_kernels(self, kernels: dict[str, jax.Array]) -> None:
        """The base model's [layers, in, out] kernels per projection (what ‖W + ΔW‖ reads)."""
        self.base_kernels = {p: kernels[p] for p in self.projections}

    def _dora_take(self, slot: int, mags: dict, layers: dict, from_base: bool) -> None:
        """Give ``slot`` a DoRA row (under the lock; the caller made room)."""
        k = self._free_dora.pop()
        self._dora_of[slot] = k
        self._dora_todo[slot] = (mags, layers, from_base)

    def _dora_release(self, slot: int) -> None:
        k = self._dora_of.pop(slot, None)
        self._dora_todo.pop(slot, None)
        if k is not None:
            self._free_dora.append(k)

    def dora_rows(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's row of ``dora_g`` (0: none), computing rows still to compute first."""
        with self.lock:
            out = np.array([self._dora_of.get(int(s), 0) for s in slots], np.int32)
            for s in {int(s) for s in slots} & set(self._dora_todo):
                self._compute_dora(s)
        return out

    def _compute_dora(self, slot: int) -> None:
        if self.base_kernels is None:
            raise RuntimeError("a DoRA adapter needs the base kernels (set_base_kernels)")
        mags, layers, from_base = self._dora_todo[slot]
        shapes = self.cfg.projection_shapes()
        n = self.cfg.num_layers
        width = -(-self.config.max_rank // BLOCK) * BLOCK
        rows, wts, blocks, mag, mask = {}, {}, {}, {}, {}
        for p in self.projections:
            r = int(self._slot_rank[p][slot])
            rows[p] = np.zeros(width, np.int32)
            rows[p][:r] = self._slot_rows[p][slot, :r]
            wts[p] = np.zeros(width, np.float32)
            wts[p][:r] = self._slot_w[p][slot, :r]
            blocks[p] = np.int32(-(-r // BLOCK))
            mask[p] = np.zeros(n, bool)
            mask[p][list(layers.get(p, []))] = True
            mag[p] = np.asarray(mags[p], np.float32) if p in mags else np.zeros(
                (n, shapes[p][1]), np.float32)
        args = (self.base_kernels, self.a, self.b, rows, wts, blocks, mag, mask,
                np.bool_(from_base))  # fmt: skip
        exe = self._dora_program()
        self.dora_g = exe(self.dora_g, np.int32(self._dora_of[slot]), *args)
        del self._dora_todo[slot]  # only once the update is dispatched: a failure retries

    def _dora_program(self):
        """The compiled update (one per pool shape; compiled when a DoRA adapter registers)."""
        with self._dora_compile:
            if self._dora_exe is None:
                self._dora_exe = self._lower_dora().compile()
        return self._dora_exe

    def _lower_dora(self):
        """The update lowered for this pool's shapes."""
        sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)  # noqa: E731
        shapes = self.cfg.projection_shapes()
        n = self.cfg.num_layers
        width = -(-self.config.max_rank // BLOCK) * BLOCK
        spec = (
            self.dora_g, np.int32(0), self.base_kernels, self.a, self.b,
            {p: np.zeros(width, np.int32) for p in self.projections},
            {p: np.zeros(width, np.float32) for p in self.projections},
            {p: np.int32(0) for p in self.projections},
            {p: np.zeros((n, shapes[p][1]), np.float32) for p in self.projections},
            {p: np.zeros(n, bool) for p in self.projections}, np.bool_(False),
        )  # fmt: skip
        return _set_scales.lower(*sds(spec))

    def ensure_dora_program(self) -> None:
        """Compile the update now (registration of a DoRA adapter), not in a step's path, and
        outside the pool's lock (steps dispatch under it): it only needs shapes."""
        if self.base_kernels is not None:
            self._dora_program()
