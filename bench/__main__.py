"""``python -m bench``: run an experiment, write a trace, or run the scheduling simulator.

    python -m bench run EXPERIMENT [--quick] [--systems cara,hf,llamacpp] [options]
    python -m bench workload OUT.jsonl [workload options]
    python -m bench simulate [simulator options]

Experiments: serving, load_sweep, adapters_sweep, cold_start (see docs/bench.md).
"""

from __future__ import annotations

import argparse
import sys


def _workload(argv: list[str]) -> int:
    from bench.workload import LengthDist, WorkloadSpec, describe, generate, save_jsonl

    ap = argparse.ArgumentParser(
        prog="python -m bench workload", description="write a seeded trace as JSONL"
    )
    d = WorkloadSpec()
    ap.add_argument("out")
    ap.add_argument("--requests", type=int, default=d.num_requests)
    ap.add_argument("--arrival", choices=["poisson", "gamma", "burst"], default=d.arrival)
    ap.add_argument("--rate", type=float, default=d.rate)
    ap.add_argument("--cv", type=float, default=d.cv)
    ap.add_argument("--adapters", type=int, default=d.num_adapters)
    ap.add_argument(
        "--popularity", choices=["uniform", "zipf", "round_robin", "maf"], default=d.popularity
    )
    ap.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha)
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--rank-weights", help="comma list, one per rank")
    ap.add_argument("--prompt-len", default="uniform:32:128")
    ap.add_argument("--output-len", default="32")
    ap.add_argument("--vocab-size", type=int, default=d.vocab_size)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    spec = WorkloadSpec(
        num_requests=a.requests,
        arrival=a.arrival,
        rate=a.rate,
        cv=a.cv,
        num_adapters=a.adapters,
        popularity=a.popularity,
        zipf_alpha=a.zipf_alpha,
        ranks=tuple(int(r) for r in a.ranks.split(",")),
        rank_weights=tuple(float(w) for w in a.rank_weights.split(",")) if a.rank_weights else None,
        prompt_len=LengthDist.parse(a.prompt_len),
        output_len=LengthDist.parse(a.output_len),
        vocab_size=a.vocab_size,
        seed=a.seed,
    )
    save_jsonl(generate(spec), a.out)
    print(f"wrote {a.out}: {describe(spec)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    from bench.experiments import add_run_args

    add_run_args(sub.add_parser("run", help="run an experiment"))
    sub.add_parser("workload", help="write a trace (JSONL)", add_help=False)
    sub.add_parser("simulate", help="scheduling simulator (bench.simulate)", add_help=False)
    if argv and argv[0] == "simulate":
        from bench import simulate  # written separately; imported only when asked for

        return simulate.main(argv[1:]) or 0
    if argv and argv[0] == "workload":
        return _workload(argv[1:])
    args = ap.parse_args(argv)
    from bench.experiments import run_cli

    run_cli(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
