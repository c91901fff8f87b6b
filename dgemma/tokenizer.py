"""Tokenizer and chat template of a checkpoint directory, without transformers.

Design choices:
- `tokenizer.json` is read with the `tokenizers` library; special tokens and `add_bos_token` come from
  `tokenizer_config.json`. A BOS is added on plain encodes when the config asks for it and the tokenizer's own
  post-processor has not already added one (Gemma's does; a bare BPE does not).
- The chat template is the checkpoint's own (`chat_template.jinja`, else `tokenizer_config.json`), rendered in
  a sandboxed jinja2 environment set up the way transformers renders templates (trim_blocks, lstrip_blocks,
  `raise_exception`, `tojson`, `strftime_now`), so a template behaves the same here as there.
- Gemma 4 thinking: a model turn may hold `<|channel>thought\\n ... <channel|>` before the answer.
  `split_thinking` separates the two; `strip_thinking` removes thoughts from earlier assistant turns so that
  they are never fed back.
- Text is Unicode that UTF-8 can encode. A string holding lone surrogates (what Python makes of bytes that are
  not UTF-8 in a command line, a file read with `surrogateescape`, or a JSON `"\\udce9"`) is refused with a
  TokenizerError that names the first bad bytes (`check_text`), rather than replaced: a prompt in another
  encoding would otherwise reach the model as text nobody wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as RustTokenizer

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>thought\n", "<channel|>"
_THOUGHT = re.compile(re.escape(THOUGHT_OPEN) + r".*?(?:" + re.escape(THOUGHT_CLOSE) + r"|$)", re.DOTALL)


class TokenizerError(ValueError):
    """A tokenizer directory or chat request that cannot be used."""


def check_text(text: str, what: str = "the text") -> str:
    """`text`, if UTF-8 can encode it; else a TokenizerError naming the first bytes that are not UTF-8 (Python
    keeps them as lone surrogates when it decodes command lines and standard input with `surrogateescape`) or
    the first lone surrogate."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as err:
        index = err.start
    bad = ord(text[index])
    start = max(0, index - 20)
    excerpt = ("..." if start else "") + _shown(text[start:index + 20]) + ("..." if index + 20 < len(text) else "")
    if 0xDC80 <= bad <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        offset = len(text[:index].encode("utf-8"))
        raise TokenizerError(f"{what} is not valid UTF-8: byte 0x{bad - 0xDC00:02x} at byte {offset} ('{excerpt}'); "
                             "dgemma reads text as UTF-8, so convert it first (for Latin-1 text: iconv -f latin1 "
                             "-t utf-8)")
    raise TokenizerError(f"{what} holds a lone surrogate U+{bad:04X} at character {index} ('{excerpt}'), which "
                         "is not text (half of a UTF-16 pair)")


def _shown(text: str) -> str:
    """`text` printable: bytes kept by surrogateescape as \\xNN, other surrogates as \\uNNNN, controls escaped."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch if ch.isprintable() else repr(ch)[1:-1])
    return "".join(out)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thought, answer) of a generated model turn; thought is None when the turn has none."""
    match = _THOUGHT.search(text)
    if match is None:
        return None, text
    thought = match.group(0)[len(THOUGHT_OPEN):].removesuffix(THOUGHT_CLOSE)
    return thought.strip(), (text[:match.start()] + text[match.end():]).strip()


def strip_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with thoughts removed from assistant turns (and any `reasoning_content` field dropped)."""
    cleaned = []
    for message in messages:
        message = {k: v for k, v in message.items() if k != "reasoning_content"}
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            message["content"] = split_thinking(message["content"])[1]
        cleaned.append(message)
    return cleaned


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclass
class Tokenizer:
    directory: Path
    backend: RustTokenizer
    special: dict[str, str | None]  # bos_token, eos_token, pad_token, unk_token
    add_bos: bool
    chat_template: str | None

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a checkpoint directory or of a GGUF file's metadata."""
        path = Path(path)
        return cls.from_gguf(path) if path.is_file() and path.suffix.lower() == ".gguf" else cls.from_directory(path)

    @classmethod
    def from_directory(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        return cls._build(directory, RustTokenizer.from_file(str(path)), config, template)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata (see dgemma.gguf)."""
        from .gguf import read_gguf

        checkpoint = read_gguf(path)
        if checkpoint.tokenizer_json is None:
            raise TokenizerError(f"{path} has no tokenizer dgemma can rebuild (no tokenizer.ggml.* metadata, or a "
                                 "tokenizer model other than gemma4/gpt2): give token ids instead of text")
        return cls._build(Path(path), RustTokenizer.from_str(checkpoint.tokenizer_json), checkpoint.tokenizer_config,
                          checkpoint.chat_template)

    @classmethod
    def _build(cls, source: Path, backend: RustTokenizer, config: dict[str, Any], template: str | None) -> "Tokenizer":
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            special[key] = value.get("content") if isinstance(value, dict) else value
        return cls(source, backend, special, bool(config.get("add_bos_token", True)), template)

    # ---- ids ------------------------------------------------------------------------------------------------

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.special["bos_token"])

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.special["eos_token"])

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.special["pad_token"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; text that is not valid Unicode (lone surrogates) is a TokenizerError."""
        ids = self.backend.encode(check_text(text), add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------------------

    @cached_property
    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise TokenizerError(f"{self.directory} has no chat template (chat_template.jinja or "
                                 "tokenizer_config.json 'chat_template')")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> str:
        """The prompt text for a conversation; earlier thoughts are stripped before rendering."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise TokenizerError(f"messages[{i}] must be an object with a 'role'")
        try:
            return self._template.render(messages=strip_thinking(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in self.special.items()}, **template_kwargs)
        except jinja2.TemplateError as err:
            raise TokenizerError(f"chat template failed: {err}") from err

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]:
        # Templates write their own BOS, so special tokens are not added again (as transformers does).
        return self.encode(self.render_chat(messages, add_generation_prompt, **template_kwargs),
                           add_special_tokens=False)
