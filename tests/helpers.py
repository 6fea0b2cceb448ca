"""Helpers shared by several test modules.

- Reference adapters for the parity tests: real PEFT adapters saved to disk, and PEFT's own
  mixed-batch model over them (what the engine's outputs are compared with).
- ``rel_err``, the relative error the parity tests bound.
- Hand-made cost models for the scheduling tests.
- Random device-pool rows and batch slots for the grouped-LoRA kernel and gradient tests.
- ``TINY_CFG``: a two-layer model shape for the model-free scheduler and residency tests.

torch and peft are imported where they are used, so model-free tests stay light.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np

from cara_jax.config import PROJECTIONS, ModelConfig
from cara_jax.scheduling import CostModel, LinearFit

ALL7 = list(PROJECTIONS)
# model-free tests (fake runner): a model shape small enough for host-memory pools
TINY_CFG = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=16)  # fmt: skip


def rel_err(a, b) -> float:
    """Largest absolute difference, relative to the largest magnitude of the reference ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# name -> LoraConfig kwargs; together they cover ranks 8..128, rsLoRA, alpha != r,
# q/v only, all-linear, rank_pattern / alpha_pattern
ADAPTERS = {
    "r8": dict(r=8, lora_alpha=8, target_modules=ALL7),
    "r16_alpha": dict(r=16, lora_alpha=48, target_modules="all-linear"),
    "r32_rslora": dict(r=32, lora_alpha=16, use_rslora=True, target_modules=ALL7),
    "r64_qv": dict(r=64, lora_alpha=128, target_modules=["q_proj", "v_proj"]),
    "r128_pattern": dict(
        r=128,
        lora_alpha=64,
        target_modules=ALL7,
        rank_pattern={"q_proj": 16, "down_proj": 24},
        alpha_pattern={"v_proj": 12},
    ),
}


def make_peft_adapters(base, out_dir, specs, seed=0, scale=1.0):
    """Save real PEFT adapters (init_lora_weights=False, so B != 0).

    ``base`` is an HF checkpoint folder or a callable returning a fresh HF model.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        if callable(base):
            model_in = base()
        else:
            model_in = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        base_model = model_in
        model = get_peft_model(base_model, LoraConfig(init_lora_weights=False, **kw))
        if scale != 1.0:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_" in n:
                        p.mul_(scale)
        path = out_dir / name
        model.save_pretrained(path)
        paths[name] = path
    return paths


def make_dora_adapters(base, out_dir, specs, seed=0):
    """Save real PEFT DoRA adapters (``use_dora``): PEFT's default init (so a weighted merge of
    them starts from B = 0, as trained adapters do), then B and the magnitudes perturbed so
    that every part of DoRA shows in the outputs. ``base`` as for make_peft_adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        model_in = base() if callable(base) else AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32)  # fmt: skip
        model = get_peft_model(model_in, LoraConfig(use_dora=True, **kw))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.05)
                elif "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.2 * torch.randn_like(p))
        model.save_pretrained(out_dir / name)
        paths[name] = out_dir / name
    return paths


def peft_mixed(hf_model, paths):
    from peft import PeftModel

    names = list(paths)
    model = PeftModel.from_pretrained(hf_model, paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(paths[n], adapter_name=n)
    return model.eval()


def peft_greedy(model, name, prompt, n):
    """PEFT's greedy tokens and log-probs [T, V] for one row, ``name`` its adapter (set as the
    active one: PEFT's DoRA takes one adapter at a time) or "__base__"."""
    import contextlib

    import torch

    if name == "__base__":
        ctx = model.disable_adapter()
    else:
        model.set_adapter(name)
        ctx = contextlib.nullcontext()
    with torch.no_grad(), ctx:
        gen = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):]  # fmt: skip
        seq = torch.tensor([prompt + gen.tolist()])
        lp = torch.log_softmax(model(seq).logits[0], -1).numpy()
    return gen.tolist(), lp


