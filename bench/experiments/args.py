"""The command-line options of ``python -m bench run`` (``add_run_args``); bench/experiments/runner.py
runs what they ask for.
"""

from __future__ import annotations

import argparse

from bench.experiments.plans import EXPERIMENTS
from bench.systems import SYSTEM_KEYS
from bench.systems.common import TARGET_SETS
from server.cli import byte_size

DEFAULT_COST_MODEL = "bench/results/cost_model_smollm2_cpu.json"


def add_run_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("experiment", choices=EXPERIMENTS)
    ap.add_argument("--quick", action="store_true", help="smoke-test size (seconds, not minutes)")
    ap.add_argument(
        "--systems",
        help=f"comma list of {','.join(SYSTEM_KEYS)} (default: all the experiment uses)",
    )
    ap.add_argument("--out", default="bench/results", help="results folder")
    ap.add_argument(
        "--cold-start",
        help="cara-jax cold-start mode(s), comma list of sync,cached,cpu_assist,auto",
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
