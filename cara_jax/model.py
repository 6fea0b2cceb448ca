"""Flax NNX Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Two forwards share every layer's code: the serving one (``__call__``) takes a flat batch of tokens
from any mix of sequences (decode tokens and prefill chunks), the paged KV cache and the step's
layout (ragged.py), and is one ``lax.scan`` over the stacked layers (one layer body to compile;
docs/engine.md); ``dense`` takes whole sequences [B, T] with no cache and static loops, so it
is differentiable (training many adapters at once, dense.py). Each linear projection is a LoRA
hook point (see lora_hooks.py). The jitted step over (graphdef, state) lives in engine/step.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cara_jax.attention import NEG, attend_rows, write_kv
from cara_jax.config import ModelConfig
from cara_jax.kv_cache import KVCache
from cara_jax.lora_hooks import LoraHook, project
from cara_jax.ragged import DROP, RaggedMeta


class Linear(nnx.Module):
    """Bias-free projection with an [in, out] kernel ([layers, in, out] in the stacked decoder
    layers, which the forward scans one layer at a time)."""

    def __init__(
        self, din: int, dout: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, lead: tuple = ()
    ) -> None:
        init = nnx.initializers.normal(stddev=0.02)
        self.kernel = nnx.Param(init(rngs.params(), (*lead, din, dout), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.kernel[...])


class RMSNorm(nnx.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale (HF's order of operations)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype, lead: tuple = ()) -> None:
        self.weight = nnx.Param(jnp.ones((*lead, dim), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def rope_cos_sin(
    cfg: ModelConfig, positions: jax.Array, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [*positions.shape, head_dim] for HF's rotate-half RoPE layout."""
    inv = jnp.asarray(cfg.inv_freq())
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [..., T, heads, D]; cos/sin: [..., T, D]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rot * sin[..., None, :]


class Attention(nnx.Module):
    """Self-attention of one decoder layer; ``layer`` (its index, a traced int inside the
    forward's scan) is passed to each call, for the LoRA hook and the paged cache."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, lead: tuple = ()):
        self.cfg = cfg
        h = cfg.hidden_size
        kw = dict(dtype=dtype, rngs=rngs, lead=lead)
        self.q_proj = Linear(h, cfg.q_size, **kw)
        self.k_proj = Linear(h, cfg.kv_size, **kw)
        self.v_proj = Linear(h, cfg.kv_size, **kw)
        self.o_proj = Linear(cfg.q_size, h, **kw)

    def _qkv(self, i, x, cos, sin, hook):
        """Projections (each plus its LoRA delta) of x [..., T, hidden], RoPE applied:
        q [..., T, H, D], k and v [..., T, Hkv, D]."""
        cfg = self.cfg
        q, k, v = project(
            hook, i, x, {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj}
        )
        lead = x.shape[:-1]
        q = apply_rope(q.reshape(*lead, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        return q, k, v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)

    def __call__(
        self,
        i: jax.Array,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        k_cache: jax.Array,
        v_cache: jax.Array,
        meta: RaggedMeta,
        hook: LoraHook | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, hidden] flat tokens of layer ``i``; the caches of every layer [layers, pages *
        block_size, Hkv, D] (this layer's pages are found by offsetting its slots and page
        numbers, so no layer's cache is ever copied out)."""
        t = x.shape[0]
        q, k, v = self._qkv(i, x, cos, sin, hook)
        shape = k_cache.shape
        rows = shape[1]
        k_flat, v_flat = k_cache.reshape(-1, *shape[2:]), v_cache.reshape(-1, *shape[2:])
        slots = jnp.where(meta.slot_mapping < rows, meta.slot_mapping + i * rows, DROP)
        k_flat, v_flat = write_kv(k_flat, v_flat, k, v, slots)
        page0 = i * (rows // meta.block_size)  # this layer's first page in the flat cache
        kw = dict(block_size=meta.block_size, pages_per_chunk=meta.pages_per_chunk,
                  backend=meta.attn_backend)  # fmt: skip

        def dec_view():
            qd = meta.dec_gather(q)[:, None]  # [S, 1, H, D]
            live = (meta.dec_len > 0).astype(jnp.int32)
            od = attend_rows(qd, live, meta.dec_len, meta.dec_table + page0, k_flat, v_flat,
                             **kw)  # fmt: skip
            return od[:, 0]

        def ch_view():
            qc = meta.ch_gather(q)
            return attend_rows(qc, meta.ch_len, meta.ch_ctx, meta.ch_table + page0, k_flat,
                               v_flat, **kw)  # fmt: skip

        heads = (self.cfg.num_heads, self.cfg.head_dim)
        (p, c), s = meta.ch_tok.shape, meta.dec_tok.shape[0]
        out = meta.scatter(meta.if_decode(dec_view, jax.ShapeDtypeStruct((s, *heads), q.dtype)),
                           meta.if_chunks(ch_view, jax.ShapeDtypeStruct((p, c, *heads), q.dtype)))
        (o,) = project(hook, i, out.reshape(t, self.cfg.q_size), {"o_proj": self.o_proj})
        return o, k_flat.reshape(shape), v_flat.reshape(shape)

    def dense(self, i: int, x, cos, sin, hook: LoraHook | None) -> jax.Array:
        """Causal attention within each row of x [B, T, hidden], no cache (training, scoring):
        static shapes and loops, so reverse mode runs through it."""
        b, t = x.shape[:2]
        q, k, v = self._qkv(i, x, cos, sin, hook)
        cfg = self.cfg
        g = cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim).astype(jnp.float32)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) / jnp.sqrt(
            jnp.float32(cfg.head_dim)
        )
        causal = jnp.tril(jnp.ones((t, t), bool))
        p = jax.nn.softmax(jnp.where(causal, s, NEG), axis=-1)
        out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32)).astype(x.dtype)
        (o,) = project(hook, i, out.reshape(b, t, cfg.q_size), {"o_proj": self.o_proj})
        return o


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, lead: tuple = ()):
        h, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=dtype, rngs=rngs, lead=lead)
        self.gate_proj = Linear(h, m, **kw)
        self.up_proj = Linear(h, m, **kw)
        self.down_proj = Linear(m, h, **kw)

    def __call__(self, i, x: jax.Array, hook: LoraHook | None) -> jax.Array:
        g, u = project(hook, i, x, {"gate_proj": self.gate_proj, "up_proj": self.up_proj})
        a = jax.nn.silu(g) * u
        (d,) = project(hook, i, a, {"down_proj": self.down_proj})
        return d


