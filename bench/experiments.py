"""The experiments of ``python -m bench run``: workloads, systems, reports.

An experiment is a list of points, each a seeded workload (one trace), and a list of systems.
Every system is started once (model and all adapters loaded, cara-jax compiled and warmed up),
then replays every point's trace in turn, so all systems see identical requests. Per point the
report gives each system's metrics and every cara-jax configuration's ratio to each baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import experiment_report, metrics
from bench.metrics import RequestResult, Slo
from bench.plan import Plan, Point
from bench.systems import LABELS, SYSTEM_KEYS, RunOptions, SystemUnavailable, make_system
from bench.systems.common import TARGET_SETS, model_config, write_adapters
from bench.workload import LengthDist, Trace, WorkloadSpec, generate, save_jsonl
from server.cli import byte_size

EXPERIMENTS = (
    "serving", "load_sweep", "adapters_sweep", "cold_start", "admission", "engine_poisson"
)  # fmt: skip
DEFAULT_COST_MODEL = "bench/results/cost_model_smollm2_cpu.json"
COLD_MODES = ("sync", "cached", "cpu_assist", "auto")
GiB = 1 << 30


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


# ---------------------------------------------------------------------------- running


def _adapter_ranks(traces: list[Trace]) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for t in traces:
        for name, r in t.adapter_ranks.items():
            if ranks.setdefault(name, r) != r:
                raise ValueError(
                    f"adapter {name} has rank {ranks[name]} in one point, {r} in another"
                )
    return ranks


@dataclasses.dataclass
class _SystemJob:
    """One system's whole life in a bench run: start, replay every point, close.

    Picklable, so that it can run in a fresh process: XLA:CPU maps memory regions for every
    compiled program, and a crash there (e.g. LLVM aborting) then takes only this system down.
    One process per system also keeps one system's threads and caches from slowing the next.
    """

    key: str
    label: str
    opts: RunOptions
    adapters: dict[str, Path]
    max_context: int
    points: list[Point]
    traces: list[Trace]
    slo: Slo
    compile_cache: str | None

    def __call__(self) -> tuple[str | None, dict[str, Any], list[list[dict[str, Any]]]]:
        """(why it was skipped, or None; its report entry; its raw results per point)."""
        if self.compile_cache:
            import jax

            jax.config.update("jax_compilation_cache_dir", self.compile_cache)
        label = self.label
        print(f"== {label}: starting", flush=True)
        system = make_system(self.key, self.opts, label)
        t = time.perf_counter()
        try:
            system.start(self.adapters, self.max_context)
        except SystemUnavailable as e:
            print(f"== {label}: skipped: {e}", flush=True)
            system.close()
            return str(e), {}, []
        except Exception as e:  # a broken system must not take the others down
            msg = f"failed to start: {type(e).__name__}: {e}"
            print(f"== {label}: {msg}", flush=True)
            system.close()
            return msg, {}, []
        entry: dict[str, Any] = {"start_s": time.perf_counter() - t, "points": []}
        raw: list[list[dict[str, Any]]] = []
        try:
            for p, tr in zip(self.points, self.traces, strict=True):
                try:
                    res = system.replay(tr, desc=f"{label} {p.label}")
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    print(f"== {label} {p.label}: replay failed: {msg}", flush=True)
                    res = [
                        RequestResult(r.id, r.arrival, [], False, msg, r.adapter, r.rank)
                        for r in tr.requests
                    ]
                summary = metrics.summarize(res, self.slo)
                cold = metrics.by_cold(res, True)
                if cold:
                    summary.update(
                        {
                            f"cold_{k}": v
                            for k, v in metrics.summarize(cold, self.slo).items()
                            if k.startswith("ttft") or k == "requests"
                        }
                    )
                entry["points"].append(
                    {
                        "label": p.label,
                        "summary": summary,
                        "info": dict(getattr(system, "info", {})),
                    }
                )
                raw.append([r.to_dict() for r in res])
                print(f"== {label} {p.label}: {_one_line(summary)}", flush=True)
        finally:
            system.close()
        entry["options"] = dataclasses.asdict(self.opts) if self.key == "cara" else None
        return None, entry, raw


def _isolated(job: _SystemJob) -> tuple[str | None, dict[str, Any], list]:
    """Run ``job`` in a fresh spawned process; a crash there skips the system, not the run."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        try:
            return ex.submit(job).result()
        except Exception as e:  # e.g. the process was killed (out of memory, LLVM abort)
            msg = f"its process failed: {type(e).__name__}: {e}"
            print(f"== {job.label}: {msg}", flush=True)
            return msg, {}, []


