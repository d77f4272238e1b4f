"""The policy-gradient update: `make_update_step(cfg, ...)` returns one jitted pure `update_step(state, batch, rng)`.

Also owns the learner's optax chain, its train state and the reference log-prob step; every formula (advantages,
losses, KL, the KL controller) comes from `selfplay.algorithms`.

The learner knows no model. It takes a policy function `logprob_fn(params, tokens_bl, positions_bl, valid_bl)
-> (logprobs_bl, entropy_bl)` aligned like `Rollout.logprobs_bl` (entry t is log pi(token_t | tokens_<t); 0 at
column 0 and on padding), e.g. `functools.partial(transformer.token_logprobs, graphdef)`; and, for PPO, a
`value_fn(value_params, tokens_bl, positions_bl, valid_bl) -> values_bl` with the same alignment: entry t is
V(state before token t is emitted), i.e. computed from tokens_<t, the value of the decision that emits token t.

Inside the step, t indexes the completion columns P..L-1 of the buffer (T = L - P = actor.max_new_tokens); that
T is the token width Dr. GRPO's `loss_agg=constant` normaliser defaults to.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfplay import algorithms
from selfplay.config import ActorConfig, ConfigError, LearnerConfig
from selfplay.types import PtxRows, Rollout

LogprobFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
ValueFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
UpdateStep = Callable[["TrainState", "Batch", jax.Array], tuple["TrainState", dict[str, jax.Array]]]

# `optax.apply_if_finite` applies a non-finite update anyway after this many in a row; we never do. The loop
# sees `skipped_nonfinite` every step and decides whether to stop.
_NEVER_APPLY_NONFINITE = int(np.iinfo(np.int32).max)


# ----------------------------------------------------------------------------------------------
# The optax chain
# ----------------------------------------------------------------------------------------------


def num_optimizer_updates(cfg: LearnerConfig, rounds: int) -> int:
    """Optimiser updates in `rounds` update steps: the unit of `make_optimizer`'s `total_steps` and of warm-up."""
    return rounds * cfg.epochs * cfg.minibatches // cfg.grad_accum


def make_schedule(cfg: LearnerConfig, total_steps: int | None = None) -> optax.Schedule:
    """learner.lr as a function of the optimiser update count: constant or cosine to 0, after a linear warm-up.

    The warm-up reaches lr at update `warmup_steps` and starts at lr / (warmup_steps + 1), not 0: an update at
    lr 0 would waste a whole round of sampling. Cosine decays over the `total_steps - warmup_steps` updates left.
    """
    warmup = cfg.warmup_steps
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        if total_steps is None:
            raise ConfigError("learner.schedule='cosine' needs the run's total optimiser updates (make_optimizer total_steps)")
        if total_steps <= warmup:
            raise ConfigError(f"learner.warmup_steps ({warmup}) must be below the total optimiser updates ({total_steps})")
        main = optax.cosine_decay_schedule(cfg.lr, total_steps - warmup)
    else:
        raise ConfigError(f"learner.schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
    if not warmup:
        return main

    def warm(count: jax.Array) -> jax.Array:
        return cfg.lr * (count + 1) / (warmup + 1)

    return optax.join_schedules([warm, main], [warmup])


def make_optimizer(cfg: LearnerConfig, total_steps: int | None = None) -> optax.GradientTransformation:
    """apply_if_finite(MultiSteps?(chain(clip_by_global_norm, inject_hyperparams(adamw)(schedule)))).

    total_steps: optimiser updates in the whole run (see `num_optimizer_updates`); only cosine needs it.
    A non-finite gradient skips its update (params and optimiser moments untouched, counted in the state's
    `total_notfinite`) and, with grad_accum > 1, is not accumulated either: apply_if_finite sits outside
    MultiSteps so one bad minibatch cannot poison the k - 1 good ones it would be averaged with.
    """
    _check(cfg)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.inject_hyperparams(optax.adamw)(learning_rate=make_schedule(cfg, total_steps), weight_decay=cfg.weight_decay),
    )
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_APPLY_NONFINITE)


def _check(cfg: LearnerConfig) -> None:
    cfg.validate("learner")


