"""Several adapters as one trainable pytree: the pool-row layout of the device pool, in JAX arrays
a training step differentiates.

``LoraSet`` holds the static side (which pool rows each adapter owns, per projection) and
``params`` the trainable side, ``{"a": {proj: [per layer [N, in]]}, "b": {proj: [... [N, out]]}}``
with row 0 zero. ``hook(params, slots)`` gives the model (``Llama.dense``) a MultiLoraHook whose
row i runs adapter ``slots[i]`` (1-based; 0 = the base model), so one step trains or scores
every adapter of the set at once: the base weights are read once for all of them, and the
grouped op's backward scatters each row's gradient into its own adapter's rows only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cara_jax.adapters.multi_lora import MultiLoraHook
from cara_jax.adapters.peft import LoraAdapter, LoraModule
from cara_jax.adapters.trees import adapter_from_tree, adapter_tree
from cara_jax.config import ModelConfig

Params = dict[str, dict[str, list[jax.Array]]]


# identity-hashed (eq=False), so a set can be a static argument of jax.jit
@dataclasses.dataclass(frozen=True, eq=False)
class LoraSet:
    cfg: ModelConfig
    projections: tuple[str, ...]
    # adapter k (slot k + 1): the rank of each (layer, projection) it has
    modules: tuple[dict[tuple[int, str], int], ...]
    slot_rows: dict[str, np.ndarray]  # proj -> [K + 1, R] pool rows of each slot (0 pads)
    slot_rank: dict[str, np.ndarray]  # proj -> [K + 1]

    @property
    def ranks(self) -> tuple[dict[str, int], ...]:
        """Adapter k's rows on each projection: its largest rank there over the layers."""
        out = []
        for mods in self.modules:
            d: dict[str, int] = {}
            for (_, p), r in mods.items():
                d[p] = max(d.get(p, 0), r)
            out.append(d)
        return tuple(out)

    @property
    def max_rank(self) -> int:
        return max((r for m in self.modules for r in m.values()), default=0)

    @classmethod
    def layout(cls, cfg: ModelConfig, modules: Sequence[dict[tuple[int, str], int]]) -> LoraSet:
        """Pool rows for adapters with the given (layer, projection) -> rank, packed one after
        another from row 1 (row 0 is the zero row); an adapter takes its largest rank on a
        projection in every layer (the rows of layers it lacks stay zero)."""
        shapes = cfg.projection_shapes()
        for mods in modules:
            bad = sorted({p for _, p in mods if p not in shapes})
            if bad:
                raise ValueError(f"unknown projections {bad}; the model has {sorted(shapes)}")
        probe = cls(cfg, (), tuple(dict(m) for m in modules), {}, {})
        ranks = probe.ranks
        projs = tuple(p for p in shapes if any(d.get(p, 0) for d in ranks))
        width = max((r for d in ranks for r in d.values()), default=1)
        rows, rank = {}, {}
        for p in projs:
            rows[p] = np.zeros((len(ranks) + 1, width), np.int32)
            rank[p] = np.zeros((len(ranks) + 1,), np.int32)
            nxt = 1
            for k, d in enumerate(ranks, start=1):
                r = d.get(p, 0)
                rows[p][k, :r] = np.arange(nxt, nxt + r)
                rank[p][k] = r
                nxt += r
        return cls(cfg, projs, probe.modules, rows, rank)

    def num_rows(self, proj: str) -> int:
        return 1 + int(self.slot_rank[proj].sum())

    @classmethod
    def from_adapters(
        cls, cfg: ModelConfig, adapters: Sequence[LoraAdapter], dtype=jnp.float32
    ) -> tuple[LoraSet, Params]:
        """The set and its params from host adapters (PEFT folders, trees): slot k + 1 is
        adapters[k]. An adapter's rank on a projection is its largest over the layers; layers
        it does not target (or target at a lower rank) hold zero rows, which get no gradient."""
        if any(ad.dora or ad.vocab.modules for ad in adapters):
            raise ValueError("DoRA adapters and LoRA on the embedding or the LM head are served "
                             "by the engine step, not by a LoraSet")  # fmt: skip
        s = cls.layout(cfg, [{k: m.rank for k, m in ad.modules.items()} for ad in adapters])
        shapes = cfg.projection_shapes()
        a = {p: np.zeros((cfg.num_layers, s.num_rows(p), shapes[p][0]), np.float32)
             for p in s.projections}  # fmt: skip
        b = {p: np.zeros((cfg.num_layers, s.num_rows(p), shapes[p][1]), np.float32)
             for p in s.projections}  # fmt: skip
        for k, ad in enumerate(adapters, start=1):
            for (layer, p), m in ad.modules.items():
                rows = s.slot_rows[p][k, : m.rank]
                a[p][layer, rows] = np.asarray(m.a).T
                b[p][layer, rows] = np.asarray(m.b)
        return s, s._params(a, b, dtype)

    @classmethod
    def init(
        cls, cfg: ModelConfig, n: int, rank: int, targets: Sequence[str], key: jax.Array,
        dtype=jnp.float32,
    ) -> tuple[LoraSet, Params]:  # fmt: skip
        """``n`` new adapters of rank ``rank`` on ``targets`` in every layer, initialised as PEFT
        does: A uniform in ±1/sqrt(in) (Kaiming with a = sqrt(5)), B zero, so each starts as
        the base model."""
        every = {(layer, p): rank for layer in range(cfg.num_layers) for p in targets}
        s = cls.layout(cfg, [every] * n)
        shapes = cfg.projection_shapes()
        a, b = {}, {}
        for i, p in enumerate(s.projections):
            din, dout = shapes[p]
            bound = 1.0 / math.sqrt(din)
            k = jax.random.fold_in(key, i)
            rows = jax.random.uniform(k, (cfg.num_layers, s.num_rows(p), din), jnp.float32,
                                      -bound, bound)  # fmt: skip
            a[p] = np.asarray(rows.at[:, 0].set(0.0))
            b[p] = np.zeros((cfg.num_layers, s.num_rows(p), dout), np.float32)
        return s, s._params(a, b, dtype)

    def _params(self, a: dict, b: dict, dtype) -> Params:
        return {
            "a": {p: [jnp.asarray(v[i], dtype) for i in range(len(v))] for p, v in a.items()},
            "b": {p: [jnp.asarray(v[i], dtype) for i in range(len(v))] for p, v in b.items()},
        }

    def hook(self, params: Params, slots, *, backend: str = "auto") -> MultiLoraHook:
        """The model hook for a batch whose row i runs slot ``slots[i]`` (0: no adapter)."""
        r = max(self.max_rank, 1)
        return MultiLoraHook(
            a=params["a"], b=params["b"],
            slot_rows={p: jnp.asarray(v) for p, v in self.slot_rows.items()},
            slot_rank={p: jnp.asarray(v) for p, v in self.slot_rank.items()},
            adapter=jnp.asarray(slots, jnp.int32), strategy="bgmv", rank_bucket=r,
            backend=backend,
        )  # fmt: skip

    def adapter(self, params: Params, k: int, name: str = "<memory>") -> LoraAdapter:
        """Adapter k (0-based) back in host form, e.g. for ``save_peft_adapter`` or
        ``Engine.load_adapter(weights=...)``."""
        modules = {}
        for (layer, p), r in sorted(self.modules[k].items()):  # the modules it has, at its ranks
            rows = self.slot_rows[p][k + 1, :r]
            a = np.asarray(params["a"][p][layer], np.float32)[rows].T
            b = np.asarray(params["b"][p][layer], np.float32)[rows]
            modules[(layer, p)] = LoraModule(a=a, b=b)
        shapes = self.cfg.projection_shapes()
        tree = adapter_tree(LoraAdapter(path=name, content_hash="", modules=modules,
                                        projection_shapes=shapes))  # fmt: skip
        return adapter_from_tree(tree, self.cfg, name=name)
