"""Text <-> token ids, chat templates and streaming detokenization, for GGUF files and HF folders.

The BPE itself is the `tokenizers` library's; this module only rebuilds the pipeline around it
from whatever the checkpoint ships, so ids match what the model was trained on:

* A GGUF stores vocab, merges and token types but no pre-tokenizer, only a name for it
  (``tokenizer.ggml.pre``). The split rules for that name are restated here. transformers' own
  GGUF loader does not know ``smollm`` and falls back to plain GPT-2 splitting; SmolLM2's real
  ``tokenizer.json`` (and llama.cpp) first isolate every digit, which we follow.
* Chat templates render exactly as transformers renders them (same jinja environment and
  helpers), since a one-character difference in the prompt changes the model's output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4

# Tokens that close a chat turn. A model fine-tuned on a template stops by emitting its turn
# terminator, which is often not the tokenizer's eos (e.g. Llama 3: eos <|end_of_text|>, turn end
# <|eot_id|>). Used only when no generation_config.json lists the stop ids explicitly.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer names -> how HF's tokenizer.json for that family splits text.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2 = {"default", "gpt2", "mpt", "olmo", "jais"}
_SPLIT_REGEX = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


class ChatTemplateError(ValueError):
    """The chat template is missing, does not compile, or rejected the conversation."""


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer HF uses for a byte-level BPE that llama.cpp calls ``pre``."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre is None or pre in _GPT2:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: its split rules are unknown")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map, the alphabet byte-level vocab entries are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = (b for b in range(256) if b not in keep)
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return mapping


def _special_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's tojson: jinja's built-in one HTML-escapes, which would corrupt tool schemas."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    """Compile like transformers: templates are untrusted, so sandboxed, with HF's helpers."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


class Tokenizer:
    """A `tokenizers` backend plus the special-token and chat-template facts around it."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        stop_token_ids: Iterable[int] = (),
    ) -> None:
        """`stop_token_ids`: generation stops declared by the checkpoint besides eos."""
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)
        self.unk_token_id = self._id(unk_token)
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        stops = set(stop_token_ids)
        if not stops and chat_template:
            stops = {
                i for t in _END_OF_TURN if t in chat_template and (i := self._id(t)) is not None
            }
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(stops)
        self._template: jinja2.Template | None = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def is_token(self, text: str) -> bool:
        """Whether ``text`` is one token of the vocabulary (a model's tool-call tag may be)."""
        return self._id(text) is not None

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Rebuild the byte-level BPE tokenizer described by a GGUF file's metadata."""
        import gguf

        reader = gguf.GGUFReader(path)

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(f"tokenizer.{key}")
            return default if f is None else f.contents()

        kind = field("ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE)")
        tokens: list[str] = field("ggml.tokens")
        types: list[int] = field("ggml.token_type", [1] * len(tokens))
        byte_map = _bytes_to_unicode()
        alphabet = set(byte_map.values())
        # Ordinary entries are spelled in the byte alphabet; a few converters store raw UTF-8.
        vocab = {
            (t if set(t) <= alphabet else "".join(byte_map[b] for b in t.encode())): i
            for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ", 1)) for m in field("ggml.merges", [])]
        backend = _Backend(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(field("ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>) must be matched whole in the text, never BPE-split;
        # user-defined ones (<think>) too, but they are ordinary text when decoding.
        typed = list(zip(tokens, types, strict=True))
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, y in typed if y == _GGUF_CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, normalized=False) for t, y in typed if y == _GGUF_USER_DEFINED]
        )

        def tok(key: str) -> str | None:
            i = field(f"ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = tok("bos_token_id"), tok("eos_token_id")
        prefix = [bos] if bos and field("ggml.add_bos_token", False) else []
        suffix = [eos] if eos and field("ggml.add_eos_token", False) else []
        if prefix or suffix:
            backend.post_processor = processors.TemplateProcessing(
                single=[*prefix, "$A", *suffix],
                special_tokens=[(t, vocab[t]) for t in {*prefix, *suffix}],
            )
        stops = [
            i for k in ("eot_token_id", "eom_token_id") if (i := field(f"ggml.{k}")) is not None
        ]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=tok("padding_token_id"),
            unk_token=tok("unknown_token_id"),
            chat_template=field("chat_template"),
            stop_token_ids=stops,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load an HF checkpoint folder: tokenizer.json plus the config files around it."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        backend = _Backend.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        specials = {**_read_json(folder / "special_tokens_map.json"), **config}
        template = config.get("chat_template")
        if isinstance(template, list):  # older multi-template format: [{name, template}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        # transformers >= 4.43 saves the template in its own file, which takes precedence.
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        generation = _read_json(folder / "generation_config.json")
        stops = generation.get("eos_token_id")
        return cls(
            backend,
            bos_token=_special_str(specials.get("bos_token")),
            eos_token=_special_str(specials.get("eos_token")),
            pad_token=_special_str(specials.get("pad_token")),
            unk_token=_special_str(specials.get("unk_token")),
            chat_template=template,
            stop_token_ids=[stops] if isinstance(stops, int) else stops or (),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A .gguf file or an HF checkpoint folder."""
        p = Path(path)
        if p.is_dir():
            return cls.from_hf_dir(p)
        if p.suffix == ".gguf" and p.is_file():
            return cls.from_gguf(p)
        raise FileNotFoundError(f"expected a .gguf file or a checkpoint folder: {p}")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; special-token strings in `text` map to their single ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation the way transformers' ``apply_chat_template`` does.

        As in transformers, keys set to None are dropped from messages (OpenAI clients send
        ``"name": null``), and the special tokens are template variables that kwargs override.
        """
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template: send a plain prompt (completions) instead"
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        specials = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        variables = {k: v for k, v in specials.items() if v is not None}
        variables.update(tools=None, documents=None)
        variables.update(kwargs)
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = self._template.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **variables
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e
        return self.encode(text) if tokenize else text

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)


class IncrementalDetokenizer:
    """Turn a stream of generated ids into text pieces, one `add` per token.

    A token may end in the middle of a UTF-8 character (emoji, CJK); decoding then shows U+FFFD.
    Such text is held back until a later token completes it. Each step decodes only a short
    window: from the token before the last emitted boundary (so decoders that strip a leading
    space see the same context) to the end, and emits what it adds past the already-read part.
    Boundaries only fall after complete characters, so the pieces join to ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already emitted

    def _pending(self) -> tuple[str, str]:
        window = self.ids[self._prefix :]
        done = self._tok.decode(window[: self._read - self._prefix], self._skip)
        return done, self._tok.decode(window, self._skip)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        done, text = self._pending()
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of generation)."""
        done, text = self._pending()
        self._prefix = self._read = len(self.ids)
        return text[len(done) :]