def _compile_cache_dir() -> str | None:
    import jax

    return jax.config.jax_compilation_cache_dir or None


def run_plan(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    slo = Slo(args.slo_ttft, args.slo_tpot)
    cfg = model_config()
    traces = [generate(dataclasses.replace(p.spec, vocab_size=cfg.vocab_size)) for p in plan.points]
    if args.trace:
        from bench.workload import load_jsonl

        traces = [load_jsonl(args.trace)]
        plan.points = [
            Point(Path(args.trace).stem, len(traces[0]), traces[0].spec or plan.points[0].spec)
        ]
    out_dir = Path(args.out)
    stem = plan.name + ("_quick" if args.quick else "")
    if args.save_traces:
        for i, t in enumerate(traces):
            save_jsonl(t, out_dir / "traces" / f"{stem}_{i}.jsonl")
    max_context = max(t.max_context() for t in traces)
    ranks = _adapter_ranks(traces)
    report: dict[str, Any] = {
        "experiment": plan.name,
        "quick": args.quick,
        "title": plan.title,
        "machine": _machine(),
        "date": datetime.date.today().isoformat(),
        "slo": dataclasses.asdict(slo),
        "targets": plan.targets,
        "notes": plan.notes,
        "points": [
            {"label": p.label, "x": p.x, "workload": t.spec.to_dict() if t.spec else None}
            for p, t in zip(plan.points, traces, strict=True)
        ],
        "systems": {},
        "skipped": {},
    }
    raw: dict[str, Any] = {}
    runs: list[tuple[str, str, RunOptions]] = []
    for key in plan.systems:
        if key == "cara":
            runs += [("cara", label, o) for label, o in plan.cara]
        else:
            runs.append((key, LABELS[key], plan.baseline_opts))
    with tempfile.TemporaryDirectory(prefix="cara-bench-") as tmp:
        t = time.perf_counter()
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ranks), desc="writing adapters", unit="adapter", leave=False)
        adapters = write_adapters(
            Path(tmp), ranks, cfg, TARGET_SETS[plan.targets], on_written=bar.update if bar else None
        )
        if bar:
            bar.close()
        report["adapters_written_s"] = time.perf_counter() - t
        for key, label, opts in runs:
            job = _SystemJob(key, label, opts, adapters, max_context, plan.points, traces, slo,
                             _compile_cache_dir())  # fmt: skip
            if args.in_process:
                skipped, entry, res = job()
            else:
                skipped, entry, res = _isolated(job)
            if skipped is not None:
                report["skipped"][label] = skipped
                continue
            raw[label] = res
            report["systems"][label] = entry
    report["ratios"] = _all_ratios(plan, report)
    experiment_report.write(plan, report, raw, out_dir, stem)
    return report


def _one_line(s: dict[str, float]) -> str:
    return (
        f"{s['throughput_tok_s']:.1f} tok/s, TTFT p50 {s['ttft_p50']:.3f} s, "
        f"TPOT p50 {s['tpot_p50'] * 1e3:.1f} ms, errors {s['errors']}"
    )


