"""The embedded essay world: a seeded fact base, prompts, simulated human writers, the exact gold grader
and the budgeted labeller that stands in for human preference labels.

Every sentence a writer can produce comes from one grammar of templates (`TEMPLATES`); each template
compiles to a regular expression, so the grader parses a sentence back into (template, slots) exactly.

Gold sub-scores (`GoldScores`), for a prompt about topic T of kind K. A sentence's *subject* is its
`{name}` slot; every template has one.

  repetition_rate  repeated sentences / sentences. A sentence is a repeat when its text (whitespace
                   collapsed) equals an earlier sentence's, or when it is a fact sentence restating an
                   earlier fact (same subject, attribute and value) with another template. Repeats are
                   counted here only; every other count below is over the *distinct* sentences.
  fluency          distinct sentences that parse against the grammar / distinct sentences.
  relevance        1 - off-topic / distinct sentences. Off-topic: a parsed sentence whose subject is
                   another entity of the world, or an introduction, elaboration or conclusion written
                   for another kind (e.g. a city elaboration in an essay about a river).
  claims           distinct parsed fact sentences whose subject is T. Each claim is exactly one of:
                   correct; *contradicting* (grounded: the attribute is on the sheet with another value;
                   closed-book: the value differs from the fact base; either mode: the attribute does
                   not belong to kind K); *unsupported* (grounded only: an attribute of K that the sheet
                   does not give, whatever its value; the sheet is the only allowed source).
  hallucination_rate   (contradicting + unsupported) / claims, 0 without claims; split into
                   contradiction_rate and unsupported_rate. Claims about other entities are off-topic,
                   not hallucinations, and are not checked for truth.
  coverage         asked facts stated correctly / asked facts. Asked: grounded, the sheet's facts (the
                   sheet is the truth, even where it differs from the fact base); closed-book, every
                   attribute of K with its fact-base value (all ATTRIBUTES_PER_KIND of them).
  structure        0.5 if the first sentence is an introduction naming T as a K, plus 0.5 if the last
                   sentence is a conclusion naming T (and K where the template names a kind).
  length           1 inside LENGTH_BAND words (whitespace-separated, the whole essay); below it
                   words / MIN_WORDS; above it max(0, 1 - (words - MAX_WORDS) / MAX_WORDS).

The gold score, in [0, 1]:

  score = W_COVERAGE * coverage + W_STRUCTURE * structure + W_FLUENCY * fluency
          + fluency * (W_HALLUCINATION * (1 - hallucination_rate) + W_REPETITION * (1 - repetition_rate)
                       + W_RELEVANCE * relevance + W_LENGTH * length)

The weights sum to 1, so an essay that states every asked fact correctly, claims nothing else,
opens with an introduction, closes with a conclusion, repeats nothing and fits the length band
scores exactly 1.0. The terms that reward the *absence* of a flaw are scaled by fluency, so text
that does not parse (empty, garbage) scores 0 instead of collecting credit for flaws it cannot have.
Each flaw moves only its own sub-score; the total moves with it. Closed-book honesty: adding a
wrong claim to k correct ones costs W_HALLUCINATION / (k + 1) and gains nothing, so an essay that
claims less beats one that invents.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from selfplay.config import FlawRates, UserError, WorldConfig

# ----------------------------------------------------------------------------------------------
# Gold score weights (they sum to 1) and the length band.
# ----------------------------------------------------------------------------------------------

W_COVERAGE = 0.30
W_HALLUCINATION = 0.25
W_REPETITION = 0.10
W_RELEVANCE = 0.10
W_STRUCTURE = 0.10
W_FLUENCY = 0.10
W_LENGTH = 0.05
MIN_WORDS = 15  # a perfect two-fact essay has at least 18 words
MAX_WORDS = 100  # the longest human essays have about 85 words
LENGTH_BAND = (MIN_WORDS, MAX_WORDS)
MAX_ELABORATIONS = 2  # a human writer adds 0..MAX_ELABORATIONS elaboration sentences

Mode = Literal["grounded", "closed", "mixed"]

# ----------------------------------------------------------------------------------------------
# Schema: kinds, attributes, their value domains, prompt phrases and sentence templates.
# ----------------------------------------------------------------------------------------------

NAME_RE = r"[A-Z][a-z]+"
NUMBER_RE = r"[1-9][0-9]{0,3}"  # any number parses; out-of-range values are wrong claims, not noise


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One attribute of a kind. Its domain is exactly one of: `values` (words), `numbers`, or `ref`
    (names of the world's entities of that kind)."""

    kind: str
    name: str
    sheet: str  # the prompt's fact-sheet phrase, with a {value} slot
    templates: tuple[str, ...]  # fact sentences, each with {name} and {value}
    values: tuple[str, ...] = ()
    numbers: range | None = None
    ref: str | None = None

    @property
    def value_re(self) -> str:
        if self.values:
            return "|".join(re.escape(v) for v in sorted(self.values, key=len, reverse=True))
        return NUMBER_RE if self.numbers is not None else NAME_RE


