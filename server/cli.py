"""`cara-serve`: the OpenAI-compatible multi-LoRA server (see docs/server.md for every flag)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("cara_serve")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.I)


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


COMPILE_CACHE_KEYS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def _default_cache() -> Path:
    root = os.environ.get("CARA_JAX_CACHE") or Path.home() / ".cache" / "cara_jax"
    return Path(root).expanduser() / "xla"


def _adapter_cache(folder: str | None) -> str | None:
    """Folder of the adapters' packed copies (the device layout, memory-mapped), or None."""
    from cara_jax.adapters.packed import default_cache_dir

    if folder is not None and folder.lower() == "none":
        return None
    return str(folder or default_cache_dir())


def _use_compile_cache(folder: str | None) -> None:
    """Keep compiled step variants on disk (process-wide JAX setting; the server owns it)."""
    folder = folder or str(_default_cache())
    if folder.lower() == "none":
        return
    import jax

    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
        default="512M",
        help="device tier: adapter rows on the accelerator",
    )
    a.add_argument(
        "--max-loras",
        type=positive(int),
        default=63,
        help="adapters resident on the device at once",
    )
    a.add_argument(
        "--max-lora-rank",
        type=positive(int),
        default=256,
        help="largest adapter rank accepted; a step runs each adapter at its own rank, so a "
        "larger limit costs no step anything (only the slot table's width)",
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


def _engine_config(args: argparse.Namespace):
    """EngineConfig from the flags; fields the engine does not have yet are kept by the server."""
    from cara_jax.adapters.device_pool import PoolConfig
    from cara_jax.engine import EngineConfig
    from cara_jax.engine.admission import SchedulerConfig

    cfg = dict(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens or default_token_budget(),
        max_prefill_seqs=args.max_prefill_seqs,
        token_buckets=args.token_buckets,
        kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size,
        enable_prefix_caching=args.prefix_caching,
        cold_start=args.cold_start,
        cpu_workers=args.cpu_workers,
        lora_strategy=args.lora_kernel,
        host_budget_bytes=args.host_lora_bytes,
        pool=PoolConfig(
            budget_bytes=args.device_lora_bytes,
            max_adapters=args.max_loras + 1,  # pool slot 0 is the base model
            max_rank=args.max_lora_rank,
            cache_dir=_adapter_cache(args.adapter_cache),
            emulate_link_gbps=args.emulate_link_gbps,
        ),
    )
    admission = args.admission
    if admission == "auto":
        admission = "slo" if args.cost_model else "fifo"
    if admission == "slo" and not args.cost_model:
        raise SystemExit("cara-serve: --admission slo needs --cost-model FILE (cara-jax profile)")
    cfg["scheduler"] = SchedulerConfig(
        admission=admission,
        cost_model=args.cost_model,
        tpot_slo=args.tpot_slo,
        max_wait_s=args.max_wait,
    )
    return EngineConfig(**cfg)


def build_state(args: argparse.Namespace):
    """Load the model, build the engine, register adapters, warm up: a ServerState to serve."""

    from cara_jax.api import AsyncEngine
    from cara_jax.embedded import default_model_path
    from cara_jax.engine import Engine
    from cara_jax.tokenizer import Tokenizer
    from cara_jax.weights import DTYPES, load_model
    from server.app import ServerConfig, ServerState, default_served_names
    from server.demo import demo_adapters

    if args.cost_model and not Path(args.cost_model).is_file():
        raise SystemExit(f"cara-serve: --cost-model {args.cost_model} is not a file")
    _use_compile_cache(args.compile_cache)
    path = Path(args.model) if args.model else default_model_path()
    names = tuple(args.served_model_name or default_served_names(args.model))
    t0 = time.perf_counter()
    dtype = args.dtype
    if dtype == "auto":
        import jax

        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    loaded = load_model(path, dtype=DTYPES[dtype])
    try:
        engine = Engine(loaded, Tokenizer.from_path(path), _engine_config(args))
    except ValueError as e:  # e.g. an unknown --cold-start mode
        raise SystemExit(f"cara-serve: {e}") from e
    log.info("model %s loaded in %.1fs", path, time.perf_counter() - t0)

    config = ServerConfig(
        served_names=names,
        model_root=str(path),
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        lora_dir=args.lora_dir,
        drain_timeout_s=args.drain_timeout,
        tpot_slo_s=args.tpot_slo,
        cost_model=args.cost_model,
        sse_keepalive_s=args.sse_keepalive,
        allow_runtime_lora=args.allow_runtime_lora,
    )
    state = ServerState(AsyncEngine(engine), config)
    adapters = dict(args.lora)
    if args.demo_adapters > 0:
        adapters.update(
            {
                k: str(v)
                for k, v in demo_adapters(loaded.cfg, args.demo_adapters, args.demo_rank).items()
            }
        )
    for name, p in adapters.items():
        if name in names:
            raise SystemExit(f"cara-serve: adapter name {name!r} is the base model's name")
        t = time.perf_counter()
        try:
            entry = engine.load_adapter(name, p)
        except (ValueError, OSError) as e:
            raise SystemExit(f"cara-serve: adapter {name} ({p}): {e}") from e
        state.metrics.lora_load.labels(name).observe(time.perf_counter() - t)
        log.info("adapter %s: %s (rank %d)", name, p, entry.max_rank)

    state.warmup_mode = args.warmup
    return state


def default_token_budget() -> int:
    import jax

    return 256 if jax.default_backend() == "cpu" else 2048


def start_warmup(state) -> threading.Thread | None:
    """Compile every program in the background; /health says "starting" until it is done."""
    engine = state.engine
    if getattr(state, "warmup_mode", "full") == "none":
        state.mark_ready()
        return None
    programs = engine.programs()
    log.info("compiling %d programs (token buckets %s) before reporting healthy", len(programs),
             ",".join(str(t) for t in sorted({p.tokens for p in programs})))  # fmt: skip
    t0 = time.perf_counter()

    def progress(done: int, total: int, program) -> None:
        log.info("compiled %d/%d (%d tokens%s) after %.1fs", done, total, program.tokens,
                 ", CPU assist" if program.cpu else "", time.perf_counter() - t0)  # fmt: skip

    def run() -> None:
        try:
            engine.warmup(progress=progress)
        except Exception:
            log.exception("compiling the programs failed")
            state.start_error = "compiling the programs failed (see the log)"
            return
        log.info("ready: %d programs compiled in %.1fs", len(programs), time.perf_counter() - t0)
        state.mark_ready()

    th = threading.Thread(target=run, name="cara-warmup", daemon=True)
    th.start()
    return th


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU here, without starting JAX (which would take an
    accelerator's memory in a process that does not serve)."""
    import importlib.util
    import os

    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
    return not any(importlib.util.find_spec(m) for m in plugins)


def default_cost_model(args: argparse.Namespace) -> None:
    """With no --cost-model: the embedded model's packaged one when serving it in float32 on a
    CPU (rank-aware admission and routing then need no flag); for another model, a fleet's
    rank_aware router falls back to Ray's default router, saying how to profile."""
    if args.cost_model is None and args.model is None and args.dtype in ("auto", "float32"):
        from cara_jax.embedded import packaged_cost_model

        if _cpu_only() and packaged_cost_model().is_file():
            args.cost_model = str(packaged_cost_model())
            log.info("cost model: %s (the embedded model's, packaged)", args.cost_model)
    if args.replicas is not None and args.ray_router == "rank_aware" and not args.cost_model:
        log.warning("no cost model for this model and device: routing with power_of_two (Ray "
                    "Serve's default); run `cara-jax profile --out FILE` and pass --cost-model "
                    "FILE for rank-aware routing")  # fmt: skip
        args.ray_router = "power_of_two"



def fleet_config(args: argparse.Namespace):
    """The Ray Serve fleet of ``--replicas N`` (server/fleet/serve.py), from the flags."""
    from server.fleet.serve import FleetConfig

    engine_args = argparse.Namespace(**vars(args))
    engine_args.replicas = None
    return FleetConfig(
        engine_args=engine_args,
        build_state=build_state,
        start_warmup=start_warmup,
        replicas=args.replicas,
        router=args.ray_router,
        avg_response_len=args.avg_response_len,
        replica_cpus=args.replica_cpus,
        pin_cpus=args.pin_cpus,
        api_key=args.api_key or None,
    )


def ray_serve_missing() -> str | None:
    """What of Ray Serve is not installed (None: all of it)."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return "Ray Serve"
    try:
        import starlette  # noqa: F401
    except ImportError:
        return "Ray Serve's HTTP extras"
    return None


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Warn when the server listens beyond loopback without an API key (True if it did)."""
    if api_key or host in LOOPBACK or host.startswith("127."):
        return False
    log.warning(
        "listening on %s without an API key: anyone who can reach this port can generate "
        "(and load adapters if runtime loads are allowed); set --api-key or CARA_API_KEY",
        host,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("cara_serve", "server", "cara_jax", "aiohttp.access"):  # not absl/jax chatter
        logging.getLogger(name).setLevel(args.log_level.upper())
    warn_if_exposed(args.host, args.api_key)
    if args.replicas is not None and (missing := ray_serve_missing()):
        print(f"cara-serve: --replicas needs {missing}: pip install 'cara-jax[ray]' "
              "(or pip install 'ray[serve]')", file=sys.stderr)  # fmt: skip
        return 2
    default_cost_model(args)
    if args.replicas is not None:
        from server.fleet.serve import run_fleet

        return run_fleet(fleet_config(args), args.host, args.port, args.ray_address)
    from aiohttp import web

    from server.app import build_app

    state = build_state(args)
    start_warmup(state)
    app = build_app(state)
    adapters = sorted(state.adapters.registered())
    log.info(
        "serving %s%s on http://%s:%d (OpenAPI at /openapi.json)",
        state.base_name,
        f" + adapters {', '.join(adapters)}" if adapters else "",
        args.host,
        args.port,
    )
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        shutdown_timeout=args.drain_timeout + 5,
        handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access") if args.access_log else None,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
