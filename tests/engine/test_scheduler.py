"""The scheduler, block manager and sequence without a model: a fake runner stands in for the
device (like JetStream's mock engine), so the token budget, chunked prefill, preemption,
prefix-cache commits and stop rules are checked in milliseconds.

The fake runner's next token is a function of the sequence's tokens so far, so a recompute
after preemption must reproduce the same outputs, as the real model does.
"""

from __future__ import annotations

import zlib

import pytest

from cara_jax.adapters.device_pool import DevicePool, PoolConfig
from cara_jax.adapters.store import AdapterRegistry, HostStore
from cara_jax.engine.admission_order import AdmissionOrder, AdmissionSettings
from cara_jax.engine.batch import ChunkRow
from cara_jax.engine.block_manager import BlockManager
from cara_jax.engine.residency import AdapterResidency
from cara_jax.engine.scheduler import Scheduler, SchedulerLimits
from cara_jax.engine.sequence import Sequence
from cara_jax.sampling_params import SamplingParams
from tests.helpers import TINY_CFG

CFG = TINY_CFG


def fake_token(tokens: list[int]) -> int:
    """What the fake model samples after ``tokens`` (ids in a plain-text range)."""
    return 300 + zlib.crc32(str(tokens[-4:]).encode()) % 2000


class FakeEngine:
    """The engine's loop with the runner replaced: schedule -> tokens -> postprocess."""

    def __init__(self, tok, num_pages=64, block_size=4, budget=16, max_seqs=4, prefill=2,
                 caching=True, max_len=256):  # fmt: skip
        pool = DevicePool(CFG, PoolConfig(budget_bytes=1 << 20, max_adapters=2, max_rank=8))
        self.residency = AdapterResidency(CFG, pool, AdapterRegistry(CFG, HostStore()), "sync")
        self.blocks = BlockManager(num_pages, block_size, caching)
        self.sched = Scheduler(
            SchedulerLimits(max_seqs, budget, prefill, max_len), self.blocks, self.residency,
            AdmissionOrder(AdmissionSettings(), "mbgmv", "cpu"),
        )  # fmt: skip
        self.tok, self.max_len, self.steps, self.n = tok, max_len, [], 0

    def add(self, prompt: list[int], **params) -> Sequence:
        self.n += 1
        seq = Sequence(f"r{self.n}", list(prompt), SamplingParams(temperature=0, **params), 0,
                       self.tok.detokenizer(), frozenset(self.tok.eos_token_ids))  # fmt: skip
        self.sched.add(seq)
        return seq

    def step(self) -> None:
        batch = self.sched.schedule()
        if not batch and self.sched.running:  # as the engine does: undo a page deadlock
            self.sched.unstick()
            batch = self.sched.schedule()
        assert batch.num_tokens <= self.sched.limits.max_num_batched_tokens
        self.steps.append(batch)
        epochs = self.sched.epochs(batch)
        # the runner: one token per decode row and per final chunk, from the tokens fed so far
        sampled = []
        for row in batch.rows:
            end = row.end if isinstance(row, ChunkRow) else row.position + 1
            sampled.append(fake_token(row.seq.tokens[:end]))
        self.sched.postprocess(batch, epochs, set(), sampled)

    def run(self, limit: int = 500) -> None:
        for _ in range(limit):
            if not (self.sched.waiting or self.sched.running):
                return
            self.step()
        raise AssertionError("requests did not finish")