def _attr(kind: str, name: str, sheet: str, templates: Sequence[str], **domain) -> Attribute:
    return Attribute(kind, name, sheet, tuple(templates), **domain)


KINDS: tuple[str, ...] = ("city", "river", "animal", "inventor")
A_KIND = {"city": "a city", "river": "a river", "animal": "an animal", "inventor": "an inventor"}

SCHEMA: dict[str, tuple[Attribute, ...]] = {
    "city": (
        _attr("city", "founded", "founded in {value}", (
            "{name} was founded in {value}.",
            "The founding of {name} dates to {value}.",
            "{name} has stood since {value}.",
        ), numbers=range(800, 1800)),
        _attr("city", "river", "lies on the river {value}", (
            "{name} lies on the river {value}.",
            "The river {value} runs through {name}.",
            "{name} was built on the banks of the {value}.",
        ), ref="river"),
        _attr("city", "famous_for", "famous for {value}", (
            "{name} is famous for {value}.",
            "{name} is known far and wide for {value}.",
            "Visitors come to {name} for {value}.",
        ), values=("glassblowing", "silk weaving", "clockmaking", "its bridges", "its gardens",
                   "shipbuilding", "pottery", "its libraries", "spiced bread", "lacework")),
        _attr("city", "region", "in the {value}", (
            "{name} lies in the {value}.",
            "{name} is a city of the {value}.",
            "You will find {name} in the {value}.",
        ), values=("north", "south", "east", "west", "highlands", "lowlands", "midlands", "borderlands")),
        _attr("city", "population", "a {value} population", (
            "{name} has a {value} population.",
            "The population of {name} is {value}.",
            "{name} is home to a {value} population.",
        ), values=("small", "modest", "large", "vast")),
    ),
    "river": (
        _attr("river", "length", "{value} kilometres long", (
            "{name} is {value} kilometres long.",
            "{name} runs for {value} kilometres.",
            "From end to end, {name} measures {value} kilometres.",
        ), numbers=range(100, 2410, 10)),
        _attr("river", "source", "rises in {value}", (
            "{name} rises in {value}.",
            "The source of {name} lies in {value}.",
            "{name} begins in {value}.",
        ), values=("the Grey Hills", "the Iron Peaks", "the Cold Fells", "the Amber Ridge",
                   "the Pale Mountains", "the Green Downs", "the Red Crags", "the Misty Uplands")),
        _attr("river", "mouth", "flows into {value}", (
            "{name} flows into {value}.",
            "{name} empties into {value}.",
            "The mouth of {name} opens onto {value}.",
        ), values=("the Amber Sea", "the Northern Ocean", "the Bay of Storms", "the Salt Lake",
                   "the Quiet Sea", "the Western Gulf", "the Reed Delta", "the Bitter Lake")),
        _attr("river", "fish", "rich in {value}", (
            "{name} is rich in {value}.",
            "Fishers on {name} catch mostly {value}.",
            "{name} is full of {value}.",
        ), values=("salmon", "trout", "eels", "carp", "pike", "perch", "sturgeon", "catfish")),
        _attr("river", "colour", "{value} water", (
            "The water of {name} is {value}.",
            "{name} has {value} water.",
            "{name} runs {value} all year.",
        ), values=("green", "brown", "grey", "clear", "blue", "dark", "silver", "muddy")),
    ),
    "animal": (
        _attr("animal", "diet", "feeds on {value}", (
            "{name} feeds on {value}.",
            "The diet of {name} is mostly {value}.",
            "{name} eats {value}.",
        ), values=("grass", "insects", "fish", "fruit", "seeds", "leaves", "roots", "worms",
                   "small birds", "berries")),
        _attr("animal", "habitat", "lives in {value}", (
            "{name} lives in {value}.",
            "{name} makes its home in {value}.",
            "You can find {name} in {value}.",
        ), values=("forests", "marshes", "deserts", "mountains", "grasslands", "caves", "reefs", "riverbanks")),
        _attr("animal", "lifespan", "lives about {value} years", (
            "{name} lives for about {value} years.",
            "{name} can reach {value} years of age.",
            "The lifespan of {name} is about {value} years.",
        ), numbers=range(2, 61)),
        _attr("animal", "colour", "a {value} coat", (
            "{name} has a {value} coat.",
            "The coat of {name} is {value}.",
            "{name} is {value} in colour.",
        ), values=("grey", "red", "black", "white", "brown", "golden", "spotted", "striped")),
        _attr("animal", "call", "a {value} call", (
            "{name} calls with a {value}.",
            "The call of {name} is a {value}.",
            "You can hear the {value} of {name} at dusk.",
        ), values=("hum", "whistle", "bark", "click", "croak", "hiss", "chirp", "howl")),
    ),
    "inventor": (
        _attr("inventor", "born", "born in {value}", (
            "{name} was born in {value}.",
            "{name} came into the world in {value}.",
            "The birth year of {name} is {value}.",
        ), numbers=range(1500, 1900)),
        _attr("inventor", "hometown", "grew up in {value}", (
            "{name} grew up in {value}.",
            "The hometown of {name} is {value}.",
            "{name} was raised in {value}.",
        ), ref="city"),
        _attr("inventor", "invention", "invented {value}", (
            "{name} invented {value}.",
            "{name} is remembered for {value}.",
            "We owe {value} to {name}.",
        ), values=("the steam loom", "the brass compass", "the water clock", "the spring lock",
                   "the wind pump", "the glass lens", "the copper bell", "the printing roller",
                   "the pocket sundial", "the rope bridge")),
        _attr("inventor", "field", "worked in {value}", (
            "{name} worked in {value}.",
            "{name} studied {value}.",
            "The field of {name} was {value}.",
        ), values=("optics", "metallurgy", "mechanics", "chemistry", "astronomy", "hydraulics",
                   "acoustics", "navigation")),
        _attr("inventor", "material", "worked with {value}", (
            "{name} worked mostly with {value}.",
            "The favourite material of {name} was {value}.",
            "{name} built things from {value}.",
        ), values=("brass", "glass", "copper", "oak", "iron", "silver", "clay", "steel")),
    ),
}
ATTRIBUTES_PER_KIND = 5
ATTRIBUTES: dict[tuple[str, str], Attribute] = {(a.kind, a.name): a for k in KINDS for a in SCHEMA[k]}

