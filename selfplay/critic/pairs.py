"""Preference pairs: `Pair`, how a (prompt, essay) text is encoded and padded for the critic, the `PairPool` of every
pair labelled so far (one row format for pairs.jsonl and run checkpoints), and TRL preference files.

Sequences. A text pair is scored as `[bos] prompt [sep] essay [eos]`, right-padded to the smallest of
`critic.seq_buckets` that fits the batch (longer sequences keep their last tokens, so the read-out token survives,
and are counted).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Sequence

import numpy as np

from selfplay.config import TamperKind
from selfplay.data import DataError, read_jsonl
from selfplay.tokenizer import Tokenizer

POOL_ROW = {"prompt": str, "chosen": str, "rejected": str, "heldout": bool}
POOL_ROW_OPTIONAL = {"kind": str}  # absent: LABELLED (pools saved before self-made negatives)
LABELLED = "label"  # the kind of a pair from a label source; a self-made one is named by its tampering operator
POOL_KINDS = (LABELLED, *typing.get_args(TamperKind))


def check_pool_row(row: dict) -> str | None:
    """Why a stored pool row is bad (None: it is good): an unknown kind."""
    kind = row.get("kind", LABELLED)
    return None if kind in POOL_KINDS else f"unknown pair kind {kind!r}; known: {', '.join(POOL_KINDS)}"


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference: `chosen` beats `rejected` as an answer to `prompt` (essays without the prompt)."""

    prompt: str
    chosen: str
    rejected: str


def pad_to_bucket(rows: Sequence[np.ndarray], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the smallest bucket that fits the longest row: (tokens_nl int32, len_n int32)."""
    longest = max(len(r) for r in rows)
    fits = [b for b in buckets if b >= longest]
    if not fits:
        raise ValueError(f"a row of {longest} tokens exceeds the largest bucket {max(buckets)}")
    tokens = np.full((len(rows), fits[0]), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, np.array([len(r) for r in rows], np.int32)


def encode_text(tokenizer: Tokenizer, prompt: str, essay: str, max_len: int) -> np.ndarray:
    """`[bos] prompt [sep] essay [eos]` as int32 ids; a longer sequence keeps its last max_len tokens, so the
    read-out token (eos) survives."""
    ids, _ = tokenizer.encode_example(prompt, essay)
    return np.asarray(ids[-max_len:], np.int32)


class PairPool:
    """Every pair labelled or made so far (pools only grow), each marked train or held out and with its kind
    (LABELLED, or the tampering operator that made it), with its token ids cached.

    Held-out pairs are drawn by a seeded generator as pairs arrive: round(heldout_fraction * n) of each added group.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, heldout_fraction: float, seed: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.heldout_fraction = heldout_fraction
        self.seed = seed
        self.pairs: list[Pair] = []
        self.heldout: list[bool] = []
        self.kinds: list[str] = []
        self.ids: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def encode(self, prompt: str, essay: str) -> np.ndarray:
        return encode_text(self.tokenizer, prompt, essay, self.max_len)

    def add(self, pairs: Sequence[Pair], heldout: Sequence[bool] | None = None, kinds: Sequence[str] | None = None) -> None:
        kinds = [LABELLED] * len(pairs) if kinds is None else list(kinds)
        if len(kinds) != len(pairs):
            raise ValueError(f"{len(pairs)} pairs but {len(kinds)} kinds")
        if heldout is None:
            rng = np.random.default_rng([self.seed, 0x4E1D, len(self.pairs)])
            n_held = int(round(self.heldout_fraction * len(pairs)))
            mask = np.zeros(len(pairs), bool)
            mask[rng.permutation(len(pairs))[:n_held]] = True
            heldout = mask.tolist()
        for p, h, k in zip(pairs, heldout, kinds, strict=True):
            self.pairs.append(p)
            self.heldout.append(bool(h))
            self.kinds.append(k)
            full = [self.tokenizer.encode_example(p.prompt, essay)[0] for essay in (p.chosen, p.rejected)]
            self.truncated += sum(len(f) > self.max_len for f in full)
            self.ids.append((np.asarray(full[0][-self.max_len :], np.int32), np.asarray(full[1][-self.max_len :], np.int32)))

    def indices(self, heldout: bool, kind: str | None = None) -> np.ndarray:
        """Indices of the training (heldout=False) or held-out pairs, of every kind or of one."""
        return np.array(
            [i for i, (h, k) in enumerate(zip(self.heldout, self.kinds)) if h == heldout and kind in (None, k)], np.int64
        )

    def count(self, kind: str) -> int:
        return sum(k == kind for k in self.kinds)

    @property
    def synthetic(self) -> int:
        """How many pairs are self-made (of any kind but LABELLED)."""
        return len(self.pairs) - self.count(LABELLED)

    def rows(self) -> list[dict]:
        """Every pair as a `POOL_ROW` dict (plus "kind" when it is not LABELLED), in order: the one form a pool is
        stored in (pairs.jsonl, run checkpoints)."""
        return [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "heldout": h} | ({"kind": k} if k != LABELLED else {})
            for p, h, k in zip(self.pairs, self.heldout, self.kinds)
        ]

    def add_rows(self, rows: Sequence[dict]) -> None:
        """Add stored `rows` (from `rows()`), keeping their train / held-out marks and kinds."""
        self.add(
            [Pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows],
            [bool(r["heldout"]) for r in rows],
            [r.get("kind", LABELLED) for r in rows],
        )

    def to_jsonl(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.rows())


def _split_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen essay, rejected essay) of two full texts: the prompt is their longest common prefix cut back to
    its last whitespace, so no word is split (no whitespace: no prompt); whitespace at the cut is dropped."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = max((i for i, ch in enumerate(chosen[:n]) if ch.isspace()), default=0)
    return chosen[:cut].rstrip(), chosen[cut:].lstrip(), rejected[cut:].lstrip()


def read_preference_file(path: str | Path) -> list[Pair]:
    """Pairs from a TRL-style preference JSONL, one object per line, in either of TRL's two formats:

      {"prompt": P, "chosen": C, "rejected": R}   explicit prompt; C and R are the completions.
      {"chosen": C, "rejected": R}                implicit prompt: C and R are full texts; the prompt is their
                                                  longest common prefix cut back to a word boundary (`_split_prompt`).
    Every bad line is a DataError `FILE:LINE: reason`: invalid JSON, a missing or non-string key, an empty string,
    chosen identical to rejected (also after splitting off the prompt).
    """
    rows = read_jsonl(path, {"chosen": str, "rejected": str}, {"prompt": str})
    name = "<stdin>" if str(path) == "-" else str(path)
    pairs = []
    for r in rows:
        where = f"{name}:{r['_line']}"
        for key in ("prompt", "chosen", "rejected"):
            if key in r and not r[key].strip():
                raise DataError(f"{where}: '{key}' is empty")
        if r["chosen"] == r["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a preference needs two different answers")
        if "prompt" in r:
            pairs.append(Pair(r["prompt"], r["chosen"], r["rejected"]))
            continue
        prompt, chosen, rejected = _split_prompt(r["chosen"], r["rejected"])
        if not chosen or not rejected or chosen == rejected:
            raise DataError(
                f"{where}: cannot split 'chosen' and 'rejected' into a shared prompt and two different answers "
                "(one is the other plus a suffix?); give the prompt as a 'prompt' key"
            )
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


