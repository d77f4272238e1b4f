"""The reward model and its compiled functions: transformer trunk + `ScalarHead` read at the last real token, an
ensemble of k members stacked on a leading axis, the reward normaliser, the Bradley-Terry loss, how members combine.

Token heads (critic.token_heads). Two more `ScalarHead`s read every essay token: `flag` (was this token tampered
with: a swapped value, a spliced or repeated sentence) and `cover` (does it state a value its prompt gives). They
learn from token labels that cost nothing (`selfplay.critic.tokens`): the self-made pairs' tampered spans, and the
essay's words that restate the prompt's values. The reward becomes

    r = head(h_last) + softplus(w_cover) * sum_t sigmoid(cover_t) - softplus(w_flag) * sum_t sigmoid(flag_t)

over the essay's tokens, where the two weights learn from the labelled pairs' Bradley-Terry loss with the rest:
checked facts and stated values are counted where they are, and the labels say how much each count is worth.

Ensemble. Member params are stacked on a leading axis (logical name "ensemble"); training, scoring and the optimiser
run under `jax.vmap` over it, so k members cost one trace and one compilation. Members start from different seeds and
see the pairs in different orders (with `critic.bootstrap`, each its own resample of them). Their scores combine as
the mean, the minimum (worst case) or mean - lambda * std (population std over members).

Normaliser. With `critic.normalize`, rewards are (combined - mean) / sqrt(var + 1e-8) where mean and var are an EMA
(`critic.norm_momentum`) over the batches the loop scores (`observe`); after every training run they restart from the
critic's scores on the newest pool essays, because training moves the scale.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from selfplay.config import ConfigError, CriticConfig, ModelConfig, UserError
from selfplay.models import heads, transformer
from selfplay.types import Rollout, Scores

ENSEMBLE_AXIS = "ensemble"
NORM_EPS = 1e-8

# How often each traced function body ran (a retrace shows up here): the member loss is traced once per compilation
# of the train step, whatever the ensemble size, because members run under vmap.
trace_counts: collections.Counter[str] = collections.Counter()


MIX_INIT = 0.5413  # softplus(0.5413) = 1: each counted token starts worth one unit of reward
TOKEN_BIAS_INIT = -3.0  # sigmoid(-3) = 0.05: the token heads start counting almost nothing, so the reward starts
# at the sequence head's scale rather than at half the essay's length


class RewardModel(nnx.Module):
    """`Transformer` trunk (its LM head unused) + `ScalarHead` at each row's last valid token: r_b, float32; with
    `token_heads`, plus the counts of covered and flagged essay tokens (module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, token_heads: bool = False):
        self.trunk = transformer.Transformer(cfg, rngs=rngs)
        self.head = heads.ScalarHead(cfg.d_model, rngs=rngs)
        self.token_heads = token_heads
        if token_heads:
            self.flag = heads.ScalarHead(cfg.d_model, rngs=rngs)
            self.cover = heads.ScalarHead(cfg.d_model, rngs=rngs)
            for h in (self.flag, self.cover):
                h.bias[...] = jnp.full_like(h.bias[...], TOKEN_BIAS_INIT)
            self.w_flag = nnx.Param(jnp.float32(MIX_INIT), out_sharding=(), eager_sharding=False)
            self.w_cover = nnx.Param(jnp.float32(MIX_INIT), out_sharding=(), eager_sharding=False)

    def outputs(
        self, tokens_bl: jax.Array, positions_bl: jax.Array, valid_bl: jax.Array, essay_bl: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """(r_b, flag logits [B, L], cover logits [B, L]); the logits are None without token heads, which then
        need `essay_bl` (1 on the essay's tokens)."""
        h_bld, _ = self.trunk.hidden(tokens_bl, positions_bl, valid_bl)
        r_b = self.head(heads.gather_last(h_bld, valid_bl))
        if not self.token_heads:
            return r_b, None, None
        if essay_bl is None:
            raise ValueError("a reward model with token heads needs the essay's token mask")
        flag_bl, cover_bl = self.flag(h_bld), self.cover(h_bld)
        m_bl = essay_bl.astype(jnp.float32)
        covered = jnp.sum(jax.nn.sigmoid(cover_bl) * m_bl, axis=1)
        flagged = jnp.sum(jax.nn.sigmoid(flag_bl) * m_bl, axis=1)
        r_b = r_b + jax.nn.softplus(self.w_cover[...]) * covered - jax.nn.softplus(self.w_flag[...]) * flagged
        return r_b, flag_bl, cover_bl

    def __call__(
        self, tokens_bl: jax.Array, positions_bl: jax.Array, valid_bl: jax.Array, essay_bl: jax.Array | None = None
    ) -> jax.Array:
        return self.outputs(tokens_bl, positions_bl, valid_bl, essay_bl)[0]


def reward_graphdef(cfg: ModelConfig, token_heads: bool = False) -> nnx.GraphDef:
    """The static graphdef of one member (no weights are allocated)."""
    return nnx.split(nnx.eval_shape(lambda: RewardModel(cfg, rngs=nnx.Rngs(0), token_heads=token_heads)))[0]


def _with_member_axis(params: nnx.State) -> nnx.State:
    """Prefix every Param's logical axes with the ensemble axis, matching the stacked value."""

    def fix(v: Any) -> Any:
        if isinstance(v, nnx.Variable) and v.has_metadata("out_sharding"):
            return v.replace(out_sharding=(ENSEMBLE_AXIS, *(v.get_metadata("out_sharding") or ())))
        return v

    return jax.tree.map(fix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_params(
    cfg: ModelConfig, k: int, seed: int, trunk_params: nnx.State | None = None, token_heads: bool = False
) -> nnx.State:
    """k members' params stacked on a leading axis; member m is drawn from fold_in(key(seed), m).

    trunk_params: a policy's params (same shapes), copied into every member's trunk; heads stay per-member.
    """
    keys = jax.vmap(lambda m: jax.random.fold_in(jax.random.key(seed), m))(jnp.arange(k))

    def one(key: jax.Array, trunk: nnx.State | None) -> nnx.State:
        model = RewardModel(cfg, rngs=nnx.Rngs(params=key), token_heads=token_heads)
        if trunk is not None:
            nnx.update(model.trunk, trunk)
        return nnx.state(model, nnx.Param)

    params = jax.jit(jax.vmap(one, in_axes=(0, None)))(keys, trunk_params)
    return _with_member_axis(params)


def make_optimizer(cfg: CriticConfig) -> optax.GradientTransformation:
    """clip_by_global_norm then AdamW; norm scales and the head's bias are not decayed."""

    def decay_mask(params: Any) -> Any:
        def keep(path: tuple, _: Any) -> bool:
            names = "/".join(str(getattr(p, "key", getattr(p, "name", ""))) for p in path)
            return "norm" not in names and "bias" not in names

        return jax.tree_util.tree_map_with_path(keep, params)

    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(cfg.lr, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


class Normalizer(NamedTuple):
    """EMA of the combined reward's mean and variance; count = batches folded in (0: the identity)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array


class CriticState(NamedTuple):
    """Everything training changes, as one pytree (checkpointed whole).

    params     nnx.State, every leaf [k, ...] (logical axes ("ensemble", ...))
    opt_state  the optimiser's state, every array leaf [k, ...]
    norm       the reward normaliser (scalars)
    step       int32 scalar, training steps taken
    """

    params: nnx.State
    opt_state: optax.OptState
    norm: Normalizer
    step: jax.Array


def init_normalizer() -> Normalizer:
    return Normalizer(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32))


def update_normalizer(norm: Normalizer, x_b: jax.Array, momentum: float) -> Normalizer:
    """Fold one batch in: the first batch sets the stats; later ones mix in with weight 1 - momentum (the variance
    of the two-component mixture, so a shift of the mean widens it)."""
    bm, bv = jnp.mean(x_b), jnp.var(x_b)
    m = momentum
    mean = m * norm.mean + (1 - m) * bm
    var = m * norm.var + (1 - m) * bv + m * (1 - m) * (bm - norm.mean) ** 2
    first = norm.count == 0
    return Normalizer(jnp.where(first, bm, mean), jnp.where(first, bv, var), norm.count + 1)


def normalize(norm: Normalizer, x_b: jax.Array) -> jax.Array:
    return jnp.where(norm.count > 0, (x_b - norm.mean) * jax.lax.rsqrt(norm.var + NORM_EPS), x_b)


def init_state(cfg: CriticConfig, seed: int, trunk_params: nnx.State | None = None) -> CriticState:
    params = init_params(cfg.model, cfg.ensemble_size, seed, trunk_params, cfg.token_heads)
    opt_state = jax.jit(jax.vmap(make_optimizer(cfg).init))(params)
    return CriticState(params, opt_state, init_normalizer(), jnp.zeros((), jnp.int32))


def abstract_state(cfg: CriticConfig) -> CriticState:
    """The state's shapes and dtypes (ShapeDtypeStructs), for a restore target."""
    return nnx.eval_shape(lambda: init_state(cfg, 0))


def bradley_terry_loss(
    r_chosen_b: jax.Array, r_rejected_b: jax.Array, margin: float = 0.0, centering_coef: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean(-log sigmoid(r_c - r_r - margin)) + centering_coef * mean((r_c + r_r)^2), and its parts."""
    bt = -jnp.mean(jax.nn.log_sigmoid(r_chosen_b - r_rejected_b - margin))
    centre = jnp.mean((r_chosen_b + r_rejected_b) ** 2)
    loss = bt + centering_coef * centre
    accuracy = jnp.mean((r_chosen_b > r_rejected_b) + 0.5 * (r_chosen_b == r_rejected_b))
    return loss, {"loss": loss, "bt_loss": bt, "centering": centre, "accuracy": accuracy,
                  "reward_gap": jnp.mean(r_chosen_b - r_rejected_b)}


def combine_members(members_kb: jax.Array, combine: str, uncertainty_coef: float = 1.0) -> jax.Array:
    """[K, B] member scores -> [B]: mean, min (worst case) or mean - lambda * std (population std)."""
    if combine == "mean":
        return jnp.mean(members_kb, axis=0)
    if combine == "min":
        return jnp.min(members_kb, axis=0)
    if combine == "mean_minus_std":
        return jnp.mean(members_kb, axis=0) - uncertainty_coef * jnp.std(members_kb, axis=0)
    raise ConfigError(f"critic.combine must be mean, min or mean_minus_std, got {combine!r}")


class TokenLabels(NamedTuple):
    """The token heads' targets of a batch of rows, float32 [..., n, L] each: `flag` 1 on a tampered token, `cover`
    1 on a token stating one of the prompt's values; each `*_mask` 1 where that target is known."""

    flag: jax.Array
    flag_mask: jax.Array
    cover: jax.Array
    cover_mask: jax.Array


def masked_bce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean binary cross-entropy over the tokens where `mask` is 1 (0 when there are none)."""
    per = optax.sigmoid_binary_cross_entropy(logits, labels)
    return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def essay_mask(tokens_nl: jax.Array, valid_nl: jax.Array, sep_id: int) -> jax.Array:
    """1 on the tokens after a row's first `sep_id` (the essay of `[bos] prompt [sep] essay [eos]`), valid ones only."""
    after = jnp.cumsum(tokens_nl == sep_id, axis=1) > 0
    return (after & (tokens_nl != sep_id) & valid_nl).astype(jnp.float32)


class CriticFns(NamedTuple):
    """train_step(state, tokens_knl, len_kn, labels) -> (state, metrics [k]); rows [0, n/2) chosen, [n/2, n)
    rejected; labels: `TokenLabels` [k, n, L] for a critic with token heads, else None.
    score_tokens(state, tokens_nl, len_n) -> Scores of right-padded `[bos] prompt [sep] essay [eos]` rows.
    score(state, rollout, prompt_width) -> Scores of each rollout row (read at its last completion token).
    observe(state, members_kb) -> state with the combined scores folded into the normaliser."""

    train_step: Callable
    score_tokens: Callable
    score: Callable
    observe: Callable


def _right_padded_inputs(len_n: jax.Array, l: int) -> tuple[jax.Array, jax.Array]:
    col_nl = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (len_n.shape[0], l))
    return col_nl, col_nl < len_n[:, None]


def _member_rewards(graphdef: nnx.GraphDef, params_k: nnx.State, tokens_nl: jax.Array, positions_nl: jax.Array,
                    valid_nl: jax.Array, essay_nl: jax.Array) -> jax.Array:
    def one(params: nnx.State) -> jax.Array:
        trace_counts["member_reward"] += 1
        return nnx.merge(graphdef, params)(tokens_nl, positions_nl, valid_nl, essay_nl)

    return jax.vmap(one)(params_k)


def raw_rewards(cfg: CriticConfig, scores: Scores) -> jax.Array:
    """[B] the members' combination before the normaliser: one scale for as long as the critic is not retrained
    (the normalised reward's running mean chases a rising score, so trends are read from this)."""
    return combine_members(scores.members_kb, cfg.combine, cfg.uncertainty_coef)


def _combined(cfg: CriticConfig, state: CriticState, members_kb: jax.Array) -> jax.Array:
    combined_b = combine_members(members_kb, cfg.combine, cfg.uncertainty_coef)
    return normalize(state.norm, combined_b) if cfg.normalize else combined_b


def make_train_step(graphdef: nnx.GraphDef, cfg: CriticConfig, sep_id: int = -1) -> Callable:
    """`train_step(state, tokens_knl, len_kn, labels) -> (state, metrics)`: one AdamW step of every member on its own
    batch (member m's rows: chosen [0, n/2), rejected [n/2, n)); metrics hold one value per member. With token heads
    the loss adds critic.token_loss_coef times the two heads' masked BCE on `labels`. Donates the state."""
    optimizer = make_optimizer(cfg)

    def member_loss(params, tokens_nl, len_n, labels):
        trace_counts["member_loss"] += 1
        positions_nl, valid_nl = _right_padded_inputs(len_n, tokens_nl.shape[1])
        essay_nl = essay_mask(tokens_nl, valid_nl, sep_id)
        r_n, flag_nl, cover_nl = nnx.merge(graphdef, params).outputs(tokens_nl, positions_nl, valid_nl, essay_nl)
        half = tokens_nl.shape[0] // 2
        loss, metrics = bradley_terry_loss(r_n[:half], r_n[half:], cfg.margin, cfg.centering_coef)
        if flag_nl is not None:
            metrics["flag_loss"] = masked_bce(flag_nl, labels.flag, labels.flag_mask * essay_nl)
            metrics["cover_loss"] = masked_bce(cover_nl, labels.cover, labels.cover_mask * essay_nl)
            loss = loss + cfg.token_loss_coef * (metrics["flag_loss"] + metrics["cover_loss"])
            metrics["loss"] = loss
        return loss, metrics

    def member_step(params, opt_state, tokens_nl, len_n, labels):
        (_, metrics), grads = jax.value_and_grad(member_loss, has_aux=True)(params, tokens_nl, len_n, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    def train_step(state: CriticState, tokens_knl: jax.Array, len_kn: jax.Array, labels: TokenLabels | None = None):
        params, opt_state, metrics = jax.vmap(member_step)(state.params, state.opt_state, tokens_knl, len_kn, labels)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_score_tokens_fn(graphdef: nnx.GraphDef, cfg: CriticConfig, sep_id: int = -1) -> Callable:
    """`score_tokens(state, tokens_nl, len_n) -> Scores` for right-padded rows of true length len_n."""

    def score_tokens(state: CriticState, tokens_nl: jax.Array, len_n: jax.Array) -> Scores:
        positions_nl, valid_nl = _right_padded_inputs(len_n, tokens_nl.shape[1])
        essay_nl = essay_mask(tokens_nl, valid_nl, sep_id)
        members_kn = _member_rewards(graphdef, state.params, tokens_nl, positions_nl, valid_nl, essay_nl)
        return Scores(_combined(cfg, state, members_kn), members_kn)

    return jax.jit(score_tokens)


def make_score_fn(graphdef: nnx.GraphDef, cfg: CriticConfig) -> Callable:
    """`score(critic_state, rollout, prompt_width) -> Scores(rewards_b, members_kb)`, jitted (prompt_width static).

    Each row is read at its last completion token (EOS, or the last token when cut by max_new_tokens); rewards_b is
    the members' combination, normalised when critic.normalize. The rollout must come from the critic's tokenizer."""

    def score(state: CriticState, rollout: Rollout, prompt_width: int) -> Scores:
        l = rollout.tokens_bl.shape[1]
        if l > cfg.model.max_seq_len:
            raise UserError(f"a rollout of width {l} exceeds critic.model.max_seq_len ({cfg.model.max_seq_len})")
        valid_bl = rollout.valid_mask_bl(prompt_width)
        essay_bl = valid_bl * (jnp.arange(l) >= prompt_width)[None, :]  # the completion columns
        members_kb = _member_rewards(
            graphdef, state.params, rollout.tokens_bl, rollout.positions_bl(prompt_width), valid_bl, essay_bl
        )
        return Scores(_combined(cfg, state, members_kb), members_kb)

    return jax.jit(score, static_argnums=2)


def make_observe_fn(cfg: CriticConfig) -> Callable:
    """`observe(state, members_kb) -> state`: fold a scored batch's combined raw rewards into the normaliser."""

    def observe(state: CriticState, members_kb: jax.Array) -> CriticState:
        combined_b = combine_members(members_kb, cfg.combine, cfg.uncertainty_coef)
        return state._replace(norm=update_normalizer(state.norm, combined_b, cfg.norm_momentum))

    return jax.jit(observe)


def make_critic_fns(graphdef: nnx.GraphDef, cfg: CriticConfig, sep_id: int = -1) -> CriticFns:
    """The compiled functions; `sep_id` (the tokenizer's, between prompt and essay) finds the essay's tokens for the
    token heads in `[bos] prompt [sep] essay [eos]` rows (-1: none; only a critic without token heads may do that)."""
    if cfg.token_heads and sep_id < 0:
        raise ValueError("a critic with token heads needs the tokenizer's sep id")
    return CriticFns(make_train_step(graphdef, cfg, sep_id), make_score_tokens_fn(graphdef, cfg, sep_id),
                     make_score_fn(graphdef, cfg), make_observe_fn(cfg))


