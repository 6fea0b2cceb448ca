"""The profiler (`cara_jax.cli profile`) as a real process: it fits and writes cost models."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cara_jax.scheduling import load_cost_models

REPO = Path(__file__).resolve().parents[2]


def test_profile_subcommand_help():
    out = subprocess.run([sys.executable, "-m", "cara_jax.cli", "profile", "--help"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "--quick" in out.stdout


@pytest.mark.slow
def test_profile_quick_runs_as_a_real_process(tmp_path):
    """About 2 minutes on a 2-core CPU: compiling three step programs dominates."""
    out_file = tmp_path / "cm.json"
    out = subprocess.run(
        [sys.executable, "-m", "cara_jax.cli", "profile", "--quick", "--no-progress",
         "--out", str(out_file)],
        capture_output=True, text=True, timeout=1200, cwd=REPO, env=dict(os.environ),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "R^2" in out.stdout
    models = load_cost_models(out_file)
    assert {m.kernel for m in models.values()} == {"bgmv", "mbgmv"}
    for m in models.values():
        assert m.device and m.dtype == "float32" and m.samples
        assert m.decode_latency([8, 64]) > 0 and m.prefill_latency([32], [64]) > 0
        assert not math.isnan(m.decode.r2)