def reference(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(fake_token(toks))
    return toks[len(prompt) :]


PROMPTS = [[1000 + 7 * i + j for j in range(n)] for i, n in enumerate((5, 23, 9, 40, 3, 17))]


def test_budget_chunked_prefill_and_outputs(smol_tok):
    eng = FakeEngine(smol_tok)
    seqs = [eng.add(p, max_tokens=6, ignore_eos=True) for p in PROMPTS]
    eng.run()
    for p, s in zip(PROMPTS, seqs, strict=True):
        assert s.output_ids == reference(p, 6) and s.finish_reason == "length"
    # the 40-token prompt spans several steps (budget 16) while others decode beside it
    chunked = [b for b in eng.steps if any(len(c.tokens) < 40 and c.seq is seqs[3]
                                           for c in b.chunks)]  # fmt: skip
    assert len(chunked) >= 3 and any(b.decode for b in chunked)
    # decode rows come first and take one token each; nothing left behind
    assert eng.blocks.num_free == eng.blocks.num_pages - 1
    assert eng.sched.num_free_rows == 4


def test_preemption_recomputes_the_same_outputs(smol_tok):
    roomy = FakeEngine(smol_tok)
    tight = FakeEngine(smol_tok, num_pages=14)  # 13 usable pages of 4 tokens for 4 rows
    out = {}
    for eng in (roomy, tight):
        seqs = [eng.add(p, max_tokens=12, ignore_eos=True) for p in PROMPTS[:4]]
        eng.run()
        out[eng is tight] = [s.output_ids for s in seqs]
    assert tight.sched.preemptions > 0 and roomy.sched.preemptions == 0
    assert out[True] == out[False] == [reference(p, 12) for p in PROMPTS[:4]]


def test_prefix_cache_commits_after_the_step(smol_tok):
    eng = FakeEngine(smol_tok)
    prompt = list(range(2000, 2021))  # 5 full blocks of 4, and one token
    first = eng.add(prompt, max_tokens=2, ignore_eos=True)
    eng.run()
    second = eng.add(prompt, max_tokens=2, ignore_eos=True)
    eng.run()
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 20  # every full block; the last token is recomputed
    assert second.output_ids == first.output_ids == reference(prompt, 2)


def test_stop_rules(smol_tok):
    tok = smol_tok
    ids = tok.encode("The cat sat on the mat. The dog", add_special_tokens=False)
    seq = Sequence("s", [1], SamplingParams(stop=["on the"], max_tokens=50), 0, tok.detokenizer(),
                   frozenset(tok.eos_token_ids))  # fmt: skip
    for t in ids:
        seq.append(t, 1000)
        if seq.finished:
            break
    assert seq.finish_reason == "stop" and seq.text == "The cat sat "
    eos = next(iter(tok.eos_token_ids))
    seq = Sequence("e", [1], SamplingParams(max_tokens=50), 0, tok.detokenizer(),
                   frozenset(tok.eos_token_ids))  # fmt: skip
    seq.append(ids[0], 1000)
    seq.append(eos, 1000)
    assert seq.finish_reason == "stop" and seq.output_ids == ids[:1]
    seq = Sequence("l", [1, 2], SamplingParams(max_tokens=50), 0, tok.detokenizer(),
                   frozenset(tok.eos_token_ids))  # fmt: skip
    for t in ids[:3]:
        seq.append(t, 5)  # the context holds 5 tokens
    assert seq.finish_reason == "length" and len(seq.tokens) == 5


@pytest.mark.parametrize("caching", [True, False])
def test_block_manager_frees_everything(smol_tok, caching):
    eng = FakeEngine(smol_tok, caching=caching, num_pages=24)  # 92 tokens: one 84-token request
    for p in PROMPTS:
        eng.add(p + p, max_tokens=4, ignore_eos=True)
    eng.run()
    assert eng.blocks.num_free == eng.blocks.num_pages - 1


def test_a_constrained_row_skips_the_step_launched_before_its_token_is_read(smol_tok):
    """With the engine's one-step lag (step t+1 is scheduled before step t's tokens are read), a
    row with a grammar is never in two consecutive steps (its next mask needs its last token),
    while an unconstrained row is; both produce the tokens they would alone."""
    from cara_jax.structured import Grammars, GrammarSpec

    eng = FakeEngine(smol_tok)
    free = eng.add(PROMPTS[0], max_tokens=6, ignore_eos=True)
    cons = eng.add(PROMPTS[2], max_tokens=6, ignore_eos=True)
    cons.constraint = Grammars(smol_tok, 49152).compile(GrammarSpec("regex", r"[\s\S]*"))

    def tokens(batch):  # at read time, as the device would have sampled them
        return [fake_token(r.seq.tokens[: r.end if isinstance(r, ChunkRow) else r.position + 1])
                for r in batch.rows]  # fmt: skip

    in_flight, sampling = None, []
    for _ in range(100):
        if in_flight is None and not (eng.sched.waiting or eng.sched.running):
            break
        batch = eng.sched.schedule()
        launched = (batch, eng.sched.epochs(batch)) if batch else None
        if in_flight is not None:
            eng.sched.postprocess(in_flight[0], in_flight[1], set(), tokens(in_flight[0]))
        in_flight = launched
        sampling.append({id(r.seq) for r in batch.rows if not isinstance(r, ChunkRow) or r.final})
    assert free.output_ids == reference(PROMPTS[0], 6)
    assert cons.output_ids == reference(PROMPTS[2], 6)
    pairs = list(zip(sampling, sampling[1:], strict=False))
    assert not any(id(cons) in a and id(cons) in b for a, b in pairs)
    assert any(id(free) in a and id(free) in b for a, b in pairs)