class DecoderLayer(nnx.Module):
    """One decoder layer; built with ``lead=(layers,)`` it holds every layer's parameters
    stacked, and ``at(i)`` is layer i."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, lead: tuple = ()):
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, dtype=dtype, lead=lead)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs, lead=lead)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, dtype=dtype, lead=lead)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, lead=lead)

    def __call__(self, i, h, cos, sin, k_cache, v_cache, meta, hook):
        a, k_cache, v_cache = self.self_attn(
            i, self.input_layernorm(h), cos, sin, k_cache, v_cache, meta, hook
        )
        h = h + a
        h = h + self.mlp(i, self.post_attention_layernorm(h), hook)
        return h, k_cache, v_cache

    def dense(self, i, h, cos, sin, hook):
        h = h + self.self_attn.dense(i, self.input_layernorm(h), cos, sin, hook)
        return h + self.mlp(i, self.post_attention_layernorm(h), hook)


class Llama(nnx.Module):
    """Decoder-only Llama. Parameter names follow HF's (`model.layers.{i}.self_attn.q_proj`)."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        init = nnx.initializers.normal(stddev=0.02)
        self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype))
        # every layer's parameters stacked on a leading axis ([layers, in, out] kernels): the
        # serving forward is one scan over them, so XLA compiles one layer body, not one per
        # layer (on a 30-layer model with LoRA hooks that was most of a step's compile time)
        self.layers = DecoderLayer(cfg, dtype=dtype, rngs=rngs, lead=(cfg.num_layers,))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def logits(
        self, h: jax.Array, hook: LoraHook | None = None, tok: jax.Array | None = None
    ) -> jax.Array:
        """Final norm and LM head on hidden states [..., hidden] -> float32 logits; with a
        hook that has LoRA on the LM head, h [R, hidden] are the flat tokens ``tok`` [R] of the
        step (whose rows say which adapter each takes)."""
        h = self.norm(h)
        if self.cfg.tie_word_embeddings:
            out = jnp.dot(h, self.embed_tokens[...].T)
        else:
            out = self.lm_head(h)
        out = out.astype(jnp.float32)
        if hook is not None and tok is not None and hasattr(hook, "head"):
            out = hook.head(h, tok, out)
        return out

    def __call__(
        self, tokens: jax.Array, cache: KVCache, meta: RaggedMeta, hook: LoraHook | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Hidden states [T, hidden] of a flat token batch (before the final norm)."""
        h = self.embed(tokens)
        if hook is not None and hasattr(hook, "embed"):  # LoRA on the embedding
            h = hook.embed(tokens, h)
        cos, sin = rope_cos_sin(self.cfg, meta.positions, h.dtype)
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, xs):
            h, k, v = carry
            i, params = xs
            h, k, v = nnx.merge(graphdef, params)(i, h, cos, sin, k, v, meta, hook)
            return (h, k, v), None

        layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        (h, k, v), _ = jax.lax.scan(body, (h, cache.k, cache.v), (layers, stacked))
        return h, KVCache(k=k, v=v)

    def dense(self, tokens: jax.Array, hook: LoraHook | None = None) -> jax.Array:
        """Hidden states [B, T, hidden] (before the final norm) of whole sequences [B, T] that
        start at position 0, with no KV cache: the differentiable forward for training and
        scoring. Rows are right-padded as needed (causal attention never looks ahead, so padding
        changes nothing before it). ``hook`` sees x as [B, T, in] (adapters.MultiLoraHook: an
        adapter slot per row)."""
        h = self.embed(tokens)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cos, sin = rope_cos_sin(self.cfg, pos, h.dtype)
        graphdef, stacked = nnx.split(self.layers)
        for i in range(self.cfg.num_layers):  # static layer indices: hooks may hold lists
            layer = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a, i=i: a[i], stacked))
            h = layer.dense(i, h, cos, sin, hook)
        return h
