"""Structured outputs through the official openai client against a real server (SmolLM2, two
demo adapters): every constrained answer that says it is done validates; a grammar that cannot
be met in ``max_tokens`` ends with ``length``; bad constraints are 400s; a constrained request
beside unconstrained ones leaves their greedy text unchanged."""

from __future__ import annotations

import enum
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import openai
import pydantic
import pytest

from tests.server_helpers import assert_error, post, start_server

srv = pytest.fixture(scope="module")(start_server)
QUESTION = [{"role": "user", "content": "Describe a pet as JSON."}]


class Kind(str, enum.Enum):
    cat = "cat"
    dog = "dog"
    fish = "fish"


class Owner(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    phone: str | None = pydantic.Field(default=None, pattern=r"^\d{3}-\d{4}$")


class Pet(pydantic.BaseModel):
    kind: Kind
    age: int = pydantic.Field(ge=0, le=30)
    tags: list[Annotated[str, pydantic.Field(max_length=8)]] = pydantic.Field(max_length=2)
    owner: Owner


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.mark.parametrize("model", ["base", "demo-0", "demo-1"])
def test_parse_a_nested_pydantic_model_on_base_and_adapters(srv, model):
    name = srv.base if model == "base" else model
    r = client(srv).chat.completions.parse(
        model=name, messages=QUESTION, response_format=Pet, max_tokens=88, temperature=0
    )
    choice = r.choices[0]
    if choice.finish_reason == "length":  # cut by max_tokens: not called done, not parsed
        pytest.fail(f"{model}: the grammar did not finish in 88 tokens: {choice.message.content!r}")
    assert choice.finish_reason == "stop"
    pet = choice.message.parsed
    assert isinstance(pet, Pet), choice.message.content
    assert Pet.model_validate_json(choice.message.content) == pet


def test_json_schema_pattern_and_length_cut(srv):
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}}
    c = client(srv)
    r = c.chat.completions.create(model=srv.base, messages=QUESTION, response_format=fmt,
                                  max_tokens=40, temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", json.loads(r.choices[0].message.content)["code"])
    # two tokens cannot hold the object: cut, and said so (never invalid JSON called done)
    r = c.chat.completions.create(model=srv.base, messages=QUESTION, response_format=fmt,
                                  max_tokens=2, temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason == "length"


def test_structured_outputs_choice_regex_and_json_object_streamed(srv):
    c = client(srv)
    r = c.completions.create(model="demo-0", prompt="Is the sky blue? Answer:", max_tokens=8,
                             temperature=0,
                             extra_body={"structured_outputs": {"choice": ["yes", "no"]}})  # fmt: skip
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=srv.base, prompt="Call me at", max_tokens=12,
                             temperature=0,
                             extra_body={"guided_regex": r" \d{3}-\d{4}"})  # fmt: skip
    assert re.fullmatch(r" \d{3}-\d{4}", r.choices[0].text), r.choices[0].text
    stream = c.chat.completions.create(
        model="demo-1", messages=QUESTION, max_tokens=32, temperature=0, stream=True,
        response_format={"type": "json_object"},
    )  # fmt: skip
    text, reason = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert reason == "length"


def test_bad_constraints_are_400(srv):
    url = srv.url + "/v1/chat/completions"
    base = {"model": srv.base, "messages": QUESTION, "max_tokens": 4}
    for extra, param in [
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
         "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, None),
        ({"structured_outputs": {"json": {}, "unknown_key": 1}}, "structured_outputs"),
    ]:  # fmt: skip
        status, _, body = post(url, {**base, **extra})
        assert status == 400, (extra, body)
        assert_error(body)
        if param:
            assert body["error"]["param"] == param, body


def test_a_constrained_row_leaves_the_others_unchanged(srv):
    """Greedy text of plain requests is the same alone and beside constrained ones."""
    c = client(srv)

    def plain(prompt):
        return c.completions.create(model="demo-1", prompt=prompt, max_tokens=16,
                                    temperature=0).choices[0].text  # fmt: skip

    def constrained(_):
        return c.chat.completions.parse(model="demo-0", messages=QUESTION, response_format=Pet,
                                        max_tokens=88, temperature=0)  # fmt: skip

    prompts = ["Once upon a time", "The capital of France is"]
    alone = [plain(p) for p in prompts]
    with ThreadPoolExecutor(4) as ex:
        cons = [ex.submit(constrained, i) for i in range(2)]
        mixed = list(ex.map(plain, prompts))
        for f in cons:
            assert isinstance(f.result().choices[0].message.parsed, Pet)
    assert mixed == alone


# ---------------------------------------------------------------------------- tool calling


class Unit(str, enum.Enum):
    c = "c"
    f = "f"


class GetWeather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=16)
    unit: Unit


class GetTime(pydantic.BaseModel):
    timezone: str = pydantic.Field(pattern=r"^[A-Z]{3}$")


WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris, and the time in UTC?"}]
# the test server's context is 128 tokens and the tools take about half of it, so these
# requests leave max_tokens at its default (the rest of the context)


def _tools() -> list[dict]:
    return [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]