INTRO_TEMPLATES = (
    "{name} is {a_kind} worth knowing.",
    "This essay is about {name}, {a_kind}.",
    "Let us look at {name}, {a_kind} with a story.",
    "Meet {name}, {a_kind} like no other.",
)
CONCLUSION_TEMPLATES = (
    "In short, {name} is well worth remembering.",
    "That is the story of {name}.",
    "There is no {kind} quite like {name}.",
    "To sum up, {name} deserves to be better known.",
)
ELABORATION_TEMPLATES = {
    "city": (
        "The streets of {name} are busy from dawn to dusk.",
        "Travellers often speak kindly of {name}.",
        "The old squares of {name} invite a slow walk.",
        "Life in {name} follows the seasons.",
    ),
    "river": (
        "Boats drift slowly along {name}.",
        "Willows lean over the banks of {name}.",
        "In spring {name} swells with rain.",
        "Many songs are sung about {name}.",
    ),
    "animal": (
        "{name} is a patient and careful creature.",
        "Few people have seen {name} up close.",
        "{name} moves quietly through its home.",
        "Stories about {name} are told to children.",
    ),
    "inventor": (
        "{name} kept careful notebooks.",
        "{name} often worked late into the night.",
        "Many later makers learned from {name}.",
        "{name} was never satisfied with a first attempt.",
    ),
}

