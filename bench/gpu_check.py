"""Every GPU check in one call: correctness and timing of the Pallas LoRA kernels on the device.

    python -m bench.gpu_check --out DIR            # on a GPU machine (no network needed)
    python -m bench.gpu_check --out DIR --smoke    # anywhere: interpreter, tiny shapes, seconds

Sections are registered functions returning table rows (``@section("name")``); add a section to
extend the check. The ``lora_kernels`` section runs each kernel once with its output poisoned
(NaN) and compares it with its jnp reference, then times it against the jnp reference and
against the HBM floor: the bytes the call must move (x, the distinct adapters' A and B rows, the
output) divided by the device copy bandwidth that the ``hbm`` section measures. A timed call runs
K times over disjoint pool rows inside one jit (a fori_loop), so the working set exceeds the L2
cache where the shapes allow and dispatch costs are amortised. Goal: >= 70 % of HBM bandwidth
at Llama-2-7B decode shapes (hidden 4096, batch 16-64) on an H100.
``cold_start`` and ``e2e_throughput`` (bench/gpu/sections.py) run the Engine end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bench.gpu.ctx import Ctx
from bench.lib.report import write_report

L2_BYTES = 50 << 20  # H100 / H200 L2 size; the timed working set aims at a multiple of it


@dataclasses.dataclass
class Section:
    name: str
    title: str
    fn: Callable[[Ctx], list[dict]]


SECTIONS: list[Section] = []


def section(name: str, title: str):
    """Register a check; it returns rows (dicts with the same keys) for one Markdown table."""

    def deco(fn: Callable[[Ctx], list[dict]]) -> Callable[[Ctx], list[dict]]:
        SECTIONS.append(Section(name, title, fn))
        return fn

    return deco


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------------------------- hbm


@section("hbm", "Device memory bandwidth (the floor's denominator)")
def hbm_section(ctx: Ctx) -> list[dict]:
    n = (1 << 20) if ctx.smoke else (256 << 20)  # float32 elements: 4 MiB / 1 GiB
    x = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)  # reads and writes every byte once
    secs = median_seconds(lambda: copy(x), ctx.repeats)
    ctx.hbm_bytes_per_s = 2 * x.nbytes / secs

    # per-iteration cost of an empty fori_loop (what a timed kernel loop adds per call)
    k = 64

    @jax.jit
    def loop(v):
        return jax.lax.fori_loop(0, k, lambda i, s: s + v[i], jnp.float32(0))

    loop_secs = median_seconds(lambda: loop(x), ctx.repeats)
    return [
        {
            "measure": "device copy (x + 1)",
            "bytes": f"{2 * x.nbytes / 1e6:.0f} MB",
            "time_us": round(secs * 1e6, 1),
            "GB/s": round(ctx.hbm_bytes_per_s / 1e9, 1),
        },
        {
            "measure": f"empty fori_loop, per iteration ({k} iterations)",
            "bytes": "-",
            "time_us": round(loop_secs / k * 1e6, 2),
            "GB/s": "-",
        },
    ]


# ----------------------------------------------------------------------------- lora kernels


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str  # bgmv | mbgmv | sgmv
    model: str
    din: int
    dout: int
    ranks: tuple[int, ...]  # one adapter per batch row (decode) or per segment (prefill)
    dtype: str = "bfloat16"
    seg_len: int = 1  # prefill tokens per segment (sgmv)


def _bucket(r: int) -> int:
    b = 8
    while b < r:
        b *= 2
    return b


def _mixed(n: int, ranks=(8, 16, 32, 64), none_every: int = 0) -> tuple[int, ...]:
    out = [ranks[i % len(ranks)] for i in range(n)]
    if none_every:
        out = [0 if i % none_every == none_every - 1 else r for i, r in enumerate(out)]
    return tuple(out)


def lora_cases(smoke: bool) -> list[Case]:
    if smoke:
        return [
            Case("bgmv", "tiny", 64, 32, (8, 0, 16), "float32"),
            Case("mbgmv", "tiny", 64, 32, (8, 0, 16), "float32"),
            Case("sgmv", "tiny", 64, 32, (8, 0, 16), "float32", seg_len=5),
        ]
    cases = []
    for kernel in ("bgmv", "mbgmv"):
        for bsz in (1, 4, 16, 32, 64):  # Llama-2-7B q/o projection, mixed ranks 8-64
            cases.append(Case(kernel, "7B", 4096, 4096, _mixed(bsz)))
        cases.append(Case(kernel, "7B", 4096, 4096, (64,) * 32))
        cases.append(Case(kernel, "7B", 4096, 11008, _mixed(32)))  # gate/up
        cases.append(Case(kernel, "7B", 11008, 4096, _mixed(32)))  # down
        cases.append(Case(kernel, "7B", 4096, 4096, _mixed(33, none_every=4), "float32"))
        for bsz in (1, 64):  # SmolLM2-135M q/o and gate/up
            cases.append(Case(kernel, "SmolLM2", 576, 576, _mixed(bsz)))
        cases.append(Case(kernel, "SmolLM2", 576, 1536, _mixed(64)))
    cases += [
        Case("sgmv", "7B", 4096, 4096, _mixed(8), seg_len=32),
        Case("sgmv", "7B", 4096, 4096, _mixed(4), seg_len=256),
        Case("sgmv", "7B", 4096, 4096, _mixed(5, none_every=3), "float32", seg_len=17),
        Case("sgmv", "SmolLM2", 576, 1536, _mixed(16), seg_len=32),
    ]
    return cases


def _layers(case: Case, smoke: bool) -> int:
    """K disjoint copies of the working set per timed call, ~4x L2 where that stays small."""
    if smoke:
        return 2
    rows = sum(case.ranks)
    item = jnp.dtype(case.dtype).itemsize
    per_call = rows * (case.din + case.dout) * item
    return int(np.clip(-(-4 * L2_BYTES // max(per_call, 1)), 4, 64))


def _floor_bytes(case: Case) -> int:
    item = jnp.dtype(case.dtype).itemsize
    tokens = len(case.ranks) * case.seg_len
    rows = sum(case.ranks)  # every row/segment has its own adapter here
    return rows * (case.din + case.dout) * item + tokens * case.din * item + tokens * case.dout * 4


def _build(case: Case, k_layers: int, seed: int = 0):
    """Pool with K disjoint sets of adapter rows, and per-layer index tables."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    n_ad = len(case.ranks)
    per_layer = sum(case.ranks)
    n_rows = k_layers * per_layer + 1
    key = jax.random.key(seed)
    ka, kb, kx = jax.random.split(key, 3)
    a = (jax.random.normal(ka, (n_rows, case.din), jnp.float32) / np.sqrt(case.din)).astype(dt)
    b = jax.random.normal(kb, (n_rows, case.dout), jnp.float32).astype(dt)
    a, b = a.at[0].set(0), b.at[0].set(0)
    tokens = n_ad * case.seg_len
    x = jax.random.normal(kx, (tokens, case.din), jnp.float32).astype(dt)
    perm = rng.permutation(np.arange(1, n_rows)).astype(np.int32)
    rmax = _bucket(max(case.ranks))
    tsum = _bucket(per_layer)
    idx = np.zeros((k_layers, n_ad, rmax), np.int32)
    rows = np.zeros((k_layers, tsum), np.int32)
    owner = np.zeros((k_layers, tsum), np.int32)
    ranks = np.array(case.ranks, np.int32)
    start = np.concatenate([[0], np.cumsum(ranks)[:-1]]).astype(np.int32)
    for k in range(k_layers):
        used = k * per_layer
        for i, r in enumerate(case.ranks):
            sel = perm[used : used + r]
            idx[k, i, :r] = sel
            rows[k, start[i] : start[i] + r] = sel
            owner[k, start[i] : start[i] + r] = i
            used += r
    sizes = jnp.full((n_ad,), case.seg_len, jnp.int32)
    tables = dict(
        idx=jnp.asarray(idx), rows=jnp.asarray(rows), owner=jnp.asarray(owner),
        start=jnp.asarray(start), count=jnp.asarray(ranks), sizes=sizes,
    )  # fmt: skip
    return x, a, b, tables


