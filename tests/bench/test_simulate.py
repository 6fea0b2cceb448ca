"""The fleet simulator (bench/simulate.py): deterministic, ranks matter, its CLI."""

from __future__ import annotations

import json
from pathlib import Path

from cara_jax.scheduling import synthetic_gpu_cost_model

REPO = Path(__file__).resolve().parents[2]


def test_simulator_is_deterministic_and_ranks_matter():
    from bench.simulate import Lengths, Scenario, simulate

    sc = Scenario(instances=6, rate=40.0, duration_s=8.0, warmup_s=1.0, adapters=200,
                  output_len=Lengths(48, 0.6, 4, 256), seed=7)  # fmt: skip
    cost = synthetic_gpu_cost_model("bgmv")
    a = simulate(sc, cost, "rank_aware")
    b = simulate(sc, cost, "rank_aware")
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b and a["requests"] > 200
    assert 0.0 <= a["slo_attainment"] <= 1.0
    for policy in ("random", "least_loaded", "first_fit"):
        m = simulate(sc, cost, policy)
        assert m["requests"] == a["requests"]
        # BGMV pads to the batch's max rank: grouping ranks (Algorithm 1) keeps more in the SLO
        assert m["slo_attainment"] < a["slo_attainment"]


def test_simulator_cli_writes_table(tmp_path):
    from bench.simulate import main

    argv = ["--synthetic", "--instances", "4", "--rate", "20", "--duration", "4",
            "--adapters", "50", "--kernels", "bgmv", "--policies", "rank_aware,least_loaded",
            "--sweep", "10,30", "--out", str(tmp_path), "--stem", "sim"]  # fmt: skip
    assert main(argv) == 0
    md = (tmp_path / "sim.md").read_text()
    assert "| bgmv | 30 | least_loaded |" in md
    data = json.loads((tmp_path / "sim.json").read_text())
    assert len(data["rows"]) == 4


def test_simulator_defaults_to_a_measured_cost_model(tmp_path):
    """Without --synthetic or --cost-model the simulator runs on a profile of real steps."""
    from bench.simulate import MEASURED, main, measured_cost_model

    path = measured_cost_model()
    assert (REPO / path).is_file() and Path(path).name in {f.name for f in MEASURED}
    argv = ["--instances", "2", "--rate", "2", "--duration", "4", "--adapters", "20",
            "--kernels", "bgmv", "--policies", "rank_aware", "--max-batch", "8",
            "--out", str(tmp_path), "--stem", "sim"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "sim.json").read_text())
    assert "synthetic" not in data["cost_models"]["bgmv"]
    assert data["rows"][0]["requests"] > 0
