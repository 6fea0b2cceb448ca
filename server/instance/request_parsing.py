"""OpenAI completions and chat requests parsed into ``GenerationRequest``s (server/protocol.py
has the errors they raise).

Field names and defaults follow OpenAI; vLLM's sampling extras (``top_k``, ``min_p``,
``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``) are accepted. Every refusal is an
``ApiError`` (400, with the offending ``param``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cara_jax.sampling_params import MAX_LOGPROBS, InvalidRequestError, SamplingParams
from cara_jax.tokenizer import ChatTemplateError, Tokenizer
from server.instance.field_policy import check_fields
from server.instance.structured_parsing import parse_structured
from server.instance.tool_calls import (
    ToolRequest,
    default_parser,
    history_calls,
    parse_tools,
    render_messages,
)
from server.protocol import bad

MAX_N = 16  # choices per request (n x prompts); more is refused rather than queued silently
MAX_PROMPTS = 64
SEED_MOD = 1 << 32  # the engine keys sampling with a 32-bit seed
_INT64 = 1 << 63


# ---------------------------------------------------------------------------- field readers

_MISSING = object()


def _field(body: dict, key: str, kinds: tuple, default: Any = None, what: str = "") -> Any:
    """``body[key]`` if it has one of ``kinds`` (null means the default), else a 400."""
    v = body.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    # bool is an int subclass: only accept it where bool is asked for
    if isinstance(v, bool) and bool not in kinds:
        raise bad(f"`{key}` must be {what or _kind_names(kinds)}, not a boolean", key)
    if not isinstance(v, kinds):
        raise bad(f"`{key}` must be {what or _kind_names(kinds)} (got {type(v).__name__})", key)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"`{key}` must be a finite number", key)
    return v


def _kind_names(kinds: tuple) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _num(body: dict, key: str, default: float | None) -> float | None:
    v = _field(body, key, (int, float), default)
    if v is None:
        return None
    try:
        return float(v)
    except OverflowError as e:  # a huge JSON integer
        raise bad(f"`{key}` is out of range", key) from e


def _int(body: dict, key: str, default: int | None) -> int | None:
    v = body.get(key)
    if isinstance(v, float) and v.is_integer():  # JSON clients sometimes send 16.0
        return int(v)
    return _field(body, key, (int,), default)


def _bool(body: dict, key: str, default: bool) -> bool:
    return _field(body, key, (bool,), default)


# ---------------------------------------------------------------------------- requests


@dataclasses.dataclass
class GenerationRequest:
    """A parsed completions or chat request: prompts as token ids, one SamplingParams each."""

    kind: str  # "completion" | "chat"
    model: str | None
    prompts: list[list[int]]
    prompt_texts: list[str]  # for echo
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    continuous_usage: bool = False  # usage (running counts) on every streamed chunk
    logprobs: int | None = None  # completions: top-k count; chat: top_logprobs when enabled
    tools: ToolRequest | None = None  # chat: the functions it may call, and how
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs (top k per prompt token)
    score_only: bool = False  # completions, echo with max_tokens 0: the prompt's log-probs only

    def choice_params(self, i: int) -> SamplingParams:
        """Choice i of a prompt: a distinct seed when seeded, so n samples differ."""
        if i == 0 or self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=(self.params.seed + i) % SEED_MOD)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    raise bad("`stop` must be a string or an array of strings", "stop")


def _prompt_logprobs(body: dict) -> int | None:
    k = _int(body, "prompt_logprobs", None)
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise bad(f"`prompt_logprobs` must be between 0 and {MAX_LOGPROBS}", "prompt_logprobs")
    return k


def _sampling(
    body: dict, tok_vocab: int, max_tokens: int, logprobs: int | None, scored: int | None = None
) -> SamplingParams:
    """``scored``: the top-k count of the prompt log-probs the request needs (None: none)."""
    seed = _int(body, "seed", None)
    if seed is not None:
        if not -_INT64 <= seed < _INT64:
            raise bad("`seed` must fit in 64 bits", "seed")
        seed %= SEED_MOD
    top_k = _int(body, "top_k", 0)
    if top_k is not None and top_k >= tok_vocab:
        top_k = 0  # keeping the whole vocabulary is no top-k at all
    stop_ids = _field(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise bad("`stop_token_ids` must be an array of integers", "stop_token_ids")
    bias = _logit_bias(body, tok_vocab)
    try:
        return SamplingParams(
            temperature=_num(body, "temperature", 1.0),
            top_p=_num(body, "top_p", 1.0),
            top_k=top_k,
            min_p=_num(body, "min_p", 0.0),
            presence_penalty=_num(body, "presence_penalty", 0.0),
            frequency_penalty=_num(body, "frequency_penalty", 0.0),
            repetition_penalty=_num(body, "repetition_penalty", 1.0),
            seed=seed,
            max_tokens=max_tokens,
            stop=_stop(body),
            stop_token_ids=tuple(t for t in stop_ids if 0 <= t < tok_vocab),
            ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=logprobs,
            tpot_slo=_num(body, "tpot_slo", None),
            structured=parse_structured(body),
            skip_special_tokens=_bool(body, "skip_special_tokens", True),
            include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
            min_tokens=_int(body, "min_tokens", 0) or 0,
            logit_bias=bias,
            prompt_logprobs=scored,
        )
    except InvalidRequestError as e:
        raise bad(f"`{e.param}`: {e}", e.param) from e


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    """OpenAI's ``{"token id": bias}`` with biases in [-100, 100]."""
    raw = _field(body, "logit_bias", (dict,), {})
    out = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise bad(f"`logit_bias` key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab:
            raise bad(f"`logit_bias` token {token} is not in the vocabulary (0..{vocab - 1})",
                      "logit_bias")  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            -100 <= value <= 100
        ):
            raise bad(f"`logit_bias` of token {token} must be a number in [-100, 100]",
                      "logit_bias")  # fmt: skip
        out[token] = float(value)
    return out


