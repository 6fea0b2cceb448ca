"""LoRA on the token embedding and the LM head (PEFT's embed_tokens / lm_head targets): loaded,
packed, and served by the engine step in mixed batches against PEFT, on untied and tied
embeddings; adapters that bring tokens of their own are refused."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from cara_jax.adapters.packed import PackedStore
from cara_jax.adapters.peft import UnsupportedAdapterError, load_peft_adapter
from tests.helpers import assert_run_matches, engine_logprobs, make_peft_adapters

SPECS = {
    "ev8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    "e4": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "down_proj"]),
    "h16": dict(r=16, lora_alpha=8, target_modules=["lm_head"]),
    "p8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
}
# (PEFT adapter name, the engine's row: adapter name, mixture or None for the base model)
ROWS = [
    ("ev8", "ev8"), ("__base__", None), ("p8", "p8"), ("e4", "e4"), ("h16", "h16"),
    ("ev8_half", [("ev8", 0.5)]), ("mix", [("ev8", 0.7), ("h16", -0.4), ("e4", 1.3)]),
    ("ev8", "ev8"),
]  # fmt: skip


@pytest.fixture(scope="module")
def vocab_paths(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("vocab"), SPECS, seed=31,
                              scale=0.5)  # fmt: skip


def test_loader_reads_embedding_and_head_lora(vocab_paths, tiny):
    from safetensors.numpy import load_file

    ad = load_peft_adapter(vocab_paths["ev8"], tiny.cfg)
    saved = load_file(vocab_paths["ev8"] / "adapter_model.safetensors")
    a, b = ad.vocab.modules["embed_tokens"]
    ea = saved["base_model.model.model.embed_tokens.lora_embedding_A"]
    eb = saved["base_model.model.model.embed_tokens.lora_embedding_B"]
    np.testing.assert_array_equal(a, ea.T)
    np.testing.assert_allclose(b, eb.T * 2.0, rtol=1e-6)  # alpha / r folded in
    ha, hb = ad.vocab.modules["lm_head"]
    assert ha.shape == (tiny.cfg.hidden_size, 8) and hb.shape == (8, tiny.cfg.vocab_size)
    assert {p for _, p in ad.modules} == {"q_proj", "v_proj"}
    assert set(ad.vocab.base_sums) == {"embed_tokens", "lm_head"}  # PEFT saved the base layers
    only = load_peft_adapter(vocab_paths["h16"], tiny.cfg)
    assert not only.modules and set(only.vocab.modules) == {"lm_head"}


def test_a_targeted_head_needs_its_weights(vocab_paths, tiny, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from cara_jax.adapters.peft import AdapterWeightsError

    dst = shutil.copytree(vocab_paths["ev8"], tmp_path / "nohead")
    t = load_file(dst / "adapter_model.safetensors")
    save_file({k: v for k, v in t.items() if "lm_head.lora" not in k}, dst / "adapter_model.safetensors")
    with pytest.raises(AdapterWeightsError, match="lm_head: lora_A and lora_B weights missing"):
        load_peft_adapter(dst, tiny.cfg)


def test_packed_copy_keeps_vocab_rows(vocab_paths, tiny, tmp_path):
    from cara_jax.adapters.device_pool import DevicePool

    pool = DevicePool(tiny.cfg)
    ad = load_peft_adapter(vocab_paths["ev8"], tiny.cfg)
    store = PackedStore(pool.layout, tmp_path, 1 << 20)
    store.get(ad)
    store.flush()
    again = PackedStore(pool.layout, tmp_path, 1 << 20).lookup(ad.content_hash)
    assert again is not None and again.source == "disk"
    assert again.vocab_ranks == {"embed_tokens": 8, "lm_head": 8}
    for k, (a, b) in ad.vocab.modules.items():
        np.testing.assert_array_equal(again.vocab[k][0], a.T)
        np.testing.assert_array_equal(again.vocab[k][1], b)
    pool.close()


def _peft_reference(base_dir, paths, names, scaled=(), mixes=()):
    """PEFT with ``names``; ``scaled``: (name, source, s) copies with every B scaled by s;
    ``mixes``: (name, [(source, weight)]) as PEFT's cat merge."""
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


def _peft_run(model, name, prompt, n):
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


def _prompts(rng, vocab, lens):
    shared = rng.integers(3, vocab, size=max(lens)).tolist()
    return [shared[:n] if i % 2 == 0 else rng.integers(3, vocab, size=n).tolist()
            for i, n in enumerate(lens)]  # fmt: skip


