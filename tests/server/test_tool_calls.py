"""Tool calling without a model: request checks, the prompt a template that ignores tools gets,
the parsers of the model's own formats, and the streamed deltas the openai SDK assembles."""

from __future__ import annotations

import json

import pytest

from cara_jax.embedded import default_model_path
from cara_jax.tokenizer import Tokenizer
from server.instance.tool_calls import (
    ToolStream,
    default_parser,
    history_calls,
    parse_output,
    parse_tools,
    render_messages,
)
from server.protocol import ApiError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"},
                           "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time"}}


def tools(**body):
    return parse_tools({"tools": [WEATHER, TIME], **body}, body.pop("parser", "hermes"))


def test_choices_and_their_grammars():
    assert parse_tools({}, "hermes") is None
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}, "hermes") is None
    auto = tools()
    assert auto.choice == "auto" and auto.grammar() is None
    named = tools(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    spec = named.grammar()
    assert named.forced and json.loads(spec.value) == WEATHER["function"]["parameters"]
    required = json.loads(tools(tool_choice="required", parallel_tool_calls=False).grammar().value)
    assert required["minItems"] == 1 and required["maxItems"] == 1
    names = [c["properties"]["name"]["const"] for c in required["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    # a function without parameters takes an empty object
    assert required["items"]["anyOf"][1]["properties"]["arguments"]["type"] == "object"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": {"x": 1}}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tools": [TIME, TIME]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)  # fmt: skip
def test_bad_tool_requests_name_their_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_tools(body, "hermes")
    assert e.value.status == 400 and e.value.param == param


def test_history_arguments_become_objects_and_bad_json_is_refused():
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]  # fmt: skip
    assert history_calls(calls, "messages[1]")[0]["function"]["arguments"] == {"tz": "UTC"}
    calls[0]["function"]["arguments"] = "{oops"
    with pytest.raises(ApiError):
        history_calls(calls, "messages[1]")


def test_a_template_without_tools_gets_them_in_hermes_form():
    tok = Tokenizer.from_path(default_model_path())
    assert "tools" not in tok.chat_template and default_parser(tok.chat_template) == "hermes"
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": history_calls(
            [{"id": "c1", "function": {"name": "get_weather",
                                       "arguments": '{"city": "Paris", "unit": "c"}'}}], "m")},
        {"role": "tool", "content": "18 C, sunny", "tool_call_id": "c1"},
    ]  # fmt: skip
    msgs, kwargs = render_messages(history, tools(), tok.chat_template)
    text = tok.apply_chat_template(msgs, **kwargs)
    assert kwargs == {}
    listing = msgs[0]["content"]
    assert msgs[0]["role"] == "system" and "- get_time()\n" in listing
    assert '- get_weather(city: string, unit: "c" | "f"): Weather in a city\n' in listing
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    # a template that reads tools gets them as variables, and the calls as they are
    template = "{{ tools | tojson }}{% for m in messages %}{{ m.tool_calls }}{% endfor %}"
    msgs, kwargs = render_messages(history, tools(), template)
    assert kwargs["tools"][0]["function"]["name"] == "get_weather" and msgs == history
    assert default_parser("<|python_tag|>{{ tools }}") == "llama3_json"


def test_parsers_take_calls_and_leave_the_rest():
    auto = tools()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo", "unit": "c"}}\n</tool_call>')  # fmt: skip
    content, calls = parse_output(text, auto)
    assert content == "Let me check."
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "c"}
    assert calls[0]["id"].startswith("call_")
    # an undeclared function or broken JSON is text
    for bad in ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                "<tool_call>{not json</tool_call>", "plain answer"]:  # fmt: skip
        assert parse_output(bad, auto) == (bad, [])
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 2
    assert len(parse_output(two, auto)[1]) == 2
    assert len(parse_output(two, tools(parallel_tool_calls=False))[1]) == 1
    llama = tools(parser="llama3_json")
    content, calls = parse_output('{"name": "get_time", "parameters": {"tz": "UTC"}}', llama)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}
    assert parse_output("The time is noon.", llama) == ("The time is noon.", [])
    required = tools(tool_choice="required")
    _, calls = parse_output('[{"name": "get_time", "arguments": {}}]', required)
    assert [c["function"]["name"] for c in calls] == ["get_time"]