_SLOT = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class Template:
    """One sentence template. role: intro | fact | elab | concl; kind is None for intro and concl."""

    index: int
    role: str
    kind: str | None
    attr: str | None
    text: str
    slots: tuple[str, ...]
    pattern: str  # regex source with groups named t{index}_{slot}
    regex: re.Pattern

    def render(self, **slots: str) -> str:
        return self.text.format(**slots)

    def match(self, sentence: str) -> dict[str, str] | None:
        """The slots if the sentence has this template's shape (slot values not yet checked against a world)."""
        m = self.regex.fullmatch(sentence)
        return None if m is None else {s: m.group(f"t{self.index}_{s}") for s in self.slots}


def _slot_re(slot: str, attr: Attribute | None) -> str:
    if slot == "name":
        return NAME_RE
    if slot == "value":
        assert attr is not None
        return attr.value_re
    if slot == "a_kind":
        return "|".join(A_KIND[k] for k in KINDS)
    if slot == "kind":
        return "|".join(KINDS)
    raise ValueError(f"unknown template slot {{{slot}}}")


def _compile_template(index: int, role: str, kind: str | None, attr: Attribute | None, text: str) -> Template:
    parts = _SLOT.split(text)  # literal, slot, literal, slot, ..., literal
    slots = tuple(parts[1::2])
    if "name" not in slots or len(set(slots)) != len(slots):
        raise ValueError(f"template {text!r} must have one {{name}} slot and no slot twice")
    src = "".join(
        re.escape(p) if i % 2 == 0 else f"(?P<t{index}_{p}>{_slot_re(p, attr)})" for i, p in enumerate(parts)
    )
    return Template(index, role, kind, attr.name if attr else None, text, slots, src, re.compile(src))


def _build_templates() -> tuple[Template, ...]:
    specs: list[tuple[str, str | None, Attribute | None, str]] = []
    specs += [("intro", None, None, t) for t in INTRO_TEMPLATES]
    specs += [("concl", None, None, t) for t in CONCLUSION_TEMPLATES]
    for k in KINDS:
        specs += [("elab", k, None, t) for t in ELABORATION_TEMPLATES[k]]
        for a in SCHEMA[k]:
            specs += [("fact", k, a, t) for t in a.templates]
    return tuple(_compile_template(i, role, k, a, t) for i, (role, k, a, t) in enumerate(specs))


TEMPLATES: tuple[Template, ...] = _build_templates()
# One alternation of every template: a sentence is matched by C code in one call; group t{i} names the template.
_ALL_TEMPLATES = re.compile("|".join(f"(?P<t{t.index}>{t.pattern})" for t in TEMPLATES))
_FACT_TEMPLATES = {
    (k, a.name): tuple(t for t in TEMPLATES if t.role == "fact" and t.kind == k and t.attr == a.name)
    for k in KINDS
    for a in SCHEMA[k]
}
_INTROS = tuple(t for t in TEMPLATES if t.role == "intro")
_CONCLUSIONS = tuple(t for t in TEMPLATES if t.role == "concl")
_ELABORATIONS = {k: tuple(t for t in TEMPLATES if t.role == "elab" and t.kind == k) for k in KINDS}

_PROMPT_RE = re.compile(
    r"Write an essay about (?P<name>" + NAME_RE + r"), (?P<a_kind>" + "|".join(A_KIND.values())
    + r")\.(?: Facts: (?P<facts>[^.]+)\.)?"
)
_KIND_OF_A_KIND = {v: k for k, v in A_KIND.items()}
_SHEET_RES = {
    k: tuple((a, re.compile(re.escape(a.sheet).replace(r"\{value\}", f"(?P<value>{a.value_re})"))) for a in SCHEMA[k])
    for k in KINDS
}
_SENTENCE_END = re.compile(r"(?<=\.)\s+")

