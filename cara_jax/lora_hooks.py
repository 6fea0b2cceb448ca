"""The LoRA hook points of the model: the interface later layers (adapters, CPU assist) fill.

Every linear projection of a decoder layer (q, k, v, o, gate, up, down) calls

    y = x @ W  +  hook.delta(layer, proj, x)          # delta is None when nothing applies

or, for a hook that needs the base output too (DoRA rescales it), ``y = hook.output(layer,
proj, x, x @ W)``.

inside the jitted forward. ``layer`` is the layer's index: a traced int32 in the serving
forward (one ``lax.scan`` over the layers; index arrays with it, never branch on it), a Python
int in the dense one. ``x`` is the step's flat token batch [T, in] (decode tokens and
prefill chunks of any sequences, ragged.py) and the delta, when present, is [T, out] in x's
dtype. A hook is a JAX pytree (its arrays are traced
arguments of the jitted step; its static fields are part of the compile key), so one compiled
step serves every mix of adapters with the same static shapes.

Who fills it:
- the multi-LoRA device path (RaggedLoraHook): per-row adapter slots gathering A/B from the
  device pool (BGMV / MBGMV for the decode view, one adapter per chunk row for prefill chunks);
- CPU-assisted prefill (CpuAssistHook): deltas computed by CPU workers for cold chunk rows,
  through host callbacks around each projection group;
- ``None``: no LoRA at all; the compiled step then has no LoRA ops.

The engine's hooks (RaggedLoraHook, CpuAssistHook) define ``output`` instead of ``delta``: DoRA
rescales the projection's whole output, so they take y. Hooks leave untouched the projections
they do not adapt (``delta`` returns ``None``, ``output`` returns y), so a q/v-only adapter pays nothing for
the others.

Projections that share an input (q/k/v; gate/up) run as a group through ``project``. A hook may
also define ``after(layer, projs, x, ys) -> ys``: CPU assist uses it to add the deltas the CPU
computed for the group's cold rows. Outside the layers, a hook may define ``embed(tokens, h) ->
h`` (LoRA on the token embedding) and ``head(x, tok, logits) -> logits`` (on the LM head, for
the flat tokens ``tok`` whose normed hidden states are x); the model calls them when present.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import jax

from cara_jax.config import GROUPS, PROJECTIONS  # noqa: F401  (re-exported: hooks name them)


def group_index(projs: tuple[str, ...]) -> int:
    """Index in GROUPS of the group holding ``projs``."""
    for i, g in enumerate(GROUPS):
        if projs[0] in g:
            return i
    raise ValueError(f"no projection group holds {projs}")


@runtime_checkable
class LoraHook(Protocol):
    """Supplies additive LoRA deltas for some rows of a batch (the dense path's hooks; the
    engine step's hooks define ``output(layer, proj, x, y) -> y`` instead, see above)."""

    def delta(self, layer: int, proj: str, x: jax.Array) -> jax.Array | None:
        """Delta for projection ``proj`` of decoder layer ``layer`` given its input ``x``."""
        ...


def apply_hook(
    hook: LoraHook | None, layer: int, proj: str, x: jax.Array, y: jax.Array
) -> jax.Array:
    """y plus the hook's delta for this projection (y unchanged when there is none), or what
    the hook's ``output`` makes of y."""
    if hook is None:
        return y
    output = getattr(hook, "output", None)
    if output is not None:
        return output(layer, proj, x, y)
    d = hook.delta(layer, proj, x)
    return y if d is None else y + d.astype(y.dtype)


def project(
    hook: LoraHook | None,
    layer: int,
    x: jax.Array,
    linears: dict[str, Callable[[jax.Array], jax.Array]],
) -> list[jax.Array]:
    """The projections of ``linears`` (which share input x), each plus its LoRA delta."""
    if hook is None:
        return [f(x) for f in linears.values()]
    projs = tuple(linears)
    ys = [apply_hook(hook, layer, p, x, f(x)) for p, f in linears.items()]
    after = getattr(hook, "after", None)
    return after(layer, projs, x, ys) if after is not None else ys
