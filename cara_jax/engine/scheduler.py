"""The scheduler: waiting and running queues, KV pages, adapter residency, SLO admission.

Each step gets a token budget (``max_num_batched_tokens``). Running sequences that are decoding
take one token each, first; then prompts fill what is left, in chunks: a prompt already
started continues, then waiting requests are admitted (in the order admission_order.py chooses) while
there is budget, a free chunk row (``max_prefill_seqs``), a sequence row and KV pages. A long
prompt thus spans several steps while the others keep decoding (chunked prefill).

When a decoding sequence needs a page and none is free, the newest running sequence is
preempted: its pages are freed and it goes back to the head of the queue, to be recomputed from
its prompt and the tokens it has generated (same greedy output, nothing lost).

With prefix caching (block_manager.py) an admitted request first takes the cached blocks that
start its tokens under its adapter's content hash, and its chunks start after them; blocks are
registered once the step that computed them has been read back without error (``commit_kv``).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import time

from cara_jax.engine.admission_order import AdmissionOrder
from cara_jax.engine.batch import ChunkRow, DecodeRow, ScheduledBatch
from cara_jax.engine.block_manager import BASE_KEY, BlockManager, extend_block_hashes
from cara_jax.engine.residency import AdapterResidency, Readiness
from cara_jax.engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Accepted:
    """A sampled token a sequence took in ``postprocess`` (the engine streams the delta)."""

    seq: Sequence
    row: int  # its row in the batch (and in the step's per-row outputs)
    outputs_before: int  # len(seq.output_ids) before the token


@dataclasses.dataclass(frozen=True)
class Ended:
    """A sequence that left the scheduler (finished, aborted or failed): what the engine
    records about it."""

    seq: Sequence
    rank: int
    cold_start_mode: str | None
    cold_start_reason: str | None


@dataclasses.dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_prefill_seqs: int
    max_model_len: int


class Scheduler:
    def __init__(
        self,
        limits: SchedulerLimits,
        blocks: BlockManager,
        residency: AdapterResidency,
        admission: AdmissionOrder,
    ) -> None:
        self.limits = limits
        self.blocks = blocks
        self.residency = residency
        self.admission = admission
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self._rows = list(range(limits.max_num_seqs))
        heapq.heapify(self._rows)
        self.failed: list[tuple[Sequence, str]] = []  # adapter errors found while admitting
        self.preemptions = 0

    # ------------------------------------------------------------------ queues

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_free_rows(self) -> int:
        return len(self._rows)

    def finish(self, seq: Sequence) -> Ended:
        """A finished or aborted sequence leaves: its pages, row and queue place first (nothing
        below can keep them), then its adapter, through residency."""
        rank = self.residency.rank_of(seq.content_hash)
        self.release(seq)
        mode, reason = self.residency.finished(seq)
        return Ended(seq, rank, mode, reason)

    def release(self, seq: Sequence) -> None:
        """Pages and row back at once (the adapter is ``finish``'s)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free_kv(seq)

    def _free_kv(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        seq.kv_epoch += 1
        if seq.row >= 0:
            heapq.heappush(self._rows, seq.row)
            seq.row = -1

    def requeue(self, seq: Sequence, *, recompute_outputs: bool) -> None:
        """Back to the head of the queue with no KV; it is prefilled again from scratch."""
        if seq in self.running:
            self.running.remove(seq)
        self._free_kv(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        if not recompute_outputs:
            seq.num_sampled = len(seq.output_ids)
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        log.info("preempting %s (%d tokens in the cache): out of KV pages",
                 seq.request_id, seq.num_computed)  # fmt: skip
        seq.preemptions += 1
        self.preemptions += 1
        self.requeue(seq, recompute_outputs=True)

    # ------------------------------------------------------------------ prefix cache

    def _hashes(self, seq: Sequence) -> list[bytes]:
        key = seq.content_hash or BASE_KEY
        if seq.hash_key != key:  # first use, or the name now holds other content
            seq.block_hashes, seq.hash_key = [], key
        return extend_block_hashes(seq.block_hashes, seq.tokens, self.blocks.block_size, key)

    def _match_prefix(self, seq: Sequence) -> None:
        """Start an admitted sequence on the cached blocks of its tokens. At least its last
        token is computed again: its logits are what the first sample needs. A request with
        penalties prefills everything: its penalty state on the device is built from the tokens
        its chunks carry."""
        tokens = len(seq.tokens)
        usable = (tokens - 1) // self.blocks.block_size
        p = seq.params
        penalties = p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
        scored = p.prompt_logprobs is not None  # every prompt position is computed and scored
        lookup = self.blocks.enable_caching and not penalties and not scored
        hashes = self._hashes(seq)[:usable] if lookup else []
        seq.num_computed = self.blocks.match(seq.request_id, hashes)

    def uncached_tokens(self, seq: Sequence) -> int:
        """Tokens the sequence would prefill if admitted now (after its prefix-cache hit)."""
        tokens = len(seq.tokens)
        if not self.blocks.enable_caching or seq.params.prompt_logprobs is not None:
            return tokens
        usable = (tokens - 1) // self.blocks.block_size
        return tokens - self.blocks.cached_prefix(self._hashes(seq)[:usable])

    def commit_kv(self, seq: Sequence, upto: int) -> None:
        """The KV of positions [0, upto) is computed (its step was read back): register the
        full blocks among them whose tokens are known."""
        if not self.blocks.enable_caching:
            return
        n = min(upto, len(seq.prompt_ids) + len(seq.output_ids))
        self.blocks.commit(seq.request_id, self._hashes(seq), n // self.blocks.block_size)

    # ------------------------------------------------------------------ one step

    def _can_decode(self, seq: Sequence) -> bool:
        if not seq.prefilled or seq.num_sampled >= seq.params.max_tokens:
            return False
        if seq.awaiting_token:  # constrained: its next mask needs the token in flight
            return False
        if seq.num_computed >= self.limits.max_model_len:
            return False
        return self.residency.decodable(seq)  # CPU-assisted: once its load is done

    def _chunk(self, seq: Sequence, budget: int) -> ChunkRow | None:
        if seq.awaiting_token:  # constrained, re-run after a preemption: the token comes first
            return None
        want = min(seq.prefill_target - seq.num_computed, budget)
        n = self.blocks.fits(seq.request_id, seq.num_computed + want) - seq.num_computed
        if n <= 0 or not self.blocks.grow(seq.request_id, seq.num_computed + n):
            return None
        start = seq.num_computed
        toks = seq.tokens[start : start + n]
        seq.num_computed += n
        final = seq.num_computed >= seq.prefill_target
        if final:
            seq.num_sampled += 1
        return ChunkRow(
            seq=seq, row=seq.row, tokens=toks, start=start,
            table=list(self.blocks.table(seq.request_id)), adapter_slot=seq.hold.slot,
            sampling=seq.sampling_row(), final=final, out_from=len(seq.prompt_ids),
            cpu_assist=seq.hold.cpu_assist, allowed=self._mask(seq, seq.num_sampled - 1) if final else None,
            bias=seq.params.logit_bias if final else (), score_next=seq.score_next(start, n),
        )  # fmt: skip

    @staticmethod
    def _mask(seq: Sequence, index: int):
        """The allowed tokens for output ``index`` of ``seq``: a grammar's (its token is then
        awaited), less the end tokens while below min_tokens; None: any token."""
        ban = seq.ban_mask if index < seq.params.min_tokens else None
        if seq.constraint is None:
            return ban
        seq.awaiting_token = True
        mask = seq.constraint.mask()
        return mask if ban is None else mask & ban

    def schedule(self, wait_s: float = 0.0, step_s: float = 0.0) -> ScheduledBatch:
        """The next step's batch. ``wait_s``: how long admission may wait for adapter loads
        about to land (the step in flight keeps the device busy meanwhile); ``step_s``: the
        recent step time (what a load that misses this step costs a request)."""
        lim = self.limits
        budget = lim.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        # 1. one token for every decoding sequence, oldest first; preempt the newest for pages
        for seq in list(self.running):
            if seq not in self.running or budget == 0 or not self._can_decode(seq):
                continue
            while not self.blocks.grow(seq.request_id, seq.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            batch.decode.append(
                DecodeRow(seq, seq.row, seq.num_computed, list(self.blocks.table(seq.request_id)),
                          seq.hold.slot, seq.sampling_row(), self._mask(seq, seq.num_sampled),
                          seq.params.logit_bias)  # fmt: skip
            )
            seq.num_computed += 1
            seq.num_sampled += 1
            budget -= 1
        # 2. chunks of prompts already started
        for seq in self.running:
            if len(batch.chunks) >= lim.max_prefill_seqs or budget == 0:
                break
            if not seq.prefilled:
                ch = self._chunk(seq, budget)
                if ch is not None:
                    batch.chunks.append(ch)
                    budget -= len(ch.tokens)
        # 3. admit waiting requests (none after a preemption: pages are short)
        if batch.preempted or not self.waiting:
            return batch
        room = min(lim.max_prefill_seqs - len(batch.chunks), len(self._rows))
        if room <= 0 or budget == 0:
            return batch
        for seq in self.admission.candidates(self.running, list(self.waiting), room, room):
            if len(batch.chunks) >= lim.max_prefill_seqs or budget == 0 or not self._rows:
                break
            if self.blocks.num_free == 0:
                break
            try:
                tokens = self.uncached_tokens(seq) if seq.content_hash else 0
                ready, waited = self.residency.ready(seq, tokens, wait_s, step_s)
                wait_s -= waited
            except Exception as e:  # e.g. the adapter was unloaded and evicted meanwhile
                log.warning("request %s failed to get adapter %s: %s",
                            seq.request_id, seq.adapter_name, e)  # fmt: skip
                self.waiting.remove(seq)
                self.failed.append((seq, f"adapter {seq.adapter_name!r} is unavailable: {e}"))
                continue
            if ready is Readiness.NOT_YET:
                continue  # its load proceeds; requests behind it are not blocked
            seq.row = heapq.heappop(self._rows)
            seq.prefill_target = len(seq.tokens)
            self._match_prefix(seq)
            ch = self._chunk(seq, budget)
            if ch is None:
                self._free_kv(seq)
                seq.num_computed = 0
                break
            hit = ch.start
            ch.first = True
            self.blocks.record(seq.stats_name, len(seq.tokens), hit)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(hit, len(seq.prompt_ids))
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            if seq.admitted is None:
                seq.admitted = time.perf_counter()
            self.running.append(seq)
            batch.chunks.append(ch)
            budget -= len(ch.tokens)
        return batch

    # ------------------------------------------------------------------ after a step

    @staticmethod
    def epochs(batch: ScheduledBatch) -> dict[int, tuple[int, int]]:
        """Each row's sequence's (epoch, kv_epoch) at dispatch: what ``postprocess`` checks
        to drop results that went stale while the step was in flight."""
        return {id(r.seq): (r.seq.epoch, r.seq.kv_epoch) for r in batch.rows}

    def postprocess(
        self,
        batch: ScheduledBatch,
        epochs: dict[int, tuple[int, int]],
        failed: set[int],
        row_tokens: list[int],
    ) -> tuple[list[Accepted], list[Ended]]:
        """A step's tokens are read (``row_tokens``: one per batch row): re-queue the chunks whose
        CPU-assisted prefill failed (``failed``: chunk indexes), register the good rows' KV with
        the prefix cache, append each counted token to its sequence (stop rules apply there) and
        let finished sequences go. Every state change after a step happens here."""
        for j in failed:
            self._requeue_sync(batch.chunks[j].seq)
        for row in batch.rows:  # the step's KV is in the cache: full blocks may serve others
            if row.seq.finished or (row.seq.epoch, row.seq.kv_epoch) != epochs[id(row.seq)]:
                continue
            self.commit_kv(row.seq, row.end if isinstance(row, ChunkRow) else row.position + 1)
        accepted, ended = [], []
        for k, row in enumerate(batch.rows):
            if isinstance(row, ChunkRow) and not row.final:
                continue
            seq = row.seq
            if row.allowed is not None:
                seq.awaiting_token = False  # read: the next mask can be made
            if seq.finished or seq.epoch != epochs[id(seq)][0]:
                continue  # finished, aborted or re-run while this token was in flight
            accepted.append(Accepted(seq, k, len(seq.output_ids)))
            self._take(seq, row_tokens[k])
            if seq.finished:
                ended.append(self.finish(seq))
        return accepted, ended

    def _take(self, seq: Sequence, token: int) -> None:
        """Append a sampled token; a constrained sequence's grammar takes it first and ends the
        output once it is complete (the token that completes it is kept)."""
        c = seq.constraint
        if c is None:
            seq.append(token, self.limits.max_model_len)
            return
        if not c.consume(token):  # the mask allowed it, so only a grammar engine fault gets here
            log.warning("request %s: grammar refused token %d (%s)", seq.request_id, token,
                        c.error)  # fmt: skip
            seq.text += seq.detok.flush()
            seq.finish("stop")  # the text so far, without the refused token
            return
        seq.append(token, self.limits.max_model_len)
        if seq.finished:
            if seq.finish_reason == "length" and c.done:
                seq.finish_reason = "stop"  # complete on its last allowed token
            return
        if c.done:
            seq.text += seq.detok.flush()
            seq.finish("stop")

    def take_failed(self) -> list[tuple[Ended, str]]:
        """Sequences whose adapter could not be had (found while admitting): finished with
        ``error`` and gone, each with its message."""
        out = []
        for seq, err in self.failed:
            seq.finish("error")
            out.append((self.finish(seq), err))
        self.failed.clear()
        return out

    def _requeue_sync(self, seq: Sequence) -> None:
        """A CPU-assisted prefill failed: back to the queue head, to wait for its load."""
        if seq.finished:
            return
        seq.epoch += 1
        self.residency.fall_back(seq)
        self.requeue(seq, recompute_outputs=False)

    def unstick(self) -> Sequence | None:
        """When nothing could run although sequences are running (their prompts wait for pages
        that other half-prefilled prompts hold), preempt the newest so the others can go on."""
        stuck = self.blocks.num_free == 0 and any(not s.prefilled for s in self.running)
        if len(self.running) < 2 or not stuck:
            return None  # e.g. CPU-assisted requests waiting for their loads: nothing to undo
        victim = self.running[-1]
        self._preempt(victim)
        return victim

    def router_state(self) -> dict:
        """Running and queued requests with their ranks and SLOs (call under the engine's
        lock): what a router weighs."""

        def info(s: Sequence) -> dict:
            return {"rank": s.rank, "prompt_tokens": len(s.prompt_ids),
                    "slo_s": s.params.tpot_slo, "adapter": s.adapter_name}  # fmt: skip

        return {"running": [info(s) for s in self.running],
                "queued": [info(s) for s in self.waiting], "free_slots": self.num_free_rows}  # fmt: skip
