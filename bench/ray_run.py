"""The Ray Serve real run: `cara-serve --replicas N` with each request router, one seeded trace.

    python -m bench.ray_run --replicas 2 --policies rank_aware,power_of_two,least_loaded,round_robin \
        --rate 1.5 --duration 120 --cost-model bench/results/cost_model_smollm2_cpu1core.json

Starts a local Ray, then per request router deploys the fleet (server/fleet/serve.py): N engine
replicas, each pinned to its own cores (``--pin-cpus``), serving the same random PEFT adapters
of mixed ranks (``--ranks`` in turn, Zipf popularity, all preloaded with ``--cold-start
cached``), with FIFO admission on the replicas so that where a request goes is what decides
its TPOT. It replays the same Poisson trace of streaming completions through the ingress
(token-id prompts, greedy, ``ignore_eos``) and records TTFT and TPOT per request, as
bench/router_run.py does; a request meets the SLO if it finished with TPOT within
``--slo-tpot``. The fleet is deleted between routers (Ray keeps running). Writes
bench/results/ray_run.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.lib.metrics import Slo, summarize
from bench.lib.report import write_report
from bench.lib.serve_flags import engine_flags
from bench.lib.server_processes import free_port
from bench.lib.stream_replay import replay, warm_up
from bench.lib.workload import LengthDist, WorkloadSpec, generate

RESULTS = Path(__file__).parent / "results"
ROUTERS = ("rank_aware", "power_of_two", "least_loaded", "round_robin")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.ray_run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--policies", default=",".join(ROUTERS))
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    ap.add_argument("--rate", type=float, default=1.0, help="mean requests per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--ranks", default="8,8,8,256", help="assigned to the adapters in turn")
    ap.add_argument("--zipf-alpha", type=float, default=0.5, help="adapter popularity skew")
    ap.add_argument("--prompt-len", default="uniform:8:24", help="tokens (workload syntax)")
    ap.add_argument("--output-len", default="64", help="tokens (workload syntax)")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="per replica")
    ap.add_argument("--max-model-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=32)
    ap.add_argument("--token-buckets", default=None, help="the replicas' --token-buckets")
    ap.add_argument("--kv-cache-memory", default="64M")
    ap.add_argument(
        "--device-lora-bytes", default="768M", help="each replica's device pool (all adapters fit)"
    )
    # the one-core cost model below was fitted for bgmv on the previous engine
    ap.add_argument("--kernel", choices=["bgmv", "mbgmv"], default="bgmv")
    ap.add_argument("--cost-model", default="bench/results/cost_model_smollm2_cpu1core.json")
    ap.add_argument("--slo-tpot", type=float, required=True,
                    help="TPOT SLO in seconds (the replicas' default, and every request's "
                    "unless --slo-by-rank)")  # fmt: skip
    ap.add_argument(
        "--slo-by-rank",
        default="",
        metavar="RANK:S,...",
        help="per-request TPOT SLOs by adapter rank, sent as the request's `tpot_slo` "
        "(e.g. 8:0.15,256:0.4); a request meets its SLO if its TPOT is within its own",
    )
    ap.add_argument("--slo-ttft", type=float, default=10.0, help="TTFT SLO, reported only")
    ap.add_argument("--admission", default="fifo", help="the replicas' --admission")
    ap.add_argument("--no-pin", action="store_true", help="do not pin replicas to cores")
    ap.add_argument("--grace", type=float, default=240.0, help="seconds after the last arrival")
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="requests arriving in the first SECONDS are served but not counted (the fleet "
        "starts empty; default: 10%% of --duration, as in bench/simulate.py); the report gives "
        "the all-request figure too",
    )
    ap.add_argument("--note", default="", help="a line about the conditions, for the report")
    ap.add_argument("--stem", default="ray_run")
    ap.add_argument("--from-json", metavar="FILE", help="rewrite the report and plot of a run")
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def replica_argv(args, adapters: dict[str, Path], policy: str, port: int) -> list[str]:
    engine = engine_flags(
        warmup="full", max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_prefill_seqs=2, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
    )  # fmt: skip
    argv = [
        *engine, "--max-lora-rank", str(max(args.rank_list)), "--lora-kernel", args.kernel,
        "--cold-start", "cached", "--device-lora-bytes", args.device_lora_bytes,
        "--max-queue", "1024",
        "--cost-model", args.cost_model, "--tpot-slo", str(args.slo_tpot),
        "--admission", args.admission, "--log-level", "warning",
        "--replicas", str(args.replicas), "--ray-router", policy, "--replica-cpus", "1",
        "--port", str(port), "--avg-response-len", str(args.avg_output),
    ]  # fmt: skip
    if args.token_buckets:
        argv += ["--token-buckets", args.token_buckets]
    if not args.no_pin:
        argv.append("--pin-cpus")
    for name, path in adapters.items():
        argv += ["--lora", f"{name}={path}"]
    return argv


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.rank_list = [int(r) for r in args.ranks.split(",")]
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        args = argparse.Namespace(**{**data["args"], "out": args.out, "stem": args.stem})
        args.rank_list = [int(r) for r in args.ranks.split(",")]
        write_report(args.out, args.stem, report_lines(args, data), data)
        plot(Path(args.out) / f"{args.stem}.png", data["policies"], slo_label(args))
        return 0
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if bad := [p for p in policies if p not in ROUTERS]:
        raise SystemExit(f"unknown routers {bad}; choose from {ROUTERS}")
    import ray

    from bench.systems.common import TARGET_SETS, model_config, write_adapters
    from server.cli import build_parser as serve_parser
    from server.cli import fleet_config
    from server.fleet.serve import start_fleet, stop_fleet

    cfg = model_config()
    out_len = LengthDist.parse(args.output_len)
    args.avg_output = out_len.expected()
    spec = WorkloadSpec(
        num_requests=max(1, round(args.rate * args.duration)), arrival="poisson",
        rate=args.rate, num_adapters=args.adapters, popularity="zipf",
        zipf_alpha=args.zipf_alpha, ranks=tuple(args.rank_list), rank_assign="cycle",
        prompt_len=LengthDist.parse(args.prompt_len), output_len=out_len,
        vocab_size=cfg.vocab_size, seed=args.seed, adapter_prefix="lora-",
    )  # fmt: skip
    trace = generate(spec)
    if args.warmup is None:
        args.warmup = 0.1 * args.duration
    by_rank = {
        int(k): float(v) for k, v in (x.split(":") for x in args.slo_by_rank.split(",") if x)
    }

    def slo_of(rank: int) -> float:
        return by_rank.get(rank, args.slo_tpot)

    extra = (lambda r: {"tpot_slo": slo_of(r.rank)}) if by_rank else None
    work = Path(tempfile.mkdtemp(prefix="cara-ray-run-"))
    rows: dict[str, dict] = {}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, namespace="serve",
             log_to_driver=False)  # fmt: skip
    try:
        adapters = write_adapters(work / "adapters", trace.adapter_ranks, cfg, TARGET_SETS["all"])
        for policy in policies:
            port = free_port()
            sargs = serve_parser().parse_args(replica_argv(args, adapters, policy, port))
            fleet = fleet_config(sargs)
            t0 = time.perf_counter()
            url = start_fleet(fleet, "127.0.0.1", port)
            say(f"{policy}: fleet up in {time.perf_counter() - t0:.0f} s; warming up")
            for _ in range(args.replicas):
                asyncio.run(warm_up([url], list(adapters), trace.requests[0].prompt))
            time.sleep(2)
            say(f"{policy}: replaying {len(trace)} requests over {args.duration:.0f} s ...")
            results, where = asyncio.run(replay(url, trace, args.grace, extra))
            s = summarize(results, Slo(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot))
            counted = [r for r in results if r.arrival >= args.warmup]
            s["slo_tpot"] = attainment(counted, slo_of)
            all_att = attainment(results, slo_of)
            by_rank_att = {
                str(rk): attainment([r for r in counted if r.rank == rk], slo_of)
                for rk in args.rank_list
            }
            replicas = sorted({w for w in where if w})
            per_replica = {
                w: {
                    "requests": sum(x == w for x in where),
                    "by_rank": {
                        str(rk): sum(x == w and r.rank == rk for x, r in zip(where, results, strict=True))
                        for rk in args.rank_list
                    },
                }
                for w in replicas
            }  # fmt: skip
            rows[policy] = {
                "completed": int(s["ok"]), "failed": int(s["errors"]),
                "slo_attainment": s["slo_tpot"], "tpot_mean_s": s["tpot_mean"],
                "tpot_p50_s": s["tpot_p50"], "tpot_p99_s": s["tpot_p99"],
                "ttft_p50_s": s["ttft_p50"], "ttft_p99_s": s["ttft_p99"],
                "ttft_mean_s": s["ttft_mean"], "throughput_tok_s": s["throughput_tok_s"],
                "per_replica": per_replica, "slo_attainment_by_rank": by_rank_att,
                "counted": len(counted), "slo_attainment_all_requests": all_att,
                "failure_samples": sorted({r.error for r in results if r.error})[:5],
                "requests": [r.to_dict() for r in results],
            }  # fmt: skip
            say(
                f"  completed {s['ok']:.0f}, failed {s['errors']:.0f}, TPOT-SLO "
                f"{100 * s['slo_tpot']:.1f}%, TPOT p99 {1e3 * s['tpot_p99']:.0f} ms, "
                f"TTFT p99 {s['ttft_p99']:.2f} s, per replica {per_replica}"
            )
            stop_fleet(fleet, shutdown_ray=False)
            time.sleep(3)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    data = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "rank_list")},
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, "
        "no accelerator",
        "date": time.strftime("%Y-%m-%d"),
        "workload": spec.to_dict(),
        "adapter_ranks": trace.adapter_ranks,
        "policies": rows,
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    write_report(args.out, args.stem, report_lines(args, data), data)
    plot(Path(args.out) / f"{args.stem}.png", rows, slo_label(args))
    return 0


def attainment(results, slo_of) -> float:
    """Share of requests that finished with TPOT within their own SLO (a one-token answer has
    no TPOT and meets it)."""
    ok = [r.ok and (r.tpot is None or r.tpot <= slo_of(r.rank)) for r in results]
    return sum(ok) / max(len(ok), 1)


def report_lines(args, data: dict) -> list[str]:
    rows = data["policies"]
    share = {}
    for rk in args.rank_list:
        n = sum(1 for r in next(iter(rows.values()))["requests"] if r.get("rank") == rk)
        share[rk] = n
    lines = [
        f"# Ray Serve real run: {args.replicas} replicas, {len(rows)} request routers",
        "",
        f"Machine: {data['machine']}; replicas pinned to separate cores: {not args.no_pin}. "
        f"{args.note}".strip(),
        "",
        f"Workload: {data['workload']['num_requests']} streaming completions, Poisson "
        f"{args.rate:g} req/s over {args.duration:g} s, seed {args.seed}; {args.adapters} "
        f"adapters of ranks {args.ranks} (in turn, Zipf {args.zipf_alpha:g}; requests by rank: "
        + ", ".join(f"{k}: {v}" for k, v in share.items())
        + f"); prompt {args.prompt_len}, output {args.output_len} tokens (ignore_eos, greedy). "
        f"Replicas: {args.kernel}, max {args.max_num_seqs} sequences, {args.admission} "
        f"admission, cost model {args.cost_model}. TPOT SLO "
        + (
            ", ".join(
                f"rank {k}: {1e3 * float(v):.0f} ms"
                for k, v in (x.split(":") for x in args.slo_by_rank.split(","))
            )  # fmt: skip
            + " (per request, sent as `tpot_slo`)"
            if args.slo_by_rank
            else f"{1e3 * args.slo_tpot:.0f} ms"
        )
        + ".",
        "",
        f"Requests arriving in the first {args.warmup:g} s are served but not counted in the "
        "attainment (the fleet starts empty); the last column but one counts every request. "
        "TPOT and TTFT percentiles are over all requests.",
        "",
        "| router | completed | TPOT-SLO attainment | by rank | all requests | TPOT p50 (ms) "
        "| TPOT p99 (ms) | TTFT p50 (s) | TTFT p99 (s) | requests per replica (rank mix) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for policy, r in rows.items():
        reps = "; ".join(
            f"{v['requests']} ({', '.join(f'r{k}: {n}' for k, n in v['by_rank'].items())})"
            for v in r["per_replica"].values()
        )
        lines.append(
            f"| {policy} | {r['completed']}/{r['completed'] + r['failed']} "
            f"| {100 * r['slo_attainment']:.1f}% | "
            + ", ".join(f"r{k}: {100 * v:.0f}%" for k, v in r["slo_attainment_by_rank"].items())
            + f" | {100 * r['slo_attainment_all_requests']:.1f}%"
            + f" | {1e3 * r['tpot_p50_s']:.0f} "
            f"| {1e3 * r['tpot_p99_s']:.0f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} "
            f"| {reps} |"
        )
    base = {p: r for p, r in rows.items() if p != "rank_aware"}
    if "rank_aware" in rows and base:
        best = max(base, key=lambda p: base[p]["slo_attainment"])
        lines += [
            "",
            f"Best baseline: {best} at {100 * base[best]['slo_attainment']:.1f}%; rank_aware "
            f"{100 * rows['rank_aware']['slo_attainment']:.1f}% (TTFT p99 "
            f"{rows['rank_aware']['ttft_p99_s']:.2f} s against {base[best]['ttft_p99_s']:.2f} s).",
        ]
    lines += ["", f"Command: `python -m bench.ray_run {shlex.join(data.get('argv', []))}`"]
    return lines


def slo_label(args) -> str:
    return "each request's own SLO" if args.slo_by_rank else f"{1e3 * args.slo_tpot:.0f} ms"


def plot(path: Path, rows: dict[str, dict], slo: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    att = [100 * rows[n]["slo_attainment"] for n in names]
    colors = ["tab:green" if n == "rank_aware" else "tab:gray" for n in names]
    a.bar(names, att, color=colors)
    a.axhline(99, ls="--", c="k", lw=0.8)
    a.axhline(90, ls=":", c="k", lw=0.8)
    a.set_ylabel(f"TPOT-SLO attainment (%), {slo}")
    a.set_ylim(0, 105)
    for i, v in enumerate(att):
        a.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ttft = [[rows[n]["ttft_p50_s"], rows[n]["ttft_p99_s"]] for n in names]
    x = np.arange(len(names))
    b.bar(x - 0.2, [t[0] for t in ttft], 0.4, label="p50", color="tab:blue")
    b.bar(x + 0.2, [t[1] for t in ttft], 0.4, label="p99", color="tab:orange")
    b.set_xticks(x, names)
    b.set_ylabel("TTFT (s)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
