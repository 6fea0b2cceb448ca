"""cara_jax.tokenizer against HF transformers on the embedded SmolLM2 GGUF.

transformers' GGUF loader does not know llama.cpp's ``smollm`` pre-tokenizer and splits text the
plain GPT-2 way, while SmolLM2's real tokenizer.json (and llama.cpp) first isolate every numeric
character. The two agree on ASCII digits (the vocab has no digit merges) but not on a space before
a non-ASCII numeral: " ²" is ["Ġ", "Â²"] for the real tokenizer, ["ĠÂ", "²"] for HF's GGUF
conversion. So the reference here is HF's tokenizer applied to the text pre-split at numerals.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest

from cara_jax.embedded import default_model_path
from cara_jax.tokenizer import ChatTemplateError, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "The café serves crème brûlée. é è ê",
    "中文文本测试，你好世界",
    "emoji 🙂 and 👍🏽 and 🇫🇷",
    "Привет, как дела? Ёлка",
    "12345 3.14 -0.5e10 1,000,000",
    "x ² y ½ ① Ⅻ ٣٤ ３ ²",
    "a    b\t\tc   ",
    "line one\n\nline two\r\n  indented\n",
    "def f(x):\n    return {'k': x ** 2}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name> tail",
    "I'm sure they'll say it's fine, don't you think?",
    "",
    " ",
]
CHATS = [
    [{"role": "user", "content": "Hi there! What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Bonjour, ça va ? 🙂"},
        {"role": "assistant", "content": "Oui."},
        {"role": "user", "content": "中文?"},
    ],
]


def numeral_split(text: str) -> list[str]:
    """Cut text around every numeric character, as SmolLM2's Digits pre-tokenizer does."""
    pieces: list[str] = []
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            pieces += [ch, ""]
        elif pieces:
            pieces[-1] += ch
        else:
            pieces.append(ch)
    return [p for p in pieces if p]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf(gguf_path: Path):
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_path(gguf_path)


def hf_reference(hf, text: str) -> list[int]:
    return [i for piece in numeral_split(text) for i in hf.encode(piece, add_special_tokens=False)]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_real_smollm2_rules(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_reference(hf, text)
    if not any(ord(c) > 127 and unicodedata.category(c).startswith("N") for c in text):
        assert ids == hf.encode(text, add_special_tokens=False)


def test_hf_gguf_conversion_diverges_only_on_non_ascii_numerals(tok: Tokenizer, hf) -> None:
    assert tok.backend.encode(" ²").tokens == ["Ġ", "Â²"]
    assert hf.tokenize(" ²") == ["ĠÂ", "²"]
    assert tok.encode("12345 3.14") == hf.encode("12345 3.14", add_special_tokens=False)


def test_special_tokens(tok: Tokenizer, hf) -> None:
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        hf.bos_token,
        hf.eos_token,
        hf.pad_token,
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == frozenset({2})
    assert tok.vocab_size == len(hf) == 49152
    assert tok.encode("hi", add_special_tokens=True) == hf.encode("hi")  # add_bos_token is False


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf(tok: Tokenizer, hf, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if not skip:
        assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_hf(tok: Tokenizer, hf, chat: list[dict], gen: bool) -> None:
    text = tok.apply_chat_template(chat, add_generation_prompt=gen)
    assert text == hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    ids = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
    assert ids == hf_reference(hf, text)
    assert ids == hf.apply_chat_template(
        chat, add_generation_prompt=gen, tokenize=True, return_dict=False
    )


def test_chat_template_errors(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.backend, eos_token="<|im_end|>")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    strict = Tokenizer(tok.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        strict.apply_chat_template([])
    with pytest.raises(ChatTemplateError):
        Tokenizer(tok.backend, chat_template="{% for %}").apply_chat_template([])
    helpers = Tokenizer(
        tok.backend, chat_template="{{ x | tojson }}|{{ strftime_now('%Y')|length }}"
    )
    assert helpers.apply_chat_template([], x={"k": "é<"}) == '{"k": "é<"}|4'


def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens=skip)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for skip in (True, False):
        pieces = stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_detokenizer_holds_partial_chars(tok: Tokenizer) -> None:
    ids = tok.encode("a 👍🏽")  # the emoji spans several byte-level tokens
    pieces = stream(tok, ids)
    assert "" in pieces[:-1] and "".join(pieces) == "a 👍🏽"
    detok = tok.detokenizer()
    assert [detok.add(i) for i in ids[:-1]][-1] == ""
    assert detok.flush() == tok.decode(ids[:-1])[len("a 👍") :]  # trailing broken char at flush


def test_incremental_detokenizer_random_ids(tok: Tokenizer) -> None:
    """Arbitrary id streams (broken UTF-8 included) still join to the full decode."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_from_hf_dir_roundtrip(tok: Tokenizer, hf, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    loaded = Tokenizer.from_path(tmp_path)
    for text in TEXTS:  # same (GGUF-converted) tokenizer.json as HF, so identical everywhere
        assert loaded.encode(text) == hf.encode(text, add_special_tokens=False)
    assert loaded.chat_template == hf.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.eos_token_ids) == (1, 2, {2})
    for chat in CHATS:
        assert loaded.apply_chat_template(chat) == hf.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False
        )


def test_from_hf_dir_config_variants(hf, tmp_path: Path) -> None:
    """Older layouts: template inside tokenizer_config, AddedToken dicts, generation_config."""
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "chat_template": [
            {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}
        ],
        "bos_token": {"content": "<|im_start|>", "special": True},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.eos_token_ids == {0}  # the template has no turn terminator
    assert loaded.apply_chat_template([{"role": "user", "content": "x", "name": None}]) == (
        "<|im_start|>x"
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer.from_hf_dir(tmp_path).eos_token_ids == {0, 2}
