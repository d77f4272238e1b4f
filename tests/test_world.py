"""The embedded essay world: fact base, grammar, prompts, human corpus, gold grader and labeller."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import zlib

import numpy as np
import pytest

from selfplay.config import FlawRates, WorldConfig
from selfplay.world import (
    A_KIND,
    ATTRIBUTES,
    BEST,
    KINDS,
    SCHEMA,
    TEMPLATES,
    BudgetExhausted,
    Labeller,
    NotAWorldPrompt,
    Prompt,
    World,
    grader,
    grammar,
)
from selfplay.world import world as world_module

NO_FLAWS = FlawRates(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def world() -> World:
    return World.from_config(WorldConfig())


def _slot_pool(world: World, t: grammar.Template, slot: str) -> list[str]:
    if slot == "name":
        return list(world.names_by_kind[t.kind]) if t.kind else [e.name for e in world.entities]
    if slot == "value":
        return list(world._domains[(t.kind, t.attr)])
    if slot == "a_kind":
        return list(A_KIND.values())
    return list(KINDS)


def _prompt(world: World, rng: np.random.Generator, n_facts: int | None) -> Prompt:
    """A random prompt with exactly n_facts sheet facts (None: closed-book)."""
    ent = world.entities[int(rng.integers(len(world.entities)))]
    if n_facts is None:
        return Prompt(ent.name, ent.kind)
    idx = sorted(rng.choice(grammar.ATTRIBUTES_PER_KIND, n_facts, replace=False).tolist())
    return Prompt(ent.name, ent.kind, tuple((a.name, ent.facts[a.name]) for a in (SCHEMA[ent.kind][i] for i in idx)))


def _off_best(s: grader.GoldScores) -> set[str]:
    return {k for k, best in BEST.items() if k != "score" and getattr(s, k) != best}


# --- fact base ---------------------------------------------------------------------------------


def test_fact_base_is_complete_and_names_are_unique(world: World):
    assert len(world.entities) == 300
    assert len(KINDS) >= 4 and all(len(SCHEMA[k]) >= 5 for k in KINDS)
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    for e in world.entities:
        assert re.fullmatch(r"[A-Z][a-z]{3,9}", e.name), e.name
        assert e.name.lower() not in world_module._RESERVED
        assert list(e.facts) == [a.name for a in SCHEMA[e.kind]]
        for a in SCHEMA[e.kind]:
            assert e.facts[a.name] in world._domains[(e.kind, a.name)]
            if a.ref:
                assert world.by_name[e.facts[a.name]].kind == a.ref
    assert {k: len(v) for k, v in world.names_by_kind.items()} == {k: 75 for k in KINDS}


def test_same_seed_same_world_and_corpus_other_seed_differs():
    a, b = World.from_config(WorldConfig(seed=3)), World.from_config(WorldConfig(seed=3))
    c = World.from_config(WorldConfig(seed=4))
    assert a.entities == b.entities
    assert a.corpus(50, seed=1) == b.corpus(50, seed=1)
    assert a.corpus(20, seed=1) == a.corpus(50, seed=1)[:20]
    assert a.corpus(50, seed=1) != a.corpus(50, seed=2)
    assert [e.name for e in a.entities] != [e.name for e in c.entities]
    assert a.corpus(50, seed=1) != c.corpus(50, seed=1)


def test_small_world_works():
    w = World.from_config(WorldConfig(n_entities=8))
    for p, e in w.corpus(200, seed=0):
        s = w.grade(p, e)
        assert s.fluency == 1.0 and s.has_intro == 1


# --- grammar -------------------------------------------------------------------------------------


def test_every_template_parses_back_to_itself_and_no_other(world: World):
    rng = np.random.default_rng(0)
    for t in TEMPLATES:
        # Every non-name slot value exhaustively (numbers: a sample), names at random, plus random draws.
        pools = {s: _slot_pool(world, t, s) for s in t.slots}
        fixed = {s: (p if s != "name" and len(p) <= 12 else [p[int(i)] for i in rng.integers(len(p), size=6)])
                 for s, p in pools.items()}
        cases = [dict(zip(fixed, combo)) for combo in itertools.product(*fixed.values())]
        cases += [{s: p[int(rng.integers(len(p)))] for s, p in pools.items()} for _ in range(60)]
        for slots in cases:
            sentence = t.render(**slots)
            parsed = world.parse_sentence(sentence)
            assert parsed is not None, sentence
            assert parsed[0] is t and parsed[1] == slots, (sentence, parsed)
            # Unambiguous even before names are checked against the world: one template's shape fits.
            assert [u.index for u in TEMPLATES if u.match(sentence) is not None] == [t.index], sentence


def test_grammar_invariants():
    for t in TEMPLATES:
        assert "name" in t.slots and t.text.endswith(".") and t.text.count(".") == 1, t.text
    for a in ATTRIBUTES.values():
        assert len(a.templates) >= 3
        assert sum(x is not None and x != () for x in (a.values or None, a.numbers, a.ref)) == 1
        for v in a.values:
            assert "." not in v and ";" not in v
    for k in KINDS:
        assert len(grammar.ELABORATIONS[k]) >= 3
    assert len(grammar.INTROS) >= 3 and len(grammar.CONCLUSIONS) >= 3


def test_shortest_perfect_essay_is_inside_the_length_band():
    def words(template: str, value_words: int) -> int:
        # {name} is one word; {a_kind} two; {kind} one; {value} as given.
        return len(template.replace("{a_kind}", "a x").split()) + (value_words - 1 if "{value}" in template else 0)

    intro = min(words(t, 0) for t in grammar.INTRO_TEMPLATES)
    concl = min(words(t, 0) for t in grammar.CONCLUSION_TEMPLATES)
    for k in KINDS:
        per_attr = sorted(
            min(words(t, min(len(v.split()) for v in (a.values or ("1",)))) for t in a.templates) for a in SCHEMA[k]
        )
        assert intro + per_attr[0] + per_attr[1] + concl >= grader.MIN_WORDS


# --- prompts -------------------------------------------------------------------------------------


def test_prompts_round_trip_and_are_short(world: World):
    rng = np.random.default_rng(1)
    for mode in ("grounded", "closed", "mixed"):
        for text in world.sample_prompts(300, rng, mode):
            p = world.parse_prompt(text)
            assert p is not None and p.text == text
            ent = world.by_name[p.topic]
            assert p.kind == ent.kind
            if mode == "grounded":
                assert 2 <= len(p.sheet) <= 5
            if mode == "closed":
                assert p.sheet == ()
            assert all(ent.facts[a] == v for a, v in p.sheet)
            assert len(text.split()) <= 40
    text = Prompt("Velmo", "city").text
    assert text == "Write an essay about Velmo, a city."


def test_prompt_example_and_sheet_phrases(world: World):
    ent = world.names_by_kind["city"][0]
    e = world.by_name[ent]
    p = Prompt(ent, "city", (("founded", e.facts["founded"]), ("river", e.facts["river"]), ("famous_for", e.facts["famous_for"])))
    assert p.text == (
        f"Write an essay about {ent}, a city. Facts: founded in {e.facts['founded']}; "
        f"lies on the river {e.facts['river']}; famous for {e.facts['famous_for']}."
    )
    assert world.parse_prompt(p.text) == p
    # Every sheet phrase with every value parses to its own attribute only.
    for k in KINDS:
        for a in SCHEMA[k]:
            for v in world._domains[(k, a.name)][:40]:
                phrase = a.sheet.format(value=v)
                assert [b.name for b, rx in world_module._SHEET_RES[k] if rx.fullmatch(phrase)] == [a.name]


@pytest.mark.parametrize(
    "make",
    [
        lambda w, c, r: "",
        lambda w, c, r: "hello world",
        lambda w, c, r: "Write an essay about Zzzzqx, a city.",
        lambda w, c, r: f"Write an essay about {c}, a river.",  # wrong kind
        lambda w, c, r: f"Write an essay about {c}, a city. Facts: founded in 1200; founded in 1300.",
        lambda w, c, r: f"Write an essay about {c}, a city. Facts: founded in 1200; famous for dancing.",
        lambda w, c, r: f"Write an essay about {c}, a city. Facts: lies on the river {c}.",  # not a river
        lambda w, c, r: f"Write an essay about {c}, a city. Facts: feeds on grass.",  # another kind's attribute
        lambda w, c, r: f"Write an essay about {c}, a city. Facts: .",
        lambda w, c, r: f"Write an essay about {c}, a city. Extra.",
        lambda w, c, r: f"Write an essay about {c}, a city.  Facts: founded in 1200.",
    ],
)
def test_non_world_prompts_are_rejected(world: World, make):
    city = world.names_by_kind["city"][0]
    text = make(world, city, world.names_by_kind["river"][0])
    assert world.parse_prompt(text) is None
    with pytest.raises(NotAWorldPrompt):
        world.grade(text, "Anything.")


# --- the gold grader -----------------------------------------------------------------------------


def test_perfect_essays_get_the_documented_maximum(world: World):
    rng = np.random.default_rng(2)
    assert math.isclose(
        grader.W_COVERAGE + grader.W_HALLUCINATION + grader.W_REPETITION + grader.W_RELEVANCE
        + grader.W_STRUCTURE + grader.W_FLUENCY + grader.W_LENGTH,
        1.0,
    )
    for n_facts in (None, 2, 3, 4, 5):
        for _ in range(150):
            p = _prompt(world, rng, n_facts)
            essay = world.human_essay(p, rng, NO_FLAWS)
            s = world.grade(p.text, essay)
            assert s.score == 1.0, (essay, s)
            assert _off_best(s) == set()
            assert s.n_covered == s.n_asked == (len(p.sheet) or 5) == s.n_claims
            assert s.has_intro == s.has_conclusion == 1


def _facts_of(world: World, essay_sentences: list[str], topic: str) -> list[int]:
    out = []
    for i, s in enumerate(essay_sentences):
        t, slots = world.parse_sentence(s)
        if t.role == "fact" and slots["name"] == topic:
            out.append(i)
    return out


def _inject(world: World, p: Prompt, sents: list[str], flaw: str, rng: np.random.Generator) -> list[str]:
    """A copy of a perfect essay's sentences with one flaw of the given kind."""
    s = list(sents)
    facts = _facts_of(world, s, p.topic)
    ent = world.by_name[p.topic]
    if flaw == "omit":
        del s[facts[int(rng.integers(len(facts)))]]
    elif flaw == "wrong":
        i = facts[int(rng.integers(len(facts)))]
        t, slots = world.parse_sentence(s[i])
        s[i] = t.render(name=p.topic, value=world._other_value(p.kind, t.attr, slots["value"], rng))
    elif flaw == "extra_contradiction":  # a wrong restatement next to the correct one
        t, slots = world.parse_sentence(s[facts[0]])
        s.insert(-1, world.fact_sentence(p.topic, p.kind, t.attr, world._other_value(p.kind, t.attr, slots["value"], rng), rng))
    elif flaw == "foreign_attribute":  # an attribute that the topic's kind does not have
        other_kind = KINDS[(KINDS.index(p.kind) + 1) % len(KINDS)]
        a = SCHEMA[other_kind][0]
        s.insert(-1, world.fact_sentence(p.topic, other_kind, a.name, world._domains[(other_kind, a.name)][0], rng))
    elif flaw == "unsupported":
        on_sheet = {a for a, _ in p.sheet}
        free = [a.name for a in SCHEMA[p.kind] if a.name not in on_sheet]
        a = free[int(rng.integers(len(free)))]
        s.insert(-1, world.fact_sentence(p.topic, p.kind, a, ent.facts[a], rng))
    elif flaw == "repeat":
        i = int(rng.integers(len(s) - 1))
        s.insert(int(rng.integers(i + 1, len(s))), s[i])
    elif flaw == "restate":  # the same fact again, said with another template
        t, slots = world.parse_sentence(s[facts[0]])
        other = [u for u in grammar.FACT_TEMPLATES[(p.kind, t.attr)] if u is not t][0]
        s.insert(-1, other.render(**slots))
    elif flaw == "off_topic":
        other = next(e for e in world.entities if e.name != p.topic)
        a = SCHEMA[other.kind][int(rng.integers(5))].name
        s.insert(int(rng.integers(1, len(s))), world.fact_sentence(other.name, other.kind, a, other.facts[a], rng))
    elif flaw == "foreign_elaboration":
        other_kind = KINDS[(KINDS.index(p.kind) + 1) % len(KINDS)]
        s.insert(1, grammar.ELABORATIONS[other_kind][0].render(name=p.topic))
    elif flaw == "no_conclusion":
        del s[-1]
    elif flaw == "no_intro":
        del s[0]
    elif flaw == "unparsed":
        s.insert(int(rng.integers(1, len(s))), "The moon is made of cheese.")
    else:
        raise AssertionError(flaw)
    return s


