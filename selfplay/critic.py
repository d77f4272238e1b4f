"""The critic: a learned reward model (transformer trunk + `ScalarHead` read at the last real token), trained with
the Bradley-Terry loss as an ensemble of k members in one compiled program; its pair pool and label sources.

Sequences. A text pair is scored as `[bos] prompt [sep] essay [eos]`, right-padded to the smallest of
`critic.seq_buckets` that fits the batch (longer sequences keep their last tokens, so the read-out token survives,
and are counted). A `Rollout` is scored in its own buffer; the read-out is its last completion token.

Ensemble. Member params are stacked on a leading axis (logical name "ensemble"); training, scoring and the optimiser
run under `jax.vmap` over it, so k members cost one trace and one compilation. Members start from different seeds and
see the pairs in different orders (with `critic.bootstrap`, each its own resample of them). Their scores combine as
the mean, the minimum (worst case) or mean - lambda * std (population std over members).

Normaliser. With `critic.normalize`, rewards are (combined - mean) / sqrt(var + 1e-8) where mean and var are an EMA
(`critic.norm_momentum`) over the batches the loop scores (`observe`); after every training run they restart from the
critic's scores on the newest pool essays, because training moves the scale.

Labels (`critic.label_source`):
  file           a TRL preference JSONL (see `read_preference_file`).
  world          two samples of the policy for one world prompt, labelled by the budgeted `Labeller` (the gold grader
                 as the human); identical samples are skipped without spending budget.
  discriminator  a world prompt's human essay is preferred over the policy's sample (SPIN / GAN style); no grader.
                 `label_budget` then counts pairs, though no labeller is asked.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from selfplay import checkpoint, sharding
from selfplay.config import Config, ConfigError, CriticConfig, ModelConfig, UserError, to_dict
from selfplay.data import DataError, read_jsonl
from selfplay.models import heads, transformer
from selfplay.tokenizer import Tokenizer
from selfplay.types import Rollout, Scores
from selfplay.world.essays import Labeller, World

ENSEMBLE_AXIS = "ensemble"
PAIRS_FILE = "pairs.jsonl"
NORM_EPS = 1e-8
FORMAT_VERSION = 1

# How often each traced function body ran (a retrace shows up here): the member loss is traced once per compilation
# of the train step, whatever the ensemble size, because members run under vmap.
trace_counts: collections.Counter[str] = collections.Counter()

# (policy_params, prompts, key, samples_per_prompt) -> essays grouped by prompt [p0 s0, p0 s1, ..., p1 s0, ...]
SampleFn = Callable[[Any, Sequence[str], jax.Array, int], list[str]]


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class RewardModel(nnx.Module):
    """`Transformer` trunk (its LM head unused) + `ScalarHead` at each row's last valid token: r_b, float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.trunk = transformer.Transformer(cfg, rngs=rngs)
        self.head = heads.ScalarHead(cfg.d_model, rngs=rngs)

    def __call__(self, tokens_bl: jax.Array, positions_bl: jax.Array, valid_bl: jax.Array) -> jax.Array:
        h_bld, _ = self.trunk.hidden(tokens_bl, positions_bl, valid_bl)
        return self.head(heads.gather_last(h_bld, valid_bl))


_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "resolved_head_dim", "d_ff",
                 "tie_embeddings", "attention_bias", "param_dtype")


def check_policy_init(critic_model: ModelConfig, policy_model: ModelConfig) -> None:
    """critic.init_from_policy needs the trunk shaped exactly like the policy; the error lists every difference."""
    diff = [
        f"critic.model.{f}={getattr(critic_model, f)!r} vs model.{f}={getattr(policy_model, f)!r}"
        for f in _SHAPE_FIELDS
        if getattr(critic_model, f) != getattr(policy_model, f)
    ]
    if diff:
        raise ConfigError(
            "critic.init_from_policy=true needs critic.model shaped like the policy's model: " + "; ".join(diff)
            + " (copy the policy's model section into critic.model, or set critic.init_from_policy=false)"
        )


