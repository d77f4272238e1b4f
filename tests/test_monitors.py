"""Diversity measures against hand counts; alarms fire exactly on the patterns they describe."""

import math

import pytest

from selfplay.config import MonitorConfig
from selfplay.monitors import Monitor, distinct_n, diversity, self_bleu


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # bigrams: (a,b) (b,a) (a,b) | (a,b) (b,c): 5 in all, 3 distinct
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # unigrams: a b a b a b c: 7 in all, 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n([], 2) == 0.0


def test_self_bleu_extremes_and_order():
    same = ["the river runs to the sea ."] * 4
    assert self_bleu(same) == pytest.approx(1.0)
    different = ["alpha beta gamma delta", "one two three four", "red green blue black", "x y z w"]
    assert self_bleu(different) == 0.0
    mixed = ["the river runs to the sea .", "the river runs to the lake .", "cats sleep all day long ."]
    s = self_bleu(mixed)
    assert 0.0 < s < 1.0
    # Making the essays more alike raises self-BLEU.
    assert self_bleu(mixed[:2] + ["the river runs to the bay ."]) > s


def test_self_bleu_unigram_case_by_hand():
    # With max_n=1 and equal lengths (no brevity penalty): precision of each hypothesis against the other.
    texts = ["a b c d", "a b x y"]
    assert self_bleu(texts, max_n=1) == pytest.approx(0.5)


def test_diversity_keys():
    d = diversity(["a b c", "a b d"])
    assert set(d) == {"diversity/distinct_1", "diversity/distinct_2", "diversity/self_bleu"}


def _feed(monitor, rewards, golds, **extra):
    fired = []
    for r, g in zip(rewards, golds):
        alarms, scalars = monitor.observe({"reward/raw_mean": r, "gold/score": g, **extra})
        fired.append((alarms, scalars))
    return fired


def test_over_optimisation_reads_the_raw_critic_score_not_the_normalised_reward():
    """The normaliser's running mean chases a rising raw score, so the normalised reward can fall while the policy
    exploits the critic (measured: configs/no_safeguards.yaml); the alarm must follow the raw score."""
    m = Monitor(MonitorConfig(window=4, min_change=0.05))
    fired = []
    for raw, norm, gold in zip([1.0, 1.5, 2.0, 2.5], [0.9, 0.6, 0.4, 0.2], [0.6, 0.5, 0.4, 0.3]):
        alarms, _ = m.observe({"reward/raw_mean": raw, "reward/mean": norm, "gold/score": gold})
        fired.append([a.name for a in alarms])
    assert fired[-1] == ["over_optimisation"]


def test_a_retrained_critic_starts_the_trend_window_afresh():
    m = Monitor(MonitorConfig(window=4, min_change=0.05))
    _feed(m, [0.1, 0.2, 0.3], [0.6, 0.55, 0.5])
    m.critic_changed()  # a refresh: the next scores are on the retrained critic's scale
    out = _feed(m, [2.0, 2.1, 2.2, 2.3], [0.45, 0.4, 0.35, 0.3])
    assert [o[0] for o in out[:3]] == [[], [], []]  # not compared with the old critic's scores
    assert [a.name for a in out[3][0]] == ["over_optimisation"]
    restored = Monitor(MonitorConfig(window=4, min_change=0.05))
    restored.load_state_dict(m.state_dict())
    assert restored.rewards == [2.0, 2.1, 2.2, 2.3]


def test_over_optimisation_fires_when_proxy_rises_and_gold_falls():
    cfg = MonitorConfig(window=4, min_change=0.05)
    m = Monitor(cfg)
    out = _feed(m, [0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.58, 0.5, 0.45, 0.4])
    assert out[2][0] == [] and out[2][1]["alarm/over_optimisation"] == 0.0  # window not yet full
    assert [a.name for a in out[3][0]] == ["over_optimisation"]
    assert out[4][1]["alarm/over_optimisation"] == 1.0
    assert "rose" in out[4][0][0].message and "fell" in out[4][0][0].message


@pytest.mark.parametrize(
    "rewards, golds",
    [
        ([0.1, 0.2, 0.3, 0.4], [0.5, 0.55, 0.6, 0.7]),  # both rise: healthy
        ([0.4, 0.3, 0.2, 0.1], [0.6, 0.5, 0.4, 0.3]),  # both fall
        ([0.1, 0.2, 0.3, 0.4], [0.6, 0.6, 0.59, 0.59]),  # gold flat within min_change
    ],
)
def test_over_optimisation_stays_quiet_otherwise(rewards, golds):
    m = Monitor(MonitorConfig(window=4, min_change=0.05))
    assert all(not alarms for alarms, _ in _feed(m, rewards, golds))


def test_kl_and_collapse_alarms():
    m = Monitor(MonitorConfig(window=4, kl_max=0.5, collapse_fraction=0.8), sft_distinct_2=0.5)
    alarms, scalars = m.observe({"reward/raw_mean": 0.0, "kl": 0.7, "diversity/distinct_2": 0.39})
    assert {a.name for a in alarms} == {"kl", "collapse"}
    assert scalars == {"alarm/over_optimisation": 0.0, "alarm/kl": 1.0, "alarm/collapse": 1.0}
    alarms, _ = m.observe({"reward/raw_mean": 0.0, "kl": 0.1, "diversity/distinct_2": 0.41})
    assert alarms == []


def test_monitor_state_round_trip():
    m = Monitor(MonitorConfig(window=3), sft_distinct_2=0.4)
    _feed(m, [0.1, 0.2], [0.5, 0.4])
    m2 = Monitor(MonitorConfig(window=3))
    m2.load_state_dict(m.state_dict())
    a1, _ = m.observe({"reward/raw_mean": 0.4, "gold/score": 0.2})
    a2, _ = m2.observe({"reward/raw_mean": 0.4, "gold/score": 0.2})
    assert [a.name for a in a1] == [a.name for a in a2] == ["over_optimisation"]
    assert math.isclose(m2.sft_distinct_2, 0.4)
