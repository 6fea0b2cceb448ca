"""The dense, differentiable forward: whole sequences [B, T] through the serving model's own
layers (``Llama.dense``), each row on its own adapter, with no KV cache.

What it is for: gradients (training several adapters in one step, adapters.LoraSet) and
log-probabilities of given text under many adapters at once. Serving keeps the paged step
(engine/step.py); this path shares every layer with it, not a copy.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from cara_jax.lora_hooks import LoraHook
from cara_jax.weights import LoadedModel


@partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, tokens, hook):
    model = nnx.merge(graphdef, state)
    return model.logits(model.dense(tokens, hook))


def dense_logits(loaded: LoadedModel, tokens: jax.Array, hook: LoraHook | None = None) -> jax.Array:
    """float32 logits [B, T, V] at every position of ``tokens`` [B, T] (right-padded rows)."""
    return _logits(loaded.graphdef, loaded.state, jnp.asarray(tokens, jnp.int32), hook)


def token_logprobs(
    loaded: LoadedModel, tokens: jax.Array, hook: LoraHook | None = None
) -> jax.Array:
    """[B, T - 1]: log p(tokens[:, t + 1] | tokens[:, :t + 1]) under each row's adapter;
    differentiable in the hook's arrays (and usable inside jit, grad and vmap)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    logits = dense_logits(loaded, tokens[:, :-1], hook)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_nll(
    loaded: LoadedModel, tokens: jax.Array, mask: jax.Array, hook: LoraHook | None = None
) -> jax.Array:
    """[B] summed negative log-likelihood of each row's targets where ``mask`` [B, T - 1] is
    set (mask out the prompt and the padding)."""
    return -jnp.sum(token_logprobs(loaded, tokens, hook) * mask, axis=-1)
