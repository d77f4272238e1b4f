"""Self-made negatives: tampering operators on text, and the synthetic preference pairs they make (the original essay
beats its tampered copy), as in SPC's "sneaky" generator, FAVA's inserted errors and Self-Taught Evaluators'
contrastive pairs. They cost no label and are counted apart from labelled pairs (`critic/synthetic_pairs`).

The operators read only the text -- sentences end with '.', words are letters or digits -- never the world's grammar,
so they apply to a user's own prompts and essays too. Each replaces rather than inserts where it can, so a tampered
essay is about as long as its original (a critic must not learn "longer is worse"):

  swap_value  one stated value -- a number, or a word the essay shares with its prompt that is neither the topic nor
              phrasing common to many prompts -- is replaced by another of the same shape: a different number of as
              many digits, or a donor essay's value of the same case. The fact is now wrong (or unsupported).
  duplicate   one sentence after the first is replaced by a copy of another of the essay's sentences (repetition).
  drop_last   the last sentence is removed (the conclusion, or the last fact, is lost).
  splice      one sentence after the first is replaced by a sentence of a donor essay (off-topic, and often a
              stranger's name).

An operator returns None when the essay offers it nothing to work on (no value, a single sentence, no donor).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Sequence

import numpy as np

from selfplay.config import TamperKind
from selfplay.critic.pairs import Pair
from selfplay.world.grammar import sentence_spans

KINDS: tuple[str, ...] = typing.get_args(TamperKind)

WORD = re.compile(r"[A-Za-z]+|\d+")
MIN_VALUE_LETTERS = 4  # shorter shared words ("is", "the", "of", "a") are function words, not values
TOPIC_SHARE = 0.5  # a word in at least this share of the essay's sentences is its topic, not a value
PHRASING_SHARE = 0.1  # a word in at least this share of a collection's prompts is phrasing ("lives", "about"), not a value
MIN_PHRASING_PROMPTS = 20  # fewer distinct prompts say too little about which words are phrasing


@dataclasses.dataclass(frozen=True)
class Tampered:
    """A tampered essay, the operator that made it, and the characters [start, end) of `essay` it wrote (start ==
    end: a deletion ending there)."""

    essay: str
    kind: str
    span: tuple[int, int]


def _shape(word: str) -> str:
    if word.isdigit():
        return "digits"
    return "capital" if word[0].isupper() else "lower"


def phrasing_words(prompts: Sequence[str]) -> frozenset[str]:
    """Lower-cased words in at least PHRASING_SHARE of the distinct `prompts` (none below MIN_PHRASING_PROMPTS)."""
    distinct = set(prompts)
    if len(distinct) < MIN_PHRASING_PROMPTS:
        return frozenset()
    counts: dict[str, int] = {}
    for p in distinct:
        for w in {w.lower() for w in WORD.findall(p)}:
            counts[w] = counts.get(w, 0) + 1
    return frozenset(w for w, n in counts.items() if n >= PHRASING_SHARE * len(distinct))


def stated_values(prompt: str, essay: str, phrasing: frozenset[str] = frozenset()) -> list[tuple[int, int]]:
    """Character spans of the words of `essay` that state a value: numbers, and words of at least MIN_VALUE_LETTERS
    letters that the prompt also contains (case-insensitive), that are not `phrasing` (see `phrasing_words`) and that
    appear in fewer than TOPIC_SHARE of the essay's sentences (the topic's name appears in most of them)."""
    prompt_words = {w.lower() for w in WORD.findall(prompt)} - phrasing
    sentences = [essay[a:b].lower() for a, b in sentence_spans(essay)]
    out = []
    for m in WORD.finditer(essay):
        w = m.group()
        if w.isdigit():
            out.append(m.span())
            continue
        if len(w) < MIN_VALUE_LETTERS or w.lower() not in prompt_words:
            continue
        in_sentences = sum(re.search(rf"\b{re.escape(w.lower())}\b", s) is not None for s in sentences)
        if in_sentences < TOPIC_SHARE * max(len(sentences), 1):
            out.append(m.span())
    return out


def _replace(essay: str, a: int, b: int, new: str, kind: str) -> Tampered:
    return Tampered(essay[:a] + new + essay[b:], kind, (a, a + len(new)))


def swap_value(
    prompt: str, essay: str, donors: Sequence[tuple[str, str]], rng: np.random.Generator, phrasing: frozenset[str] = frozenset()
) -> Tampered | None:
    """Replace one stated value (`stated_values`) by another of its shape: a number by a different one of as many
    digits (no leading zero), a word by a donor's stated value of the same case that its prompt does not contain."""
    spans = stated_values(prompt, essay, phrasing)
    if not spans:
        return None
    donor_values: list[str] | None = None  # the donors' stated values, found once when a word is to be replaced
    order = rng.permutation(len(spans))
    for j in order:
        a, b = spans[j]
        old = essay[a:b]
        if old.isdigit():
            lo = 10 ** (len(old) - 1) if len(old) > 1 else 0
            choices = [v for v in range(lo, 10 ** len(old)) if str(v) != old] if len(old) <= 3 else None
            if choices is not None:
                new = str(choices[int(rng.integers(len(choices)))])
            else:
                new = old
                while new == old:
                    new = str(int(rng.integers(lo, 10 ** len(old))))
            return _replace(essay, a, b, new, "swap_value")
        if donor_values is None:
            donor_values = [d[x:y] for p, d in donors for x, y in stated_values(p, d, phrasing)]
        pool = sorted(
            {v for v in donor_values if _shape(v) == _shape(old) and v.lower() != old.lower() and v.lower() not in prompt.lower()}
        )
        if pool:
            return _replace(essay, a, b, pool[int(rng.integers(len(pool)))], "swap_value")
    return None


