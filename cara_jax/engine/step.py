"""The one jitted step: a flat token batch through the model, then sampling, in one program.

Every step, whatever mix of decode tokens and prefill chunks it carries, is this function. Its
static shape is the token-count bucket T (with S = min(T, max_num_seqs) decode rows and P chunk
rows derived from it); the LoRA rank bucket is picked inside at run time. A handful of programs
in all, each compiled before the server reports healthy.

Device-side state carried between steps (``SeqState``, donated): each running sequence's last
sampled token, which is the next decode step's input (so the host never has to see a token
before launching the next step), and the per-sequence token counts that penalties read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cara_jax.kv_cache import KVCache
from cara_jax.ragged import DROP, RaggedMeta
from cara_jax.sampler import SamplingArrays, apply_penalties, penalties_active, sample
from cara_jax.sampling_params import MAX_LOGPROBS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SeqState:
    """Per sequence row (one per running sequence, up to max_num_seqs), on the device."""

    last: jax.Array  # [N] int32: the token a decode step of this row feeds in
    counts: jax.Array  # [N, V] int32: generated-token counts (presence/frequency penalties)
    seen: jax.Array  # [N, V] bool: tokens in prompt or output (repetition penalty)

    @classmethod
    def zeros(cls, rows: int, vocab: int) -> SeqState:
        return cls(
            last=jnp.zeros((rows,), jnp.int32),
            counts=jnp.zeros((rows, vocab), jnp.int32),
            seen=jnp.zeros((rows, vocab), jnp.bool_),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """What the host sends each step besides the hook (built by runner.py from the batch)."""

    tokens: jax.Array  # [T] token ids of chunk tokens (decode tokens come from SeqState.last)
    meta: RaggedMeta
    dec_row: jax.Array  # [S] sequence row of each decode row
    ch_row: jax.Array  # [P] sequence row of each chunk row
    ch_reset: jax.Array  # [P] bool: the chunk starts a sequence (clear its penalty counts)
    ch_out_from: jax.Array  # [P] position from which the chunk's tokens are outputs (recompute)
    sample_tok: jax.Array  # [S+P] flat index of the token whose logits are sampled
    sample_row: jax.Array  # [S+P] sequence row of each sample
    sample_valid: jax.Array  # [S+P] bool: a real sample (a decode row, or a prompt's last chunk)
    want_logprobs: jax.Array  # () bool
    allowed: jax.Array  # [S+P, ceil(V/32)] uint32: tokens a row may sample (structured.py)
    constrained: jax.Array  # () bool: some row has a grammar (else ``allowed`` is not read)
    bias_ids: jax.Array  # [S+P, MAX_LOGIT_BIAS] int32: tokens whose logits a row shifts
    bias_vals: jax.Array  # [S+P, MAX_LOGIT_BIAS] float32: by how much (0 pads)
    biased: jax.Array  # () bool: some row has a logit bias (else neither is read)
    score_next: jax.Array  # [T] int32: prompt_logprobs, the prompt token after each (-1: none)
    want_scores: jax.Array  # () bool: some chunk is scored (else no logits beyond the samples)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutputs:
    tokens: jax.Array  # [S+P] sampled token per sample row
    chosen_logprob: jax.Array  # [S+P] (zeros unless want_logprobs)
    top_ids: jax.Array  # [S+P, MAX_LOGPROBS]
    top_logprobs: jax.Array  # [S+P, MAX_LOGPROBS]
    score_lp: jax.Array  # [T] log-prob of the next prompt token at each position (prompt_logprobs)
    score_rank: jax.Array  # [T] its rank among all tokens (1 = the most likely)
    score_top_ids: jax.Array  # [T, MAX_LOGPROBS]
    score_top_lp: jax.Array  # [T, MAX_LOGPROBS]


def _logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    lp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)
    return chosen, top_ids.astype(jnp.int32), top_lp


SCORE_SLICE = 32  # tokens scored at a time (prompt_logprobs)


def add_bias(logits: jax.Array, ids: jax.Array, vals: jax.Array) -> jax.Array:
    """OpenAI's logit_bias: each row's (token, bias) pairs added to its logits."""
    return logits.at[jnp.arange(logits.shape[0])[:, None], ids].add(vals)


def constrain(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Logits of tokens a row's bitmask leaves out become -inf (bit v % 32 of word v // 32)."""
    v = logits.shape[-1]
    ids = jnp.arange(v, dtype=jnp.uint32)
    words = allowed[:, ids // 32]  # [rows, V]
    bits = jnp.right_shift(words, ids % 32) & 1
    return jnp.where(bits != 0, logits, -jnp.inf)


def run_step(graphdef, treedef, params, cache: KVCache, state: SeqState, inp: StepInputs,
             sampling: SamplingArrays, hook):  # fmt: skip
    """One engine step -> (StepOutputs, logits [S+P, V], cache, state)."""
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, params))
    meta = inp.meta
    tokens = inp.tokens.at[meta.dec_tok].set(state.last.at[inp.dec_row].get(mode="clip"),
                                             mode="drop")  # fmt: skip
    h, cache = model(tokens, cache, meta, hook)
    logits = model.logits(h.at[inp.sample_tok].get(mode="clip"), hook, inp.sample_tok)  # [S+P, V]

    # penalty state: clear rows that start now, count the chunk tokens (outputs only for counts)
    counts, seen = state.counts, state.seen
    reset = jnp.where(inp.ch_reset, inp.ch_row, DROP)
    counts = counts.at[reset].set(0, mode="drop")
    seen = seen.at[reset].set(False, mode="drop")
    idx, valid = meta.chunk_index()
    ctok = tokens.at[idx].get(mode="clip").reshape(-1)
    cpos = meta.positions.at[idx].get(mode="clip")
    crow = jnp.where(valid, inp.ch_row[:, None], DROP).reshape(-1)
    seen = seen.at[crow, ctok].set(True, mode="drop")
    is_out = (cpos >= inp.ch_out_from[:, None]).astype(jnp.int32).reshape(-1)
    counts = counts.at[crow, ctok].add(is_out, mode="drop")

    rows = inp.sample_row

    def penalize(x):
        c = counts.at[rows].get(mode="clip")
        s = seen.at[rows].get(mode="clip")
        return apply_penalties(x, c, s, sampling)

    shaped = jax.lax.cond(penalties_active(sampling), penalize, lambda x: x, logits)
    shaped = jax.lax.cond(inp.biased, lambda x: add_bias(x, inp.bias_ids, inp.bias_vals),
                          lambda x: x, shaped)  # fmt: skip
    shaped = jax.lax.cond(inp.constrained, lambda x: constrain(x, inp.allowed), lambda x: x,
                          shaped)  # fmt: skip
    positions = meta.positions.at[inp.sample_tok].get(mode="clip")
    next_tok = sample(shaped, sampling, positions + 1)

    srow = jnp.where(inp.sample_valid, rows, DROP)
    state = SeqState(
        last=state.last.at[srow].set(next_tok, mode="drop"),
        counts=counts.at[srow, next_tok].add(1, mode="drop"),
        seen=seen.at[srow, next_tok].set(True, mode="drop"),
    )
    n = next_tok.shape[0]
    chosen, top_ids, top_lp = jax.lax.cond(
        inp.want_logprobs,
        lambda: _logprobs(logits, next_tok),
        lambda: (
            jnp.zeros((n,), jnp.float32),
            jnp.zeros((n, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((n, MAX_LOGPROBS), jnp.float32),
        ),
    )
    t = tokens.shape[0]

    def score_slice(args):
        hs, nxt, at = args
        lp = jax.nn.log_softmax(model.logits(hs, hook, at), axis=-1)
        chosen_t = jnp.take_along_axis(lp, jnp.maximum(nxt, 0)[:, None], axis=-1)
        rank = 1 + jnp.sum(lp > chosen_t, axis=-1, dtype=jnp.int32)
        top_lp_t, top_ids_t = jax.lax.top_k(lp, MAX_LOGPROBS)
        return chosen_t[:, 0], rank, top_ids_t.astype(jnp.int32), top_lp_t

    def score():  # the LM head over every token of the step: only when a prompt is scored,
        # in slices of SCORE_SLICE tokens so that its [tokens, vocab] temporaries stay small
        s = SCORE_SLICE if t % SCORE_SLICE == 0 else t
        at = jnp.arange(t, dtype=jnp.int32).reshape(-1, s)
        out = jax.lax.map(score_slice, (h.reshape(t // s, s, -1), inp.score_next.reshape(-1, s), at))
        return tuple(o.reshape(t, *o.shape[2:]) for o in out)

    scores = jax.lax.cond(inp.want_scores, score, lambda: (
        jnp.zeros((t,), jnp.float32), jnp.zeros((t,), jnp.int32),
        jnp.zeros((t, MAX_LOGPROBS), jnp.int32), jnp.zeros((t, MAX_LOGPROBS), jnp.float32)))  # fmt: skip
    return StepOutputs(next_tok, chosen, top_ids, top_lp, *scores), logits, cache, state
