"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): training on the world corpus, tokenizer.json I/O,
and the prompt/essay layout the models see: [bos] prompt [sep] essay [eos].

Special tokens of a trained tokenizer: <|pad|> = 0, <|bos|> = 1, <|eos|> = 2, <|sep|> = 3. Text is
encoded with special tokens treated as plain text, so an essay that contains "<|eos|>" cannot end
a sequence; only the layout methods insert special ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from selfplay.config import UserError

PAD, BOS, EOS, SEP = "<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>"
SPECIALS = (PAD, BOS, EOS, SEP)

# Equivalents looked up, in order, in tokenizers that lack ours (e.g. one shipped with a HF model).
_CANDIDATES = {
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]", "<|endoftext|>"),
    "eos": (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "<|eot_id|>", "[SEP]"),
    "pad": (PAD, "<pad>", "[PAD]", "<|finetune_right_pad_id|>"),
    "sep": (SEP, "<sep>", "[SEP]"),
}


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special ids the models need.

    For a tokenizer without our specials, bos/eos are looked up among common equivalents (an error
    names the file if none is found); pad falls back to eos, and sep to the single token of "\\n"
    when there is one, else to eos.
    """

    def __init__(self, tk: tokenizers.Tokenizer, source: str = "<memory>"):
        self.tk = tk
        self.source = source
        tk.encode_special_tokens = True  # text never turns into control ids
        found = {role: self._find(role) for role in _CANDIDATES}
        for role in ("bos", "eos"):
            if found[role] is None:
                raise UserError(
                    f"{source}: no {role} token found; looked for {', '.join(_CANDIDATES[role])}"
                )
        if found["pad"] is None:
            found["pad"] = found["eos"]
        if found["sep"] is None:
            newline = tk.encode("\n", add_special_tokens=False).ids
            found["sep"] = newline[0] if len(newline) == 1 else found["eos"]
        self._ids: dict[str, int] = found  # type: ignore[assignment]

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
        """Read a tokenizer.json (ours or one shipped with a Hugging Face model); `path` may be its directory."""
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
        return cls(tk, source=str(p))

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
        """[bos] + prompt + [sep]: what the actor is given before it writes the essay."""
        return [self.bos_id, *self.encode(prompt), self.sep_id]

    def encode_example(self, prompt: str, essay: str) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for [bos] prompt [sep] essay [eos]; loss_mask[i] = 1 where ids[i] is an essay
        token or the final eos (the tokens a next-token loss should predict), else 0."""
        head = self.encode_prompt(prompt)
        tail = [*self.encode(essay), self.eos_id]
        return head + tail, [0] * len(head) + [1] * len(tail)
