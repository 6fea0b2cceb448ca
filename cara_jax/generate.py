"""Offline batch generation on an Engine: the smoke-test path (``cara-jax generate``, benches).

Every prompt is queued on the engine and ``Engine.step()`` runs until none is left, so prompts
go through the same token-budget steps as served requests (chunked prefill, then decode; more
prompts than ``max_num_seqs`` simply wait their turn). ``offline_engine`` sizes the KV cache for
exactly the prompts at hand instead of the engine's share of RAM, and ``compile_for_prompts``
compiles only the programs one run of them dispatches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from cara_jax.engine import Engine, EngineConfig
from cara_jax.engine.runner import Program, bucket
from cara_jax.kv_cache import bytes_per_token
from cara_jax.sampling_params import SamplingParams
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import LoadedModel


@dataclasses.dataclass
class GenOutput:
    token_ids: list[int]  # generated tokens; a stop token ends the output but is not part of it
    finish_reason: str | None  # "stop" | "length" (| "abort" | "error")
    text: str = ""


def kv_cache_bytes(
    loaded: LoadedModel, max_model_len: int, num_seqs: int, block_size: int = 16
) -> int:
    """KV-cache bytes that hold ``num_seqs`` sequences of ``max_model_len`` tokens at once
    (plus the reserved page 0)."""
    pages = num_seqs * -(-max_model_len // block_size) + 1
    return pages * block_size * bytes_per_token(loaded.cfg, loaded.dtype)


def offline_engine(
    loaded: LoadedModel,
    tokenizer: Tokenizer,
    max_model_len: int | None = None,
    num_seqs: int = 1,
    **config,
) -> Engine:
    """An Engine for ``num_seqs`` prompts at once, its KV cache sized for them (not for a
    server's share of RAM). Other ``EngineConfig`` fields pass through."""
    ctx = loaded.cfg.max_position_embeddings
    max_len = min(max_model_len or ctx, ctx)
    block = config.get("block_size", EngineConfig.block_size)
    config.setdefault("kv_cache_memory", kv_cache_bytes(loaded, max_len, num_seqs, block))
    config.setdefault("max_num_seqs", num_seqs)
    return Engine(loaded, tokenizer, EngineConfig(max_model_len=max_len, **config))


def compile_for_prompts(
    engine: Engine, prompt_lens: Sequence[int], threads: int | None = None
) -> list[Program]:
    """Compile, ``threads`` at a time, the programs that prefilling prompts of ``prompt_lens``
    one at a time (budget-sized chunks) and decoding them take: all of a single prompt's steps.
    A step shape not foreseen here (several prompts sharing a step) compiles when first
    dispatched (``hot_compiles``). Returns the programs."""
    runner = engine.runner
    c = runner.config
    budget = c.max_num_batched_tokens
    counts = set(range(1, min(len(prompt_lens), c.max_num_seqs) + 1))  # decode steps
    for n in prompt_lens:
        counts |= {budget} if n >= budget else set()
        if n % budget:
            counts.add(n % budget)
    lora = runner.pool is not None
    todo = sorted({Program(bucket(t, c.token_buckets), lora) for t in counts},
                  key=lambda p: p.tokens)  # fmt: skip
    with ThreadPoolExecutor(max(1, threads or engine.config.compile_threads)) as ex:
        list(ex.map(runner.compile, todo))
    return todo


def generate_tokens(
    engine: Engine,
    prompts: list[list[int]],
    max_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: frozenset[int] | None = None,
    adapters: Sequence[str | None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> list[GenOutput]:
    """Generate up to ``max_tokens`` per prompt (token ids) through ``engine.step()``.

    ``adapters[i]`` names prompt i's registered adapter (None = base model). ``stop_ids``:
    the token ids that end a prompt's output; None = the tokenizer's EOS ids (the engine's
    default), an empty set = run to ``max_tokens`` (or the context). ``on_token(i, token)`` and
    ``on_text(i, text)`` stream prompt i's output as the engine reads it back. An invalid prompt
    (empty, longer than the context) raises before anything runs. The engine is this call's
    alone while it runs: it steps until nothing is left, and other requests' deltas are dropped.
    """
    names = list(adapters) if adapters is not None else [None] * len(prompts)
    if len(names) != len(prompts):
        raise ValueError(f"{len(names)} adapters for {len(prompts)} prompts")
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_tokens=max_tokens,
        stop_token_ids=tuple(stop_ids or ()), ignore_eos=stop_ids is not None,
    )  # fmt: skip
    for ids in prompts:
        engine.validate(list(ids), params)
    rows: dict[str, int] = {}
    try:
        for i, (ids, name) in enumerate(zip(prompts, names, strict=True)):
            rows[engine.add_request(list(ids), params, name)] = i
        outs = [GenOutput([], None) for _ in prompts]
        while engine.has_unfinished():  # to the end: no step left in flight
            for delta in engine.step():
                i = rows.get(delta.request_id)
                if i is None:
                    continue
                out = outs[i]
                out.token_ids += delta.token_ids
                out.text += delta.text
                if on_token is not None:
                    for t in delta.token_ids:
                        on_token(i, t)
                if on_text is not None and delta.text:
                    on_text(i, delta.text)
                if delta.finished:
                    out.finish_reason = delta.finish_reason
    except BaseException:
        for rid in rows:
            engine.abort(rid)
        raise
    return outs
