"""Model runner: jitted prefill / decode steps over (graphdef, state), bucketed static shapes.

The runner owns the parameters, the KV cache and the per-slot ``SlotState`` (last token, penalty
counts), both donated to every step so they update in place. A decode step reads its inputs
from the SlotState and writes the sampled tokens back, so the host never has to see a token
before launching the next step (it reads them one step late, overlapping host work with the
device through JAX's async dispatch).

Static shapes: a step *variant* is (kind, rows bucket, length bucket, LoRA rank bucket); each is
compiled ahead of time into an executable the runner keeps. ``warmup()`` compiles the whole grid
(or, in the background, compiles a covering variant first and the rest while serving). A step
whose exact variant is not compiled yet runs on the smallest compiled variant that covers it
(more rows, longer length, larger rank bucket: padding that changes no result), so serving never
waits for a compile once the covering variants exist. ``compiled_count()`` and ``hot_compiles``
let tests prove nothing compiles on the hot path after warm-up.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cara_jax.adapters.device_pool import DevicePool
from cara_jax.adapters.multi_lora import STRATEGIES
from cara_jax.cpu_assist import CpuAssistHook
from cara_jax.kv_cache import KVCache
from cara_jax.lora_hooks import PROJECTIONS, LoraHook
from cara_jax.model import DecodeMeta, PrefillMeta
from cara_jax.sampler import SamplingArrays, SlotState, apply_penalties, sample
from cara_jax.weights import LoadedModel

log = logging.getLogger(__name__)


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
    # LoRA rank buckets of the bgmv (decode) and segment (prefill) kernels, capped at the
    # pool's max rank (which is always a bucket). Fewer buckets: fewer variants to compile,
    # more padding work; each bucket multiplies the variant grid.
    rank_buckets: tuple[int, ...] = (16, 64)
    cpu_assist: bool = False  # also compile CPU-assisted prefill variants (at the max rank bucket)

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


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled step shape. ``lora`` is the rank bucket; 0 = no LoRA hook at all."""

    kind: str  # "prefill" | "decode"
    rows: int  # batch bucket
    length: int  # prompt-length bucket (prefill) or kv-length bucket (decode)
    lora: int
    cpu: bool = False  # CPU-assisted prefill (host callbacks for cold adapters' deltas)

    def covers(self, other: Variant) -> bool:
        return (
            self.kind == other.kind
            and self.rows >= other.rows
            and self.length >= other.length
            and self.lora >= other.lora
            and self.cpu >= other.cpu
        )

    @property
    def cost(self) -> tuple[int, int]:
        return (self.rows * self.length, self.lora)


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
        self._exe: dict[Variant, jax.stages.Compiled] = {}
        self._compile_lock = threading.Lock()
        self._warmup_thread: threading.Thread | None = None
        self.hot_compiles = 0  # variants compiled on the hot path (a step waited for them)
        self.fallbacks = 0  # steps run on a larger covering variant
        self.skipped_compiles = 0  # variants warm-up left out (memory-map budget)
        self._maps_per_variant = 2000  # memory maps one compiled variant adds (measured)

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
        cpu_plan: tuple[np.ndarray, int] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Prefill prompts into their slots (one bucketed call); returns (logits, first tokens).

        ``sampling`` has one row per prompt; ``adapters`` the device-pool adapter slot of each
        prompt (0 = base model). Both outputs have one row per prompt. ``cpu_plan`` =
        (dev_adapter [layers, prompts], registered plan id) runs a CPU-assisted prefill (see
        cpu_assist.py).
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
        if cpu_plan is None:
            want = Variant("prefill", bb, tb, self._lora_bucket(ad, "bgmv"))
        else:
            want = Variant("prefill", bb, tb, self.lora_buckets("bgmv")[-1], cpu=True)
        v, exe = self._executable(want)
        if v.rows > bb or v.length > tb:
            tokens = np.pad(tokens, ((0, v.rows - bb), (0, v.length - tb)))
            lengths = np.pad(lengths, (0, v.rows - bb), constant_values=1)
            slot_arr = np.pad(slot_arr, (0, v.rows - bb), constant_values=self.config.num_slots)
            ad = np.pad(ad, (0, v.rows - bb))
            sampling = _rows(sampling, v.rows)
        cpu = None
        if v.cpu:
            dev, plan_id = cpu_plan if cpu_plan is not None else (ad[None, :n], 0)
            dev_ad = np.zeros((self.cfg.num_layers, v.rows), np.int32)
            dev_ad[:, : dev.shape[1]] = dev
            if cpu_plan is None:
                dev_ad[:] = ad
            cpu = (dev_ad, plan_id)
        with self._lora(ad, "bgmv", v.lora, cpu) as hook:  # prefill runs the segment kernel
            logits, toks, self.cache, self.state = exe(
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
        ad = np.zeros((len(positions),), np.int32)
        if adapters is not None:
            ad[:] = np.where(positions >= 0, adapters[: len(positions)], 0)
        v, exe = self._executable(
            Variant("decode", rows, kv_len, self._lora_bucket(ad, self.lora_strategy))
        )
        rows = v.rows
        pos = np.full((rows,), self.max_len, np.int32)  # idle rows write out of range: dropped
        pos[: len(positions)] = np.where(positions >= 0, positions, self.max_len)
        sampling = _rows(sampling, rows)
        ad = np.pad(ad, (0, rows - len(ad)))
        with self._lora(ad, self.lora_strategy, v.lora) as hook:
            logits, toks, self.cache, self.state = exe(
                self.params, self.cache, self.state, jnp.asarray(pos), sampling, hook
            )
        return logits, toks

    # ------------------------------------------------------------------ LoRA hooks

    def lora_buckets(self, strategy: str) -> tuple[int, ...]:
        """Rank buckets of a kernel strategy (bgmv/segment: max rank; mbgmv: summed rank)."""
        if self.pool is None:
            return ()
        mx = self.pool.config.max_rank
        if strategy == "mbgmv":
            out, b = [], 64
            while b < self.config.num_slots * mx:
                out.append(b)
                b *= 4
            return (*out, self.config.num_slots * mx)
        return tuple(sorted({r for r in self.config.rank_buckets if r < mx} | {mx}))

    def _lora_bucket(self, adapters: np.ndarray, strategy: str) -> int:
        if self.pool is None or not adapters.any():
            return 0
        mx, total = self.pool.batch_ranks(adapters)
        return bucket(max(1, total if strategy == "mbgmv" else mx), self.lora_buckets(strategy))

    @contextlib.contextmanager
    def _lora(
        self,
        adapters: np.ndarray,
        strategy: str,
        rank_bucket: int,
        cpu: tuple[np.ndarray, int] | None = None,
    ) -> Iterator[LoraHook | None]:
        """The hook of a batch (None for variants without LoRA), pool locked while dispatching."""
        if self.pool is None or rank_bucket == 0:
            yield None
            return
        with self.pool.lock:
            hook = self.pool.hook(adapters, strategy, rank_bucket=rank_bucket)
            if cpu is not None:
                hook = self._cpu_hook(hook, *cpu)
            yield hook

    def _cpu_hook(self, inner, dev_adapter: np.ndarray, plan_id: int) -> CpuAssistHook:
        shapes = self.cfg.projection_shapes()
        return CpuAssistHook(
            inner=inner,
            dev_adapter=jnp.asarray(dev_adapter, jnp.int32),
            plan_id=jnp.asarray(plan_id, jnp.int32),
            out_sizes=tuple((p, shapes[p][1]) for p in PROJECTIONS),
        )

    # ------------------------------------------------------------------ compiled variants

    def variants(self) -> list[Variant]:
        """The whole grid, in warm-up order: decode before prefill, small shapes first."""
        c = self.config
        out = []
        for kind, rows_b, len_b, strategy in (
            ("decode", c.decode_row_buckets, c.kv_len_buckets, self.lora_strategy),
            ("prefill", c.prefill_batch_buckets, c.prefill_len_buckets, "bgmv"),
        ):
            loras = (0, *self.lora_buckets(strategy))
            grid = [Variant(kind, r, n, lo) for n in len_b for r in rows_b for lo in loras]
            if kind == "prefill" and c.cpu_assist and self.pool is not None:
                grid += [Variant(kind, r, n, loras[-1], cpu=True) for n in len_b for r in rows_b]
            out += sorted(grid, key=lambda v: v.cost)
        return out

    def covering_variants(self) -> list[Variant]:
        """The largest variant of each kind: together they can run every step."""
        vs = self.variants()
        return [
            max((v for v in vs if v.kind == k), key=lambda v: (v.cost, v.cpu))
            for k in ("decode", "prefill")
        ]

    def _abstract(self, v: Variant) -> tuple[tuple, dict]:
        """Argument shapes of a variant (abstract: lowering reads no buffer, donated or not)."""
        sds = partial(jax.tree_util.tree_map, lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype))
        hook = None
        if v.lora:
            strategy = self.lora_strategy if v.kind == "decode" else "bgmv"
            zeros = np.zeros(v.rows, np.int32)
            with self.pool.lock:
                hook = self.pool.hook(zeros, strategy, rank_bucket=v.lora)
            if v.cpu:
                hook = self._cpu_hook(hook, np.zeros((self.cfg.num_layers, v.rows), np.int32), 0)
            hook = sds(hook)
        sampling = sds(SamplingArrays.greedy(v.rows))
        i32 = partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
        head = (sds(self.params), sds(self.cache), sds(self.state))
        if v.kind == "prefill":
            rows = (i32((v.rows, v.length)), i32((v.rows,)), i32((v.rows,)))
            return (*head, *rows, sampling, hook), {}
        return (*head, i32((v.rows,)), sampling, hook), {"kv_len": v.length, "rows": v.rows}

    def compile(self, v: Variant, force: bool = False) -> jax.stages.Compiled:
        """Compile one variant (idempotent; safe from a background thread).

        Raises ``CompileBudgetError`` (unless ``force``) when the process is too close to the
        kernel's limit on memory maps: XLA:CPU's JIT maps ~2,000 regions per step variant of a
        30-layer model, and past ``vm.max_map_count`` (65,530 by default) LLVM aborts the
        whole process. A step then runs on a compiled variant that covers it.
        """
        with self._compile_lock:
            exe = self._exe.get(v)
            if exe is None:
                before = map_count()
                if not force and before is not None:
                    need = max(4000, 3 * self._maps_per_variant)
                    if max_map_count() - before < need:
                        raise CompileBudgetError(
                            f"not compiling {v}: {before} memory maps in use, limit "
                            f"{max_map_count()} (vm.max_map_count); each variant adds "
                            f"~{self._maps_per_variant}"
                        )
                args, static = self._abstract(v)
                fn = self._prefill if v.kind == "prefill" else self._decode
                exe = self._exe[v] = fn.lower(*args, **static).compile()
                after = map_count()
                if before is not None and after is not None and len(self._exe) > 1:
                    # the first compile also maps the compiler's one-time state: not counted
                    self._maps_per_variant = int(
                        0.7 * self._maps_per_variant + 0.3 * (after - before)
                    )
            return exe

    def _executable(self, v: Variant) -> tuple[Variant, jax.stages.Compiled]:
        exe = self._exe.get(v)
        if exe is not None:
            return v, exe
        covers = [w for w in list(self._exe) if w.covers(v)]
        if covers:
            self.fallbacks += 1
            w = min(covers, key=lambda w: w.cost)
            return w, self._exe[w]
        self.hot_compiles += 1
        log.debug("compiling %s on the hot path", v)
        return v, self.compile(v, force=True)  # nothing covers it: no choice

    def warmup(self, background: bool = False, progress: bool = False) -> None:
        """Compile every variant. ``background``: compile the covering variants now (so any
        step can run) and the rest in a thread while serving."""
        covering = self.covering_variants()
        for v in covering:  # first: with them compiled, every step can run
            self.compile(v, force=True)
        todo = [v for v in self.variants() if v not in covering]
        if background:
            self._warmup_thread = threading.Thread(
                target=self._compile_all, args=(todo,), name="cara-compile", daemon=True
            )
            self._warmup_thread.start()
            return
        if progress:
            from tqdm import tqdm

            todo = tqdm(todo, desc="compiling step variants", unit="variant")
        self._compile_all(todo)

    def _compile_all(self, todo) -> None:
        for v in todo:
            try:
                self.compile(v)
            except CompileBudgetError as e:
                self.skipped_compiles = len(self.variants()) - len(self._exe)
                log.warning("warm-up stopped with %d variants left: %s (their steps run on a "
                            "larger compiled variant)", self.skipped_compiles, e)  # fmt: skip
                return

    def wait_warmup(self, timeout: float | None = None) -> None:
        if self._warmup_thread is not None:
            self._warmup_thread.join(timeout)

    def compiled_count(self) -> int:
        """Number of compiled step variants so far (flat after warm-up)."""
        return len(self._exe)


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


class CompileBudgetError(RuntimeError):
    """Compiling one more variant could exhaust the process's memory maps (see compile)."""


def max_map_count() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 1 << 31


def map_count() -> int | None:
    """Memory maps of this process now (None where /proc is not there)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None
