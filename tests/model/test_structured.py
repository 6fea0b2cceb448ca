"""Grammar constraints on the real tokenizer (llguidance): specs, masks, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cara_jax.structured import GrammarError, Grammars, GrammarSpec


def allowed(mask: np.ndarray) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))}


@pytest.fixture(scope="module")
def grammars(smol_tok):
    return Grammars(smol_tok, 49152)


def test_a_schema_walks_to_done_and_keeps_key_order(grammars, smol_tok):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    c = grammars.compile(GrammarSpec.json_schema(schema))
    text = json.dumps({"name": "Bob", "age": 42}, separators=(",", ":"))
    for t in smol_tok.encode(text):
        assert t in allowed(c.mask()), smol_tok.decode([t])
        assert c.consume(t)
    assert c.done
    assert allowed(c.mask()) == {smol_tok.eos_token_id}  # nothing but the end
    fresh = grammars.compile(GrammarSpec.json_schema(schema))  # keys in the schema's order
    assert fresh.consume(smol_tok.encode('{"')[0])
    assert all("name".startswith(smol_tok.decode([t])[:4]) for t in allowed(fresh.mask()))


def test_choice_and_regex_masks(grammars, smol_tok):
    c = grammars.compile(GrammarSpec("choice", ("yes", "no")))
    words = {smol_tok.decode([t]) for t in allowed(c.mask())}
    assert words and all("yes".startswith(w) or "no".startswith(w) for w in words), words
    r = grammars.compile(GrammarSpec("regex", r"[0-9]{3}"))
    assert all(smol_tok.decode([t]).isdigit() for t in allowed(r.mask()))


@pytest.mark.parametrize(
    "spec",
    [
        lambda: GrammarSpec("regex", "(unclosed"),
        lambda: GrammarSpec.json_schema({"type": "nope"}),
        lambda: GrammarSpec("grammar", "start: undefined_rule"),
        lambda: GrammarSpec("choice", ()),
        lambda: GrammarSpec("xml", "x"),
    ],
)
def test_bad_constraints_raise_a_typed_error(grammars, spec):
    with pytest.raises(GrammarError):
        grammars.compile(spec())
