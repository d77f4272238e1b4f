"""selfplay.algorithms against straightforward NumPy loops, always called through jax.jit.

The fixture batch has left (prompt) padding, right padding, an all-masked row, and NaN at every masked
position of every per-token input, so any leak of a masked value shows up as a NaN or a wrong number.
"""

import dataclasses
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay import algorithms as alg
from selfplay.config import ConfigError, LearnerConfig

MASK = np.array(
    [
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],  # batch padding: no valid token at all
        [1, 1, 1, 1, 0, 0],
        [0, 1, 0, 0, 0, 0],
    ],
    np.float32,
)
B, T = MASK.shape
REWARDS = np.array([1.0, 0.0, 0.5, 0.25, 2.0, 2.0], np.float32)
_rng = np.random.default_rng(0)
LOGP = _rng.uniform(-3.0, -0.1, (B, T)).astype(np.float32)
OLD = (LOGP + _rng.normal(0.0, 0.3, (B, T))).astype(np.float32)
REF = (LOGP + _rng.normal(0.0, 0.5, (B, T))).astype(np.float32)
ADV = _rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
VALUES = _rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
OLD_VALUES = (VALUES + _rng.normal(0.0, 0.3, (B, T))).astype(np.float32)
RETURNS = _rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
ENTROPY = _rng.uniform(0.1, 2.0, (B, T)).astype(np.float32)


def garbage(x):
    """x with NaN at every masked position: the functions must never read them."""
    return np.where(MASK > 0, x, np.nan).astype(np.float32)


def valid_positions(b):
    return [t for t in range(T) if MASK[b, t] > 0]


def assert_finite(*xs):
    for x in jax.tree_util.tree_leaves(xs):
        assert np.all(np.isfinite(np.asarray(x))), x


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# NumPy references: plain loops, written independently of the module.
# ----------------------------------------------------------------------------------------------


def np_aggregate(x, mode, constant=None):
    total, count, seq_means = 0.0, 0, []
    for b in range(B):
        vals = [float(x[b, t]) for t in valid_positions(b)]
        total += sum(vals)
        count += len(vals)
        if vals:
            seq_means.append(sum(vals) / len(vals))
    if mode == "token_mean":
        return total / count
    if mode == "seq_mean":
        return sum(seq_means) / len(seq_means)
    return total / (B * (constant or T))


def np_surrogate_tokens(logp, old, adv, eps_lo, eps_hi):
    loss = np.zeros((B, T))
    low = np.zeros((B, T))
    high = np.zeros((B, T))
    for b in range(B):
        for t in valid_positions(b):
            rho = math.exp(float(logp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            clipped = min(max(rho, 1 - eps_lo), 1 + eps_hi)
            loss[b, t] = -min(rho * a, clipped * a)
            low[b, t] = rho < 1 - eps_lo and a < 0
            high[b, t] = rho > 1 + eps_hi and a > 0
    return loss, low, high


def np_k3(logp, ref):
    return math.exp(ref - logp) - (ref - logp) - 1.0


def np_groups_adv(rewards, g, std_normalize, eps, ddof=0):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), g):
        grp = [float(r) for r in rewards[start : start + g]]
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - ddof))
        for i, r in enumerate(grp):
            out[start + i] = (r - mean) / (std + eps) if std_normalize else r - mean
    return out


# ----------------------------------------------------------------------------------------------
# Advantage estimators
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [2, 3])
def test_grpo_and_dr_grpo_match_numpy(group_size):
    fn = jax.jit(alg.grpo_advantages, static_argnames=("group_size", "std_normalize"))
    grpo = fn(REWARDS, group_size=group_size, std_normalize=True, eps=1e-6)
    dr = fn(REWARDS, group_size=group_size, std_normalize=False, eps=1e-6)
    close(grpo, np_groups_adv(REWARDS, group_size, True, 1e-6), 1e-4)
    close(dr, np_groups_adv(REWARDS, group_size, False, 1e-6))
    assert not np.allclose(grpo, dr)  # Dr. GRPO keeps the reward scale GRPO divides away
    assert_finite(grpo, dr)


