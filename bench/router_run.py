"""The router's real run: N cara-serve processes, one `cara-router` per policy, one seeded trace.

    python -m bench.router_run --instances 2 --duration 60 --rate 1.0 \
        --policies rank_aware,round_robin,least_loaded,first_fit

Starts N ``cara-serve`` subprocesses on free ports, one after the other (the first compiles the
engine's programs, the rest read them from the persistent compile cache), each serving the same
random PEFT adapters of mixed ranks (``--ranks``, assigned in turn; popularity Zipf, so the
traffic is skewed). Then, per policy, it starts a ``cara-router`` subprocess in front of them
and replays the same Poisson trace of streaming completions through it: token-id prompts,
greedy, ``ignore_eos`` so every request decodes its full ``max_tokens``. Between policies the
instances drain to idle. Per request it records TTFT (from the trace's arrival time) and TPOT
(last minus first token over tokens - 1); a request meets the SLO if it finished and its TPOT
is within the TPOT SLO: ``--slo-tpot``, else the instances' own default, 1.5 x the cost model's
base-model step at a full batch (``--num-slots`` rows). Writes bench/results/router_run.{md,json}.

Every subprocess is stopped on exit, on an error and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.lib.metrics import Slo, summarize
from bench.lib.report import write_report
from bench.lib.serve_flags import engine_flags
from bench.lib.server_processes import Processes, free_port, get_json, wait_healthy, wait_idle
from bench.lib.stream_replay import replay, warm_up
from bench.lib.workload import LengthDist, Trace, WorkloadSpec, generate
from server.cli import byte_size

RESULTS = Path(__file__).parent / "results"
DEFAULT_COST_MODEL = "bench/results/cost_model_smollm2_cpu.json"  # relative to the repo root


def tpot_slo(args, state: dict | None) -> tuple[float, str]:
    """The TPOT SLO and where it came from."""
    if args.slo_tpot:
        return args.slo_tpot, "--slo-tpot"
    if state and state.get("tpot_slo_s"):
        return float(state["tpot_slo_s"]), "the instances' --tpot-slo"
    from cara_jax.scheduling.cost_model import CostModel

    cost = None
    if state and state.get("cost_model"):
        cost = CostModel.from_dict(state["cost_model"])
    elif args.cost_model:
        cost = CostModel.load(args.cost_model, kernel=args.kernel)
    if cost is None:
        raise SystemExit("no TPOT SLO: give --slo-tpot or a --cost-model")
    return cost.default_slo(args.max_num_seqs), f"1.5 x base step at {args.max_num_seqs} rows"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.router_run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--policies", default="rank_aware,round_robin,least_loaded,first_fit")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    ap.add_argument("--rate", type=float, default=1.0, help="mean requests per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--ranks", default="8,16,32,64", help="assigned to the adapters in turn")
    ap.add_argument("--zipf-alpha", type=float, default=1.0, help="adapter popularity skew")
    ap.add_argument("--prompt-len", default="uniform:16:64", help="tokens (workload syntax)")
    ap.add_argument("--output-len", default="32", help="tokens (workload syntax)")
    ap.add_argument(
        "--num-slots", "--max-num-seqs", dest="max_num_seqs", type=int, default=4,
        help="sequences each instance runs at once",
    )  # fmt: skip
    ap.add_argument("--max-len", "--max-model-len", dest="max_model_len", type=int, default=128)
    ap.add_argument(
        "--max-prefill-batch", "--max-prefill-seqs", dest="max_prefill_seqs", type=int,
        default=1, help="prompts that advance one chunk each per step, per instance",
    )  # fmt: skip
    ap.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step")
    ap.add_argument(
        "--kv-cache-memory", type=byte_size,
        help="each instance's paged KV cache, bytes (512M, 2G; default: every sequence's full "
        "context)",
    )  # fmt: skip
    ap.add_argument("--kernel", choices=["bgmv", "mbgmv"], default="bgmv")
    ap.add_argument(
        "--cost-model",
        default=DEFAULT_COST_MODEL,
        help="passed to the instances and the router ('' for none)",
    )
    ap.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds (also the instances')")
    ap.add_argument("--slo-ttft", type=float, default=10.0, help="TTFT SLO, reported only")
    ap.add_argument(
        "--warmup",
        default="full",
        help="the instances' --warmup (full: no compile during the run)",
    )
    ap.add_argument("--startup-timeout", type=float, default=1800.0)
    ap.add_argument("--grace", type=float, default=180.0, help="seconds after the last arrival")
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def instance_cmd(args, port: int, adapters: dict[str, Path]) -> list[str]:
    engine = engine_flags(
        warmup=args.warmup, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_prefill_seqs=args.max_prefill_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
    )  # fmt: skip
    cmd = [
        sys.executable, "-m", "server.cli", "--port", str(port), *engine,
        "--max-lora-rank", str(max(args.rank_list)),
        "--lora-kernel", args.kernel, "--cold-start", "cached", "--device-lora-bytes", "2G",
        "--max-queue", "1024", "--log-level", "warning",
    ]  # fmt: skip
    for name, path in adapters.items():
        cmd += ["--lora", f"{name}={path}"]
    if args.cost_model:
        cmd += ["--cost-model", args.cost_model]
    if args.slo_tpot:
        cmd += ["--tpot-slo", str(args.slo_tpot)]
    return cmd


def router_cmd(args, port: int, urls: list[str], policy: str) -> list[str]:
    cmd = [sys.executable, "-m", "server.router.cli", "--port", str(port), "--policy", policy]
    cmd += ["--log-level", "warning", "--avg-response-len", str(args.avg_output)]
    for u in urls:
        cmd += ["--instance", u]
    if args.cost_model:
        cmd += ["--cost-model", args.cost_model]
    return cmd


def say(text: str) -> None:
    print(text, flush=True)  # progress, also when the output goes to a file


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.rank_list = [int(r) for r in args.ranks.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    from bench.systems.common import TARGET_SETS, kv_cache_bytes, model_config, write_adapters
    from cara_jax.scheduling.router import POLICIES

    bad = [p for p in policies if p not in POLICIES]
    if bad or args.instances < 1:
        raise SystemExit(f"unknown policies {bad} (choose from {POLICIES}); need >= 1 instance")
    if args.cost_model and not Path(args.cost_model).is_file():
        raise SystemExit(f"--cost-model {args.cost_model} is not a file (run from the repo root)")
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
    if trace.max_context() > args.max_model_len:
        raise SystemExit(f"prompt + output up to {trace.max_context()} tokens > --max-len")
    if args.kv_cache_memory is None:  # what the old slot cache took: every context in full
        args.kv_cache_memory = kv_cache_bytes(
            cfg, np.float32, args.max_num_seqs, args.max_model_len
        )

    signal.signal(signal.SIGTERM, _on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="cara-router-run-"))
    procs = Processes(work)
    rows: dict[str, dict] = {}
    try:
        adapters = write_adapters(work / "adapters", trace.adapter_ranks, cfg, TARGET_SETS["all"])
        urls = []
        t_start = time.perf_counter()
        for k in range(args.instances):  # one at a time: the first fills the compile cache
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = procs.start(f"instance{k}", instance_cmd(args, port, adapters))
            try:
                asyncio.run(wait_healthy(url, proc, args.startup_timeout, f"instance {k}"))
            except RuntimeError as e:
                raise SystemExit(f"{e}\n{procs.tail(f'instance{k}')}") from e
            urls.append(url)
            say(f"instance {k} up at {url} after {time.perf_counter() - t_start:.0f} s")
        startup = time.perf_counter() - t_start
        state = asyncio.run(get_json(urls[0] + "/v1/scheduler/state"))
        slo, slo_src = tpot_slo(args, state)
        say(f"TPOT SLO {1e3 * slo:.1f} ms ({slo_src}); warming up {len(adapters)} adapters")
        asyncio.run(warm_up(urls, list(adapters), trace.requests[0].prompt))
        asyncio.run(wait_idle(urls))

        for policy in policies:
            port = free_port()
            rurl = f"http://127.0.0.1:{port}"
            rproc = procs.start(f"router-{policy}", router_cmd(args, port, urls, policy))
            try:
                asyncio.run(wait_healthy(rurl, rproc, 60, f"router ({policy})"))
            except RuntimeError as e:
                raise SystemExit(f"{e}\n{procs.tail(f'router-{policy}')}") from e
            say(f"{policy}: replaying {len(trace)} requests over {args.duration:.0f} s ...")
            results, where = asyncio.run(replay(rurl, trace, args.grace))
            procs.stop(rproc)
            idle = asyncio.run(wait_idle(urls))
            s = summarize(results, Slo(ttft_s=args.slo_ttft, tpot_s=slo))
            per_inst = [sum(w == u for w in where) for u in urls]
            rows[policy] = {
                "completed": int(s["ok"]), "failed": int(s["errors"]),
                "slo_attainment": s["slo_tpot"], "tpot_mean_s": s["tpot_mean"],
                "tpot_p99_s": s["tpot_p99"], "ttft_p99_s": s["ttft_p99"],
                "ttft_mean_s": s["ttft_mean"], "throughput_tok_s": s["throughput_tok_s"],
                "per_instance": per_inst, "idle_after": idle,
                "failure_samples": sorted({r.error for r in results if r.error})[:5],
                "requests": [r.to_dict() for r in results],
            }  # fmt: skip
            say(
                f"  completed {rows[policy]['completed']}, failed {rows[policy]['failed']}, "
                f"SLO {100 * s['slo_tpot']:.1f}%, TPOT mean {_ms(s['tpot_mean'])} ms "
                f"p99 {_ms(s['tpot_p99'])} ms, TTFT p99 {s['ttft_p99']:.2f} s, "
                f"per instance {per_inst}"
            )
    except KeyboardInterrupt:
        print("interrupted: stopping the subprocesses", file=sys.stderr)
        return 130
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)

    data = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "rank_list")},
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
        "startup_s": round(startup, 1),
        "tpot_slo_s": slo,
        "tpot_slo_source": slo_src,
        "workload": spec.to_dict(),
        "adapter_ranks": trace.adapter_ranks,
        "policies": rows,
    }
    write_report(args.out, "router_run", report_lines(args, data, trace), data)
    return 0


def _ms(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{1e3 * x:.0f}"


def report_lines(args, data: dict, trace: Trace) -> list[str]:
    ranks = sorted(set(trace.adapter_ranks.values()))
    shares = {r: sum(q.rank == r for q in trace.requests) / len(trace) for r in ranks}
    mix = ", ".join(f"rank {r}: {100 * s:.0f}%" for r, s in shares.items())
    cm = Path(args.cost_model).name if args.cost_model else "none"
    lines = [
        f"# Router run: {args.instances} cara-serve instances, {args.rate:g} req/s for "
        f"{args.duration:.0f} s",
        "",
        f"Machine: {data['machine']}; {data['date']}. Instances: embedded SmolLM2-135M float32, "
        f"{args.max_num_seqs} sequences at once, max_model_len {args.max_model_len}, "
        f"{args.kernel.upper()}, warm-up "
        f"`{args.warmup}`, adapters preloaded (`cached`), cost model `{cm}`; startup "
        f"{data['startup_s']} s. Trace: {len(trace)} streaming completions, Poisson, "
        f"{args.adapters} adapters on all seven projections, Zipf {args.zipf_alpha:g} "
        f"popularity ({mix}), prompts {args.prompt_len} tokens, {args.output_len} greedy tokens "
        f"(ignore_eos), seed {args.seed}. TPOT SLO {1e3 * data['tpot_slo_s']:.0f} ms "
        f"({data['tpot_slo_source']}).",
        "",
        "| policy | completed | failed | SLO attainment | mean TPOT ms | p99 TPOT ms "
        "| p99 TTFT s | requests per instance |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p, r in data["policies"].items():
        ttft = "n/a" if math.isnan(r["ttft_p99_s"]) else f"{r['ttft_p99_s']:.2f}"
        lines.append(
            f"| {p} | {r['completed']} | {r['failed']} | {100 * r['slo_attainment']:.1f}% "
            f"| {_ms(r['tpot_mean_s'])} | {_ms(r['tpot_p99_s'])} | {ttft} "
            f"| {' / '.join(map(str, r['per_instance']))} |"
        )
    lines += [
        "",
        "SLO attainment: finished requests whose TPOT is within the SLO, over all requests "
        "(failed and unfinished ones count as misses). TTFT counts from the trace's arrival "
        "time. Every policy replays the same trace against the same instances, in the order "
        "listed, with the instances drained in between.",
    ]
    fails = {p: r["failure_samples"] for p, r in data["policies"].items() if r["failure_samples"]}
    for p, f in fails.items():
        lines += ["", f"Failure samples ({p}):", *[f"- {x}" for x in f]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