# Capitalised words of the grammar and the prompt; invented names never equal one of them.
_RESERVED = frozenset(
    w.lower()
    for text in [t.text for t in TEMPLATES]
    + [v for a in ATTRIBUTES.values() for v in a.values]
    + ["Write an essay about Facts"]
    for w in re.findall(r"[A-Za-z]+", text)
)


class NotAWorldPrompt(UserError):
    """The text is not a prompt of this world (wrong shape, unknown entity, or a value outside the schema)."""


# ----------------------------------------------------------------------------------------------
# Prompts.
# ----------------------------------------------------------------------------------------------


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
# Gold scores.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class GoldScores:
    """The gold grader's verdict on one essay; see the module docstring for every definition."""

    score: float
    coverage: float
    hallucination_rate: float
    contradiction_rate: float
    unsupported_rate: float
    repetition_rate: float
    relevance: float
    structure: float
    fluency: float
    length: float
    n_sentences: int
    n_words: int
    n_asked: int
    n_covered: int
    n_claims: int
    n_contradicting: int
    n_unsupported: int
    n_hallucinated: int
    n_repeated: int
    n_off_topic: int
    n_unparsed: int
    has_intro: int
    has_conclusion: int

    def to_dict(self) -> dict[str, float | int]:
        return {f: getattr(self, f) for f in GOLD_FIELDS}


GOLD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GoldScores))
# The best value of each rate-type sub-score; every other fraction is best at 1.
BEST: dict[str, float] = {
    "score": 1.0, "coverage": 1.0, "hallucination_rate": 0.0, "contradiction_rate": 0.0,
    "unsupported_rate": 0.0, "repetition_rate": 0.0, "relevance": 1.0, "structure": 1.0,
    "fluency": 1.0, "length": 1.0,
}


def mean_scores(scores: Iterable[GoldScores]) -> dict[str, float]:
    """Field-wise mean over a non-empty collection of scores."""
    rows = [s.to_dict() for s in scores]
    if not rows:
        raise ValueError("mean_scores needs at least one GoldScores")
    return {f: float(sum(r[f] for r in rows) / len(rows)) for f in GOLD_FIELDS}


def length_score(n_words: int) -> float:
    if n_words < MIN_WORDS:
        return n_words / MIN_WORDS
    if n_words > MAX_WORDS:
        return max(0.0, 1.0 - (n_words - MAX_WORDS) / MAX_WORDS)
    return 1.0


def split_sentences(essay: str) -> list[str]:
    """Sentences end with '.' followed by whitespace (or the end); runs of whitespace collapse to one space."""
    return [" ".join(s.split()) for s in _SENTENCE_END.split(essay.strip()) if s.strip()]


