"""LoRA on the token embedding and the LM head in the device pool (PEFT's embed_tokens /
lm_head targets, peft_vocab.py): rank rows of their own, outside the per-layer pool.

These rows are vocabulary-wide (an embedding row of A spans the vocabulary, a head row of B
too: about 200 KB each for SmolLM2 in float32), so they have their own budget,
``PoolConfig.vocab_rows`` per kind, and a step applies them densely over that small table:

- embedding: ``a["embed_tokens"]`` is stored transposed, [vocab, n], so a token's A values are
  one gathered row; token t's delta is ``(A[tok] ⊙ W[t]) · B`` with B [n, hidden];
- LM head: ``a["lm_head"]`` [n, hidden], ``b["lm_head"]`` [n, vocab]; a sampled (or scored)
  row's logits gain ``((x · Aᵀ) ⊙ W[t]) · B``.

``W`` is each slot's weight on each row (``_vocab_w[kind]`` [max_adapters, n]): 1 on an
adapter's own rows, its scale, or each member's weight in a mixture, so scaled and mixed
requests are the same one matmul. Row 0 stays zero. The step gathers W by each token's slot and
runs this only in steps where some row needs it (multi_lora.RaggedLoraHook). ``PoolVocab`` is
mixed into ``DevicePool``.
"""

from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cara_jax.adapters.packed import write_width

log = logging.getLogger("cara_jax.adapters.device_pool")

VOCAB_KINDS = ("embed_tokens", "lm_head")


@partial(jax.jit, donate_argnums=(0, 1), static_argnames=("transposed",))
def _write_rows(a_pool, b_pool, idx, a_rows, b_rows, *, transposed: bool):
    """Rows ``idx`` of a kind's tables set to ``a_rows`` [w, in] / ``b_rows`` [w, out] in place
    (the embedding's A is stored transposed: its rows are columns)."""
    if transposed:
        a_pool = a_pool.at[:, idx].set(a_rows.T.astype(a_pool.dtype))
    else:
        a_pool = a_pool.at[idx].set(a_rows.astype(a_pool.dtype))
    return a_pool, b_pool.at[idx].set(b_rows.astype(b_pool.dtype))