def reward_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The static graphdef of one member (no weights are allocated)."""
    return nnx.split(nnx.eval_shape(lambda: RewardModel(cfg, rngs=nnx.Rngs(0))))[0]


def _with_member_axis(params: nnx.State) -> nnx.State:
    """Prefix every Param's logical axes with the ensemble axis, matching the stacked value."""

    def fix(v: Any) -> Any:
        if isinstance(v, nnx.Variable) and v.has_metadata("out_sharding"):
            return v.replace(out_sharding=(ENSEMBLE_AXIS, *(v.get_metadata("out_sharding") or ())))
        return v

    return jax.tree.map(fix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_params(cfg: ModelConfig, k: int, seed: int, trunk_params: nnx.State | None = None) -> nnx.State:
    """k members' params stacked on a leading axis; member m is drawn from fold_in(key(seed), m).

    trunk_params: a policy's params (same shapes), copied into every member's trunk; heads stay per-member.
    """
    keys = jax.vmap(lambda m: jax.random.fold_in(jax.random.key(seed), m))(jnp.arange(k))

    def one(key: jax.Array, trunk: nnx.State | None) -> nnx.State:
        model = RewardModel(cfg, rngs=nnx.Rngs(params=key))
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


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


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
    params = init_params(cfg.model, cfg.ensemble_size, seed, trunk_params)
    opt_state = jax.jit(jax.vmap(make_optimizer(cfg).init))(params)
    return CriticState(params, opt_state, init_normalizer(), jnp.zeros((), jnp.int32))


def abstract_state(cfg: CriticConfig) -> CriticState:
    """The state's shapes and dtypes (ShapeDtypeStructs), for a restore target."""
    return nnx.eval_shape(lambda: init_state(cfg, 0))


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unexpected pytree key {k!r}")


def state_to_tree(state: CriticState) -> dict:
    """The state as a nested dict of arrays keyed by pytree path (what orbax stores)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        node = out
        names = [_key_name(k) for k in path]
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = leaf
    return out


def tree_to_state(target: CriticState, tree: dict) -> CriticState:
    """Inverse of `state_to_tree`, with `target` (e.g. `abstract_state(cfg)`) giving the structure."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, _ in flat:
        node: Any = tree
        for k in path:
            node = node[_key_name(k)]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------------------------
# Pure functions: loss, combination
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Jitted functions
# ----------------------------------------------------------------------------------------------


class CriticFns(NamedTuple):
    """train_step(state, tokens_knl, len_kn) -> (state, metrics [k]); rows [0, n/2) chosen, [n/2, n) rejected.
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
                    valid_nl: jax.Array) -> jax.Array:
    def one(params: nnx.State) -> jax.Array:
        trace_counts["member_reward"] += 1
        return nnx.merge(graphdef, params)(tokens_nl, positions_nl, valid_nl)

    return jax.vmap(one)(params_k)


def raw_rewards(cfg: CriticConfig, scores: Scores) -> jax.Array:
    """[B] the members' combination before the normaliser: one scale for as long as the critic is not retrained
    (the normalised reward's running mean chases a rising score, so trends are read from this)."""
    return combine_members(scores.members_kb, cfg.combine, cfg.uncertainty_coef)


def _combined(cfg: CriticConfig, state: CriticState, members_kb: jax.Array) -> jax.Array:
    combined_b = combine_members(members_kb, cfg.combine, cfg.uncertainty_coef)
    return normalize(state.norm, combined_b) if cfg.normalize else combined_b


def make_train_step(graphdef: nnx.GraphDef, cfg: CriticConfig) -> Callable:
    """`train_step(state, tokens_knl, len_kn) -> (state, metrics)`: one AdamW step of every member on its own batch
    (member m's rows: chosen [0, n/2), rejected [n/2, n)); metrics hold one value per member. Donates the state."""
    optimizer = make_optimizer(cfg)

    def member_loss(params, tokens_nl, len_n):
        trace_counts["member_loss"] += 1
        positions_nl, valid_nl = _right_padded_inputs(len_n, tokens_nl.shape[1])
        r_n = nnx.merge(graphdef, params)(tokens_nl, positions_nl, valid_nl)
        half = tokens_nl.shape[0] // 2
        return bradley_terry_loss(r_n[:half], r_n[half:], cfg.margin, cfg.centering_coef)

    def member_step(params, opt_state, tokens_nl, len_n):
        (_, metrics), grads = jax.value_and_grad(member_loss, has_aux=True)(params, tokens_nl, len_n)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    def train_step(state: CriticState, tokens_knl: jax.Array, len_kn: jax.Array):
        params, opt_state, metrics = jax.vmap(member_step)(state.params, state.opt_state, tokens_knl, len_kn)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_score_tokens_fn(graphdef: nnx.GraphDef, cfg: CriticConfig) -> Callable:
    """`score_tokens(state, tokens_nl, len_n) -> Scores` for right-padded rows of true length len_n."""

    def score_tokens(state: CriticState, tokens_nl: jax.Array, len_n: jax.Array) -> Scores:
        positions_nl, valid_nl = _right_padded_inputs(len_n, tokens_nl.shape[1])
        members_kn = _member_rewards(graphdef, state.params, tokens_nl, positions_nl, valid_nl)
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
        members_kb = _member_rewards(graphdef, state.params, rollout.tokens_bl, rollout.positions_bl(prompt_width), valid_bl)
        return Scores(_combined(cfg, state, members_kb), members_kb)

    return jax.jit(score, static_argnums=2)


def make_observe_fn(cfg: CriticConfig) -> Callable:
    """`observe(state, members_kb) -> state`: fold a scored batch's combined raw rewards into the normaliser."""

    def observe(state: CriticState, members_kb: jax.Array) -> CriticState:
        combined_b = combine_members(members_kb, cfg.combine, cfg.uncertainty_coef)
        return state._replace(norm=update_normalizer(state.norm, combined_b, cfg.norm_momentum))

    return jax.jit(observe)


def make_critic_fns(graphdef: nnx.GraphDef, cfg: CriticConfig) -> CriticFns:
    return CriticFns(make_train_step(graphdef, cfg), make_score_tokens_fn(graphdef, cfg), make_score_fn(graphdef, cfg),
                     make_observe_fn(cfg))


# ----------------------------------------------------------------------------------------------
# Pairs: encoding, the pool, the preference file
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference: `chosen` beats `rejected` as an answer to `prompt` (essays without the prompt)."""

    prompt: str
    chosen: str
    rejected: str


def pad_to_bucket(rows: Sequence[np.ndarray], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the smallest bucket that fits the longest row: (tokens_nl int32, len_n int32)."""
    longest = max(len(r) for r in rows)
    fits = [b for b in buckets if b >= longest]
    if not fits:
        raise ValueError(f"a row of {longest} tokens exceeds the largest bucket {max(buckets)}")
    tokens = np.full((len(rows), fits[0]), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, np.array([len(r) for r in rows], np.int32)


def encode_text(tokenizer: Tokenizer, prompt: str, essay: str, max_len: int) -> np.ndarray:
    """`[bos] prompt [sep] essay [eos]` as int32 ids; a longer sequence keeps its last max_len tokens, so the
    read-out token (eos) survives."""
    ids, _ = tokenizer.encode_example(prompt, essay)
    return np.asarray(ids[-max_len:], np.int32)


class PairPool:
    """Every pair labelled so far (pools only grow), each marked train or held out, with its token ids cached.

    Held-out pairs are drawn by a seeded generator as pairs arrive: round(heldout_fraction * n) of each added group.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, heldout_fraction: float, seed: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.heldout_fraction = heldout_fraction
        self.seed = seed
        self.pairs: list[Pair] = []
        self.heldout: list[bool] = []
        self.ids: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def encode(self, prompt: str, essay: str) -> np.ndarray:
        return encode_text(self.tokenizer, prompt, essay, self.max_len)

    def add(self, pairs: Sequence[Pair], heldout: Sequence[bool] | None = None) -> None:
        if heldout is None:
            rng = np.random.default_rng([self.seed, 0x4E1D, len(self.pairs)])
            n_held = int(round(self.heldout_fraction * len(pairs)))
            mask = np.zeros(len(pairs), bool)
            mask[rng.permutation(len(pairs))[:n_held]] = True
            heldout = mask.tolist()
        for p, h in zip(pairs, heldout, strict=True):
            self.pairs.append(p)
            self.heldout.append(bool(h))
            full = [self.tokenizer.encode_example(p.prompt, essay)[0] for essay in (p.chosen, p.rejected)]
            self.truncated += sum(len(f) > self.max_len for f in full)
            self.ids.append((np.asarray(full[0][-self.max_len :], np.int32), np.asarray(full[1][-self.max_len :], np.int32)))

    def indices(self, heldout: bool) -> np.ndarray:
        return np.array([i for i, h in enumerate(self.heldout) if h == heldout], np.int64)

    def to_jsonl(self) -> str:
        return "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "heldout": h}) + "\n"
            for p, h in zip(self.pairs, self.heldout)
        )


def _split_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen essay, rejected essay) of two full texts: the prompt is their longest common prefix cut back to
    its last whitespace, so no word is split (no whitespace: no prompt); whitespace at the cut is dropped."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = max((i for i, ch in enumerate(chosen[:n]) if ch.isspace()), default=0)
    return chosen[:cut].rstrip(), chosen[cut:].lstrip(), rejected[cut:].lstrip()


def read_preference_file(path: str | Path) -> list[Pair]:
    """Pairs from a TRL-style preference JSONL, one object per line, in either of TRL's two formats:

      {"prompt": P, "chosen": C, "rejected": R}   explicit prompt; C and R are the completions.
      {"chosen": C, "rejected": R}                implicit prompt: C and R are full texts; the prompt is their
                                                  longest common prefix cut back to a word boundary (`_split_prompt`).
    Every bad line is a DataError `FILE:LINE: reason`: invalid JSON, a missing or non-string key, an empty string,
    chosen identical to rejected (also after splitting off the prompt).
    """
    rows = read_jsonl(path, {"chosen": str, "rejected": str}, {"prompt": str})
    name = "<stdin>" if str(path) == "-" else str(path)
    pairs = []
    for r in rows:
        where = f"{name}:{r['_line']}"
        for key in ("prompt", "chosen", "rejected"):
            if key in r and not r[key].strip():
                raise DataError(f"{where}: '{key}' is empty")
        if r["chosen"] == r["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a preference needs two different answers")
        if "prompt" in r:
            pairs.append(Pair(r["prompt"], r["chosen"], r["rejected"]))
            continue
        prompt, chosen, rejected = _split_prompt(r["chosen"], r["rejected"])
        if not chosen or not rejected or chosen == rejected:
            raise DataError(
                f"{where}: cannot split 'chosen' and 'rejected' into a shared prompt and two different answers "
                "(one is the other plus a suffix?); give the prompt as a 'prompt' key"
            )
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


# ----------------------------------------------------------------------------------------------
# Label sources in the world
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The host-side handle
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Critic:
    """A critic as the CLI and the loop hold it: config, tokenizer, graphdef (one member), state, pair pool, the
    labeller (world labels only) and the compiled functions."""

    cfg: Config
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    state: CriticState
    pool: PairPool
    fns: CriticFns
    labeller: Labeller | None = None
    refreshes: int = 0

    @property
    def ccfg(self) -> CriticConfig:
        return self.cfg.critic

    @property
    def seed(self) -> int:
        return self.cfg.run.seed


def initial_label_count(cfg: Config) -> int:
    """Labels `critic train` spends: critic.label_budget minus the refreshes' reserve for the whole run."""
    c = cfg.critic
    reserve = c.refresh_budget * (cfg.run.rounds // c.refresh_every) if c.refresh_every else 0
    if reserve and reserve >= c.label_budget:
        raise ConfigError(
            f"critic.label_budget ({c.label_budget}) leaves nothing for the initial training after the refreshes' reserve "
            f"(critic.refresh_budget {c.refresh_budget} x run.rounds {cfg.run.rounds} // critic.refresh_every "
            f"{c.refresh_every} = {reserve})"
        )
    return c.label_budget - reserve


def init_critic(
    cfg: Config,
    tokenizer: Tokenizer,
    *,
    world: World | None = None,
    policy_params: nnx.State | None = None,
    policy_model: ModelConfig | None = None,
) -> Critic:
    """A fresh critic (trunk from scratch, or from `policy_params` with critic.init_from_policy) with an empty pool;
    with a world and critic.label_source=world, a labeller of budget critic.label_budget seeded by run.seed."""
    c = cfg.critic
    if c.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"critic.model.vocab_size ({c.model.vocab_size}) is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    trunk = None
    if c.init_from_policy:
        if policy_params is None or policy_model is None:
            raise UserError("critic.init_from_policy=true needs the policy's params")
        check_policy_init(c.model, policy_model)
        trunk = policy_params
    return critic_from_state(cfg, tokenizer, init_state(c, cfg.run.seed, trunk), world=world)


def critic_from_state(cfg: Config, tokenizer: Tokenizer, state: CriticState, *, world: World | None = None) -> Critic:
    """A critic around `state` with an empty pool and, for world labels, a fresh labeller."""
    c = cfg.critic
    graphdef = reward_graphdef(c.model)
    labeller = None
    if world is not None and c.label_source == "world":
        labeller = Labeller(world, c.label_budget, c.label_noise, seed=cfg.run.seed)
    pool = PairPool(tokenizer, c.seq_buckets[-1], c.heldout_fraction, cfg.run.seed)
    return Critic(cfg, tokenizer, graphdef, state, pool, make_critic_fns(graphdef, c), labeller)


SORTISH_CHUNK = 32  # batches per length-sorted chunk: batches of similar lengths pad less, yet stay random


def _member_streams(critic: Critic, train_idx: np.ndarray) -> list[Any]:
    """Per member: an endless stream of batch_size pool indices (own order; with bootstrap, own resample)."""
    c = critic.ccfg
    step = int(critic.state.step)
    length = np.array([max(len(a), len(b)) for a, b in critic.pool.ids])
    streams = []
    for m in range(c.ensemble_size):
        base = train_idx
        if c.bootstrap:
            base = train_idx[np.random.default_rng([critic.seed, 0xB007, m, len(train_idx)]).integers(0, len(train_idx), len(train_idx))]
        rng = np.random.default_rng([critic.seed, 0x0DE5, m, step])
        if len(base) >= c.batch_size:
            streams.append(_sortish_batches(base, length, c.batch_size, rng))
        else:  # a small pool (early refreshes): draw with replacement
            streams.append(_with_replacement(base, rng, c.batch_size))
    return streams


def _sortish_batches(base: np.ndarray, length: np.ndarray, b: int, rng: np.random.Generator) -> Any:
    """Endless batches of b entries of `base`: each epoch shuffles, sorts chunks of SORTISH_CHUNK * b by length,
    cuts them into batches and shuffles the batch order (a chunk's last partial batch waits for another epoch)."""
    while True:
        order = base[rng.permutation(len(base))]
        batches = []
        for start in range(0, len(order), SORTISH_CHUNK * b):
            chunk = order[start : start + SORTISH_CHUNK * b]
            chunk = chunk[np.argsort(length[chunk], kind="stable")]
            batches += [chunk[j : j + b] for j in range(0, len(chunk) - b + 1, b)]
        for j in rng.permutation(len(batches)):
            yield batches[j]


def _with_replacement(base: np.ndarray, rng: np.random.Generator, b: int) -> Any:
    while True:
        yield base[rng.integers(0, len(base), b)]


def train(critic: Critic, steps: int, *, progress: bool = False, desc: str = "critic") -> list[dict]:
    """`steps` training steps of every member on the pool's training pairs; returns a history of member-mean metrics
    (every 10 steps and the last). Raises UserError on a non-finite loss."""
    if steps <= 0:
        return []
    c = critic.ccfg
    train_idx = critic.pool.indices(heldout=False)
    if len(train_idx) == 0:
        raise UserError("the critic has no training pairs (all labelled pairs are held out or none were labelled)")
    streams = _member_streams(critic, train_idx)
    pad_id = critic.tokenizer.pad_id
    history: list[dict] = []
    columns = [TextColumn(desc), BarColumn(), TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(desc, total=steps, status="")
        for i in range(1, steps + 1):
            idx_kb = [next(s) for s in streams]
            rows = [critic.pool.ids[j][0] for idx in idx_kb for j in idx] + [critic.pool.ids[j][1] for idx in idx_kb for j in idx]
            tokens, lens = pad_to_bucket(rows, c.seq_buckets, pad_id)
            # rows are [all chosen; all rejected]; regroup as member k: [its chosen; its rejected]
            k, b = c.ensemble_size, c.batch_size
            tokens_knl = tokens.reshape(2, k, b, -1).transpose(1, 0, 2, 3).reshape(k, 2 * b, -1)
            len_kn = lens.reshape(2, k, b).transpose(1, 0, 2).reshape(k, 2 * b)
            critic.state, metrics = critic.fns.train_step(critic.state, tokens_knl, len_kn)
            if i % 10 == 0 or i == steps:
                row = {"step": int(critic.state.step), **{n: float(np.mean(v)) for n, v in metrics.items()}}
                if not math.isfinite(row["loss"]):
                    raise UserError(f"critic training diverged at step {row['step']} (loss {row['loss']}); lower critic.lr")
                history.append(row)
                bar.update(task, status=f"loss {row['loss']:.3f}  acc {row['accuracy']:.2f}")
            bar.update(task, advance=1)
    return history


def score_texts(critic: Critic, prompts: Sequence[str], essays: Sequence[str]) -> Scores:
    """Scores (numpy) of `[bos] prompt [sep] essay [eos]` texts, in fixed chunks of 2 * batch_size rows."""
    rows = [critic.pool.encode(p, e) for p, e in zip(prompts, essays, strict=True)]
    return _score_rows(critic, rows)


def _score_rows(critic: Critic, rows: Sequence[np.ndarray]) -> Scores:
    c = critic.ccfg
    chunk = 2 * c.batch_size
    rewards, members = [], []
    for start in range(0, len(rows), chunk):
        part = list(rows[start : start + chunk])
        real = len(part)
        part += [part[0]] * (chunk - real)
        tokens, lens = pad_to_bucket(part, c.seq_buckets, critic.tokenizer.pad_id)
        s = critic.fns.score_tokens(critic.state, tokens, lens)
        rewards.append(np.asarray(s.rewards_b)[:real])
        members.append(np.asarray(s.members_kb)[:, :real])
    if not rows:
        return Scores(np.zeros(0, np.float32), np.zeros((c.ensemble_size, 0), np.float32))
    return Scores(np.concatenate(rewards), np.concatenate(members, axis=1))


def pair_accuracy(critic: Critic, indices: Sequence[int]) -> dict[str, Any]:
    """Share of the pool's pairs at `indices` where the combined score prefers `chosen` (ties count 1/2), also per
    member; plus the scores, for further checks."""
    if len(indices) == 0:
        return {"accuracy": float("nan"), "member_accuracy": [], "n": 0}
    sc = _score_rows(critic, [critic.pool.ids[i][0] for i in indices])
    sr = _score_rows(critic, [critic.pool.ids[i][1] for i in indices])

    def acc(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean((a > b) + 0.5 * (a == b)))

    return {
        "accuracy": acc(sc.rewards_b, sr.rewards_b),
        "member_accuracy": [acc(sc.members_kb[m], sr.members_kb[m]) for m in range(sc.members_kb.shape[0])],
        "n": len(indices),
        "chosen": sc.rewards_b,
        "rejected": sr.rewards_b,
    }


def calibrate_normalizer(critic: Critic, max_pairs: int = 512) -> None:
    """Restart the normaliser from the combined raw scores of the newest pool essays (both sides of up to
    max_pairs pairs): after training, the old statistics describe another scale."""
    idx = list(range(max(0, len(critic.pool) - max_pairs), len(critic.pool)))
    rows = [critic.pool.ids[i][0] for i in idx] + [critic.pool.ids[i][1] for i in idx]
    if not rows:
        return
    members = _score_rows(critic, rows).members_kb
    combined = np.asarray(combine_members(jnp.asarray(members), critic.ccfg.combine, critic.ccfg.uncertainty_coef))
    norm = Normalizer(jnp.float32(combined.mean()), jnp.float32(combined.var()), jnp.float32(1.0))
    critic.state = critic.state._replace(norm=norm)


def refresh(
    critic: Critic,
    policy_params: Any,
    source: PairSource,
    *,
    budget: int | None = None,
    steps: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Co-evolve the critic with the policy: sample from the CURRENT `policy_params`, label up to `budget`
    (default critic.refresh_budget; never more than the labeller has left) new pairs, add them to the pool (which
    keeps every earlier pair), train `steps` (default critic.refresh_steps) steps, re-calibrate the normaliser.

    Returns metrics named for the tracker (loss/critic, critic/*)."""
    c = critic.ccfg
    budget = c.refresh_budget if budget is None else budget
    steps = c.refresh_steps if steps is None else steps
    if source.kind == "world":
        if critic.labeller is None:
            raise UserError("critic.label_source=world needs a labeller; build the critic with a world")
        budget = min(budget, critic.labeller.remaining)
    tag = critic.refreshes + 1  # collection 0 is `critic train`'s
    rng, key = collection_rngs(critic.seed, tag)
    pairs, stats = collect_pairs(source, critic.labeller, policy_params, budget, rng, key)
    critic.refreshes = tag
    critic.pool.add(pairs)
    history = train(critic, steps, progress=progress, desc="critic refresh") if len(critic.pool.indices(False)) else []
    calibrate_normalizer(critic)
    out = {
        "critic/new_pairs": float(len(pairs)),
        "critic/labels": float(stats["labels"]),
        "critic/skipped_identical": float(stats["skipped_identical"]),
        "critic/pool_size": float(len(critic.pool)),
        "critic/labels_used": float(critic.labeller.used if critic.labeller else 0),
    }
    if history:
        out["loss/critic"] = history[-1]["loss"]
        out["critic/train_accuracy"] = history[-1]["accuracy"]
    return out


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def critic_meta(critic: Critic) -> dict:
    """The JSON side of a saved critic: config, label budget counters, labeller state, pool size, refreshes."""
    lab = critic.labeller
    return {
        "format": FORMAT_VERSION,
        "critic": to_dict(critic.ccfg),
        "step": int(critic.state.step),
        "refreshes": critic.refreshes,
        "label_budget": lab.budget if lab else critic.ccfg.label_budget,
        "labels_used": lab.used if lab else 0,
        "labeller": lab.state_dict() if lab else None,
        "pool_size": len(critic.pool),
        "pool_heldout": int(sum(critic.pool.heldout)),
    }


def save_critic(directory: str | Path, critic: Critic) -> Path:
    """Write the state (orbax, pure dicts of arrays), meta JSON and the pair pool (`pairs.jsonl`) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (PAIRS_FILE + ".tmp")
    tmp.write_text(critic.pool.to_jsonl())
    tmp.replace(directory / PAIRS_FILE)
    checkpoint.save_once(directory, state_to_tree(critic.state), critic_meta(critic), step=int(critic.state.step))
    return directory


def has_critic(directory: str | Path) -> bool:
    d = Path(directory)
    if not d.is_dir():
        return False
    with checkpoint.Checkpointer(d, read_only=True) as ckpt:
        return ckpt.latest_step() is not None


def load_critic(
    directory: str | Path, cfg: Config, tokenizer: Tokenizer, *, world: World | None = None, layout: sharding.Layout | None = None
) -> Critic:
    """The critic saved in `directory`. Shape-defining settings (critic.model, critic.ensemble_size) must match the
    saved ones; the labeller (world labels) resumes its budget counter and random stream. With a `layout`, the
    state is read straight into its shards (the restore target carries the shardings; a multi-process run needs it)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise checkpoint.CheckpointError(f"no critic at {directory}; run `selfplay critic train` first")
    c = cfg.critic
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise checkpoint.CheckpointError(f"no complete critic checkpoint in {directory.absolute()}")
        meta = ckpt.restore_meta(step)  # meta first: a shape mismatch gets a clear message, not orbax's
        saved = meta.get("critic", {})
        mismatch = [
            f"critic.{k}: saved {saved.get(k)!r}, config {v!r}"
            for k, v in (("model", to_dict(c.model)), ("ensemble_size", c.ensemble_size))
            if saved.get(k) != v
        ]
        if mismatch:
            raise checkpoint.CheckpointError(f"the critic in {directory} was saved with other shapes: " + "; ".join(mismatch))
        target = abstract_state(c)
        if layout is not None:
            target = sharding.with_shardings(target, layout.shardings(target))
        tree, meta = ckpt.restore(step, state_to_tree(target))
    critic = critic_from_state(cfg, tokenizer, tree_to_state(target, tree), world=world)
    critic.refreshes = int(meta.get("refreshes", 0))
    if critic.labeller is not None and meta.get("labeller"):
        critic.labeller.load_state_dict(meta["labeller"])
    pairs_path = directory / PAIRS_FILE
    if pairs_path.is_file() and pairs_path.stat().st_size:
        rows = read_jsonl(pairs_path, {"prompt": str, "chosen": str, "rejected": str, "heldout": bool})
        critic.pool.add([Pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows], [r["heldout"] for r in rows])
    return critic


# ----------------------------------------------------------------------------------------------
# Evaluation helpers
# ----------------------------------------------------------------------------------------------


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
