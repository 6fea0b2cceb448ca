"""Discrete-event simulation of routing policies over many instances, driven by cost models.

    python -m bench.simulate [--synthetic | --cost-model FILE] [--instances 60] [--rate 340]
                             [--kernels bgmv,mbgmv] [--policies ...] [--sweep 200,260,...]

Why: CaraServe's routing result (99% SLO attainment with 60 instances at ~340 req/s) is about
scale; the real engine cannot run 60 instances here, but the fitted cost models can. Each
instance runs continuous batching with the admission policy of cara_jax.scheduling.admission,
one step at a time: the step's latency is the cost model's decode latency of the running batch
plus the prefill latency of the requests admitted in it (prefill stalls the batch, as in the
engine). A request's TPOT is (last token - first token) / (tokens - 1); it meets its SLO when
that is at most its SLO: ``--slo-ms`` if given, else ``slo_factor`` x the base model's step
latency averaged over the batch sizes it decoded in (the default SLO of the admission rule).
Rejected requests (queue full) and unfinished ones count as misses. Requests arriving in the
first ``--warmup`` seconds are not counted.

Workload: Poisson arrivals; thousands of adapters with MAF-like skewed popularity (log-normal
per-adapter rates, sigma 3.5, as the Azure Functions trace; or Zipf); each adapter has a rank
drawn uniformly from ``--ranks``; log-normal prompt and output lengths. Everything is seeded:
the same arguments give the same table. Not modelled: adapter loading and device memory (every
instance may serve every adapter), KV length in the decode cost, preemption.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sim.fleet import simulate
from bench.sim.workload import Lengths, Scenario, rank_mix
from cara_jax.scheduling.cost_model import CostModel, load_cost_models, synthetic_gpu_cost_model

BASELINES = ("random", "round_robin", "least_loaded", "first_fit", "first_fit_slo")
DEFAULT_POLICIES = ("rank_aware", *BASELINES)


# ---------------------------------------------------------------------- command line


def _cost_models(args: argparse.Namespace) -> dict[str, CostModel]:
    kernels = [k for k in args.kernels.split(",") if k]
    if args.cost_model:
        found = {}
        for m in load_cost_models(args.cost_model).values():
            if m.kernel in kernels and (args.model is None or m.model == args.model):
                found.setdefault(m.kernel, m)
        missing = set(kernels) - set(found)
        if missing:
            raise SystemExit(f"{args.cost_model} has no model for kernel(s) {sorted(missing)}")
        return {k: found[k] for k in kernels}
    if args.synthetic:
        return {k: synthetic_gpu_cost_model(k) for k in kernels}
    args.cost_model = measured_cost_model()
    return _cost_models(args)


# Cost models fitted from measured step times (`cara-jax profile`), the first that exists: a
# GPU profile (taken where bench/gpu_check runs), then this repository's CPU profile.
RESULTS = Path(__file__).resolve().parent / "results"
MEASURED = (RESULTS / "cost_model_smollm2_gpu.json", RESULTS / "cost_model_smollm2_cpu1core.json")


def measured_cost_model() -> str:
    for f in MEASURED:
        if f.is_file():
            return str(f.relative_to(RESULTS.parent.parent))
    raise SystemExit(f"no measured cost model ({', '.join(map(str, MEASURED))}); run "
                     "`cara-jax profile --out FILE` and pass --cost-model FILE, or --synthetic")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    d = Scenario()
    p = argparse.ArgumentParser(prog="python -m bench simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", action="store_true",
                     help="paper-like GPU coefficients (assumed, not measured)")  # fmt: skip
    src.add_argument("--cost-model",
                     help="cost-model JSON from `cara-jax profile` (default: the measured GPU "
                          "profile if there is one, else the measured CPU one; see MEASURED)")  # fmt: skip
    p.add_argument("--model", help="model name in the JSON (when it holds several)")
    p.add_argument("--kernels", default="bgmv,mbgmv")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--instances", type=int, default=d.instances)
    p.add_argument("--rate", type=float, default=d.rate, help="requests/s")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of arrivals")
    p.add_argument("--warmup", type=float, help="uncounted seconds (default: 10%% of duration)")
    p.add_argument("--adapters", type=int, default=d.adapters)
    p.add_argument("--popularity", choices=["maf", "zipf", "uniform"], default=d.popularity)
    p.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha)
    p.add_argument("--ranks", default=",".join(map(str, d.ranks)))
    p.add_argument("--prompt-len", default="100:1.0:4:2048", help="MEAN:SIGMA:LOW:HIGH or N")
    p.add_argument("--output-len", default="128:0.8:4:1024", help="MEAN:SIGMA:LOW:HIGH or N")
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--max-prefill", type=int, default=d.max_prefill)
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--max-wait", type=float, default=d.max_wait_s, help="aging bound (s)")
    p.add_argument("--headroom", type=float, default=d.headroom)
    p.add_argument("--slo-factor", type=float, default=d.slo_factor)
    p.add_argument("--slo-ms", type=float, help="explicit TPOT SLO (default: factor x base)")
    p.add_argument("--sweep", help="comma list of rates: SLO attainment per policy and rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for STEM.md and STEM.json (default: print only)")
    p.add_argument("--stem", default="simulate")
    return p


def scenario_from_args(a: argparse.Namespace, rate: float | None = None) -> Scenario:
    return Scenario(
        instances=a.instances, rate=a.rate if rate is None else rate, duration_s=a.duration,
        warmup_s=a.duration * 0.1 if a.warmup is None else a.warmup, adapters=a.adapters,
        popularity=a.popularity, zipf_alpha=a.zipf_alpha,
        ranks=tuple(int(r) for r in a.ranks.split(",")),
        prompt_len=Lengths.parse(a.prompt_len), output_len=Lengths.parse(a.output_len),
        max_batch=a.max_batch, max_prefill=a.max_prefill, max_queue=a.max_queue,
        max_wait_s=a.max_wait, headroom=a.headroom, slo_factor=a.slo_factor,
        slo_s=None if a.slo_ms is None else a.slo_ms / 1e3, seed=a.seed,
    )  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| kernel | rate (req/s) | policy | SLO attainment | mean TPOT (ms) | p99 TPOT (ms) "
        "| mean TTFT (ms) | p99 TTFT (ms) | aged | rejected |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['rate']:g} | {r['policy']} | {r['slo_attainment']:.1%} "
            f"| {r['mean_tpot_ms']:.1f} | {r['p99_tpot_ms']:.1f} | {r['mean_ttft_ms']:.0f} "
            f"| {r['p99_ttft_ms']:.0f} "
            f"| {r['aged']:.1%} | {r['rejected']:.1%} |"
        )
    return lines


def crossover(rows: list[dict[str, Any]], kernel: str) -> dict[str, Any] | None:
    """The lowest swept rate where the best baseline is below 90%, with rank_aware there."""
    by_rate: dict[float, dict[str, float]] = {}
    for r in rows:
        if r["kernel"] == kernel:
            by_rate.setdefault(r["rate"], {})[r["policy"]] = r["slo_attainment"]
    for rate in sorted(by_rate):
        pol = by_rate[rate]
        base = {p: v for p, v in pol.items() if p != "rank_aware"}
        if base and max(base.values()) < 0.90 and "rank_aware" in pol:
            best = max(base, key=base.get)
            return {"kernel": kernel, "rate": rate, "best_baseline": best,
                    "best_baseline_attainment": base[best], "rank_aware": pol["rank_aware"]}  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    models = _cost_models(a)
    policies = [p for p in a.policies.split(",") if p]
    rates = [float(x) for x in a.sweep.split(",")] if a.sweep else [a.rate]
    rows: list[dict[str, Any]] = []
    for kernel, cost in models.items():
        for rate in rates:
            sc = scenario_from_args(a, rate)
            for policy in policies:
                m = simulate(sc, cost, policy)
                rows.append({"kernel": kernel, "rate": rate, "policy": policy, **m})
                print(f"{kernel} {rate:g} req/s {policy}: {m['slo_attainment']:.1%} SLO, "
                      f"mean TPOT {m['mean_tpot_ms']:.1f} ms ({m['wall_s']} s)",
                      file=sys.stderr)  # fmt: skip
    sc = scenario_from_args(a)
    src = a.cost_model or "synthetic GPU-like coefficients (cost_model.synthetic_gpu_cost_model)"
    head = [
        f"# Routing simulation: {sc.instances} instances, {len(policies)} policies",
        "",
        f"Cost models: {src}; {', '.join(f'{k}: {m.key}' for k, m in models.items())}. "
        f"Workload: Poisson arrivals over {sc.duration_s:g} s (first {sc.warmup_s:g} s not "
        f"counted), {sc.adapters} adapters, {sc.popularity} popularity, ranks {list(sc.ranks)}, "
        f"prompt {a.prompt_len}, output {a.output_len} (log-normal MEAN:SIGMA:LOW:HIGH); per "
        f"instance max batch {sc.max_batch}, queue {sc.max_queue}, aging {sc.max_wait_s:g} s, "
        f"headroom {sc.headroom:g}; SLO "
        + (f"{a.slo_ms:g} ms" if a.slo_ms else f"{sc.slo_factor:g}x base-model TPOT")
        + f"; seed {sc.seed}. Share of requests by rank (popularity-weighted): "
        + ", ".join(f"{r}: {v:.0%}" for r, v in rank_mix(sc).items())
        + ".",
        "",
    ]
    lines = head + _table(rows)
    cross = [c for c in (crossover(rows, k) for k in models) if c is not None]
    if a.sweep:
        lines.append("")
        for k in models:
            c = next((c for c in cross if c["kernel"] == k), None)
            if c is None:
                lines.append(f"- {k}: the best baseline stays at or above 90% at every swept rate.")
            else:
                lines.append(
                    f"- {k}: at {c['rate']:g} req/s the best baseline ({c['best_baseline']}) "
                    f"reaches {c['best_baseline_attainment']:.1%}, rank_aware {c['rank_aware']:.1%}."
                )
    data = {"scenario": dataclasses.asdict(sc), "rank_mix": rank_mix(sc),
            "cost_models": {k: m.key for k, m in models.items()},
            "rows": rows, "crossover": cross, "argv": list(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    if a.out:
        from bench.lib.report import write_report

        write_report(a.out, a.stem, lines, data)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