def peft_reference(base_dir, paths, names, scaled=(), mixes=()):
    """PEFT with ``names``; ``scaled``: (name, source, s) copies with every B scaled by s;
    ``mixes``: (name, [(source, weight)]) as PEFT's cat merge."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    for name, src, s in scaled:
        model.load_adapter(paths[src], adapter_name=name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_B.{name}." in n or n.endswith(f"lora_embedding_B.{name}"):
                    p.mul_(s)
    for name, members in mixes:
        model.add_weighted_adapter([m for m, _ in members], [w for _, w in members], name,
                                   combination_type="cat")  # fmt: skip
    return model.eval()



def packed_round_trip(cfg, adapter, folder):
    """``adapter``'s packed copy written to ``folder`` and read back from disk by a new store."""
    from cara_jax.adapters.device_pool import DevicePool
    from cara_jax.adapters.packed import PackedStore

    pool = DevicePool(cfg)
    try:
        store = PackedStore(pool.layout, folder, 1 << 20)
        store.get(adapter)
        store.flush()
        again = PackedStore(pool.layout, folder, 1 << 20).lookup(adapter.content_hash)
    finally:
        pool.close()
    assert again is not None and again.source == "disk"
    return again


def pool_after_idle_loads(cfg, paths, names, config):
    """A device pool (``config``) that loaded the adapters ``names`` in turn, each released
    once loaded (idle, evictable): (pool, {name: adapter}); the caller closes the pool."""
    from cara_jax.adapters.device_pool import DevicePool
    from cara_jax.adapters.peft import load_peft_adapter

    pool = DevicePool(cfg, config)
    ads = {n: load_peft_adapter(paths[n], cfg) for n in names}
    for name in names:
        pool.acquire(ads[name]).wait(60)
        pool.release(ads[name].content_hash)
    return pool, ads

def engine_logprobs(loaded, paths, rows, prompts, n_tokens, strategy, passes=2):
    """Greedy tokens and their top-5 log-probs per row, for ``passes`` runs of the same batch
    on one engine (the second prefills from the prefix cache), token budget 32 (long prompts
    prefill in chunks beside the other rows' decode steps). A row is None (the base model), an
    adapter name, or a list of (name, scale) entries (a request's ``lora`` mixture)."""
    from cara_jax.adapters.device_pool import PoolConfig
    from cara_jax.engine import Engine, EngineConfig
    from cara_jax.sampling_params import SamplingParams

    eng = Engine(loaded, IdsTokenizer(), EngineConfig(
        max_num_seqs=len(rows), max_model_len=128, max_prefill_seqs=2, max_num_batched_tokens=32,
        token_buckets=(8, 32), kv_cache_memory=8 << 20, cold_start="cached",
        lora_strategy=strategy, pool=PoolConfig(budget_bytes=64 << 20),
    ))  # fmt: skip
    for name, path in paths.items():
        eng.load_adapter(name, path)
    eng.warmup()
    sp = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True, logprobs=5)
    out, cached = [], []
    for _ in range(passes):
        ids = [eng.add_request(p, sp, r) if not isinstance(r, list) else
               eng.add_request(p, sp, lora=r) for p, r in zip(prompts, rows, strict=True)]  # fmt: skip
        got = {i: ([], []) for i in ids}
        hits = 0
        while eng.has_unfinished():
            for o in eng.step():
                got[o.request_id][0].extend(o.token_ids)
                got[o.request_id][1].extend(o.logprobs or [])
                hits += (o.num_cached_tokens or 0) if o.finished else 0
        out.append([got[i] for i in ids])
        cached.append(hits)
    assert cached[0] == 0 and cached[-1] >= 16 * 4, cached  # the later passes hit the cache
    assert eng.runner.hot_compiles == 0
    eng.close()
    return out



def mixed_prompts(rng, vocab: int, lens: list[int]) -> list[list[int]]:
    """Prompts of ``lens`` tokens; the even ones share a prefix (the prefix cache's hits)."""
    shared = rng.integers(3, vocab, size=max(lens)).tolist()
    return [shared[:n] if i % 2 == 0 else rng.integers(3, vocab, size=n).tolist()
            for i, n in enumerate(lens)]  # fmt: skip


