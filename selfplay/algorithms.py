"""Pure JAX maths of the policy-gradient learner: advantage estimators (grpo, rloo, reinforce++, ppo/gae),
KL estimators, the clipped policy loss, the value loss, loss aggregation and the adaptive KL controller.
Over 400 lines because each estimator keeps its formula and its shape contract next to it, one small function each.

Shapes: b batch rows (G consecutive rows per prompt: row = prompt_index * G + g), t token positions.
`mask_bt` is a float 0/1 mask that is 1 on completion tokens only; masked positions contribute nothing to
any result and never produce NaN, even when a whole row is masked. Every function jits with static
config (names, group size, aggregation mode) and traced arrays.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from selfplay.config import ConfigError, LearnerConfig

AGG_MODES = ("seq_mean", "token_mean", "constant")

# ----------------------------------------------------------------------------------------------
# Mask helpers
# ----------------------------------------------------------------------------------------------


def _valid(mask_bt: jax.Array) -> jax.Array:
    return mask_bt > 0


def _zero_masked(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    # `where`, not multiplication: inf * 0 is NaN, and padded log-probs are not guaranteed finite.
    return jnp.where(_valid(mask_bt), x_bt, jnp.zeros_like(x_bt))


def broadcast_to_tokens(adv_b: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """A per-sequence value `[B]` copied onto each row's completion tokens `[B, T]` (0 elsewhere)."""
    chex.assert_rank(adv_b, 1)
    chex.assert_equal_shape_prefix((adv_b, mask_bt), 1)
    return _zero_masked(jnp.broadcast_to(adv_b[:, None], mask_bt.shape).astype(jnp.float32), mask_bt)


def last_token_onehot(mask_bt: jax.Array) -> jax.Array:
    """1.0 at each row's last valid position, 0 elsewhere (an all-masked row is all 0). `[B, T]`."""
    valid_bt = _valid(mask_bt)
    t = mask_bt.shape[1]
    last_b = t - 1 - jnp.argmax(valid_bt[:, ::-1], axis=1)
    onehot_bt = jnp.arange(t)[None, :] == last_b[:, None]
    return (onehot_bt & valid_bt.any(axis=1, keepdims=True)).astype(jnp.float32)