def _n(body: dict, prompts: int) -> int:
    n = _int(body, "n", 1)
    if n < 1:
        raise bad("`n` must be >= 1", "n")
    best_of = _int(body, "best_of", None)
    if best_of is not None and best_of != n:
        raise bad("`best_of` other than `n` is not supported", "best_of", code="unsupported")
    if n * prompts > MAX_N:
        raise bad(
            f"at most {MAX_N} choices per request (n x prompts = {n * prompts}); "
            "send several requests instead",
            "n",
        )
    return n


def _max_tokens(body: dict, keys: tuple[str, ...], default: int | None, room: int) -> int:
    """The budget of new tokens; over the context is refused as OpenAI and vLLM do."""
    for key in keys:
        v = _int(body, key, None)
        if v is not None:
            if v < 1:
                raise bad(f"`{key}` must be >= 1", key)
            if v > room:
                raise bad(
                    f"`{key}` = {v} does not fit: the prompt leaves room for {room} new tokens "
                    "in this model's context",
                    key,
                    code="context_length_exceeded",
                )
            return v
    return min(default, room) if default is not None else room


def _check_prompt(ids: list[int], max_len: int, vocab: int, param: str) -> None:
    if not ids:
        raise bad("the prompt is empty", param)
    if len(ids) >= max_len:
        raise bad(
            f"the prompt has {len(ids)} tokens; this model's context is {max_len} tokens and "
            "needs room for at least one new token",
            param,
            code="context_length_exceeded",
        )
    if any(not 0 <= t < vocab for t in ids):
        raise bad("a prompt token id is outside the vocabulary", param)


