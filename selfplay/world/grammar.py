"""The sentence grammar of the essay world: kinds, attribute schemas, and the sentence templates (introduction,
fact, elaboration, conclusion) each compiled to a regex, so a sentence parses back into (template, slots) exactly."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

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
FACT_TEMPLATES = {
    (k, a.name): tuple(t for t in TEMPLATES if t.role == "fact" and t.kind == k and t.attr == a.name)
    for k in KINDS
    for a in SCHEMA[k]
}
INTROS = tuple(t for t in TEMPLATES if t.role == "intro")
CONCLUSIONS = tuple(t for t in TEMPLATES if t.role == "concl")
ELABORATIONS = {k: tuple(t for t in TEMPLATES if t.role == "elab" and t.kind == k) for k in KINDS}

_SENTENCE_END = re.compile(r"(?<=\.)\s+")


def sentence_spans(essay: str) -> list[tuple[int, int]]:
    """(start, end) character offsets in `essay` of its sentences: a sentence ends with '.' followed by whitespace
    (or the end); blank pieces are dropped."""
    lo, hi = len(essay) - len(essay.lstrip()), len(essay.rstrip())
    if hi <= lo:
        return []
    spans, start = [], lo
    for m in _SENTENCE_END.finditer(essay, lo, hi):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, hi))
    return [(a, b) for a, b in spans if essay[a:b].strip()]


def split_sentences(essay: str) -> list[str]:
    """The sentences of `sentence_spans`, runs of whitespace collapsed to one space."""
    return [" ".join(essay[a:b].split()) for a, b in sentence_spans(essay)]


def parse_sentence(
    sentence: str, valid: Callable[[Template, dict[str, str]], bool]
) -> tuple[Template, dict[str, str]] | None:
    """(template, slots) of the first template whose shape fits `sentence` and whose slots `valid` accepts
    (a world checks that the names are its own); None if no template fits."""
    m = _ALL_TEMPLATES.fullmatch(sentence)
    if m is None:
        return None
    first = int(m.lastgroup[1:])  # type: ignore[index]
    t = TEMPLATES[first]
    slots = {s: m.group(f"t{first}_{s}") for s in t.slots}
    if valid(t, slots):
        return t, slots
    for t in TEMPLATES[first + 1:]:  # the first shape that fits is not valid; a later one might be
        later = t.match(sentence)
        if later is not None and valid(t, later):
            return t, later
    return None