@pytest.mark.parametrize("strategy", ["mbgmv", "bgmv"])
def test_vocab_lora_rows_match_peft_in_a_mixed_batch(tiny, tiny_llama_dir, vocab_paths, strategy):
    """Embedding + LM-head LoRA (with q/v), embedding-only, head-only, one at scale 0.5 and a
    mixture of three, in one batch with a plain adapter and base rows (decode, chunked prefill,
    prefix-cached prefill): greedy tokens equal PEFT's, top-5 log-probs within 1e-5."""
    model = _peft_reference(tiny_llama_dir, vocab_paths, ["ev8", "e4", "h16", "p8"],
                            scaled=[("ev8_half", "ev8", 0.5)],
                            mixes=[("mix", [("ev8", 0.7), ("h16", -0.4), ("e4", 1.3)])])  # fmt: skip
    prompts = _prompts(np.random.default_rng(5), tiny.cfg.vocab_size, [40, 9, 23, 40, 17, 33, 40, 12])
    n = 10
    rows = [r for _, r in ROWS]
    passes = engine_logprobs(tiny, vocab_paths, rows, prompts, n, strategy)
    outs = set()
    for prompt, (name, row), *runs in zip(prompts, ROWS, *passes, strict=True):
        hf, lp = _peft_run(model, name, prompt, n)
        assert_run_matches(runs, hf, lp, len(prompt), (row, strategy))
        outs.add((name, tuple(runs[0][0])))
    assert len({t for _, t in outs}) >= 6  # the rows differ: embedding and head LoRA both show


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A random HF Llama whose LM head is its embedding (as SmolLM2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    out = tmp_path_factory.mktemp("tied_llama")
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_tied_embeddings_follow_peft(tied_dir, tmp_path):
    """On a tied model, PEFT keeps the embedding's and the head's LoRA separate (an embedding
    LoRA leaves the head alone), and with ensure_weight_tying ties the head's LoRA to the
    embedding's: both served as PEFT serves them, beside base rows."""
    from cara_jax.weights import load_model

    specs = {
        "sep": dict(r=8, lora_alpha=16, target_modules=["q_proj", "embed_tokens", "lm_head"]),
        "emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]),
        "tie": dict(r=8, lora_alpha=8, target_modules=["v_proj", "embed_tokens"],
                    ensure_weight_tying=True),
    }  # fmt: skip
    paths = make_peft_adapters(tied_dir, tmp_path, specs, seed=41, scale=0.5)
    loaded = load_model(tied_dir, use_cache=False)
    assert loaded.cfg.tie_word_embeddings
    tie = load_peft_adapter(paths["tie"], loaded.cfg)
    assert set(tie.vocab.modules) == {"embed_tokens", "lm_head"}  # PEFT's tied head LoRA
    assert set(load_peft_adapter(paths["emb"], loaded.cfg).vocab.modules) == {"embed_tokens"}
    rows = [("sep", "sep"), ("__base__", None), ("emb", "emb"), ("tie", "tie")]
    prompts = _prompts(np.random.default_rng(6), loaded.cfg.vocab_size, [40, 11, 40, 19])
    passes = engine_logprobs(loaded, paths, [r for _, r in rows], prompts, 8, "mbgmv")
    outs = set()
    for i, (prompt, (name, row)) in enumerate(zip(prompts, rows, strict=True)):
        model = _peft_reference(tied_dir, paths, [name if name != "__base__" else "sep"])
        hf, lp = _peft_run(model, name, prompt, 8)
        assert_run_matches([p[i] for p in passes], hf, lp, len(prompt), row)
        outs.add(tuple(passes[0][i][0]))
    assert len(outs) == 4


def test_adapters_with_tokens_of_their_own_are_refused(tiny, tiny_llama_dir, vocab_paths, tmp_path):
    """modules_to_save on the embedding or head, a resized vocabulary, and base weights that are
    not this base's (PEFT would load them over it) are refused with the reason."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from cara_jax.engine import Engine, EngineConfig
    from tests.helpers import IdsTokenizer

    saved = make_peft_adapters(tiny_llama_dir, tmp_path, {
        "mts": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])})  # fmt: skip
    with pytest.raises(UnsupportedAdapterError, match="own embedding or LM head.*vocabulary"):
        load_peft_adapter(saved["mts"], tiny.cfg)

    def resized():
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        m.resize_token_embeddings(tiny.cfg.vocab_size + 8)
        return m

    grown = make_peft_adapters(resized, tmp_path, {
        "grown": dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])})  # fmt: skip
    with pytest.raises(UnsupportedAdapterError, match="520 tokens.*adds or retrains tokens"):
        load_peft_adapter(grown["grown"], tiny.cfg)

    other = tmp_path / "other"
    shutil.copytree(vocab_paths["ev8"], other)
    tensors = load_file(other / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.base_layer.weight"] += 0.5
    save_file(tensors, other / "adapter_model.safetensors")
    json.loads((other / "adapter_config.json").read_text())  # still a valid folder
    eng = Engine(tiny, IdsTokenizer(), EngineConfig(max_num_seqs=2, max_model_len=64,
                                                    kv_cache_memory=1 << 20))  # fmt: skip
    try:
        eng.load_adapter("ev8", vocab_paths["ev8"])  # its saved base layers are the base's
        with pytest.raises(ValueError, match="lm_head weights that differ"):
            eng.load_adapter("other", other)
        assert "other" not in eng.adapters()
    finally:
        eng.close()


def test_short_vocab_rows_evict_only_their_holders(tiny, vocab_paths):
    """With every embedding row taken by an idle adapter, a new embedding LoRA drops that one,
    not the older idle plain adapter (which holds no such rows)."""
    from cara_jax.adapters.device_pool import DevicePool, PoolConfig

    pool = DevicePool(tiny.cfg, PoolConfig(budget_bytes=8 << 20, vocab_rows=8))
    ads = {n: load_peft_adapter(vocab_paths[n], tiny.cfg) for n in ("p8", "ev8", "e4")}
    try:
        for name in ("p8", "ev8", "e4"):
            pool.acquire(ads[name]).wait(60)
            pool.release(ads[name].content_hash)
        resident = set(pool.resident())
        assert ads["p8"].content_hash in resident and ads["e4"].content_hash in resident
        assert ads["ev8"].content_hash not in resident
        assert pool.stats.evictions == 1
        with pytest.raises(ValueError, match="holds 8 rows there"):
            pool.acquire(load_peft_adapter(vocab_paths["h16"], tiny.cfg))
    finally:
        pool.close()