# ----------------------------------------------------------------------------------------------
# The world.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    facts: dict[str, str]  # attribute -> value, for every attribute of the kind, in schema order


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
    """The fact base of one seed, with prompts, simulated human writers and the gold grader.

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
    def from_config(cls, cfg: WorldConfig) -> "World":
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
        result = None
        m = _ALL_TEMPLATES.fullmatch(sentence)
        if m is not None:
            first = int(m.lastgroup[1:])  # type: ignore[index]
            t = TEMPLATES[first]
            slots = {s: m.group(f"t{first}_{s}") for s in t.slots}
            if self._valid_slots(t, slots):
                result = (t, slots)
            else:  # the first shape that fits names no entity of this world; a later one might
                for t in TEMPLATES[first + 1:]:
                    slots = t.match(sentence)  # type: ignore[assignment]
                    if slots is not None and self._valid_slots(t, slots):
                        result = (t, slots)
                        break
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
        options = _FACT_TEMPLATES[(kind, attr)]
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
        elabs = _ELABORATIONS[kind]
        n_elab = int(rng.integers(MAX_ELABORATIONS + 1))
        for j in rng.choice(len(elabs), size=n_elab, replace=False).tolist():
            body.append(elabs[j].render(name=p.topic))
        body = [body[j] for j in rng.permutation(len(body)).tolist()]
        intro = _INTROS[int(rng.integers(len(_INTROS)))]
        sentences = [intro.render(name=p.topic, a_kind=A_KIND[kind])] + body
        if rng.random() < f.repeat_sentence:
            j = int(rng.integers(len(sentences)))
            sentences.insert(int(rng.integers(j + 1, len(sentences) + 1)), sentences[j])
        if not rng.random() < f.no_conclusion:
            concl = _CONCLUSIONS[int(rng.integers(len(_CONCLUSIONS)))]
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
        """Gold sub-scores and score of `essay` for `prompt` (see the module docstring).

        Raises NotAWorldPrompt when the prompt is not one of this world's; never raises on the essay.
        """
        p = self._as_prompt(prompt)
        if isinstance(essay, (bytes, bytearray)):
            essay = bytes(essay).decode("utf-8", errors="replace")
        elif not isinstance(essay, str):
            essay = ""
        topic, kind = p.topic, p.kind
        asked = dict(p.sheet) if p.grounded else self.by_name[topic].facts
        sentences = split_sentences(essay)
        n = len(sentences)
        seen: set = set()
        covered: set[str] = set()
        n_repeated = n_unparsed = n_off = n_claims = n_contra = n_unsup = 0
        parses: list[tuple[Template, dict[str, str]] | None] = []
        for s in sentences:
            parsed = self.parse_sentence(s)
            parses.append(parsed)
            keys = [("text", s)]
            if parsed is not None and parsed[0].role == "fact":
                t, slots = parsed
                keys.append(("fact", slots["name"], t.kind, t.attr, slots["value"]))
            if any(k in seen for k in keys):
                n_repeated += 1
                continue
            seen.update(keys)
            if parsed is None:
                n_unparsed += 1
                continue
            t, slots = parsed
            if slots["name"] != topic or (t.role != "fact" and slots.get("kind", t.kind or kind) != kind) or (
                "a_kind" in slots and slots["a_kind"] != A_KIND[kind]
            ):
                n_off += 1
                continue
            if t.role != "fact":
                continue
            n_claims += 1
            value = slots["value"]
            if t.kind != kind:
                n_contra += 1
            elif t.attr in asked:
                if asked[t.attr] == value:  # type: ignore[index]
                    covered.add(t.attr)  # type: ignore[arg-type]
                else:
                    n_contra += 1
            else:
                n_unsup += 1  # grounded only: closed-book asks every attribute of the kind
        n_distinct = n - n_repeated
        first, last = (parses[0], parses[-1]) if parses else (None, None)
        has_intro = int(
            first is not None and first[0].role == "intro" and first[1]["name"] == topic
            and first[1]["a_kind"] == A_KIND[kind]
        )
        has_conclusion = int(
            last is not None and last[0].role == "concl" and last[1]["name"] == topic
            and last[1].get("kind", kind) == kind
        )
        n_words = len(essay.split())
        n_asked = len(asked)
        coverage = len(covered) / n_asked
        n_hall = n_contra + n_unsup
        hall = n_hall / n_claims if n_claims else 0.0
        repetition = n_repeated / n if n else 0.0
        fluency = (n_distinct - n_unparsed) / n_distinct if n_distinct else 0.0
        relevance = 1.0 - n_off / n_distinct if n_distinct else 0.0
        structure = 0.5 * has_intro + 0.5 * has_conclusion
        length = length_score(n_words)
        score = (
            W_COVERAGE * coverage + W_STRUCTURE * structure + W_FLUENCY * fluency
            + fluency * (W_HALLUCINATION * (1.0 - hall) + W_REPETITION * (1.0 - repetition)
                         + W_RELEVANCE * relevance + W_LENGTH * length)
        )
        return GoldScores(
            score=min(1.0, max(0.0, round(score, 12))),
            coverage=coverage,
            hallucination_rate=hall,
            contradiction_rate=n_contra / n_claims if n_claims else 0.0,
            unsupported_rate=n_unsup / n_claims if n_claims else 0.0,
            repetition_rate=repetition,
            relevance=relevance,
            structure=structure,
            fluency=fluency,
            length=length,
            n_sentences=n,
            n_words=n_words,
            n_asked=n_asked,
            n_covered=len(covered),
            n_claims=n_claims,
            n_contradicting=n_contra,
            n_unsupported=n_unsup,
            n_hallucinated=n_hall,
            n_repeated=n_repeated,
            n_off_topic=n_off,
            n_unparsed=n_unparsed,
            has_intro=has_intro,
            has_conclusion=has_conclusion,
        )

    def grade_batch(self, prompts: Sequence[str | Prompt], essays: Sequence[str]) -> list[GoldScores]:
        if len(prompts) != len(essays):
            raise ValueError(f"grade_batch got {len(prompts)} prompts but {len(essays)} essays")
        return [self.grade(p, e) for p, e in zip(prompts, essays)]


# ----------------------------------------------------------------------------------------------
# The labeller: the gold grader playing a human who labels a budget of comparisons.
# ----------------------------------------------------------------------------------------------


class BudgetExhausted(UserError):
    """More comparison labels were asked for than the labeller's budget has left."""


