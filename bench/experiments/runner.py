"""The experiments of ``python -m bench run``: workloads, systems, reports.

An experiment is a list of points, each a seeded workload (one trace), and a list of systems.
Every system is started once (model and all adapters loaded, cara-jax compiled and warmed up),
then replays every point's trace in turn, so all systems see identical requests. Per point the
report gives each system's metrics and every cara-jax configuration's ratio to each baseline
measured in the same run. What each experiment runs is in bench/experiments/plans.py, its options
in bench/experiments/args.py; this module runs a plan and writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.experiments import report as experiment_report
from bench.experiments.args import add_run_args  # noqa: F401  (re-exported for the tests)
from bench.experiments.plans import build_plan
from bench.lib import metrics
from bench.lib.metrics import RequestResult, Slo
from bench.lib.plan import Plan, Point
from bench.lib.workload import Trace, generate, save_jsonl
from bench.systems import LABELS, RunOptions, SystemUnavailable, make_system
from bench.systems.common import TARGET_SETS, model_config, write_adapters

GiB = 1 << 30


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
        from bench.lib.workload import load_jsonl

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


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    if not args.no_compile_cache:
        import jax

        root = os.environ.get("CARA_JAX_CACHE") or Path.home() / ".cache" / "cara_jax"
        jax.config.update(
            "jax_compilation_cache_dir", args.compile_cache or str(Path(root) / "xla")
        )
    return run_plan(build_plan(args.experiment, args), args)