def _kernel_fns(case: Case, interpret: bool, poison: bool = False):
    """(pallas fn, reference fn), both (x, a, b, tables, k) -> [tokens, dout] float32."""
    import pallas_kernels as pk

    if case.kernel == "bgmv":

        def pal(x, a, b, t, k):
            return pk.bgmv(x, a, b, t["idx"][k], interpret=interpret, poison=poison)

        def ref(x, a, b, t, k):
            return pk.bgmv_ref(x, a, b, t["idx"][k])
    elif case.kernel == "mbgmv":

        def pal(x, a, b, t, k):
            return pk.mbgmv_segments(x, a, b, t["rows"][k], t["owner"][k], t["start"],
                                     t["count"], interpret=interpret, poison=poison)  # fmt: skip

        def ref(x, a, b, t, k):
            return pk.mbgmv_ref(x, a, b, t["rows"][k], t["owner"][k])
    else:

        def pal(x, a, b, t, k):
            return pk.sgmv(x, a, b, t["idx"][k], t["sizes"], interpret=interpret, poison=poison)

        def ref(x, a, b, t, k):
            return pk.sgmv_ref(x, a, b, t["idx"][k], t["sizes"])

    return pal, ref


def _timed_loop(fn, k_layers: int):
    """One jit running fn over the K layers; the sum keeps every call alive."""

    @jax.jit
    def run(x, a, b, tables):
        def body(k, s):
            return s + jnp.sum(fn(x, a, b, tables, k))

        return jax.lax.fori_loop(0, k_layers, body, jnp.float32(0))

    return run


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def run_case(ctx: Ctx, case: Case) -> dict:
    k_layers = _layers(case, ctx.smoke)
    row = {
        "kernel": case.kernel,
        "model": case.model,
        "shape": f"{case.din}->{case.dout}",
        "dtype": case.dtype,
        "rows": len(case.ranks) if case.kernel != "sgmv" else f"{len(case.ranks)}x{case.seg_len}",
        "ranks": f"{min(case.ranks)}-{max(case.ranks)} (sum {sum(case.ranks)})",
        "K": k_layers,
    }
    x, a, b, tables = _build(case, k_layers)
    pal, ref = _kernel_fns(case, ctx.interpret, poison=True)
    with jax.default_matmul_precision("highest"):  # float32 references without TF32
        want = jax.jit(partial(ref, k=0))(x, a, b, tables)
    got = jax.jit(partial(pal, k=0))(x, a, b, tables)
    err = _rel(got, want)
    tol = 1e-5 if case.dtype == "float32" else 1e-2
    row["rel_err"] = f"{err:.1e}"
    row["ok"] = bool(np.isfinite(np.asarray(got)).all() and err <= tol)
    pal_t, ref_t = _kernel_fns(case, ctx.interpret)
    t_pal = median_seconds(partial(_timed_loop(pal_t, k_layers), x, a, b, tables), ctx.repeats)
    t_ref = median_seconds(partial(_timed_loop(ref_t, k_layers), x, a, b, tables), ctx.repeats)
    t_pal, t_ref = t_pal / k_layers, t_ref / k_layers
    floor_bytes = _floor_bytes(case)
    row["pallas_us"] = round(t_pal * 1e6, 2)
    row["jnp_us"] = round(t_ref * 1e6, 2)
    row["speedup"] = f"{t_ref / t_pal:.2f}x"
    row["floor_MB"] = round(floor_bytes / 1e6, 3)
    if ctx.hbm_bytes_per_s:
        t_floor = floor_bytes / ctx.hbm_bytes_per_s
        row["floor_us"] = round(t_floor * 1e6, 2)
        row["%HBM"] = f"{t_floor / t_pal:.0%}"
    return row


