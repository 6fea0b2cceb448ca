"""Tool calling on /v1/chat/completions: OpenAI's ``tools``, ``tool_choice`` and
``parallel_tool_calls``, tool calls and results in the history, and ``tool_calls`` in answers.

- ``required`` and a named function are enforced by the grammar engine: the model can only
  write JSON that names a declared function with arguments valid against its ``parameters``
  (a named call writes the arguments object itself, so its stream is the arguments' text).
- ``auto`` lets the model choose and parses its own format, as vLLM's ``--tool-call-parser``
  does: ``hermes`` (``<tool_call>{"name": .., "arguments": ..}</tool_call>`` blocks, Qwen,
  Hermes, SmolLM3 and most ChatML models) or ``llama3_json`` (the answer is one JSON object,
  or several joined by ``;``, with ``name`` and ``parameters``/``arguments``). Text that does
  not parse as a call stays content.
- ``none`` answers in text and leaves the tools out of the prompt.

The chat template receives ``tools`` and the history's ``tool_calls`` (arguments as objects,
as transformers passes them). A template that ignores them (SmolLM2's) would drop them
silently, so for such a template the server writes them into the conversation itself, in the
hermes format its parser reads: the tools in the system message (a short signature each),
earlier calls as ``<tool_call>`` blocks, results as ``<tool_response>`` blocks.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from cara_jax.structured import GrammarSpec
from server.protocol import bad

PARSERS = ("hermes", "llama3_json")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def default_parser(template: str | None) -> str:
    """The parser for the model's own call format: Llama 3's JSON where its template has
    Llama 3's tool role, hermes otherwise (and for templates that do not read tools: the
    server then writes the hermes format into the prompt itself)."""
    if template and ("<|python_tag|>" in template or "ipython" in template):
        return "llama3_json"
    return "hermes"


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools and how it may call them."""

    tools: tuple[dict, ...]  # {"name", "description", "parameters"} per function
    choice: str  # auto | required | named
    name: str | None = None  # the named function
    parallel: bool = True
    parser: str = "hermes"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def grammar(self) -> GrammarSpec | None:
        """The constraint of a forced call (None for ``auto``)."""
        if self.choice == "named":
            fn = next(t for t in self.tools if t["name"] == self.name)
            return GrammarSpec.json_schema(fn["parameters"], "tool_choice")
        if self.choice != "required":
            return None
        calls, defs = [], {}
        for t in self.tools:  # each function's $defs move to the root, under its name
            params = _hoist(t["parameters"], t["name"], defs)
            calls.append({"type": "object",
                          "properties": {"name": {"const": t["name"]}, "arguments": params},
                          "required": ["name", "arguments"], "additionalProperties": False})  # fmt: skip
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}  # fmt: skip
        if not self.parallel:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return GrammarSpec.json_schema(schema, "tool_choice")