@pytest.mark.parametrize("group_size", [2, 3])
def test_grpo_sample_std_matches_numpy_and_trl(group_size):
    fn = jax.jit(alg.grpo_advantages, static_argnames=("group_size", "std_normalize", "std_ddof"))
    sample = fn(REWARDS, group_size=group_size, std_normalize=True, eps=1e-6, std_ddof=1)
    population = fn(REWARDS, group_size=group_size, std_normalize=True, eps=1e-6, std_ddof=0)
    close(sample, np_groups_adv(REWARDS, group_size, True, 1e-6, ddof=1), 1e-4)
    r_ng = np.asarray(REWARDS, np.float64).reshape(-1, group_size)  # TRL: torch.std (unbiased) per group
    trl = (r_ng - r_ng.mean(1, keepdims=True)) / (r_ng.std(1, ddof=1, keepdims=True) + 1e-6)
    close(sample, trl.reshape(-1), 1e-4)
    # the two conventions differ by sqrt((G - 1) / G) wherever the group is not constant
    close(np.asarray(sample), np.asarray(population) * math.sqrt((group_size - 1) / group_size), 1e-3)


def test_grpo_hand_computed_group_std_both_conventions():
    r = jnp.array([0.0, 1.0, 2.0, 3.0])  # mean 1.5; squared deviations sum to 5
    pop = alg.grpo_advantages(r, group_size=4, eps=0.0)
    smp = alg.grpo_advantages(r, group_size=4, eps=0.0, std_ddof=1)
    close(pop, np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 4))
    close(smp, np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 3))
    with pytest.raises(ValueError, match=r"sample std \(ddof=1\) needs at least 2 samples per prompt, got 1"):
        alg.grpo_advantages(r, group_size=1, std_ddof=1)
    close(alg.grpo_advantages(r, group_size=1, std_normalize=False, std_ddof=1), np.zeros(4))  # Dr. GRPO: no std


def test_grpo_constant_group_gives_zero_not_nan():
    adv = jax.jit(alg.grpo_advantages, static_argnames="group_size")(jnp.array([2.0, 2.0, 2.0, 1.0]), group_size=2)
    close(adv[:2], [0.0, 0.0])
    close(adv[2:], [1.0 / (1.0 + 1e-6), -1.0 / (1.0 + 1e-6)])


def test_rloo_matches_numpy():
    g = 3
    adv = jax.jit(alg.rloo_advantages, static_argnames="group_size")(REWARDS, group_size=g)
    ref = np.zeros(B)
    for i in range(B):
        start = i - i % g
        others = [float(REWARDS[j]) for j in range(start, start + g) if j != i]
        ref[i] = REWARDS[i] - sum(others) / len(others)
    close(adv, ref)


def test_group_size_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        alg.grpo_advantages(jnp.ones(6), group_size=4)
    with pytest.raises(ValueError, match="at least 2"):
        alg.rloo_advantages(jnp.ones(6), group_size=1)


def test_broadcast_and_last_token():
    out = jax.jit(alg.broadcast_to_tokens)(jnp.arange(B, dtype=jnp.float32), MASK)
    close(out, np.arange(B)[:, None] * MASK)
    last = jax.jit(alg.last_token_onehot)(MASK)
    ref = np.zeros((B, T))
    for b in range(B):
        if valid_positions(b):
            ref[b, valid_positions(b)[-1]] = 1.0
    close(last, ref)


def test_reinforce_pp_matches_numpy_and_is_whitened():
    beta, eps = 0.1, 1e-6
    kl = np.abs(REF - LOGP)
    out = jax.jit(alg.reinforce_pp_advantages)(REWARDS, garbage(kl), MASK, beta, eps)
    raw = {}
    for b in range(B):
        for t in valid_positions(b):
            raw[b, t] = float(REWARDS[b]) - beta * sum(float(kl[b, s]) for s in valid_positions(b) if s >= t)
    mean = sum(raw.values()) / len(raw)
    std = math.sqrt(sum((v - mean) ** 2 for v in raw.values()) / len(raw))
    ref = np.zeros((B, T))
    for (b, t), v in raw.items():
        ref[b, t] = (v - mean) / (std + eps)
    close(out, ref, 1e-4)
    valid = np.asarray(out)[MASK > 0]
    assert abs(valid.mean()) < 1e-5 and abs(valid.std() - 1.0) < 1e-4
    assert_finite(out)