def assemble(deltas: list[dict]) -> tuple[str, dict[int, dict]]:
    """What the openai SDK does with streamed deltas."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            fn = tc.get("function", {})
            slot["name"] += fn.get("name") or ""
            slot["arguments"] += fn.get("arguments") or ""
            if "id" in tc:
                slot["id"] = tc["id"]
    return content, calls


@pytest.mark.parametrize("split", [1, 3, 7])
def test_streams_hold_back_what_may_be_a_call(split):
    text = ('Checking.<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Rome", "unit": "f"}}\n</tool_call>')  # fmt: skip
    ts = ToolStream(tools())
    deltas = []
    for k in range(0, len(text), split):
        deltas += ts.feed(text[k : k + split])
    assert all("tool_calls" not in d and "<" not in d.get("content", "") for d in deltas)
    last, is_calls = ts.finish()
    content, calls = assemble(deltas + last)
    assert is_calls and content == "Checking."
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome", "unit": "f"}
    # a "<" that starts no call is content after all
    ts = ToolStream(tools())
    deltas = [d for k in range(0, 9, split) for d in ts.feed("a < b < c"[k : k + split])]
    last, is_calls = ts.finish()
    assert not is_calls and assemble(deltas + last)[0] == "a < b < c"


def test_a_named_call_streams_its_arguments():
    ts = ToolStream(tools(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    deltas = ts.feed('{"tz"') + ts.feed(': "UTC"}')
    last, is_calls = ts.finish()
    _, calls = assemble(deltas + last)
    assert is_calls and calls[0]["name"] == "get_time" and calls[0]["arguments"] == '{"tz": "UTC"}'


def test_chat_template_kwargs_reach_the_template():
    from server.instance.request_parsing import chat_prompt

    tok = Tokenizer.from_path(default_model_path())
    tok.chat_template = "{{ greeting }}{% for m in messages %}{{ m.content }}{% endfor %}"
    tok._template = None  # compiled again from the new text
    body = {"messages": [{"role": "user", "content": "there"}]}
    ids, tools = chat_prompt({**body, "chat_template_kwargs": {"greeting": "Hello "}}, tok)
    assert tools is None and tok.decode(ids) == "Hello there"
    assert tok.decode(chat_prompt(body, tok)[0]) == "there"
    for reserved in ("tokenize", "messages", "add_generation_prompt", "tools"):
        with pytest.raises(ApiError) as e:
            chat_prompt({**body, "chat_template_kwargs": {reserved: 1}}, tok)
        assert e.value.status == 400 and e.value.param == "chat_template_kwargs"


def test_required_moves_each_functions_defs_to_the_root():
    unit = {"enum": ["c", "f"]}
    a = {"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "$defs": {"U": unit}, "properties": {"u": {"$ref": "#/$defs/U"}}}}}
    b = {"type": "function", "function": {"name": "b", "parameters": {
        "type": "object", "definitions": {"U": {"type": "integer"}},
        "properties": {"u": {"$ref": "#/definitions/U"}}}}}  # fmt: skip
    schema = json.loads(parse_tools({"tools": [a, b], "tool_choice": "required"}, "hermes")
                        .grammar().value)  # fmt: skip
    assert schema["$defs"] == {"a.U": unit, "b.U": {"type": "integer"}}
    args = [c["properties"]["arguments"] for c in schema["items"]["anyOf"]]
    assert [x["properties"]["u"]["$ref"] for x in args] == ["#/$defs/a.U", "#/$defs/b.U"]
    assert all("$defs" not in x and "definitions" not in x for x in args)


def test_odd_schemas_and_llama3_semicolons():
    """A recursive or malformed parameters schema still gets a signature (no 500); a property
    named "definitions" survives the hoisting; a llama3 call whose arguments hold ";" parses."""
    from server.instance.tool_calls import _signature

    tree = {"name": "walk", "parameters": {
        "type": "object", "$defs": {"N": {"type": "array", "items": {"anyOf": [
            {"type": "integer"}, {"$ref": "#/$defs/N"}]}}},
        "properties": {"node": {"$ref": "#/$defs/N"}, "bad": {"enum": 3}}, "required": "node"}}  # fmt: skip
    assert _signature(tree) == "walk(node?: integer | N[], bad?: any)"
    named = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"definitions": {"type": "string"}},
        "required": ["definitions"]}}}  # fmt: skip
    schema = json.loads(parse_tools({"tools": [named], "tool_choice": "required"}, "hermes")
                        .grammar().value)  # fmt: skip
    assert schema["items"]["properties"]["arguments"]["properties"] == {
        "definitions": {"type": "string"}}
    sql = {"type": "function", "function": {"name": "sql"}}
    llama = parse_tools({"tools": [sql]}, "llama3_json")
    text = '{"name": "sql", "parameters": {"q": "SELECT 1; SELECT 2"}}; {"name": "sql", "parameters": {}}'
    content, calls = parse_output(text, llama)
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"q": "SELECT 1; SELECT 2"}, {}]
