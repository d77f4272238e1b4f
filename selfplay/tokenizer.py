"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): training on the world corpus, tokenizer.json I/O,
and the prompt/essay layout the models see: [bos] prompt [sep] essay [eos].

Special tokens of a trained tokenizer: <|pad|> = 0, <|bos|> = 1, <|eos|> = 2, <|sep|> = 3. Text is
encoded with special tokens treated as plain text, so an essay that contains "<|eos|>" cannot end
a sequence; only the layout methods insert special ids.

A tokenizer.json shipped with a Hugging Face model is read with the special ids its neighbours declare
(`SPECIALS_FILES`): a model may have several EOS ids (e.g. Llama-3-Instruct's <|end_of_text|> and <|eot_id|>).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from selfplay.chat import RenderedPrompt
from selfplay.config import UserError

PAD, BOS, EOS, SEP = "<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>"
SPECIALS = (PAD, BOS, EOS, SEP)

# Files next to a tokenizer.json that declare its special ids, in order of precedence: generation_config.json is what
# transformers' generate() stops on, config.json the model's own, tokenizer_config.json names tokens instead of ids.
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIALS_FILES = (GENERATION_CONFIG_FILE, "config.json", TOKENIZER_CONFIG_FILE)

# Equivalents looked up, in order, when no file declares a role (our own tokenizer; a bare tokenizer.json).
_CANDIDATES = {
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]", "<|endoftext|>"),
    "eos": (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "<|eot_id|>", "[SEP]"),
    "pad": (PAD, "<pad>", "[PAD]", "<|finetune_right_pad_id|>"),
    "sep": (SEP, "<sep>", "[SEP]"),
}


def _token_ids(value: Any, key: str, path: Path, tk: tokenizers.Tokenizer) -> list[int]:
    """The ids a `*_token_id` (an int, a list of ints or null) or `*_token` (a string, {"content": str} or null) field
    declares, each checked to be in the tokenizer's vocabulary."""
    n = tk.get_vocab_size(with_added_tokens=True)
    if value is None:
        return []
    if key.endswith("_token"):
        content = value.get("content") if isinstance(value, dict) else value
        if not isinstance(content, str) or tk.token_to_id(content) is None:
            raise UserError(f"{path}: {key} {value!r} is not a token of the tokenizer")
        return [tk.token_to_id(content)]
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in ids):
        raise UserError(f"{path}: {key} must be a token id or a list of token ids below {n} (the tokenizer's size), got {value!r}")
    return ids


def declared_specials(directory: Path, tk: tokenizers.Tokenizer) -> dict[str, list[int]]:
    """{"bos"|"eos"|"pad": ids} that `SPECIALS_FILES` in `directory` declare. eos: every id any file declares, in order
    of precedence (a row stops on any of them); bos and pad: the first file's."""
    found: dict[str, list[int]] = {"bos": [], "eos": [], "pad": []}
    for name in SPECIALS_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a readable JSON file: {e}") from None
        if not isinstance(fields, dict):
            raise UserError(f"{path}: expected a JSON object, got {type(fields).__name__}")
        suffix = "_token" if name == TOKENIZER_CONFIG_FILE else "_token_id"
        for role, ids in found.items():
            new = _token_ids(fields.get(role + suffix), role + suffix, path, tk)
            if role == "eos":
                ids += [i for i in new if i not in ids]
            elif not ids:
                ids += new[:1]
    return found


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special ids the models need.

    `declared` (see `declared_specials`) comes first. A role it leaves empty is looked up among common
    equivalents of our specials (an error names the file if bos or eos is found nowhere); pad falls back to
    the first eos, and sep to the single token of "\\n" when there is one, else to the first eos.
    """

    def __init__(self, tk: tokenizers.Tokenizer, source: str = "<memory>", declared: dict[str, list[int]] | None = None):
        self.tk = tk
        self.source = source
        tk.encode_special_tokens = True  # text never turns into control ids
        declared = declared or {}
        found = {role: declared.get(role) or [i for i in [self._find(role)] if i is not None] for role in _CANDIDATES}
        for role in ("bos", "eos"):
            if not found[role]:
                raise UserError(
                    f"{source}: no {role} token: none of {', '.join(SPECIALS_FILES)} next to it gives one "
                    f"and it has none of {', '.join(_CANDIDATES[role])}"
                )
        if not found["pad"]:
            found["pad"] = found["eos"]
        if not found["sep"]:
            newline = tk.encode("\n", add_special_tokens=False).ids
            found["sep"] = [newline[0] if len(newline) == 1 else found["eos"][0]]
        self._ids = {role: ids[0] for role, ids in found.items()}
        # Every id that ends a completion; `eos_id`, the first, is the one the layout writes.
        self.eos_ids: tuple[int, ...] = tuple(found["eos"])

    def _find(self, role: str) -> int | None:
        for tok in _CANDIDATES[role]:
            i = self.tk.token_to_id(tok)
            if i is not None:
                return i
        return None

    # --- construction and I/O ---------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Byte-level BPE with our four specials at ids 0..3; vocab_size counts them and the 256 bytes."""
        if vocab_size < 256 + len(SPECIALS):
            raise UserError(f"tokenizer vocab_size must be >= {256 + len(SPECIALS)} (bytes + specials), got {vocab_size}")
        tk = tokenizers.Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json (atomically); `path` is the file or a directory to put it in."""
        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.tk.to_str(pretty=True))
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer.json (ours or one shipped with a Hugging Face model) with the special ids that the
        `SPECIALS_FILES` next to it declare; `path` may be its directory."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        try:
            text = p.read_text()
        except OSError as e:
            raise UserError(f"cannot read tokenizer file {p}: {e.strerror}") from None
        try:
            json.loads(text)
            tk = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # json.JSONDecodeError, or the plain Exception tokenizers raises on a bad schema
            raise UserError(f"{p}: not a valid tokenizer.json: {e}") from None
        return cls(tk, source=str(p), declared=declared_specials(p.parent, tk))

    # --- ids -------------------------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def sep_id(self) -> int:
        return self._ids["sep"]

    def special_ids(self) -> dict[str, Any]:
        """generation_config.json's bos/eos/pad fields: eos is a list when several ids end a completion."""
        eos: Any = list(self.eos_ids) if len(self.eos_ids) > 1 else self.eos_id
        return {"bos_token_id": self.bos_id, "eos_token_id": eos, "pad_token_id": self.pad_id}

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    # --- text <-> ids ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special ids are added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, rows: Sequence[Iterable[int]]) -> list[str]:
        return self.tk.decode_batch([[int(i) for i in r] for r in rows], skip_special_tokens=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        """[bos] + prompt + [sep]: what the actor is given before it writes the essay. A prompt a chat template wrote
        (`RenderedPrompt`) is encoded as it stands, its special tokens read as their ids: the template wrote the
        control tokens and opened the assistant's turn."""
        if isinstance(prompt, RenderedPrompt):
            self.tk.encode_special_tokens = False
            try:
                return self.tk.encode(prompt, add_special_tokens=False).ids
            finally:
                self.tk.encode_special_tokens = True
        return [self.bos_id, *self.encode(prompt), self.sep_id]

    def encode_example(self, prompt: str, essay: str) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for [bos] prompt [sep] essay [eos]; loss_mask[i] = 1 where ids[i] is an essay
        token or the final eos (the tokens a next-token loss should predict), else 0."""
        head = self.encode_prompt(prompt)
        tail = [*self.encode(essay), self.eos_id]
        return head + tail, [0] * len(head) + [1] * len(tail)
