"""What each experiment of ``python -m bench run`` runs (``build_plan``): its points (one seeded
workload each), the systems, and the cara-jax configurations to compare, as a ``Plan``
(bench/lib/plan.py). bench/experiments/runner.py runs the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from typing import Any

from bench.lib.plan import Plan, Point
from bench.lib.workload import LengthDist, WorkloadSpec
from bench.systems import SYSTEM_KEYS, RunOptions

EXPERIMENTS = (
    "serving", "load_sweep", "adapters_sweep", "cold_start", "admission", "engine_poisson"
)  # fmt: skip
COLD_MODES = ("sync", "cached", "cpu_assist", "auto")


# ---------------------------------------------------------------------------- workloads


def _spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The workload options given on the command line (None = keep the experiment's default)."""
    o: dict[str, Any] = {}
    for field, arg in [
        ("num_requests", "requests"),
        ("arrival", "arrival"),
        ("cv", "cv"),
        ("popularity", "popularity"),
        ("zipf_alpha", "zipf_alpha"),
        ("seed", "seed"),
        ("rate", "rate"),
        ("num_adapters", "adapters"),
    ]:
        if getattr(args, arg, None) is not None:
            o[field] = getattr(args, arg)
    if args.ranks:
        o["ranks"] = tuple(int(r) for r in args.ranks.split(","))
    if args.prompt_len:
        o["prompt_len"] = LengthDist.parse(args.prompt_len)
    if args.output_len:
        o["output_len"] = LengthDist.parse(args.output_len)
    return o


def _floats(text: str | None) -> list[float] | None:
    return None if not text else [float(x) for x in text.split(",")]


