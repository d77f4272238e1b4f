"""The critic as the CLI and the loop hold it: model, state, pair pool and labeller in one handle, and what it does:
train on the pool, score texts and rollouts, measure pair accuracy, re-calibrate, refresh on the policy's own essays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console

from selfplay import sharding
from selfplay.config import (
    Config,
    ConfigError,
    CriticConfig,
    ModelConfig,
    UserError,
    check_critic_init,
)
from selfplay.critic.judge import Judge, JudgeHead, essay_features, fit_head
from selfplay.critic.labels import PairSource, collect_pairs, collection_rngs
from selfplay.critic.model import (
    NORM_EPS,
    CriticFns,
    CriticState,
    Normalizer,
    TokenLabels,
    combine_members,
    init_state,
    make_critic_fns,
    raw_rewards,
    reward_graphdef,
)
from selfplay.critic.pairs import Pair, PairPool, pad_to_bucket
from selfplay.critic.tamper import phrasing_words, synthetic_pairs
from selfplay.critic.tokens import RowLabels, pad_labels, pair_labels
from selfplay.data import fixed_chunks
from selfplay.tokenizer import Tokenizer
from selfplay.tracking import ProgressBar
from selfplay.types import Rollout, Scores
from selfplay.world import Labeller, World


@dataclasses.dataclass
class Critic:
    """A critic: config, tokenizer, graphdef (one member), its state, the pair pool, the labeller (world labels only)
    and the compiled functions (pinned to a mesh when built with a layout). Its functions below update `state`,
    `pool`, `labeller` and `refreshes`; nothing else assigns them."""

    cfg: Config
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    state: CriticState
    pool: PairPool
    fns: CriticFns
    labeller: Labeller | None = None
    refreshes: int = 0
    layout: sharding.Layout | None = None
    # The token heads' labels of pool pairs, by index, and the phrasing they were made with (see `_token_labels`).
    label_cache: dict[int, tuple[RowLabels, RowLabels]] = dataclasses.field(default_factory=dict)
    label_phrasing: frozenset[str] = frozenset()
    # critic.judge: the frozen policy that reads the essays (`attach_judge`), the fitted head and the phrasing its
    # features were made with (both saved with the critic), and the pool pairs' features by index.
    judge: Judge | None = None
    judge_head: JudgeHead | None = None
    judge_phrasing: frozenset[str] = frozenset()
    feature_cache: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    feature_phrasing: frozenset[str] = frozenset()

    @property
    def ccfg(self) -> CriticConfig:
        return self.cfg.critic

    @property
    def seed(self) -> int:
        return self.cfg.run.seed


def init_critic(
    cfg: Config,
    tokenizer: Tokenizer,
    *,
    world: World | None = None,
    policy_params: nnx.State | None = None,
    policy_model: ModelConfig | None = None,
    layout: sharding.Layout | None = None,
) -> Critic:
    """A fresh critic (trunk from scratch, or from `policy_params` with critic.init_from_policy) with an empty pool;
    with a world and critic.label_source=world, a labeller of budget critic.label_budget seeded by run.seed."""
    c = cfg.critic
    trunk = None
    if c.init_from_policy:
        if policy_params is None or policy_model is None:
            raise UserError("critic.init_from_policy=true needs the policy's params")
        check_critic_init(c, policy_model)
        trunk = policy_params
    return critic_from_state(cfg, tokenizer, init_state(c, cfg.run.seed, trunk), world=world, layout=layout)


def critic_from_state(
    cfg: Config, tokenizer: Tokenizer, state: CriticState, *, world: World | None = None, layout: sharding.Layout | None = None
) -> Critic:
    """A critic around `state` with an empty pool and, for world labels, a fresh labeller. With a `layout`, the state
    is placed on its mesh and the score and train steps are pinned to it."""
    c = cfg.critic
    if c.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"critic.model.vocab_size ({c.model.vocab_size}) is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    graphdef = reward_graphdef(c.model, c.token_heads)
    labeller = None
    if world is not None and c.label_source == "world":
        labeller = Labeller(world, c.label_budget, c.label_noise, seed=cfg.run.seed)
    pool = PairPool(tokenizer, c.seq_buckets[-1], c.heldout_fraction, cfg.run.seed)
    fns = make_critic_fns(graphdef, c, tokenizer.sep_id)
    if layout is not None:
        state = layout.place_state(state)
        fns = layout.critic_fns(fns, state, members=c.ensemble_size, rows=2 * c.batch_size)
    return Critic(cfg, tokenizer, graphdef, state, pool, fns, labeller, layout=layout)


def attach_judge(critic: Critic, policy: Any) -> None:
    """Give a critic.judge critic the frozen policy (a `selfplay.policy.Policy`: the run's SFT policy, its reference)
    that reads the essays; a critic without critic.judge is left as it is."""
    c = critic.ccfg
    if not c.judge:
        return
    if jax.process_count() > 1:
        raise UserError("critic.judge=true reads essays with the policy on each host; it runs in one process only")
    if c.seq_buckets[-1] > policy.cfg.model.max_seq_len:
        raise ConfigError(
            f"critic.judge reads rows of up to critic.seq_buckets max ({c.seq_buckets[-1]}) tokens with the policy, whose "
            f"model.max_seq_len is {policy.cfg.model.max_seq_len}"
        )
    critic.judge = Judge(policy.tokenizer, policy.graphdef, policy.params, tuple(c.seq_buckets), 2 * c.batch_size)


def _the_judge(critic: Critic) -> Judge:
    if critic.judge is None:
        raise UserError("critic.judge=true: this critic has no policy to read the essays with (attach_judge)")
    return critic.judge


def _head(critic: Critic, phi_nf: np.ndarray) -> np.ndarray:
    """The judge head's raw scores of features `phi_nf` (0 before the head is fitted), float32 [n]."""
    return (critic.judge_head or JudgeHead.zero())(phi_nf).astype(np.float32)


def judged_raw(critic: Critic, prompts: Sequence[str], essays: Sequence[str]) -> np.ndarray:
    """critic.judge: the head's raw score of each essay, float32 [n]."""
    return _head(critic, essay_features(_the_judge(critic), prompts, essays, critic.judge_phrasing))


def _judged_scores(critic: Critic, raw_b: np.ndarray) -> Scores:
    """Scores of judged raw scores: normalised by the critic's current statistics (critic.normalize)."""
    norm = jax.device_get(critic.state.norm)
    r = raw_b
    if critic.ccfg.normalize and float(norm.count) > 0:
        r = ((raw_b - np.float32(norm.mean)) / np.sqrt(np.float32(norm.var) + np.float32(NORM_EPS))).astype(np.float32)
    return Scores(r, raw_b[None, :])


def score_essays(critic: Critic, prompts: Sequence[str], essays: Sequence[str]) -> tuple[Scores, np.ndarray]:
    """`score_rollout` of a critic.judge critic, which reads text: (Scores, raw [n]); the batch is folded into the
    normaliser afterwards."""
    raw = judged_raw(critic, prompts, essays)
    scores = _judged_scores(critic, raw)
    critic.state = critic.fns.observe(critic.state, jnp.asarray(raw[None, :]))
    return scores, raw


def score_rollout(critic: Critic, rollout: Rollout, prompt_width: int) -> tuple[Scores, jax.Array]:
    """(Scores of every rollout row, the members' raw combination [B]); the scored batch is folded into the
    normaliser afterwards, so this batch is normalised by the statistics before it. (A critic.judge critic reads
    text: `score_essays`.)"""
    if critic.ccfg.judge:
        raise UserError("critic.judge=true scores decoded essays (score_essays), not token rollouts")
    scores = critic.fns.score(critic.state, rollout, prompt_width)
    critic.state = critic.fns.observe(critic.state, scores.members_kb)
    return scores, raw_rewards(critic.ccfg, scores)


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


def _token_labels(critic: Critic, idx: Sequence[int], width: int, phrasing: frozenset[str]) -> tuple[np.ndarray, ...]:
    """The token heads' labels of pool pairs `idx` as [chosen rows; rejected rows], padded to `width`, made with
    `phrasing` (`tamper.phrasing_words` of the whole pool's prompts): labels made with another are made again."""
    if phrasing != critic.label_phrasing:
        critic.label_cache, critic.label_phrasing = {}, phrasing
    for j in idx:
        if j not in critic.label_cache:
            critic.label_cache[j] = pair_labels(critic.tokenizer, critic.pool.pairs[j], critic.pool.kinds[j], critic.pool.max_len, phrasing)
    rows = [critic.label_cache[j][0] for j in idx] + [critic.label_cache[j][1] for j in idx]
    return pad_labels(rows, width)


def train(critic: Critic, steps: int, *, progress: bool = False, desc: str = "critic", console: Console | None = None) -> list[dict]:
    """`steps` training steps of every member on the pool's training pairs; returns a history of member-mean metrics
    (every 10 steps and the last). Raises UserError on a non-finite loss."""
    if steps <= 0:
        return []
    c = critic.ccfg
    train_idx = critic.pool.indices(heldout=False)
    if len(train_idx) == 0:
        raise UserError("the critic has no training pairs (all labelled pairs are held out or none were labelled)")
    if c.judge:
        return [fit_judge(critic, train_idx)]
    streams = _member_streams(critic, train_idx)
    pad_id = critic.tokenizer.pad_id
    phrasing = phrasing_words([p.prompt for p in critic.pool.pairs]) if c.token_heads else frozenset()
    history: list[dict] = []
    with ProgressBar(desc, steps, enabled=progress, console=console) as bar:
        for i in range(1, steps + 1):
            idx_kb = [next(s) for s in streams]
            rows = [critic.pool.ids[j][0] for idx in idx_kb for j in idx] + [critic.pool.ids[j][1] for idx in idx_kb for j in idx]
            tokens, lens = pad_to_bucket(rows, c.seq_buckets, pad_id)
            # rows are [all chosen; all rejected]; regroup as member k: [its chosen; its rejected]
            k, b = c.ensemble_size, c.batch_size
            tokens_knl = tokens.reshape(2, k, b, -1).transpose(1, 0, 2, 3).reshape(k, 2 * b, -1)
            len_kn = lens.reshape(2, k, b).transpose(1, 0, 2).reshape(k, 2 * b)
            labels = None
            if c.token_heads:
                flat = [j for idx in idx_kb for j in idx]
                labels = TokenLabels(*(a.reshape(2, k, b, -1).transpose(1, 0, 2, 3).reshape(k, 2 * b, -1)
                                       for a in _token_labels(critic, flat, tokens.shape[1], phrasing)))
            critic.state, metrics = critic.fns.train_step(critic.state, tokens_knl, len_kn, labels)
            status = None
            if i % 10 == 0 or i == steps:
                row = {"step": int(critic.state.step), **{n: float(np.mean(v)) for n, v in metrics.items()}}
                if not math.isfinite(row["loss"]):
                    raise UserError(f"critic training diverged at step {row['step']} (loss {row['loss']}); lower critic.lr")
                history.append(row)
                status = f"loss {row['loss']:.3f}  acc {row['accuracy']:.2f}"
                if c.token_heads:
                    status += f"  flag {row['flag_loss']:.3f}  cover {row['cover_loss']:.3f}"
            bar.update(1, status)
    return history


def pool_features(critic: Critic, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """critic.judge: the features of the pool pairs at `indices`, (chosen [n, F], rejected [n, F]), made with the
    critic's phrasing (cached by pair; made again when the phrasing changes)."""
    if critic.feature_phrasing != critic.judge_phrasing:
        critic.feature_cache, critic.feature_phrasing = {}, critic.judge_phrasing
    todo = [i for i in dict.fromkeys(indices) if i not in critic.feature_cache]
    if todo:
        pairs = [critic.pool.pairs[i] for i in todo]
        prompts = [p.prompt for p in pairs]
        judge = _the_judge(critic)
        phi_c = essay_features(judge, prompts, [p.chosen for p in pairs], critic.judge_phrasing)
        phi_r = essay_features(judge, prompts, [p.rejected for p in pairs], critic.judge_phrasing)
        for j, i in enumerate(todo):
            critic.feature_cache[i] = (phi_c[j], phi_r[j])
    return (np.array([critic.feature_cache[i][0] for i in indices]).reshape(len(indices), -1),
            np.array([critic.feature_cache[i][1] for i in indices]).reshape(len(indices), -1))


def fit_judge(critic: Critic, train_idx: Sequence[int]) -> dict:
    """Fit a critic.judge critic's head on the pool pairs `train_idx` (the phrasing made from the whole pool's
    prompts first); returns a history row like `train`'s (step: the critic's training steps, unchanged)."""
    critic.judge_phrasing = phrasing_words([p.prompt for p in critic.pool.pairs])
    phi_c, phi_r = pool_features(critic, train_idx)
    critic.judge_head = fit_head(phi_c, phi_r, critic.ccfg.judge_l2)
    gap = critic.judge_head(phi_c) - critic.judge_head(phi_r)
    loss = float(np.mean(np.logaddexp(0.0, -gap)))
    if not math.isfinite(loss):
        raise UserError(f"the critic's judge head diverged (loss {loss}); raise critic.judge_l2")
    return {"step": int(critic.state.step), "loss": loss, "accuracy": float(np.mean((gap > 0) + 0.5 * (gap == 0)))}


def score_texts(critic: Critic, prompts: Sequence[str], essays: Sequence[str]) -> Scores:
    """Scores (numpy) of `[bos] prompt [sep] essay [eos]` texts, in fixed chunks of 2 * batch_size rows."""
    if critic.ccfg.judge:
        return _judged_scores(critic, judged_raw(critic, prompts, essays))
    rows = [critic.pool.encode(p, e) for p, e in zip(prompts, essays, strict=True)]
    return _score_rows(critic, rows)


def _score_rows(critic: Critic, rows: Sequence[np.ndarray]) -> Scores:
    c = critic.ccfg
    chunk = 2 * c.batch_size
    rewards, members = [], []
    for _, part, real in fixed_chunks(rows, chunk):
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
    if critic.ccfg.judge:
        sc, sr = (_judged_scores(critic, _head(critic, phi)) for phi in pool_features(critic, indices))
    else:
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
    if not idx:
        return
    if critic.ccfg.judge:
        members = np.concatenate([_head(critic, phi) for phi in pool_features(critic, idx)])[None, :]
    else:
        members = _score_rows(critic, [critic.pool.ids[i][0] for i in idx] + [critic.pool.ids[i][1] for i in idx]).members_kb
    combined = np.asarray(combine_members(jnp.asarray(members), critic.ccfg.combine, critic.ccfg.uncertainty_coef))
    norm = Normalizer(jnp.float32(combined.mean()), jnp.float32(combined.var()), jnp.float32(1.0))
    critic.state = critic.state._replace(norm=norm)
    if critic.layout is not None:  # the new statistics were made on the host
        critic.state = critic.layout.place_state(critic.state)


def add_synthetic(critic: Critic, pairs: Sequence[Pair], tag: int) -> int:
    """Add round(critic.synthetic_per_label * len(pairs)) self-made pairs to the pool, tampered (critic.tamper_ops)
    from the essays of `pairs` (both sides), by a generator seeded by run.seed and the collection's `tag` -- so a
    resumed run makes the same ones. Returns how many were added."""
    c = critic.ccfg
    n = int(round(c.synthetic_per_label * len(pairs)))
    if n == 0:
        return 0
    texts = [(p.prompt, e) for p in pairs for e in (p.chosen, p.rejected)]
    made, kinds = synthetic_pairs(texts, n, c.tamper_ops, np.random.default_rng([critic.seed, 0x7A3F, tag]))
    critic.pool.add(made, kinds=kinds)
    return len(made)


def accuracy_by_kind(critic: Critic, heldout: bool = True) -> dict[str, float]:
    """Pair accuracy of the held-out (or training) pairs of each kind in the pool (LABELLED and each operator)."""
    out = {}
    for kind in dict.fromkeys(critic.pool.kinds):
        idx = critic.pool.indices(heldout, kind)
        if len(idx):
            out[kind] = pair_accuracy(critic, idx)["accuracy"]
    return out


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
    (default critic.refresh_budget; never more than the labeller has left) new pairs, add them and their self-made
    pairs (`add_synthetic`) to the pool (which keeps every earlier pair), train `steps` (default
    critic.refresh_steps) steps, re-calibrate the normaliser.

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
    synthetic = add_synthetic(critic, pairs, tag)
    history = train(critic, steps, progress=progress, desc="critic refresh") if len(critic.pool.indices(False)) else []
    calibrate_normalizer(critic)
    out = {
        "critic/new_pairs": float(len(pairs)),
        "critic/new_synthetic_pairs": float(synthetic),
        "critic/synthetic_pairs": float(critic.pool.synthetic),
        "critic/labels": float(stats["labels"]),
        "critic/skipped_identical": float(stats["skipped_identical"]),
        "critic/pool_size": float(len(critic.pool)),
        "critic/labels_used": float(critic.labeller.used if critic.labeller else 0),
    }
    if history:
        out["loss/critic"] = history[-1]["loss"]
        out["critic/train_accuracy"] = history[-1]["accuracy"]
    return out


