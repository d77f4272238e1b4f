"""selfplay.learner on a toy policy: a bigram logit table over 8 tokens, learning to write a target token.

The toy's completions are up to 4 tokens after the prompt (token 7 is EOS, so rows end at different lengths);
the reward is the fraction of the 4 completion slots holding TARGET, so a uniform policy scores about 0.1 and
the best policy 1.0. The expected reward is computed exactly (the policy is a Markov chain), not sampled.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay import algorithms, learner
from selfplay.algorithms import kl_k3, masked_mean
from selfplay.config import ActorConfig, ConfigError, LearnerConfig, ModelConfig
from selfplay.types import PtxRows, Rollout

V, PAD, EOS, TARGET = 8, 0, 7, 3
PROMPT = (PAD, 1, 2)  # left-padded to width P: prompt length 2
P, T = len(PROMPT), 4
L = P + T
N_PROMPTS, G = 4, 4
B = N_PROMPTS * G


def toy_logprob_fn(params, tokens_bl, positions_bl, valid_bl):
    """log pi(token_t | token_{t-1}) = log_softmax(table[token_{t-1}])[token_t], aligned like Rollout.logprobs_bl."""
    del positions_bl
    logp_blv = jax.nn.log_softmax(params["table"][tokens_bl[:, :-1]], axis=-1)
    lp_bl = jnp.take_along_axis(logp_blv, tokens_bl[:, 1:, None], axis=-1)[..., 0]
    ent_bl = -jnp.sum(jnp.exp(logp_blv) * logp_blv, axis=-1)
    keep_bl = (valid_bl[:, 1:] > 0) & (valid_bl[:, :-1] > 0)
    zero_b1 = jnp.zeros((tokens_bl.shape[0], 1), jnp.float32)
    return (
        jnp.concatenate([zero_b1, jnp.where(keep_bl, lp_bl, 0.0)], axis=1),
        jnp.concatenate([zero_b1, jnp.where(keep_bl, ent_bl, 0.0)], axis=1),
    )


def toy_value_fn(value_params, tokens_bl, positions_bl, valid_bl):
    """V(state before token t) = v[t, token_{t-1}]: a table over (column, previous token); 0 at column 0."""
    del positions_bl, valid_bl
    values_bl = value_params["v"][jnp.arange(1, L)[None, :], tokens_bl[:, :-1]]
    return jnp.concatenate([jnp.zeros((tokens_bl.shape[0], 1), jnp.float32), values_bl], axis=1)


@jax.jit
def sample(params, key):
    """B rows of the fixed prompt, each continued by up to T tokens (pad after EOS), with sampling log-probs."""
    prompt_bp = jnp.broadcast_to(jnp.array(PROMPT, jnp.int32), (B, P))

    def step(carry, key_t):
        prev_b, done_b = carry
        logits_bv = params["table"][prev_b]
        tok_b = jax.random.categorical(key_t, logits_bv).astype(jnp.int32)
        lp_b = jnp.take_along_axis(jax.nn.log_softmax(logits_bv), tok_b[:, None], axis=-1)[:, 0]
        live_b = ~done_b
        out = (jnp.where(live_b, tok_b, PAD), jnp.where(live_b, lp_b, 0.0), live_b.astype(jnp.float32))
        return (tok_b, done_b | (live_b & (tok_b == EOS))), out

    (_, eos_b), (tok_tb, lp_tb, mask_tb) = jax.lax.scan(
        step, (prompt_bp[:, -1], jnp.zeros((B,), bool)), jax.random.split(key, T)
    )
    zeros_bp = jnp.zeros((B, P), jnp.float32)
    return Rollout(
        tokens_bl=jnp.concatenate([prompt_bp, tok_tb.T], axis=1),
        prompt_len_b=jnp.full((B,), P - 1, jnp.int32),
        completion_mask_bl=jnp.concatenate([zeros_bp, mask_tb.T], axis=1),
        logprobs_bl=jnp.concatenate([zeros_bp, lp_tb.T], axis=1),
        eos_b=eos_b,
    )


def reward(rollout):
    hits_bt = (rollout.tokens_bl[:, P:] == TARGET) & (rollout.completion_mask_bl[:, P:] > 0)
    return hits_bt.sum(axis=1).astype(jnp.float32) / T


def expected_reward(params):
    """Exact E[reward] of the Markov policy: mass still alive at each slot times its chance of TARGET."""
    probs_vv = np.asarray(jax.nn.softmax(params["table"], axis=-1), np.float64)
    alive_v = np.eye(V)[PROMPT[-1]]
    total = 0.0
    for _ in range(T):
        q_v = alive_v @ probs_vv
        total += q_v[TARGET]
        alive_v = q_v.copy()
        alive_v[EOS] = 0.0
    return total / T


def zero_policy():
    return {"table": jnp.zeros((V, V), jnp.float32)}


def zero_values():
    return {"v": jnp.zeros((L, V), jnp.float32)}


def random_policy(seed, scale=2.0):
    return {"table": scale * jax.random.normal(jax.random.key(seed), (V, V), jnp.float32)}


def make(cfg, **kw):
    value_fn = toy_value_fn if cfg.algorithm == "ppo" else None
    return learner.make_update_step(cfg, group_size=G, prompt_width=P, logprob_fn=toy_logprob_fn, value_fn=value_fn, **kw)


def init(cfg, params=None):
    params = zero_policy() if params is None else params
    return learner.init_train_state(cfg, params, value_params=zero_values() if cfg.algorithm == "ppo" else None)


ref_logprobs = learner.make_reference_logprobs(toy_logprob_fn, prompt_width=P)


def batch_for(params, ref_params, key, rewards_fn=reward):
    rollout = sample(params, key)
    return learner.Batch(rollout, rewards_fn(rollout), ref_logprobs(ref_params, rollout))


def snapshot(tree):
    return jax.tree.map(np.array, tree)


def assert_finite(metrics):
    for k, v in metrics.items():
        assert np.all(np.isfinite(np.asarray(v))), (k, v)


def train(cfg, steps, seed=0):
    ref_params = zero_policy()
    update_step = make(cfg)
    state = init(cfg, ref_params)
    key = jax.random.key(seed)
    history = []
    for i in range(steps):
        k_sample, k_update = jax.random.split(jax.random.fold_in(key, i))
        state, metrics = update_step(state, batch_for(state.params, ref_params, k_sample), k_update)
        history.append(jax.device_get(metrics))
    return state, history


# ----------------------------------------------------------------------------------------------
# Every algorithm learns the toy task.
# ----------------------------------------------------------------------------------------------

BASE = LearnerConfig(lr=0.2, kl_coef=0.01)
VARIANTS = {
    "grpo": BASE,
    "rloo": dataclasses.replace(BASE, algorithm="rloo"),
    "reinforce_pp": dataclasses.replace(BASE, algorithm="reinforce_pp"),
    "ppo": dataclasses.replace(BASE, algorithm="ppo", lam=0.9),
    "dr_grpo": dataclasses.replace(BASE, std_normalize=False, loss_agg="constant"),
    "dapo": dataclasses.replace(BASE, loss_agg="token_mean", clip_eps_high=0.28),
}
STEPS, GOAL = 25, 0.9  # lr 0.2 reaches 0.84-0.95 by step 20 and >= 0.98 by step 30 (seeds 0, 1)


def test_uniform_policy_scores_about_one_over_v():
    assert 0.09 < expected_reward(zero_policy()) < 1.0 / V


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_algorithm_learns_the_target_token(name):
    state, history = train(VARIANTS[name], STEPS)
    assert expected_reward(state.params) >= GOAL, (name, expected_reward(state.params))
    for metrics in history:
        assert_finite(metrics)
        assert metrics["skipped_nonfinite"] == 0
    assert history[-1]["kl"] > history[0]["kl"]  # it moved away from the (uniform) reference
    if name == "ppo":
        assert history[0]["loss/value"] > 0.0
        assert state.value_params["v"][P:].max() > 0.3  # the value table learned that the target pays
    else:
        assert history[0]["loss/value"] == 0.0


# ----------------------------------------------------------------------------------------------
# The step's mechanics.
# ----------------------------------------------------------------------------------------------


def test_nonfinite_reward_skips_the_update_bitwise_and_counts_it():
    # REINFORCE++ whitens over the whole batch, so one NaN reward reaches every row and every minibatch.
    cfg = dataclasses.replace(BASE, algorithm="reinforce_pp", epochs=2, minibatches=2)
    update_step = make(cfg)
    ref_params = zero_policy()
    state = init(cfg, random_policy(1))
    key = jax.random.key(0)

    def nan_reward(rollout):
        return reward(rollout).at[5].set(jnp.nan)

    before = snapshot((state.params, state.opt_state.inner_state))
    state, metrics = update_step(state, batch_for(state.params, ref_params, key, nan_reward), key)
    assert int(metrics["skipped_nonfinite"]) == cfg.epochs * cfg.minibatches
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(snapshot((state.params, state.opt_state.inner_state)))):
        np.testing.assert_array_equal(a, b)  # params and Adam moments untouched
    assert np.isfinite(float(state.kl.kl_coef))

    state, metrics = update_step(state, batch_for(state.params, ref_params, key), key)
    assert int(metrics["skipped_nonfinite"]) == 0
    assert not np.array_equal(before[0]["table"], np.asarray(state.params["table"]))
    assert int(state.opt_state.total_notfinite) == cfg.epochs * cfg.minibatches


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_finite_gradient_with_a_nonfinite_update_is_skipped_and_counted(algorithm):
    """A NaN learning rate (or an overflowing moment) turns a finite gradient into a NaN update: apply_if_finite lets it
    through, the step must not."""
    cfg = dataclasses.replace(BASE, algorithm=algorithm, lam=0.9, epochs=2, minibatches=2)
    nan_lr = optax.apply_if_finite(optax.inject_hyperparams(optax.sgd)(learning_rate=float("nan")), max_consecutive_errors=10**9)
    update_step = make(cfg, optimizer=nan_lr)
    ref_params = zero_policy()
    state = learner.init_train_state(
        cfg, random_policy(1), optimizer=nan_lr, value_params=zero_values() if algorithm == "ppo" else None
    )
    before = snapshot(state)
    state, metrics = update_step(state, batch_for(state.params, ref_params, jax.random.key(0)), jax.random.key(1))
    assert int(metrics["skipped_nonfinite"]) == cfg.epochs * cfg.minibatches
    if algorithm == "ppo":
        assert int(metrics["value/skipped_nonfinite"]) == cfg.epochs * cfg.minibatches
    after = snapshot(state)
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.value_params)),
                    jax.tree.leaves((after.params, after.opt_state, after.value_params))):
        np.testing.assert_array_equal(a, b)  # params and optimiser state untouched
    assert np.isfinite(np.asarray(jax.tree.leaves(after.params)[0])).all()


def test_one_compilation_for_repeated_steps_and_the_sampling_gap():
    traces = []

    def counting_logprob_fn(*args):
        traces.append(1)
        return toy_logprob_fn(*args)

    cfg = BASE
    update_step = learner.make_update_step(
        cfg, group_size=G, prompt_width=P, logprob_fn=counting_logprob_fn, actor_cfg=ActorConfig(temperature=1.0)
    )
    ref_params = zero_policy()
    state = init(cfg, ref_params)
    gaps = []
    for i in range(3):
        batch = batch_for(state.params, ref_params, jax.random.key(i))
        old_state = state
        state, metrics = update_step(state, batch, jax.random.key(10 + i))
        gaps.append(float(metrics["policy/sampling_logprob_gap"]))
        if i == 0:
            traces_after_first = len(traces)
            # The state was donated; the caller's params (here also the reference) were copied, not taken.
            assert old_state.params["table"].is_deleted()
            assert not ref_params["table"].is_deleted()
    assert traces_after_first > 0
    assert len(traces) == traces_after_first  # steps 2 and 3 reused the compiled program
    assert max(gaps) < 1e-5  # on-policy: the sampler and the teacher-forced pass agree

    # Sampling-time log-probs that differ from pi_old show up in the gap (and do not enter the ratio).
    batch = batch_for(state.params, ref_params, jax.random.key(7))
    rollout = batch.rollout
    shifted = rollout._replace(logprobs_bl=rollout.logprobs_bl - 0.5 * rollout.completion_mask_bl)
    state, metrics = update_step(state, batch._replace(rollout=shifted), jax.random.key(8))
    assert float(metrics["policy/sampling_logprob_gap"]) == pytest.approx(0.5, abs=1e-5)
    assert float(metrics["clip_ratio/region"]) == 0.0
    assert len(traces) == traces_after_first

    no_gap = learner.make_update_step(
        cfg, group_size=G, prompt_width=P, logprob_fn=toy_logprob_fn, actor_cfg=ActorConfig(temperature=0.7)
    )
    _, metrics = no_gap(init(cfg), batch_for(state.params, ref_params, jax.random.key(9)), jax.random.key(9))
    assert "policy/sampling_logprob_gap" not in metrics
    for key in ("loss/policy", "loss/value", "kl", "entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region",
                "grad_norm", "update_norm", "lr", "skipped_nonfinite", "kl_coef", "advantages/mean", "advantages/std"):  # fmt: skip
        assert key in metrics, key


def test_kl_term_pulls_toward_the_reference_when_advantages_are_zero():
    ref_params = zero_policy()
    start = random_policy(2)
    batch = batch_for(start, ref_params, jax.random.key(0), rewards_fn=lambda r: jnp.ones((B,), jnp.float32))

    def kl_to_ref(params):
        r = batch.rollout
        lp_bl, _ = toy_logprob_fn(params, r.tokens_bl, r.positions_bl(P), r.valid_mask_bl(P))
        mask_bt = batch.rollout.completion_mask_bl[:, P:]
        return float(masked_mean(kl_k3(lp_bl[:, P:], batch.ref_logprobs_bl[:, P:]), mask_bt))

    kl_before = kl_to_ref(start)
    results = {}
    for beta in (0.0, 1.0):
        cfg = dataclasses.replace(BASE, kl_coef=beta, lr=0.05)
        state, metrics = make(cfg)(init(cfg, start), batch, jax.random.key(1))
        assert float(metrics["advantages/std"]) == 0.0
        results[beta] = state.params
    np.testing.assert_array_equal(np.asarray(results[0.0]["table"]), np.asarray(start["table"]))  # nothing else moves it
    assert kl_to_ref(results[1.0]) < kl_before - 0.01


@pytest.mark.parametrize("far_from_ref", [False, True])
def test_adaptive_kl_controller_moves_beta_toward_the_target(far_from_ref):
    cfg = dataclasses.replace(BASE, adaptive_kl=True, kl_coef=0.1, kl_target=0.1, kl_horizon=160)
    ref_params = zero_policy()
    params = random_policy(3, scale=3.0) if far_from_ref else ref_params
    state, metrics = make(cfg)(init(cfg, params), batch_for(params, ref_params, jax.random.key(0)), jax.random.key(1))
    kl = float(metrics["kl"])
    assert float(metrics["kl_coef"]) == pytest.approx(0.1)
    # KL far above (below) the target saturates the controller's clip at +20% (-20%) times B / horizon.
    factor = 1.0 + (0.2 if far_from_ref else -0.2) * B / cfg.kl_horizon
    assert (kl > 0.5) if far_from_ref else (kl < 1e-6)
    assert float(state.kl.kl_coef) == pytest.approx(0.1 * factor, rel=1e-5)

    fixed = dataclasses.replace(cfg, adaptive_kl=False)
    state, _ = make(fixed)(init(fixed, params), batch_for(params, ref_params, jax.random.key(0)), jax.random.key(1))
    assert float(state.kl.kl_coef) == pytest.approx(0.1)


def test_grad_accum_applies_the_update_every_k_steps():
    cfg = dataclasses.replace(BASE, grad_accum=2)
    update_step = make(cfg)
    ref_params = zero_policy()
    state = init(cfg)
    tables, update_norms = [np.array(state.params["table"])], []
    for i in range(4):
        state, metrics = update_step(state, batch_for(state.params, ref_params, jax.random.key(i)), jax.random.key(i))
        tables.append(np.array(state.params["table"]))
        update_norms.append(float(metrics["update_norm"]))
    changed = [not np.array_equal(a, b) for a, b in zip(tables, tables[1:])]
    assert changed == [False, True, False, True]
    assert update_norms[0] == 0.0 and update_norms[2] == 0.0 and update_norms[1] > 0.0


def test_epochs_and_minibatches_change_the_update_and_must_divide_the_batch():
    ref_params = zero_policy()
    start = random_policy(4, scale=0.5)
    batch = batch_for(start, ref_params, jax.random.key(0))
    tables = {}
    for e, m, seed in ((1, 1, 1), (2, 2, 1), (2, 2, 2)):
        cfg = dataclasses.replace(BASE, epochs=e, minibatches=m, lr=0.01)
        state, metrics = make(cfg)(init(cfg, start), batch, jax.random.key(seed))
        assert_finite(metrics)
        tables[e, m, seed] = np.asarray(state.params["table"])
    assert not np.allclose(tables[1, 1, 1], tables[2, 2, 1])
    assert not np.allclose(tables[2, 2, 1], tables[2, 2, 2])  # the rng shuffles rows into minibatches
    # 4 Adam updates of ~lr each move further than 1.
    assert np.abs(tables[2, 2, 1] - start["table"]).max() > np.abs(tables[1, 1, 1] - start["table"]).max()

    bad = dataclasses.replace(BASE, minibatches=3)
    with pytest.raises(ConfigError, match="learner.minibatches"):
        make(bad)(init(bad, start), batch, jax.random.key(1))


def test_schedules_and_config_errors():
    warm = learner.make_schedule(dataclasses.replace(BASE, lr=1.0, warmup_steps=3))
    assert [float(warm(i)) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    cos = learner.make_schedule(dataclasses.replace(BASE, lr=1.0, schedule="cosine", warmup_steps=2), total_steps=12)
    assert float(cos(2)) == pytest.approx(1.0) and float(cos(7)) == pytest.approx(0.5) and float(cos(12)) == pytest.approx(0.0)
    assert learner.num_optimizer_updates(dataclasses.replace(BASE, epochs=2, minibatches=4, grad_accum=2), 10) == 40
    with pytest.raises(ConfigError, match="learner.schedule"):
        learner.make_optimizer(dataclasses.replace(BASE, schedule="cosine"))
    with pytest.raises(ConfigError, match="value"):
        learner.make_update_step(
            dataclasses.replace(BASE, algorithm="ppo"), group_size=G, prompt_width=P, logprob_fn=toy_logprob_fn
        )


# ----------------------------------------------------------------------------------------------
# The real policy LM.
# ----------------------------------------------------------------------------------------------


def test_update_step_with_the_tiny_transformer():
    from selfplay.models import transformer

    mcfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=16)
    graphdef, params = transformer.split(transformer.create_model(mcfg, 0))
    logprob_fn = functools.partial(transformer.token_logprobs, graphdef)
    cfg = dataclasses.replace(BASE, lr=1e-2, epochs=2, minibatches=2)
    update_step = learner.make_update_step(
        cfg, group_size=G, prompt_width=P, logprob_fn=logprob_fn, actor_cfg=ActorConfig(temperature=1.0)
    )
    k_tok, k_rew = jax.random.split(jax.random.key(0))
    prompt_bp = jnp.broadcast_to(jnp.array([PAD, 5, 6], jnp.int32), (B, P))
    tokens_bl = jnp.concatenate([prompt_bp, jax.random.randint(k_tok, (B, T), 1, 32, jnp.int32)], axis=1)
    mask_bl = jnp.concatenate([jnp.zeros((B, P)), jnp.ones((B, T))], axis=1)
    rollout = Rollout(tokens_bl, jnp.full((B,), P - 1, jnp.int32), mask_bl, jnp.zeros((B, L)), jnp.zeros((B,), bool))
    lp_bl, _ = logprob_fn(params, tokens_bl, rollout.positions_bl(P), rollout.valid_mask_bl(P))
    rollout = rollout._replace(logprobs_bl=lp_bl * mask_bl)
    rewards_b = jax.random.uniform(k_rew, (B,))
    batch = learner.Batch(rollout, rewards_b, learner.make_reference_logprobs(logprob_fn, prompt_width=P)(params, rollout))

    state = learner.init_train_state(cfg, params)
    for i in range(3):
        state, metrics = update_step(state, batch, jax.random.key(i))
        assert_finite(metrics)
    assert float(metrics["policy/sampling_logprob_gap"]) > 0.0  # pi_old has moved since "sampling"
    # The caller's params (the reference) survive the donated steps; the policy moved toward the better rows.
    inputs = (tokens_bl, rollout.positions_bl(P), rollout.valid_mask_bl(P))
    np.testing.assert_allclose(logprob_fn(params, *inputs)[0], batch.ref_logprobs_bl, atol=1e-5)
    new_lp_bl, _ = logprob_fn(state.params, *inputs)
    adv_b = rewards_b - rewards_b.reshape(N_PROMPTS, G).mean(axis=1).repeat(G)
    gain_b = (new_lp_bl - batch.ref_logprobs_bl).sum(axis=1)
    assert float(jnp.sum(adv_b * gain_b)) > 0.0


def test_pretraining_data_term_fits_the_human_examples_and_is_its_own_loss():
    """ptx_coef > 0: with zero advantages and no KL the human examples' NLL is the only force; loss/ptx is the
    mean token NLL of exactly those rows (computed here independently), and it falls."""
    human_bl = jnp.array([[1, 2, TARGET, 4, EOS, PAD, PAD], [1, 2, 5, TARGET, 6, TARGET, EOS]], jnp.int32)
    valid_bl = (jnp.arange(L)[None, :] < jnp.array([[5], [7]])).astype(jnp.float32)
    loss_mask_bl = valid_bl * (jnp.arange(L)[None, :] >= 2)  # the "prompt" (1, 2) is context only
    ptx = PtxRows(human_bl, jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (2, L)), valid_bl, loss_mask_bl)

    def nll(params):
        lp_bl, _ = toy_logprob_fn(params, ptx.tokens_bl, ptx.positions_bl, ptx.valid_bl)
        return float(-(lp_bl * loss_mask_bl).sum() / loss_mask_bl.sum())

    start = random_policy(3)
    flat = batch_for(start, start, jax.random.key(0), rewards_fn=lambda r: jnp.ones((B,), jnp.float32))
    cfg = dataclasses.replace(BASE, kl_coef=0.0, lr=0.05, ptx_coef=1.0, ptx_batch=2, minibatches=2)
    step = make(cfg)
    state = init(cfg, start)
    before = nll(start)
    state, metrics = step(state, flat._replace(ptx=ptx), jax.random.key(1))
    assert float(metrics["loss/ptx"]) > 0.0  # each of the two minibatch updates fits one of the two rows
    for i in range(2, 6):
        state, metrics = step(state, flat._replace(ptx=ptx), jax.random.key(i))
    assert nll(state.params) < before - 0.1

    one_block = dataclasses.replace(cfg, minibatches=1)
    _, m1 = make(one_block)(init(one_block, start), flat._replace(ptx=ptx), jax.random.key(1))
    np.testing.assert_allclose(float(m1["loss/ptx"]), before, rtol=1e-5)

    with pytest.raises(ConfigError, match="exactly when ptx_coef > 0"):
        make(BASE)(init(BASE), flat._replace(ptx=ptx), jax.random.key(0))
    with pytest.raises(ConfigError, match="exactly when ptx_coef > 0"):
        make(cfg)(init(cfg, start), flat, jax.random.key(0))
    with pytest.raises(ConfigError, match="learner.ptx_batch"):
        learner.make_optimizer(dataclasses.replace(cfg, ptx_batch=3))


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_one_pass_equals_the_separate_pi_old_pass(algorithm):
    """One epoch x one minibatch: pi_old from the loss's own forward (the default there) gives the update and the
    metrics of the separate teacher-forced pass, without that pass; elsewhere one pass is refused."""
    cfg = dataclasses.replace(BASE, algorithm=algorithm, epochs=1, minibatches=1)
    ref_params = random_policy(3, scale=0.5)
    batch = batch_for(random_policy(4, scale=0.5), ref_params, jax.random.key(5))
    actor = ActorConfig(temperature=1.0)
    new_one, m_one = make(cfg, actor_cfg=actor)(init(cfg, random_policy(4, scale=0.5)), batch, jax.random.key(6))
    new_two, m_two = make(cfg, actor_cfg=actor, single_pass=False)(init(cfg, random_policy(4, scale=0.5)), batch, jax.random.key(6))
    np.testing.assert_allclose(new_one.params["table"], new_two.params["table"], rtol=1e-6, atol=1e-7)
    assert set(m_one) == set(m_two)
    for k in m_one:
        np.testing.assert_allclose(m_one[k], m_two[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match="single_pass needs"):
        make(dataclasses.replace(cfg, epochs=2), single_pass=True)

    # two micro-batches accumulated into the one optimiser update: pi_old is still the loss's own forward
    acc = dataclasses.replace(cfg, minibatches=2, grad_accum=2)
    assert algorithms.pi_old_from_loss(acc) and not algorithms.pi_old_from_loss(dataclasses.replace(acc, grad_accum=1))
    new_one, m_one = make(acc, actor_cfg=actor)(init(acc, random_policy(4, scale=0.5)), batch, jax.random.key(6))
    new_two, m_two = make(acc, actor_cfg=actor, single_pass=False)(init(acc, random_policy(4, scale=0.5)), batch, jax.random.key(6))
    np.testing.assert_allclose(new_one.params["table"], new_two.params["table"], rtol=1e-6, atol=1e-7)
    assert not np.allclose(new_one.params["table"], random_policy(4, scale=0.5)["table"]), "the update must apply"
    for k in m_one:
        np.testing.assert_allclose(m_one[k], m_two[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_token_credits_move_only_the_credited_tokens_direction(algorithm):
    """Per-token credits raise the log-prob of the tokens credited +1 and lower those credited -1, against the same
    update without them; with equal rewards and no KL, GRPO's update without credits moves nothing."""
    start = random_policy(3, scale=0.5)
    batch = batch_for(start, zero_policy(), jax.random.key(4), rewards_fn=lambda r: jnp.ones((B,), jnp.float32))
    r = batch.rollout
    hit_bl = (r.tokens_bl == TARGET) & (r.completion_mask_bl > 0)
    credits_bl = jnp.where(hit_bl, 1.0, jnp.where(r.completion_mask_bl > 0, -1.0, 0.0)).astype(jnp.float32)
    cfg = dataclasses.replace(BASE, algorithm=algorithm, kl_coef=0.0, lr=0.05, token_credit_coef=0.5)
    plain, _ = make(cfg)(init(cfg, start), batch, jax.random.key(5))
    credited, metrics = make(cfg)(init(cfg, start), batch._replace(token_credits_bl=credits_bl), jax.random.key(5))
    if algorithm == "grpo":
        np.testing.assert_array_equal(np.asarray(plain.params["table"]), np.asarray(start["table"]))
    assert float(metrics["advantages/std"]) > 0.0  # the credits alone make the advantages

    def logprobs(params):
        return np.asarray(toy_logprob_fn(params, r.tokens_bl, r.positions_bl(P), r.valid_mask_bl(P))[0])

    delta_bl = logprobs(credited.params) - logprobs(plain.params)
    credits = np.asarray(credits_bl)
    assert delta_bl[credits > 0].mean() > 0.0 > delta_bl[credits < 0].mean()
    assert expected_reward(credited.params) > expected_reward(plain.params)
    with pytest.raises(AssertionError, match="shape"):  # the credits must cover the whole [B, L] buffer
        make(cfg)(init(cfg, start), batch._replace(token_credits_bl=credits_bl[:, 1:]), jax.random.key(5))


def test_token_credits_are_centred_over_the_credited_tokens():
    credits_bt = jnp.array([[1.0, 0.0, -1.0, -1.0], [0.0, -1.0, 1.0, 5.0]])
    mask_bt = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # the 5.0 is padding: neither counted nor kept
    out = np.asarray(learner._centred_credits(credits_bt, mask_bt))
    credited = (np.asarray(credits_bt) != 0) & (np.asarray(mask_bt) > 0)
    np.testing.assert_allclose(out[credited], np.array([1.0, -1.0, -1.0, -1.0, 1.0]) + 0.2, rtol=1e-6)
    assert (out[~credited] == 0).all() and abs(out[credited].mean()) < 1e-6
