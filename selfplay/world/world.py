"""The essay world of one seed: its entities and their facts, prompts (grounded and closed-book) and their
parsing, and the simulated human writers of the corpus, with their flaws; it grades with the gold grader."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from selfplay.config import FlawRates, UserError, WorldConfig
from selfplay.world import grader
from selfplay.world.grader import GoldScores
from selfplay.world.grammar import (
    A_KIND,
    ATTRIBUTES,
    ATTRIBUTES_PER_KIND,
    CONCLUSIONS,
    ELABORATIONS,
    FACT_TEMPLATES,
    INTROS,
    KINDS,
    NAME_RE,
    SCHEMA,
    TEMPLATES,
    Attribute,
    Template,
    parse_sentence,
)

MAX_ELABORATIONS = 2  # a human writer adds 0..MAX_ELABORATIONS elaboration sentences

Mode = Literal["grounded", "closed", "mixed"]

# ----------------------------------------------------------------------------------------------
# Prompts.
# ----------------------------------------------------------------------------------------------

_PROMPT_RE = re.compile(
    r"Write an essay about (?P<name>" + NAME_RE + r"), (?P<a_kind>" + "|".join(A_KIND.values())
    + r")\.(?: Facts: (?P<facts>[^.]+)\.)?"
)
_KIND_OF_A_KIND = {v: k for k, v in A_KIND.items()}
_SHEET_RES = {
    k: tuple((a, re.compile(re.escape(a.sheet).replace(r"\{value\}", f"(?P<value>{a.value_re})"))) for a in SCHEMA[k])
    for k in KINDS
}

class NotAWorldPrompt(UserError):
    """The text is not a prompt of this world (wrong shape, unknown entity, or a value outside the schema)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A parsed prompt: topic entity, its kind, and the fact sheet ((attribute, value) pairs; empty: closed-book)."""

    topic: str
    kind: str
    sheet: tuple[tuple[str, str], ...] = ()

    @property
    def grounded(self) -> bool:
        return bool(self.sheet)

    @property
    def mode(self) -> str:
        return "grounded" if self.sheet else "closed"

    @property
    def text(self) -> str:
        head = f"Write an essay about {self.topic}, {A_KIND[self.kind]}."
        if not self.sheet:
            return head
        facts = "; ".join(ATTRIBUTES[(self.kind, a)].sheet.format(value=v) for a, v in self.sheet)
        return f"{head} Facts: {facts}."

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------------------------
# The world.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    facts: dict[str, str]  # attribute -> value, for every attribute of the kind, in schema order


# Capitalised words of the grammar and the prompt; invented names never equal one of them.
_RESERVED = frozenset(
    w.lower()
    for text in [t.text for t in TEMPLATES]
    + [v for a in ATTRIBUTES.values() for v in a.values]
    + ["Write an essay about Facts"]
    for w in re.findall(r"[A-Za-z]+", text)
)

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "th", "tr", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd")


def _invent_names(n: int, rng: np.random.Generator) -> list[str]:
    """n unique pronounceable names: 2-3 syllables of onset + vowel + coda, no consonant pile-ups."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        parts: list[str] = []
        prev_coda = ""
        for i in range(int(rng.integers(2, 4))):
            if i == 0 and rng.random() < 0.2:
                onset = ""
            else:
                pool = _ONSETS if not prev_coda else tuple(o for o in _ONSETS if len(o) == 1)
                onset = pool[int(rng.integers(len(pool)))]
            coda = _CODAS[int(rng.integers(len(_CODAS)))]
            parts.append(onset + _VOWELS[int(rng.integers(len(_VOWELS)))] + coda)
            prev_coda = coda
        word = "".join(parts)
        if not 4 <= len(word) <= 10 or word in seen or word in _RESERVED:
            continue
        seen.add(word)
        names.append(word.capitalize())
    return names


