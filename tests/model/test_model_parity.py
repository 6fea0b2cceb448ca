"""The model against HF transformers: logits, greedy continuations, the Paris answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cara_jax.engine import Engine
from cara_jax.engine.batch import ChunkRow, DecodeRow, ScheduledBatch
from cara_jax.generate import generate_tokens, offline_engine
from cara_jax.scoring import full_logits
from tests.helpers import rel_err
from tests.server_helpers import smol_engine_config

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Le château de Versailles est célèbre pour",
]
GREEDY = (0.0, 0, 1.0, 0, 0.0, 0.0, 0.0, 1.0)  # a sampling row: temperature 0


def _engine(loaded, tok):
    """Room for four sequences of 256 tokens; two programs: decode steps (up to 4 tokens) and
    prompt steps (up to 128 tokens)."""
    return offline_engine(loaded, tok, max_model_len=256, num_seqs=4, max_prefill_seqs=4,
                          max_num_batched_tokens=128, token_buckets=(4,))  # fmt: skip


@pytest.fixture(scope="module")
def smol_engine(smollm, smol_tok):
    """The engine of the server tests (tests/server_helpers.py): one 64-token step program,
    compiled once in a fresh clone whichever module runs first."""
    eng = Engine(smollm, smol_tok, smol_engine_config(cold_start="sync"))
    yield eng
    eng.close()


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


def _check(eng, hf, prompts_ids: list[list[int]], n_new: int = 32) -> None:
    loaded = eng.loaded
    # 1. every-position logits of each prompt: one batch, each prompt padded on the right to
    # the longest (attention is causal, so a position never sees the padding after it), which
    # compiles the scoring program once rather than once per prompt length
    width = max(map(len, prompts_ids))
    batch = np.array([ids + [ids[-1]] * (width - len(ids)) for ids in prompts_ids])
    all_logits = np.asarray(full_logits(loaded, batch))
    for row, ids in enumerate(prompts_ids):
        ours = all_logits[row, : len(ids)]
        ref = _hf_logits(hf, ids)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    # 2. 32 greedy tokens, all prompts queued together through the engine: prompt chunks, then
    # batched decode steps over the paged cache (EOS does not stop them: HF runs n_new too)
    outs = generate_tokens(eng, prompts_ids, n_new, stop_ids=frozenset())
    for ids, out in zip(prompts_ids, outs, strict=True):
        assert len(out.token_ids) == n_new
        assert out.token_ids == _hf_greedy(hf, ids, n_new)
    assert not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_pages - 1
    # 3. decode-step logits (read from the paged KV cache) against HF on the full sequence:
    # each prompt prefilled by a step of its own (a chunk row), then every step decodes all
    # rows, feeding in the token the previous step sampled (greedy = the HF tokens above)
    seqs = [ids + out.token_ids for ids, out in zip(prompts_ids, outs, strict=True)]
    r = eng.runner
    tables = []
    for i, ids in enumerate(prompts_ids):
        assert eng.blocks.grow(f"probe-{i}", len(ids) + 4)
        tables.append(list(eng.blocks.table(f"probe-{i}")))
        res = r.run(ScheduledBatch([], [ChunkRow(None, i, ids, 0, tables[i], 0, GREEDY, True,
                                                 len(ids))]))  # fmt: skip
        first = int(np.asarray(res.outputs.tokens)[r.config.decode_rows(res.program.tokens)])
        assert first == seqs[i][len(ids)]
    pos = [len(p) for p in prompts_ids]
    for step in range(4):
        rows = [DecodeRow(None, i, pos[i], tables[i], 0, GREEDY) for i in range(len(seqs))]
        res = r.run(ScheduledBatch(rows, []))
        logits = np.asarray(res.logits)
        for row, seq in enumerate(seqs):
            ref = _hf_logits(hf, seq[: pos[row] + 1])[-1]
            assert rel_err(logits[row], ref) <= 1e-5, (step, row)
        pos = [p + 1 for p in pos]
    for i in range(len(prompts_ids)):
        eng.blocks.free(f"probe-{i}")
    assert r.compiled_count() == len(r.programs())  # nothing compiled beyond the programs


def test_smollm2_matches_hf(smol_engine, hf_smollm, hf_smollm_tokenizer):
    ids = [hf_smollm_tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    _check(smol_engine, hf_smollm, ids)


def test_random_llama_sharded_llama3_rope_matches_hf(tiny, hf_tiny, tiny_llama_dir, smol_tok):
    assert len(list(tiny_llama_dir.glob("*.safetensors"))) > 1  # really sharded
    assert (tiny_llama_dir / "model.safetensors.index.json").is_file()
    cfg = tiny.cfg
    assert cfg.num_kv_heads < cfg.num_heads and not cfg.tie_word_embeddings
    assert cfg.rope_scaling.rope_type == "llama3"
    rng = np.random.default_rng(0)
    # lengths past original_max_position_embeddings exercise the rescaled frequencies; together
    # more than one step's token budget, so the engine prefills the last one in two chunks
    ids = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (5, 40, 90)]
    eng = _engine(tiny, smol_tok)  # token ids below 512 decode with any vocabulary
    try:
        _check(eng, hf_tiny, ids)
        assert max(s.prefill_tokens for s in eng.steps) == 128  # a full-budget chunked step
    finally:
        eng.close()


def test_paris(smol_engine, hf_smollm_tokenizer):
    tok = hf_smollm_tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok.encode(text, add_special_tokens=False)
    out = generate_tokens(smol_engine, [ids], 24, stop_ids=frozenset({tok.eos_token_id}))
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
        np.asarray(pa["layers"]["self_attn"]["q_proj"]["kernel"][7]),
        np.asarray(pb["layers"]["self_attn"]["q_proj"]["kernel"][7]),
    )


def _nnx_lora_tree(cfg, rank: int):
    """A random flax nnx.LoRA state at SmolLM2's shapes, on q_proj and v_proj of every layer
    (B random too: nnx.LoRA starts B at zero)."""
    from flax import nnx

    shapes = cfg.projection_shapes()
    normal = nnx.initializers.normal(0.05)
    rngs = nnx.Rngs(3)

    def lora(p):
        return nnx.LoRA(shapes[p][0], rank, shapes[p][1], rngs=rngs, b_initializer=normal)

    class Layers(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Dict(self_attn=nnx.Dict(q_proj=lora("q_proj"),
                                                               v_proj=lora("v_proj")))
                                    for _ in range(cfg.num_layers)])  # fmt: skip

    return nnx.state(Layers(), nnx.LoRAParam)


def _qwix_tree(cfg, rank: int) -> dict:
    """A qwix/Tunix-style tree: kernel_lora_a [in, r] / kernel_lora_b [r, out] on the MLP of
    every third layer (served with alpha / r scaling)."""
    rng = np.random.default_rng(4)
    shapes = cfg.projection_shapes()
    return {"model": {"layers": {str(i): {"mlp": {p: {
        "kernel_lora_a": rng.normal(0, 0.05, (shapes[p][0], rank)).astype(np.float32),
        "kernel_lora_b": rng.normal(0, 0.05, (rank, shapes[p][1])).astype(np.float32),
    } for p in ("gate_proj", "down_proj")}} for i in range(0, cfg.num_layers, 3)}}}  # fmt: skip


def test_lora_trees_to_peft_and_engine(smol_engine, hf_smollm, hf_smollm_tokenizer, tmp_path):
    """An nnx.LoRA tree and a qwix-style tree -> save_peft_adapter -> HF PEFT gives the logits
    cara-jax's dense forward gives (both adapters and the base in one batch); the engine serves
    the tree loaded from memory exactly as the saved folder."""
    import copy

    from cara_jax.adapters.lora_set import LoraSet
    from cara_jax.adapters.trees import adapter_from_tree, save_peft_adapter
    from cara_jax.dense import dense_logits
    from tests.helpers import peft_mixed

    cfg = smol_engine.loaded.cfg
    trees = {"nnx": (_nnx_lora_tree(cfg, 8), None), "qwix": (_qwix_tree(cfg, 4), 16.0)}
    paths = {n: save_peft_adapter(t, tmp_path / n, cfg, alpha=alpha)
             for n, (t, alpha) in trees.items()}  # fmt: skip
    ads = [adapter_from_tree(t, cfg, alpha=alpha) for t, alpha in trees.values()]
    ids = hf_smollm_tokenizer("Adapters trained in JAX, served as PEFT")["input_ids"]
    s, params = LoraSet.from_adapters(cfg, ads)
    batch = np.array([ids] * 3)
    ours = np.asarray(dense_logits(smol_engine.loaded, batch, s.hook(params, [0, 1, 2])))
    peft = peft_mixed(copy.deepcopy(hf_smollm), paths)
    with torch.no_grad(), peft.disable_adapter():
        assert rel_err(ours[0], peft(torch.tensor([ids])).logits[0].numpy()) <= 1e-5
    for row, name in enumerate(trees, start=1):
        peft.set_adapter(name)
        with torch.no_grad():
            ref = peft(torch.tensor([ids])).logits[0].numpy()
        assert rel_err(ours[row], ref) <= 1e-5, name
        assert rel_err(ours[row], ours[0]) > 1e-3, name  # the adapter changes the logits
    # served: the tree from memory, the saved folder; same greedy tokens
    tree, alpha = trees["qwix"]
    smol_engine.load_adapter("qwix-mem", weights=tree, alpha=alpha)
    smol_engine.load_adapter("qwix-disk", paths["qwix"])
    out = generate_tokens(smol_engine, [ids, ids, ids], 12, stop_ids=frozenset(),
                          adapters=["qwix-mem", "qwix-disk", None])  # fmt: skip
    assert out[0].token_ids == out[1].token_ids != out[2].token_ids
    smol_engine.unload_adapter("qwix-mem")
    smol_engine.unload_adapter("qwix-disk")
