"""Static-batch generation on a ModelRunner: the smoke-test path (CLI, parity tests, bench).

All prompts are prefilled into slots 0..n-1, then decoded together until each stops. The loop
launches step t+1 before reading step t's tokens, so the host's stop checks overlap the device.
The continuous-batching engine builds on the same runner calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from cara_jax.runner import ModelRunner
from cara_jax.sampler import SamplingArrays


@dataclasses.dataclass
class GenOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


def generate_tokens(
    runner: ModelRunner,
    prompts: list[list[int]],
    max_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: frozenset[int] = frozenset(),
    adapters: list[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[GenOutput]:
    """Generate up to ``max_tokens`` per prompt; ``on_token(row, token)`` streams as they land.

    ``adapters[i]`` is prompt i's adapter slot in the runner's device pool (0 = base model).
    """
    n = len(prompts)
    cap = runner.config.num_slots
    if n > cap:
        raise ValueError(f"{n} prompts exceed the runner's {cap} slots")
    sampling = SamplingArrays.from_rows([(temperature, top_k, top_p, seed)] * n)
    chunk = runner.config.max_prefill_batch
    first = []
    for i in range(0, n, chunk):
        idx = list(range(i, min(n, i + chunk)))
        ad = None if adapters is None else [adapters[j] for j in idx]
        _, toks = runner.prefill([prompts[j] for j in idx], idx, sampling.take(np.array(idx)), ad)
        first.append(toks)
    slot_adapters = None if adapters is None else np.asarray(adapters, np.int32)
    outs = [GenOutput([], "length") for _ in range(n)]
    done = np.zeros(n, bool)
    positions = np.array([len(p) for p in prompts], np.int32)  # position of the token to feed

    def accept(row: int, tok: int) -> None:
        if done[row]:
            return
        outs[row].token_ids.append(tok)
        if on_token:
            on_token(row, tok)
        if tok in stop_ids:
            outs[row].finish_reason, done[row] = "stop", True
        elif len(outs[row].token_ids) >= max_tokens or positions[row] + 1 >= runner.max_len:
            done[row] = True

    pending = [np.asarray(t) for t in first]
    for row, tok in enumerate(np.concatenate(pending)):
        accept(row, int(tok))
    in_flight = None
    while True:
        live = np.where(done, -1, positions)
        if in_flight is None and not (live >= 0).any():
            break
        launched = None
        if (live >= 0).any():
            _, toks = runner.decode(live, sampling, slot_adapters)
            launched = (toks, live.copy())
            positions = np.where(done, positions, positions + 1)
        if in_flight is not None:
            toks_prev, live_prev = in_flight
            host = np.asarray(toks_prev)
            for row in np.nonzero(live_prev >= 0)[0]:
                accept(int(row), int(host[row]))
        in_flight = launched
        if launched is None:
            break
    return outs
