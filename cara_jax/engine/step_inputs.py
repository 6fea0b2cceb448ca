"""A step's inputs on the host (numpy arrays the runner fills from a batch) and their copy to
the device. Per-row inputs that most steps do not use (a grammar's token mask, a logit bias)
start as shared read-only defaults; a step with such a row copies them once, and a step with
none sends the device's cached default instead of a new array.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cara_jax.engine.step import StepInputs
from cara_jax.ragged import RaggedMeta
from cara_jax.sampling_params import MAX_LOGIT_BIAS


@dataclasses.dataclass
class HostInputs:
    meta: dict[str, np.ndarray]
    inp: dict[str, np.ndarray]

    def device(self, logprobs: bool, config) -> StepInputs:
        """The step's inputs on the device (``config``: the runner's RunnerConfig)."""
        meta = RaggedMeta(
            **{k: jnp.asarray(v) for k, v in self.meta.items()},
            block_size=config.block_size,
            pages_per_chunk=config.pages_per_chunk,
            attn_backend=config.attention_backend,
        )
        shared = {"allowed": "constrained", "bias_ids": "biased", "bias_vals": "biased"}
        arrays = {k: jnp.asarray(v) for k, v in self.inp.items() if k not in shared}
        for k, flag in shared.items():
            v = self.inp[k]
            if self.inp[flag]:
                arrays[k] = jnp.asarray(v)
            else:  # unused this step: the device keeps one default array per shape
                key = (k, v.shape)
                arrays[k] = _DEFAULTS.get(key)
                if arrays[k] is None:
                    arrays[k] = _DEFAULTS.setdefault(key, jnp.asarray(v))
        return StepInputs(meta=meta, want_logprobs=jnp.asarray(logprobs), **arrays)


_DEFAULTS: dict[tuple, jax.Array] = {}  # (input, shape) -> all-tokens mask / no bias
_ALL_TOKENS_HOST: dict[int, np.ndarray] = {}
_NO_BIAS_HOST: dict[tuple, np.ndarray] = {}


def all_tokens(rows: int, vocab: int) -> np.ndarray:
    """The bitmask that allows every token (rows without a grammar): one read-only array
    per row count, copied only by a step that has a constrained row."""
    mask = _ALL_TOKENS_HOST.get(rows)
    if mask is None or mask.shape[1] != -(-vocab // 32):
        mask = np.full((rows, -(-vocab // 32)), 0xFFFFFFFF, np.uint32)
        mask.flags.writeable = False
        _ALL_TOKENS_HOST[rows] = mask
    return mask


def no_bias(rows: int, dtype) -> np.ndarray:
    """Zero (token, bias) slots of every row: read-only, shared, copied by a biased step."""
    key = (rows, np.dtype(dtype).str)
    a = _NO_BIAS_HOST.get(key)
    if a is None:
        a = np.zeros((rows, MAX_LOGIT_BIAS), dtype)
        a.flags.writeable = False
        _NO_BIAS_HOST[key] = a
    return a


def bias_row(x: dict[str, np.ndarray], row: int, bias: tuple[tuple[int, float], ...]) -> None:
    """Put one sampling row's logit bias into the step's inputs (padding adds 0 to token 0)."""
    if not x["biased"]:
        x["bias_ids"], x["bias_vals"] = x["bias_ids"].copy(), x["bias_vals"].copy()
        x["biased"][()] = True
    ids, vals = zip(*bias, strict=True)
    x["bias_ids"][row, : len(ids)] = ids
    x["bias_vals"][row, : len(vals)] = vals


def constrain_row(x: dict[str, np.ndarray], row: int, allowed: np.ndarray) -> None:
    """Put one sampling row's grammar mask into the step's inputs (the first such row of a
    step copies the shared all-tokens mask)."""
    if not x["constrained"]:
        x["allowed"] = x["allowed"].copy()
        x["constrained"][()] = True
    x["allowed"][row] = allowed


def shape_row(x: dict[str, np.ndarray], row: int, allowed: np.ndarray | None, bias) -> None:
    """A sampling row's grammar mask and logit bias, when it has them."""
    if allowed is not None:
        constrain_row(x, row, allowed)
    if bias:
        bias_row(x, row, bias)
