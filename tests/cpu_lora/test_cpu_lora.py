"""CPU LoRA workers: real processes and real shared memory; kernels, splits, faults, no leaks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from multiprocessing import shared_memory

import numpy as np
import pytest

from cpu_lora.kernels import lora_delta, lora_numba, lora_numpy
from cpu_lora.shm import SHM_PREFIX
from cpu_lora.workers import (
    CpuLoraConfig,
    CpuLoraPool,
    CpuWorkerError,
    CpuWorkerTimeout,
    split_by_cost,
)

_ENV_BEFORE = os.environ.get("OPENBLAS_NUM_THREADS")
# (projection, in, out) at SmolLM2 shapes
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192),
          "gate_proj": (576, 1536), "down_proj": (1536, 576)}  # fmt: skip


def _adapter(rng, rank, projs=SHAPES, layers=(0, 1)):
    return {
        (layer, p): (
            rng.standard_normal((SHAPES[p][0], rank)).astype(np.float32) * 0.1,
            rng.standard_normal((rank, SHAPES[p][1])).astype(np.float32) * 0.1,
        )
        for layer in layers
        for p in projs
    }


def _ref(x, mods, segs, layer, proj):
    """float64 reference; rows outside every segment and untargeted modules give zeros."""
    out = np.zeros((x.shape[0], SHAPES[proj][1]))
    for s, e, k in segs:
        m = mods[k].get((layer, proj))
        if m is not None:
            out[s:e] = (x[s:e].astype(np.float64) @ m[0]) @ m[1]
    return out


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _own_segments(pool):
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(pool.tag))


@pytest.mark.parametrize(
    "shape", [(1, 576, 8, 576), (7, 576, 64, 1536), (33, 1536, 16, 576), (130, 576, 32, 192)]
)
def test_kernels_match_float64(shape):
    t, din, r, dout = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((t, din)).astype(np.float32)
    a = rng.standard_normal((din, r)).astype(np.float32)
    b = rng.standard_normal((r, dout)).astype(np.float32)
    ref = (x.astype(np.float64) @ a) @ b
    for kernel in (lora_numpy, lora_numba):
        out = np.full((t, dout), np.nan, np.float32)
        kernel(x, a, b, out)
        assert _rel(out, ref) < 1e-5, kernel.__name__
    assert _rel(lora_delta(x, a, b), ref) < 1e-5


def test_bf16_inputs_are_computed_in_float32():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 576)).astype(ml_dtypes.bfloat16)
    a = rng.standard_normal((576, 8)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((8, 192)).astype(np.float32)
    ref = (x.astype(np.float64) @ a.astype(np.float64)) @ b
    for kernel in ("numpy", "numba"):
        assert _rel(lora_delta(x, a, b, kernel=kernel), ref) < 1e-5


def test_split_by_cost_is_balanced_contiguous_and_non_empty():
    cost = np.array([1.0] * 10 + [8.0] * 10)  # a rank-8 then a rank-64 segment
    r = split_by_cost(cost, 2)
    assert r[0][0] == 0 and r[-1][1] == 20 and r[0][1] == r[1][0]
    assert r == [(0, 15), (15, 20)]  # 50 vs 40 units, not 10 tokens each
    assert split_by_cost(np.ones(3), 8) == [(0, 1), (1, 2), (2, 3)]
    assert split_by_cost(np.ones(5), 1) == [(0, 5)]
    for k in (2, 3, 4):
        rr = split_by_cost(np.r_[np.zeros(4), np.ones(2)], k)
        assert all(lo < hi for lo, hi in rr) and rr[-1][1] == 6 and len(rr) == k


@pytest.fixture
def pool():
    cfg = CpuLoraConfig(num_workers=2, max_in=1536, max_out=960, max_tokens=128,
                        tokens_per_worker=16, spin_s=1e-3)  # fmt: skip
    p = CpuLoraPool(cfg)
    yield p
    p.close()


def test_segments_of_several_adapters_over_two_workers(pool):
    rng = np.random.default_rng(2)
    mods = {
        "A": _adapter(rng, 8),
        "B": _adapter(rng, 64),
        "C": _adapter(rng, 16, projs=("q_proj", "v_proj")),  # no k_proj: zeros
    }
    for k, m in mods.items():
        pool.put_adapter(k, m)
    x = rng.standard_normal((91, 576)).astype(np.float32)
    # unsorted, a one-token segment, and row 90 outside every segment (zeros)
    segs = [(1, 50, "A"), (0, 1, "B"), (50, 90, "C")]
    ticket = pool.submit(segs, 1, ("q_proj", "k_proj", "v_proj"), x)
    assert ticket.workers == [0, 1]
    res = ticket.result(10)
    for p in ("q_proj", "k_proj", "v_proj"):
        assert res[p].shape == (91, SHAPES[p][1]) and res[p].dtype == np.float32
        assert _rel(res[p], _ref(x, mods, segs, 1, p)) < 1e-5, p
    assert not res["k_proj"][50:].any() and not res["q_proj"][90].any()
    # a single adapter's segment, down_proj (another input width), layer 0
    h = rng.standard_normal((40, 1536)).astype(np.float32)
    out = pool.compute([(0, 40, "B")], 0, ("down_proj",), h, timeout=10)
    assert _rel(out["down_proj"], _ref(h, mods, [(0, 40, "B")], 0, "down_proj")) < 1e-5
    for pid in pool.worker_pids():  # one BLAS thread per worker, set before its numpy import
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert b"OPENBLAS_NUM_THREADS=1" in env and b"OMP_NUM_THREADS=1" in env
    assert os.environ.get("OPENBLAS_NUM_THREADS") != "1" or _ENV_BEFORE == "1"  # restored here
    st = pool.stats()
    assert st["calls"] == 2 and st["tokens"] == 131 and st["worker_wakeups"] == 4
    assert st["calls_k_proj"] == 1 and st["tokens_down_proj"] == 40 and st["calls_o_proj"] == 0
    assert st["cpu_seconds"] > 0 and st["adapters"] == 3 and st["errors"] == 0


def test_profiled_budget_wakes_one_worker_for_a_few_tokens():
    cfg = CpuLoraConfig(num_workers=2, max_in=576, max_out=1536, max_tokens=512, spin_s=1e-3)
    with CpuLoraPool(cfg) as p:
        rng = np.random.default_rng(3)
        mods = {"A": _adapter(rng, 64, projs=("gate_proj",))}
        p.put_adapter("A", mods["A"])
        p.wait_ready()
        assert p.stats()["flops_per_s"] > 1e8  # measured by worker 0
        x = rng.standard_normal((512, 576)).astype(np.float32)
        few = p.submit([(0, 3, "A")], 0, ("gate_proj",), x[:3])
        assert few.workers == [0]
        assert (
            _rel(few.result(10)["gate_proj"], _ref(x[:3], mods, [(0, 3, "A")], 0, "gate_proj"))
            < 1e-5
        )
        many = p.submit([(0, 512, "A")], 0, ("gate_proj",), x)  # ~140 MFLOP: past one budget
        assert many.workers == [0, 1]
        assert (
            _rel(many.result(10)["gate_proj"], _ref(x, mods, [(0, 512, "A")], 0, "gate_proj"))
            < 1e-5
        )
        none = p.submit([(0, 512, "A")], 0, ("q_proj",), x)  # not targeted: nobody wakes
        assert none.workers == [] and none.result() == {}


def test_async_tickets_and_buffer_growth(pool):
    rng = np.random.default_rng(4)
    mods = {"A": _adapter(rng, 16)}
    pool.put_adapter("A", mods["A"])
    x1 = rng.standard_normal((20, 576)).astype(np.float32)
    x2 = rng.standard_normal((300, 576)).astype(np.float32)  # beyond max_tokens: a new segment
    first_data = [n for n in pool.segment_names() if n.endswith("_d1")]
    t1 = pool.submit([(0, 20, "A")], 0, ("q_proj", "gate_proj"), x1)
    t2 = pool.submit([(0, 300, "A")], 1, ("q_proj",), x2)  # collects t1 into its ticket first
    assert t1.done()
    r2 = t2.result(10)
    r1 = t1.result(10)
    for p in ("q_proj", "gate_proj"):
        assert _rel(r1[p], _ref(x1, mods, [(0, 20, "A")], 0, p)) < 1e-5
    assert _rel(r2["q_proj"], _ref(x2, mods, [(0, 300, "A")], 1, "q_proj")) < 1e-5
    assert first_data and first_data[0] not in pool.segment_names()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=first_data[0])
    with pytest.raises(KeyError):
        pool.submit([(0, 20, "nope")], 0, ("q_proj",), x1)
    with pytest.raises(ValueError):
        pool.submit([(0, 30, "A")], 0, ("q_proj",), x1)  # past the end of x


def test_drop_adapter_unlinks_and_put_again_works(pool):
    rng = np.random.default_rng(5)
    pool.put_adapter("A", _adapter(rng, 8))
    x = rng.standard_normal((8, 576)).astype(np.float32)
    pool.compute([(0, 8, "A")], 0, ("q_proj",), x, timeout=10)
    name = [n for n in pool.segment_names() if n.endswith("_a1")][0]
    pool.drop_adapter("A")
    assert not pool.has_adapter("A") and name not in _own_segments(pool)
    with pytest.raises(KeyError):
        pool.compute([(0, 8, "A")], 0, ("q_proj",), x)
    mods = {"A": _adapter(rng, 32)}  # new content under the same key
    pool.put_adapter("A", mods["A"])
    res = pool.compute([(0, 8, "A")], 0, ("q_proj",), x, timeout=10)
    assert _rel(res["q_proj"], _ref(x, mods, [(0, 8, "A")], 0, "q_proj")) < 1e-5


def test_worker_killed_between_calls_is_replaced_transparently(pool, caplog):
    rng = np.random.default_rng(6)
    mods = {"A": _adapter(rng, 16)}
    pool.put_adapter("A", mods["A"])
    x = rng.standard_normal((64, 576)).astype(np.float32)
    segs = [(0, 64, "A")]
    pool.compute(segs, 0, ("q_proj",), x, timeout=10)
    victims = pool.worker_pids()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    with caplog.at_level(logging.WARNING, logger="cpu_lora.workers"):
        # to the new processes; their start-up does not count against the call's timeout
        res = pool.compute([(0, 4, "A")], 1, ("q_proj",), x[:4], timeout=2)
    assert caplog.text.count("restarting") == 2
    assert not set(victims) & set(pool.worker_pids())  # both replaced, not only the one used
    assert _rel(res["q_proj"], _ref(x[:4], mods, [(0, 4, "A")], 1, "q_proj")) < 1e-5
    res = pool.compute(segs, 0, ("q_proj",), x, timeout=30)
    assert _rel(res["q_proj"], _ref(x, mods, segs, 0, "q_proj")) < 1e-5
    assert pool.stats()["restarts"] == 2 and pool.stats()["errors"] == 0


def test_worker_killed_during_a_call_raises_then_recovers(pool, caplog):
    rng = np.random.default_rng(7)
    mods = {"A": _adapter(rng, 16)}
    pool.put_adapter("A", mods["A"])
    x = rng.standard_normal((64, 576)).astype(np.float32)
    segs = [(0, 64, "A")]
    pool.debug_hang(0, 10_000)  # worker 0 sits in its next job until killed
    ticket = pool.submit(segs, 0, ("k_proj",), x)
    victim = pool.worker_pids()[0]
    time.sleep(0.1)
    os.kill(victim, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="cpu_lora.workers"):
        with pytest.raises(CpuWorkerError, match="died") as err:
            ticket.result(20)
    assert not isinstance(err.value, CpuWorkerTimeout)
    assert "restarting" in caplog.text and victim not in pool.worker_pids()
    res = pool.compute(segs, 0, ("k_proj",), x, timeout=30)
    assert _rel(res["k_proj"], _ref(x, mods, segs, 0, "k_proj")) < 1e-5
    st = pool.stats()
    assert st["restarts"] == 1 and st["errors"] == 1 and st["timeouts"] == 0


def test_hung_worker_times_out_and_is_replaced(pool):
    rng = np.random.default_rng(8)
    mods = {"A": _adapter(rng, 8)}
    pool.put_adapter("A", mods["A"])
    x = rng.standard_normal((64, 576)).astype(np.float32)
    pool.wait_ready()
    hung = pool.worker_pids()[0]
    pool.debug_hang(0, 60_000)
    t0 = time.perf_counter()
    with pytest.raises(CpuWorkerTimeout, match="did not answer"):
        pool.compute([(0, 64, "A")], 0, ("v_proj",), x, timeout=0.5)
    assert time.perf_counter() - t0 < 10
    assert hung not in pool.worker_pids()
    res = pool.compute([(0, 64, "A")], 0, ("v_proj",), x, timeout=30)
    assert _rel(res["v_proj"], _ref(x, mods, [(0, 64, "A")], 0, "v_proj")) < 1e-5
    assert pool.stats()["timeouts"] == 1 and pool.stats()["restarts"] == 1


def test_close_unlinks_every_segment_and_stops_workers():
    p = CpuLoraPool(CpuLoraConfig(num_workers=2, max_in=576, max_out=1024, max_tokens=64))
    p.put_adapter("A", _adapter(np.random.default_rng(9), 8))
    p.put_adapter("B", _adapter(np.random.default_rng(10), 8))
    names, pids = p.segment_names(), p.worker_pids()
    assert len(names) == 4 and _own_segments(p) == sorted(names)  # ctrl, data, 2 adapters
    assert all(n.startswith(SHM_PREFIX) for n in names)
    p.close()
    p.close()  # idempotent
    assert _own_segments(p) == []
    for n in names:
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=n)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(CpuWorkerError, match="closed"):
        p.compute([], 0, ("q_proj",), np.zeros((0, 576), np.float32))


_SCRIPT = """
import numpy as np
from cpu_lora import CpuLoraConfig, CpuLoraPool
p = CpuLoraPool(CpuLoraConfig(num_workers=2, max_in=64, max_out=64, max_tokens=16,
                              tokens_per_worker=4))
rng = np.random.default_rng(0)
p.put_adapter("A", {(0, "q_proj"): (rng.standard_normal((64, 4)), rng.standard_normal((4, 64)))})
x = rng.standard_normal((16, 64)).astype(np.float32)
p.compute([(0, 16, "A")], 0, ("q_proj",), x, timeout=30)
print(p.tag, flush=True)
{ending}
"""


@pytest.mark.parametrize("ending", ["p.close()", "pass  # left to the exit finalizer", "del p"])
def test_no_leak_and_no_tracker_warning_at_exit(ending):
    code = textwrap.dedent(_SCRIPT).replace("{ending}", ending)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tag = r.stdout.strip()
    assert tag.startswith(SHM_PREFIX)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(tag)]
    assert "leaked" not in r.stderr and "resource_tracker" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_workers_do_not_rerun_the_main_script(tmp_path):
    """Spawned workers get a stand-in __main__: a server's main script (and its imports, JAX
    among them) runs once, in the coordinator only."""
    marker = tmp_path / "runs"
    script = tmp_path / "main_script.py"
    script.write_text(
        f"import os\nopen({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        + textwrap.dedent(_SCRIPT).replace("{ending}", "p.close()")
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(marker.read_text().split()) == 1