def test_ppo_token_rewards_match_numpy():
    beta = 0.05
    out = jax.jit(alg.ppo_token_rewards)(REWARDS, garbage(LOGP), garbage(REF), MASK, beta)
    ref = np.zeros((B, T))
    for b in range(B):
        vp = valid_positions(b)
        for t in vp:
            ref[b, t] = -beta * (LOGP[b, t] - REF[b, t]) + (REWARDS[b] if t == vp[-1] else 0.0)
    close(out, ref)


def np_gae(rewards, values, gamma, lam):
    adv = np.zeros((B, T))
    for b in range(B):
        vp = valid_positions(b)
        running = 0.0
        for k in reversed(range(len(vp))):
            t = vp[k]
            next_v = values[b, vp[k + 1]] if k + 1 < len(vp) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, np.where(MASK > 0, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_numpy_backward_loop(gamma, lam):
    rewards = _rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
    adv, ret = jax.jit(alg.gae_advantages)(garbage(rewards), garbage(VALUES), MASK, gamma, lam)
    ref_adv, ref_ret = np_gae(rewards, VALUES, gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_ret)
    assert_finite(adv, ret)


def test_gae_skips_masked_holes():
    # A masked position inside a row is skipped, as if the row were compacted: it is not an episode end.
    gae = jax.jit(alg.gae_advantages)
    r = jnp.array([[0.5, -1.0, 9.0, 2.0, 9.0]])
    v = jnp.array([[0.3, 0.1, 9.0, -0.4, 9.0]])
    adv, _ = gae(r, v, jnp.array([[1.0, 1.0, 0.0, 1.0, 0.0]]), 0.9, 0.8)
    compact, _ = gae(r[:, [0, 1, 3]], v[:, [0, 1, 3]], jnp.ones((1, 3)), 0.9, 0.8)
    close(adv[:, [0, 1, 3]], compact)
    close(adv[:, [2, 4]], [[0.0, 0.0]])


# ----------------------------------------------------------------------------------------------
# KL estimators and controller
# ----------------------------------------------------------------------------------------------


def test_kl_estimators_match_numpy_and_k3_is_nonnegative():
    logp = np.linspace(-6.0, -0.01, 40, dtype=np.float32)
    ref = logp[::-1].copy()
    close(jax.jit(alg.kl_k1)(logp, ref), logp - ref)
    close(jax.jit(alg.kl_k2)(logp, ref), 0.5 * (logp - ref) ** 2)
    k3 = np.asarray(jax.jit(alg.kl_k3)(logp, ref))
    close(k3, [np_k3(float(a), float(r)) for a, r in zip(logp, ref)], 1e-4)
    assert (k3 >= 0).all()
    close(alg.kl_k3(jnp.float32(-1.3), jnp.float32(-1.3)), 0.0)
    assert alg.KL_ESTIMATORS == {"k1": alg.kl_k1, "k2": alg.kl_k2, "k3": alg.kl_k3}


def test_adaptive_kl_controller():
    cfg = LearnerConfig(adaptive_kl=True, kl_coef=0.1, kl_target=0.5, kl_horizon=100)
    update = jax.jit(alg.update_kl_controller, static_argnames="cfg")
    state = alg.init_kl_controller(cfg)
    assert len(jax.tree_util.tree_leaves(state)) == 1  # a pytree: checkpointed with the train state
    n = 10
    up = update(cfg, state, jnp.float32(0.55), n)
    close(up.kl_coef, 0.1 * (1 + 0.1 * n / 100))
    down = update(cfg, state, jnp.float32(0.45), n)
    close(down.kl_coef, 0.1 * (1 - 0.1 * n / 100))
    assert down.kl_coef < 0.1 < up.kl_coef
    close(update(cfg, state, jnp.float32(50.0), n).kl_coef, 0.1 * (1 + 0.2 * n / 100))  # clipped at +0.2
    close(update(cfg, state, jnp.float32(0.0), n).kl_coef, 0.1 * (1 - 0.2 * n / 100))  # clipped at -0.2
    fixed = dataclasses.replace(cfg, adaptive_kl=False)
    close(update(fixed, state, jnp.float32(50.0), n).kl_coef, 0.1)


# ----------------------------------------------------------------------------------------------
# Aggregation and losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,constant", [("seq_mean", None), ("token_mean", None), ("constant", None), ("constant", 128.0)])
def test_aggregate_matches_numpy(mode, constant):
    x = _rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
    agg = jax.jit(alg.aggregate, static_argnames=("mode", "constant"))
    close(agg(garbage(x), MASK, mode=mode, constant=constant), np_aggregate(x, mode, constant))
    # Per-token weights: seq_mean weighs a token by 1/(rows * its row's length), token_mean by 1/tokens,
    # constant by 1/(B * constant) whatever the length (Dr. GRPO's unbiased normaliser).
    grad = np.asarray(jax.grad(lambda x: alg.aggregate(x, MASK, mode, constant))(jnp.asarray(x)))
    lens = MASK.sum(1)
    expected = {
        "seq_mean": MASK / np.maximum(lens, 1)[:, None] / (lens > 0).sum(),
        "token_mean": MASK / MASK.sum(),
        "constant": MASK / (B * (constant or T)),
    }[mode]
    close(grad, expected)


def test_aggregate_all_masked_batch_and_unknown_mode():
    zeros = jnp.zeros((2, 3))
    for mode in alg.AGG_MODES:
        close(jax.jit(alg.aggregate, static_argnames="mode")(jnp.full((2, 3), jnp.nan), zeros, mode=mode), 0.0)
    with pytest.raises(ConfigError, match="learner.loss_agg"):
        alg.aggregate(zeros, zeros, "sum")


@pytest.mark.parametrize("mode", ["seq_mean", "token_mean", "constant"])
def test_clipped_surrogate_matches_numpy(mode):
    eps_lo, eps_hi = 0.2, 0.28
    fn = jax.jit(alg.clipped_surrogate, static_argnames=("clip_eps_low", "clip_eps_high", "loss_agg"))
    loss, metrics = fn(garbage(LOGP), garbage(OLD), garbage(ADV), MASK, clip_eps_low=eps_lo, clip_eps_high=eps_hi, loss_agg=mode)
    per_tok, low, high = np_surrogate_tokens(LOGP, OLD, ADV, eps_lo, eps_hi)
    close(loss, np_aggregate(per_tok, mode))
    n_valid = MASK.sum()
    close(metrics["clip_ratio/low"], low.sum() / n_valid)
    close(metrics["clip_ratio/high"], high.sum() / n_valid)
    close(metrics["clip_ratio/region"], (low + high).sum() / n_valid)
    assert low.sum() > 0 and high.sum() > 0  # the fixture exercises both sides
    approx = sum(np_k3(float(OLD[b, t]), float(LOGP[b, t])) for b in range(B) for t in valid_positions(b)) / n_valid
    close(metrics["policy/approx_kl"], approx)
    assert_finite(loss, metrics)


def test_clipped_branch_has_exactly_zero_gradient():
    eps_lo, eps_hi = 0.2, 0.28
    # (rho, A, gradient expected?) per token; 1.25 is inside the high clip only because eps_hi > eps_lo,
    # and 0.78 is outside the low clip.
    cases = [
        (1.5, 1.0, False),  # rho > 1+eps_hi, A > 0: clipped
        (0.5, -1.0, False),  # rho < 1-eps_lo, A < 0: clipped
        (0.78, -0.5, False),
        (1.25, 1.0, True),
        (0.5, 1.0, True),  # clipping never stops a push back up
        (1.5, -1.0, True),  # nor a push back down
        (1.1, -1.0, True),
        (0.9, 2.0, True),
    ]
    rho = np.array([[c[0] for c in cases]], np.float32)
    adv = np.array([[c[1] for c in cases]], np.float32)
    old = np.full_like(rho, -1.0)
    logp = old + np.log(rho)
    mask = np.ones_like(rho)
    mask_padded = np.concatenate([mask, [[0.0]]], axis=1)
    pad = lambda x: np.concatenate([x, [[np.nan]]], axis=1)  # noqa: E731

    def loss(lp):
        return alg.clipped_surrogate(lp, pad(old), pad(adv), mask_padded, eps_lo, eps_hi, "token_mean")[0]

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(pad(logp))))[0]
    assert grad[-1] == 0.0  # the masked position
    for g, (r, a, expect) in zip(grad[:-1], cases):
        if expect:
            close(g, -r * a / len(cases))  # d(-rho A)/dlogp = -rho A, over the token count
        else:
            assert g == 0.0, (r, a, g)