class Labeller:
    """Labels pairs of essays by the gold score: 0 if essay A is preferred, 1 if essay B.

    Ties go to a seeded fair coin; then each label is flipped with probability `noise`. Every
    labelled pair counts against `budget`; a request for more labels than remain raises
    BudgetExhausted before labelling any of them. Two uniforms are drawn per pair whatever the
    outcome, so the random stream depends only on the number of labels given.
    """

    def __init__(self, world: World, budget: int, noise: float = 0.0, seed: int = 0):
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"label budget must be a non-negative integer, got {budget!r}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"label noise must be a probability in [0, 1], got {noise}")
        self.world = world
        self.budget = int(budget)
        self.noise = float(noise)
        self.used = 0
        self._rng = np.random.default_rng([seed, 0x1AB])

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def label(self, prompt: str | Prompt, essay_a: str, essay_b: str) -> int:
        return int(self.label_batch([prompt], [essay_a], [essay_b])[0])

    def label_batch(
        self, prompts: Sequence[str | Prompt], essays_a: Sequence[str], essays_b: Sequence[str]
    ) -> np.ndarray:
        """int32 [k] labels (0: A preferred, 1: B preferred) for k pairs; uses k of the budget."""
        k = len(prompts)
        if len(essays_a) != k or len(essays_b) != k:
            raise ValueError(f"label_batch got {k} prompts, {len(essays_a)} essays A, {len(essays_b)} essays B")
        if k > self.remaining:
            raise BudgetExhausted(
                f"label budget exhausted: {k} label(s) asked, {self.remaining} of {self.budget} left "
                "(raise critic.label_budget)"
            )
        parsed = [self.world._as_prompt(p) for p in prompts]  # a bad prompt fails before any budget is used
        out = np.empty(k, np.int32)
        for i, (p, a, b) in enumerate(zip(parsed, essays_a, essays_b)):
            coin, flip = self._rng.random(2)
            sa, sb = self.world.grade(p, a).score, self.world.grade(p, b).score
            pref = 0 if sa > sb else 1 if sb > sa else int(coin < 0.5)
            out[i] = pref ^ int(flip < self.noise)
        self.used += k
        return out

    def state_dict(self) -> dict:
        """Plain JSON-able state: labels used and the PCG64 state (its 128-bit integers as decimal strings)."""
        s = self._rng.bit_generator.state
        return {
            "used": self.used,
            "rng": {
                "bit_generator": s["bit_generator"],
                "state": str(s["state"]["state"]),
                "inc": str(s["state"]["inc"]),
                "has_uint32": int(s["has_uint32"]),
                "uinteger": int(s["uinteger"]),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        r = state["rng"]
        if r["bit_generator"] != type(self._rng.bit_generator).__name__:
            raise ValueError(f"labeller state holds a {r['bit_generator']} generator, expected PCG64")
        self._rng.bit_generator.state = {
            "bit_generator": r["bit_generator"],
            "state": {"state": int(r["state"]), "inc": int(r["inc"])},
            "has_uint32": int(r["has_uint32"]),
            "uinteger": int(r["uinteger"]),
        }
        self.used = int(state["used"])
