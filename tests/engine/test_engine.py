"""Engine: batching changes no result, seeds, stops, cancellation, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cara_jax.adapters.store import UnknownAdapterError
from cara_jax.api import AsyncEngine
from cara_jax.engine import Engine, EngineConfig, PromptTooLongError
from cara_jax.sampling_params import InvalidRequestError, SamplingParams
from tests.helpers import ALL7, make_peft_adapters

SPECS = {f"e{i}": dict(r=r, lora_alpha=r, target_modules=ALL7 if i % 2 else ["q_proj", "v_proj"])
         for i, r in enumerate([8, 16, 32, 64, 8, 16, 32, 64])}  # fmt: skip


@pytest.fixture(scope="module")
def engine_adapters(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("engine_adapters"), SPECS)


def _engine(loaded, tok, adapters=None, **kw):
    cfg = dict(max_num_seqs=8, max_model_len=96, max_prefill_seqs=2, max_num_batched_tokens=64,
               kv_cache_memory=8 << 20)  # fmt: skip
    cfg.update(kw)
    eng = Engine(loaded, tok, EngineConfig(**cfg))
    for name, path in (adapters or {}).items():
        eng.load_adapter(name, path)
    return eng


def _run(eng, requests):
    """requests: list of (prompt ids, params, adapter) -> {rid: (token_ids, text, reason)}."""
    ids = [eng.add_request(p, sp, a) for p, sp, a in requests]
    res = {i: ([], "", None) for i in ids}
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            t, x, _ = res[o.request_id]
            res[o.request_id] = (t + o.token_ids, x + o.text, o.finish_reason)
        steps += 1
        assert steps < 2000
    return [res[i] for i in ids]


def test_batching_changes_no_result(tiny, smol_tok, engine_adapters):
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(24):
        prompt = rng.integers(3, 500, size=int(rng.integers(1, 40))).tolist()
        adapter = None if i % 5 == 0 else f"e{i % 8}"
        greedy = i % 3 != 0
        sp = SamplingParams(temperature=0.0 if greedy else 0.9, top_k=0 if greedy else 40,
                            seed=i, max_tokens=int(rng.integers(1, 24)), ignore_eos=True)  # fmt: skip
        reqs.append((prompt, sp, adapter))
    for mode in ("sync", "cached"):
        eng = _engine(tiny, smol_tok, engine_adapters, cold_start=mode)
        together = _run(eng, reqs)
        for (prompt, sp, adapter), got in zip(reqs, together, strict=True):
            alone = _run(eng, [(prompt, sp, adapter)])[0]
            assert got[0] == alone[0], (mode, adapter, sp)  # greedy and seeded alike
            assert len(got[0]) == sp.max_tokens and got[2] == "length"
        assert not eng.running and eng.scheduler.num_free_rows == 8
        assert eng.blocks.num_free == eng.blocks.num_pages - 1  # every KV page back
        eng.close()


@pytest.mark.slow  # CI time; stop rules are tested without a model in test_scheduler.py
def test_stop_string_across_token_boundary(smollm, smol_tok):
    eng = _engine(smollm, smol_tok, max_model_len=128)
    prompt = smol_tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=True
    )
    full = _run(eng, [(prompt, SamplingParams(temperature=0, max_tokens=20), None)])[0]
    assert full[1] == "The capital of France is Paris."
    pieces = [smol_tok.decode([t]) for t in full[0]]
    # a stop string that starts inside one token and ends inside the next
    i = next(k for k, p in enumerate(pieces) if len(p) >= 3 and len(pieces[k + 1]) >= 3)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    got = _run(eng, [(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop]), None)])[0]
    assert got[2] == "stop"
    assert got[1] == full[1][: full[1].index(stop)]
    eng.close()


def test_errors_leave_other_requests_alone(tiny, smol_tok, engine_adapters):
    eng = _engine(tiny, smol_tok, {"e1": engine_adapters["e1"]})
    ok = eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    with pytest.raises(PromptTooLongError):
        eng.add_request([5] * 96, SamplingParams(max_tokens=5))
    with pytest.raises(UnknownAdapterError):
        eng.add_request([5, 6], SamplingParams(max_tokens=5), adapter="nope")
    with pytest.raises(InvalidRequestError):
        SamplingParams(n=2)
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=-1)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert sum(len(o.token_ids) for o in outs if o.request_id == ok) == 5
    eng.close()


def test_abort_frees_slot_and_async_stream(tiny, smol_tok):
    eng = _engine(tiny, smol_tok, max_num_seqs=2)
    a = eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.scheduler.num_free_rows == 1
    eng.abort(a)
    assert eng.scheduler.num_free_rows == 2
    assert eng.blocks.num_free == eng.blocks.num_pages - 1
    while eng.has_unfinished():
        assert all(o.request_id != a for o in eng.step())
    # streaming: leaving the generator early cancels the request
    ae = AsyncEngine(eng)

    async def consume():
        got = []
        async for out in ae.generate(
            [5, 6, 7], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        ):
            got.append(out)
            if len(got) == 3:
                break
        full = [
            o
            async for o in ae.generate(
                [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            )
        ]
        return got, full

    got, full = asyncio.run(consume())
    assert len(got) == 3 and full[-1].finished and sum(len(o.token_ids) for o in full) == 6
    assert [t for o in full[:3] for t in o.token_ids] == [t for o in got for t in o.token_ids]
    for _ in range(50):
        if eng.scheduler.num_free_rows == 2:
            break
        import time

        time.sleep(0.05)
    assert eng.scheduler.num_free_rows == 2
    ae.shutdown()


def test_logprobs_and_min_p(tiny, smol_tok):
    import jax
    import jax.numpy as jnp

    from cara_jax.sampler import SamplingArrays, sample
    from cara_jax.scoring import full_logits

    eng = _engine(tiny, smol_tok)
    prompt = [5, 9, 17, 33]
    ((ids, _, reason),) = _run(
        eng,
        [(prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True), None)],
    )
    rid = eng.add_request(
        prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    )
    lps = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid and o.logprobs:
                lps += o.logprobs
    assert [d["token_id"] for d in lps] == ids
    seq = prompt + ids
    ref = np.asarray(jax.nn.log_softmax(full_logits(tiny, np.array([seq]))[0], axis=-1))
    for i, d in enumerate(lps):
        row = ref[len(prompt) - 1 + i]
        assert len(d["top"]) == 3 and d["top"][0][0] == d["token_id"]  # greedy = top-1
        assert abs(d["logprob"] - row[d["token_id"]]) < 1e-4
        assert [t for t, _ in d["top"]] == list(np.argsort(-row)[:3])
    eng.close()
    # min_p keeps only tokens with p >= min_p * p_max
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample(logits, SamplingArrays.from_rows([(1.0, 0, 1.0, s, 0.5)]), jnp.zeros(1, jnp.int32))[0])
            for s in range(64)}  # fmt: skip
    assert seen == {0, 1}


def test_penalties(tiny, smol_tok):
    eng = _engine(tiny, smol_tok)
    prompt = [5, 9, 17, 33, 5, 9]
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = _run(eng, [(prompt, base, None)])[0][0]
    assert len(set(plain)) < len(plain)  # the random tiny model repeats itself greedily
    strong = dict(temperature=0, max_tokens=30, ignore_eos=True)
    rep = _run(eng, [(prompt, SamplingParams(repetition_penalty=10.0, **strong), None)])[0][0]
    freq = _run(
        eng, [(prompt, SamplingParams(frequency_penalty=2.0, presence_penalty=2.0, **strong), None)]
    )[0][0]
    assert rep != plain and freq != plain
    # the penalties' effect on a single step is exactly vLLM's formula
    import jax.numpy as jnp

    from cara_jax.sampler import SamplingArrays, apply_penalties

    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
    counts = jnp.array([[0, 2, 1, 0]])
    seen = jnp.array([[True, True, True, False]])
    sp = SamplingArrays.from_rows([(0.0, 0, 1.0, 0, 0.0, 0.5, 0.25, 2.0)])
    out = np.asarray(apply_penalties(logits, counts, seen, sp))[0]
    expected = [2.0 / 2, -1.0 * 2 - 0.25 * 2 - 0.5, 0.5 / 2 - 0.25 - 0.5, 3.0]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    eng.close()


def test_logit_bias(tiny, smol_tok):
    """The bias lands on the logits the step samples from: the runner-up of the first greedy
    step, pushed just past the winner, is taken; +100 on a token makes it every token; a
    biased row leaves the other rows of its batch alone."""
    import jax

    from cara_jax.scoring import full_logits

    eng = _engine(tiny, smol_tok)
    prompt, other = [5, 9, 17, 33], [7, 7, 21]
    greedy = dict(temperature=0, max_tokens=3, ignore_eos=True)
    plain, plain_other = (r[0] for r in _run(eng, [(prompt, SamplingParams(**greedy), None),
                                                   (other, SamplingParams(**greedy), None)]))  # fmt: skip
    row = np.asarray(jax.nn.log_softmax(full_logits(tiny, np.array([prompt]))[0, -1]))
    first, second = np.argsort(-row)[:2]
    assert plain[0] == first
    lift = float(row[first] - row[second]) + 0.01
    (lifted, _, _), (beside, _, _) = _run(eng, [
        (prompt, SamplingParams(logit_bias={int(second): lift}, **greedy), None),
        (other, SamplingParams(**greedy), None)])  # fmt: skip
    assert lifted[0] == second and beside == plain_other
    forced = _run(eng, [(prompt, SamplingParams(logit_bias={7: 100.0}, **greedy), None)])
    assert forced[0][0] == [7, 7, 7]
    with pytest.raises(InvalidRequestError):
        eng.add_request(prompt, SamplingParams(logit_bias={10**7: 1.0}))
    with pytest.raises(InvalidRequestError):
        SamplingParams(logit_bias={1: 101.0})
    eng.close()


def test_prompt_logprobs_equal_hf_and_peft(tiny, smol_tok, tiny_llama_dir, engine_adapters):
    """Every prompt token's log-prob given those before it (and its rank, and the top 3), for
    the base model and an adapter in one batch, over a prompt that spans two chunks, equal HF
    transformers and PEFT; a second run of the same prompt, whose blocks the prefix cache now
    holds, is scored whole all the same."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    eng = _engine(tiny, smol_tok, {"e1": engine_adapters["e1"]}, enable_prefix_caching=True)
    prompt = np.random.default_rng(3).integers(3, 500, size=80).tolist()
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    runs = {}
    for name, adapter in [("base", None), ("e1", "e1"), ("base again", None)]:
        runs[name] = eng.add_request(prompt, sp, adapter)
    got = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.prompt_logprobs is not None:
                got[o.request_id] = o.prompt_logprobs
    eng.close()

    def reference(model):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0].float()
        return torch.log_softmax(logits, -1).numpy()

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    refs = {"base": reference(hf)}
    refs["e1"] = reference(PeftModel.from_pretrained(hf, engine_adapters["e1"]).eval())
    refs["base again"] = refs["base"]
    for name, rid in runs.items():
        scores, ref = got[rid], refs[name]
        assert scores[0] is None and len(scores) == len(prompt)
        for i, e in enumerate(scores[1:], start=1):
            row = ref[i - 1]
            assert e["token_id"] == prompt[i]
            assert abs(e["logprob"] - row[prompt[i]]) <= 1e-4, (name, i)
            assert e["rank"] == 1 + int((row > row[prompt[i]]).sum())
            assert [t for t, _ in e["top"]] == list(np.argsort(-row)[:3]), (name, i)


