"""The engine flags of a `cara-serve` subprocess, spelled the way this checkout's server takes them.

The engine's fields were renamed (num_slots -> max_num_seqs, max_len -> max_model_len,
max_prefill_batch -> max_prefill_seqs) and the server's flags follow on their own schedule, so
the benches that start servers (load_test, router_run) ask the server's parser which spelling it
has instead of hard-coding one.
"""

from __future__ import annotations

import functools

# each engine setting: its flag names, newest first
NAMES = {
    "max_num_seqs": ("--max-num-seqs", "--num-slots"),
    "max_model_len": ("--max-model-len", "--max-len"),
    "max_prefill_seqs": ("--max-prefill-seqs", "--max-prefill-batch"),
    "max_num_batched_tokens": ("--max-num-batched-tokens",),
    "kv_cache_memory": ("--kv-cache-memory",),
}


@functools.lru_cache(maxsize=1)
def server_options() -> dict[str, tuple | None]:
    """Every option string of ``server.cli``'s parser -> its choices (None: free text)."""
    from server.cli import build_parser

    return {
        o: (tuple(a.choices) if a.choices else None)
        for a in build_parser()._actions
        for o in a.option_strings
    }


def flag(setting: str, options: dict | None = None) -> str | None:
    """The server's flag for an engine setting (None: the server has none)."""
    opts = server_options() if options is None else options
    return next((n for n in NAMES[setting] if n in opts), None)


def engine_flags(warmup: str | None = None, options: dict | None = None, **settings) -> list[str]:
    """``--flag value`` pairs for the given settings (None values are left out). A setting
    the server has no flag for is left out too unless it is a core one (max_num_seqs,
    max_model_len, max_prefill_seqs), which raises; an unknown ``warmup`` mode raises."""
    opts = server_options() if options is None else options
    out: list[str] = []
    for setting, value in settings.items():
        if value is None:
            continue
        name = flag(setting, opts)
        if name is None:
            if setting in ("max_num_seqs", "max_model_len", "max_prefill_seqs"):
                raise SystemExit(f"cara-serve has no flag for {setting} ({NAMES[setting]})")
            continue
        out += [name, str(value)]
    if warmup is not None:
        choices = opts.get("--warmup")
        if choices is not None and warmup not in choices:
            raise SystemExit(f"--warmup {warmup}: cara-serve takes {', '.join(choices)}")
        out += ["--warmup", warmup]
    return out