# flaw -> (sub-scores allowed to leave their best, counters that must become non-zero)
FLAW_EFFECTS = {
    "omit": ({"coverage"}, []),
    "wrong": ({"coverage", "hallucination_rate", "contradiction_rate"}, ["n_contradicting"]),
    "extra_contradiction": ({"hallucination_rate", "contradiction_rate"}, ["n_contradicting"]),
    "foreign_attribute": ({"hallucination_rate", "contradiction_rate"}, ["n_contradicting"]),
    "unsupported": ({"hallucination_rate", "unsupported_rate"}, ["n_unsupported"]),
    "repeat": ({"repetition_rate"}, ["n_repeated"]),
    "restate": ({"repetition_rate"}, ["n_repeated"]),
    "off_topic": ({"relevance"}, ["n_off_topic"]),
    "foreign_elaboration": ({"relevance"}, ["n_off_topic"]),
    "no_conclusion": ({"structure"}, []),
    "no_intro": ({"structure"}, []),
    "unparsed": ({"fluency"}, ["n_unparsed"]),
}


@pytest.mark.parametrize("flaw", sorted(FLAW_EFFECTS))
@pytest.mark.parametrize("mode", ["grounded", "closed"])
def test_each_flaw_moves_exactly_its_own_subscores(world: World, flaw: str, mode: str):
    if flaw == "unsupported" and mode == "closed":
        pytest.skip("closed-book asks every attribute, so nothing is unsupported")
    allowed, counters = FLAW_EFFECTS[flaw]
    rng = np.random.default_rng(zlib.crc32(f"{flaw}/{mode}".encode()))
    for _ in range(40):
        # A 4-fact sheet leaves one attribute free for an unsupported claim; closed-book asks all 5.
        p = _prompt(world, rng, 4 if mode == "grounded" else None)
        sents = grammar.split_sentences(world.human_essay(p, rng, NO_FLAWS))
        bad = _inject(world, p, sents, flaw, rng)
        s = world.grade(p.text, " ".join(bad))
        assert _off_best(s) == allowed, (flaw, bad, s)
        assert s.score < 1.0
        for c in counters:
            assert getattr(s, c) == 1, (c, s)
        if flaw in ("no_conclusion", "no_intro"):
            assert s.structure == 0.5 and s.has_conclusion + s.has_intro == 1