def build_plan(name: str, args: argparse.Namespace) -> Plan:
    q = args.quick
    over = _spec_overrides(args)
    ranks = (8, 16, 32, 64)
    # cara-jax runs cara-serve's defaults unless a flag is given here (quick runs: small
    # batches for the tests); HF+PEFT batches as many as cara-jax runs at once (16 by default)
    seqs = args.max_num_seqs or (4 if q else None)
    shared_pool = not q and name != "engine_poisson" and (args.targets or "qkvo") == "qkvo"
    base_opts = RunOptions(
        progress=not args.no_progress,
        max_num_seqs=seqs,
        max_batch=seqs or 16,
        max_prefill_seqs=args.max_prefill_seqs or (2 if q else None),
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        # full size: one pool shape for serving, load_sweep, adapters_sweep and cold_start, so
        # their programs compile once (persistent cache); ~1.9 GB for q/k/v/o adapters
        pool_rows=4096 if shared_pool else None,
        pool_slots=256 if shared_pool else None,
        llama_threads=args.threads,
    )
    systems = list(SYSTEM_KEYS)
    notes: list[str] = []
    targets = args.targets or "qkvo"
    if name == "serving":
        n = 4 if q else 16
        spec = WorkloadSpec(
            num_requests=n,
            arrival="burst",
            num_adapters=n,
            popularity="round_robin",
            ranks=ranks,
            rank_assign="cycle",
            prompt_len=LengthDist("fixed", 16 if q else 64),
            output_len=LengthDist("fixed", 8 if q else 128),
        )
        spec = dataclasses.replace(spec, **over)
        points = [Point(f"{spec.num_requests} concurrent", spec.num_requests, spec)]
        title = (
            f"Serving: {spec.num_requests} concurrent requests over {spec.num_adapters} adapters"
        )
        xlabel = "requests"
    elif name == "load_sweep":
        rates = _floats(args.rates) or ([2.0, 8.0] if q else [1.0, 2.0, 4.0, 8.0])
        spec = WorkloadSpec(
            num_requests=6 if q else 64,
            arrival="poisson",
            num_adapters=4 if q else 32,
            popularity="maf",
            ranks=ranks,
            prompt_len=LengthDist("uniform", 16, 8, 24)
            if q
            else LengthDist("lognormal", 96, 8, 192, 0.6),
            output_len=LengthDist("fixed", 4) if q else LengthDist("lognormal", 32, 4, 63, 0.5),
        )
        spec = dataclasses.replace(spec, **over)
        points = [Point(f"{r:g} req/s", r, dataclasses.replace(spec, rate=r)) for r in rates]
        title = (
            "Latency vs load (Poisson arrivals)"
            if spec.arrival == "poisson"
            else (f"Latency vs load ({spec.arrival} arrivals, CV {spec.cv:g})")
        )
        xlabel = "arrival rate (req/s)"
    elif name == "adapters_sweep":
        counts = [int(c) for c in _floats(args.adapter_counts) or ([1, 4] if q else [1, 4, 16, 64])]
        spec = WorkloadSpec(
            num_requests=4 if q else 64,
            arrival="burst",
            popularity="round_robin",
            ranks=ranks,
            rank_assign="cycle",
            prompt_len=LengthDist("fixed", 16 if q else 64),
            output_len=LengthDist("fixed", 4 if q else 64),
        )
        spec = dataclasses.replace(spec, **over)
        points = [
            Point(f"{c} adapters", c, dataclasses.replace(spec, num_adapters=c)) for c in counts
        ]
        title = f"Throughput vs number of adapters ({spec.num_requests} requests at once)"
        xlabel = "distinct adapters"
    elif name == "cold_start":
        n = 6 if q else 200
        spec = WorkloadSpec(
            num_requests=n,
            arrival="poisson",
            rate=4.0 if q else 1.0,
            num_adapters=n,
            popularity="round_robin",
            ranks=ranks,
            prompt_len=LengthDist("fixed", 32) if q else LengthDist("lognormal", 96, 8, 224, 0.6),
            output_len=LengthDist("fixed", 4 if q else 16),
        )
        spec = dataclasses.replace(spec, **over)
        points = [Point("cold-heavy", spec.rate, spec)]
        title = (
            f"Cold start: {spec.num_requests} requests over {spec.num_adapters} adapters "
            f"(Poisson {spec.rate:g} req/s), TTFT by cold-start mode"
        )
        xlabel = "mode"
        systems = ["cara"]
        link = args.link_gbps if args.link_gbps is not None else 10.0
        host = int((args.host_budget_mb if args.host_budget_mb is not None else 32) * (1 << 20))
        notes.append(
            f"Emulated: the host-to-device link runs at {link:g} GB/s (PoolConfig."
            f"emulate_link_gbps; on a CPU-only machine the 'device' is host memory and a copy "
            f"is a memcpy), and the host tier holds {host >> 20} MiB, so adapters are re-read "
            f"from disk (the OS page cache may serve those reads)."
        )
        args.link_gbps, args.host_budget_mb = link, host / (1 << 20)
    elif name == "admission":
        # rank-aware admission beside FIFO: a loaded instance, skewed popularity, mixed ranks
        spec = WorkloadSpec(
            num_requests=8 if q else 96,
            arrival="poisson",
            rate=4.0 if q else 3.0,
            num_adapters=4 if q else 32,
            popularity="maf",
            ranks=ranks,
            prompt_len=LengthDist("fixed", 16) if q else LengthDist("lognormal", 64, 8, 128, 0.5),
            output_len=LengthDist("fixed", 8) if q else LengthDist("lognormal", 48, 8, 96, 0.5),
        )
        spec = dataclasses.replace(spec, **over)
        points = [Point(f"{spec.rate:g} req/s", spec.rate, spec)]
        title = (
            f"Admission: FIFO vs rank-aware (SLO {args.slo_tpot * 1e3:g} ms/token), "
            f"{spec.num_requests} requests at {spec.rate:g}/s over {spec.num_adapters} adapters"
        )
        xlabel = "arrival rate (req/s)"
        systems = ["cara"]
        if not args.admission:
            args.admission = "fifo,slo"
        notes.append(
            "Both runs use the same TPOT SLO for admission (the engine's default SLO) and for "
            "attainment; the cost model is the profiled one for this machine."
        )
    elif name == "engine_poisson":  # the first serving bench, kept for its results history
        spec = WorkloadSpec(
            num_requests=6 if q else 48,
            rate=2.0,
            num_adapters=4 if q else 16,
            ranks=ranks,
            rank_assign="cycle",
            prompt_len=LengthDist("uniform", 80, 32, 128),
            output_len=LengthDist("fixed", 4 if q else 32),
        )
        spec = dataclasses.replace(spec, **over)
        points = [Point(f"{spec.rate:g} req/s", spec.rate, spec)]
        title = (
            f"Poisson serving: {spec.num_requests} requests at {spec.rate:g}/s over "
            f"{spec.num_adapters} adapters"
        )
        xlabel = "arrival rate (req/s)"
        systems = ["cara", "hf"]
        targets = args.targets or "all"
    else:
        raise ValueError(f"unknown experiment {name!r}; choose from {EXPERIMENTS}")
    if args.systems:
        systems = [s for s in args.systems.split(",") if s]
        bad = set(systems) - set(SYSTEM_KEYS)
        if bad:
            raise ValueError(f"unknown systems {sorted(bad)}; choose from {SYSTEM_KEYS}")
    default_modes = (
        list(COLD_MODES)
        if name == "cold_start"
        else (["sync"] if name == "engine_poisson" else [None])  # None: cara-serve's (auto)
    )
    modes = args.cold_start.split(",") if args.cold_start else default_modes
    strategies = args.lora_strategy.split(",") if args.lora_strategy else [None]
    admissions = args.admission.split(",") if args.admission else [None]
    cost_model = args.cost_model if "slo" in admissions else None
    cara = []
    for m, s, a in itertools.product(modes, strategies, admissions):
        opts = dataclasses.replace(
            base_opts,
            cold_start=m,
            lora_strategy=s,
            link_gbps=args.link_gbps,
            host_budget_bytes=None
            if args.host_budget_mb is None
            else int(args.host_budget_mb * (1 << 20)),
            admission=a,
            cost_model=cost_model,
            tpot_slo=args.slo_tpot if cost_model else None,
        )
        tags = [t for t, many in ((m, modes), (s, strategies), (a, admissions)) if len(many) > 1]
        cara.append((f"cara-jax[{','.join(tags)}]" if tags else "cara-jax", opts))
    return Plan(name, title, points, xlabel, systems, cara, base_opts, targets, notes)