def test_value_loss_matches_numpy():
    clip = 0.2
    fn = jax.jit(alg.value_loss, static_argnames=("clip_eps", "loss_agg"))
    loss, metrics = fn(garbage(VALUES), garbage(OLD_VALUES), garbage(RETURNS), MASK, clip_eps=clip, loss_agg="seq_mean")
    per_tok = np.zeros((B, T))
    clipped = 0
    for b in range(B):
        for t in valid_positions(b):
            v, vo, r = float(VALUES[b, t]), float(OLD_VALUES[b, t]), float(RETURNS[b, t])
            vc = vo + min(max(v - vo, -clip), clip)
            per_tok[b, t] = 0.5 * max((v - r) ** 2, (vc - r) ** 2)
            clipped += (vc - r) ** 2 > (v - r) ** 2
    close(loss, np_aggregate(per_tok, "seq_mean"))
    close(metrics["loss/value"], loss)
    close(metrics["value/clip_frac"], clipped / MASK.sum())
    assert 0 < clipped < MASK.sum()


def _objective(cfg, **kw):
    fn = jax.jit(alg.policy_objective, static_argnames="cfg")
    return fn(cfg, garbage(LOGP), garbage(OLD), garbage(ADV), MASK, **kw)


def test_policy_objective_combines_terms():
    cfg = LearnerConfig(algorithm="grpo", kl_coef=0.04, kl_estimator="k3", entropy_coef=0.01, loss_agg="token_mean")
    loss, metrics = _objective(cfg, ref_logprobs_bt=garbage(REF), entropy_bt=garbage(ENTROPY))
    per_tok, _, _ = np_surrogate_tokens(LOGP, OLD, ADV, cfg.clip_eps_low, cfg.clip_eps_high)
    k3 = np.zeros((B, T))
    for b in range(B):
        for t in valid_positions(b):
            k3[b, t] = np_k3(float(LOGP[b, t]), float(REF[b, t]))
    pg = np_aggregate(per_tok, "token_mean")
    close(metrics["loss/policy"], pg)
    close(metrics["kl"], np_aggregate(k3, "token_mean"))
    close(metrics["entropy"], np_aggregate(ENTROPY, "token_mean"))
    close(loss, pg + 0.04 * np_aggregate(k3, "token_mean") - 0.01 * np_aggregate(ENTROPY, "token_mean"))
    assert {"loss/policy", "kl", "entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region"} <= set(metrics)
    # The current beta from the controller replaces cfg.kl_coef.
    loss2, _ = _objective(cfg, ref_logprobs_bt=garbage(REF), entropy_bt=garbage(ENTROPY), kl_coef=jnp.float32(0.5))
    close(loss2, pg + 0.5 * np_aggregate(k3, "token_mean") - 0.01 * np_aggregate(ENTROPY, "token_mean"))
    grads = jax.grad(lambda lp: alg.policy_objective(cfg, lp, garbage(OLD), garbage(ADV), MASK, ref_logprobs_bt=garbage(REF))[0])(
        jnp.asarray(garbage(LOGP))
    )
    assert_finite(loss, metrics, grads)
    assert np.all(np.asarray(grads)[MASK == 0] == 0.0)


