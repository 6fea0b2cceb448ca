"""LoRA on the token embedding and the LM head (PEFT's embed_tokens / lm_head targets): loaded,
packed, and served by the engine step in mixed batches against PEFT, on untied and tied
embeddings; adapters that bring tokens of their own are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cara_jax.adapters.peft import UnsupportedAdapterError, load_peft_adapter
from tests.helpers import (
    check_rows_against_peft,
    make_peft_adapters,
    mixed_prompts,
    packed_round_trip,
    peft_reference,
    pool_after_idle_loads,
)

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
    ad = load_peft_adapter(vocab_paths["ev8"], tiny.cfg)
    again = packed_round_trip(tiny.cfg, ad, tmp_path)
    assert again.vocab_ranks == {"embed_tokens": 8, "lm_head": 8}
    for k, (a, b) in ad.vocab.modules.items():
        np.testing.assert_array_equal(again.vocab[k][0], a.T)
        np.testing.assert_array_equal(again.vocab[k][1], b)


def test_vocab_lora_rows_match_peft_in_a_mixed_batch(tiny, tiny_llama_dir, vocab_paths):
    """Embedding + LM-head LoRA (with q/v), embedding-only, head-only, one at scale 0.5 and a
    mixture of three, in one batch with a plain adapter and base rows (decode, chunked prefill,
    prefix-cached prefill): greedy tokens equal PEFT's, top-5 log-probs within 1e-5. (The
    embedding and head deltas do not depend on the decode strategy; the default one runs.)"""
    strategy = "mbgmv"
    model = peft_reference(tiny_llama_dir, vocab_paths, ["ev8", "e4", "h16", "p8"],
                            scaled=[("ev8_half", "ev8", 0.5)],
                            mixes=[("mix", [("ev8", 0.7), ("h16", -0.4), ("e4", 1.3)])])  # fmt: skip
    prompts = mixed_prompts(np.random.default_rng(5), tiny.cfg.vocab_size,
                            [40, 9, 23, 40, 17, 33, 40, 12])  # fmt: skip
    outs = check_rows_against_peft(tiny, vocab_paths, model, ROWS, prompts, 10, strategy)
    assert len(outs) >= 6  # the rows differ: embedding and head LoRA both show


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
    prompts = mixed_prompts(np.random.default_rng(6), loaded.cfg.vocab_size, [40, 11, 40, 19])
    outs = check_rows_against_peft(
        loaded, paths, lambda name: peft_reference(tied_dir, paths, [name if name != "__base__" else "sep"]),
        rows, prompts, 8, "mbgmv")  # fmt: skip
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
    from cara_jax.adapters.device_pool import PoolConfig

    pool, ads = pool_after_idle_loads(tiny.cfg, vocab_paths, ("p8", "ev8", "e4"),
                                      PoolConfig(budget_bytes=8 << 20, vocab_rows=8))  # fmt: skip
    try:
        resident = set(pool.resident())
        assert ads["p8"].content_hash in resident and ads["e4"].content_hash in resident
        assert ads["ev8"].content_hash not in resident
        assert pool.stats.evictions == 1
        with pytest.raises(ValueError, match="holds 8 rows there"):
            pool.acquire(load_peft_adapter(vocab_paths["h16"], tiny.cfg))
    finally:
        pool.close()
