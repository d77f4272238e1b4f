"""Chat templates: a model's Jinja template (RUN_DIR/tokenizer_config.json, key `chat_template`) rendered as
transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` renders it.

A conversational prompt (TRL's `[{"role": ..., "content": ...}, ...]`) becomes one string: the text the policy, the
critic and the reward functions all see.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from selfplay.config import UserError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The special tokens transformers hands a template (its `special_tokens_map`), when tokenizer_config.json names them.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Messages = Sequence[Mapping[str, Any]]


class ChatTemplateError(UserError):
    """A chat template that cannot be read, compiled or rendered; the message names its file."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not, and templates rely on that.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers compiles chat templates in: sandboxed, immutable, blocks trimmed."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class RenderedPrompt(str):
    """A prompt written by a chat template. The template already wrote the model's control tokens (`<|im_start|>`,
    its bos if it wants one) and opened the assistant's turn, so the tokenizer reads the special tokens in it as their
    ids and adds no [bos] ... [sep] around it, as transformers' `apply_chat_template(tokenize=True)` and TRL do. Any
    other text keeps special-token strings as plain text."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to (`bos_token`, `eos_token`, ...)."""

    template: str
    special_tokens: Mapping[str, str]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        try:
            compiled = _environment().from_string(self.template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.source}: chat_template is not a valid Jinja template: {e.message} (template line {e.lineno})") from None
        object.__setattr__(self, "_compiled", compiled)

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> RenderedPrompt:
        """The conversation as text, ending with the assistant's turn opened (add_generation_prompt)."""
        try:
            return RenderedPrompt(self._compiled.render(  # type: ignore[attr-defined]
                messages=[dict(m) for m in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            ))
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.source}: the chat template refused the conversation: {e}") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken mapping with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_template(value: Any, source: str) -> str:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"]
        raise ChatTemplateError(f"{source}: chat_template names {', '.join(sorted(named))} but no 'default' template")
    raise ChatTemplateError(f"{source}: chat_template must be a string or a list of {{\"name\", \"template\"}}, got {type(value).__name__}")


def read_chat_template(path: str | Path) -> ChatTemplate | None:
    """The chat template of a tokenizer_config.json; None when the file is missing or has no `chat_template`."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"{p}: cannot read it as JSON: {e}") from None
    if not isinstance(config, dict) or config.get("chat_template") is None:
        return None
    tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
    return ChatTemplate(_pick_template(config["chat_template"], str(p)), tokens, source=str(p))


def load_chat_template(run_dir: str | Path) -> ChatTemplate | None:
    """RUN_DIR/tokenizer_config.json's chat template (`selfplay import-hf` copies the model's file there), or None."""
    return read_chat_template(Path(run_dir) / TOKENIZER_CONFIG_FILE)