FLAW_VERDICT = {"wrong": "contradicting", "extra_contradiction": "contradicting", "foreign_attribute": "contradicting",
                "unsupported": "unsupported", "repeat": "repeated", "restate": "repeated", "off_topic": "off_topic",
                "foreign_elaboration": "off_topic", "unparsed": "unparsed"}


def test_sentence_verdicts_name_the_flaw_and_add_up_to_the_scores(world: World):
    """grade_sentences: the spans are the grader's sentences; a perfect essay has only correct claims and on-topic
    framing; one injected flaw gives exactly one sentence its verdict; the verdicts count what the scores count."""
    rng = np.random.default_rng(14)
    for flaw, verdict in FLAW_VERDICT.items():
        for _ in range(10):
            p = _prompt(world, rng, 4)
            sents = grammar.split_sentences(world.human_essay(p, rng, NO_FLAWS))
            essay = "  ".join(_inject(world, p, sents, flaw, rng)) + "\n"
            s, judged = world.grade_sentences(p.text, essay)
            assert s == world.grade(p.text, essay)
            assert [" ".join(essay[a:b].split()) for a, b, _, _ in judged] == grammar.split_sentences(essay)
            kinds = [v for _, _, v, _ in judged]
            for where in ("sentence", "value"):
                spans = grader.credit_spans(essay, judged, where)
                assert [c for _, _, c in spans] == [grader.SENTENCE_CREDIT[v] for v in kinds if v != "other"]
                for (a, b, c), (sa, sb, v, value) in zip(spans, [j for j in judged if j[2] != "other"]):
                    if where == "value" and v in ("correct", "contradicting"):
                        assert essay[a:b] == value and sa <= a < b <= sb
                    else:
                        assert (a, b) == (sa, sb)
            assert set(kinds) <= set(grader.VERDICTS)
            assert [v for v in kinds if v not in ("correct", "other")] == [verdict], (flaw, kinds)
            assert kinds.count("correct") == s.n_covered
            assert (kinds.count("contradicting"), kinds.count("unsupported"), kinds.count("repeated")) == (
                s.n_contradicting, s.n_unsupported, s.n_repeated)
            assert kinds.count("off_topic") == s.n_off_topic and kinds.count("unparsed") == s.n_unparsed
    assert grader.SENTENCE_CREDIT["correct"] > grader.SENTENCE_CREDIT["other"] == 0.0
    assert all(grader.SENTENCE_CREDIT[v] < 0 for v in FLAW_VERDICT.values())