class World:
    """The fact base of one seed, with prompts, simulated human writers and the gold grader (`grade`).

    Build with `World.from_config(cfg.world)`. Prompts and essays are plain strings; `parse_prompt`
    recovers the structure of a prompt from its text.
    """

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        self.seed = cfg.seed
        self.flaws = cfg.flaws
        rng = np.random.default_rng([cfg.seed, 0x57])  # the fact base's own stream
        names = _invent_names(cfg.n_entities, rng)
        kinds = [KINDS[i % len(KINDS)] for i in range(cfg.n_entities)]
        self.names_by_kind: dict[str, tuple[str, ...]] = {
            k: tuple(n for n, kk in zip(names, kinds) if kk == k) for k in KINDS
        }
        self._domains = {key: self._domain_list(a) for key, a in ATTRIBUTES.items()}
        self._domain_pos = {key: {v: i for i, v in enumerate(vs)} for key, vs in self._domains.items()}
        entities = []
        for name, kind in zip(names, kinds):
            facts = {}
            for a in SCHEMA[kind]:
                pool = self._domains[(kind, a.name)]
                facts[a.name] = pool[int(rng.integers(len(pool)))]
            entities.append(Entity(name, kind, facts))
        self.entities: tuple[Entity, ...] = tuple(entities)
        self.by_name: dict[str, Entity] = {e.name: e for e in self.entities}
        self._index = {e.name: i for i, e in enumerate(self.entities)}
        self._ref_names = {k: frozenset(v) for k, v in self.names_by_kind.items()}
        self._parse_cache: dict[str, tuple[Template, dict[str, str]] | None] = {}
        self._prompt_cache: dict[str, Prompt | None] = {}

    @classmethod
    def from_config(cls, cfg: WorldConfig) -> World:
        return cls(cfg)

    def _domain_list(self, a: Attribute) -> tuple[str, ...]:
        """The values the fact base and the writers draw from (any number parses; only these are drawn)."""
        if a.values:
            return a.values
        if a.numbers is not None:
            return tuple(str(x) for x in a.numbers)
        assert a.ref is not None
        return self.names_by_kind[a.ref]

    def _other_value(self, kind: str, attr: str, value: str, rng: np.random.Generator) -> str:
        """A value drawn uniformly from the attribute's domain without `value`."""
        pool = self._domains[(kind, attr)]
        at = self._domain_pos[(kind, attr)].get(value)
        if at is None:
            return pool[int(rng.integers(len(pool)))]
        j = int(rng.integers(len(pool) - 1))
        return pool[j + (j >= at)]

    # --- parsing ----------------------------------------------------------------------------

    def _valid_slots(self, t: Template, slots: dict[str, str]) -> bool:
        if slots["name"] not in self.by_name:
            return False
        if t.role == "fact":
            ref = ATTRIBUTES[(t.kind, t.attr)].ref
            if ref is not None and slots["value"] not in self._ref_names[ref]:
                return False
        return True

    def parse_sentence(self, sentence: str) -> tuple[Template, dict[str, str]] | None:
        """(template, slots) if the sentence is one of the grammar's, with names of this world; else None."""
        cached = self._parse_cache.get(sentence, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        result = parse_sentence(sentence, self._valid_slots)
        if len(self._parse_cache) >= 200_000:  # bounds memory on long runs of novel policy text
            self._parse_cache.clear()
        self._parse_cache[sentence] = result
        return result

    def parse_prompt(self, text: str) -> Prompt | None:
        """The prompt's topic, kind and sheet recovered from its text; None if it is not a prompt of this world."""
        if not isinstance(text, str):
            return None
        cached = self._prompt_cache.get(text, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        result = self._parse_prompt(text)
        if len(self._prompt_cache) >= 100_000:
            self._prompt_cache.clear()
        self._prompt_cache[text] = result
        return result

    def _parse_prompt(self, text: str) -> Prompt | None:
        m = _PROMPT_RE.fullmatch(text.strip())
        if m is None:
            return None
        kind = _KIND_OF_A_KIND[m["a_kind"]]
        ent = self.by_name.get(m["name"])
        if ent is None or ent.kind != kind:
            return None
        sheet: list[tuple[str, str]] = []
        if m["facts"] is not None:
            for phrase in m["facts"].split("; "):
                for a, rx in _SHEET_RES[kind]:
                    fm = rx.fullmatch(phrase)
                    if fm is not None and (a.ref is None or fm["value"] in self._ref_names[a.ref]):
                        sheet.append((a.name, fm["value"]))
                        break
                else:
                    return None
            if len({a for a, _ in sheet}) != len(sheet):
                return None
        return Prompt(ent.name, kind, tuple(sheet))

    def _as_prompt(self, prompt: str | Prompt) -> Prompt:
        if isinstance(prompt, Prompt):
            return prompt
        p = self.parse_prompt(prompt)
        if p is None:
            raise NotAWorldPrompt(
                f"not a prompt of this world (world.seed={self.seed}, world.n_entities={self.cfg.n_entities}): "
                f"{str(prompt)[:120]!r}"
            )
        return p

    # --- prompts and human essays --------------------------------------------------------------

    def sample_prompt(self, rng: np.random.Generator, mode: Mode = "mixed") -> Prompt:
        if mode not in ("grounded", "closed", "mixed"):
            raise ValueError(f"mode must be grounded, closed or mixed, got {mode!r}")
        ent = self.entities[int(rng.integers(len(self.entities)))]
        grounded = mode == "grounded" or (mode == "mixed" and rng.random() < self.cfg.grounded_fraction)
        if not grounded:
            return Prompt(ent.name, ent.kind)
        k = int(rng.integers(self.cfg.min_sheet_facts, self.cfg.max_sheet_facts + 1))
        chosen = sorted(rng.choice(ATTRIBUTES_PER_KIND, size=k, replace=False).tolist())
        attrs = SCHEMA[ent.kind]
        return Prompt(ent.name, ent.kind, tuple((attrs[i].name, ent.facts[attrs[i].name]) for i in chosen))

    def sample_prompts(self, n: int, rng: np.random.Generator, mode: Mode = "mixed") -> list[str]:
        """n prompt texts; mixed mode makes a prompt grounded with probability world.grounded_fraction."""
        return [self.sample_prompt(rng, mode).text for _ in range(n)]

    def fact_sentence(self, name: str, kind: str, attr: str, value: str, rng: np.random.Generator) -> str:
        options = FACT_TEMPLATES[(kind, attr)]
        return options[int(rng.integers(len(options)))].render(name=name, value=value)

    def human_essay(self, prompt: str | Prompt, rng: np.random.Generator, flaws: FlawRates | None = None) -> str:
        """An essay by a simulated human writer, with mistakes at the rates `flaws` (default: world.flaws).

        The writer states each asked fact (grounded: the sheet; closed-book: every true fact of the
        topic) unless it omits it (omit_fact, per asked fact); a stated fact gets another value with
        probability wrong_fact. Per essay: one true but unsupported fact about an attribute the sheet
        leaves out (unsupported_fact; grounded essays with such an attribute only), one true fact sentence
        about another entity (off_topic), one sentence said twice (repeat_sentence), no conclusion
        (no_conclusion). Around these: an introduction, 0..MAX_ELABORATIONS elaborations, a conclusion.
        """
        p = self._as_prompt(prompt)
        f = self.flaws if flaws is None else flaws
        ent = self.by_name[p.topic]
        kind = p.kind
        asked = p.sheet if p.grounded else tuple(ent.facts.items())
        body: list[str] = []
        for attr, value in asked:
            if rng.random() < f.omit_fact:
                continue
            if rng.random() < f.wrong_fact:
                value = self._other_value(kind, attr, value, rng)
            body.append(self.fact_sentence(p.topic, kind, attr, value, rng))
        if p.grounded and rng.random() < f.unsupported_fact:
            on_sheet = {a for a, _ in p.sheet}
            free = [a.name for a in SCHEMA[kind] if a.name not in on_sheet]
            if free:
                attr = free[int(rng.integers(len(free)))]
                body.append(self.fact_sentence(p.topic, kind, attr, ent.facts[attr], rng))
        if rng.random() < f.off_topic:
            i = int(rng.integers(len(self.entities) - 1))
            other = self.entities[i + (i >= self._index[ent.name])]
            attr = SCHEMA[other.kind][int(rng.integers(ATTRIBUTES_PER_KIND))].name
            body.append(self.fact_sentence(other.name, other.kind, attr, other.facts[attr], rng))
        elabs = ELABORATIONS[kind]
        n_elab = int(rng.integers(MAX_ELABORATIONS + 1))
        for j in rng.choice(len(elabs), size=n_elab, replace=False).tolist():
            body.append(elabs[j].render(name=p.topic))
        body = [body[j] for j in rng.permutation(len(body)).tolist()]
        intro = INTROS[int(rng.integers(len(INTROS)))]
        sentences = [intro.render(name=p.topic, a_kind=A_KIND[kind])] + body
        if rng.random() < f.repeat_sentence:
            j = int(rng.integers(len(sentences)))
            sentences.insert(int(rng.integers(j + 1, len(sentences) + 1)), sentences[j])
        if not rng.random() < f.no_conclusion:
            concl = CONCLUSIONS[int(rng.integers(len(CONCLUSIONS)))]
            sentences.append(concl.render(name=p.topic, kind=kind))
        return " ".join(sentences)

    def corpus(self, n: int, seed: int | None = None, mode: Mode = "mixed") -> list[tuple[str, str]]:
        """n (prompt, human essay) pairs; the same (world, seed) gives the same list, and corpus(k) is a
        prefix of corpus(n) for k <= n. seed defaults to world.seed."""
        rng = np.random.default_rng([self.seed, self.seed if seed is None else seed, 0xC0])
        out = []
        for _ in range(n):
            p = self.sample_prompt(rng, mode)
            out.append((p.text, self.human_essay(p, rng)))
        return out

    # --- the gold grader -------------------------------------------------------------------------

    def grade(self, prompt: str | Prompt, essay: str) -> GoldScores:
        """Gold sub-scores and score of `essay` for `prompt` (every definition: `selfplay.world.grader.grade`).

        Raises NotAWorldPrompt when the prompt is not one of this world's; never raises on the essay.
        """
        return grader.grade(self, self._as_prompt(prompt), essay)

    def grade_sentences(self, prompt: str | Prompt, essay: str) -> tuple[GoldScores, list[tuple[int, int, str, str]]]:
        """`grade`, and the verdict on each sentence with its character span (`selfplay.world.grader.grade_sentences`)."""
        return grader.grade_sentences(self, self._as_prompt(prompt), essay)

    def grade_batch(self, prompts: Sequence[str | Prompt], essays: Sequence[str]) -> list[GoldScores]:
        if len(prompts) != len(essays):
            raise ValueError(f"grade_batch got {len(prompts)} prompts but {len(essays)} essays")
        return [self.grade(p, e) for p, e in zip(prompts, essays)]
