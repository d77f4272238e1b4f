"""Token labels for the critic's token heads (critic.token_heads), made from text alone, so they cost no label:

  flag   on a self-made pair (`selfplay.critic.tamper`), the tokens of the text the operator wrote are 1 in the
         tampered essay (every other essay token of it 0); in the original, the tokens of the text it replaced are 0.
         The region is where the two essays differ (their common prefix and suffix cut off), so it is found from the
         stored texts. A labelled pair carries no flag labels: nobody marked which of its tokens are wrong.
  cover  in every essay, the tokens of a stated value (`tamper.stated_values`) that its prompt gives are 1, every
         other essay token 0: which of the prompt's values the essay restates.

A token's characters are found by decoding (`actor.token_char_ends`); an essay whose tokens do not decode back to
its text gets no labels (mask 0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from selfplay.actor import token_char_ends
from selfplay.critic.pairs import LABELLED, Pair
from selfplay.critic.tamper import WORD, stated_values
from selfplay.tokenizer import Tokenizer

RowLabels = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # flag, flag_mask, cover, cover_mask; float32 [len]


def changed_regions(chosen: str, rejected: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The characters where two texts differ: ((start, end) in chosen, (start, end) in rejected), after their longest
    common prefix and the longest common suffix of what remains."""
    p = 0
    while p < min(len(chosen), len(rejected)) and chosen[p] == rejected[p]:
        p += 1
    s = 0
    while s < min(len(chosen), len(rejected)) - p and chosen[-1 - s] == rejected[-1 - s]:
        s += 1
    return (p, len(chosen) - s), (p, len(rejected) - s)


def _overlaps(starts: np.ndarray, ends: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    out = np.zeros(len(starts), bool)
    for a, b in spans:
        if b > a:
            out |= (starts < b) & (ends > a)
    return out


def row_labels(
    tok: Tokenizer,
    prompt: str,
    essay: str,
    max_len: int,
    phrasing: frozenset[str],
    flag_span: tuple[int, int] | None,
    flag_whole: bool,
) -> RowLabels:
    """Labels aligned with `encode_text(tok, prompt, essay, max_len)`. flag_span: the essay's tampered characters
    (None: no flag labels); flag_whole: every essay token gets a flag label (the tampered essay), else only those of
    flag_span (the original's replaced text)."""
    head = len(tok.encode_prompt(prompt))
    ids = tok.encode(essay)
    n = head + len(ids) + 1  # + eos
    flag, flag_m, cover, cover_m = (np.zeros(n, np.float32) for _ in range(4))
    ends = np.asarray(token_char_ends(tok, ids), np.int64)
    if len(ids) and tok.decode(ids) == essay:
        starts = np.concatenate([[0], ends[:-1]])
        real = ends > starts
        cols = slice(head, head + len(ids))
        given = {w.lower() for w in WORD.findall(prompt)}
        values = [(a, b) for a, b in stated_values(prompt, essay, phrasing) if essay[a:b].lower() in given]
        cover[cols] = _overlaps(starts, ends, values) & real
        cover_m[cols] = real
        if flag_span is not None:
            hit = _overlaps(starts, ends, [flag_span]) & real
            flag[cols] = hit if flag_whole else 0.0
            flag_m[cols] = real if flag_whole else hit
    return tuple(a[-max_len:] for a in (flag, flag_m, cover, cover_m))  # type: ignore[return-value]


def pair_labels(tok: Tokenizer, pair: Pair, kind: str, max_len: int, phrasing: frozenset[str]) -> tuple[RowLabels, RowLabels]:
    """(chosen's, rejected's) `row_labels`: flag labels only for a self-made pair (kind != LABELLED)."""
    if kind == LABELLED:
        spans: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)
    else:
        spans = changed_regions(pair.chosen, pair.rejected)
    return (
        row_labels(tok, pair.prompt, pair.chosen, max_len, phrasing, spans[0], flag_whole=False),
        row_labels(tok, pair.prompt, pair.rejected, max_len, phrasing, spans[1], flag_whole=True),
    )


def pad_labels(rows: Sequence[RowLabels], width: int) -> tuple[np.ndarray, ...]:
    """Four float32 [n, width] arrays, right-padded with 0 (like `pad_to_bucket`'s tokens)."""
    out = tuple(np.zeros((len(rows), width), np.float32) for _ in range(4))
    for i, r in enumerate(rows):
        for a, x in zip(out, r):
            a[i, : len(x)] = x
    return out
