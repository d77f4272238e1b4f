"""learner.algorithm=expert_iteration (ReST / RAFT / rejection-sampling fine-tuning): the kept rows are exactly the best
of each group and the loss is the NLL of the kept completions only (its exact resume: tests/test_loop.py); and
learner.temperature_in_loss trains the distribution that was sampled."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay import algorithms as alg
from selfplay import learner
from selfplay.config import ConfigError, LearnerConfig, load_config
from selfplay.models import transformer
from selfplay.policy import init_policy
from selfplay.tokenizer import Tokenizer
from selfplay.types import Rollout

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _numpy_keep(rewards, g, keep):
    out = np.zeros(len(rewards), np.float32)
    for start in range(0, len(rewards), g):
        r = rewards[start : start + g]
        if r.max() == r.min():
            continue
        order = sorted(range(g), key=lambda i: (-r[i], i))  # best first, ties to the row sampled first
        for i in order[:keep]:
            out[start + i] = 1.0
    return out


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_the_kept_rows_are_the_best_of_each_group(keep):
    g = 4
    rng = np.random.default_rng(keep)
    rewards = rng.integers(0, 3, 40).astype(np.float32)  # many ties
    rewards[8:12] = 0.5  # a group that tells nothing apart keeps nothing
    got = np.asarray(jax.jit(alg.expert_iteration_keep, static_argnums=(1, 2))(jnp.asarray(rewards), g, keep))
    np.testing.assert_array_equal(got, _numpy_keep(rewards, g, keep))
    assert got[8:12].sum() == 0
    decided = [s for s in range(0, 40, g) if rewards[s : s + g].max() > rewards[s : s + g].min()]
    assert got.sum() == keep * len(decided)


def test_keep_must_leave_some_out():
    with pytest.raises(ValueError, match="keeps 1 to G - 1"):
        alg.expert_iteration_keep(jnp.zeros(8), 4, 4)


def _cfg(**kw):
    return LearnerConfig(algorithm="expert_iteration", kl_coef=0.0, **kw)


@pytest.mark.parametrize("agg", ["seq_mean", "token_mean"])
def test_the_loss_is_the_nll_of_the_kept_completions_only(agg):
    rng = np.random.default_rng(0)
    b, t, g = 8, 6, 4
    mask = (rng.random((b, t)) < 0.8).astype(np.float32)
    mask[:, 0] = 1.0
    logp = rng.uniform(-3, -0.1, (b, t)).astype(np.float32)
    rewards = rng.normal(size=b).astype(np.float32)
    cfg = _cfg(loss_agg=agg)
    adv = alg.compute_advantages(cfg, alg.AdvantageInputs(jnp.asarray(rewards), jnp.asarray(mask)), group_size=g)
    keep = _numpy_keep(rewards, g, 1)
    np.testing.assert_array_equal(np.asarray(adv.advantages_bt), keep[:, None] * mask)

    def loss(lp):
        return alg.policy_objective(cfg, lp, lp + 1.0, adv.advantages_bt, jnp.asarray(mask))[0]

    value, grad = jax.value_and_grad(loss)(jnp.asarray(logp))
    kept = keep[:, None] * mask
    if agg == "seq_mean":
        rows = [(-(logp[i] * kept[i]).sum() / kept[i].sum()) for i in range(b) if keep[i]]
        expected = np.mean(rows)
    else:
        expected = -(logp * kept).sum() / kept.sum()
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    grad = np.asarray(grad)
    assert np.all(grad[keep == 0] == 0.0), "a row that was not kept must not move the policy"
    assert np.all(grad[kept > 0] < 0.0)


def _tiny_update(rows_tokens, rewards, g):
    cfg = load_config(TINY)
    tok = Tokenizer.train(["a b c d e f g"] * 4, 300)
    policy = init_policy(cfg, tok, 0)
    lcfg = dataclasses.replace(cfg.learner, algorithm="expert_iteration", kl_coef=0.0, lr=1e-2)
    b, l = rows_tokens.shape
    p = 4
    mask = np.zeros((b, l), np.float32)
    mask[:, p:] = 1.0
    rollout = Rollout(
        tokens_bl=jnp.asarray(rows_tokens), prompt_len_b=jnp.full((b,), p, jnp.int32), completion_mask_bl=jnp.asarray(mask),
        logprobs_bl=jnp.zeros((b, l), jnp.float32), eos_b=jnp.ones((b,), bool),
    )
    logprob_fn = functools.partial(transformer.token_logprobs, policy.graphdef)
    step = learner.make_update_step(lcfg, group_size=g, prompt_width=p, logprob_fn=logprob_fn)
    state = learner.init_train_state(lcfg, policy.params)
    batch = learner.Batch(rollout, jnp.asarray(rewards), jnp.zeros((b, l), jnp.float32))
    state, metrics = step(state, batch, jax.random.key(0))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_an_update_never_reads_the_rows_it_did_not_keep():
    rng = np.random.default_rng(1)
    g, b, l = 4, 8, 12
    tokens = rng.integers(4, 300, (b, l)).astype(np.int32)
    rewards = np.array([0.1, 0.9, 0.3, 0.2, 0.5, 0.4, 0.8, 0.7], np.float32)  # keeps rows 1 and 6
    a, ma = _tiny_update(tokens, rewards, g)
    other = tokens.copy()
    other[[0, 2, 3, 4, 5, 7], 4:] = rng.integers(4, 300, (6, l - 4))  # every completion that was not kept
    b_, mb = _tiny_update(other, rewards, g)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b_)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ma["loss/policy"] == mb["loss/policy"] > 0
    moved = tokens.copy()
    moved[1, 6] = (moved[1, 6] + 1) % 300  # a kept completion: the update changes
    c, _ = _tiny_update(moved, rewards, g)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_config_refuses_keeping_every_completion():
    with pytest.raises(ConfigError, match="learner.ei_keep"):
        load_config(TINY, ["learner.algorithm=expert_iteration", "learner.ei_keep=2"])  # tiny samples 2 per prompt
    with pytest.raises(ConfigError, match="kl_in_reward"):
        load_config(TINY, ["learner.algorithm=expert_iteration", "learner.kl_in_reward=true", "learner.ei_keep=1"])


@pytest.mark.parametrize("in_loss", [True, False])
def test_temperature_in_loss_trains_the_distribution_that_was_sampled(in_loss):
    """learner.temperature_in_loss: the learner's forward (built by the round's Steps) gives the sampler's own
    log-probs at actor.temperature 0.7, so the update reports policy/sampling_logprob_gap ~ 0; without it the learner
    reads the temperature-1 policy, whose log-probs differ."""
    from selfplay.actor import Generator
    from selfplay.run.round import Steps

    cfg = load_config(TINY, ["actor.temperature=0.7", f"learner.temperature_in_loss={str(in_loss).lower()}"])
    tok = Tokenizer.train(["a b c d e f g"] * 4, 300)
    policy = init_policy(cfg, tok, 0)
    rollout, p = Generator(policy, cfg.actor, batch=2).rollout(policy.params, ["a b", "c d e"], jax.random.key(3), 2)
    steps = Steps(cfg, policy.graphdef, learner.make_optimizer(cfg.learner))
    lp, _ = steps.logprob_fn(policy.params, rollout.tokens_bl, rollout.positions_bl(p), rollout.valid_mask_bl(p))
    mask = np.asarray(rollout.completion_mask_bl) > 0
    gap = np.abs(np.asarray(lp) - np.asarray(rollout.logprobs_bl))[mask].mean()
    assert (gap < 1e-4) if in_loss else (gap > 1e-2), gap
    if in_loss:
        ref = steps.reference(p)(policy.params, rollout)
        state = learner.init_train_state(cfg.learner, policy.params)
        _, metrics = steps.update(p)(state, learner.Batch(rollout, jnp.arange(4, dtype=jnp.float32), ref), jax.random.key(0))
        assert float(metrics["policy/sampling_logprob_gap"]) < 1e-4
        assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6)  # the reference is read at the same temperature
