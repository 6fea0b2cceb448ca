"""LoRA on the token embedding and the LM head, as PEFT saves it: parsed and validated here,
beside the decoder-layer projections that peft.py reads.

PEFT's embedding LoRA keeps ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [hidden, r]
and adds ``embedding(token, A^T) · B^T · scaling`` to a token's embedding; the LM head takes an
ordinary linear LoRA (``lora_A`` [r, hidden], ``lora_B`` [vocab, r]). Both are kept as the
projections are, A as [in, r] and B as [r, out] with the scaling folded in: ``embed_tokens``
with in = vocab (a token selects a row of A), ``lm_head`` with out = vocab.

PEFT also saves the base weights of these modules (``base_layer.weight``) and, when it loads the
adapter, writes them over the model's own. An adapter served on one shared base must carry the
base's own weights there: a different vocabulary size (new tokens) is refused at once, and the
row sums of what it carries are kept (``VocabModules.base_sums``) for the device pool to compare
with the base model's at registration (adapters/vocab_pool.py).

Tied embeddings follow PEFT: without ``ensure_weight_tying`` the embedding's and the head's
LoRA are separate modules (a LoRA on embed_tokens does not change the logits); with it (on a
model whose head is its embedding) PEFT ties the head's LoRA to the embedding's and saves it
under lm_head, where it is read like any head LoRA.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from cara_jax.adapters.peft_config import (
    NEW_TOKENS,
    VOCAB_MODULES,
    AdapterWeightsError,
    UnsupportedAdapterError,
    module_scaling,
    scaled_b,
)
from cara_jax.config import ModelConfig

_VOCAB_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<mod>model\.embed_tokens|lm_head)\."
    r"(?P<what>lora_embedding_A|lora_embedding_B|lora_A|lora_B|base_layer)(?:\.[^.]+)?$"
)
# what each module's tensors are called in PEFT's file
_NAMES = {"embed_tokens": ("lora_embedding_A", "lora_embedding_B"), "lm_head": ("lora_A", "lora_B")}


@dataclasses.dataclass(frozen=True)
class VocabModules:
    """An adapter's LoRA outside the decoder layers: kind ("embed_tokens" | "lm_head") -> (A
    [in, r], B [r, out] scaled); and the row sums [vocab] of the base weights it carries."""

    modules: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    base_sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def is_vocab_key(key: str) -> bool:
    return _VOCAB_KEY_RE.match(key.removesuffix(".weight")) is not None


def vocab_targets(conf: dict[str, Any], targeted: list[str], cfg: ModelConfig) -> list[str]:
    """The kinds this adapter's config puts LoRA on (PEFT's tied head included)."""
    kinds = [VOCAB_MODULES[n] for n in targeted if n in VOCAB_MODULES]
    if (conf.get("ensure_weight_tying") and cfg.tie_word_embeddings and "embed_tokens" in kinds
            and "lm_head" not in kinds):  # fmt: skip
        kinds.append("lm_head")  # PEFT ties the head's LoRA to the embedding's
    return kinds


def read_vocab_modules(
    conf: dict[str, Any],
    cfg: ModelConfig,
    tensors: dict[str, tuple[str, np.ndarray]],
    kinds: list[str],
    as_float32,
    finite,
    h,
) -> VocabModules:
    """Parse the embedding / LM-head tensors of ``tensors`` (key -> (dtype tag, raw array)) for
    the targeted ``kinds``; ``h`` (a hashlib object) takes what changes outputs."""
    found: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, item in tensors.items():
        m = _VOCAB_KEY_RE.match(key.removesuffix(".weight"))
        if m is None:
            continue
        kind = VOCAB_MODULES[m.group("mod")]
        slot = found.setdefault(kind, {})
        if m.group("what") in slot:
            raise AdapterWeightsError(f"{key}: {m.group('what')} of {kind} appears twice")
        slot[m.group("what")] = item
    out = VocabModules()
    v, hid = cfg.vocab_size, cfg.hidden_size
    for kind, have in found.items():
        extra = set(have) - {"base_layer", *_NAMES[kind]}
        if extra:
            raise UnsupportedAdapterError(f"{kind}: unexpected tensors {sorted(extra)}")
        base = have.pop("base_layer", None)
        if base is not None:
            tag, raw = base
            if raw.shape != (v, hid):
                raise UnsupportedAdapterError(
                    f"the adapter's {kind} has {raw.shape[0]} tokens of width {raw.shape[-1]}, "
                    f"the base model's {v} of {hid}: it {NEW_TOKENS}"
                )
            out.base_sums[kind] = np.sum(as_float32(tag, raw), axis=1, dtype=np.float64)
        if have and kind not in kinds:
            raise AdapterWeightsError(f"LoRA weights for {kind}, which the config does not target")
    for kind in kinds:
        name = next(n for n, k in VOCAB_MODULES.items() if k == kind)
        an, bn = _NAMES[kind]
        have = found.get(kind, {})
        missing = [x for x in (an, bn) if x not in have]
        if missing:
            raise AdapterWeightsError(f"{name}: {' and '.join(missing)} weights missing")
        (tag_a, raw_a), (tag_b, raw_b) = have[an], have[bn]
        din, dout = (v, hid) if kind == "embed_tokens" else (hid, v)
        scaling = module_scaling(conf, name, have[an], have[bn], din, dout, (an, bn), kind, finite)
        b = scaled_b(as_float32(tag_b, raw_b), scaling)
        out.modules[kind] = (np.ascontiguousarray(as_float32(tag_a, raw_a).T), b)
        h.update(f"{kind}|{float(scaling).hex()}|{tag_a}{raw_a.shape}|{tag_b}{raw_b.shape}|".encode())
        h.update(raw_a)
        h.update(raw_b)
    return out
