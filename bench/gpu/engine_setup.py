"""Shared setup of the GPU check's engine sections (bench/gpu/sections.py): the
Llama-2-7B-shaped model with random weights (``CARA_GPU_CHECK_LAYERS`` of its 32 layers), random
PEFT adapters, pool sizes, compiled programs shared between engines, and serving a batch.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.gpu.ctx import Ctx
from cara_jax.adapters.device_pool import PoolConfig
from cara_jax.adapters.random_peft import write_random_peft
from cara_jax.config import ModelConfig
from cara_jax.engine import Engine, RequestRecord
from cara_jax.engine.runner import Program, bucket
from cara_jax.sampling_params import SamplingParams
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import LoadedModel, build_model

LAYERS_ENV = "CARA_GPU_CHECK_LAYERS"
FULL_LAYERS = 32
DEFAULT_LAYERS = 8
RANKS = (16, 64)
RUN_TIMEOUT_S = 600.0  # one served batch that takes longer than this is a hang, not a result
GRACE_S = 60.0  # a batch still running this long after the deadline is aborted (the call's limit)


# ------------------------------------------------------------------------------ shared setup


def model_config(smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=16,
                           max_position_embeddings=4096, name="tiny-random")  # fmt: skip
    layers = int(os.environ.get(LAYERS_ENV, DEFAULT_LAYERS))
    if not 1 <= layers <= FULL_LAYERS:
        raise ValueError(f"{LAYERS_ENV}={layers}: expected 1-{FULL_LAYERS}")
    return ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=layers, num_heads=32, num_kv_heads=32, head_dim=128,
                       max_position_embeddings=4096, name="llama-2-7b-shaped-random")  # fmt: skip


def _layers_label(cfg: ModelConfig, smoke: bool) -> str:
    return f"{cfg.num_layers}" if smoke else f"{cfg.num_layers}/{FULL_LAYERS}"


def _dtype(smoke: bool) -> jnp.dtype:
    return jnp.dtype(jnp.float32 if smoke or jax.default_backend() != "gpu" else jnp.bfloat16)


_MODELS: dict[tuple, LoadedModel] = {}


def random_model(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> LoadedModel:
    """Random weights: kernels N(0, 1/fan_in), embeddings N(0, 1), norms 1. Built once per
    (config, dtype); generated on the device unless tiny (7B in numpy would take minutes)."""
    key = (cfg, jnp.dtype(dtype).name, seed)
    if key in _MODELS:
        return _MODELS[key]
    from flax import nnx

    from cara_jax.model import Llama

    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    on_host = cfg.num_params() < 50_000_000  # tiny: numpy, no per-shape compiles
    rng, np_rng = jax.random.key(seed), np.random.default_rng(seed)
    flat = {}
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    for i, (path, leaf) in enumerate(leaves):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        shape = leaf.shape
        per_layer = shape[1:] if name.startswith("layers.") else shape  # stacked: [layers, ...]
        if len(per_layer) == 1:
            flat[name] = np.ones(shape, np.float32)
            continue
        scale = 1.0 if name == "embed_tokens" else per_layer[0] ** -0.5
        if on_host:
            flat[name] = (np_rng.standard_normal(shape, np.float32) * scale).astype(np.float32)
        else:
            w = jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)
            flat[name] = w * jnp.asarray(scale, dtype)
    loaded = build_model(cfg, flat, dtype)
    _MODELS[key] = loaded
    return loaded


def id_tokenizer(vocab: int) -> Tokenizer:
    """A word-level tokenizer over ids ("t0".."tN"): prompts are token ids, so only the engine's
    streaming detokenization uses it (a real per-token host cost, like a BPE's)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    return Tokenizer(Backend(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")))


class AdapterSet:
    """Random PEFT adapters (all seven projections) written once per model config, shared by the
    sections; ``names(rank, n)`` writes what is missing. Removed when the process exits."""

    _sets: dict[ModelConfig, AdapterSet] = {}

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._tmp = tempfile.TemporaryDirectory(prefix="cara-gpu-check-")
        self.paths: dict[str, Path] = {}
        self.ranks: dict[str, int] = {}

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> AdapterSet:
        if cfg not in cls._sets:
            cls._sets[cfg] = cls(cfg)
        return cls._sets[cfg]

    def names(self, rank: int, n: int) -> list[str]:
        out = [f"r{rank}_{i}" for i in range(n)]
        for i, name in enumerate(out):
            if name not in self.paths:
                path = Path(self._tmp.name) / name
                write_random_peft(path, self.cfg, rank, seed=1000 * rank + i)
                self.paths[name], self.ranks[name] = path, rank
        return out

    def nbytes(self, names: list[str]) -> int:
        return sum((self.paths[n] / "adapter_model.safetensors").stat().st_size for n in names)


def pool_config(cfg: ModelConfig, dtype: jnp.dtype, ranks: list[int]) -> PoolConfig:
    """Room for every listed adapter at once (``cached`` pins them all)."""
    per_row = sum(i + o for i, o in cfg.projection_shapes().values()) * cfg.num_layers
    rows = sum(ranks) + max(RANKS) + 1
    return PoolConfig(budget_bytes=rows * per_row * jnp.dtype(dtype).itemsize,
                      max_adapters=len(ranks) + 4, max_rank=max(RANKS))  # fmt: skip


@dataclasses.dataclass
class CompiledSteps:
    """A runner's compiled programs, kept after its engine is closed so a later engine of the
    same runner and pool shapes and LoRA strategy reuses them: compiled steps take params, cache,
    state and the LoRA pool as arguments, so nothing in them belongs to one engine (the runner
    keeps them in its executable table)."""

    key: tuple
    table: dict

    @staticmethod
    def _key(eng: Engine) -> tuple:
        r = eng.runner
        shape = dataclasses.replace(r.config, cpu_assist=False)
        return (shape, eng.pool.config, id(r.params[0]), r.lora_strategy)

    @classmethod
    def of(cls, eng: Engine) -> CompiledSteps:
        return cls(cls._key(eng), dict(getattr(eng.runner, "_exe", {})))

    def give(self, eng: Engine) -> int:
        """Hand ``eng`` these programs if its shapes and LoRA strategy match (every program
        carries the LoRA ops of its strategy; the base model runs the same programs)."""
        table = getattr(eng.runner, "_exe", None)
        if self._key(eng) != self.key or not isinstance(table, dict):
            return 0
        cpu = eng.runner.config.cpu_assist  # CPU-assisted programs only where they can run
        picked = {p: exe for p, exe in self.table.items() if cpu or not p.cpu}
        table.update(picked)
        return len(picked)


def _past(ctx: Ctx) -> bool:
    return time.perf_counter() > ctx.deadline


def serve(eng: Engine, requests: list[tuple[list[int], str | None]], sp: SamplingParams,
          tag: str, until: float = float("inf")) -> list[RequestRecord]:  # fmt: skip
    """Add the requests at once, step until all are done; their records, in request order.
    Past ``until`` (perf_counter) or RUN_TIMEOUT_S, abort them: a hang, not a result."""
    ids = [eng.add_request(p, sp, a, request_id=f"{tag}{i}") for i, (p, a) in enumerate(requests)]
    t_end = min(time.perf_counter() + RUN_TIMEOUT_S, until)
    while eng.has_unfinished():
        eng.step()
        if time.perf_counter() > t_end:
            for rid in ids:
                eng.abort(rid)
            raise TimeoutError(f"requests {tag}* not done in time (engine hung?)")
    recs = {r.request_id: r for r in eng.finished_requests if r.request_id.startswith(tag)}
    return [recs[rid] for rid in ids]


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length).tolist() for _ in range(n)]


def _compile(eng: Engine, programs: list[Program]) -> None:
    for p in programs:
        eng.runner.compile(p)


def _programs(eng: Engine, tokens: list[int], cpu_tokens: list[int] = ()) -> list[Program]:
    """The engine's programs of the token buckets that steps of ``tokens`` tokens run, and the
    CPU-assisted programs of ``cpu_tokens`` (where the engine has them)."""
    tb = eng.runner.config.token_buckets
    want = {bucket(min(n, tb[-1]), tb) for n in tokens}
    want_cpu = {bucket(min(n, tb[-1]), tb) for n in cpu_tokens}
    return [p for p in eng.runner.programs() if p.tokens in (want_cpu if p.cpu else want)]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _needs_gpu(ctx: Ctx) -> list[dict] | None:
    if ctx.smoke or jax.default_backend() == "gpu":
        return None
    return [{"note": "skipped: 7B shapes need a GPU (--smoke runs tiny shapes anywhere)"}]
