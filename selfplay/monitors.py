"""Monitors: diversity (distinct-n, self-BLEU), rank statistics (Spearman), and the alarms for over-optimisation, KL
growth and collapse.

Host-side and cheap; they read decoded essays and per-round means, never the device state.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Sequence

import numpy as np

from selfplay.config import MonitorConfig


def _words(text: str) -> list[str]:
    return text.lower().replace(".", " .").replace(",", " ,").split()


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole set of texts (0 when there are none)."""
    grams = [g for t in texts for g in _ngrams(_words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _bleu(hyp: list[str], ref_max_counts: list[Counter], ref_lens: list[int], max_n: int) -> float:
    """Sentence BLEU (geometric mean of clipped n-gram precisions, +1 smoothing for n>1, brevity penalty)."""
    if not hyp:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(_ngrams(hyp, n))
        total = sum(grams.values())
        clipped = sum(min(c, ref_max_counts[n - 1].get(g, 0)) for g, c in grams.items())
        if n == 1:
            if clipped == 0:
                return 0.0
            log_p += math.log(clipped / total)
        else:
            log_p += math.log((clipped + 1) / (total + 1))
    closest = min(ref_lens, key=lambda r: (abs(r - len(hyp)), r))
    bp = 1.0 if len(hyp) > closest else math.exp(1 - closest / max(len(hyp), 1))
    return bp * math.exp(log_p / max_n)


def self_bleu(texts: Sequence[str], max_n: int = 4, max_texts: int = 64) -> float:
    """Mean BLEU of each text against all the others as references (higher = less diverse).

    Uses at most `max_texts` texts (the first ones) to keep the cost quadratic in a small number.
    """
    words = [_words(t) for t in texts[:max_texts]]
    if len(words) < 2:
        return 0.0
    counts = [[Counter(_ngrams(w, n)) for n in range(1, max_n + 1)] for w in words]
    scores = []
    for i, hyp in enumerate(words):
        ref_max = [Counter() for _ in range(max_n)]
        for j in range(len(words)):
            if j != i:
                for n in range(max_n):
                    ref_max[n] |= counts[j][n]  # Counter union keeps the max count per n-gram
        scores.append(_bleu(hyp, ref_max, [len(w) for j, w in enumerate(words) if j != i], max_n))
    return float(np.mean(scores))


def diversity(texts: Sequence[str]) -> dict[str, float]:
    return {
        "diversity/distinct_1": distinct_n(texts, 1),
        "diversity/distinct_2": distinct_n(texts, 2),
        "diversity/self_bleu": self_bleu(texts),
    }


@dataclasses.dataclass
class Alarm:
    name: str
    message: str


class Monitor:
    """Watches per-round means and raises alarms:

    - `alarm/over_optimisation`: over the last `window` rounds the critic's raw score (`reward/raw_mean`,
      before the normaliser, whose running mean would chase a rising score and hide it) rose (least-squares
      slope > 0 and last - first > `min_change`) while gold fell (slope < 0 and first - last > `min_change`).
      A retrained critic scores on another scale, so `critic_changed()` starts the window afresh. A run without a
      critic has none to exploit: the alarm stays quiet.
    - `alarm/kl`: the policy's KL to the reference above `kl_max`.
    - `alarm/collapse`: distinct-2 below `collapse_fraction` of its value for the SFT policy.
    """

    def __init__(self, cfg: MonitorConfig, sft_distinct_2: float | None = None):
        self.cfg = cfg
        self.sft_distinct_2 = sft_distinct_2
        self.rewards: list[float] = []
        self.golds: list[float] = []

    def state_dict(self) -> dict:
        return {"rewards": list(self.rewards), "golds": list(self.golds), "sft_distinct_2": self.sft_distinct_2}

    def load_state_dict(self, d: dict) -> None:
        self.rewards = [float(x) for x in d["rewards"]]
        self.golds = [float(x) for x in d["golds"]]
        self.sft_distinct_2 = d["sft_distinct_2"]

    def critic_changed(self) -> None:
        """The critic was retrained (a refresh): its later scores are not comparable with the earlier ones."""
        self.rewards.clear()
        self.golds.clear()

    @staticmethod
    def _slope(y: Sequence[float]) -> float:
        x = np.arange(len(y), dtype=np.float64)
        return float(np.polyfit(x, np.asarray(y, np.float64), 1)[0])

    def observe(self, metrics: dict[str, float]) -> tuple[list[Alarm], dict[str, float]]:
        """Record one round; returns (alarms fired, the `alarm/*` scalars: 1.0 fired, 0.0 quiet)."""
        cfg = self.cfg
        alarms: list[Alarm] = []
        w = cfg.window
        if "reward/raw_mean" in metrics:
            self.rewards.append(float(metrics["reward/raw_mean"]))
        if "gold/score" in metrics:
            self.golds.append(float(metrics["gold/score"]))
        if len(self.golds) >= w and len(self.rewards) >= w:
            r, g = self.rewards[-w:], self.golds[-w:]
            if self._slope(r) > 0 and self._slope(g) < 0 and r[-1] - r[0] > cfg.min_change and g[0] - g[-1] > cfg.min_change:
                alarms.append(
                    Alarm(
                        "over_optimisation",
                        f"over-optimisation: over the last {w} rounds the critic's reward rose {r[0]:.3f} -> {r[-1]:.3f} "
                        f"while gold fell {g[0]:.3f} -> {g[-1]:.3f}; the policy is exploiting the critic",
                    )
                )
        if cfg.kl_max > 0 and "kl" in metrics and float(metrics["kl"]) > cfg.kl_max:
            alarms.append(Alarm("kl", f"KL to the reference {float(metrics['kl']):.4f} exceeds monitor.kl_max ({cfg.kl_max})"))
        d2 = metrics.get("diversity/distinct_2")
        if self.sft_distinct_2 and d2 is not None and d2 < cfg.collapse_fraction * self.sft_distinct_2:
            alarms.append(
                Alarm(
                    "collapse",
                    f"collapse: distinct-2 {d2:.3f} is below {cfg.collapse_fraction:.0%} of the SFT policy's {self.sft_distinct_2:.3f}",
                )
            )
        fired = {a.name for a in alarms}
        scalars = {f"alarm/{name}": float(name in fired) for name in ("over_optimisation", "kl", "collapse")}
        return alarms, scalars


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties given their average rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x, np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg = ends - (counts - 1) / 2.0
    return avg[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson of average ranks); nan when either side is constant or n < 2."""
    rx, ry = rankdata(np.asarray(x)), rankdata(np.asarray(y))
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
