"""``python -m bench``: run an experiment, write a trace, run the scheduling simulator, or run any
bench module.

    python -m bench run EXPERIMENT [--quick] [--systems cara,hf,llamacpp] [options]
    python -m bench workload OUT.jsonl [workload options]
    python -m bench simulate [simulator options]
    python -m bench list                  # the runnable bench modules, with their first doc line
    python -m bench NAME [args...]        # bench.NAME's main(args), e.g. adapter_cost --help

Experiments: serving, load_sweep, adapters_sweep, cold_start (see docs/bench.md). A runnable
module is a bench/NAME.py with a module docstring and a top-level ``main()``; ``list`` finds
them by reading the sources (nothing is imported), and ``NAME`` imports only bench.NAME.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
COMMANDS = ("run", "workload", "simulate", "list")  # before any module of the same name


def _workload(argv: list[str]) -> int:
    from bench.lib.workload import LengthDist, WorkloadSpec, describe, generate, save_jsonl

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


def runnable_modules() -> dict[str, str]:
    """{NAME: first line of its docstring} for every bench/NAME.py (not ``_*``) that has a module
    docstring and a top-level ``main()``. Reads the sources with ``ast``; imports nothing."""
    found: dict[str, str] = {}
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            if "def main(" not in text:
                continue
            tree = ast.parse(text, filename=str(path))
        except (OSError, UnicodeDecodeError, SyntaxError):
            continue
        doc = ast.get_docstring(tree)
        has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        if doc and doc.strip() and has_main:
            found[path.stem] = doc.strip().splitlines()[0]
    return found


def _list(argv: list[str]) -> int:
    argparse.ArgumentParser(
        prog="python -m bench list",
        description="List the runnable bench modules (python -m bench NAME [args...] runs one).",
    ).parse_args(argv)
    modules = runnable_modules()
    width = max(map(len, modules), default=0)
    for name, line in modules.items():
        print(f"{name.ljust(width)}  {line}")
    return 0


def run_module(name: str, argv: list[str]) -> int:
    """Run ``bench.NAME``'s ``main``: with ``argv`` if it takes an argument, else (a main that
    parses ``sys.argv`` itself) with ``sys.argv`` set to ``argv``. Its exit status (None: 0)."""
    import importlib
    import inspect

    main = importlib.import_module(f"bench.{name}").main
    saved = sys.argv
    sys.argv = [f"python -m bench {name}", *argv]  # also argparse's program name in --help
    try:
        if inspect.signature(main).parameters:
            return main(argv) or 0
        return main() or 0
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "list":
        return _list(argv[1:])
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        if argv[0] in runnable_modules():
            return run_module(argv[0], argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    from bench.experiments.args import add_run_args

    add_run_args(sub.add_parser("run", help="run an experiment"))
    sub.add_parser("workload", help="write a trace (JSONL)", add_help=False)
    sub.add_parser("simulate", help="scheduling simulator (bench.simulate)", add_help=False)
    sub.add_parser("list", help="the runnable bench modules (then: python -m bench NAME ...)")
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        ap.error(
            f"{argv[0]!r} is neither a command ({', '.join(COMMANDS)}) nor a runnable bench "
            "module (python -m bench list shows them)"
        )
    if argv and argv[0] == "simulate":
        from bench import simulate  # written separately; imported only when asked for

        return simulate.main(argv[1:]) or 0
    if argv and argv[0] == "workload":
        return _workload(argv[1:])
    args = ap.parse_args(argv)
    from bench.experiments.runner import run_cli

    run_cli(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