def _hoist(schema: Any, owner: str, defs: dict) -> Any:
    """``schema`` with its ``$defs``/``definitions`` moved into ``defs`` as ``owner.name`` and
    its local references pointed there (the schema is nested in a larger one, whose root the
    references would otherwise miss)."""
    if not isinstance(schema, dict):
        return schema
    local = {}
    for key in ("definitions", "$defs"):
        if isinstance(schema.get(key), dict):
            local.update(schema[key])

    def fix(node: Any) -> Any:
        if isinstance(node, list):
            return [fix(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                for prefix in ("#/$defs/", "#/definitions/"):
                    if v.startswith(prefix):
                        v = f"#/$defs/{owner}.{v[len(prefix) :]}"
            out[k] = fix(v)
        return out

    for name, sub in local.items():
        defs[f"{owner}.{name}"] = fix(sub)
    # only the root's definitions move (a property may be named "definitions")
    return fix({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})


def _function(i: int, tool: Any) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise bad(f"`{where}` must be an object of type function", "tools")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise bad(f"`{where}.function` must be an object", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise bad(f"`{where}.function.name` must be 1-64 letters, digits, _ or -", "tools")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise bad(f"`{where}.function.description` must be a string", "tools")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise bad(f"`{where}.function.parameters` must be a JSON schema object", "tools")
    out = {"name": name, "parameters": params}
    if desc:
        out["description"] = desc
    return out


def parse_tools(body: dict, parser: str) -> ToolRequest | None:
    """The request's tools (None: answer in text), checked as OpenAI checks them."""
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise bad("`tools` must be an array", "tools")
    tools = tuple(_function(i, t) for i, t in enumerate(raw or []))
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad("`tools` names a function twice", "tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("`parallel_tool_calls` must be a boolean", "parallel_tool_calls")
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict):
            raise bad("`tool_choice` must be none, auto, required or "
                      '{"type": "function", "function": {"name": ...}}', "tool_choice")  # fmt: skip
        name = fn.get("name")
        if name not in names:
            raise bad(f"`tool_choice` names {name!r}, which is not in `tools`", "tool_choice")
        choice = "named"
    elif choice is None:
        choice = "auto"
    elif choice not in ("none", "auto", "required"):
        raise bad("`tool_choice` must be none, auto, required or a function", "tool_choice")
    if choice == "required" and not tools:
        raise bad("`tool_choice` required needs `tools`", "tool_choice")
    if choice == "none" or not tools:
        return None
    return ToolRequest(tools, choice, name, parallel, parser)


# ---------------------------------------------------------------------------- the prompt


def history_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's ``tool_calls`` in the form chat templates take (arguments as
    objects, as transformers passes them)."""
    if not isinstance(calls, list):
        raise bad(f"`{where}.tool_calls` must be an array", "messages")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"`{where}.tool_calls[{j}]` needs function.name", "messages")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError as e:
                raise bad(f"`{where}.tool_calls[{j}].function.arguments` is not JSON: {e}",
                          "messages") from e  # fmt: skip
        out.append({"id": c.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})  # fmt: skip
    return out


def template_reads(template: str | None, word: str) -> bool:
    return bool(template) and word in template


def render_messages(
    messages: list[dict], tools: ToolRequest | None, template: str | None
) -> tuple[list[dict], dict]:
    """(messages, template variables): the tools go to the template when it reads them, else
    into the messages in hermes form (see the module docstring)."""
    kwargs: dict[str, Any] = {}
    if tools is not None:
        specs = [{"type": "function", "function": t} for t in tools.tools]
        if template_reads(template, "tools"):
            kwargs["tools"] = specs
        else:
            messages = _with_tool_list(messages, specs)
    if not template_reads(template, "tool_calls"):
        messages = [_flatten(m) for m in messages]
    return messages, kwargs


def _with_tool_list(messages: list[dict], specs: list[dict]) -> list[dict]:
    """The tools as one line each, ``name(arg: type, opt?: type): description``, and how to
    call them. Only templates that ignore tools get this, i.e. models not trained on a tool
    format, so a short listing that leaves room for the conversation serves them best."""
    listing = "\n".join(f"- {_signature(s['function'])}" for s in specs)
    text = (
        f"You can call these functions:\n{listing}\nTo call one, answer with "
        '<tool_call>{"name": "<function>", "arguments": {<arguments>}}</tool_call>.'
    )
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        content = f"{first.get('content') or ''}\n\n{text}".lstrip()
        return [{**first, "role": "system", "content": content}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _signature(fn: dict) -> str:
    """``name(arg: type, opt?: type): description``; a schema it cannot read shows ``any``."""
    params = fn["parameters"]
    props = params.get("properties")
    props = props if isinstance(props, dict) else {}
    required = params.get("required")
    required = set(required) if isinstance(required, list) else set()
    defs = params.get("$defs")
    defs = defs if isinstance(defs, dict) else {}
    args = [
        f"{k}{'' if k in required else '?'}: {_type(v, defs, frozenset())}" for k, v in props.items()
    ]
    desc = f": {fn['description']}" if fn.get("description") else ""
    return f"{fn['name']}({', '.join(args)}){desc}"


def _type(schema: Any, defs: dict, seen: frozenset) -> str:
    if not isinstance(schema, dict):
        return "any"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.removeprefix("#/$defs/")
        if name in seen or name not in defs:  # recursive, or not resolvable here
            return name.rsplit("/", 1)[-1] or "any"
        return _type(defs[name], defs, seen | {name})
    if isinstance(schema.get("enum"), list):
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    if isinstance(schema.get("anyOf"), list):
        return " | ".join(_type(s, defs, seen) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"{_type(schema.get('items'), defs, seen)}[]"
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    return str(kind)


def _flatten(m: dict) -> dict:
    """A message whose tool parts the template would not show, as plain text."""
    if m["role"] == "assistant" and m.get("tool_calls"):
        blocks = [f"{_OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                            "arguments": c["function"]["arguments"]},
                                           ensure_ascii=False) + f"\n{_CLOSE}"
                  for c in m["tool_calls"]]  # fmt: skip
        text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        return {k: v for k, v in m.items() if k != "tool_calls"} | {"content": text}
    if m["role"] == "tool":
        return {
            "role": "tool",
            "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>",
        }
    return m


# ---------------------------------------------------------------------------- the answer


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: Any) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def parse_output(text: str, tools: ToolRequest) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished answer. A forced call's text is the grammar's JSON;
    in ``auto`` mode, what parses as a call to a declared function becomes one, the rest stays
    content (all of it, if nothing parses)."""
    known = {t["name"] for t in tools.tools}
    if tools.choice == "named":
        return None, [_call(tools.name, text)]
    if tools.choice == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text, []
        return None, [_call(c["name"], c["arguments"]) for c in items]
    found: list[dict] = []
    if tools.parser == "hermes":
        rest, pos = [], 0
        for m in re.finditer(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S):
            call = _json_call(m.group(1), known)
            if call is None:
                continue
            rest.append(text[pos : m.start()])
            pos = m.end()
            found.append(call)
        rest.append(text[pos:])
        content = "".join(rest).strip()
    else:
        calls = _json_objects(text) if text.strip().startswith("{") else None
        calls = [_json_call(json.dumps(c), known) for c in calls or []]
        if calls and all(c is not None for c in calls):
            found, content = calls, ""
        else:
            content = text
    if found and not tools.parallel:
        found = found[:1]
    return (content or None) if found else text, found


def _json_objects(text: str) -> list | None:
    """The JSON values of ``text``, one after another (whitespace or ``;`` between), or None
    if anything else is there (Llama 3's several calls are joined by ``;``)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return out
        try:
            obj, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(obj)


def _json_call(text: str, known: set[str]) -> dict | None:
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in known:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return _call(obj["name"], args)


class ToolStream:
    """One streamed choice's text, split into content deltas and tool-call deltas.

    A named call streams its arguments as they come. ``required`` buffers (the calls are known
    when the JSON closes). ``auto`` streams content until the text may be starting a call
    (``<tool_call>`` or a prefix of it, hermes; a leading ``{``, llama3_json), then buffers;
    at the end the buffer is parsed as a whole."""

    def __init__(self, tools: ToolRequest) -> None:
        self.tools = tools
        self.text = ""  # everything generated
        self.sent = 0  # characters of it already sent as content or arguments
        self.holding = False
        self.calls = 0
        self.named_id = call_id() if tools.choice == "named" else None

    def feed(self, piece: str) -> list[dict]:
        """Deltas (``{"content": ..}`` or ``{"tool_calls": [..]}``) to send for ``piece``."""
        self.text += piece
        if self.tools.choice == "named":
            out = []
            if self.calls == 0:
                self.calls = 1
                out.append({"tool_calls": [{"index": 0, "id": self.named_id, "type": "function",
                                            "function": {"name": self.tools.name,
                                                         "arguments": ""}}]})  # fmt: skip
            if piece:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            self.sent = len(self.text)
            return out
        if self.tools.choice == "required" or self.holding:
            return []
        if self.tools.parser == "llama3_json":
            if self.text.lstrip().startswith("{"):
                self.holding = True
                return []
            if not self.text.strip():
                return []  # leading whitespace: wait to see what follows
            return self._content(len(self.text))
        at = self.text.find(_OPEN, self.sent)
        if at >= 0:
            self.holding = True
            return self._content(at)
        return self._content(len(self.text) - _partial_tag(self.text))

    def _content(self, end: int) -> list[dict]:
        if end <= self.sent:
            return []
        piece, self.sent = self.text[self.sent : end], end
        return [{"content": piece}]

    def finish(self) -> tuple[list[dict], bool]:
        """(last deltas, whether the answer is tool calls)."""
        if self.tools.choice == "named":
            return self.feed("") if self.calls == 0 else [], True
        content, calls = parse_output(self.text[self.sent :], self.tools)
        if not calls:
            return self._content(len(self.text)), False
        out = [{"content": content}] if content else []
        for k, c in enumerate(calls):
            out.append({"tool_calls": [{"index": k, **c}]})
        self.sent = len(self.text)
        return out, True


def _partial_tag(text: str) -> int:
    """Length of the longest tail of ``text`` that begins ``<tool_call>``."""
    for n in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-n:]):
            return n
    return 0