def _all_ratios(plan: Plan, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per point: every cara-jax configuration against every other system in the same run
    (in cold_start: every mode against ``cached``)."""
    systems = report["systems"]
    cara = [label for label, _ in plan.cara if label in systems]
    others = [s for s in systems if s not in cara]
    if plan.name == "cold_start":
        ref = [label for label, o in plan.cara if o.cold_start == "cached" and label in systems]
        pairs = [(c, r) for c in cara for r in ref if c != r]
    else:
        pairs = [(c, b) for c in cara for b in others]
    out = []
    for i, p in enumerate(plan.points):
        for ours, base in pairs:
            r = metrics.ratios(
                systems[ours]["points"][i]["summary"], systems[base]["points"][i]["summary"]
            )
            out.append({"point": p.label, "ours": ours, "baseline": base, "ratios": r})
    return out


def _machine() -> dict[str, Any]:
    import jax

    return {
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------- CLI


def add_run_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("experiment", choices=EXPERIMENTS)
    ap.add_argument("--quick", action="store_true", help="smoke-test size (seconds, not minutes)")
    ap.add_argument(
        "--systems",
        help=f"comma list of {','.join(SYSTEM_KEYS)} (default: all the experiment uses)",
    )
    ap.add_argument("--out", default="bench/results", help="results folder")
    ap.add_argument(
        "--cold-start", help="cara-jax cold-start mode(s), comma list of sync,cached,cpu_assist,auto"
    )
    ap.add_argument("--lora-strategy", help="cara-jax LoRA kernel(s), comma list of bgmv,mbgmv")
    ap.add_argument("--link-gbps", type=float, help="emulated host->device link of cara-jax's pool")
    ap.add_argument(
        "--host-budget-mb", type=float, help="cara-jax host tier (small: disk re-reads)"
    )
    ap.add_argument(
        "--num-slots",
        "--max-num-seqs",
        dest="max_num_seqs",
        type=int,
        help="cara-jax sequences running at once = HF max batch (16; quick 4)",
    )
    ap.add_argument(
        "--max-prefill-batch",
        "--max-prefill-seqs",
        dest="max_prefill_seqs",
        type=int,
        help="cara-jax prompts advancing one chunk each per step (8; quick 2)",
    )
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="cara-jax token budget of one step = its largest program (default: the engine's)",
    )
    ap.add_argument(
        "--kv-cache-memory",
        type=byte_size,
        help="cara-jax paged KV cache, bytes (512M, 2G; default: room for every sequence's "
        "full context)",
    )
    ap.add_argument(
        "--compile-cache",
        help="JAX persistent compilation cache folder; reruns and the other cold-start modes "
        "then skip most warm-up compiles (default: $CARA_JAX_CACHE/xla or ~/.cache/cara_jax/xla)",
    )
    ap.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run every system in this process (default: each in a fresh process)",
    )
    ap.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    ap.add_argument("--targets", choices=sorted(TARGET_SETS), help="projections the adapters adapt")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO in seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT SLO in seconds")
    ap.add_argument("--admission", help="cara-jax admission(s), comma list of fifo,slo")
    ap.add_argument(
        "--cost-model", default=DEFAULT_COST_MODEL, help="cost models for slo admission (JSON)"
    )
    g = ap.add_argument_group("workload (defaults depend on the experiment)")
    g.add_argument("--requests", type=int)
    g.add_argument("--rate", type=float, help="mean arrivals per second")
    g.add_argument("--rates", help="load_sweep: comma list of rates")
    g.add_argument("--adapters", type=int, help="number of adapters")
    g.add_argument("--adapter-counts", help="adapters_sweep: comma list of adapter counts")
    g.add_argument("--arrival", choices=["poisson", "gamma", "burst"])
    g.add_argument("--cv", type=float, help="gamma arrivals: coefficient of variation")
    g.add_argument("--popularity", choices=["uniform", "zipf", "round_robin", "maf"])
    g.add_argument("--zipf-alpha", type=float)
    g.add_argument("--ranks", help="comma list, e.g. 8,16,32,64")
    g.add_argument("--prompt-len", help="64 | uniform:32:128 | lognormal:MEAN:SIGMA[:LOW:HIGH]")
    g.add_argument("--output-len", help="same forms as --prompt-len")
    g.add_argument("--seed", type=int)
    g.add_argument("--trace", help="replay this JSONL trace instead of generating one")
    g.add_argument("--save-traces", action="store_true", help="also write the traces (JSONL)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    if not args.no_compile_cache:
        import jax

        root = os.environ.get("CARA_JAX_CACHE") or Path.home() / ".cache" / "cara_jax"
        jax.config.update(
            "jax_compilation_cache_dir", args.compile_cache or str(Path(root) / "xla")
        )
    return run_plan(build_plan(args.experiment, args), args)
