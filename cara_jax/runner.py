"""Model runner: jitted prefill / decode steps over (graphdef, state), bucketed static shapes.

The runner owns the parameters, the KV cache and the per-slot ``SlotState`` (last token, penalty
counts), both donated to every step so they update in place. A decode step reads its inputs
from the SlotState and writes the sampled tokens back, so the host never has to see a token
before launching the next step (it reads them one step late, overlapping host work with the
device through JAX's async dispatch).

Static shapes: prefill is compiled per (batch bucket, length bucket), decode per (rows bucket,
kv-length bucket). ``compiled_count()`` exposes the number of compiled variants so tests can
prove nothing recompiles after warm-up.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cara_jax.adapters.device_pool import DevicePool
from cara_jax.adapters.multi_lora import STRATEGIES
from cara_jax.kv_cache import KVCache
from cara_jax.lora_hooks import LoraHook
from cara_jax.model import DecodeMeta, PrefillMeta
from cara_jax.sampler import SamplingArrays, SlotState, apply_penalties, sample
from cara_jax.weights import LoadedModel


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Capacity and shape buckets of one model runner."""

    num_slots: int = 32
    max_len: int = 2048
    min_prefill_bucket: int = 16
    max_prefill_batch: int = 8
    min_kv_bucket: int = 128
    cache_dtype: str | None = None  # default: the model's dtype

    @property
    def prefill_len_buckets(self) -> tuple[int, ...]:
        return _pow2_buckets(min(self.min_prefill_bucket, self.max_len), self.max_len)

    @property
    def prefill_batch_buckets(self) -> tuple[int, ...]:
        return _pow2_buckets(1, self.max_prefill_batch)

    @property
    def decode_row_buckets(self) -> tuple[int, ...]:
        return _pow2_buckets(1, self.num_slots)

    @property
    def kv_len_buckets(self) -> tuple[int, ...]:
        return _pow2_buckets(min(self.min_kv_bucket, self.max_len), self.max_len)


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= value."""
    i = bisect.bisect_left(buckets, value)
    if i == len(buckets):
        raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


class PromptTooLongError(ValueError):
    """A prompt (plus at least one generated token) does not fit the context."""


def _prefill_step(graphdef, treedef, params, cache, state, tokens, lengths, slots, sampling, hook):
    model = _merge(graphdef, treedef, params)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, cache = model(tokens, positions, cache, PrefillMeta(slots=slots, lengths=lengths), hook)
    last_h = h[jnp.arange(b), lengths - 1]
    logits = model.logits(last_h)
    # fresh penalty state for these slots: no output yet, the prompt counts as seen
    rows = jnp.arange(b)[:, None]
    seen = (
        jnp.zeros((b, logits.shape[-1]), jnp.bool_)
        .at[rows, tokens]
        .max(positions < lengths[:, None])
    )
    counts = jnp.zeros((b, logits.shape[-1]), jnp.int32)
    next_tok = sample(apply_penalties(logits, counts, seen, sampling), sampling, lengths)
    state = SlotState(
        last=state.last.at[slots].set(next_tok, mode="drop"),
        counts=state.counts.at[slots].set(counts.at[jnp.arange(b), next_tok].set(1), mode="drop"),
        seen=state.seen.at[slots].set(seen.at[jnp.arange(b), next_tok].set(True), mode="drop"),
    )
    return logits, next_tok, cache, state


def _decode_step(graphdef, treedef, params, cache, state, positions, sampling, hook, kv_len, rows):
    model = _merge(graphdef, treedef, params)
    tokens = state.last[:rows]
    h, cache = model(
        tokens[:, None], positions[:, None], cache, DecodeMeta(positions, kv_len), hook
    )
    logits = model.logits(h[:, 0])
    counts, seen = state.counts[:rows], state.seen[:rows]
    next_tok = sample(apply_penalties(logits, counts, seen, sampling), sampling, positions + 1)
    live = positions < cache.max_len
    r = jnp.arange(rows)
    state = SlotState(
        last=state.last.at[:rows].set(jnp.where(live, next_tok, tokens)),
        counts=state.counts.at[r, next_tok].add(live.astype(jnp.int32)),
        seen=state.seen.at[r, next_tok].max(live),
    )
    return logits, next_tok, cache, state


def _merge(graphdef, treedef, params):
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, params))


class ModelRunner:
    """Holds parameters and cache; runs bucketed prefill and decode steps."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: RunnerConfig | None = None,
        pool: DevicePool | None = None,
        lora_strategy: str = "bgmv",
    ) -> None:
        if lora_strategy not in STRATEGIES:
            raise ValueError(f"lora_strategy must be one of {STRATEGIES}, not {lora_strategy!r}")
        self.loaded = loaded
        self.pool = pool
        self.lora_strategy = lora_strategy
        self.cfg = loaded.cfg
        self.config = config or RunnerConfig()
        if self.config.max_len > self.cfg.max_position_embeddings:
            self.config = dataclasses.replace(self.config, max_len=self.cfg.max_position_embeddings)
        cache_dtype = jnp.dtype(self.config.cache_dtype or loaded.dtype)
        self.cache = KVCache.allocate(
            self.cfg, self.config.num_slots, self.config.max_len, cache_dtype
        )
        self.state = SlotState.zeros(self.config.num_slots, self.cfg.vocab_size)
        # The graph definition and the state's tree structure are bound here, once: passing
        # them per call would re-hash the module graph on every step (milliseconds of host
        # time per token). Parameters travel as a flat list of arrays.
        self.params, treedef = jax.tree_util.tree_flatten(loaded.state)
        gd = loaded.graphdef
        self._prefill = jax.jit(
            partial(_prefill_step, gd, treedef), donate_argnames=("cache", "state")
        )
        self._decode = jax.jit(
            partial(_decode_step, gd, treedef),
            static_argnames=("kv_len", "rows"),
            donate_argnames=("cache", "state"),
        )

    @property
    def max_len(self) -> int:
        return self.config.max_len

    def check_prompt(self, n_tokens: int) -> None:
        if n_tokens < 1:
            raise PromptTooLongError("the prompt is empty")
        if n_tokens >= self.max_len:
            raise PromptTooLongError(
                f"prompt of {n_tokens} tokens does not fit the context of {self.max_len} "
                "tokens (it needs room for at least one generated token)"
            )

    def prefill(
        self,
        prompts: list[list[int]],
        slots: list[int],
        sampling: SamplingArrays,
        adapters: list[int] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Prefill prompts into their slots (one bucketed call); returns (logits, first tokens).

        ``sampling`` has one row per prompt; ``adapters`` the device-pool adapter slot of each
        prompt (0 = base model). Both outputs have one row per prompt.
        """
        n = len(prompts)
        for p in prompts:
            self.check_prompt(len(p))
        bb = bucket(n, self.config.prefill_batch_buckets)
        tb = bucket(max(len(p) for p in prompts), self.config.prefill_len_buckets)
        tokens = np.zeros((bb, tb), np.int32)
        lengths = np.ones((bb,), np.int32)
        slot_arr = np.full((bb,), self.config.num_slots, np.int32)  # out of range: dropped
        for i, (p, s) in enumerate(zip(prompts, slots, strict=True)):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
            slot_arr[i] = s
        pad = bb - n
        if pad:
            sampling = jax.tree_util.tree_map(
                lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad)]), sampling
            )
        ad = np.zeros((bb,), np.int32)
        if adapters is not None:
            ad[:n] = adapters
        with self._lora(ad, "bgmv") as hook:  # prefill runs the segment kernel either way
            logits, toks, self.cache, self.state = self._prefill(
                self.params, self.cache, self.state,
                jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(slot_arr), sampling, hook,
            )  # fmt: skip
        return logits[:n], toks[:n]

    def decode(
        self,
        positions: np.ndarray,
        sampling: SamplingArrays,
        adapters: np.ndarray | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """One token for slots 0..len(positions)-1 (position < 0 marks an idle slot).

        ``adapters[i]`` is the device-pool adapter slot of decode slot i (0 = base model).

        Inputs come from the device-side last-token vector; returns (logits, tokens) for
        ``rows`` = the decode bucket, rows beyond len(positions) being padding.
        """
        live = positions[positions >= 0]
        if live.size == 0:
            raise ValueError("decode called with no live slot")
        rows = bucket(len(positions), self.config.decode_row_buckets)
        kv_len = bucket(int(live.max()) + 1, self.config.kv_len_buckets)
        pos = np.full((rows,), self.max_len, np.int32)  # idle rows write out of range: dropped
        pos[: len(positions)] = np.where(positions >= 0, positions, self.max_len)
        sampling = _rows(sampling, rows)
        ad = np.zeros((rows,), np.int32)
        if adapters is not None:
            ad[: len(positions)] = np.where(positions >= 0, adapters[: len(positions)], 0)
        with self._lora(ad, self.lora_strategy) as hook:
            logits, toks, self.cache, self.state = self._decode(
                self.params, self.cache, self.state,
                jnp.asarray(pos), sampling, hook, kv_len=kv_len, rows=rows,
            )  # fmt: skip
        return logits, toks

    @contextlib.contextmanager
    def _lora(self, adapters: np.ndarray, strategy: str) -> Iterator[LoraHook | None]:
        """The hook for a batch (None when no row uses an adapter), pool locked while dispatching."""
        if self.pool is None or not adapters.any():
            yield None
            return
        with self.pool.lock:
            yield self.pool.hook(adapters, strategy)

    def compiled_count(self) -> int:
        """Number of compiled step variants so far (flat after warm-up)."""
        return self._prefill._cache_size() + self._decode._cache_size()


def _rows(sampling: SamplingArrays, rows: int) -> SamplingArrays:
    n = sampling.temperature.shape[0]
    if n == rows:
        return sampling
    if n > rows:
        return jax.tree_util.tree_map(lambda a: a[:rows], sampling)
    return jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[:1], rows - n)]), sampling
    )


@partial(jax.jit, static_argnames=("graphdef",))
def _full_logits(graphdef, state, tokens, hook):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = KVCache.allocate(model.cfg, b, t, model.dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    meta = PrefillMeta(slots=jnp.arange(b, dtype=jnp.int32), lengths=jnp.full((b,), t, jnp.int32))
    h, _ = model(tokens, positions, cache, meta, hook)
    return model.logits(h)


def full_logits(loaded: LoadedModel, tokens: np.ndarray, hook: LoraHook | None = None) -> jax.Array:
    """Logits [B, T, V] at every position of equal-length sequences (scoring, parity tests)."""
    return _full_logits(loaded.graphdef, loaded.state, jnp.asarray(tokens, jnp.int32), hook)
