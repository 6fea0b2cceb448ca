"""CPU-assisted cold start: same tokens as cached/sync at every load state; faults fall back."""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import threading

import pytest

from cara_jax.engine import Engine
from cara_jax.sampling_params import SamplingParams
from tests.helpers import ALL7, make_peft_adapters
from tests.server_helpers import smol_engine_config

SPECS = {
    "c0": dict(r=8, lora_alpha=16, target_modules=ALL7),
    "c1": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "c2": dict(r=32, lora_alpha=64, target_modules=ALL7),
}
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def smol_adapters(hf_smollm, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_assist_adapters")
    return make_peft_adapters(lambda: copy.deepcopy(hf_smollm), out, SPECS, seed=3, scale=0.5)


def _engine(loaded, tok, adapters, mode, **kw):
    # the tests' SmolLM2 engine (tests/server_helpers.py), so these share their programs with
    # the cold-start server's: one 64-token step (plus its CPU-assisted twin) runs everything,
    # all four prompts prefilled in one step as whole chunks; 3 layer groups (data, not shape)
    base = smol_engine_config()
    cfg = dict(cold_start=mode, cpu_workers=2,
               pool=dataclasses.replace(base.pool, layer_groups=3))  # fmt: skip
    cfg.update(kw)
    eng = Engine(loaded, tok, dataclasses.replace(base, **cfg))
    for name, path in adapters.items():
        eng.load_adapter(name, path)
    return eng


def _run(eng, reqs):
    ids = [eng.add_request(p, sp, a) for p, sp, a in reqs]
    toks = {i: [] for i in ids}
    n = 0
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id] += o.token_ids
        n += 1
        assert n < 5000
    return [toks[i] for i in ids]


REQS = [
    ([1, 422, 3101, 30, 9142, 314, 253, 2], GREEDY, "c0"),
    ([5, 6, 7, 8, 9, 10, 11], GREEDY, None),
    ([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], GREEDY, "c1"),
    ([900, 17, 301], GREEDY, "c2"),
]


# a prompt longer than the 64-token budget: its prefill takes two chunks (64 + 16 tokens)
LONG = ([60 + i for i in range(80)], GREEDY, "c1")


@pytest.fixture(scope="module")
def cached_runs(smollm, smol_tok, smol_adapters):
    """``cached`` mode's tokens for REQS (one batch) and for LONG (alone)."""
    eng = _engine(smollm, smol_tok, smol_adapters, "cached")
    try:
        return _run(eng, REQS), _run(eng, [LONG])[0]
    finally:
        eng.close()


@pytest.fixture(scope="module")
def reference(cached_runs):
    return cached_runs[0]


@pytest.mark.slow
def test_sync_matches_cached(smollm, smol_tok, smol_adapters, reference):
    eng = _engine(smollm, smol_tok, smol_adapters, "sync")
    assert _run(eng, REQS) == reference
    eng.close()