def test_too_long_lowers_length_only(world: World):
    rng = np.random.default_rng(5)
    p = _prompt(world, rng, None)
    sents = grammar.split_sentences(world.human_essay(p, rng, NO_FLAWS))
    # Every other introduction, elaboration and conclusion once: on topic, distinct, and over the band.
    extra = [t.render(name=p.topic, a_kind=A_KIND[p.kind], kind=p.kind)
             for t in grammar.INTROS + grammar.ELABORATIONS[p.kind] + grammar.CONCLUSIONS]
    extra = [x for x in extra if x not in sents]
    s = world.grade(p.text, " ".join(sents[:1] + extra + sents[1:]))
    assert s.n_words > grader.MAX_WORDS
    assert _off_best(s) == {"length"} and 0.0 < s.score < 1.0


def test_introduction_or_conclusion_of_another_kind_is_not_structure(world: World):
    rng = np.random.default_rng(12)
    p = _prompt(world, rng, 3)
    other = KINDS[(KINDS.index(p.kind) + 1) % len(KINDS)]
    sents = grammar.split_sentences(world.human_essay(p, rng, NO_FLAWS))
    wrong_intro = [grammar.INTROS[0].render(name=p.topic, a_kind=A_KIND[other])] + sents[1:]
    wrong_concl = sents[:-1] + [grammar.CONCLUSIONS[2].render(name=p.topic, kind=other)]
    for bad, flag in ((wrong_intro, "has_intro"), (wrong_concl, "has_conclusion")):
        s = world.grade(p.text, " ".join(bad))
        assert getattr(s, flag) == 0 and s.structure == 0.5
        assert _off_best(s) == {"structure", "relevance"} and s.n_off_topic == 1


