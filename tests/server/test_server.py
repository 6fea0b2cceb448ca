"""The HTTP server over real loopback HTTP, part 1: generation through the official OpenAI
client and SSE (matching the Python API), sampling fields, the model list, adapters by name,
runtime loads and the adapter folder. Part 2 (errors, back-pressure, auth, metrics, schema) is
test_server_ops.py.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from cara_jax.sampling_params import SamplingParams
from server.demo import write_demo_adapter
from tests.server_helpers import (
    CHAT,
    assert_error,
    post,
    py_generate,
    side_app,
    start_server,
    wait_idle,
)

srv = pytest.fixture(scope="module")(start_server)


# ---------------------------------------------------------------------------- generation


def test_completions_match_python_api(srv):
    client = srv.client()
    prompt = "Once upon a time, in a land far away,"
    models = (srv.base, "demo-0", "demo-1")
    kw = dict(prompt=prompt, max_tokens=8, temperature=0)
    with ThreadPoolExecutor(9) as ex:  # concurrent: the engine batches them
        jobs = {
            m: (
                ex.submit(client.completions.create, model=m, **kw),
                ex.submit(lambda m=m: list(client.completions.create(model=m, stream=True, **kw))),
                ex.submit(
                    py_generate,
                    srv,
                    prompt,
                    SamplingParams(temperature=0, max_tokens=8),
                    None if m == srv.base else m,
                ),
            )
            for m in models
        }
    texts = {}
    for model, (whole, streamed, ref) in jobs.items():
        r, chunks, ref = whole.result(), streamed.result(), ref.result()
        c = r.choices[0]
        assert r.model == model and r.object == "text_completion"
        assert (c.text, r.usage.completion_tokens, c.finish_reason) == ref
        assert r.usage.prompt_tokens == len(srv.state.tokenizer.encode(prompt, True))
        assert "".join(ch.choices[0].text for ch in chunks) == c.text
        assert chunks[-1].choices[0].finish_reason == c.finish_reason
        texts[model] = c.text
    assert len(set(texts.values())) > 1, texts  # the adapters change the greedy output


def test_chat_stream_usage_and_python_api(srv):
    client = srv.client()
    ids = srv.state.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    kw = dict(messages=CHAT, temperature=0)
    with ThreadPoolExecutor(6) as ex:
        jobs = {
            m: (
                ex.submit(client.chat.completions.create, model=m, max_tokens=12, **kw),
                ex.submit(
                    lambda m=m: list(
                        client.chat.completions.create(
                            model=m,
                            max_completion_tokens=12,
                            stream=True,
                            stream_options={"include_usage": True},
                            **kw,
                        )
                    )
                ),
                ex.submit(
                    py_generate,
                    srv,
                    ids,
                    SamplingParams(temperature=0, max_tokens=12),
                    None if m == srv.base else m,
                ),
            )
            for m in (srv.base, "demo-1")
        }
    for whole, streamed, ref in jobs.values():
        r, chunks, ref = whole.result(), streamed.result(), ref.result()
        msg = r.choices[0].message
        assert (msg.content, r.usage.completion_tokens, r.choices[0].finish_reason) == ref
        assert msg.role == "assistant" and r.usage.prompt_tokens == len(ids)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref[0]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref[1]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref[2]
    assert "Paris" in jobs[srv.base][0].result().choices[0].message.content


def test_logprobs_shapes(srv):
    client = srv.client()
    r = client.completions.create(
        model=srv.base, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens).startswith(r.choices[0].text)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert val <= 0 and 3 <= len(top) <= 4 and top[tok] == pytest.approx(val)
        assert val == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top token
    s = client.completions.create(
        model=srv.base, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=3, stream=True
    )
    streamed = [t for ch in s if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == lp.tokens

    r = client.chat.completions.create(
        model="demo-0", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content)


def test_sampling_fields_seed_stop_n(srv):
    client = srv.client()
    kw = dict(
        model="demo-0",
        prompt="The weather today is",
        max_tokens=8,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        extra_body={"top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    ref_params = SamplingParams(
        temperature=1.0,
        top_p=0.9,
        top_k=50,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        min_p=0.05,
        repetition_penalty=1.1,
        max_tokens=8,
    )
    count = dict(model=srv.base, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    with ThreadPoolExecutor(6) as ex:
        a = ex.submit(client.completions.create, **kw)
        b = ex.submit(client.completions.create, **kw)
        ref = ex.submit(py_generate, srv, kw["prompt"], ref_params, "demo-0")
        greedy_job = ex.submit(client.completions.create, **count)
        many = ex.submit(
            client.completions.create,
            model=srv.base,
            prompt=["Hello", "Goodbye"],
            n=2,
            max_tokens=3,
            temperature=0.8,
            seed=7,
        )
        chat_n = ex.submit(
            lambda: list(
                client.chat.completions.create(
                    model=srv.base, messages=CHAT, n=2, max_tokens=4, temperature=0, stream=True
                )
            )
        )
    text = a.result().choices[0].text
    assert text == b.result().choices[0].text == ref.result()[0]  # seeded: reproducible

    greedy = greedy_job.result().choices[0].text
    stop = greedy.strip()[2:5]  # a stop string met inside the greedy text
    r = client.completions.create(**count, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert greedy.startswith(r.choices[0].text)

    r = many.result()
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert 0 < r.usage.completion_tokens <= 12
    tok = srv.state.tokenizer  # each prompt counted once whatever n, as OpenAI and vLLM count
    want = sum(len(tok.encode(p, True)) for p in ("Hello", "Goodbye"))
    assert r.usage.prompt_tokens == want and r.usage.prompt_tokens_details.cached_tokens <= want
    got = {0: "", 1: ""}
    for ch in chat_n.result():
        for c in ch.choices:
            got[c.index] += c.delta.content or ""
    assert got[0] == got[1] and got[0]
    with pytest.raises(openai.BadRequestError, match="choices"):
        client.completions.create(model=srv.base, prompt="x", n=17, max_tokens=1)
    wait_idle(srv)


# ---------------------------------------------------------------------------- models, adapters


def test_models_list(srv):
    models = {m.id: m for m in srv.client().models.list().data}
    assert {srv.base, "demo-0", "demo-1"} <= set(models)
    base = models[srv.base].model_dump()
    assert base["parent"] is None and base["root"].endswith(".gguf")
    for name in ("demo-0", "demo-1"):
        m = models[name].model_dump()
        assert m["parent"] == srv.base and Path(m["root"]).name == name
    assert srv.client().models.retrieve("demo-0").id == "demo-0"
    with pytest.raises(openai.NotFoundError):
        srv.client().models.retrieve("no-such-model")
    # aliases of the base model are accepted as `model`
    r = srv.client().completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt="Hi", max_tokens=1
    )
    assert r.choices[0].text is not None


def test_load_use_unload(srv):
    cfg = srv.state.engine.loaded.cfg
    write_demo_adapter(srv.lora_dir / "pkg" / "extra", cfg, rank=4, seed=99)
    url = srv.url + "/v1/load_lora_adapter"
    status, _, body = post(url, {"lora_name": "extra", "lora_path": "pkg/extra"})
    assert status == 200 and body["id"] == "extra" and body["rank"] == 4, body
    client = srv.client()
    assert "extra" in {m.id for m in client.models.list().data}
    r = client.completions.create(model="extra", prompt="Hello", max_tokens=6, temperature=0)
    ref = py_generate(srv, "Hello", SamplingParams(temperature=0, max_tokens=6), "extra")
    assert r.choices[0].text == ref[0]
    status, _, body = post(srv.url + "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert status == 200, body
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="Hello", max_tokens=2)
    status, _, body = post(srv.url + "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert status == 404
    assert_error(body, "model_not_found")


def test_runtime_lora_needs_lora_dir_or_the_flag(srv, tmp_path):
    """Without --lora-dir, runtime loads read any path the process can: refused unless
    --allow-runtime-lora (vLLM's rule)."""
    write_demo_adapter(tmp_path / "free", srv.state.engine.loaded.cfg, rank=4, seed=7)
    load = {"lora_name": "free", "lora_path": str(tmp_path / "free")}
    closed = side_app(srv, lora_dir=None)
    opened = side_app(srv, lora_dir=None, allow_runtime_lora=True)
    try:
        for path, body in (("load", load), ("unload", {"lora_name": "demo-0"})):
            status, _, resp = post(f"{closed.url}/v1/{path}_lora_adapter", body)
            assert status == 403, resp
            assert_error(resp, "runtime_lora_disabled")
            assert "--allow-runtime-lora" in resp["error"]["message"]
        assert "free" not in srv.state.adapters.registered()
        assert "demo-0" in srv.state.adapters.registered()
        status, _, resp = post(opened.url + "/v1/load_lora_adapter", load)
        assert status == 200 and resp["rank"] == 4, resp
        status, _, resp = post(opened.url + "/v1/unload_lora_adapter", {"lora_name": "free"})
        assert status == 200, resp
    finally:
        closed.stop()
        opened.stop()


def test_load_refusals(srv):
    cfg = srv.state.engine.loaded.cfg
    bad = srv.lora_dir / "dora"
    write_demo_adapter(bad, cfg, rank=4, seed=5)
    conf = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    tokens = srv.lora_dir / "tokens"  # an adapter that saves its own embedding (new tokens)
    write_demo_adapter(tokens, cfg, rank=4, seed=6)
    (tokens / "adapter_config.json").write_text(
        json.dumps({**conf, "modules_to_save": ["embed_tokens"]}))
    url = srv.url + "/v1/load_lora_adapter"
    cases = [
        ({"lora_name": "d", "lora_path": "dora"}, "DoRA"),
        ({"lora_name": "d", "lora_path": "tokens"}, "adds or retrains tokens"),
        ({"lora_name": "d", "lora_path": "missing"}, "no adapter folder"),
        ({"lora_name": "d", "lora_path": "../outside"}, ".."),
        ({"lora_name": "d", "lora_path": "/etc"}, "outside"),
        ({"lora_name": srv.base, "lora_path": "dora"}, "base model"),
        ({"lora_name": "a,b", "lora_path": "dora"}, "commas"),
        ({"lora_name": "d"}, "lora_path"),
    ]
    for body, why in cases:
        status, _, resp = post(url, body)
        assert status == 400, (body, resp)
        assert_error(resp)
        assert why.lower() in resp["error"]["message"].lower(), (why, resp)
    assert "d" not in srv.state.adapters.registered()


def test_lora_dir_lazy_load_and_escapes(srv, tmp_path):
    cfg = srv.state.engine.loaded.cfg
    write_demo_adapter(srv.lora_dir / "lazy-a", cfg, rank=4, seed=11)
    client = srv.client()
    r = client.completions.create(model="lazy-a", prompt="Hello", max_tokens=3, temperature=0)
    assert r.model == "lazy-a" and "lazy-a" in srv.state.adapters.registered()

    outside = tmp_path / "outside"
    write_demo_adapter(outside, cfg, rank=4, seed=12)
    os.symlink(outside, srv.lora_dir / "link-out")  # a folder symlink leaving the folder
    sneaky = srv.lora_dir / "sneaky"
    sneaky.mkdir()
    shutil.copy(outside / "adapter_config.json", sneaky)
    os.symlink(outside / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    for name in ("../outside", "link-out", "sneaky", str(outside), "a/../../b"):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=name, prompt="Hello", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-there", prompt="Hello", max_tokens=1)
    assert not {"link-out", "sneaky"} & set(srv.state.adapters.registered())


# ---------------------------------------------------------------------------- lora mixtures

MIX_SPECS = {
    "mx8_attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mx16_mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
DORA_SPECS = {
    "dx8_attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "dx16_mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
# LoRA on the embedding and the LM head (SmolLM2 ties them: PEFT keeps the two LoRAs apart)
VOCAB_SPECS = {
    "vx8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
}
MIX_PROMPT = "The quick brown fox jumps over"


def test_lora_scale_and_mixtures_match_peft(srv, hf_smollm, smol_tok):
    """``lora`` entries, DoRA adapters and LoRA on the embedding and LM head through the openai
    client, in one batch with a plain adapter and base rows: greedy text equals PEFT's (a scale
    and a mixture are PEFT's cat at those weights; scale 0 is the base model; DoRA rows are
    PEFT's DoRA, a DoRA mixture its cat merge) and each token's log-prob equals PEFT's."""
    import copy

    import numpy as np
    import torch

    from tests.helpers import make_dora_adapters, make_peft_adapters, peft_mixed

    paths = make_peft_adapters(lambda: copy.deepcopy(hf_smollm), srv.lora_dir, MIX_SPECS,
                               seed=31, scale=2.0)  # fmt: skip
    dora = make_dora_adapters(lambda: copy.deepcopy(hf_smollm), srv.lora_dir, DORA_SPECS, seed=41)
    vocab = make_peft_adapters(lambda: copy.deepcopy(hf_smollm), srv.lora_dir, VOCAB_SPECS,
                               seed=51, scale=0.1)  # fmt: skip
    peft_model = peft_mixed(copy.deepcopy(hf_smollm), {**paths, **dora, **vocab})
    peft_model.add_weighted_adapter(["mx8_attn"], [0.5], "s_half", combination_type="cat")
    peft_model.add_weighted_adapter(["mx8_attn", "mx16_mlp"], [0.7, -0.4], "mix_a",
                                    combination_type="cat")  # fmt: skip
    peft_model.add_weighted_adapter(["dx8_attn", "dx16_mlp"], [0.6, 0.5], "dmix",
                                    combination_type="cat")  # fmt: skip
    peft_model.add_weighted_adapter(["vx8", "mx16_mlp"], [0.8, 0.5], "vmix",
                                    combination_type="cat")  # fmt: skip
    rows = [  # (PEFT's adapter, model, lora)
        ("__base__", srv.base, None),
        ("mx8_attn", "mx8_attn", None),
        ("s_half", srv.base, [{"name": "mx8_attn", "scale": 0.5}]),
        ("__base__", srv.base, [{"name": "mx16_mlp", "scale": 0}]),
        ("mix_a", srv.base, [{"name": "mx8_attn", "scale": 0.7}, {"name": "mx16_mlp", "scale": -0.4}]),
        ("dx8_attn", "dx8_attn", None),
        ("dmix", srv.base, [{"name": "dx8_attn", "scale": 0.6}, {"name": "dx16_mlp", "scale": 0.5}]),
        ("vx8", "vx8", None),
        ("vmix", srv.base, [{"name": "vx8", "scale": 0.8}, {"name": "mx16_mlp", "scale": 0.5}]),
    ]  # fmt: skip
    client = srv.client()
    n = 8
    with ThreadPoolExecutor(len(rows)) as ex:
        jobs = [ex.submit(client.completions.create, model=model, prompt=MIX_PROMPT, max_tokens=n,
                          temperature=0, logprobs=1, extra_body={"lora": lora} if lora else None)
                for _, model, lora in rows]  # fmt: skip
    outs = [j.result().choices[0] for j in jobs]
    ids = smol_tok.encode(MIX_PROMPT, add_special_tokens=True)

    def peft_rows(names, **kw):
        """PEFT's greedy tokens and log-probs for rows of the one prompt, as one batch."""
        with torch.no_grad():
            x = torch.tensor([ids] * len(names))
            gen = peft_model.generate(input_ids=x, max_new_tokens=n, do_sample=False, **kw)
            lp = torch.log_softmax(peft_model(gen, **kw).logits.double(), -1).numpy()
        return {nm: (gen[i, len(ids):].tolist(), lp[i]) for i, nm in enumerate(names)}

    # PEFT's mixed batches take adapter names per row, but run DoRA one adapter at a time
    batched = [name for name, _, _ in rows if name not in ("dx8_attn", "dmix")]
    ref = peft_rows(batched, adapter_names=batched)
    for name in ("dx8_attn", "dmix"):
        peft_model.set_adapter(name)
        ref.update(peft_rows([name]))
    texts = {}
    for (name, _, _), out in zip(rows, outs, strict=True):
        gen, lp = ref[name]
        assert out.text == smol_tok.decode(gen), name
        want = [lp[len(ids) - 1 + k, t] for k, t in enumerate(gen)]
        # 1e-4: float32 over SmolLM2's 30 layers; the plain adapter's row is at 7e-5 here too
        # (the tiny model's engine test holds every row, mixtures included, to 1e-5)
        assert np.max(np.abs(np.array(out.logprobs.token_logprobs) - want)) <= 1e-4, name
        texts[name] = (out.text, tuple(round(v, 3) for v in out.logprobs.token_logprobs))
    keys = ("__base__", "mx8_attn", "s_half", "mix_a", "dx8_attn", "dmix", "vx8", "vmix")
    assert len({texts[k] for k in keys}) == len(keys)  # all differ
    errors = [  # (lora, model, status, param)
        ([{"name": "mx8_attn"}], "mx8_attn", 400, "lora"),  # an adapter model and a list
        ([{"name": "nope"}], srv.base, 404, None),
        ([{"name": "mx8_attn", "scale": "big"}], srv.base, 400, "lora"),
        ([{"name": srv.base}], srv.base, 400, "lora"),
        ([{"name": f"a{i}"} for i in range(5)], srv.base, 400, "lora"),  # over --max-lora-entries
        ([], srv.base, 400, "lora"),
        ("mx8_attn", srv.base, 400, "lora"),
        ([{"name": "dx8_attn"}, {"name": "mx16_mlp"}], srv.base, 400, "lora"),  # DoRA + plain
    ]
    for lora, model, status, param in errors:
        code, _, body = post(srv.url + "/v1/completions",
                             {"model": model, "prompt": "hi", "max_tokens": 2, "lora": lora})  # fmt: skip
        assert code == status, (lora, body)
        assert_error(body)
        if param:
            assert body["error"]["param"] == param, body
    wait_idle(srv)
