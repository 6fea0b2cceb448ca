"""The cost model: fits of the paper's latency form, bucket padding, the JSON file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cara_jax.scheduling import (
    Buckets,
    CostModel,
    fit_cost_model,
    fit_linear,
    load_cost_models,
    synthetic_gpu_cost_model,
)
from tests.helpers import MS, linear_model


def synthetic_samples(rng, kernel, a, b, c=0.0, noise=0.01, base=(0.02, 0.5)):
    """Decode samples over batches x ranks (uniform and mixed), base and prefill samples."""
    out = []
    ranks = (8, 16, 32, 64)
    for s in (4, 8, 16, 32):
        mixes = [[r] * s for r in ranks] + [[ranks[i % 4] for i in range(s)], [8] * (s - 1) + [64]]
        for rs in mixes:
            work = s * max(rs) if kernel == "bgmv" else sum(rs)
            y = (a * work + c * s + b) * (1 + noise * rng.standard_normal())
            out.append({"kind": "decode", "kernel": kernel, "ranks": rs, "latency_s": y})
        y = (base[0] * s + base[1]) * (1 + noise * rng.standard_normal())
        out.append({"kind": "decode", "kernel": None, "ranks": [0] * s, "latency_s": y})
    for n in (32, 64, 128, 256, 512):
        for r in (0, 8, 64):
            y = (0.002 * n + 1e-5 * n * r + 0.01) * (1 + noise * rng.standard_normal())
            out.append({"kind": "prefill", "lengths": [n], "ranks": [r], "latency_s": y})
    return out


@pytest.mark.parametrize("kernel", ["bgmv", "mbgmv"])
def test_fit_recovers_paper_form_coefficients(kernel):
    rng = np.random.default_rng(0)
    a, b = 4e-6, 0.03
    cm = fit_cost_model(synthetic_samples(rng, kernel, a, b), kernel, "m", "dev", "float32")
    assert cm.decode.features == ("work", "one")  # |S| adds nothing: not chosen
    assert cm.decode.get("work") == pytest.approx(a, rel=0.05)
    assert cm.decode.get("one") == pytest.approx(b, rel=0.05)
    assert cm.decode.r2 > 0.95
    assert cm.base.get("batch") == pytest.approx(0.02, rel=0.05)
    assert cm.prefill.get("tokens") == pytest.approx(0.002, rel=0.05)
    assert cm.prefill.get("lora_tokens") == pytest.approx(1e-5, rel=0.1)
    assert cm.prefill.r2 > 0.95
    assert "decode:work+one" in cm.alternatives


def test_fit_adds_batch_term_when_it_clearly_helps():
    rng = np.random.default_rng(1)
    a, b, c = 2e-5, 0.03, 4e-3  # a CPU-like base cost growing with the batch
    samples = synthetic_samples(rng, "bgmv", a, b, c, noise=0.005)
    cm = fit_cost_model(samples, "bgmv", "m", "dev", "float32")
    assert cm.decode.features == ("work", "batch", "one")
    assert cm.decode.get("batch") == pytest.approx(c, rel=0.1)
    assert cm.decode.get("work") == pytest.approx(a, rel=0.1)
    assert cm.decode.r2 > cm.alternatives["decode:work+one"].r2 + 0.01


def test_fit_linear_reports_r2_and_drops_negative_slopes():
    xs = [{"x": float(i), "z": float(i % 3), "one": 1.0} for i in range(20)]
    y = [2.0 * x["x"] + 1.0 for x in xs]
    fit = fit_linear(xs, y, ("x", "one"))
    assert fit.r2 == pytest.approx(1.0)
    assert fit.coef == pytest.approx((2.0, 1.0))
    y2 = [2.0 * x["x"] - 0.5 * x["z"] + 1.0 for x in xs]
    fit2 = fit_linear(xs, y2, ("x", "z", "one"))
    assert "z" not in fit2.features and fit2.r2 < 1.0
    assert fit_linear(xs, y2, ("x", "z", "one"), nonneg=False).get("z") == pytest.approx(-0.5)


def test_buckets_pad_the_features():
    cm = linear_model("bgmv", a_ms=1.0, b_ms=0.0)
    cm.buckets = Buckets(rows=(1, 2, 4, 8), rank=(16, 64), total_rank=(64, 256))
    # 3 rows of rank 8 run as 4 rows x rank 16
    assert cm.decode_latency([8, 8, 8]) == pytest.approx(4 * 16 * MS)
    mb = linear_model("mbgmv", a_ms=1.0, b_ms=0.0)
    mb.buckets = cm.buckets
    assert mb.decode_latency([8, 8, 8]) == pytest.approx(64 * MS)  # sum 24 -> bucket 64
    assert mb.decode_latency([0, 0]) == pytest.approx(24 * MS)  # no adapter: the base model


def test_json_round_trip_keyed_by_model_device_dtype_kernel(tmp_path):
    path = tmp_path / "cm.json"
    b, m = synthetic_gpu_cost_model("bgmv"), synthetic_gpu_cost_model("mbgmv")
    b.save(path)
    m.save(path)
    models = load_cost_models(path)
    assert set(models) == {b.key, m.key}
    again = CostModel.load(path, kernel="mbgmv")
    batch = [8, 16, 64, 32] * 5
    assert again.decode_latency(batch) == m.decode_latency(batch)
    assert again.prefill_latency([100, 30], [8, 64]) == m.prefill_latency([100, 30], [8, 64])
    with pytest.raises(KeyError):
        CostModel.load(path)  # two models match
    assert json.loads(path.read_text())["format"].startswith("cara-jax-cost-models")
