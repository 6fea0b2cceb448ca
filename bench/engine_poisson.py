"""Poisson serving over 16 adapters, cara-jax engine vs HF+PEFT: the first serving bench.

It now runs as the ``engine_poisson`` experiment of the bench suite (same workload: 48 requests
at 2 req/s over 16 adapters, ranks 8/16/32/64 on all seven projections, prompts 32-128 tokens,
32 greedy tokens, cara-jax in ``sync`` cold start), so its results keep their file names and
history in bench/results/engine_poisson.{md,json}.

    python -m bench.engine_poisson [--requests 48] [--rate 2.0] [--adapters 16] [--new-tokens 32]
                                   [--no-hf] [any option of `python -m bench run`]
"""

from __future__ import annotations

import sys


def translate(argv: list[str]) -> list[str]:
    """The old flags in terms of ``python -m bench run engine_poisson``."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--no-hf":
            out += ["--systems", "cara"]
        elif a == "--new-tokens":
            out += ["--output-len", next(it)]
        elif a.startswith("--new-tokens="):
            out += ["--output-len", a.split("=", 1)[1]]
        elif a == "--warmups" or a.startswith("--warmups="):
            if a == "--warmups":
                next(it)  # warm-up is now compile-everything plus untimed requests, always
        else:
            out.append(a)
    return ["run", "engine_poisson", *out]


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import main as bench_main

    return bench_main(translate(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
