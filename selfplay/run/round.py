"""One self-play round, stage by stage: rollout -> score -> reference -> update (-> critic refresh), then the host's
measurements (gold grader, diversity, lengths). `selfplay bench round` times these same stages.

    prompts -> actor -> critic score -> reference log-probs -> reward functions (reward.fns, weighted with the critic)
        -> learner update (+ human examples, learner.ptx_coef)
    every critic.refresh_every rounds: critic refresh on the policy's own samples
A run without a critic (config.uses_critic) skips the score stage and reports no critic figures.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfplay import learner, sharding
from selfplay.actor import Generator, decode_completions, token_credits
from selfplay.config import Config
from selfplay.critic import PairSource, refresh, score_essays, score_rollout
from selfplay.models import heads, transformer
from selfplay.monitors import diversity
from selfplay.rewards import Rewards
from selfplay.run.state import RunState
from selfplay.run.task import Task
from selfplay.world import mean_scores
from selfplay.world.grader import credit_spans, omission_spans


# One thread for the round's host work (text decoding, the gold grader, diversity), overlapped with the device's.
_HOST = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfplay-host")


class Stopwatch:
    """Seconds per stage: `sw("update", fn, *args)` runs fn, waits for its arrays, and appends the time to
    `sw.seconds["update"]`; `last()` gives each stage's latest time."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.seconds.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def last(self) -> dict[str, float]:
        return {name: times[-1] for name, times in self.seconds.items()}


class Steps:
    """The compiled functions of the round besides the sampler and the critic, one per prompt bucket P (fixed shapes:
    one compilation each); with a `layout`, the update and reference steps are pinned to its mesh."""

    def __init__(self, cfg: Config, graphdef: Any, optimizer: Any, value_graphdef: Any = None, layout: sharding.Layout | None = None):
        self.cfg = cfg
        self.optimizer = optimizer
        self.value_graphdef = value_graphdef
        self.layout = layout
        # learner.temperature_in_loss: the policy, pi_old and the reference are read at the sampler's temperature
        t = cfg.actor.temperature if cfg.learner.temperature_in_loss and not cfg.actor.greedy else 1.0
        self.logprob_fn = functools.partial(transformer.token_logprobs, graphdef, temperature=t)
        self._update: dict[int, Callable] = {}
        self._reference: dict[int, Callable] = {}

    def value_fn(self, vparams: Any, tokens_bl: jax.Array, positions_bl: jax.Array, valid_bl: jax.Array) -> jax.Array:
        return nnx.merge(self.value_graphdef, vparams)(tokens_bl, positions_bl, valid_bl)

    def update(self, p: int) -> Callable:
        if p not in self._update:
            step = learner.make_update_step(
                self.cfg.learner,
                group_size=self.cfg.actor.samples_per_prompt,
                prompt_width=p,
                logprob_fn=self.logprob_fn,
                value_fn=self.value_fn if self.cfg.learner.algorithm == "ppo" else None,
                optimizer=self.optimizer,
                actor_cfg=self.cfg.actor,
            )
            self._update[p] = step if self.layout is None else self.layout.update_step(step)
        return self._update[p]

    def reference(self, p: int) -> Callable:
        if p not in self._reference:
            step = learner.make_reference_logprobs(self.logprob_fn, prompt_width=p)
            self._reference[p] = step if self.layout is None else self.layout.reference_step(step)
        return self._reference[p]

    def place_batch(self, x_b: np.ndarray) -> jax.Array:
        """A whole per-row host array (e.g. gold rewards) on the device(s), split like the rollout's rows."""
        return jnp.asarray(x_b) if self.layout is None else self.layout.place_batch(x_b)


def init_learner(cfg: Config, params: Any, optimizer: Any, layout: sharding.Layout | None = None) -> tuple[learner.TrainState, Any]:
    """A fresh learner state from the policy's params; with PPO a value model initialised from the policy's trunk.
    With a `layout` every leaf is then placed by its logical axes (moments follow their params; counters replicated).
    Returns (state, the value model's graphdef or None)."""
    value_params, value_graphdef = None, None
    if cfg.learner.algorithm == "ppo":
        vm = heads.ValueModel(cfg.model, rngs=nnx.Rngs(params=jax.random.key(cfg.run.seed + 1)))
        nnx.update(vm.trunk, params)
        value_graphdef, value_params = nnx.split(vm, nnx.Param)
    state = learner.init_train_state(cfg.learner, params, optimizer=optimizer, value_params=value_params)
    if layout is not None:
        state = layout.place_state(state)
    return state, value_graphdef


