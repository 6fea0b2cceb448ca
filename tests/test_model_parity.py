"""The model against HF transformers: logits, greedy continuations, the Paris answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cara_jax.runner import ModelRunner, RunnerConfig, full_logits

from cara_jax.generate import generate_tokens
from tests.conftest import rel_err

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Le château de Versailles est célèbre pour",
]


def _hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def _check(loaded, hf, prompts_ids: list[list[int]], n_new: int = 32) -> None:
    # 1. every-position logits of each prompt
    for ids in prompts_ids:
        ours = np.asarray(full_logits(loaded, np.array([ids])))[0]
        ref = _hf_logits(hf, ids)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    # 2. 32 greedy tokens, all prompts batched together through prefill + decode
    runner = ModelRunner(loaded, RunnerConfig(num_slots=4, max_len=256, max_prefill_batch=4))
    outs = generate_tokens(runner, prompts_ids, n_new)
    for ids, out in zip(prompts_ids, outs, strict=True):
        assert len(out.token_ids) == n_new
        assert out.token_ids == _hf_greedy(hf, ids, n_new)
    # 3. decode-step logits (read from the KV cache) against HF on the full sequence
    seqs = [ids + out.token_ids for ids, out in zip(prompts_ids, outs, strict=True)]
    runner = ModelRunner(loaded, RunnerConfig(num_slots=4, max_len=256, max_prefill_batch=4))
    from cara_jax.sampler import SamplingArrays

    sampling = SamplingArrays.greedy(len(prompts_ids))
    runner.prefill(prompts_ids, list(range(len(prompts_ids))), sampling)
    pos = np.array([len(p) for p in prompts_ids], np.int32)
    for step in range(4):
        logits, _ = runner.decode(pos, sampling)
        logits = np.asarray(logits)
        for row, seq in enumerate(seqs):
            ref = _hf_logits(hf, seq[: pos[row] + 1])[-1]
            assert rel_err(logits[row], ref) <= 1e-5, (step, row)
        pos = pos + 1


def test_smollm2_matches_hf(smollm, hf_smollm, hf_smollm_tokenizer):
    ids = [hf_smollm_tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    _check(smollm, hf_smollm, ids)


def test_random_llama_sharded_llama3_rope_matches_hf(tiny, hf_tiny, tiny_llama_dir):
    assert len(list(tiny_llama_dir.glob("*.safetensors"))) > 1  # really sharded
    assert (tiny_llama_dir / "model.safetensors.index.json").is_file()
    cfg = tiny.cfg
    assert cfg.num_kv_heads < cfg.num_heads and not cfg.tie_word_embeddings
    assert cfg.rope_scaling.rope_type == "llama3"
    rng = np.random.default_rng(0)
    # lengths past original_max_position_embeddings exercise the rescaled frequencies
    ids = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (5, 40, 90)]
    _check(tiny, hf_tiny, ids)


def test_paris(smollm, hf_smollm_tokenizer):
    tok = hf_smollm_tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok.encode(text, add_special_tokens=False)
    runner = ModelRunner(smollm, RunnerConfig(num_slots=1, max_len=128))
    out = generate_tokens(runner, [ids], 24, stop_ids=frozenset({tok.eos_token_id}))
    answer = tok.decode(out[0].token_ids, skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0].finish_reason == "stop"


def test_bfloat16_close_to_float32(smollm_path, smollm, hf_smollm_tokenizer):
    import jax.numpy as jnp

    from cara_jax.weights import load_model

    bf = load_model(smollm_path, dtype=jnp.bfloat16)
    text = "The quick brown fox jumps over the lazy dog because it was hungry and tired."
    ids = hf_smollm_tokenizer.encode(text, add_special_tokens=False)
    lf = np.asarray(full_logits(smollm, np.array([ids])))[0]
    lb = np.asarray(full_logits(bf, np.array([ids])))[0]
    assert lb.dtype == np.float32
    assert rel_err(lb, lf) < 0.05
    assert (lb.argmax(-1) == lf.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("dtype", ["float32"])
def test_weights_cache_roundtrip(smollm_path, smollm, tmp_path, monkeypatch, dtype):
    from cara_jax import weights

    monkeypatch.setenv("CARA_JAX_CACHE", str(tmp_path))
    calls = []
    orig = weights._gguf_tensors
    monkeypatch.setattr(weights, "_gguf_tensors", lambda p: calls.append(p) or orig(p))
    a = weights.load_model(smollm_path)
    b = weights.load_model(smollm_path)
    assert len(calls) == 1  # the second start skipped conversion
    pa, pb = a.state.to_pure_dict(), b.state.to_pure_dict()
    np.testing.assert_array_equal(
        np.asarray(pa["layers"][7]["self_attn"]["q_proj"]["kernel"]),
        np.asarray(pb["layers"][7]["self_attn"]["q_proj"]["kernel"]),
    )
