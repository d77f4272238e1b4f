"""Where new preference pairs come from in the world (`critic.label_source`): two policy samples labelled by the
budgeted `Labeller` (world), or the world's human essay preferred over the policy's sample (discriminator).

  world          two samples of the policy for one world prompt, labelled by the budgeted `Labeller` (the gold grader
                 as the human); identical samples are skipped without spending budget.
  discriminator  a world prompt's human essay is preferred over the policy's sample (SPIN / GAN style); no grader.
                 `label_budget` then counts pairs, though no labeller is asked.
(`file`, a TRL preference JSONL, is read by `selfplay.critic.pairs.read_preference_file`.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import jax
import numpy as np

from selfplay.config import UserError
from selfplay.critic.pairs import Pair
from selfplay.world import Labeller, World

# (policy_params, prompts, key, samples_per_prompt) -> essays grouped by prompt [p0 s0, p0 s1, ..., p1 s0, ...]
SampleFn = Callable[[Any, Sequence[str], jax.Array, int], list[str]]


def generator_sample_fn(generator: Any) -> SampleFn:
    """A `SampleFn` from a `selfplay.policy.Generator` (the prompts of one call must number its batch or fewer)."""

    def sample(policy_params: Any, prompts: Sequence[str], key: jax.Array, g: int) -> list[str]:
        return generator.generate(list(prompts), key, samples_per_prompt=g, params=policy_params)

    return sample


@dataclasses.dataclass
class PairSource:
    """New pairs in the world: `kind` "world" (two policy samples per prompt, labelled by the critic's labeller) or
    "discriminator" (the world's human essay beats the policy's sample). `prompts_per_call` prompts per sampler call."""

    world: World
    sample_fn: SampleFn
    kind: Literal["world", "discriminator"]
    prompts_per_call: int
    max_dry_calls: int = 3  # sampler calls in a row that yield no usable pair before giving up


def collection_rngs(seed: int, tag: int) -> tuple[np.random.Generator, jax.Array]:
    """The prompt generator and sampling key of pair collection number `tag` (0: the initial one)."""
    return np.random.default_rng([seed, 0xC011, tag]), jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0xC011), tag)


def collect_pairs(
    source: PairSource,
    labeller: Labeller | None,
    policy_params: Any,
    n: int,
    rng: np.random.Generator,
    key: jax.Array,
) -> tuple[list[Pair], dict[str, int]]:
    """Up to n new pairs for fresh world prompts; stats: labels spent, identical pairs skipped, sampler calls.

    World pairs spend exactly one label each (never more than n); pairs whose two texts are identical are dropped
    before labelling. Fewer than n come back only when `max_dry_calls` calls in a row give nothing usable."""
    if source.kind == "world" and labeller is None:
        raise UserError("critic.label_source=world needs a labeller")
    pairs: list[Pair] = []
    stats = {"labels": 0, "skipped_identical": 0, "sampler_calls": 0}
    dry = 0
    while len(pairs) < n and dry < source.max_dry_calls:
        prompts = source.world.sample_prompts(source.prompts_per_call, rng)
        call_key = jax.random.fold_in(key, stats["sampler_calls"])
        stats["sampler_calls"] += 1
        if source.kind == "world":
            essays = source.sample_fn(policy_params, prompts, call_key, 2)
            cands = [(p, essays[2 * i], essays[2 * i + 1]) for i, p in enumerate(prompts)]
        else:
            essays = source.sample_fn(policy_params, prompts, call_key, 1)
            cands = [(p, source.world.human_essay(p, rng), e) for p, e in zip(prompts, essays)]
        usable = [c for c in cands if c[1] != c[2]]
        stats["skipped_identical"] += len(cands) - len(usable)
        usable = usable[: n - len(pairs)]
        dry = 0 if usable else dry + 1
        if not usable:
            continue
        if source.kind == "world":
            assert labeller is not None
            labels = labeller.label_batch([c[0] for c in usable], [c[1] for c in usable], [c[2] for c in usable])
            stats["labels"] += len(usable)
            pairs += [Pair(p, a, b) if lab == 0 else Pair(p, b, a) for (p, a, b), lab in zip(usable, labels)]
        else:
            pairs += [Pair(p, human, mine) for p, human, mine in usable]
    return pairs, stats