@dataclasses.dataclass
class Setup:
    """What every round reads and nothing changes: the config, the task, the policy's sampler, the compiled steps,
    the frozen reference params, with refreshes where the critic's new pairs come from, and the reward functions."""

    cfg: Config
    task: Task
    gen: Generator
    steps: Steps
    ref_params: Any
    refresh_source: PairSource | None
    rewards: Rewards


@dataclasses.dataclass
class RoundResult:
    """metrics: every scalar of the round (TensorBoard tags); rewards_b: the critic's reward of each essay (without a
    critic: the total reward); text: a markdown sample of essays with their scores; refreshed: the critic was
    retrained at the round's end."""

    metrics: dict[str, float]
    rewards_b: np.ndarray
    text: str
    refreshed: bool


def run_round(setup: Setup, run: RunState, rnd: int) -> RoundResult:
    """Round `rnd`: advances `run` (learner state, critic, prompt and example streams) by one round."""
    cfg, task, gen, steps = setup.cfg, setup.task, setup.gen, setup.steps
    n_prompts, g = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt
    key_r = jax.random.fold_in(run.key, rnd)
    sw = Stopwatch()
    t_round = time.perf_counter()

    idx = run.prompts.take(n_prompts)
    prompts = [task.train_prompts[i] for i in idx]
    rollout, p = sw("timing/rollout", gen.rollout, run.learner.params, prompts, jax.random.fold_in(key_r, 0), g)
    rep = [q for q in prompts for _ in range(g)]
    # The host's work (decoding the essays, the gold grader, later the diversity measures) runs on a thread while the
    # device scores, takes the reference log-probs and updates. Every device transfer stays on this thread (in a
    # multi-process run they are collectives, which must be issued in the same order everywhere).
    tokens_h, mask_h, eos_h = sharding.to_host((rollout.tokens_bl, rollout.completion_mask_bl, rollout.eos_b))
    host_s = [0.0]

    def on_host(fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        host_s[0] += time.perf_counter() - t
        return out

    def decode_and_grade() -> tuple[list[str], list | None, np.ndarray | None]:
        tok = gen.policy.tokenizer
        essays = decode_completions(tok, tokens_h, mask_h, p)
        if cfg.run.token_credit == "none":
            return essays, task.grades(rep, essays), None
        world = task.world
        judged = [world.grade_sentences(q, e) for q, e in zip(rep, essays)]  # type: ignore[union-attr]
        where = cfg.run.token_credit.removeprefix("gold_")
        spans = [credit_spans(e, verdicts, where) for e, (_, verdicts) in zip(essays, judged)]
        if cfg.run.omission_credit:  # the asked facts left out, charged to the closing sentence of a grounded essay
            grounded = {q: world.parse_prompt(q).grounded for q in prompts}  # type: ignore[union-attr]
            spans = [sp + omission_spans(s, verdicts, grounded[q], cfg.run.omission_credit)
                     for sp, q, (s, verdicts) in zip(spans, rep, judged)]
        return essays, [s for s, _ in judged], token_credits(tok, tokens_h, mask_h, p, spans)

    graded = _HOST.submit(on_host, decode_and_grade)
    critic_b = raw_b = None  # the critic's reward and raw score of each essay, when the run has a critic
    judged = run.critic is not None and cfg.critic.judge  # a judge reads the decoded essays
    if run.critic is not None and not judged:
        scores, raw_b = sw("timing/score", score_rollout, run.critic, rollout, p)
        critic_b = scores.rewards_b
    ref_lp = sw("timing/reference", steps.reference(p), setup.ref_params, rollout)

    essays, grades, credits_bl = graded.result()
    if judged:
        scores, raw_b = sw("timing/score", score_essays, run.critic, rep, essays)
        critic_b = steps.place_batch(scores.rewards_b)
    gold_b = None if grades is None else np.array([x.score for x in grades], np.float32)
    train_rewards, total_b = critic_b, None
    if cfg.run.reward_source == "gold":
        total_b = gold_b
    elif cfg.run.reward_source == "none":  # the control arm
        total_b = np.zeros(len(essays), np.float32)
    if total_b is not None:
        train_rewards = steps.place_batch(total_b)
    r_fb = None
    if not setup.rewards.critic_only:  # a failing reward function stops the round here, before the update
        r_fb = sw("timing/reward_fns", setup.rewards.call, rep, essays, task.columns(idx, g), rnd)
        total_b = setup.rewards.total(None if train_rewards is None else sharding.to_host(train_rewards), r_fb)
        train_rewards = steps.place_batch(total_b)

    def update() -> dict:
        ptx_rows = run.ptx.take(cfg.learner.ptx_batch) if run.ptx is not None else None
        credits = None if credits_bl is None else steps.place_batch(credits_bl)
        batch = learner.Batch(rollout, train_rewards, ref_lp, ptx_rows, credits)
        run.learner, m = steps.update(p)(run.learner, batch, jax.random.fold_in(key_r, 1))
        return jax.device_get(m)

    critic_rr = None if critic_b is None else sharding.to_host((critic_b, raw_b))
    measured = _HOST.submit(on_host, measure, critic_rr, mask_h, eos_h, essays, grades, g)
    metrics: dict[str, float] = {k: float(v) for k, v in sw("timing/update", update).items()}
    refreshed = setup.refresh_source is not None and rnd % cfg.critic.refresh_every == 0
    if refreshed:
        metrics |= sw("timing/critic", refresh, run.critic, run.learner.params, setup.refresh_source)

    metrics |= measured.result()
    if r_fb is not None:
        metrics |= setup.rewards.metrics(None if critic_rr is None else critic_rr[0], r_fb, total_b)
    elif critic_rr is None:  # the gold reward or the control arm's zeros, alone
        metrics |= {"reward/mean": float(total_b.mean()), "reward/std": float(total_b.std())}
    timing = sw.last()
    timing["timing/host"] = host_s[0]
    timing["perf/step_time"] = time.perf_counter() - t_round
    metrics |= timing
    metrics["perf/tokens_per_s"] = float(mask_h.sum()) / max(timing["timing/rollout"], 1e-9)
    r, whose = (total_b, "reward") if critic_rr is None else (critic_rr[0], "critic")
    return RoundResult(metrics, r, sample_text(rep, essays, r, grades, whose), refreshed)


def measure(critic_rr: tuple[np.ndarray, np.ndarray] | None, mask: np.ndarray, eos_b: np.ndarray, essays: list[str],
            grades: list | None, g: int) -> dict[str, float]:
    """The round's host-side measurements: length, gold sub-scores, diversity and, given the critic's (rewards, raw
    scores), its reward and agreement with gold."""
    out: dict[str, float] = {}
    if critic_rr is not None:
        r, raw = critic_rr
        out = {"reward/mean": float(r.mean()), "reward/std": float(r.std()), "reward/raw_mean": float(raw.mean())}
    out |= {
        "completions/mean_length": float(mask.sum()) / len(essays),
        "completions/clipped_ratio": float(1.0 - eos_b.mean()),
    }
    if grades is not None:
        out |= {f"gold/{k}": v for k, v in mean_scores(grades).items() if not k.startswith("n_") and not k.startswith("has_")}
    if grades is not None and critic_rr is not None:
        agreement = pair_agreement(critic_rr[0], np.array([x.score for x in grades], np.float32), g)
        if agreement is not None:
            out["critic/accuracy"] = agreement
        elif g >= 2:
            out["critic/accuracy"] = float("nan")  # no pair the gold grader could tell apart this round
    return out | diversity(essays)


def sample_text(rep: list[str], essays: list[str], r: np.ndarray, grades: list | None, label: str, shown: int = 4) -> str:
    """Markdown of `shown` essays spread over the batch, with their prompt, reward `r` (`label`: whose) and gold score."""
    gold = [""] * len(essays) if grades is None else [f" · gold {s.score:.2f} (halluc. {s.hallucination_rate:.2f})" for s in grades]
    picks = list(range(0, len(essays), max(1, len(essays) // shown)))[:shown]
    return "\n\n".join(f"**prompt:** {rep[i]}\n\n**{label}** {r[i]:+.3f}{gold[i]}\n\n{essays[i]}" for i in picks)


def pair_agreement(rewards_b: np.ndarray, gold_b: np.ndarray, g: int) -> float | None:
    """How often the critic orders the first two essays of each prompt as the gold grader does (gold ties left out)."""
    if g < 2:
        return None
    a, b = rewards_b[0::g], rewards_b[1::g]
    ga, gb = gold_b[0::g], gold_b[1::g]
    decided = ga != gb
    return float(np.mean(((a > b) == (ga > gb))[decided])) if decided.any() else None