class PoolVocab:
    """Embedding and LM-head LoRA rows (needs the pool's ``cfg``, ``config``, ``dtype``,
    ``lock`` and ``_free_rows``)."""

    def _init_vocab(self) -> None:
        cfg, n = self.cfg, self.config.vocab_rows + 1
        v, hid, dt = cfg.vocab_size, cfg.hidden_size, self.dtype
        self.vocab_a = {"embed_tokens": jnp.zeros((v, n), dt), "lm_head": jnp.zeros((n, hid), dt)}
        self.vocab_b = {"embed_tokens": jnp.zeros((n, hid), dt), "lm_head": jnp.zeros((n, v), dt)}
        for k in VOCAB_KINDS:
            self._free_rows[k] = list(range(n - 1, 0, -1))
        self._vocab_w = {k: np.zeros((self.config.max_adapters, n), np.float32)
                         for k in VOCAB_KINDS}  # fmt: skip
        self._vocab_dev: dict[str, jax.Array] | None = None
        self._vocab_writers: dict[tuple[str, int], object] = {}
        # the base model's row sums of its embedding and head weights [vocab] (set_base_vocab)
        self.base_vocab_sums: dict[str, np.ndarray] | None = None

    def set_base_vocab(self, sums: dict[str, np.ndarray]) -> None:
        """Row sums [vocab] of the base model's embedding and LM head: an adapter that carries
        other weights there (PEFT would load them over the base's) is refused."""
        self.base_vocab_sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}

    def check_vocab(self, adapter, vocab_ranks: dict[str, int]) -> None:
        """ValueError when the pool cannot serve ``adapter``'s embedding / LM-head LoRA, or the
        adapter carries base weights there that are not this base model's."""
        for k, r in vocab_ranks.items():
            if r > self.config.vocab_rows:
                raise ValueError(f"LoRA of rank {r} on {k}, and this pool holds "
                                 f"{self.config.vocab_rows} rows there (vocab_rows)")  # fmt: skip
        sums = getattr(getattr(adapter, "vocab", None), "base_sums", {})
        if sums and self.base_vocab_sums is not None:
            for k, s in sums.items():
                base = self.base_vocab_sums[k]
                tol = 1e-2 * (np.abs(base) + 1.0)  # saved in a lower precision is still the base
                if np.any(np.abs(s - base) > tol):
                    raise ValueError(
                        f"the adapter carries {k} weights that differ from this base model's "
                        "(PEFT would load them over the base's: trained or new tokens); an "
                        "adapter served on a shared base model cannot replace them"
                    )

    def _vocab_writer(self, kind: str, width: int):
        key = (kind, width)
        exe = self._vocab_writers.get(key)
        if exe is None:
            sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
            a, b = self.vocab_a[kind], self.vocab_b[kind]
            din = a.shape[0] if kind == "embed_tokens" else a.shape[1]
            exe = _write_rows.lower(
                sds(a), sds(b), jax.ShapeDtypeStruct((width,), jnp.int32),
                jax.ShapeDtypeStruct((width, din), jnp.float32),
                jax.ShapeDtypeStruct((width, b.shape[1]), jnp.float32),
                transposed=kind == "embed_tokens",
            ).compile()  # fmt: skip
            self._vocab_writers[key] = exe
        return exe

    def ensure_vocab_writer(self, vocab_ranks: dict[str, int]) -> None:
        """Compile the writes an adapter with these ranks needs (at registration, not in a
        load or a step)."""
        for k, r in vocab_ranks.items():
            self._vocab_writer(k, write_width(r))

    def _vocab_take(self, slot: int, rows: dict[str, np.ndarray]) -> None:
        """Weight 1 on the slot's own rows (under the lock)."""
        for k in VOCAB_KINDS:
            self._vocab_w[k][slot] = 0.0
            if k in rows:
                self._vocab_w[k][slot, rows[k]] = 1.0
        self._vocab_dev = None

    def _vocab_mix(self, slot: int, members: list[tuple[int, float]]) -> None:
        """A mixture's (or scaled adapter's) weights: its members' (slot, weight) summed."""
        for k in VOCAB_KINDS:
            self._vocab_w[k][slot] = sum((w * self._vocab_w[k][s] for s, w in members),
                                         np.zeros_like(self._vocab_w[k][slot]))  # fmt: skip
        self._vocab_dev = None

    def _vocab_release(self, slot: int) -> None:
        for k in VOCAB_KINDS:
            self._vocab_w[k][slot] = 0.0
        self._vocab_dev = None

    def _write_vocab(self, rows: dict[str, np.ndarray], vocab: dict) -> None:
        """Copy an adapter's embedding / LM-head rows to the device (the loader thread)."""
        for k, (a, b) in vocab.items():
            r = a.shape[0]
            w = write_width(r)
            idx = np.zeros(w, np.int32)
            idx[:r] = rows[k]
            pa = np.zeros((w, a.shape[1]), np.float32)
            pb = np.zeros((w, b.shape[1]), np.float32)
            pa[:r], pb[:r] = a, b
            write = self._vocab_writer(k, w)
            pa, pb, idx = jax.device_put(pa), jax.device_put(pb), jax.device_put(idx)
            with self.lock:
                self.vocab_a[k], self.vocab_b[k] = write(self.vocab_a[k], self.vocab_b[k],
                                                         idx, pa, pb)  # fmt: skip

    def has_vocab(self, slots) -> bool:
        """Whether any of ``slots`` has embedding or LM-head LoRA (under the lock)."""
        idx = np.asarray(slots, np.int64).reshape(-1)
        return any(bool(self._vocab_w[k][idx].any()) for k in VOCAB_KINDS)

    def vocab_tables(self, slots_of_tokens: np.ndarray) -> tuple[dict, jax.Array, jax.Array]:
        """(kind -> the slots' weight tables on the device, [T] each token's slot, [2] whether
        some token has embedding / LM-head LoRA) for a step (under the lock)."""
        if self._vocab_dev is None:
            self._vocab_dev = {k: jnp.asarray(v) for k, v in self._vocab_w.items()}
        used = np.unique(slots_of_tokens)
        on = [bool(self._vocab_w[k][used].any()) for k in VOCAB_KINDS]
        return self._vocab_dev, jnp.asarray(slots_of_tokens, jnp.int32), jnp.asarray(on)
