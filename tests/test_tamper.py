"""Self-made negatives: each tampering operator changes exactly what it says, the gold grader agrees a tampered
flawless essay is worse, and synthetic pairs are counted apart in the pool, on disk and in a run's checkpoint."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from selfplay import critic as C
from selfplay.config import ConfigError, FlawRates, load_config
from selfplay.critic import tamper
from selfplay.critic.pairs import POOL_ROW, POOL_ROW_OPTIONAL, check_pool_row
from selfplay.data import DataError, read_jsonl
from selfplay.tokenizer import Tokenizer
from selfplay.world import World
from selfplay.world.grammar import sentence_spans

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLEAN = FlawRates(**{f.name: 0.0 for f in dataclasses.fields(FlawRates)})

PROMPT = "Write an essay about Hagond, an animal. Facts: feeds on berries; lives about 12 years."
ESSAY = (
    "Meet Hagond, an animal like no other. The diet of Hagond is mostly berries. "
    "Hagond lives for about 12 years. There is no animal quite like Hagond."
)
DONOR = (
    "Write an essay about Tenlovos, a river. Facts: rises in the Green Downs; rich in salmon.",
    "This essay is about Tenlovos, a river. Tenlovos rises in the Green Downs. Tenlovos is rich in salmon.",
)


def sentences(text):
    return [text[a:b] for a, b in sentence_spans(text)]


@pytest.fixture(scope="module")
def world():
    return World(load_config(CONFIGS / "tiny.yaml").world)


@pytest.fixture(scope="module")
def flawless(world):
    rng = np.random.default_rng(7)
    return [(p, world.human_essay(p, rng, CLEAN)) for p in world.sample_prompts(200, rng)]


def test_stated_values_are_numbers_and_prompt_words_but_not_the_topic_or_phrasing(world):
    phrasing = tamper.phrasing_words(world.sample_prompts(300, np.random.default_rng(0)))
    assert {"lives", "about", "years", "feeds", "animal"} <= phrasing and not {"berries", "hagond"} & phrasing
    values = [ESSAY[a:b] for a, b in tamper.stated_values(PROMPT, ESSAY, phrasing)]
    assert values == ["berries", "12"]  # "Hagond" is in most sentences: the topic
    assert "lives" in [ESSAY[a:b] for a, b in tamper.stated_values(PROMPT, ESSAY)]  # without phrasing, any shared word


@pytest.mark.parametrize("seed", range(20))
def test_swap_value_replaces_one_value_by_another_of_its_shape(seed):
    phrasing = frozenset({"lives", "about", "years", "feeds", "rises", "rich", "river", "essay", "write"})
    t = tamper.tamper(PROMPT, ESSAY, "swap_value", [DONOR], np.random.default_rng(seed), phrasing)
    assert t is not None and t.kind == "swap_value"
    a, b = t.span
    old_spans = tamper.stated_values(PROMPT, ESSAY, phrasing)
    (oa, ob), = [(x, y) for x, y in old_spans if x == a]  # the span starts where a value started
    assert t.essay[:a] == ESSAY[:oa] and t.essay[b:] == ESSAY[ob:], "only the value changes"
    old, new = ESSAY[oa:ob], t.essay[a:b]
    assert new != old
    if old.isdigit():
        assert new.isdigit() and len(new) == len(old) and new[0] != "0"
    else:
        assert new in ("Green", "Downs", "salmon") and new[0].islower() == old[0].islower()


def test_duplicate_replaces_a_later_sentence_by_a_copy_of_another():
    for seed in range(20):
        t = tamper.tamper(PROMPT, ESSAY, "duplicate", [], np.random.default_rng(seed))
        old, new = sentences(ESSAY), sentences(t.essay)
        assert len(new) == len(old)
        changed = [i for i in range(len(old)) if old[i] != new[i]]
        assert len(changed) == 1 and changed[0] > 0
        i = changed[0]
        assert new[i] in old and new.count(new[i]) == 2
        assert t.essay[slice(*t.span)] == new[i]


def test_drop_last_removes_exactly_the_last_sentence():
    t = tamper.tamper(PROMPT, ESSAY, "drop_last", [], np.random.default_rng(0))
    assert sentences(t.essay) == sentences(ESSAY)[:-1]
    assert t.essay.endswith("years.") and t.span == (len(t.essay), len(t.essay))


def test_splice_replaces_a_later_sentence_by_a_donors():
    for seed in range(20):
        t = tamper.tamper(PROMPT, ESSAY, "splice", [DONOR], np.random.default_rng(seed))
        old, new = sentences(ESSAY), sentences(t.essay)
        changed = [i for i in range(len(old)) if old[i] != new[i]]
        assert len(new) == len(old) and len(changed) == 1 and changed[0] > 0
        assert new[changed[0]] in sentences(DONOR[1])


def test_an_operator_with_nothing_to_work_on_returns_none():
    rng = np.random.default_rng(0)
    one = "Hagond is an animal."
    for kind in ("duplicate", "drop_last", "splice"):
        assert tamper.tamper(PROMPT, one, kind, [DONOR], rng) is None
    assert tamper.tamper("Write about Hagond.", "Hagond is nice. Hagond is kind.", "swap_value", [DONOR], rng) is None
    assert tamper.tamper(PROMPT, ESSAY, "splice", [], rng) is None  # no donor
    with pytest.raises(ValueError, match="unknown tampering operator 'shuffle'"):
        tamper.tamper(PROMPT, ESSAY, "shuffle", [], rng)


@pytest.mark.parametrize("kind", tamper.KINDS)
def test_gold_grades_every_tampered_flawless_essay_lower(world, flawless, kind):
    pairs, kinds = tamper.synthetic_pairs(flawless, 100, [kind], np.random.default_rng(1))
    assert len(pairs) == 100 and set(kinds) == {kind}
    for p in pairs:
        assert world.grade(p.prompt, p.rejected).score < world.grade(p.prompt, p.chosen).score, (p.chosen, p.rejected)


def test_synthetic_pairs_are_seeded_and_draw_every_named_operator(flawless):
    a = tamper.synthetic_pairs(flawless, 60, tamper.KINDS, np.random.default_rng(3))
    b = tamper.synthetic_pairs(flawless, 60, tamper.KINDS, np.random.default_rng(3))
    assert a == b and set(a[1]) == set(tamper.KINDS)
    texts = set(flawless)
    assert all((p.prompt, p.chosen) in texts and p.rejected != p.chosen for p in a[0])


def test_the_pool_keeps_kinds_apart_and_stores_them():
    tok = Tokenizer.train([PROMPT, ESSAY, *DONOR], 300)
    pool = C.PairPool(tok, 128, 0.5, seed=0)
    labelled = [C.Pair(PROMPT, ESSAY, ESSAY + " Extra."), C.Pair(PROMPT, ESSAY, "Short.")]
    pool.add(labelled)
    made, kinds = tamper.synthetic_pairs([(PROMPT, ESSAY)] * 2 + [DONOR], 4, ["swap_value", "drop_last"], np.random.default_rng(0))
    pool.add(made, kinds=kinds)
    assert pool.count(C.LABELLED) == 2 and len(pool) == 2 + len(made)
    assert set(pool.indices(True, C.LABELLED)) | set(pool.indices(False, C.LABELLED)) == {0, 1}
    rows = pool.rows()
    assert "kind" not in rows[0] and [r["kind"] for r in rows[2:]] == kinds  # a labelled row is stored as before
    again = C.PairPool(tok, 128, 0.5, seed=0)
    again.add_rows(rows)
    assert again.kinds == pool.kinds and again.heldout == pool.heldout


def test_a_stored_pool_row_of_an_unknown_kind_is_refused_with_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b", "heldout": False}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"kind": "shuffle"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: unknown pair kind 'shuffle'"):
        read_jsonl(path, POOL_ROW, POOL_ROW_OPTIONAL, check=check_pool_row)


def test_config_names_a_bad_tampering_setting():
    with pytest.raises(ConfigError, match=r"critic.tamper_ops\[1\]"):
        load_config(CONFIGS / "tiny.yaml", ["critic.tamper_ops=[swap_value,shuffle]"])
    with pytest.raises(ConfigError, match="critic.synthetic_per_label must be >= 0"):
        load_config(CONFIGS / "tiny.yaml", ["critic.synthetic_per_label=-1"])
    with pytest.raises(ConfigError, match="critic.tamper_ops is empty"):
        load_config(CONFIGS / "tiny.yaml", ["critic.synthetic_per_label=1", "critic.tamper_ops=[]"])

