"""One-thread kernel measurement and pool overhead, as recorded in docs/cpu_lora.md.

    python -m bench.cpu_lora_kernels kernels [--quick]
    python -m bench.cpu_lora_kernels pool

BLAS and Numba are limited to one thread before numpy is imported, as in the workers.
"""

from __future__ import annotations

import os
import sys

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_k] = "1"

if "numpy" in sys.modules:  # too late to limit its BLAS threads
    raise RuntimeError("run as `python -m bench.cpu_lora_kernels`, before anything imports numpy")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from cpu_lora.kernels import lora_numba, lora_numpy  # noqa: E402

SHAPES = {  # model: [(projection(s), in, out)]
    "SmolLM2-135M": [("q/o", 576, 576), ("gate/up", 576, 1536), ("down", 1536, 576)],
    "Llama-7B": [("q/k/v/o", 4096, 4096), ("gate/up", 4096, 11008), ("down", 11008, 4096)],
}


def _time(fn: Callable[[], None], total_s: float = 0.1, batch_s: float = 2e-3) -> float:
    """Seconds per call: the fastest of many short batches of calls.

    On a shared, loaded machine a call is often preempted; the fastest batch is the estimate
    least disturbed by other processes (a median would measure the machine's load instead).
    """
    fn()
    once = min(_once(fn) for _ in range(3))
    n = max(1, int(batch_s / max(once, 1e-7)))
    best = float("inf")
    for _ in range(max(5, int(total_s / max(n * once, 1e-7)))):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _once(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def kernels(quick: bool) -> None:
    ranks = (8, 64) if quick else (8, 16, 64)
    tokens = (1, 16, 128, 512)
    rng = np.random.default_rng(0)
    lora_numba(*(np.zeros(s, np.float32) for s in ((2, 3), (3, 2), (2, 3), (2, 3))))  # compile
    print("| model | proj | in→out | r | T | numpy µs | numba µs | numba/numpy |")
    print("|---|---|---|---|---|---|---|---|")
    for model, shapes in SHAPES.items():
        for name, din, dout in shapes:
            for r in ranks:
                a = rng.standard_normal((din, r)).astype(np.float32)
                b = rng.standard_normal((r, dout)).astype(np.float32)
                for t in tokens:
                    x = rng.standard_normal((t, din)).astype(np.float32)
                    out = np.empty((t, dout), np.float32)
                    tn = _time(lambda x=x, a=a, b=b, out=out: lora_numpy(x, a, b, out))
                    tb = _time(lambda x=x, a=a, b=b, out=out: lora_numba(x, a, b, out))
                    print(f"| {model} | {name} | {din}→{dout} | {r} | {t} | {tn * 1e6:.1f} | "
                          f"{tb * 1e6:.1f} | {tb / tn:.2f} |", flush=True)  # fmt: skip


def _median_timing(pool, segs, projs, x, n: int, gap_s: float) -> dict[str, float]:
    """Median per-call times (µs) over ``n`` calls ``gap_s`` apart, and the fastest total."""
    rows = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        ticket = pool.submit(segs, 0, projs, x)
        ticket.result()
        total = time.perf_counter() - t0
        tm = ticket.timing
        rows.append((tm.copy_in_s, tm.wait_s, tm.compute_s, tm.copy_out_s, total, tm.workers))
    cols = list(zip(*rows, strict=True))
    names = ("copy_in", "wait", "compute", "copy_out", "total", "workers")
    out = {k: statistics.median(c) * (1 if k == "workers" else 1e6)
           for k, c in zip(names, cols, strict=True)}  # fmt: skip
    out["min total"] = min(cols[4]) * 1e6
    return out


def pool() -> None:
    from cpu_lora.workers import CpuLoraConfig, CpuLoraPool

    rng = np.random.default_rng(0)
    # one SmolLM2 layer, rank 16 on q, k, v: 576 -> 576 / 192 / 192
    mods = {(0, p): (rng.standard_normal((576, 16)).astype(np.float32),
                     rng.standard_normal((16, o)).astype(np.float32))
            for p, o in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192))}  # fmt: skip
    qkv = ("q_proj", "k_proj", "v_proj")
    x128 = rng.standard_normal((128, 576)).astype(np.float32)
    outs = [np.empty((128, b.shape[1]), np.float32) for _, b in mods.values()]
    inproc = _time(lambda: [lora_numpy(x128, a, b, o)
                            for (a, b), o in zip(mods.values(), outs, strict=True)])  # fmt: skip
    print(f"in-process q,k,v r16 128 tokens, one thread: {inproc * 1e6:.0f} µs")
    for workers in (1, 2):
        cfg = CpuLoraConfig(num_workers=workers, max_in=576, max_out=960, max_tokens=512)
        p = CpuLoraPool(cfg)
        try:
            p.put_adapter("a", mods)
            p.wait_ready()
            pings = [p.ping() for _ in range(200)]
            print(f"workers={workers}: empty round trip (ping, spinning workers) median "
                  f"{statistics.median(pings) * 1e6:.0f} µs, min {min(pings) * 1e6:.0f} µs, "
                  f"p90 {np.percentile(pings, 90) * 1e6:.0f} µs")  # fmt: skip
            for label, n_tok, gap in (
                ("1 token, back to back", 1, 0.0),
                ("128 tokens, back to back", 128, 0.0),
                ("128 tokens, 10 ms apart (workers asleep)", 128, 0.01),
            ):
                x = x128[:n_tok]
                tm = _median_timing(p, [(0, n_tok, "a")], qkv, x, 100 if gap else 300, gap)
                print(f"  q,k,v r16 {label}: " + ", ".join(
                    f"{k} {v:.0f}" + ("" if k == "workers" else " µs") for k, v in tm.items()
                ))  # fmt: skip
            st = p.stats()
            print(
                "  stats: "
                + ", ".join(
                    f"{k}={st[k]:.3g}"
                    for k in (
                        "calls",
                        "worker_wakeups",
                        "cpu_seconds",
                        "wait_seconds",
                        "flops_per_s",
                    )
                )
            )
        finally:
            p.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("what", choices=("kernels", "pool"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    kernels(args.quick) if args.what == "kernels" else pool()


if __name__ == "__main__":
    main()