def _stream(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats: usage on every chunk, vLLM's)."""
    stream = _bool(body, "stream", False)
    opts = _field(body, "stream_options", (dict,), {})
    include = opts.get("include_usage", False)
    continuous = opts.get("continuous_usage_stats", False)
    if not isinstance(include, bool) or not isinstance(continuous, bool):
        raise bad("`stream_options.include_usage` and `continuous_usage_stats` must be booleans",
                  "stream_options")  # fmt: skip
    return stream, stream and include, stream and include and continuous


def parse_completion(body: dict, tok: Tokenizer, max_len: int, vocab: int) -> GenerationRequest:
    model = _field(body, "model", (str,), None)
    raw = body.get("prompt")
    if isinstance(raw, str):
        raw_prompts: list = [raw]
    elif (
        isinstance(raw, list)
        and raw
        and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)
    ):
        raw_prompts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, (str, list)) for p in raw):
        raw_prompts = raw
    else:
        raise bad("`prompt` must be a string, an array of strings, or token ids", "prompt")
    if len(raw_prompts) > MAX_PROMPTS:
        raise bad(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    prompts, texts = [], []
    for p in raw_prompts:
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=True)
            texts.append(p)
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
            texts.append("")
        else:
            raise bad("`prompt` token arrays must hold integers", "prompt")
        _check_prompt(ids, max_len, vocab, "prompt")
        prompts.append(ids)
    suffix = _field(body, "suffix", (str,), None)
    if suffix:
        raise bad("`suffix` is not supported", "suffix", code="unsupported")
    logprobs = _int(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad(f"`logprobs` must be between 0 and {MAX_LOGPROBS}", "logprobs")
    echo = _bool(body, "echo", False)
    if echo:
        texts = [t or tok.decode(ids) for t, ids in zip(texts, prompts, strict=True)]
    room = max_len - max(len(p) for p in prompts)
    # echo with max_tokens 0 scores the prompt only (lm-eval's loglikelihood requests): one
    # token is generated and left out of the answer
    score_only = echo and _int(body, "max_tokens", None) == 0
    max_tokens = 1 if score_only else _max_tokens(body, ("max_tokens",), 16, room)
    plp = _prompt_logprobs(body)
    scored = plp
    if echo and logprobs is not None:  # the echoed prompt's tokens carry log-probs too
        scored = max(logprobs, plp or 0)
    check_fields(body, "completion")
    stream, include_usage, continuous = _stream(body)
    _field(body, "user", (str,), None)
    return GenerationRequest(
        kind="completion",
        model=model,
        prompts=prompts,
        prompt_texts=texts,
        params=_sampling(body, vocab, max_tokens, logprobs, scored),
        n=_n(body, len(prompts)),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        echo=echo,
        logprobs=logprobs,
        prompt_logprobs=plp,
        score_only=score_only,
    )


_ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("`messages` must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"`{where}` must be an object", "messages")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"`{where}.role` must be one of {', '.join(_ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(
                        f"`{where}.content`: only text parts are supported",
                        "messages",
                        code="unsupported",
                    )
                if not isinstance(part.get("text"), str):
                    raise bad(f"`{where}.content`: a text part needs `text`", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad(f"`{where}.content` must be a string or an array of parts", "messages")
        msg = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if m.get("tool_calls"):
            if role != "assistant":
                raise bad(f"`{where}.tool_calls`: only assistant messages call tools", "messages")
            msg["tool_calls"] = history_calls(m["tool_calls"], where)
        if role == "tool":
            tid = m.get("tool_call_id")
            if tid is not None and not isinstance(tid, str):
                raise bad(f"`{where}.tool_call_id` must be a string", "messages")
            msg["tool_call_id"] = tid
        out.append(msg)
    return out


def _template_kwargs(body: dict) -> dict:
    kw = _field(body, "chat_template_kwargs", (dict,), {})
    reserved = sorted({"messages", "add_generation_prompt", "tools", "tokenize"} & set(kw))
    if reserved:
        raise bad(f"`chat_template_kwargs` cannot set {reserved[0]!r}", "chat_template_kwargs")
    return kw


def chat_prompt(
    body: dict, tok: Tokenizer, tool_parser: str | None = None
) -> tuple[list[int], ToolRequest | None]:
    """The prompt's token ids as the chat template renders ``messages`` (with the tools, and
    ``chat_template_kwargs``), and the request's tools; /tokenize renders the same."""
    tools = parse_tools(body, tool_parser or default_parser(tok.chat_template))
    messages, variables = render_messages(chat_messages(body), tools, tok.chat_template)
    variables.update(_template_kwargs(body))
    add_gen = _bool(body, "add_generation_prompt", True)
    try:
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=add_gen, tokenize=True, **variables
        )
    except ChatTemplateError as e:
        raise bad(f"the chat template cannot render these messages: {e}", "messages") from e
    return ids, tools


def parse_chat(
    body: dict, tok: Tokenizer, max_len: int, vocab: int, tool_parser: str | None = None
) -> GenerationRequest:
    model = _field(body, "model", (str,), None)
    ids, tools = chat_prompt(body, tok, tool_parser)
    _check_prompt(ids, max_len, vocab, "messages")
    logprobs = None
    if _bool(body, "logprobs", False):
        logprobs = _int(body, "top_logprobs", 0)
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise bad(f"`top_logprobs` must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
    elif _int(body, "top_logprobs", None):
        raise bad("`top_logprobs` needs `logprobs`: true", "top_logprobs")
    max_tokens = _max_tokens(
        body, ("max_completion_tokens", "max_tokens"), None, max_len - len(ids)
    )
    check_fields(body, "chat")
    stream, include_usage, continuous = _stream(body)
    _field(body, "user", (str,), None)
    plp = _prompt_logprobs(body)
    if plp is not None and _bool(body, "stream", False):
        raise bad("`prompt_logprobs` is served on chat answers that are not streamed",
                  "prompt_logprobs", code="unsupported")  # fmt: skip
    params = _sampling(body, vocab, max_tokens, logprobs, plp)
    if tools is not None and tools.forced:
        if params.structured is not None:
            raise bad(f"`tool_choice` {tools.choice} and `{params.structured.param}` both "
                      "constrain the output; send one", "tool_choice")  # fmt: skip
        params = dataclasses.replace(params, structured=tools.grammar())
    if tools is not None and tools.parser == "hermes" and tok.is_token("<tool_call>"):
        # the model writes its call tags as tokens that may be special: keep them in the text
        # the parser reads (as vLLM's hermes parser does)
        params = dataclasses.replace(params, skip_special_tokens=False)
    return GenerationRequest(
        kind="chat",
        model=model,
        prompts=[ids],
        prompt_texts=[""],
        params=params,
        tools=tools,
        prompt_logprobs=plp,
        n=_n(body, 1),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        logprobs=logprobs,
    )