def test_contradicting_and_unsupported_are_reported_separately(world: World):
    rng = np.random.default_rng(6)
    p = _prompt(world, rng, 3)
    ent = world.by_name[p.topic]
    (a0, v0), (a1, v1), (a2, v2) = p.sheet
    free = [a.name for a in SCHEMA[p.kind] if a.name not in dict(p.sheet)]
    essay = " ".join([
        grammar.INTROS[0].render(name=p.topic, a_kind=A_KIND[p.kind]),
        world.fact_sentence(p.topic, p.kind, a0, v0, rng),
        world.fact_sentence(p.topic, p.kind, a1, world._other_value(p.kind, a1, v1, rng), rng),
        world.fact_sentence(p.topic, p.kind, a2, v2, rng),
        world.fact_sentence(p.topic, p.kind, free[0], ent.facts[free[0]], rng),
        world.fact_sentence(p.topic, p.kind, free[1], world._other_value(p.kind, free[1], ent.facts[free[1]], rng), rng),
        grammar.CONCLUSIONS[0].render(name=p.topic),
    ])
    s = world.grade(p.text, essay)
    assert (s.n_claims, s.n_covered, s.n_contradicting, s.n_unsupported, s.n_hallucinated) == (5, 2, 1, 2, 3)
    assert s.contradiction_rate == pytest.approx(1 / 5) and s.unsupported_rate == pytest.approx(2 / 5)
    assert s.hallucination_rate == pytest.approx(3 / 5)
    assert s.coverage == pytest.approx(2 / 3)
    # Closed-book: the fact base is the reference; nothing is "unsupported", a wrong value contradicts.
    closed = Prompt(p.topic, p.kind)
    s = world.grade(closed.text, essay)
    assert (s.n_asked, s.n_claims, s.n_unsupported, s.n_contradicting, s.n_covered) == (5, 5, 0, 2, 3)


def test_grounded_sheet_is_the_truth_even_when_it_differs_from_the_fact_base(world: World):
    rng = np.random.default_rng(7)
    ent = world.by_name[world.names_by_kind["animal"][0]]
    fake = world._other_value("animal", "diet", ent.facts["diet"], rng)
    p = Prompt(ent.name, "animal", (("diet", fake), ("habitat", ent.facts["habitat"])))
    assert world.parse_prompt(p.text) == p
    perfect = world.human_essay(p, rng, NO_FLAWS)
    assert world.grade(p.text, perfect).score == 1.0
    s = world.grade(p.text, perfect.replace(f"{fake}.", f"{ent.facts['diet']}.", 1))
    assert s.n_contradicting == 1


