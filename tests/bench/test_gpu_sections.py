"""The GPU check script (bench/gpu_check.py) in smoke mode: its kernel sections, and the
end-to-end sections (cold-start TTFT, multi-adapter throughput)."""

from __future__ import annotations

import json

import pytest

from bench.gpu import sections as gpu_sections


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


@pytest.mark.slow
def test_gpu_sections_smoke(tmp_path):
    from bench import gpu_check

    sections = "cold_start,e2e_throughput"
    assert gpu_check.main(["--out", str(tmp_path), "--smoke", "--sections", sections]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data["sections"]) == {"cold_start", "e2e_throughput"}

    cold = data["sections"]["cold_start"]
    plan = gpu_sections.cold_plan(smoke=True)
    assert [(r["case"], r["rank"]) for r in cold] == plan.cases
    for r in cold:
        assert r["ok"] is True
        for mode in gpu_sections.MODES:
            assert _positive(r[f"{mode}_ms"]), r
        assert r["cpu_assist/cached"].endswith("x") and r["sync/cached"].endswith("x")
        n = 2 * r["requests"]  # sync and cpu_assist: every request met a cold adapter
        assert r["notes"].startswith(f"cold {n}/{n}")
        assert "compiles while timed" not in r["notes"]

    tput = {r["config"]: r for r in data["sections"]["e2e_throughput"]}
    assert set(tput) == {"base", "bgmv", "mbgmv"}
    for r in tput.values():
        assert r["ok"] is True and not r["note"], r
        for k in ("tok/s", "decode_tok/s", "TPOT_ms", "TTFT_ms"):
            assert _positive(r[k]), (k, r)
    assert tput["base"]["adapters"] == 0 and tput["bgmv"]["adapters"] == r["requests"]

    text = (tmp_path / "gpu_check.md").read_text()
    assert "## Cold-start TTFT by mode" in text and "## Decode throughput" in text
    assert "| one at a time | 16 |" in text and "| mbgmv |" in text


def test_sections_honour_the_deadline():
    """Past the deadline both sections skip their cases (with a note) instead of running them."""
    from bench.gpu.ctx import Ctx

    ctx = Ctx(smoke=True, interpret=True, repeats=1, device="cpu", deadline=0.0)
    cold = gpu_sections.cold_start_section(ctx)
    assert len(cold) == len(gpu_sections.cold_plan(smoke=True).cases)
    assert all(r[f"{m}_ms"] == "skipped: time budget" for r in cold for m in gpu_sections.MODES)
    tput = gpu_sections.e2e_throughput_section(ctx)
    assert [r["config"] for r in tput] == ["base", "bgmv", "mbgmv"]
    assert all(r["note"] == "skipped: time budget" for r in tput)


@pytest.mark.slow
def test_lora_step_section_smoke(tmp_path):
    """The engine step layout on the Pallas kernels (interpreter here) agrees with jnp."""
    from bench import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--smoke", "--sections", "lora_step"]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["lora_step"]
    assert [r["strategy"] for r in rows] == ["mbgmv", "bgmv"]
    for r in rows:
        assert r["ok"] is True and float(r["rel_err"]) <= 1e-4, r
        assert _positive(r["pallas_ms"]) and _positive(r["base_only_ms"]), r


def test_gpu_check_smoke(tmp_path):
    """The GPU check script runs end to end in the interpreter and its checks pass."""
    from bench import gpu_check

    # the engine-level sections have their own (slow) smoke tests above
    assert (
        gpu_check.main(["--out", str(tmp_path), "--smoke", "--sections", "hbm,lora_kernels"]) == 0
    )
    text = (tmp_path / "gpu_check.md").read_text()
    for kernel in ("bgmv", "mbgmv", "sgmv"):
        assert f"| {kernel} |" in text
    assert (tmp_path / "gpu_check.json").is_file()