@pytest.mark.parametrize("cfg", [LearnerConfig(algorithm="ppo"), LearnerConfig(algorithm="grpo", kl_in_reward=True)])
def test_policy_objective_leaves_kl_out_when_it_is_in_the_reward(cfg):
    loss, metrics = _objective(cfg, ref_logprobs_bt=garbage(REF))
    close(loss, metrics["loss/policy"])
    assert metrics["kl"] > 0


def test_dr_grpo_differs_from_grpo():
    grpo = LearnerConfig(algorithm="grpo")
    dr = LearnerConfig(algorithm="grpo", std_normalize=False, loss_agg="constant", loss_agg_constant=8.0)
    inputs = alg.AdvantageInputs(jnp.asarray(REWARDS), jnp.asarray(MASK))
    advantages = jax.jit(alg.compute_advantages, static_argnames=("cfg", "group_size"))
    objective = jax.jit(alg.policy_objective, static_argnames="cfg")
    advs, losses = {}, {}
    for name, cfg in (("grpo", grpo), ("dr", dr)):
        advs[name] = adv = advantages(cfg, inputs, group_size=3).advantages_bt
        per_tok, _, _ = np_surrogate_tokens(LOGP, OLD, np.asarray(adv), cfg.clip_eps_low, cfg.clip_eps_high)
        losses[name], _ = objective(dataclasses.replace(cfg, kl_coef=0.0), garbage(LOGP), garbage(OLD), adv, MASK)
        close(losses[name], np_aggregate(per_tok, cfg.loss_agg, cfg.loss_agg_constant))
    close(advs["grpo"], np_groups_adv(REWARDS, 3, True, 1e-6)[:, None] * MASK, 1e-4)
    close(advs["dr"], np_groups_adv(REWARDS, 3, False, 0.0)[:, None] * MASK)
    assert not np.isclose(losses["grpo"], losses["dr"])


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_registries_cover_the_config_names():
    hints = typing.get_type_hints(LearnerConfig)
    assert set(alg.ADVANTAGE_ESTIMATORS) == set(typing.get_args(hints["algorithm"]))
    assert set(alg.KL_ESTIMATORS) == set(typing.get_args(hints["kl_estimator"]))
    assert set(alg.AGG_MODES) == set(typing.get_args(hints["loss_agg"]))


