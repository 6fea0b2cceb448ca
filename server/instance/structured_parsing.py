"""The request fields that constrain an output: OpenAI's ``response_format`` and vLLM's
``structured_outputs`` (and the ``guided_*`` fields vLLM kept for a while), into one
``GrammarSpec`` (cara_jax/structured.py). At most one constraint per request: two are a 400,
never a silent choice between them.
"""

from __future__ import annotations

import json
from typing import Any

from cara_jax.structured import GrammarSpec
from server.protocol import bad

_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def parse_structured(body: dict) -> GrammarSpec | None:
    """The request's constraint, or None for free text."""
    found: list[GrammarSpec] = []
    fmt = body.get("response_format")
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(spec)
    so = body.get("structured_outputs")
    if so is not None:
        found.extend(_structured_outputs(so))
    for field, kind in _GUIDED.items():
        if body.get(field) is not None:
            found.append(_one(kind, body[field], field))
    if len(found) > 1:
        names = sorted({s.param for s in found})
        raise bad(f"one output constraint per request; got {', '.join(names)}", names[-1])
    return found[0] if found else None


def _response_format(fmt: Any) -> GrammarSpec | None:
    p = "response_format"
    if not isinstance(fmt, dict):
        raise bad("`response_format` must be an object", p)
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", None, p)
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise bad("`response_format.json_schema` must be an object", p)
        if not isinstance(js.get("name", ""), str):
            raise bad("`response_format.json_schema.name` must be a string", p)
        schema = js.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad("`response_format.json_schema.schema` must be an object", p)
        return GrammarSpec.json_schema(schema, p)
    raise bad("`response_format.type` must be text, json_object or json_schema", p)


def _structured_outputs(so: Any) -> list[GrammarSpec]:
    p = "structured_outputs"
    if not isinstance(so, dict):
        raise bad("`structured_outputs` must be an object", p)
    unknown = sorted(set(so) - set(_STRUCTURED_KEYS) - {"disable_any_whitespace",
                                                         "disable_fallback",
                                                         "whitespace_pattern"})  # fmt: skip
    if unknown:
        raise bad(f"`structured_outputs.{unknown[0]}` is not supported", p, code="unsupported")
    out = []
    for key in _STRUCTURED_KEYS:
        value = so.get(key)
        if value is None or value is False:
            continue
        if key == "json_object":
            out.append(GrammarSpec("json_object", None, p))
        else:
            out.append(_one(key, value, p))
    return out


def _one(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise bad(f"`{param}`: the JSON schema is not valid JSON ({e})", param) from e
        if not isinstance(value, dict):
            raise bad(f"`{param}`: the JSON schema must be an object", param)
        return GrammarSpec.json_schema(value, param)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise bad(f"`{param}`: the regex must be a non-empty string", param)
        return GrammarSpec("regex", value, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise bad(f"`{param}`: choice must be a non-empty array of strings", param)
        return GrammarSpec("choice", tuple(value), param)
    if not isinstance(value, str) or not value.strip():
        raise bad(f"`{param}`: the grammar must be a non-empty string", param)
    return GrammarSpec("grammar", value, param)
