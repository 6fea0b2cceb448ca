"""Per-request sampling parameters (OpenAI/vLLM field names), validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any


class InvalidRequestError(ValueError):
    """A request field is out of range or unsupported; the message names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries per request (the step holds this many per sampling row)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop. Defaults follow vLLM (temperature 1, 16 tokens)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # 0 = off
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides (multiplies if negative) logits of seen tokens
    seed: int | None = None  # None: a fresh seed per request
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: off; k: the chosen token's log-prob plus the top k
    # scheduling, not sampling: this request's time-per-output-token SLO in seconds (None: the
    # engine's default). Rank-aware admission keeps every running request inside its SLO.
    tpot_slo: float | None = None
    # what the output must match (structured.py's GrammarSpec: a JSON schema, any JSON object,
    # a regex, a choice, a Lark grammar); None: free text
    structured: Any = None
    skip_special_tokens: bool = True  # leave special tokens (e.g. <|im_end|>) out of the text
    min_tokens: int = 0  # no EOS, stop token or stop string before this many output tokens
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias);
    # a dict {token id: bias} is accepted too
    logit_bias: tuple[tuple[int, float], ...] = ()
    # log-probs of the prompt's tokens (each given those before it) plus the top k; None: off.
    # Such a request prefills its whole prompt (no prefix-cache hit: every position is scored)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (or -1 for off)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (0 < self.repetition_penalty <= 10, "repetition_penalty", "must be in (0, 10]"),
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                "logprobs",
                f"must be between 0 and {MAX_LOGPROBS}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                "prompt_logprobs",
                f"must be between 0 and {MAX_LOGPROBS}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (len(self.stop) <= 16, "stop", "at most 16 stop strings"),
            (self.n == 1, "n", "only n=1 is supported; send several requests instead"),
            (self.tpot_slo is None or self.tpot_slo > 0, "tpot_slo", "must be > 0 seconds"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
             f"at most {MAX_LOGIT_BIAS} tokens"),
            (len({t for t, _ in self.logit_bias}) == len(self.logit_bias), "logit_bias",
             "names a token twice"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias), "logit_bias",
             "needs token ids >= 0 and biases in [-100, 100]"),
        ]
        for ok, field, why in checks:
            if not ok:
                raise InvalidRequestError(f"{field} {why} (got {getattr(self, field)!r})", field)
