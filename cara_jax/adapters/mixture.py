"""Adapters composed per request: one adapter at a scale, or a weighted mixture of several.

A request names entries ``[{"name": ..., "scale": ...}, ...]`` (llama.cpp's ``lora`` shape, by
name). Its delta on a projection is Σ wᵢ·Bᵢ·Aᵢ·x, every entry at its own rank: what PEFT's
``add_weighted_adapter(..., combination_type="cat")`` builds as a merged adapter, computed here
without merging anything. In the device pool a mixture is a slot whose table lists its members'
rank rows one after another, each with its weight (device_pool.acquire_mix), so the step runs
it as more rank rows of the same program and it batches with every other request.

The mixture's key (prefix cache, pool) is a hash of its members' contents and exact weights:
two requests share cached KV only when their deltas are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

MIX_PREFIX = "mix-"
# largest |scale| accepted: weights are float32 in the step, and a delta scaled further is noise
MAX_SCALE = 1000.0


class MixtureError(ValueError):
    """A malformed mixture (the message names what is wrong); ``param`` is the request field."""

    def __init__(self, message: str, param: str = "lora") -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class LoraRef:
    """One entry of a request's mixture: a registered adapter and its weight."""

    name: str
    scale: float = 1.0


def parse_mixture(spec: Any, max_entries: int) -> tuple[LoraRef, ...]:
    """Entries from what a caller passed: LoraRef, (name, scale) pairs, {"name", "scale"} dicts
    (scale defaults to 1). Raises MixtureError on anything else, an empty list, more than
    ``max_entries`` entries, a name given twice or a scale that is not a finite number."""
    if isinstance(spec, (str, bytes, Mapping)) or not isinstance(spec, Iterable):
        raise MixtureError('must be a list of {"name": ..., "scale": ...} entries')
    spec = list(spec)
    if len(spec) > max_entries:
        raise MixtureError(f"has {len(spec)} entries; this server takes at most {max_entries}")
    out: list[LoraRef] = []
    for i, item in enumerate(spec):
        if isinstance(item, LoraRef):
            name, scale = item.name, item.scale
        elif isinstance(item, Mapping):
            extra = set(item) - {"name", "scale", "id"}
            if extra:
                raise MixtureError(f"entry {i} has unknown fields {sorted(extra)}")
            if "id" in item and "name" not in item:
                raise MixtureError(f"entry {i}: adapters are named here (`name`), not numbered")
            name, scale = item.get("name"), item.get("scale", 1.0)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            name, scale = item
        else:
            raise MixtureError(f'entry {i} must be {{"name": ..., "scale": ...}}')
        if not isinstance(name, str) or not name:
            raise MixtureError(f"entry {i} needs an adapter `name`")
        try:
            ok = not isinstance(scale, bool) and isinstance(scale, numbers.Real)
            value = float(scale) if ok else math.nan
        except (OverflowError, TypeError, ValueError):
            value = math.nan
        if not abs(value) <= MAX_SCALE:
            raise MixtureError(f"entry {i} ({name!r}): `scale` must be a number in "
                               f"[-{MAX_SCALE:g}, {MAX_SCALE:g}]")  # fmt: skip
        out.append(LoraRef(name, value + 0.0))  # -0.0 -> 0.0: one key per delta
    if not out:
        raise MixtureError("names no adapter; leave it out for the base model")
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise MixtureError("names an adapter twice; give it one entry with the summed scale")
    return tuple(out)


def is_plain(refs: tuple[LoraRef, ...]) -> bool:
    """One entry at scale 1: the adapter itself, no mixture slot needed."""
    return len(refs) == 1 and refs[0].scale == 1.0


def merge_members(members: Iterable[tuple[str, str, float]]) -> tuple[tuple[str, str, float], ...]:
    """(name, content hash, weight) members in a canonical order (by content), one per content
    (two names of the same content: their weights summed), so that the same delta has one key
    and one slot whatever order or names a request used."""
    merged: dict[str, tuple[str, float]] = {}
    for name, h, w in members:
        first, total = merged.get(h, (name, 0.0))
        merged[h] = (first, total + w)
    return tuple((name, h, w + 0.0) for h, (name, w) in sorted(merged.items()))


def mixture_key(members: Iterable[tuple[str, float]]) -> str:
    """The key of a mixture of (content hash, weight) members (in merge_members' order): it
    changes with any member's content or weight (float repr: exact)."""
    text = ";".join(f"{h}:{float(w)!r}" for h, w in members)
    return MIX_PREFIX + hashlib.sha256(text.encode()).hexdigest()


def describe(refs: tuple[LoraRef, ...]) -> str:
    """A readable label: ``a*0.5+b*1.5`` (logs, errors)."""
    return "+".join(f"{r.name}*{r.scale:g}" for r in refs)