def duplicate(
    prompt: str, essay: str, donors: Sequence[tuple[str, str]], rng: np.random.Generator, phrasing: frozenset[str] = frozenset()
) -> Tampered | None:
    """Replace a sentence after the first by a copy of another sentence of the essay whose text differs."""
    spans = sentence_spans(essay)
    if len(spans) < 2:
        return None
    i = 1 + int(rng.integers(len(spans) - 1))
    others = [k for k in range(len(spans)) if k != i and essay[slice(*spans[k])] != essay[slice(*spans[i])]]
    if not others:
        return None
    k = others[int(rng.integers(len(others)))]
    return _replace(essay, *spans[i], essay[slice(*spans[k])], "duplicate")


def drop_last(
    prompt: str, essay: str, donors: Sequence[tuple[str, str]], rng: np.random.Generator, phrasing: frozenset[str] = frozenset()
) -> Tampered | None:
    """Remove the last sentence (and the whitespace before it)."""
    spans = sentence_spans(essay)
    if len(spans) < 2:
        return None
    cut = spans[-2][1]  # the previous sentence keeps its full stop (a span ends after it)
    return Tampered(essay[:cut], "drop_last", (cut, cut))


def splice(
    prompt: str, essay: str, donors: Sequence[tuple[str, str]], rng: np.random.Generator, phrasing: frozenset[str] = frozenset()
) -> Tampered | None:
    """Replace a sentence after the first by a sentence of a donor essay that this essay does not contain."""
    spans = sentence_spans(essay)
    if len(spans) < 2:
        return None
    own = {essay[a:b] for a, b in spans}
    pool = sorted({d[a:b] for _, d in donors for a, b in sentence_spans(d)} - own)
    if not pool:
        return None
    i = 1 + int(rng.integers(len(spans) - 1))
    return _replace(essay, *spans[i], pool[int(rng.integers(len(pool)))], "splice")


OPERATORS = {"swap_value": swap_value, "duplicate": duplicate, "drop_last": drop_last, "splice": splice}


def tamper(
    prompt: str,
    essay: str,
    kind: str,
    donors: Sequence[tuple[str, str]],
    rng: np.random.Generator,
    phrasing: frozenset[str] = frozenset(),
) -> Tampered | None:
    """`essay` tampered by operator `kind` (one of KINDS); donors: other (prompt, essay) texts to draw values and
    sentences from; phrasing: words that are never values (`phrasing_words`). None: nothing to tamper with."""
    if kind not in OPERATORS:
        raise ValueError(f"unknown tampering operator {kind!r}; known: {', '.join(KINDS)}")
    out = OPERATORS[kind](prompt, essay, donors, rng, phrasing)
    return out if out is not None and out.essay != essay else None


def synthetic_pairs(
    texts: Sequence[tuple[str, str]], n: int, kinds: Sequence[str], rng: np.random.Generator
) -> tuple[list[Pair], list[str]]:
    """Up to n pairs (original beats tampered) from (prompt, essay) `texts`, each made by an operator drawn uniformly
    from `kinds` on a text drawn uniformly; up to 8 other texts of other prompts are its donors, and the phrasing
    common to the texts' prompts is never a value. Returns the pairs and their kinds. Texts the drawn operator cannot
    change are skipped; at most 4 n draws are tried."""
    pairs: list[Pair] = []
    made: list[str] = []
    if not texts or not kinds or n <= 0:
        return pairs, made
    phrasing = phrasing_words([p for p, _ in texts])
    for _ in range(4 * n):
        if len(pairs) == n:
            break
        i = int(rng.integers(len(texts)))
        kind = kinds[int(rng.integers(len(kinds)))]
        prompt, essay = texts[i]
        donors = [texts[j] for j in rng.choice(len(texts), size=min(8, len(texts)), replace=False) if texts[j][0] != prompt]
        t = tamper(prompt, essay, kind, donors, rng, phrasing)
        if t is not None:
            pairs.append(Pair(prompt, essay, t.essay))
            made.append(kind)
    return pairs, made
