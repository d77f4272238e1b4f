"""The gold grader of the essay world: the sub-scores of one essay (`GoldScores`), their documented weighted sum
(`grade`), and the field-wise mean over many essays (`mean_scores`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from selfplay.world.grammar import A_KIND, Template, sentence_spans

if TYPE_CHECKING:
    from selfplay.world.world import Prompt, World

# Gold score weights (they sum to 1) and the length band.
W_COVERAGE = 0.30
W_HALLUCINATION = 0.25
W_REPETITION = 0.10
W_RELEVANCE = 0.10
W_STRUCTURE = 0.10
W_FLUENCY = 0.10
W_LENGTH = 0.05
# The honesty credit of an essay that claims nothing about its topic: half, "neither shown true nor shown false".
# Full credit (the grader before 2026-12-03) paid an essay of an introduction and a conclusion about 0.70, above the
# SFT policy's mean, for saying nothing; zero would let a first wrong claim cost nothing (see `grade`).
NO_CLAIM_HONESTY = 0.5
# What a repeated sentence costs: this share of the repetition credit, whatever the essay's length (two repeats lose all
# of it). Until 2026-12-06 the term was W_REPETITION * (1 - repeated / sentences): one repeat in a ten-sentence essay
# cost 0.01, so a gold-rewarded learner bought length (and coverage) with repeats and doubled its repetition rate.
# A reader notices a repeat in a long essay as much as in a short one.
REPEAT_COST = 0.5
MIN_WORDS = 15  # a perfect two-fact essay has at least 18 words
MAX_WORDS = 100  # the longest human essays have about 85 words
LENGTH_BAND = (MIN_WORDS, MAX_WORDS)


@dataclasses.dataclass(frozen=True, slots=True)
class GoldScores:
    """The gold grader's verdict on one essay; see `grade` for every definition."""

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


# What the grader decided about each sentence (`grade_sentences`), and the sentence-level credit each verdict earns
# (`SENTENCE_CREDIT`: Fine-Grained RLHF's sentence rewards, read off the gold grader; an ablation signal, like
# run.reward_source=gold). "correct": a claim stating an asked fact correctly (it raises coverage); "other": an
# introduction, elaboration or conclusion on topic.
VERDICTS = ("correct", "contradicting", "unsupported", "repeated", "unparsed", "off_topic", "other")
SENTENCE_CREDIT = {"correct": 1.0, "contradicting": -1.0, "unsupported": -1.0, "repeated": -1.0, "unparsed": -1.0,
                   "off_topic": -1.0, "other": 0.0}


def length_score(n_words: int) -> float:
    if n_words < MIN_WORDS:
        return n_words / MIN_WORDS
    if n_words > MAX_WORDS:
        return max(0.0, 1.0 - (n_words - MAX_WORDS) / MAX_WORDS)
    return 1.0


def grade(world: World, prompt: Prompt, essay: str) -> GoldScores:
    """Gold sub-scores and score of `essay` for a prompt of `world`; never raises on the essay.
    (`grade_sentences` also says what it decided about each sentence.)

    Gold sub-scores (`GoldScores`), for a prompt about topic T of kind K. A sentence's *subject* is its
    `{name}` slot; every template has one.

      repetition_rate  repeated sentences / sentences (reported; the score charges each repeat, see below). A
                       sentence is a repeat when its text (whitespace
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
      honesty          1 - hallucination_rate when the essay makes a claim; NO_CLAIM_HONESTY (1/2) when it makes
                       none (not a reported sub-score: it is the hallucination term's factor in the score).
      coverage         asked facts stated correctly / asked facts. Asked: grounded, the sheet's facts (the
                       sheet is the truth, even where it differs from the fact base); closed-book, every
                       attribute of K with its fact-base value (all ATTRIBUTES_PER_KIND of them).
      structure        0.5 if the first sentence is an introduction naming T as a K, plus 0.5 if the last
                       sentence is a conclusion naming T (and K where the template names a kind).
      length           1 inside LENGTH_BAND words (whitespace-separated, the whole essay); below it
                       words / MIN_WORDS; above it max(0, 1 - (words - MAX_WORDS) / MAX_WORDS).

    The gold score, in [0, 1]:

      score = W_COVERAGE * coverage + W_STRUCTURE * structure + W_FLUENCY * fluency
              + fluency * (W_HALLUCINATION * honesty + W_REPETITION * max(0, 1 - REPEAT_COST * n_repeated)
                           + W_RELEVANCE * relevance + W_LENGTH * length)

    The weights sum to 1, so an essay that states every asked fact correctly, claims nothing else,
    opens with an introduction, closes with a conclusion, repeats nothing and fits the length band
    scores exactly 1.0. The terms that reward the *absence* of a flaw are scaled by fluency, so text
    that does not parse (empty, garbage) scores 0 instead of collecting credit for flaws it cannot have.
    Each flaw moves only its own sub-score; the total moves with it. Closed-book honesty: adding a
    wrong claim to k >= 1 correct ones costs W_HALLUCINATION / (k + 1) and gains nothing, and to none costs
    W_HALLUCINATION * NO_CLAIM_HONESTY (more than the length and repetition terms can give back), so an essay
    that claims less beats one that invents. Repeats: each repeated sentence costs W_REPETITION * REPEAT_COST (0.05,
    times fluency) whatever the essay's length, up to W_REPETITION for two or more.

    No free credit: an essay that states nothing about its topic scores at most
    W_STRUCTURE + W_FLUENCY + W_HALLUCINATION * NO_CLAIM_HONESTY + W_REPETITION + W_RELEVANCE + W_LENGTH = 0.575
    (below the SFT policy's mean, 0.69 on the default job), and on a grounded prompt less than the same essay with
    one asked fact stated correctly (+ W_COVERAGE / asked + W_HALLUCINATION * (1 - NO_CLAIM_HONESTY)).
    """
    return grade_sentences(world, prompt, essay)[0]