def test_llm_score_and_generate_logprobs(tiny, smol_tok, tiny_llama_dir, engine_adapters):
    """``LLM.score``: 3 prompts x {two adapters, base} in one call, each continuation token's
    log-prob equal to HF transformers' and PEFT's; ``generate`` returns the log-probs asked."""
    import copy

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cara_jax.api import LLM

    names = ("e1", "e2")
    llm = LLM.from_engine(_engine(tiny, smol_tok, {n: engine_adapters[n] for n in names}))
    rng = np.random.default_rng(5)  # token ids: the tiny model's vocabulary is small
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (5, 9, 3)]
    conts = [rng.integers(3, 500, size=n).tolist() for n in (2, 6, 4)]
    models = [None, *names]
    batch = [(p, c, m) for m in models for p, c in zip(prompts, conts, strict=True)]
    out = llm.score([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
    gen = llm.generate([5, 9, 17], SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                  ignore_eos=True))[0]  # fmt: skip
    llm.engine.close()
    assert [e["token_id"] for e in gen.logprobs] == gen.token_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    refs = {None: hf}
    for n in names:
        refs[n] = PeftModel.from_pretrained(copy.deepcopy(hf), engine_adapters[n]).eval()
    for (p, c, m), o in zip(batch, out, strict=True):
        p_ids = p
        assert o.token_ids == c
        ids = p_ids + o.token_ids
        with torch.no_grad():
            lp = torch.log_softmax(refs[m](torch.tensor([ids])).logits[0].float(), -1).numpy()
        want = [lp[i - 1, ids[i]] for i in range(len(p_ids), len(ids))]
        np.testing.assert_allclose(o.logprobs, want, atol=1e-4, err_msg=f"{m}: {p!r}")
    assert out[0].total != out[3].total != out[6].total  # the adapters were applied


def test_adapter_gone_before_admission_fails_only_that_request(tiny, smol_tok, engine_adapters):
    # the host tier keeps only the newest adapter; no prefetch, so nothing holds e1 on arrival
    eng = _engine(tiny, smol_tok, host_budget_bytes=1, prefetch_adapters=False)
    eng.load_adapter("e1", engine_adapters["e1"])
    eng.load_adapter("e2", engine_adapters["e2"])  # evicts e1's content from the host tier
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    h1 = eng.registry.entry("e1").content_hash
    doomed = eng.add_request([5, 6, 7], sp, adapter="e1")
    fine = eng.add_request([5, 6, 7], sp, adapter="e2")
    eng.unload_adapter("e1")  # gone from the registry and the host tier before admission
    eng.pool.packed._items.pop(h1)  # and its device-layout copy (memory only: no cache_dir)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    final = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert final == {doomed: "error", fine: "length"}
    err = next(o.error for o in outs if o.request_id == doomed and o.finished)
    assert "'e1'" in err
    assert eng.scheduler.num_free_rows == eng.config.max_num_seqs
    eng.close()
    # with prefetch (the default) the request holds e1's content from its arrival: it is
    # served with what it was accepted with, as a request holding a replaced name's old content
    eng = _engine(tiny, smol_tok, host_budget_bytes=1)
    eng.load_adapter("e1", engine_adapters["e1"])
    kept = eng.add_request([5, 6, 7], sp, adapter="e1")
    eng.unload_adapter("e1")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.finish_reason for o in outs if o.finished and o.request_id == kept] == ["length"]
    eng.close()


