"""The bench suite: seeded workloads, metrics, the GGUF LoRA converter, the experiment plumbing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench.lib import metrics
from bench.lib.metrics import RequestResult, Slo
from bench.lib.workload import (
    LengthDist,
    Request,
    Trace,
    WorkloadSpec,
    generate,
    load_jsonl,
    save_jsonl,
)

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------- workload


def test_generate_is_seeded_and_deterministic():
    spec = WorkloadSpec(num_requests=50, popularity="zipf", arrival="gamma", cv=2.0)
    a, b = generate(spec), generate(spec)
    assert [r.to_dict() for r in a.requests] == [r.to_dict() for r in b.requests]
    c = generate(dataclasses.replace(spec, seed=1))
    assert [r.prompt for r in c.requests] != [r.prompt for r in a.requests]
    # aspects draw from separate streams: a new arrival process keeps prompts and adapters
    d = generate(dataclasses.replace(spec, arrival="poisson"))
    assert [(r.prompt, r.adapter) for r in d.requests] == [
        (r.prompt, r.adapter) for r in a.requests
    ]
    assert [r.arrival for r in d.requests] != [r.arrival for r in a.requests]


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 3.0)])
def test_arrival_rate_and_burstiness(arrival, cv):
    t = generate(WorkloadSpec(num_requests=20_000, arrival=arrival, rate=5.0, cv=cv, seed=3))
    gaps = np.diff([r.arrival for r in t.requests])
    assert t.requests[0].arrival == 0.0
    assert abs(gaps.mean() - 0.2) < 0.2 * 0.05
    assert abs(gaps.std() / gaps.mean() - cv) < 0.1 * cv


def test_burst_arrivals_all_at_zero():
    t = generate(WorkloadSpec(num_requests=8, arrival="burst"))
    assert {r.arrival for r in t.requests} == {0.0}


def test_popularity():
    n = 20_000
    rr = generate(WorkloadSpec(num_requests=12, num_adapters=12, popularity="round_robin"))
    assert [r.adapter for r in rr.requests] == [f"a{i}" for i in range(12)]
    z = generate(WorkloadSpec(num_requests=n, num_adapters=10, popularity="zipf", zipf_alpha=1.0))
    share0 = Counter(r.adapter for r in z.requests)["a0"] / n
    assert abs(share0 - 1 / sum(1 / k for k in range(1, 11))) < 0.02
    u = Counter(r.adapter for r in generate(WorkloadSpec(num_requests=n, num_adapters=4)).requests)
    assert all(abs(c / n - 0.25) < 0.02 for c in u.values())
    m = generate(WorkloadSpec(num_requests=n, num_adapters=500, popularity="maf", seed=2))
    counts = sorted(Counter(r.adapter for r in m.requests).values(), reverse=True)
    assert sum(counts[:93]) / n > 0.9  # the 18.6% most popular adapters take most requests


def test_rank_mix():
    spec = WorkloadSpec(num_requests=10, num_adapters=4000, ranks=(8, 64), rank_weights=(3, 1))
    t = generate(spec)
    share8 = sum(r == 8 for r in t.adapter_ranks.values()) / 4000
    assert abs(share8 - 0.75) < 0.03
    assert all(r.rank == t.adapter_ranks[r.adapter] for r in t.requests)
    cyc = generate(WorkloadSpec(num_adapters=6, ranks=(8, 16, 32), rank_assign="cycle"))
    assert list(cyc.adapter_ranks.values()) == [8, 16, 32, 8, 16, 32]


@pytest.mark.parametrize(
    "dist",
    [
        LengthDist("fixed", 40),
        LengthDist("uniform", 80, 32, 128),
        LengthDist("lognormal", 96, 1, 100_000, 0.6),
    ],
)
def test_length_means(dist):
    v = dist.sample(np.random.default_rng(0), 20_000)
    assert v.min() >= 1
    assert abs(v.mean() - dist.expected()) < 0.03 * dist.expected()


def test_length_parse_and_clip():
    assert LengthDist.parse("64") == LengthDist("fixed", 64)
    assert LengthDist.parse("uniform:32:128") == LengthDist("uniform", 80, 32, 128)
    d = LengthDist.parse("lognormal:96:0.6:8:256")
    v = d.sample(np.random.default_rng(0), 5000)
    assert v.min() >= 8 and v.max() <= 256
    with pytest.raises(ValueError):
        LengthDist.parse("poisson:3")


def test_prompts_in_vocab_and_lengths():
    spec = WorkloadSpec(
        num_requests=30, vocab_size=1000, output_len=LengthDist("uniform", 6, 2, 10)
    )
    t = generate(spec)
    assert all(100 <= x < 900 for r in t.requests for x in r.prompt)
    assert all(32 <= len(r.prompt) <= 128 and 2 <= r.max_tokens <= 10 for r in t.requests)


def test_jsonl_round_trip(tmp_path):
    spec = WorkloadSpec(
        num_requests=20, popularity="maf", prompt_len=LengthDist.parse("lognormal:50:0.5")
    )
    t = generate(spec)
    p = save_jsonl(t, tmp_path / "t.jsonl")
    lines = p.read_text().splitlines()
    assert len(lines) == 21 and "header" in json.loads(lines[0])
    back = load_jsonl(p)
    assert back.spec == spec
    assert back.adapter_ranks == t.adapter_ranks
    assert [r.to_dict() for r in back.requests] == [r.to_dict() for r in t.requests]
    assert generate(back.spec).requests == t.requests  # the header regenerates the trace


def test_spec_validation():
    with pytest.raises(ValueError):
        WorkloadSpec(arrival="uniform")
    with pytest.raises(ValueError):
        WorkloadSpec(ranks=(8, 16), rank_weights=(1.0,))


# ---------------------------------------------------------------------------- metrics


def _rec(i, arrival, times, ok=True):
    return RequestResult(f"r{i}", arrival, times, ok, None if ok else "boom")


def test_metrics_on_hand_made_records():
    res = [
        _rec(0, 0.0, [0.5, 0.6, 0.7, 0.8]),  # ttft 0.5, tpot 0.1, e2e 0.8
        _rec(1, 1.0, [3.0, 3.5]),  # ttft 2.0, tpot 0.5, e2e 2.5
        _rec(2, 1.0, [], ok=False),
    ]
    s = metrics.summarize(res, Slo(ttft_s=1.0, tpot_s=0.2))
    assert s["requests"] == 3 and s["ok"] == 2 and s["errors"] == 1
    assert s["output_tokens"] == 6
    assert s["makespan_s"] == pytest.approx(3.5)
    assert s["throughput_tok_s"] == pytest.approx(6 / 3.5)
    assert s["throughput_req_s"] == pytest.approx(2 / 3.5)
    assert s["ttft_p50"] == pytest.approx(1.25)
    assert s["ttft_mean"] == pytest.approx(1.25)
    assert s["tpot_p50"] == pytest.approx(0.3)
    assert s["e2e_p99"] == pytest.approx(0.8 + 0.99 * (2.5 - 0.8))
    # decode: 3 + 1 tokens after the first, from the first first-token (0.5) to 3.5
    assert s["decode_tok_s"] == pytest.approx(4 / 3.0)
    assert s["slo_ttft"] == pytest.approx(1 / 3)  # the failed request is a miss
    assert s["slo_tpot"] == pytest.approx(1 / 3)
    assert s["slo_both"] == pytest.approx(1 / 3)


def test_metrics_empty_and_one_token():
    s = metrics.summarize([_rec(0, 0.0, [0.2])])
    assert (
        math.isnan(s["tpot_p50"]) and s["slo_tpot"] == 1.0 and s["ttft_p50"] == pytest.approx(0.2)
    )
    e = metrics.summarize([])
    assert e["requests"] == 0 and math.isnan(e["throughput_tok_s"])


def test_ratios_direction():
    ours = {"throughput_tok_s": 400.0, "ttft_p50": 0.5, "tpot_p50": 0.02, "slo_both": 1.0}
    base = {"throughput_tok_s": 100.0, "ttft_p50": 2.0, "tpot_p50": 0.2, "slo_both": 0.5}
    r = metrics.ratios(ours, base)
    assert r["throughput_tok_s"] == 4.0 and r["ttft_p50"] == 4.0 and r["tpot_p50"] == 10.0
    assert r["slo_both"] == 2.0 and math.isnan(r["e2e_p50"])


def test_result_round_trip():
    r = RequestResult("x", 0.1, [0.2, 0.3], True, None, "a1", 16, True, 9)
    assert RequestResult.from_dict(r.to_dict()) == r


# ---------------------------------------------------------------------------- llama.cpp adapter


def test_permute_rotary_inverts_the_loaders_unpermute():
    from bench.systems.llamacpp import permute_rotary
    from cara_jax.weights import unpermute_rotary

    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    assert np.array_equal(unpermute_rotary(permute_rotary(w, 3), 3), w)
    assert not np.array_equal(permute_rotary(w, 3), w)


def _tiny_cfg():
    from cara_jax.config import ModelConfig

    return ModelConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_layers=30,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )


def test_peft_to_gguf_layout(tmp_path):
    import gguf

    from bench.systems.common import TARGET_SETS
    from bench.systems.llamacpp import peft_to_gguf
    from cara_jax.adapters.random_peft import write_random_peft

    cfg = _tiny_cfg()
    d = write_random_peft(tmp_path / "ad", cfg, 8, seed=1, targets=TARGET_SETS["qkvo"])
    out = peft_to_gguf(d, tmp_path / "ad.gguf", cfg.num_heads, cfg.num_kv_heads)
    r = gguf.GGUFReader(str(out))

    def field(k):
        f = r.fields[k]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(v[0])

    assert field("general.type") == "adapter"
    assert field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    assert field("adapter.lora.alpha") == 16.0
    t = {x.name: x for x in r.tensors}
    assert len(t) == 2 * 4 * cfg.num_layers
    # GGUF lists dims fastest first: lora_a is [in, r], lora_b is [r, out], as llama.cpp checks
    assert list(t["blk.0.attn_q.weight.lora_a"].shape) == [cfg.hidden_size, 8]
    assert list(t["blk.3.attn_k.weight.lora_b"].shape) == [8, cfg.num_kv_heads * cfg.head_dim]
    assert list(t["blk.29.attn_output.weight.lora_b"].shape) == [8, cfg.hidden_size]


@pytest.mark.slow
def test_llamacpp_adapter_changes_logits_like_peft(tmp_path, hf_smollm):
    """The converted adapter moves llama.cpp's logits the way PEFT moves HF's (same direction;
    the bases differ by llama.cpp's Q4_1 arithmetic)."""
    pytest.importorskip("llama_cpp")
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file, save_file

    from bench.systems.common import RunOptions, model_config
    from bench.systems.llamacpp import LlamaCppSystem
    from cara_jax.adapters.random_peft import write_random_peft

    cfg = model_config()
    d = write_random_peft(tmp_path / "x", cfg, 16, seed=3)
    st = d / "adapter_model.safetensors"
    save_file({k: v * 30 if "lora_B" in k else v for k, v in load_file(str(st)).items()}, str(st))
    prompt = [1, *range(200, 240)]
    sys_ = LlamaCppSystem(RunOptions(progress=False))
    sys_.start({"x": d}, 128)
    try:
        l0, l1 = sys_.last_logits(prompt, None), sys_.last_logits(prompt, "x")
    finally:
        sys_.close()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        h0 = hf_smollm(ids).logits[0, -1].double().numpy()
        peft = PeftModel.from_pretrained(hf_smollm, str(d))
        h1 = peft(ids).logits[0, -1].double().numpy()
        peft.unload()
    dl, dh = l1 - l0, h1 - h0
    assert np.linalg.norm(dh) > 10 * np.linalg.norm(h0 - l0)  # the adapter matters
    assert dl @ dh / np.linalg.norm(dl) / np.linalg.norm(dh) > 0.99
    assert abs(np.linalg.norm(dl) / np.linalg.norm(dh) - 1) < 0.05
    assert l1.argmax() == h1.argmax()


# ---------------------------------------------------------------------------- experiments


class _FakeSystem:
    """Serves every request instantly with a fixed token rate: tests the plumbing only."""

    def __init__(self, name: str, tok_s: float) -> None:
        self.name, self.tok_s, self.info = name, tok_s, {"fake": True}

    def start(self, adapters, max_context):
        assert all((Path(p) / "adapter_config.json").is_file() for p in adapters.values())

    def replay(self, trace: Trace, desc: str = ""):
        dt = 1.0 / self.tok_s
        return [
            RequestResult(
                r.id,
                r.arrival,
                [r.arrival + 0.1 + k * dt for k in range(r.max_tokens)],
                adapter=r.adapter,
                rank=r.rank,
                cold=False,
            )
            for r in trace.requests
        ]

    def close(self):
        pass


def _args(argv):
    from bench.experiments.runner import add_run_args

    ap = argparse.ArgumentParser()
    add_run_args(ap)
    return ap.parse_args(argv)


def test_experiment_plumbing_writes_reports(tmp_path, monkeypatch):
    from bench.experiments import runner as experiments

    monkeypatch.setattr(experiments, "model_config", _tiny_cfg)
    speeds = {"cara": 100.0, "hf": 25.0}
    monkeypatch.setattr(
        experiments,
        "make_system",
        lambda key, opts, label=None: _FakeSystem(label or key, speeds[key]),
    )
    args = _args(
        [
            "load_sweep",
            "--quick",
            "--systems",
            "cara,hf",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--save-traces",
            "--in-process",  # the fake systems are patched into this process
        ]
    )
    rep = experiments.run_cli(args)
    assert set(rep["systems"]) == {"cara-jax", "HF+PEFT"}
    assert len(rep["ratios"]) == 2  # two rates, one baseline
    for r in rep["ratios"]:
        assert r["ratios"]["tpot_p50"] == pytest.approx(4.0)
    for name in (
        "load_sweep_quick.md",
        "load_sweep_quick.json",
        "load_sweep_quick.png",
        "load_sweep_quick_requests.json",
        "traces/load_sweep_quick_0.jsonl",
    ):
        assert (tmp_path / name).is_file(), name
    text = (tmp_path / "load_sweep_quick.md").read_text()
    assert "| cara-jax | " in text and "4.00×" in text
    for f in tmp_path.glob("*.*"):
        body = f.read_bytes()
        assert str(ROOT).encode() not in body and b"/tmp/" not in body, f.name
    json.loads((tmp_path / "load_sweep_quick.json").read_text())  # strict JSON (no NaN)


def test_experiment_skips_an_unavailable_system(tmp_path, monkeypatch):
    from bench.experiments import runner as experiments
    from bench.systems import SystemUnavailable

    class Missing(_FakeSystem):
        def start(self, adapters, max_context):
            raise SystemUnavailable(f"not built here ({ROOT / 'build'})")

    monkeypatch.setattr(experiments, "model_config", _tiny_cfg)
    monkeypatch.chdir(ROOT)  # the repo root is what the report must not name
    monkeypatch.setattr(
        experiments,
        "make_system",
        lambda key, opts, label=None: (
            _FakeSystem(label, 50.0) if key == "cara" else Missing(label, 1.0)
        ),
    )
    args = _args(
        [
            "serving",
            "--quick",
            "--systems",
            "cara,llamacpp",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--in-process",
        ]
    )
    rep = experiments.run_cli(args)
    assert list(rep["skipped"]) == ["llama.cpp"]
    assert (
        "Skipped llama.cpp: not built here (<repo>/build)"
        in (tmp_path / "serving_quick.md").read_text()
    )  # the report names no local path
    assert str(ROOT) not in (tmp_path / "serving_quick.json").read_text()


def test_scrub_names_a_repo_under_the_temp_folder(tmp_path, monkeypatch):
    """A checkout under the temp folder is ``<repo>``: the longer path is replaced first."""
    from bench.experiments import report as experiment_report

    repo = tmp_path / "clone" / "repo"
    repo.mkdir(parents=True)
    monkeypatch.setattr(experiment_report.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(experiment_report, "REPO_ROOT", repo)
    monkeypatch.chdir(repo)
    text = f"not built here ({repo / 'build'}); log {tmp_path / 'x.log'}"
    assert experiment_report._scrub(text) == "not built here (<repo>/build); log <tmp>/x.log"
    monkeypatch.chdir(tmp_path)  # the repo root is known without being the working folder
    assert experiment_report._scrub(str(repo / "build")) == "<repo>/build"


@pytest.mark.parametrize("flag", ["--num-slots", "--max-num-seqs"])
def test_cara_engine_flags(flag):
    from bench.experiments.runner import build_plan

    args = _args(["serving", "--quick", flag, "6", "--max-prefill-batch", "3",
                  "--max-num-batched-tokens", "128", "--kv-cache-memory", "64M"])  # fmt: skip
    o = build_plan("serving", args).cara[0][1]
    assert (o.max_num_seqs, o.max_batch, o.max_prefill_seqs) == (6, 6, 3)
    assert (o.max_num_batched_tokens, o.kv_cache_memory) == (128, 64 << 20)
    d = build_plan("serving", _args(["serving", "--quick"])).cara[0][1]
    assert (d.max_num_seqs, d.max_prefill_seqs, d.max_num_batched_tokens) == (4, 2, None)


def test_benches_run_cara_serve_defaults():
    """No option set: the engine cara-serve builds with no flag; options become its flags."""
    from bench.experiments.runner import build_plan
    from bench.systems.common import RunOptions, cara_flags
    from server.cli import build_parser, engine_config

    assert cara_flags(RunOptions()) == []
    assert cara_flags(build_plan("serving", _args(["serving"])).cara[0][1]) == []
    assert cara_flags(build_plan("load_sweep", _args(["load_sweep"])).cara[0][1]) == []
    quick = build_plan("serving", _args(["serving", "--quick"])).cara[0][1]
    flags = cara_flags(quick)
    assert flags == ["--max-num-seqs", "4", "--max-prefill-seqs", "2"]
    cfg = engine_config(build_parser().parse_args(flags))
    assert (cfg.max_num_seqs, cfg.max_prefill_seqs, cfg.cold_start) == (4, 2, "auto")


def test_kv_cache_bytes_holds_every_context():
    from bench.systems.common import kv_cache_bytes

    per_token = 2 * 30 * 2 * 16 * 4  # K and V, layers, KV heads, head dim, float32
    assert kv_cache_bytes(_tiny_cfg(), np.float32, 2, 20) == (2 * 2 + 1) * 16 * per_token


def test_server_engine_flags_follow_the_servers_spelling():
    from bench.lib.serve_flags import engine_flags

    warm = {"--warmup": ("full", "none")}
    old = {"--num-slots": None, "--max-len": None, "--max-prefill-batch": None, **warm}
    new = {"--max-num-seqs": None, "--max-model-len": None, "--max-prefill-seqs": None,
           "--kv-cache-memory": None, **warm}  # fmt: skip
    kw = dict(max_num_seqs=4, max_model_len=128, max_prefill_seqs=1, kv_cache_memory=1024)
    assert engine_flags("full", old, **kw) == [
        "--num-slots", "4", "--max-len", "128", "--max-prefill-batch", "1", "--warmup", "full",
    ]  # fmt: skip
    assert engine_flags(None, new, **kw, max_num_batched_tokens=None) == [
        "--max-num-seqs", "4", "--max-model-len", "128", "--max-prefill-seqs", "1",
        "--kv-cache-memory", "1024",
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        engine_flags("cover", new, **kw)
    with pytest.raises(SystemExit):
        engine_flags(None, warm, max_num_seqs=4)
    assert engine_flags(None, max_num_seqs=4, max_model_len=64)[1::2] == ["4", "64"]  # real parser


def test_cold_start_plan_has_four_modes():
    from bench.experiments.runner import build_plan

    plan = build_plan("cold_start", _args(["cold_start", "--quick"]))
    assert [o.cold_start for _, o in plan.cara] == ["sync", "cached", "cpu_assist", "auto"]
    assert all(o.link_gbps == 10.0 and o.host_budget_bytes == 32 << 20 for _, o in plan.cara)
    spec = plan.points[0].spec
    assert spec.popularity == "round_robin" and spec.num_adapters == spec.num_requests


@pytest.mark.slow
def test_cli_serving_quick_cara_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "serving",
            "--quick",
            "--systems",
            "cara",
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "serving_quick.json").read_text())
    s = rep["systems"]["cara-jax"]["points"][0]
    assert s["summary"]["errors"] == 0 and s["summary"]["output_tokens"] == 4 * 8
    assert s["info"]["hot_compiles_during_replay"] == 0
    assert (tmp_path / "serving_quick.png").is_file()


def test_request_dataclass_is_plain():
    r = Request("r0", 0.0, "a0", 8, [1, 2], 4)
    assert r.to_dict() == {
        "id": "r0",
        "arrival": 0.0,
        "adapter": "a0",
        "rank": 8,
        "prompt": [1, 2],
        "max_tokens": 4,
    }


def test_engine_poisson_keeps_its_old_flags():
    from bench.engine_poisson import translate

    assert translate(["--requests", "8", "--new-tokens", "4", "--no-hf", "--warmups", "2"]) == [
        "run", "engine_poisson", "--requests", "8", "--output-len", "4", "--systems", "cara",
    ]  # fmt: skip


class _ChildJob:
    """Stands in for experiments._SystemJob in a spawned process (picklable, module level)."""

    label = "child"

    def __init__(self, crash: bool) -> None:
        self.crash = crash

    def __call__(self):
        import os

        if self.crash:
            os._exit(3)  # like LLVM aborting the process
        return None, {"pid": os.getpid()}, [[{"ok": True}]]


def test_each_system_runs_in_its_own_process():
    import os

    from bench.experiments.runner import _isolated

    skipped, entry, raw = _isolated(_ChildJob(crash=False))
    assert skipped is None and entry["pid"] != os.getpid() and raw == [[{"ok": True}]]
    skipped, entry, raw = _isolated(_ChildJob(crash=True))  # the run goes on without it
    assert "process failed" in skipped and entry == {} and raw == []


def test_bench_front_door(capsys):
    """`python -m bench list` names the runnable benches without importing them; `NAME` runs
    one; an unknown name is a usage error."""
    from bench.__main__ import main, runnable_modules

    mods = runnable_modules()
    assert {"adapter_cost", "many_adapters", "simulate"} <= set(mods)
    assert all(line for line in mods.values())
    assert main(["list"]) == 0
    assert "adapter_cost" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["adapter_cost", "--help"])
    assert e.value.code == 0 and "adapter_cost" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["no_such_bench"])
    assert e.value.code == 2


def test_a_rewritten_report_keeps_its_hand_written_notes(tmp_path):
    from bench.lib.report import NOTES, save_report

    save_report(tmp_path / "r", "# run 1\n| a | 1 |", {"run": 1})
    md = tmp_path / "r.md"
    md.write_text(md.read_text() + f"\n{NOTES}\nAn earlier run's row, and what the numbers mean.\n")
    save_report(tmp_path / "r", "# run 2\n| a | 2 |", {"run": 2})
    text = md.read_text()
    assert text.startswith("# run 2") and "run 1" not in text
    assert text.endswith(f"{NOTES}\nAn earlier run's row, and what the numbers mean.\n")