@section("lora_kernels", "Pallas grouped-LoRA kernels vs jnp reference and HBM floor")
def lora_section(ctx: Ctx) -> list[dict]:
    rows = []
    for case in lora_cases(ctx.smoke):
        if time.perf_counter() > ctx.deadline:
            rows.append({"kernel": case.kernel, "model": case.model,
                         "shape": f"{case.din}->{case.dout}", "error": "skipped: time budget"})  # fmt: skip
            continue
        try:
            rows.append(run_case(ctx, case))
        except Exception as e:  # keep going: one broken shape must not hide the others
            traceback.print_exc()
            rows.append({"kernel": case.kernel, "model": case.model,
                         "shape": f"{case.din}->{case.dout}", "ok": False,
                         "error": f"{type(e).__name__}: {str(e)[:200]}"})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------- driver


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.md and gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Pallas interpreter")
    ap.add_argument("--sections", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip the remaining cases after this many seconds (fits a 10 min call)",
    )
    args = ap.parse_args(argv)
    from bench.gpu.sections import register  # cold_start and e2e_throughput (the Engine)

    register(section)
    on_gpu = jax.default_backend() == "gpu"
    ctx = Ctx(
        smoke=args.smoke,
        interpret=args.smoke or not on_gpu,
        repeats=args.repeats or (2 if args.smoke else 7),
        device=str(jax.devices()[0].device_kind),
        deadline=time.perf_counter() + args.budget_s,
    )
    if not args.smoke and not on_gpu:
        print("no GPU: running the full shapes in the Pallas interpreter (slow); try --smoke")
    wanted = {s for s in args.sections.split(",") if s}
    t0 = time.perf_counter()
    lines = [
        "# GPU check" + (" (smoke: Pallas interpreter, tiny shapes)" if args.smoke else ""),
        "",
        f"Device: {ctx.device} ({jax.default_backend()}); jax {jax.__version__}; "
        f"{datetime.date.today().isoformat()}. Times are medians of {ctx.repeats} runs.",
    ]
    data: dict = {"device": ctx.device, "backend": jax.default_backend(),
                  "jax": jax.__version__, "smoke": args.smoke, "sections": {}}  # fmt: skip
    failed = False
    for s in SECTIONS:
        if wanted and s.name not in wanted:
            continue
        ts = time.perf_counter()
        try:
            rows = s.fn(ctx)
        except Exception as e:
            traceback.print_exc()
            rows = [{"error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}]
        failed |= any(r.get("ok") is False for r in rows)
        lines += ["", f"## {s.title}", f"({time.perf_counter() - ts:.1f} s)", "", *_table(rows)]
        data["sections"][s.name] = rows
    lines += [
        "",
        f"Total {time.perf_counter() - t0:.1f} s." + (" FAILURES above." if failed else ""),
    ]
    data["failed"] = failed
    write_report(args.out, "gpu_check", lines, data)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