def grade_sentences(world: World, prompt: Prompt, essay: str) -> tuple[GoldScores, list[tuple[int, int, str, str]]]:
    """`grade`'s scores of `essay`, and its verdict on each sentence: (start, end, verdict, value) with the sentence's
    character span in `essay` (after a bytes essay is decoded), one of VERDICTS, and the value a fact sentence
    states ("" for others). Repeats are judged first; a parsed sentence about another subject, or written for another
    kind, is off_topic."""
    if isinstance(essay, (bytes, bytearray)):
        essay = bytes(essay).decode("utf-8", errors="replace")
    elif not isinstance(essay, str):
        essay = ""
    topic, kind = prompt.topic, prompt.kind
    asked = dict(prompt.sheet) if prompt.grounded else world.by_name[topic].facts
    spans = sentence_spans(essay)
    sentences = [" ".join(essay[a:b].split()) for a, b in spans]
    verdicts: list[tuple[str, str]] = []
    n = len(sentences)
    seen: set = set()
    covered: set[str] = set()
    n_repeated = n_unparsed = n_off = n_claims = n_contra = n_unsup = 0  # each sentence adds to at most one
    parses: list[tuple[Template, dict[str, str]] | None] = []
    for s in sentences:
        parsed = world.parse_sentence(s)
        parses.append(parsed)
        keys = [("text", s)]
        if parsed is not None and parsed[0].role == "fact":
            t, slots = parsed
            keys.append(("fact", slots["name"], t.kind, t.attr, slots["value"]))
        verdict = _judge(parsed, keys, seen, topic, kind, asked, covered)
        verdicts.append((verdict, parsed[1].get("value", "") if parsed is not None else ""))
        if verdict != "repeated":  # the counts below are over distinct sentences
            seen.update(keys)
        n_repeated += verdict == "repeated"
        n_unparsed += verdict == "unparsed"
        n_off += verdict == "off_topic"
        n_contra += verdict == "contradicting"
        n_unsup += verdict == "unsupported"
        n_claims += verdict in ("correct", "contradicting", "unsupported")
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
    honesty = 1.0 - hall if n_claims else NO_CLAIM_HONESTY
    repetition = n_repeated / n if n else 0.0
    fluency = (n_distinct - n_unparsed) / n_distinct if n_distinct else 0.0
    relevance = 1.0 - n_off / n_distinct if n_distinct else 0.0
    structure = 0.5 * has_intro + 0.5 * has_conclusion
    length = length_score(n_words)
    score = (
        W_COVERAGE * coverage + W_STRUCTURE * structure + W_FLUENCY * fluency
        + fluency * (W_HALLUCINATION * honesty + W_REPETITION * max(0.0, 1.0 - REPEAT_COST * n_repeated)
                     + W_RELEVANCE * relevance + W_LENGTH * length)
    )
    scores = GoldScores(
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
    return scores, [(a, b, v, value) for (a, b), (v, value) in zip(spans, verdicts)]


def credit_spans(essay: str, judged: list[tuple[int, int, str, str]], where: str) -> list[tuple[int, int, float]]:
    """The spans of `essay` that earn a credit (SENTENCE_CREDIT of their verdict), from `grade_sentences`' verdicts.
    where="sentence": the whole sentence; where="value": a claim about an asked attribute (correct or contradicting)
    credits only its stated value, the one decision that made it right or wrong; every other verdict its sentence."""
    out = []
    for a, b, verdict, value in judged:
        if where == "value" and verdict in ("correct", "contradicting") and value:
            i = essay.rfind(value, a, b)
            if i >= 0:
                a, b = i, i + len(value)
        if SENTENCE_CREDIT[verdict]:
            out.append((a, b, SENTENCE_CREDIT[verdict]))
    return out


def omission_spans(scores: GoldScores, judged: list[tuple[int, int, str, str]], grounded: bool,
                   credit: float) -> list[tuple[int, int, float]]:
    """The credit of the asked facts an essay leaves out, which no sentence of it holds: on a grounded prompt, an essay
    whose last sentence is on topic and claims nothing (its conclusion, verdict "other") while asked facts are still
    unstated gets that sentence credited -credit per unstated fact, the decision to stop. Closed-book prompts get none:
    there leaving out a fact the policy does not know is the honest choice. `judged`: `grade_sentences`' verdicts."""
    missing = scores.n_asked - scores.n_covered
    if not (credit and grounded and judged and missing > 0) or judged[-1][2] != "other":
        return []
    a, b, _, _ = judged[-1]
    return [(a, b, -credit * missing)]


def _judge(parsed: tuple[Template, dict[str, str]] | None, keys: list, seen: set, topic: str, kind: str, asked: dict,
           covered: set[str]) -> str:
    """One sentence's verdict (see `grade`); a correct claim adds its attribute to `covered`."""
    if any(k in seen for k in keys):
        return "repeated"
    if parsed is None:
        return "unparsed"
    t, slots = parsed
    if slots["name"] != topic or (t.role != "fact" and slots.get("kind", t.kind or kind) != kind) or (
        "a_kind" in slots and slots["a_kind"] != A_KIND[kind]
    ):
        return "off_topic"
    if t.role != "fact":
        return "other"
    if t.kind != kind:
        return "contradicting"
    if t.attr not in asked:
        return "unsupported"  # grounded only: closed-book asks every attribute of the kind
    if asked[t.attr] != slots["value"]:  # type: ignore[index]
        return "contradicting"
    covered.add(t.attr)  # type: ignore[arg-type]
    return "correct"
