"""The self-judging critic (critic.judge): a Bradley-Terry model over what the SFT policy itself says of an essay and
what the essay's text says against its prompt, fitted on the pool's pairs.

Measured on the default job's SFT policy (README, "The critic on a competent policy"): every transformer critic
trained on its ~1100 labelled pairs ranks held-out pairs at chance (0.53-0.61 on pairs gold sets 0.05 apart), with or
without self-made negatives, token heads, a trunk from the policy or an ensemble. Two free signals do not need
learning from so few labels, only weighing:

  the policy's own confidence   log pi_SFT of each essay token (+ eos) given the prompt, at temperature 1: a value
                                the policy invented is one it was unsure of (closed-book prompts: Spearman 0.3-0.5
                                with gold on its own). Sum, mean, minimum, the count of tokens below
                                SURPRISE_PROB, and the count of tokens.
  the essay against the prompt  the distinct values the prompt gives that the essay restates (`tamper.stated_values`,
                                the token heads' `cover` rule), their share of the values the prompt gives, repeated
                                sentences (the same text again), sentences.

The reward is r = w . (phi - mean) / scale over these features (and each again for prompts with a fact sheet:
FEATURES), w the L2-regularised logistic regression of the pool's training pairs' preferences (labelled, and self-made
ones with critic.synthetic_per_label) on their feature differences (Newton's method, float64: deterministic), mean
and scale the training essays' feature statistics. The policy is the frozen SFT policy (the run's reference), so the
features of an essay never change while the policy trains. A judge reads text (prompt, essay), so a rollout is scored
after it is decoded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from selfplay.critic.tamper import MIN_VALUE_LETTERS, WORD, stated_values
from selfplay.data import fixed_chunks
from selfplay.models import transformer
from selfplay.world.grammar import split_sentences

BASE_FEATURES: tuple[str, ...] = (
    "logprob_sum", "logprob_mean", "logprob_min", "surprised_tokens", "tokens",
    "values_stated", "values_share", "repeated_sentences", "sentences",
)
# Each again times `sheet` (1 when the prompt gives values besides its topic's name: a fact sheet), so the head weighs
# the policy's confidence and the restated values apart for grounded and closed-book prompts.
FEATURES: tuple[str, ...] = BASE_FEATURES + tuple(f"{f}*sheet" for f in BASE_FEATURES)
SURPRISE_PROB = 0.1  # a token the policy gave less than this probability is a surprise
NEWTON_STEPS = 50
NEWTON_TOL = 1e-10


def prompt_values(prompt: str, phrasing: frozenset[str]) -> set[str]:
    """The values a prompt gives: its numbers and words of at least MIN_VALUE_LETTERS letters that are not `phrasing`
    (lower-cased)."""
    return {w.lower() for w in WORD.findall(prompt) if w.isdigit() or (len(w) >= MIN_VALUE_LETTERS and w.lower() not in phrasing)}


def text_features(prompt: str, essay: str, phrasing: frozenset[str]) -> list[float]:
    """values_stated, values_share, repeated_sentences, sentences of one essay (FEATURES order)."""
    given = prompt_values(prompt, phrasing)
    stated = {essay[a:b].lower() for a, b in stated_values(prompt, essay, phrasing)} & given
    sents = [s.lower() for s in split_sentences(essay)]
    repeated = len(sents) - len(set(sents))
    return [len(stated), len(stated) / len(given) if given else 0.0, repeated, len(sents)]


@dataclasses.dataclass
class Judge:
    """The frozen policy that reads the essays, and how it batches them (right-padded to `buckets`, `batch` rows a
    call: one compilation per bucket)."""

    tokenizer: Any
    graphdef: Any
    params: Any
    buckets: tuple[int, ...]
    batch: int

    def __post_init__(self) -> None:
        def lp(params: Any, tokens_nl: jax.Array, len_n: jax.Array) -> jax.Array:
            col = jnp.broadcast_to(jnp.arange(tokens_nl.shape[1], dtype=jnp.int32), tokens_nl.shape)
            return transformer.token_logprobs(self.graphdef, params, tokens_nl, col, col < len_n[:, None])[0]

        self._lp = jax.jit(lp)

    def policy_features(self, prompts: Sequence[str], essays: Sequence[str]) -> np.ndarray:
        """[n, 5]: logprob_sum, logprob_mean, logprob_min, surprised_tokens, tokens of each essay (with its eos)."""
        rows, masks = [], []
        for p, e in zip(prompts, essays, strict=True):
            ids, mask = self.tokenizer.encode_example(p, e)
            keep = self.buckets[-1]  # a longer row keeps its last tokens: the essay's
            rows.append(np.asarray(ids[-keep:], np.int32))
            masks.append(np.asarray(mask[-keep:], bool))
        out = np.zeros((len(rows), 5), np.float64)
        for c, part, real in fixed_chunks(list(range(len(rows))), self.batch):
            width = next(b for b in self.buckets if b >= max(len(rows[i]) for i in part))
            tokens = np.full((len(part), width), self.tokenizer.pad_id, np.int32)
            lens = np.zeros(len(part), np.int32)
            for j, i in enumerate(part):
                tokens[j, : len(rows[i])], lens[j] = rows[i], len(rows[i])
            lp = np.asarray(self._lp(self.params, tokens, lens), np.float64)
            for j, i in enumerate(part[:real]):
                x = lp[j, : len(rows[i])][masks[i]]
                out[i] = [x.sum(), x.mean(), x.min(), (x < math.log(SURPRISE_PROB)).sum(), len(x)] if len(x) else 0.0
        return out


def essay_features(judge: Judge, prompts: Sequence[str], essays: Sequence[str], phrasing: frozenset[str]) -> np.ndarray:
    """[n, len(FEATURES)] float64."""
    text = np.array([text_features(p, e, phrasing) for p, e in zip(prompts, essays, strict=True)], np.float64)
    base = np.concatenate([judge.policy_features(prompts, essays), text.reshape(len(prompts), -1)], axis=1)
    sheet = np.array([len(prompt_values(p, phrasing)) > 1 for p in prompts], np.float64)[:, None]
    return np.concatenate([base, base * sheet], axis=1)


@dataclasses.dataclass(frozen=True)
class JudgeHead:
    """r = w . (phi - mean) / scale; `zero()` (w = 0, before the first fit) scores every essay 0."""

    mean: np.ndarray
    scale: np.ndarray
    w: np.ndarray

    def __call__(self, phi_nf: np.ndarray) -> np.ndarray:
        return ((phi_nf - self.mean) / self.scale) @ self.w

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "w": self.w.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> JudgeHead:
        arrays = [np.asarray(d[k], np.float64) for k in ("mean", "scale", "w")]
        if any(a.shape != (len(FEATURES),) for a in arrays):
            raise ValueError(f"a judge head has {len(FEATURES)} features ({', '.join(FEATURES)}), got shapes {[a.shape for a in arrays]}")
        return cls(*arrays)

    @classmethod
    def zero(cls) -> JudgeHead:
        f = len(FEATURES)
        return cls(np.zeros(f), np.ones(f), np.zeros(f))


def fit_head(phi_chosen: np.ndarray, phi_rejected: np.ndarray, l2: float) -> JudgeHead:
    """The Bradley-Terry head of pairs whose chosen essays have features `phi_chosen` [n, F], rejected
    `phi_rejected`: w minimises sum_i log(1 + exp(-w . d_i)) + l2 / 2 * |w|^2, d_i the standardised difference."""
    both = np.concatenate([phi_chosen, phi_rejected])
    mean = both.mean(0)
    scale = both.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature (e.g. no prompt gives values) stays at weight 0
    d = (phi_chosen - phi_rejected) / scale
    w = np.zeros(d.shape[1])
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-(d @ w)))  # P(chosen preferred)
        grad = -d.T @ (1.0 - p) + l2 * w
        hess = (d * (p * (1.0 - p))[:, None]).T @ d + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w = w - step
        if float(np.abs(step).max()) < NEWTON_TOL:
            break
    return JudgeHead(mean, scale, w)