@pytest.mark.parametrize("strategy", ["bgmv", pytest.param("mbgmv", marks=pytest.mark.slow)])
def test_no_compile_after_warmup_and_instrumentation(tiny, smol_tok, engine_adapters, strategy):
    """After warm-up, random lengths, batch sizes and adapter mixes compile nothing new."""
    from cara_jax.adapters.device_pool import PoolConfig

    eng = _engine(
        tiny, smol_tok, engine_adapters, max_num_seqs=4, max_model_len=64, max_prefill_seqs=2,
        max_num_batched_tokens=32, pool=PoolConfig(max_rank=64),
        lora_strategy=strategy, cold_start="cached",
    )  # fmt: skip
    eng.warmup()
    warm = eng.runner.compiled_count()
    assert warm == len(eng.runner.programs()) == len(eng.runner.config.token_buckets)
    assert eng.stats().ready
    rng = np.random.default_rng(1)
    reqs = [
        (rng.integers(3, 500, size=int(rng.integers(1, 60))).tolist(),
         SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 12)), ignore_eos=True),
         None if i % 4 == 0 else f"e{int(rng.integers(8))}")
        for i in range(16)
    ]  # fmt: skip
    _run(eng, reqs)
    assert eng.runner.compiled_count() == warm
    assert eng.runner.hot_compiles == 0
    # instrumentation: every step has a latency, every request its token times and rank
    assert all(r.latency_s is not None and r.latency_s >= 0 for r in list(eng.steps)[:-1])
    assert max(r.batch_size for r in eng.steps) > 1
    assert any(r.batch_size and r.prefill_tokens for r in eng.steps)  # decode beside a chunk
    recs = sorted(eng.finished_requests, key=lambda r: int(r.request_id.split("-")[1]))
    assert len(recs) == 16
    for (_, sp, adapter), r in zip(reqs, recs, strict=True):
        assert r.adapter == adapter and len(r.token_times) == sp.max_tokens
        assert (r.rank > 0) == (adapter is not None) and r.ttft > 0
    eng.close()