def _in_hyperparams(path: tuple, _: Any) -> bool:
    # inject_hyperparams keeps a schedule's value in `hyperparams` and the schedule's own state in
    # `hyperparams_states` under the same key; the value is the one to read.
    return any(getattr(k, "name", None) == "hyperparams" for k in path)


def _opt_field(opt_state: optax.OptState, name: str, role: str) -> jax.Array:
    value = optax.tree_utils.tree_get(opt_state, name, filtering=_in_hyperparams if name == "learning_rate" else None)
    if value is None:
        raise ValueError(
            f"the {role} optimiser state has no '{name}': build the optimiser with learner.make_optimizer "
            "(apply_if_finite outermost, inject_hyperparams(adamw) inside)"
        )
    return value


# ----------------------------------------------------------------------------------------------
# State and batch
# ----------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything the update step changes, as one pytree (checkpointed whole).

    params           the policy's params (any pytree, e.g. an nnx.State)
    opt_state        the policy optimiser's state
    kl               the KL controller (its beta is used by this step and updated at its end)
    step             int32 scalar, update steps taken
    value_params     PPO's value-function params, else None
    value_opt_state  their optimiser's state, else None
    """

    params: Any
    opt_state: optax.OptState
    kl: algorithms.KLControllerState
    step: jax.Array
    value_params: Any = None
    value_opt_state: optax.OptState | None = None


class Batch(NamedTuple):
    """One round's data for the update.

    rollout          what the actor wrote ([B, L], prompts left-padded to the step's prompt_width)
    rewards_b        float32 [B] the critic's scores
    ref_logprobs_bl  float32 [B, L] the frozen reference's log-probs (`make_reference_logprobs`)
    ptx              human examples mixed back in (learner.ptx_coef > 0 only; rows divisible by learner.minibatches)
    token_credits_bl float32 [B, L] per-token credit (run.token_credit), added x learner.token_credit_coef to the
                     completion tokens' advantages; None: none
    """

    rollout: Rollout
    rewards_b: jax.Array
    ref_logprobs_bl: jax.Array
    ptx: PtxRows | None = None
    token_credits_bl: jax.Array | None = None


def init_train_state(
    cfg: LearnerConfig,
    params: Any,
    *,
    optimizer: optax.GradientTransformation | None = None,
    value_params: Any = None,
    value_optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """A fresh state owning COPIES of the params: `update_step` donates its state, so arrays the caller keeps
    (typically the same params as the frozen reference) stay valid. Pass the optimisers given to make_update_step
    (None: `make_optimizer(cfg)`; the value optimiser defaults to the policy's)."""
    optimizer = optimizer or make_optimizer(cfg)
    value_optimizer = value_optimizer or optimizer
    if (value_params is None) != (cfg.algorithm != "ppo"):
        raise ConfigError(f"learner.algorithm={cfg.algorithm!r}: value_params must be given for ppo and only for ppo")
    params = jax.tree.map(jnp.copy, params)
    state = TrainState(
        params=params,
        opt_state=optimizer.init(params),
        kl=algorithms.init_kl_controller(cfg),
        step=jnp.zeros((), jnp.int32),
    )
    if value_params is not None:
        value_params = jax.tree.map(jnp.copy, value_params)
        state = state._replace(value_params=value_params, value_opt_state=value_optimizer.init(value_params))
    return state


def _keep_if_finite(new: Any, old: Any) -> tuple[Any, jax.Array]:
    """(`new` if every floating leaf of it is finite, else `old`; whether it was). apply_if_finite checks only the
    gradient: a finite gradient can still give a non-finite update (a NaN learning rate, an overflowing moment)."""
    leaves = [x for x in jax.tree.leaves(new) if jnp.issubdtype(x.dtype, jnp.inexact)]
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old), ok


def _centred_credits(credits_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """The credited tokens' credits minus their mean over the batch (0 stays 0): they move probability between the
    choices the credit judges (a right value against a wrong one), not away from making a choice at all. Uncentred,
    a policy whose claims are wrong half the time learns to stop claiming."""
    credited_bt = (credits_bt != 0) & (mask_bt > 0)
    mean = jnp.sum(jnp.where(credited_bt, credits_bt, 0.0)) / jnp.maximum(jnp.sum(credited_bt), 1)
    return jnp.where(credited_bt, credits_bt - mean, 0.0)


def _model_inputs(rollout: Rollout, prompt_width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return rollout.tokens_bl, rollout.positions_bl(prompt_width), rollout.valid_mask_bl(prompt_width)


def make_reference_logprobs(logprob_fn: LogprobFn, *, prompt_width: int) -> Callable[[Any, Rollout], jax.Array]:
    """A jitted `reference_logprobs(ref_params, rollout) -> float32 [B, L]`: the frozen reference's log-probs,
    aligned like `Rollout.logprobs_bl`, for `Batch.ref_logprobs_bl`."""

    def reference_logprobs(ref_params: Any, rollout: Rollout) -> jax.Array:
        logprobs_bl, _ = logprob_fn(jax.lax.stop_gradient(ref_params), *_model_inputs(rollout, prompt_width))
        return jax.lax.stop_gradient(logprobs_bl.astype(jnp.float32))

    return jax.jit(reference_logprobs)


# ----------------------------------------------------------------------------------------------
# The update step
# ----------------------------------------------------------------------------------------------


class _Rows(NamedTuple):
    """Per-row inputs of one minibatch loss; `_bt` arrays cover the completion columns only."""

    tokens_bl: jax.Array
    positions_bl: jax.Array
    valid_bl: jax.Array
    mask_bt: jax.Array
    old_logprobs_bt: jax.Array | None  # None in one pass (`single_pass`): pi_old is the loss's own forward
    ref_logprobs_bt: jax.Array
    advantages_bt: jax.Array
    returns_bt: jax.Array | None
    old_values_bt: jax.Array | None
    sampling_logprobs_bt: jax.Array | None = None  # one pass with a plain sampler: for policy/sampling_logprob_gap


def sampled_policy(actor_cfg: ActorConfig | None, cfg: LearnerConfig) -> bool:
    """The sampler's log-probs are those the learner's forward computes (see selfplay.actor): greedy, or untruncated
    sampling at temperature 1 or, with learner.temperature_in_loss, at any temperature."""
    if actor_cfg is None:
        return False
    untruncated = actor_cfg.top_k == 0 and actor_cfg.top_p >= 1.0
    return actor_cfg.greedy or (untruncated and (actor_cfg.temperature == 1.0 or cfg.temperature_in_loss))


def make_update_step(
    cfg: LearnerConfig,
    *,
    group_size: int,
    prompt_width: int,
    logprob_fn: LogprobFn,
    value_fn: ValueFn | None = None,
    optimizer: optax.GradientTransformation | None = None,
    value_optimizer: optax.GradientTransformation | None = None,
    actor_cfg: ActorConfig | None = None,
    single_pass: bool | None = None,
) -> UpdateStep:
    """The jitted `update_step(state, batch, rng) -> (state, metrics)`; `state` is donated (do not reuse it).

    group_size: G (actor.samples_per_prompt), rows prompt * G + g. prompt_width: the bucket P the batch's prompts
    are padded to (one update step per bucket). optimizer / value_optimizer: as given to `init_train_state`
    (None: `make_optimizer(cfg)`; the value function gets the policy's by default). actor_cfg: the sampler's
    config; when it samples the plain policy, `policy/sampling_logprob_gap` is reported.

    pi_old is the policy at the start of the update, recomputed here by one teacher-forced pass (`single_pass`, the
    default where it applies: one optimiser update of grpo or rloo with KL as a loss term, takes it from the loss's own
    forward instead, the same values, one forward fewer; False forces the separate pass), not the sampling-time
    log-probs: temperature, top-k and top-p change what the sampler reports, and using those
    would bias the ratio rho. The same pi_old feeds the advantages' KL-in-reward terms. Advantages (and PPO's
    value targets) are computed once on the whole batch, so minibatches can shuffle rows freely without
    splitting a group's baseline. Then `epochs` passes, each over `minibatches` shuffled row blocks, one
    optimiser update per block, all inside `lax.scan`. PPO's loss is the policy objective + vf_coef * value
    loss; the value params have their own optimiser (and gradient clipping), so with Adam vf_coef matters
    mainly through that clipping. After the update the KL controller sees this step's `kl` (the per-token
    mean KL(pi || pi_ref) under learner.kl_estimator, averaged over the minibatches) over B samples. With
    learner.ptx_coef > 0 (the pretraining-data term) every minibatch loss adds ptx_coef x the mean token NLL of
    its share of `batch.ptx`, the human examples, split in order over the minibatches and reused each epoch.

    Metrics (float32 scalars; means over the E x M minibatches unless said otherwise): loss/policy (the clipped
    surrogate), loss/value (0 without ppo), loss/ptx (the human examples' mean token NLL; 0 without them), kl,
    entropy, clip_ratio/{low,high,region}, policy/approx_kl, grad_norm (before clipping), update_norm, lr (of the last optimiser update), skipped_nonfinite (int32,
    updates skipped in this step: a NaN/Inf gradient, or a finite one whose update or new state is not finite), kl_coef (the beta this step used), advantages/{mean,std}
    (over completion tokens); with token credits token_credit/mean (their raw mean over completion tokens); with ppo also value/clip_frac and value/skipped_nonfinite; with a plain sampler
    policy/sampling_logprob_gap (mean |sampling - pi_old log-prob| on completion tokens: should be ~0 when the
    sampler and the teacher-forced pass agree).
    """
    _check(cfg)
    is_ppo = cfg.algorithm == "ppo"
    if is_ppo and value_fn is None:
        raise ConfigError("learner.algorithm='ppo' needs a value function (make_update_step value_fn)")
    if not is_ppo and value_fn is not None:
        raise ConfigError(f"learner.algorithm={cfg.algorithm!r} has no value function; value_fn is for ppo")
    optimizer = optimizer or make_optimizer(cfg)
    value_optimizer = value_optimizer or optimizer
    report_gap = sampled_policy(actor_cfg, cfg)
    n_epochs, n_minibatches, p = cfg.epochs, cfg.minibatches, prompt_width
    # One optimiser update from the params that pi_old is: the loss's forward is pi_old, so rho = exp(logp -
    # stop_gradient(logp)) = 1 and its gradient are exact without the separate teacher-forced pass.
    single_pass = algorithms.pi_old_from_loss(cfg) if single_pass is None else single_pass
    if single_pass and not algorithms.pi_old_from_loss(cfg):
        raise ValueError("single_pass needs learner.epochs = learner.minibatches = 1 and grpo/rloo with KL as a loss term")

    def ptx_nll(params: Any, ptx: PtxRows) -> jax.Array:
        logprobs_bl, _ = logprob_fn(params, ptx.tokens_bl, ptx.positions_bl, ptx.valid_bl)
        return -jnp.sum(logprobs_bl * ptx.loss_mask_bl) / jnp.maximum(jnp.sum(ptx.loss_mask_bl), 1.0)

    def loss_fn(params: Any, value_params: Any, rows: _Rows, kl_coef: jax.Array, ptx: PtxRows | None) -> tuple[jax.Array, dict]:
        logprobs_bl, entropy_bl = logprob_fn(params, rows.tokens_bl, rows.positions_bl, rows.valid_bl)
        old_logprobs_bt = jax.lax.stop_gradient(logprobs_bl[:, p:]) if single_pass else rows.old_logprobs_bt
        loss, metrics = algorithms.policy_objective(
            cfg,
            logprobs_bl[:, p:],
            old_logprobs_bt,
            rows.advantages_bt,
            rows.mask_bt,
            ref_logprobs_bt=rows.ref_logprobs_bt,
            entropy_bt=entropy_bl[:, p:],
            kl_coef=kl_coef,
        )
        if rows.sampling_logprobs_bt is not None:
            gap_bt = jnp.abs(rows.sampling_logprobs_bt - old_logprobs_bt)
            metrics["policy/sampling_logprob_gap"] = algorithms.masked_mean(gap_bt, rows.mask_bt)
        metrics["loss/value"] = jnp.zeros((), jnp.float32)
        if is_ppo:
            values_bl = value_fn(value_params, rows.tokens_bl, rows.positions_bl, rows.valid_bl)
            v_loss, v_metrics = algorithms.value_loss(
                values_bl[:, p:], rows.old_values_bt, rows.returns_bt, rows.mask_bt, cfg.value_clip
            )
            metrics.update(v_metrics)
            loss = loss + cfg.vf_coef * v_loss
        metrics["loss/ptx"] = jnp.zeros((), jnp.float32)
        if ptx is not None:
            nll = ptx_nll(params, ptx)
            metrics["loss/ptx"] = nll
            loss = loss + cfg.ptx_coef * nll
        return loss, metrics

    def update_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        rollout = batch.rollout
        b, l = rollout.tokens_bl.shape
        if not 0 < p < l:
            raise ValueError(f"prompt_width {p} must be inside the rollout buffer of width {l}")
        if b % n_minibatches:
            raise ConfigError(
                f"learner.minibatches ({n_minibatches}) must divide the batch of {b} rows "
                "(actor.prompts_per_round x actor.samples_per_prompt)"
            )
        if (cfg.ptx_coef > 0) != (batch.ptx is not None):
            raise ConfigError(
                f"learner.ptx_coef={cfg.ptx_coef}: the batch must carry human examples (Batch.ptx) exactly when ptx_coef > 0"
            )
        if batch.ptx is not None and batch.ptx.tokens_bl.shape[0] % n_minibatches:
            raise ConfigError(
                f"learner.minibatches ({n_minibatches}) must divide the {batch.ptx.tokens_bl.shape[0]} human examples "
                "of the pretraining-data term (learner.ptx_batch)"
            )
        chex.assert_shape(batch.rewards_b, (b,))
        chex.assert_shape([rollout.completion_mask_bl, rollout.logprobs_bl, batch.ref_logprobs_bl], (b, l))
        tokens_bl, positions_bl, valid_bl = _model_inputs(rollout, p)
        mask_bt = rollout.completion_mask_bl[:, p:].astype(jnp.float32)
        stop = jax.lax.stop_gradient

        old_logprobs_bt = None
        if not single_pass:
            old_logprobs_bl, _ = logprob_fn(state.params, tokens_bl, positions_bl, valid_bl)
            old_logprobs_bt = stop(old_logprobs_bl[:, p:])
        ref_logprobs_bt = stop(batch.ref_logprobs_bl[:, p:])
        old_values_bt = None
        if is_ppo:
            old_values_bt = stop(value_fn(state.value_params, tokens_bl, positions_bl, valid_bl)[:, p:])
        kl_coef = state.kl.kl_coef
        adv = algorithms.compute_advantages(
            cfg,
            algorithms.AdvantageInputs(batch.rewards_b, mask_bt, old_logprobs_bt, ref_logprobs_bt, old_values_bt),
            group_size=group_size,
            kl_coef=kl_coef,
        )
        credits_bt = None
        if batch.token_credits_bl is not None:  # dense credit (Fine-Grained RLHF), on top of the sequence's advantage
            chex.assert_shape(batch.token_credits_bl, (b, l))
            credits_bt = stop(batch.token_credits_bl[:, p:]).astype(jnp.float32)
            adv = adv._replace(advantages_bt=adv.advantages_bt + cfg.token_credit_coef * _centred_credits(credits_bt, mask_bt))
        sampling_bt = rollout.logprobs_bl[:, p:] if single_pass and report_gap else None
        rows = _Rows(
            tokens_bl, positions_bl, valid_bl, mask_bt, old_logprobs_bt, ref_logprobs_bt,
            adv.advantages_bt, adv.returns_bt, old_values_bt, sampling_bt,
        )  # fmt: skip

        def minibatch_update(carry, blocks: tuple[_Rows, PtxRows | None]):
            mb, ptx = blocks
            params, opt_state, value_params, value_opt_state = carry
            grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1) if is_ppo else 0, has_aux=True)
            (_, metrics), grads = grad_fn(params, value_params, mb, kl_coef, ptx)
            if is_ppo:
                grads, value_grads = grads
                value_updates, new_value_opt_state = value_optimizer.update(value_grads, value_opt_state, value_params)
                (value_params, value_opt_state), value_ok = _keep_if_finite(
                    (optax.apply_updates(value_params, value_updates), new_value_opt_state), (value_params, value_opt_state)
                )
                metrics["value/nonfinite_update"] = 1 - value_ok.astype(jnp.int32)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            (params, opt_state), ok = _keep_if_finite((optax.apply_updates(params, updates), new_opt_state), (params, opt_state))
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["update_norm"] = optax.tree.norm(updates)
            metrics["nonfinite_update"] = 1 - ok.astype(jnp.int32)
            return (params, opt_state, value_params, value_opt_state), metrics

        def epoch(carry, key):
            shuffled = rows
            if n_minibatches > 1:  # every loss aggregation is invariant to row order, so one block needs no shuffle
                perm_b = jax.random.permutation(key, b)
                shuffled = jax.tree.map(lambda x: x[perm_b], rows)
            split = lambda x: x.reshape(n_minibatches, x.shape[0] // n_minibatches, *x.shape[1:])  # noqa: E731
            # the human examples are split in order: each optimiser update sees its own share of them
            return jax.lax.scan(minibatch_update, carry, (jax.tree.map(split, shuffled), jax.tree.map(split, batch.ptx)))

        carry = (state.params, state.opt_state, state.value_params, state.value_opt_state)
        carry, metrics_em = jax.lax.scan(epoch, carry, jax.random.split(rng, n_epochs))
        params, opt_state, value_params, value_opt_state = carry

        # Updates skipped: for a non-finite gradient (apply_if_finite's count), or for a finite gradient whose update or
        # resulting state is not finite (e.g. a NaN learning rate; `_keep_if_finite`'s count).
        bad_updates = metrics_em.pop("nonfinite_update").sum()
        value_bad_updates = metrics_em.pop("value/nonfinite_update").sum() if is_ppo else None
        metrics = {k: v.mean() for k, v in metrics_em.items()}
        skipped_before = _opt_field(state.opt_state, "total_notfinite", "policy")
        metrics["skipped_nonfinite"] = _opt_field(opt_state, "total_notfinite", "policy") - skipped_before + bad_updates
        if is_ppo:
            value_skipped_before = _opt_field(state.value_opt_state, "total_notfinite", "value")
            metrics["value/skipped_nonfinite"] = (
                _opt_field(value_opt_state, "total_notfinite", "value") - value_skipped_before + value_bad_updates
            )
        metrics["lr"] = jnp.asarray(_opt_field(opt_state, "learning_rate", "policy"), jnp.float32)
        metrics["kl_coef"] = kl_coef
        adv_mean = algorithms.masked_mean(adv.advantages_bt, mask_bt)
        metrics["advantages/mean"] = adv_mean
        metrics["advantages/std"] = jnp.sqrt(algorithms.masked_mean(jnp.square(adv.advantages_bt - adv_mean), mask_bt))
        if credits_bt is not None:  # before centring: what the credit source said of this batch
            metrics["token_credit/mean"] = algorithms.masked_mean(credits_bt, mask_bt)
        if report_gap and not single_pass:
            gap_bt = jnp.abs(rollout.logprobs_bl[:, p:] - old_logprobs_bt)
            metrics["policy/sampling_logprob_gap"] = algorithms.masked_mean(gap_bt, mask_bt)

        kl = metrics["kl"]
        new_kl = algorithms.update_kl_controller(cfg, state.kl, kl, b)
        # A NaN KL would stick in beta forever; keep the last good controller state instead.
        new_kl = jax.tree.map(lambda new, old: jnp.where(jnp.isfinite(kl), new, old), new_kl, state.kl)
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            kl=new_kl,
            step=state.step + 1,
            value_params=value_params,
            value_opt_state=value_opt_state,
        )
        return new_state, metrics

    return jax.jit(update_step, donate_argnums=0)
