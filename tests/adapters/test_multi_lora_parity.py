"""Multi-LoRA batches against PEFT's mixed-batch inference (adapter_names)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cara_jax.adapters.device_pool import DevicePool, PoolConfig
from cara_jax.adapters.store import AdapterRegistry, HostStore
from cara_jax.scoring import full_logits
from tests.helpers import (
    ADAPTERS,
    ALL7,
    assert_run_matches,
    engine_logprobs,
    make_peft_adapters,
    peft_mixed,
    rel_err,
)


def _setup(loaded, paths, strategy="bgmv", budget=64 << 20):
    registry = AdapterRegistry(loaded.cfg, HostStore())
    pool = DevicePool(loaded.cfg, PoolConfig(budget_bytes=budget, max_rank=128), dtype=loaded.dtype)
    slots = {}
    for name, path in paths.items():
        registry.register(name, path)
        adapter = registry.resolve(name)
        pool.acquire(adapter).wait(60)
        slots[name] = pool.slot_of(adapter.content_hash)
    return registry, pool, slots


@pytest.fixture(scope="module")
def tiny_adapters(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("adapters"), ADAPTERS)


def _engine_greedy(loaded, paths, rows, prompts, n_tokens, strategy):
    """Greedy tokens of the whole batch through the engine (prefill chunks, then decode steps
    where every row runs its own adapter), all adapters resident."""
    from cara_jax.engine import Engine, EngineConfig
    from cara_jax.sampling_params import SamplingParams
    from cara_jax.tokenizer import Tokenizer

    class _Ids(Tokenizer):  # token ids in, token ids out: no vocabulary needed
        def __init__(self):
            pass

        eos_token_ids = ()

        def detokenizer(self, skip_special_tokens=True):
            from types import SimpleNamespace

            return SimpleNamespace(add=lambda t: "", flush=lambda: "")

    eng = Engine(loaded, _Ids(), EngineConfig(
        max_num_seqs=len(rows), max_model_len=128, max_prefill_seqs=2, max_num_batched_tokens=32,
        token_buckets=(32,), kv_cache_memory=4 << 20, cold_start="cached", lora_strategy=strategy,
        pool=PoolConfig(budget_bytes=64 << 20, max_rank=128),
    ))  # fmt: skip
    for name in {r for r in rows if r}:
        eng.load_adapter(name, paths[name])
    sp = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    ids = [eng.add_request(p, sp, r) for p, r in zip(prompts, rows, strict=True)]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.token_ids
    eng.close()
    return [got[i] for i in ids]


def _check_mixed(loaded, peft_model, paths, rows, n_tokens, prompt_len, seed=0):
    """rows: adapter name or None per batch row."""
    rng = np.random.default_rng(seed)
    vocab = loaded.cfg.vocab_size
    prompts = [rng.integers(3, vocab, size=prompt_len).tolist() for _ in rows]
    names = [r or "__base__" for r in rows]
    registry, pool, slots = _setup(loaded, paths)
    ad = [slots[r] if r else 0 for r in rows]
    # 1. prefill logits at every position (segment kernel) vs PEFT mixed batch
    with torch.no_grad():
        ref = peft_model(torch.tensor(prompts), adapter_names=names).logits.numpy()
    with pool.lock:
        hook = pool.hook(np.array(ad, np.int32), "bgmv")
        ours = np.asarray(full_logits(loaded, np.array(prompts), hook))
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    # sanity: the adapters really change the output
    base_rows = [i for i, r in enumerate(rows) if r is None]
    with torch.no_grad():
        plain = peft_model(torch.tensor(prompts), adapter_names=["__base__"] * len(rows)).logits
    for i, r in enumerate(rows):
        if r is not None:
            assert rel_err(plain[i].numpy(), ref[i]) > 1e-3, r
    for i in base_rows:
        assert rel_err(plain[i].numpy(), ref[i]) <= 1e-6
    # 2. greedy continuation through prefill + decode, both decode strategies
    with torch.no_grad():
        hf_out = peft_model.generate(
            input_ids=torch.tensor(prompts),
            attention_mask=torch.ones(len(rows), prompt_len, dtype=torch.long),
            adapter_names=names,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=0,
        )[:, prompt_len:].tolist()
    results = {}
    for strategy in ("bgmv", "mbgmv"):
        results[strategy] = _engine_greedy(loaded, paths, rows, prompts, n_tokens, strategy)
        assert results[strategy] == hf_out, strategy
    assert results["bgmv"] == results["mbgmv"]
    pool.close()


def test_tiny_llama_mixed_batch_matches_peft(tiny, tiny_llama_dir, tiny_adapters):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = peft_mixed(hf, tiny_adapters)
    rows = ["r8", None, "r16_alpha", "r32_rslora", "r64_qv", "r128_pattern", None, "r8"]
    _check_mixed(tiny, peft_model, tiny_adapters, rows, n_tokens=12, prompt_len=10)


@pytest.mark.slow  # CI time; SmolLM2 vs PEFT stays fast through the server (server/test_server_cold_start.py)
def test_smollm2_mixed_batch_matches_peft(smollm, hf_smollm, tmp_path):
    specs = {
        "s8": dict(r=8, lora_alpha=16, target_modules=ALL7),
        "s32_qv": dict(r=32, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    }
    # Scaled so the deltas move the logits clearly but keep greedy decoding meaningful.
    paths = make_peft_adapters(lambda: copy.deepcopy(hf_smollm), tmp_path, specs, seed=7, scale=0.5)
    peft_model = peft_mixed(copy.deepcopy(hf_smollm), paths)
    rows = ["s8", None, "s32_qv"]
    _check_mixed(smollm, peft_model, paths, rows, n_tokens=8, prompt_len=12)


# Adapters of different ranks and projections for the engine paths: attention-only, MLP-only,
# a layer subset, rsLoRA with a rank pattern; mixed with base rows in every batch.
PATH_ADAPTERS = {
    "p8_qkvo": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "p16_mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "p32_layers": dict(r=32, lora_alpha=32, target_modules=ALL7, layers_to_transform=[0, 2]),
    "p64_pattern": dict(r=64, lora_alpha=32, use_rslora=True, target_modules=ALL7,
                        rank_pattern={"k_proj": 8, "up_proj": 40}),
}


# per row: (PEFT's adapter, what the engine is asked for: None, a name, or `lora` entries). A
# scale is PEFT's cat of one adapter at that weight, a mixture PEFT's cat of several
# (add_weighted_adapter); scale 0 is the base model.
PATH_ROWS = [
    ("p8_qkvo", "p8_qkvo"), ("__base__", None), ("p16_mlp", "p16_mlp"),
    ("p32_layers", "p32_layers"), ("p64_pattern", "p64_pattern"), ("p8_qkvo", "p8_qkvo"),
    ("__base__", None), ("s_half", [("p8_qkvo", 0.5)]), ("__base__", [("p16_mlp", 0.0)]),
    ("mix_a", [("p8_qkvo", 0.7), ("p16_mlp", -0.4)]),
    ("mix_b", [("p16_mlp", 1.3), ("p32_layers", 0.6), ("p8_qkvo", 0.2)]),
]  # fmt: skip


@pytest.mark.parametrize("strategy", ["mbgmv", "bgmv"])
def test_engine_paths_match_peft(tiny, tiny_llama_dir, tmp_path, strategy):
    """Decode, chunked prefill and prefix-cached prefill, in mixed batches of base rows,
    adapters of different ranks and projections, and scaled and mixed adapters (a request's
    ``lora``): greedy tokens equal PEFT's and every generated token's top-5 log-probs equal
    PEFT's (teacher-forced) within 1e-5."""
    from transformers import AutoModelForCausalLM

    paths = make_peft_adapters(tiny_llama_dir, tmp_path, PATH_ADAPTERS, seed=11)
    peft_model = peft_mixed(AutoModelForCausalLM.from_pretrained(tiny_llama_dir,
                                                                 dtype=torch.float32), paths)
    for name, row in PATH_ROWS:
        if isinstance(row, list) and name != "__base__":
            members, weights = zip(*row, strict=True)
            peft_model.add_weighted_adapter(list(members), list(weights), name,
                                            combination_type="cat")  # fmt: skip
    rows = [r for _, r in PATH_ROWS]
    rng = np.random.default_rng(5)
    # > one 16-token block: the second pass hits the cache
    lens = [40, 9, 23, 40, 17, 33, 40, 12, 40, 26, 40]
    shared = rng.integers(3, tiny.cfg.vocab_size, size=40).tolist()
    prompts = [shared[:n] if i % 2 == 0 else rng.integers(3, tiny.cfg.vocab_size, size=n).tolist()
               for i, n in enumerate(lens)]  # fmt: skip
    n_tokens = 10
    passes = engine_logprobs(tiny, paths, rows, prompts, n_tokens, strategy)
    for prompt, (name, row), *runs in zip(prompts, PATH_ROWS, *passes, strict=True):
        with torch.no_grad():
            hf = peft_model.generate(input_ids=torch.tensor([prompt]), adapter_names=[name],
                                     max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                     do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
            seq = torch.tensor([prompt + hf])
            lp = torch.log_softmax(peft_model(seq, adapter_names=[name]).logits[0], -1).numpy()
        assert_run_matches(runs, hf, lp, len(prompt), (row, strategy))
