"""`cara-jax` command line: a generation smoke test on the embedded model or a user's checkpoint,
and `cara-jax profile`, which measures the scheduling cost model (see cara_jax/profiler.py).

The server (`cara-serve`) and router CLIs live in the server package.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from cara_jax.embedded import default_model_path
    from cara_jax.engine import PromptTooLongError
    from cara_jax.generate import compile_for_prompts, generate_tokens, offline_engine
    from cara_jax.sampling_params import InvalidRequestError, SamplingParams
    from cara_jax.tokenizer import Tokenizer
    from cara_jax.weights import DTYPES, load_model

    path = args.model or default_model_path()
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    loaded = load_model(path, dtype=dtype)
    tok = Tokenizer.from_path(path)
    # one token bucket = one compiled program: prompts go in chunks of --chunk tokens and a
    # decode step runs at that size too (the smallest program costs as much to compile)
    engine = offline_engine(loaded, tok, max_model_len=args.max_len, num_seqs=1,
                            max_num_batched_tokens=args.chunk, min_token_bucket=args.chunk)  # fmt: skip
    try:
        if args.chat:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                tokenize=True,
            )  # fmt: skip
        else:
            ids = tok.encode(args.prompt, add_special_tokens=True)
        try:
            engine.validate(ids, SamplingParams(max_tokens=args.max_tokens))
        except (PromptTooLongError, InvalidRequestError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t1 = time.perf_counter()
        compile_for_prompts(engine, [len(ids)])
        t2 = time.perf_counter()
        first: list[float] = []

        def on_text(_row: int, text: str) -> None:
            if not first:
                first.append(time.perf_counter())
            sys.stdout.write(text)
            sys.stdout.flush()

        out = generate_tokens(
            engine, [ids], args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, on_text=on_text,
        )[0]  # fmt: skip
        sys.stdout.write("\n")
        t3 = time.perf_counter()
    finally:
        engine.close()
    n = len(out.token_ids)
    print(
        f"[{n} tokens, finish_reason={out.finish_reason}; load {t1 - t0:.1f}s, "
        f"compile {t2 - t1:.1f}s, first token {first[0] - t2 if first else 0:.2f}s, "
        f"total {t3 - t2:.1f}s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cara-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model", help="GGUF file or HF checkpoint folder (default: embedded SmolLM2)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    g.add_argument(
        "--max-len",
        type=int,
        default=2048,
        help="context length (prompt + output) to allocate KV cache for",
    )
    g.add_argument(
        "--chunk",
        type=int,
        default=16,
        help="tokens per step: prompts are prefilled in chunks of this size; each step runs the "
        "one compiled program of this size (default 16)",
    )
    g.set_defaults(func=_generate)
    # parsed by cara_jax.profiler.main: listed here for `cara-jax --help`
    sub.add_parser("profile", help="profile step latency and fit the scheduling cost model",
                   add_help=False)  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:
        from cara_jax import profiler

        return profiler.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