def masked_mean(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Mean over the valid tokens of the whole batch (0 when there are none)."""
    return _zero_masked(x_bt, mask_bt).sum() / jnp.maximum(_valid(mask_bt).sum(), 1)


def _masked_whiten(x_bt: jax.Array, mask_bt: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / (std + eps) over the valid tokens of the batch, population std (ddof=0)."""
    mean = masked_mean(x_bt, mask_bt)
    var = masked_mean(jnp.square(x_bt - mean), mask_bt)
    return _zero_masked((x_bt - mean) / (jnp.sqrt(var) + eps), mask_bt)


# ----------------------------------------------------------------------------------------------
# Loss aggregation: the one place that turns per-token terms into a scalar.
# ----------------------------------------------------------------------------------------------


def aggregate(x_bt: jax.Array, mask_bt: jax.Array, mode: str, constant: float | None = None) -> jax.Array:
    """Reduce per-token terms `[B, T]` to a scalar over the valid tokens.

    seq_mean    mean over each row's valid tokens, then mean over the rows that have any (GRPO);
                an all-masked row is batch padding, not a sequence, and does not dilute the mean
    token_mean  sum over all valid tokens / number of valid tokens in the batch (DAPO)
    constant    sum over all valid tokens / (B * constant), constant defaulting to T (Dr. GRPO)
    """
    chex.assert_equal_shape((x_bt, mask_bt))
    valid_bt = _valid(mask_bt)
    x_bt = _zero_masked(x_bt, mask_bt)
    if mode == "seq_mean":
        n_b = valid_bt.sum(axis=1)
        seq_b = x_bt.sum(axis=1) / jnp.maximum(n_b, 1)
        return seq_b.sum() / jnp.maximum((n_b > 0).sum(), 1)
    if mode == "token_mean":
        return x_bt.sum() / jnp.maximum(valid_bt.sum(), 1)
    if mode == "constant":
        norm = float(constant) if constant else float(x_bt.shape[1])
        return x_bt.sum() / (x_bt.shape[0] * norm)
    raise ConfigError(f"learner.loss_agg must be one of {', '.join(AGG_MODES)}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# KL estimators of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3), per token.
# ----------------------------------------------------------------------------------------------


def kl_k1(logprobs_bt: jax.Array, ref_logprobs_bt: jax.Array) -> jax.Array:
    """log pi - log pi_ref: unbiased, high variance, can be negative."""
    return logprobs_bt - ref_logprobs_bt


def kl_k2(logprobs_bt: jax.Array, ref_logprobs_bt: jax.Array) -> jax.Array:
    """0.5 (log pi - log pi_ref)^2: biased, low variance, >= 0."""
    return 0.5 * jnp.square(logprobs_bt - ref_logprobs_bt)


def kl_k3(logprobs_bt: jax.Array, ref_logprobs_bt: jax.Array) -> jax.Array:
    """pi_ref/pi - log(pi_ref/pi) - 1: unbiased, low variance, >= 0 (GRPO's KL term)."""
    log_ratio = ref_logprobs_bt - logprobs_bt
    return jnp.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def _lookup(registry: dict, name: str, key: str):
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(f"unknown {key} {name!r}; choose one of {', '.join(registry)}") from None


def kl_estimator(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The estimator named by `learner.kl_estimator`."""
    return _lookup(KL_ESTIMATORS, name, "learner.kl_estimator")


# ----------------------------------------------------------------------------------------------
# Advantage estimators
# ----------------------------------------------------------------------------------------------


def _groups(rewards_b: jax.Array, group_size: int) -> jax.Array:
    chex.assert_rank(rewards_b, 1)
    b = rewards_b.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"batch of {b} rows is not a whole number of groups of {group_size}")
    return rewards_b.astype(jnp.float32).reshape(b // group_size, group_size)


def grpo_advantages(
    rewards_b: jax.Array, group_size: int, std_normalize: bool = True, eps: float = 1e-6, std_ddof: int = 0
) -> jax.Array:
    """GRPO: (r_i - mean_group r) / (std_group r + eps). `[B]`. The group std divides by G - std_ddof: population
    std (ddof=0, ours by default) or sample std (ddof=1, as TRL and Tunix compute it; needs G >= 2).

    std_normalize=False is Dr. GRPO: r_i - mean_group r.
    """
    if std_normalize and std_ddof >= group_size:
        raise ValueError(f"a sample std (ddof={std_ddof}) needs at least {std_ddof + 1} samples per prompt, got {group_size}")
    r_ng = _groups(rewards_b, group_size)
    adv_ng = r_ng - r_ng.mean(axis=1, keepdims=True)
    if std_normalize:
        adv_ng = adv_ng / (r_ng.std(axis=1, keepdims=True, ddof=std_ddof) + eps)
    return adv_ng.reshape(-1)


def rloo_advantages(rewards_b: jax.Array, group_size: int) -> jax.Array:
    """RLOO: r_i - mean_{j != i} r_j within each group. `[B]`; needs group_size >= 2."""
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt (actor.samples_per_prompt), got {group_size}")
    r_ng = _groups(rewards_b, group_size)
    others_ng = (r_ng.sum(axis=1, keepdims=True) - r_ng) / (group_size - 1)
    return (r_ng - others_ng).reshape(-1)


def expert_iteration_keep(rewards_b: jax.Array, group_size: int, keep: int) -> jax.Array:
    """Expert iteration's filter (ReST, RAFT, rejection-sampling fine-tuning): 1.0 on the `keep` rows of each group
    with the highest reward, 0.0 elsewhere; ties go to the row sampled first. A group whose rewards are all equal keeps
    nothing: it tells no essay from another. `[B]`."""
    if not 1 <= keep < group_size:
        raise ValueError(f"expert iteration keeps 1 to G - 1 of each group of G = {group_size}, got {keep}")
    r_ng = _groups(rewards_b, group_size)
    order_ng = jnp.argsort(-r_ng, axis=1, stable=True)  # best first; equal rewards in sampling order
    rank_ng = jnp.argsort(order_ng, axis=1)
    decided_n1 = r_ng.max(axis=1, keepdims=True) > r_ng.min(axis=1, keepdims=True)
    return ((rank_ng < keep) & decided_n1).astype(jnp.float32).reshape(-1)


def _reverse_cumsum(x_bt: jax.Array) -> jax.Array:
    """out[:, t] = sum_{s >= t} x[:, s]."""
    return jnp.cumsum(x_bt[:, ::-1], axis=1)[:, ::-1]


def reinforce_pp_advantages(
    rewards_b: jax.Array, kl_bt: jax.Array, mask_bt: jax.Array, beta: float | jax.Array, eps: float = 1e-6
) -> jax.Array:
    """REINFORCE++: A_t = r - beta * sum_{s >= t} KL_s on completion tokens, whitened over the batch. `[B, T]`.

    This is the undiscounted return of per-token rewards -beta*KL_t plus r on the row's last valid token.
    Whitening uses the mean and population std over all valid tokens of the batch: (A - mean) / (std + eps).
    """
    chex.assert_equal_shape((kl_bt, mask_bt))
    kl_to_go_bt = _reverse_cumsum(_zero_masked(kl_bt, mask_bt))
    returns_bt = rewards_b.astype(jnp.float32)[:, None] - beta * kl_to_go_bt
    return _masked_whiten(returns_bt, mask_bt, eps)


def ppo_token_rewards(
    score_b: jax.Array,
    logprobs_bt: jax.Array,
    ref_logprobs_bt: jax.Array,
    mask_bt: jax.Array,
    beta: float | jax.Array,
) -> jax.Array:
    """PPO's per-token reward: -beta (log pi - log pi_ref), plus the critic's score on each row's last valid token."""
    chex.assert_equal_shape((logprobs_bt, ref_logprobs_bt, mask_bt))
    kl_bt = kl_k1(_zero_masked(logprobs_bt, mask_bt), _zero_masked(ref_logprobs_bt, mask_bt))
    return -beta * kl_bt + score_b.astype(jnp.float32)[:, None] * last_token_onehot(mask_bt)


def gae_advantages(
    token_rewards_bt: jax.Array,
    values_bt: jax.Array,
    mask_bt: jax.Array,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's valid tokens; returns (advantages_bt, returns_bt).

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, where t+1 is the next valid
    token; after a row's last valid token the bootstrap value and advantage are 0 (the essay has ended).
    Masked positions are skipped by the recursion and get 0; returns_t = A_t + V_t (the value target).
    """
    chex.assert_equal_shape((token_rewards_bt, values_bt, mask_bt))
    valid_tb = _valid(mask_bt).T
    rewards_tb = _zero_masked(token_rewards_bt, mask_bt).astype(jnp.float32).T
    values_tb = _zero_masked(values_bt, mask_bt).astype(jnp.float32).T

    def step(carry, x):
        next_value_b, next_adv_b = carry
        r_b, v_b, valid_b = x
        delta_b = r_b + gamma * next_value_b - v_b
        adv_b = delta_b + gamma * lam * next_adv_b
        carry = (jnp.where(valid_b, v_b, next_value_b), jnp.where(valid_b, adv_b, next_adv_b))
        return carry, jnp.where(valid_b, adv_b, 0.0)

    zeros_b = jnp.zeros(values_tb.shape[1], jnp.float32)
    _, adv_tb = jax.lax.scan(step, (zeros_b, zeros_b), (rewards_tb, values_tb, valid_tb), reverse=True)
    adv_bt = adv_tb.T
    return adv_bt, _zero_masked(adv_bt + values_tb.T, mask_bt)


# ----------------------------------------------------------------------------------------------
# Registry: `learner.algorithm` -> advantages, in this one place.
# ----------------------------------------------------------------------------------------------


class AdvantageInputs(NamedTuple):
    """What the estimators read. Log-probs are the sampling-time (old) policy's; values come from the value head.

    rewards_b        float32 [B]     the critic's score per row
    mask_bt          float32 [B, T]  1 on completion tokens
    logprobs_bt      float32 [B, T]  log pi_old(token); needed by every KL-in-reward estimator
    ref_logprobs_bt  float32 [B, T]  log pi_ref(token); same
    values_bt        float32 [B, T]  V(state before token t); ppo only
    """

    rewards_b: jax.Array
    mask_bt: jax.Array
    logprobs_bt: jax.Array | None = None
    ref_logprobs_bt: jax.Array | None = None
    values_bt: jax.Array | None = None


class Advantages(NamedTuple):
    """advantages_bt [B, T] (0 off completion tokens); returns_bt [B, T] value targets (ppo) or None."""

    advantages_bt: jax.Array
    returns_bt: jax.Array | None


def kl_is_loss_term(cfg: LearnerConfig) -> bool:
    """Whether beta*KL is added to the policy loss (else it is folded into the reward by the estimator)."""
    return cfg.algorithm in ("grpo", "rloo", "expert_iteration") and not cfg.kl_in_reward


def pi_old_from_loss(cfg: LearnerConfig) -> bool:
    """The params stay pi_old through every minibatch of the call (1 epoch x 1 minibatch, or epochs x minibatches
    micro-batches accumulated into one optimiser update by grad_accum) and the advantages do not read pi_old (grpo or
    rloo with KL as a loss term): the loss's own forward is pi_old, so the update needs no separate teacher-forced pass
    (as TRL does)."""
    if cfg.algorithm == "expert_iteration":  # its loss never reads pi_old: the NLL of the kept rows
        return True
    return cfg.epochs * cfg.minibatches in (1, cfg.grad_accum) and kl_is_loss_term(cfg)


def _reference_kl_bt(cfg: LearnerConfig, x: AdvantageInputs) -> jax.Array:
    if x.logprobs_bt is None or x.ref_logprobs_bt is None:
        raise ValueError(f"learner.algorithm={cfg.algorithm!r} folds KL into the reward: pass logprobs_bt and ref_logprobs_bt")
    kl_fn = kl_estimator(cfg.kl_estimator)
    return _zero_masked(kl_fn(_zero_masked(x.logprobs_bt, x.mask_bt), _zero_masked(x.ref_logprobs_bt, x.mask_bt)), x.mask_bt)


def _sequence_rewards(cfg: LearnerConfig, x: AdvantageInputs, kl_coef: jax.Array) -> jax.Array:
    if not cfg.kl_in_reward:
        return x.rewards_b
    return x.rewards_b - kl_coef * _reference_kl_bt(cfg, x).sum(axis=1)


def _grpo(cfg: LearnerConfig, x: AdvantageInputs, group_size: int, kl_coef: jax.Array) -> Advantages:
    adv_b = grpo_advantages(_sequence_rewards(cfg, x, kl_coef), group_size, cfg.std_normalize, cfg.adv_eps, cfg.std_ddof)
    return Advantages(broadcast_to_tokens(adv_b, x.mask_bt), None)


def _rloo(cfg: LearnerConfig, x: AdvantageInputs, group_size: int, kl_coef: jax.Array) -> Advantages:
    adv_b = rloo_advantages(_sequence_rewards(cfg, x, kl_coef), group_size)
    return Advantages(broadcast_to_tokens(adv_b, x.mask_bt), None)


def _expert_iteration(cfg: LearnerConfig, x: AdvantageInputs, group_size: int, kl_coef: jax.Array) -> Advantages:
    del kl_coef  # KL is a loss term
    keep_b = expert_iteration_keep(x.rewards_b, group_size, cfg.ei_keep)
    return Advantages(broadcast_to_tokens(keep_b, x.mask_bt), None)


def _reinforce_pp(cfg: LearnerConfig, x: AdvantageInputs, group_size: int, kl_coef: jax.Array) -> Advantages:
    del group_size  # REINFORCE++ uses no group baseline: it whitens over the whole batch.
    return Advantages(reinforce_pp_advantages(x.rewards_b, _reference_kl_bt(cfg, x), x.mask_bt, kl_coef, cfg.adv_eps), None)


def _ppo(cfg: LearnerConfig, x: AdvantageInputs, group_size: int, kl_coef: jax.Array) -> Advantages:
    del group_size
    if x.values_bt is None or x.logprobs_bt is None or x.ref_logprobs_bt is None:
        raise ValueError("learner.algorithm='ppo' needs values_bt, logprobs_bt and ref_logprobs_bt")
    rewards_bt = ppo_token_rewards(x.rewards_b, x.logprobs_bt, x.ref_logprobs_bt, x.mask_bt, kl_coef)
    return Advantages(*gae_advantages(rewards_bt, x.values_bt, x.mask_bt, cfg.gamma, cfg.lam))


ADVANTAGE_ESTIMATORS: dict[str, Callable[[LearnerConfig, AdvantageInputs, int, jax.Array], Advantages]] = {
    "grpo": _grpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
    "ppo": _ppo,
    "expert_iteration": _expert_iteration,
}


def compute_advantages(
    cfg: LearnerConfig, inputs: AdvantageInputs, *, group_size: int, kl_coef: float | jax.Array | None = None
) -> Advantages:
    """Advantages (and PPO's value targets) for `cfg.algorithm`, with no gradient flowing back into the inputs.

    group_size: G, the samples per prompt (`actor.samples_per_prompt`). kl_coef: the current beta (from the
    KL controller); None means `cfg.kl_coef`.
    """
    estimator = _lookup(ADVANTAGE_ESTIMATORS, cfg.algorithm, "learner.algorithm")
    beta = jnp.asarray(cfg.kl_coef if kl_coef is None else kl_coef, jnp.float32)
    return jax.lax.stop_gradient(estimator(cfg, inputs, group_size, beta))


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def clipped_surrogate(
    logprobs_bt: jax.Array,
    old_logprobs_bt: jax.Array,
    advantages_bt: jax.Array,
    mask_bt: jax.Array,
    clip_eps_low: float,
    clip_eps_high: float,
    loss_agg: str = "seq_mean",
    agg_constant: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate with DAPO's separate clip range: -min(rho A, clip(rho, 1-eps_lo, 1+eps_hi) A).

    rho = exp(log pi - log pi_old). Returns (loss, metrics); clip fractions are over the valid tokens, and
    `policy/approx_kl` is the k3 estimate of KL(pi_old || pi) from the old policy's samples.
    """
    chex.assert_equal_shape((logprobs_bt, old_logprobs_bt, advantages_bt, mask_bt))
    logp_bt = _zero_masked(logprobs_bt, mask_bt)
    old_bt = _zero_masked(old_logprobs_bt, mask_bt)
    adv_bt = _zero_masked(advantages_bt, mask_bt)
    ratio_bt = jnp.exp(logp_bt - old_bt)
    clipped_ratio_bt = jnp.clip(ratio_bt, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss_bt = -jnp.minimum(ratio_bt * adv_bt, clipped_ratio_bt * adv_bt)

    low_bt = (ratio_bt < 1.0 - clip_eps_low) & (adv_bt < 0)
    high_bt = (ratio_bt > 1.0 + clip_eps_high) & (adv_bt > 0)
    stop = jax.lax.stop_gradient
    metrics = {
        "clip_ratio/low": masked_mean(low_bt.astype(jnp.float32), mask_bt),
        "clip_ratio/high": masked_mean(high_bt.astype(jnp.float32), mask_bt),
        "clip_ratio/region": masked_mean((low_bt | high_bt).astype(jnp.float32), mask_bt),
        "policy/approx_kl": masked_mean(kl_k3(stop(old_bt), stop(logp_bt)), mask_bt),
    }
    return aggregate(loss_bt, mask_bt, loss_agg, agg_constant), metrics


def value_loss(
    values_bt: jax.Array,
    old_values_bt: jax.Array,
    returns_bt: jax.Array,
    mask_bt: jax.Array,
    clip_eps: float,
    loss_agg: str = "token_mean",
    agg_constant: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO2 clipped value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2), aggregated.

    Returns (loss, metrics) with `loss/value` and `value/clip_frac` (share of valid tokens where the
    clipped error is the larger one).
    """
    chex.assert_equal_shape((values_bt, old_values_bt, returns_bt, mask_bt))
    v_bt = _zero_masked(values_bt, mask_bt)
    old_bt = _zero_masked(old_values_bt, mask_bt)
    ret_bt = _zero_masked(returns_bt, mask_bt)
    v_clipped_bt = old_bt + jnp.clip(v_bt - old_bt, -clip_eps, clip_eps)
    err_bt = jnp.square(v_bt - ret_bt)
    err_clipped_bt = jnp.square(v_clipped_bt - ret_bt)
    loss = aggregate(0.5 * jnp.maximum(err_bt, err_clipped_bt), mask_bt, loss_agg, agg_constant)
    return loss, {"loss/value": loss, "value/clip_frac": masked_mean((err_clipped_bt > err_bt).astype(jnp.float32), mask_bt)}


def policy_objective(
    cfg: LearnerConfig,
    logprobs_bt: jax.Array,
    old_logprobs_bt: jax.Array,
    advantages_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    ref_logprobs_bt: jax.Array | None = None,
    entropy_bt: jax.Array | None = None,
    kl_coef: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The policy loss: clipped surrogate + beta KL(pi || pi_ref) (when KL is a loss term) - entropy_coef H.
    Expert iteration's policy term is the NLL of the kept completions instead (advantages 1 on the kept rows' tokens,
    0 elsewhere: `expert_iteration_keep`), aggregated over the kept tokens only; pi_old plays no part.

    Every term is aggregated with `cfg.loss_agg`. kl_coef: the current beta; None means `cfg.kl_coef`.
    Metrics: loss/policy (the surrogate alone), clip_ratio/{low,high,region}, policy/approx_kl, and, when their
    inputs are given, kl and entropy (token means over the valid tokens).
    """
    agg_constant = cfg.loss_agg_constant or None
    if cfg.algorithm == "expert_iteration":
        kept_bt = _zero_masked((advantages_bt > 0).astype(jnp.float32), mask_bt)
        loss = aggregate(-logprobs_bt, kept_bt, cfg.loss_agg, agg_constant)
        metrics = {"expert_iteration/kept_tokens": kept_bt.sum() / jnp.maximum(_valid(mask_bt).sum(), 1)}
    else:
        loss, metrics = clipped_surrogate(
            logprobs_bt, old_logprobs_bt, advantages_bt, mask_bt, cfg.clip_eps_low, cfg.clip_eps_high, cfg.loss_agg,
            agg_constant,
        )
    metrics = {"loss/policy": loss, **metrics}
    if ref_logprobs_bt is not None:
        kl_bt = kl_estimator(cfg.kl_estimator)(_zero_masked(logprobs_bt, mask_bt), _zero_masked(ref_logprobs_bt, mask_bt))
        metrics["kl"] = jax.lax.stop_gradient(masked_mean(kl_bt, mask_bt))
        if kl_is_loss_term(cfg):
            beta = cfg.kl_coef if kl_coef is None else kl_coef
            loss = loss + beta * aggregate(kl_bt, mask_bt, cfg.loss_agg, agg_constant)
    elif kl_is_loss_term(cfg) and cfg.kl_coef:
        raise ValueError(f"learner.kl_coef={cfg.kl_coef} adds a KL loss term: pass ref_logprobs_bt")
    if entropy_bt is not None:
        metrics["entropy"] = jax.lax.stop_gradient(masked_mean(entropy_bt, mask_bt))
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * aggregate(entropy_bt, mask_bt, cfg.loss_agg, agg_constant)
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# KL controller (Ziegler et al. 2019), as a pytree so it is checkpointed with the rest of the state.
# ----------------------------------------------------------------------------------------------


class KLControllerState(NamedTuple):
    kl_coef: jax.Array  # float32 scalar: the current beta


def init_kl_controller(cfg: LearnerConfig) -> KLControllerState:
    return KLControllerState(jnp.asarray(cfg.kl_coef, jnp.float32))


def adaptive_kl_update(
    state: KLControllerState, kl: jax.Array, n_steps: int | jax.Array, target: float, horizon: float
) -> KLControllerState:
    """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n_steps / horizon)."""
    proportional_error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return KLControllerState(state.kl_coef * (1.0 + proportional_error * n_steps / horizon))


def update_kl_controller(
    cfg: LearnerConfig, state: KLControllerState, kl: jax.Array, n_steps: int | jax.Array
) -> KLControllerState:
    """The next controller state after observing mean KL `kl` over `n_steps` samples; fixed beta unless adaptive_kl."""
    if not cfg.adaptive_kl:
        return state
    return adaptive_kl_update(state, kl, n_steps, cfg.kl_target, cfg.kl_horizon)