def test_closed_book_honest_essay_beats_inventing_one(world: World):
    rng = np.random.default_rng(8)
    for _ in range(50):
        p = _prompt(world, rng, None)
        ent = world.by_name[p.topic]
        attrs = list(ent.facts)
        intro = grammar.INTROS[0].render(name=p.topic, a_kind=A_KIND[p.kind])
        concl = grammar.CONCLUSIONS[1].render(name=p.topic)
        for k in range(5):
            true = [world.fact_sentence(p.topic, p.kind, a, ent.facts[a], rng) for a in attrs[:k]]
            wrong = world.fact_sentence(p.topic, p.kind, attrs[k], world._other_value(p.kind, attrs[k], ent.facts[attrs[k]], rng), rng)
            honest = world.grade(p.text, " ".join([intro, *true, concl])).score
            invented = world.grade(p.text, " ".join([intro, *true, wrong, concl])).score
            assert honest > invented


def _no_claim_essay(world: World, p: Prompt) -> list[str]:
    """An introduction, every elaboration of the topic's kind and a conclusion: on topic, distinct, fluent, inside
    the length band, and not one claim about the topic: the longest honest way to say nothing."""
    return ([grammar.INTROS[0].render(name=p.topic, a_kind=A_KIND[p.kind])]
            + [t.render(name=p.topic) for t in grammar.ELABORATIONS[p.kind]]
            + [grammar.CONCLUSIONS[1].render(name=p.topic)])


def test_no_free_credit_for_stating_nothing(world: World):
    """The grader's hole, closed: an essay that states no fact about its topic scores at most the documented bound,
    below the SFT policy's mean, and below the same essay with one asked fact stated correctly."""
    rng = np.random.default_rng(13)
    bound = (grader.W_STRUCTURE + grader.W_FLUENCY + grader.W_HALLUCINATION * grader.NO_CLAIM_HONESTY
             + grader.W_REPETITION + grader.W_RELEVANCE + grader.W_LENGTH)
    assert bound < 0.6  # the SFT policy's held-out mean is 0.69 (README, "What you should see")
    for n_facts in (1, 2, 3, 4, 5):
        for _ in range(30):
            p = _prompt(world, rng, n_facts)
            sents = _no_claim_essay(world, p)
            empty = world.grade(p.text, " ".join(sents))
            assert empty.n_claims == 0 and empty.fluency == 1.0 and empty.structure == 1.0, (sents, empty)
            assert grader.MIN_WORDS <= empty.n_words <= grader.MAX_WORDS
            assert empty.score == pytest.approx(bound)
            attr, value = p.sheet[int(rng.integers(len(p.sheet)))]
            one = world.grade(p.text, " ".join([*sents[:-1], world.fact_sentence(p.topic, p.kind, attr, value, rng), sents[-1]]))
            assert (one.n_claims, one.n_covered, one.n_hallucinated) == (1, 1, 0)
            assert one.score == pytest.approx(
                empty.score + grader.W_COVERAGE / n_facts + grader.W_HALLUCINATION * (1 - grader.NO_CLAIM_HONESTY))


@pytest.mark.parametrize(
    "essay",
    [
        "",
        "   \n\t ",
        "....",
        "\x00\x01\x02 \ufffd\ufffd garbage \u202e",
        "no punctuation at all and lowercase words",
        " ".join(["word"] * 5000),
        "A. B. C. D. E. F.",
        b"\xff\xfe\x00bytes",
        None,
        "Write an essay about Velmo, a city. Facts: founded in 1200.",
    ],
)
def test_non_essays_score_zero_and_never_raise(world: World, essay):
    p = world.sample_prompts(1, np.random.default_rng(9), "grounded")[0]
    s = world.grade(p, essay)
    assert s.score == 0.0 and s.fluency == 0.0 and s.coverage == 0.0
    assert json.dumps(s.to_dict())


def test_prompt_as_essay_scores_low(world: World):
    rng = np.random.default_rng(10)
    for p in world.sample_prompts(30, rng, "mixed"):
        assert world.grade(p, p).score == 0.0


# --- the human corpus ----------------------------------------------------------------------------