def _valid(call) -> pydantic.BaseModel:
    model = {"GetWeather": GetWeather, "GetTime": GetTime}[call.function.name]
    return model.model_validate_json(call.function.arguments)


@pytest.mark.parametrize("model", ["base", "demo-0"])
def test_tool_choice_required_gives_calls_valid_against_the_schema(srv, model):
    name = srv.base if model == "base" else model
    r = client(srv).chat.completions.parse(
        model=name, messages=WEATHER_Q, tools=_tools(), tool_choice="required", temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls and choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert _valid(call) == call.function.parsed_arguments  # the SDK's own parse agrees
    if model != "base":
        return  # streaming and parallel_tool_calls are the same code on every model
    # streamed: the same calls, assembled from the deltas as the SDK does
    calls, reason = {}, None
    for chunk in client(srv).chat.completions.create(
        model=name, messages=WEATHER_Q, tools=_tools(), tool_choice="required", temperature=0,
        stream=True,
    ):  # fmt: skip
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(tc.index, ["", ""])
            slot[0] += tc.function.name or ""
            slot[1] += tc.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    assert reason == "tool_calls"
    assert [tuple(calls[k]) for k in sorted(calls)] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    # one call at most without parallel calls
    r = client(srv).chat.completions.create(
        model=name, messages=WEATHER_Q, tools=_tools(), tool_choice="required", temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(r.choices[0].message.tool_calls) == 1


def test_named_tool_choice_streamed_and_not_with_a_tool_history(srv):
    c = client(srv)
    named = {"type": "function", "function": {"name": "GetTime"}}
    r = c.chat.completions.create(model="demo-1", messages=WEATHER_Q, tools=_tools(),
                                  tool_choice=named, temperature=0)  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "GetTime"
    _valid(call)
    stream = c.chat.completions.create(model="demo-1", messages=WEATHER_Q, tools=_tools(),
                                       tool_choice=named, temperature=0,
                                       stream=True)  # fmt: skip
    args, names, reason = "", set(), None
    for chunk in stream:
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            if tc.function.name:
                names.add(tc.function.name)
            args += tc.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    assert names == {"GetTime"} and reason == "tool_calls"
    assert args == call.function.arguments  # greedy: the same arguments, streamed in pieces
    # the call and its result go back into the conversation
    history = [{"role": "user", "content": "Time in UTC?"}] + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
    ]
    r = c.chat.completions.create(model="demo-1", messages=history, temperature=0,
                                  tools=[openai.pydantic_function_tool(GetTime)])  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for call in r.choices[0].message.tool_calls or []:
        assert call.function.name in ("GetWeather", "GetTime")
        json.loads(call.function.arguments)
    if not r.choices[0].message.tool_calls:
        assert isinstance(r.choices[0].message.content, str)


@pytest.mark.slow  # SmolLM2's own choice, streamed and not: the parsers are unit-tested
def test_auto_answers_are_text_or_well_formed_calls(srv):
    """What SmolLM2 does with tools is its own choice; what the server makes of it must parse."""
    c = client(srv)
    for stream in (False, True):
        r = c.chat.completions.create(model=srv.base, messages=WEATHER_Q, tools=_tools(),
                                      temperature=0, stream=stream, max_tokens=24)  # fmt: skip
        if stream:
            content, calls, reason = "", {}, None
            for chunk in r:
                if not chunk.choices:
                    continue
                d = chunk.choices[0].delta
                content += d.content or ""
                for tc in d.tool_calls or []:
                    slot = calls.setdefault(tc.index, ["", ""])
                    slot[0] += tc.function.name or ""
                    slot[1] += tc.function.arguments or ""
                reason = chunk.choices[0].finish_reason or reason
            got = (content, sorted(calls.values()), reason)
        else:
            m = r.choices[0].message
            got = (m.content or "", sorted([t.function.name, t.function.arguments]
                                           for t in m.tool_calls or []),  # fmt: skip
                   r.choices[0].finish_reason)
            plain = got
        for name, args in got[1]:
            assert name in ("GetWeather", "GetTime") and isinstance(json.loads(args), dict)
        assert (got[2] == "tool_calls") == bool(got[1])
        assert "<tool_call>" not in got[0] or not got[1]
    # streamed or not: the same content and calls (ids aside)
    assert got[0].strip() == plain[0].strip() and got[1] == plain[1]


def test_bad_tool_requests_are_400(srv):
    url = srv.url + "/v1/chat/completions"
    base = {"model": srv.base, "messages": WEATHER_Q, "max_tokens": 4, "tools": _tools()}
    bad_history = WEATHER_Q + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "GetTime", "arguments": "{no"}}]}]
    for extra, param in [
        ({"tool_choice": {"type": "function", "function": {"name": "Nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        ({"messages": bad_history}, "messages"),
        ({"parallel_tool_calls": 1}, "parallel_tool_calls"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ]:  # fmt: skip
        status, _, body = post(url, {**base, **extra})
        assert status == 400, (extra, body)
        assert_error(body)
        assert body["error"]["param"] == param, body