class _Gate:
    """Holds every adapter load at the start of layer group ``at`` until released."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.go = threading.Event()
        self.reached = threading.Event()

    def __call__(self, content_hash: str, group: int) -> None:
        if group >= self.at:
            self.reached.set()
            assert self.go.wait(600)  # a busy machine may compile a step meanwhile


@pytest.fixture(scope="module")
def assist_engine(smollm, smol_tok, smol_adapters):
    eng = _engine(smollm, smol_tok, smol_adapters, "cpu_assist")
    yield eng
    eng.close()


def _make_cold(eng, names, ready_groups, gate):
    """Evict ``names`` from the device, then start their loads and hold each at the start of
    group ``ready_groups`` (loads run one at a time, so only the first can stop mid-way)."""
    eng.pool.group_gate = None
    for name in set(SPECS) - set(names):  # the others are warm: resident before the batch
        adapter = eng.registry.resolve(name)
        eng.pool.acquire(adapter).wait(60)
        eng.pool.release(adapter.content_hash)
    for name in names:
        h = eng.registry.entry(name).content_hash
        if eng.pool.is_resident(h):
            eng.pool.evict(h)
    eng.pool.group_gate = gate
    held = []
    for name in names:
        adapter = eng.registry.resolve(name)
        held.append((eng.pool.acquire(adapter), adapter.content_hash))
    h0 = held[0][0]
    for g in range(min(ready_groups, len(h0.groups))):
        while not h0.group_ready(g):
            h0.wait(0.01)
    if ready_groups < len(h0.groups):
        assert gate.reached.wait(60)
    return held


@pytest.mark.parametrize(
    "cold, ready_groups",
    [
        pytest.param(("c0", "c1", "c2"), 0, marks=pytest.mark.slow),
        (("c0",), 1),
        pytest.param(("c2",), 2, marks=pytest.mark.slow),
        pytest.param(("c1",), 3, marks=pytest.mark.slow),
    ],
)
def test_cpu_assist_matches_cached_at_every_group_boundary(
    assist_engine, reference, cold, ready_groups
):
    """The prefill is dispatched while the cold adapter has exactly ``ready_groups`` of its 3
    layer groups on the device: those layers use the device path, the rest the CPU workers;
    the batch mixes cold rows, warm rows and a base-model row."""
    eng = assist_engine
    before = dict(eng.cpu_stats)
    gate = _Gate(ready_groups)
    held = _make_cold(eng, cold, ready_groups, gate)
    try:
        ids = [eng.add_request(p, sp, a) for p, sp, a in REQS]
        toks = {i: [] for i in ids}
        for _ in range(3):  # admission + the CPU-assisted prefill + decode, loads still held
            for o in eng.step():
                toks[o.request_id] += o.token_ids
        n_assisted = (
            eng.cpu_stats["cara_cpu_assist_prefills_total"]
            - before["cara_cpu_assist_prefills_total"]
        )
        cpu_layers = (
            eng.cpu_stats["cara_cpu_lora_layers_cpu_total"]
            - before["cara_cpu_lora_layers_cpu_total"]
        )
        if ready_groups < 3:
            assert n_assisted == len(cold)
            # 30 layers in 3 groups: the first cold adapter has ready_groups, the others none
            assert cpu_layers == 10 * (3 - ready_groups) + 30 * (len(cold) - 1)
            # cold requests have their first token but do not decode before their load ends;
            # the others decode meanwhile
            for i, r in zip(ids, REQS, strict=True):
                assert len(toks[i]) == 1 if r[2] in cold else len(toks[i]) >= 2
        else:
            assert n_assisted == 0
        gate.go.set()
        for h, content_hash in held:
            h.wait(60)
            eng.pool.release(content_hash)
        n = 0
        while eng.has_unfinished():
            for o in eng.step():
                toks[o.request_id] += o.token_ids
            n += 1
            assert n < 5000
        assert [toks[i] for i in ids] == reference
        # loaded adapters leave the workers' shared memory (their device copy serves now)
        assert not eng.cpu_pool.adapter_keys()
    finally:
        gate.go.set()
        eng.pool.group_gate = None


def _serve(eng, gate, steps_held=3):
    ids = [eng.add_request(p, sp, a) for p, sp, a in REQS]
    toks = {i: [] for i in ids}
    for _ in range(steps_held):
        for o in eng.step():
            toks[o.request_id] += o.token_ids
    gate.go.set()
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id] += o.token_ids
    return [toks[i] for i in ids]


@pytest.mark.slow
def test_worker_faults(smollm, smol_tok, smol_adapters, reference, caplog):
    """A hung worker: its requests fall back to a synchronous load, nothing lost. Killed
    workers: replaced before the next job, the prefill is CPU-assisted as usual. Shutdown
    unlinks every shared-memory segment."""
    eng = _engine(smollm, smol_tok, smol_adapters, "cpu_assist", cpu_timeout_s=2.0)
    names = eng.cpu_pool.segment_names()
    try:
        gate = _Gate(0)
        eng.pool.group_gate = gate
        eng.cpu_pool.debug_hang(0, 30_000)
        assert _serve(eng, gate) == reference
        assert eng.cpu_stats["cara_cpu_assist_fallbacks_total"] == 3
        assert eng.cpu_stats["cara_cpu_assist_prefills_total"] == 0
        assert "fall back" in caplog.text and "restarting" in caplog.text

        killed = eng.cpu_pool.worker_pids()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        gate = _Gate(0)
        _make_cold(eng, ("c0", "c1", "c2"), 0, gate)
        for name in ("c0", "c1", "c2"):
            eng.pool.release(eng.registry.entry(name).content_hash)
        assert _serve(eng, gate) == reference
        assert eng.cpu_stats["cara_cpu_assist_prefills_total"] == 3
        assert not set(killed) & set(eng.cpu_pool.worker_pids())  # replaced
        names += eng.cpu_pool.segment_names()
    finally:
        eng.pool.group_gate = None
        eng.close()
    assert not [n for n in set(names) if os.path.exists(f"/dev/shm/{n}")]


def test_cpu_assist_chunk_by_chunk(assist_engine, cached_runs):
    """A cold request whose prompt spans several steps (an 80-token prompt, a 64-token budget):
    each chunk takes its deltas from the CPU workers for the layers not yet on the device, and
    the tokens are those of ``cached``."""
    eng = assist_engine
    before = dict(eng.cpu_stats)
    gate = _Gate(1)
    held = _make_cold(eng, ("c1",), 1, gate)
    rid = None
    try:
        prompt, sp, adapter = LONG
        rid = eng.add_request(prompt, sp, adapter)
        toks = []
        for _ in range(4):  # two chunks (64 + 16 tokens), then the load is still held
            toks += [t for o in eng.step() if o.request_id == rid for t in o.token_ids]
        st = {k: eng.cpu_stats[k] - before[k] for k in before}
        assert st["cara_cpu_assist_prefills_total"] == 2  # one CPU-assisted plan per chunk
        assert st["cara_cpu_lora_layers_cpu_total"] == 2 * 20  # 2 of 3 layer groups, twice
        assert len(toks) == 1  # the first token; no decode before the load is done
        gate.go.set()
        for h, content_hash in held:
            h.wait(60)
            eng.pool.release(content_hash)
        held = []
        while eng.has_unfinished():
            toks += [t for o in eng.step() if o.request_id == rid for t in o.token_ids]
        assert toks == cached_runs[1]
        assert not eng.cpu_pool.adapter_keys()
    finally:
        gate.go.set()
        eng.pool.group_gate = None
        for h, content_hash in held:  # a failure above: leave the shared engine clean
            h.wait(60)
            eng.pool.release(content_hash)
        if rid is not None and eng.has_unfinished():
            eng.abort(rid)
            while eng.has_unfinished():
                eng.step()