def _measured_rates(world: World, corpus: list[tuple[str, str]]) -> dict[str, tuple[float, int]]:
    """Flaw rates measured by the grader: name -> (rate, number of trials)."""
    asked = covered = contra = 0
    unsup_hits = unsup_trials = 0
    rep = off = noconc = 0
    for p, e in corpus:
        s = world.grade(p, e)
        assert s.fluency == 1.0 and s.has_intro == 1
        asked += s.n_asked
        covered += s.n_covered
        contra += s.n_contradicting
        prompt = world.parse_prompt(p)
        if prompt.grounded and len(prompt.sheet) < grammar.ATTRIBUTES_PER_KIND:
            unsup_trials += 1
            unsup_hits += s.n_unsupported > 0
        else:
            assert s.n_unsupported == 0
        assert s.n_unsupported <= 1 and s.n_off_topic <= 1 and s.n_repeated <= 1
        rep += s.n_repeated > 0
        off += s.n_off_topic > 0
        noconc += s.has_conclusion == 0
    n = len(corpus)
    stated = covered + contra
    return {
        "omit_fact": ((asked - stated) / asked, asked),
        "wrong_fact": (contra / stated, stated),
        "unsupported_fact": (unsup_hits / unsup_trials, unsup_trials),
        "repeat_sentence": (rep / n, n),
        "off_topic": (off / n, n),
        "no_conclusion": (noconc / n, n),
    }


@pytest.mark.parametrize(
    "flaws",
    [FlawRates(), FlawRates(omit_fact=0.3, wrong_fact=0.2, unsupported_fact=0.6, repeat_sentence=0.45, off_topic=0.3, no_conclusion=0.05)],
    ids=["default", "custom"],
)
def test_corpus_flaw_rates_match_config_within_4_sigma(flaws: FlawRates):
    world = World.from_config(WorldConfig(flaws=flaws))
    measured = _measured_rates(world, world.corpus(2000, seed=11))
    for name, (rate, trials) in measured.items():
        p = getattr(flaws, name)
        sigma = math.sqrt(p * (1 - p) / trials)
        assert abs(rate - p) <= 4 * sigma, (name, rate, p, trials)


def test_no_flaw_corpus_is_perfect():
    world = World.from_config(WorldConfig(flaws=NO_FLAWS))
    for p, e in world.corpus(300, seed=0):
        assert world.grade(p, e).score == 1.0


def test_corpus_modes(world: World):
    assert all(world.parse_prompt(p).grounded for p, _ in world.corpus(50, seed=1, mode="grounded"))
    assert not any(world.parse_prompt(p).grounded for p, _ in world.corpus(50, seed=1, mode="closed"))
    share = np.mean([world.parse_prompt(p).grounded for p, _ in world.corpus(2000, seed=1)])
    assert abs(share - 0.75) <= 4 * math.sqrt(0.75 * 0.25 / 2000)


def test_closed_book_corpus_states_true_facts(world: World):
    w = World.from_config(WorldConfig(flaws=dataclasses.replace(FlawRates(), wrong_fact=0.0)))
    for p, e in w.corpus(300, seed=2, mode="closed"):
        s = w.grade(p, e)
        assert s.n_contradicting == 0 and s.n_covered == s.n_claims


# --- the labeller --------------------------------------------------------------------------------


