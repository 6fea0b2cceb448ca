"""`cara-serve`'s flags: the parser and its argument types (docs/server.md lists every flag).
Benches build their engine through this parser too, so they run what a user of the server gets.
"""

from __future__ import annotations

import argparse
import json
import os
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.I)


def origins(text: str) -> tuple[str, ...]:
    """``https://a.example,https://b.example`` or ``["https://a.example"]``."""
    if text.strip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from e
        if not isinstance(items, list) or not all(isinstance(o, str) for o in items):
            raise argparse.ArgumentTypeError("a JSON list of strings is needed")
        return tuple(items)
    return tuple(o.strip() for o in text.split(",") if o.strip())


def byte_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5GiB`` or plain bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 512M, 4G)")
    scale = 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * scale)


def lora_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def positive(kind):
    def check(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return check


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS) or not action.help:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cara-serve",
        description="OpenAI-compatible multi-LoRA inference server (cara-jax).",
        formatter_class=_Help,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", help="GGUF file or HF checkpoint folder (default: embedded SmolLM2)")
    m.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="names the base model answers to; the first is reported "
        "(default: the model's folder/file name)",
    )
    m.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="weights and activations; auto: bfloat16 on an accelerator, float32 on a CPU "
        "(XLA:CPU converts whole bfloat16 weights before each dot: 4x slower there)",
    )
    m.add_argument(
        "--max-num-seqs",
        "--num-slots",
        dest="max_num_seqs",
        type=positive(int),
        default=32,
        help="sequences running at once",
    )
    m.add_argument(
        "--max-model-len",
        "--max-len",
        dest="max_model_len",
        type=positive(int),
        default=None,
        help="context length (prompt + new tokens); default: the model's own",
    )
    m.add_argument(
        "--max-num-batched-tokens",
        type=positive(int),
        default=None,
        help="token budget of one step (decode tokens + prompt chunks) = the largest compiled "
        "program; default 256 on a CPU, 2048 on an accelerator",
    )
    m.add_argument(
        "--max-prefill-seqs",
        "--max-prefill-batch",
        dest="max_prefill_seqs",
        type=positive(int),
        default=2,
        help="prompts that advance (one chunk each) in one step",
    )
    m.add_argument(
        "--token-buckets",
        type=lambda s: tuple(sorted({int(x) for x in s.split(",")})),
        default=None,
        help="comma list of step sizes to compile (default: powers of two from 2 up to "
        "--max-num-batched-tokens); fewer buckets start faster and pad more",
    )
    m.add_argument(
        "--kv-cache-memory",
        type=byte_size,
        default=None,
        help="bytes of paged KV cache (e.g. 1G); default: 45%% of the accelerator's free "
        "memory, or 10%% of RAM (at most 4 GiB) on a CPU",
    )
    m.add_argument("--block-size", type=positive(int), default=16, help="tokens per KV page")
    m.add_argument(
        "--adapter-cache",
        metavar="DIR",
        help="adapters converted to the device layout, kept on disk and memory-mapped so a "
        "cold load only copies (default: $CARA_JAX_CACHE/adapters or "
        "~/.cache/cara_jax/adapters; 'none': convert in memory at each registration)",
    )
    m.add_argument(
        "--prefix-caching",
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of prompt blocks already computed for the same tokens and adapter "
        "content (on by default; --no-prefix-caching turns it off)",
    )
    m.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="persistent XLA compilation cache, so restarts skip most compile time "
        "(default: $CARA_JAX_CACHE/xla or ~/.cache/cara_jax/xla; 'none' disables)",
    )
    m.add_argument(
        "--warmup",
        choices=["full", "none"],
        default="full",
        help="full: compile every program before /health reports ready (the server listens "
        "meanwhile and answers 503 'starting'); none: report ready at once and compile each "
        "program on first use (development only: a request then waits for the compiler)",
    )

    a = p.add_argument_group("adapters")
    a.add_argument(
        "--lora",
        action="append",
        type=lora_spec,
        default=[],
        metavar="NAME=PATH",
        help="register a PEFT adapter folder at start (repeatable)",
    )
    a.add_argument(
        "--lora-dir",
        metavar="DIR",
        help="adapters in DIR load by name on first request (and runtime loads "
        "are confined to DIR)",
    )
    a.add_argument(
        "--demo-adapters",
        type=int,
        default=0,
        metavar="N",
        help="write N small random PEFT adapters to the cache folder and register "
        "them as demo-0 .. demo-N-1",
    )
    a.add_argument("--demo-rank", type=positive(int), default=8, help="rank of demo adapters")
    a.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter without --lora-dir "
        "(a runtime load then reads any path the server process can read); without this flag "
        "and without --lora-dir they are refused",
    )
    a.add_argument(
        "--allowed-origins",
        type=origins,
        default=(),
        metavar="ORIGINS",
        help="browser origins allowed to call the API (CORS), comma-separated or a JSON list "
        "as vLLM takes it; '*' allows any. Default: none (no CORS headers)",
    )
    a.add_argument(
        "--tool-call-parser",
        choices=("hermes", "llama3_json"),
        default=None,
        help="how answers to tool_choice auto are read as tool calls (default: llama3_json "
        "for a Llama 3 chat template, hermes otherwise); required and named tool choices "
        "are enforced by the grammar whatever this says",
    )
    a.add_argument(
        "--cold-start",
        default="auto",
        help="how a request whose adapter is not on the device starts: auto (per request, "
        "whichever of sync and cpu_assist the engine's measured load and CPU costs predict "
        "faster), cached (everything preloaded), sync (wait for the copy), cpu_assist "
        "(every prefill whose adapter is not on the device when the request is admitted runs "
        "with CPU-computed LoRA deltas while it is copied; no prefetch on arrival)",
    )
    a.add_argument(
        "--cpu-workers", type=positive(int), default=2, help="CPU-assist worker processes"
    )
    a.add_argument(
        "--emulate-link-gbps",
        type=positive(float),
        default=None,
        metavar="GBPS",
        help="make each host-to-device adapter copy take at least bytes / GBPS (where the "
        "device is host memory, a copy is a memcpy: this shows cold start as an accelerator "
        "with that link would see it)",
    )
    a.add_argument(
        "--lora-kernel",
        choices=["bgmv", "mbgmv"],
        default="mbgmv",
        help="decode kernel: mbgmv runs each row at its own rank (cost ~ summed ranks), bgmv "
        "pads rows to the step's max rank; both only on the projections the adapters target",
    )
    a.add_argument(
        "--host-lora-bytes",
        type=byte_size,
        default="4G",
        help="host tier: parsed adapters kept in memory (LRU)",
    )
    a.add_argument(
        "--device-lora-bytes",
        type=byte_size,
        default="2G",
        help="device tier: adapter rows on the accelerator (every projection gets the same "
        "number of rank rows; SmolLM2: 2G = 1,759 rows each)",
    )
    a.add_argument(
        "--max-loras",
        type=positive(int),
        default=63,
        help="adapters resident on the device at once",
    )
    a.add_argument(
        "--max-dora-loras",
        type=int,
        default=8,
        help="DoRA adapters (and scaled or mixed DoRA slots) resident at once; each holds an "
        "output scale per projection and layer (SmolLM2: 0.7 MB). 0 refuses DoRA adapters",
    )
    a.add_argument(
        "--max-vocab-lora-rows",
        type=int,
        default=128,
        help="rank rows of LoRA on the embedding, and as many on the LM head, resident at once "
        "(vocabulary-wide: SmolLM2 float32, about 200 KB each; a step with such rows reads them "
        "all). 0 refuses adapters that target embed_tokens or lm_head",
    )
    a.add_argument(
        "--max-lora-rank",
        type=positive(int),
        default=256,
        help="largest adapter rank accepted; a step runs each adapter at its own rank, so a "
        "larger limit costs no step anything (only the slot table's width)",
    )
    a.add_argument(
        "--max-lora-entries",
        type=positive(int),
        default=4,
        help="adapters one request may mix (its `lora` list of {name, scale}); their summed "
        "rank is bounded by --max-lora-rank",
    )

    s = p.add_argument_group("scheduling")
    s.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="waiting sequences at which new requests get 429 + Retry-After",
    )
    s.add_argument(
        "--tpot-slo",
        type=positive(float),
        metavar="SECONDS",
        help="default time-per-output-token SLO (default: 1.5x the base model's step at the "
        "batch size, from the cost model); a request may send its own `tpot_slo`",
    )
    s.add_argument(
        "--cost-model",
        metavar="FILE",
        help="profiled cost models (JSON, from `cara-jax profile`) for rank-aware admission",
    )
    s.add_argument(
        "--admission",
        choices=["auto", "fifo", "slo"],
        default="auto",
        help="which waiting requests join the batch: fifo, or slo (rank-aware, keeps running "
        "requests inside their TPOT SLO; needs --cost-model). auto: slo with a cost model",
    )
    s.add_argument(
        "--max-wait",
        type=positive(float),
        default=2.0,
        metavar="SECONDS",
        help="slo admission: a request waiting this long is admitted whatever its rank",
    )

    h = p.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on")
    h.add_argument("--port", type=int, default=8000, help="port to listen on")
    h.add_argument(
        "--api-key",
        default=os.environ.get("CARA_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* (env CARA_API_KEY)",
    )
    h.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds a shutdown waits for running requests",
    )
    h.add_argument(
        "--sse-keepalive",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="comment line on a stream silent this long (queued requests)",
    )
    h.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="level of the server's own log lines",
    )
    h.add_argument("--access-log", action="store_true", help="log every HTTP request")

    r = p.add_argument_group("scale-out (Ray Serve; needs the ray[serve] extra, docs/ray_serve.md)")
    r.add_argument(
        "--replicas",
        type=positive(int),
        default=None,
        metavar="N",
        help="serve with N engine replicas (each its own process) behind one ingress, on Ray "
        "Serve; starts a local Ray unless --ray-address is given",
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (e.g. auto, or host:6379) instead of starting a local one",
    )
    r.add_argument(
        "--ray-router",
        choices=["rank_aware", "power_of_two", "least_loaded", "round_robin"],
        default="rank_aware",
        help="how requests are spread over replicas: rank_aware (Algorithm 1, on the cost "
        "model: the packaged one for the embedded model, else --cost-model; without one it "
        "falls back to power_of_two), or a baseline (power_of_two is Ray Serve's default)",
    )
    r.add_argument(
        "--replica-cpus",
        type=positive(float),
        default=1.0,
        help="Ray CPUs reserved per replica",
    )
    r.add_argument(
        "--pin-cpus",
        action="store_true",
        help="pin each replica's process to its own cores (replica rank x --replica-cpus), "
        "so replicas on one machine do not share cores",
    )
    r.add_argument(
        "--avg-response-len",
        type=positive(float),
        default=128.0,
        help="rank_aware: Algorithm 1 spreads a request's prefill over this many output tokens",
    )
    return p