def check_rows_against_peft(loaded, paths, peft_model, rows, prompts, n, strategy) -> set:
    """One mixed batch of ``rows`` ((PEFT adapter name, engine row) pairs; engine_logprobs says
    what a row is), run twice by the engine: every pass gives PEFT's greedy tokens and its
    top-5 log-probs within 1e-5. ``peft_model``: a model, or a function giving the one for a
    PEFT name. Returns the distinct token sequences."""
    passes = engine_logprobs(loaded, paths, [r for _, r in rows], prompts, n, strategy)
    outs = set()
    for i, (prompt, (name, row)) in enumerate(zip(prompts, rows, strict=True)):
        model = peft_model(name) if isinstance(peft_model, types.FunctionType) else peft_model
        hf, lp = peft_greedy(model, name, prompt, n)
        assert_run_matches([p[i] for p in passes], hf, lp, len(prompt), (row, strategy))
        outs.add(tuple(passes[0][i][0]))
    return outs

def assert_run_matches(runs, hf_tokens, logprobs_ref, prompt_len, label, tol=1e-5):
    """Each engine pass ``(tokens, logprobs)`` in ``runs`` gave the reference's greedy tokens,
    and every token's top-5 log-probs equal the reference's ``logprobs_ref`` [T, V] within
    ``tol``."""
    for tokens, logprobs in runs:
        assert tokens == hf_tokens, label
        assert len(logprobs) == len(hf_tokens)
        for k, entry in enumerate(logprobs):
            ref = logprobs_ref[prompt_len - 1 + k]
            top = [t for t, _ in entry["top"]]
            ours = np.array([v for _, v in entry["top"]] + [entry["logprob"]])
            want = np.array([ref[t] for t in top] + [ref[tokens[k]]])
            assert np.max(np.abs(ours - want)) <= tol, (label, k, ours - want)


class IdsTokenizer:
    """Token ids in, token ids out: no vocabulary needed."""

    eos_token_ids = ()

    def detokenizer(self, skip_special_tokens=True):
        from types import SimpleNamespace

        return SimpleNamespace(add=lambda t: "", flush=lambda: "")


# ---------------------------------------------------------------------- cost models

MS = 1e-3


def linear_model(kernel: str, a_ms: float, b_ms: float, base_ms: float = 24.0, c_ms: float = 0.0,
                 prefill=(0.05, 0.0, 10.0)) -> CostModel:  # fmt: skip
    """A cost model with given coefficients (ms): decode = a*work + c*|S| + b, base flat."""
    return CostModel(
        "m", "dev", "float32", kernel,
        decode=LinearFit(("work", "batch", "one"), (a_ms * MS, c_ms * MS, b_ms * MS)),
        base=LinearFit(("batch", "one"), (0.0, base_ms * MS)),
        prefill=LinearFit(("tokens", "lora_tokens", "one"), tuple(x * MS for x in prefill)),
    )  # fmt: skip


@dataclasses.dataclass
class Pool:
    a: jax.Array
    b: jax.Array
    slot_rows: np.ndarray  # [S, 128]
    slot_rank: np.ndarray  # [S]


def make_pool(rng, din, dout, ranks, dtype, cap=128) -> Pool:
    """Slot s+1 holds ranks[s] scattered pool rows; row 0 stays zero."""
    n_rows = sum(ranks) + 37
    a = rng.standard_normal((n_rows, din)).astype(np.float32)
    b = rng.standard_normal((n_rows, dout)).astype(np.float32)
    a[0] = b[0] = 0.0
    free = rng.permutation(np.arange(1, n_rows))
    slot_rows = np.zeros((len(ranks) + 1, cap), np.int32)
    slot_rank = np.zeros((len(ranks) + 1,), np.int32)
    used = 0
    for s, r in enumerate(ranks, start=1):
        slot_rows[s, :r] = free[used : used + r]
        slot_rank[s] = r
        used += r
    return Pool(jnp.asarray(a, dtype), jnp.asarray(b, dtype), slot_rows, slot_rank)


def batch_slots(rng, n_slots, batch) -> np.ndarray:
    """Every slot in shuffled order, with slot-0 rows mixed in (batch 1: one adapter)."""
    if batch == 1:
        return rng.integers(1, n_slots, size=1).astype(np.int32)
    ad = rng.permutation(np.resize(np.arange(n_slots), batch)).astype(np.int32)
    ad[rng.integers(0, batch)] = 0
    return ad