def test_compute_advantages_dispatches():
    g, beta = 3, 0.2
    fn = jax.jit(alg.compute_advantages, static_argnames=("cfg", "group_size"))
    inputs = alg.AdvantageInputs(
        jnp.asarray(REWARDS), jnp.asarray(MASK), jnp.asarray(garbage(OLD)), jnp.asarray(garbage(REF)), jnp.asarray(garbage(VALUES))
    )
    k1 = np.where(MASK > 0, OLD - REF, 0.0)
    k3 = np.asarray(alg.kl_k3(jnp.where(MASK > 0, OLD, 0), jnp.where(MASK > 0, REF, 0))) * MASK

    out = fn(LearnerConfig(algorithm="grpo"), inputs, group_size=g, kl_coef=beta)
    close(out.advantages_bt, np_groups_adv(REWARDS, g, True, 1e-6)[:, None] * MASK, 1e-4)
    assert out.returns_bt is None

    out = fn(LearnerConfig(algorithm="grpo", kl_in_reward=True, kl_estimator="k1"), inputs, group_size=g, kl_coef=beta)
    close(out.advantages_bt, np_groups_adv(REWARDS - beta * k1.sum(1), g, True, 1e-6)[:, None] * MASK, 1e-4)

    out = fn(LearnerConfig(algorithm="rloo"), inputs, group_size=g)
    close(out.advantages_bt, alg.rloo_advantages(jnp.asarray(REWARDS), g)[:, None] * MASK)

    out = fn(LearnerConfig(algorithm="reinforce_pp", kl_estimator="k3"), inputs, group_size=g, kl_coef=beta)
    close(out.advantages_bt, alg.reinforce_pp_advantages(jnp.asarray(REWARDS), jnp.asarray(k3), MASK, beta), 1e-4)

    cfg = LearnerConfig(algorithm="ppo", gamma=0.99, lam=0.9)
    out = fn(cfg, inputs, group_size=g, kl_coef=beta)
    tok_rewards = np.zeros((B, T))
    for b in range(B):
        vp = valid_positions(b)
        for t in vp:
            tok_rewards[b, t] = -beta * k1[b, t] + (REWARDS[b] if t == vp[-1] else 0.0)
    ref_adv, ref_ret = np_gae(tok_rewards, VALUES, 0.99, 0.9)
    close(out.advantages_bt, ref_adv)
    close(out.returns_bt, ref_ret)
    assert_finite(out)


def test_unknown_names_raise_clear_errors():
    inputs = alg.AdvantageInputs(jnp.asarray(REWARDS), jnp.asarray(MASK))
    with pytest.raises(ConfigError, match=r"learner\.algorithm 'a2c'.*grpo"):
        alg.compute_advantages(dataclasses.replace(LearnerConfig(), algorithm="a2c"), inputs, group_size=3)
    with pytest.raises(ConfigError, match=r"learner\.kl_estimator 'k9'"):
        alg.kl_estimator("k9")
    with pytest.raises(ValueError, match="ref_logprobs_bt"):
        alg.compute_advantages(LearnerConfig(algorithm="reinforce_pp"), inputs, group_size=3)