def _pairs(world: World, n: int, seed: int):
    """(prompt, better, worse) triples: a perfect essay and the same essay without its conclusion."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = _prompt(world, rng, 3)
        good = world.human_essay(p, rng, NO_FLAWS)
        out.append((p.text, good, " ".join(grammar.split_sentences(good)[:-1])))
    return out


def test_labeller_prefers_gold_and_honours_budget_exactly(world: World):
    pairs = _pairs(world, 12, 0)
    lab = Labeller(world, budget=10, noise=0.0, seed=0)
    assert lab.label(*pairs[0]) == 0
    p, good, bad = pairs[1]
    assert lab.label(p, bad, good) == 1
    got = lab.label_batch([x[0] for x in pairs[2:9]], [x[1] for x in pairs[2:9]], [x[2] for x in pairs[2:9]])
    assert got.tolist() == [0] * 7 and got.dtype == np.int32
    assert (lab.used, lab.remaining) == (9, 1)
    with pytest.raises(BudgetExhausted, match="2 label"):
        lab.label_batch([p, p], [good, good], [bad, bad])
    assert lab.used == 9  # a refused batch uses nothing
    assert lab.label(*pairs[9]) == 0
    assert (lab.used, lab.remaining) == (10, 0)
    with pytest.raises(BudgetExhausted):
        lab.label(*pairs[10])
    assert lab.used == 10
    with pytest.raises(NotAWorldPrompt):
        Labeller(world, 5).label("not a prompt", "a", "b")


def test_labeller_noise_flips_the_configured_share(world: World):
    pairs = _pairs(world, 200, 1) * 10
    lab = Labeller(world, budget=len(pairs), noise=0.2, seed=3)
    got = lab.label_batch(*zip(*pairs))
    flipped = float(np.mean(got))  # the gold answer is always 0
    assert abs(flipped - 0.2) <= 4 * math.sqrt(0.2 * 0.8 / len(pairs))


def test_labeller_ties_use_a_fair_seeded_coin(world: World):
    p, good, _ = _pairs(world, 1, 2)[0]
    n = 2000
    a = Labeller(world, budget=n, seed=4).label_batch([p] * n, [good] * n, [good] * n)
    b = Labeller(world, budget=n, seed=4).label_batch([p] * n, [good] * n, [good] * n)
    assert (a == b).all()
    assert abs(a.mean() - 0.5) <= 4 * math.sqrt(0.25 / n)


def test_labeller_state_round_trip(world: World):
    pairs = _pairs(world, 60, 5)
    p, good, _ = pairs[0]
    ties = ([p] * 100, [good] * 100, [good] * 100)
    a = Labeller(world, budget=500, noise=0.3, seed=9)
    a.label_batch(*zip(*pairs))
    state = json.loads(json.dumps(a.state_dict()))
    b = Labeller(world, budget=500, noise=0.3, seed=1234)
    b.load_state_dict(state)
    assert b.used == a.used == 60
    assert (a.label_batch(*ties) == b.label_batch(*ties)).all()
    assert a.state_dict() == b.state_dict()
    assert all(isinstance(v, (int, str)) for v in state["rng"].values() if not isinstance(v, dict))


def test_a_repeat_costs_the_same_whatever_the_essays_length(world: World):
    """grader.REPEAT_COST: one repeated sentence costs W_REPETITION * REPEAT_COST of a perfect essay's score however
    many sentences it has (it cost W_REPETITION / sentences before, which a gold-rewarded learner bought length with);
    a second repeat costs as much again, a third nothing more."""
    rng = np.random.default_rng(21)
    one_repeat = grader.W_REPETITION * grader.REPEAT_COST
    for n_facts in (2, 5):
        for _ in range(30):
            p = _prompt(world, rng, n_facts)
            sents = grammar.split_sentences(world.human_essay(p, rng, NO_FLAWS))
            losses = []
            for k in (1, 2, 3):
                bad = sents[:-1] + [sents[1 + i % (len(sents) - 2)] for i in range(k)] + sents[-1:]
                s = world.grade(p.text, " ".join(bad))
                assert s.n_repeated == k and s.fluency == 1.0
                if s.n_words <= grader.MAX_WORDS:
                    losses.append(1.0 - s.score)
            assert losses and losses == pytest.approx([one_repeat, 2 * one_repeat, 2 * one_repeat][: len(losses)])


def test_the_decision_to_stop_carries_the_omitted_facts(world: World):
    """grader.omission_spans: a grounded essay that closes with its conclusion while k asked facts are unstated has the
    conclusion's span credited -credit * k; nothing when every asked fact is stated, when the essay ends on a claim,
    or on a closed-book prompt (leaving out what one does not know is honest there)."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        p = _prompt(world, rng, 4)
        sents = grammar.split_sentences(world.human_essay(p, rng, NO_FLAWS))
        facts = [i for i, t in enumerate(sents) if world.parse_sentence(t)[0].role == "fact"]
        short = [t for i, t in enumerate(sents) if i not in facts[:2]]  # two asked facts left out
        essay = " ".join(short)
        scores, judged = world.grade_sentences(p.text, essay)
        assert scores.n_asked - scores.n_covered == 2
        (a, b, c), = grader.omission_spans(scores, judged, True, 0.5)
        assert essay[a:b] == short[-1] and c == -1.0
        assert grader.omission_spans(scores, judged, False, 0.5) == []
        assert grader.omission_spans(scores, judged, True, 0.0) == []
        full = world.grade_sentences(p.text, " ".join(sents))
        assert grader.omission_spans(*full, True, 0.5) == []
        ends_on_claim = world.grade_sentences(p.text, " ".join(short[:-1]))
        assert grader.omission_spans(*ends_on_claim, True, 0.5) == [] or ends_on_claim[1][-1][2] == "other"
