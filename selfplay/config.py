"""The typed config tree (model, actor, critic, learner, reward, world, pretrain, monitor, run, mesh; bench apart), its strict
loader (YAML files that may extend a `base:` file, plus dotted overrides) and every check of a config's values.

Unknown keys, wrong types, bad YAML and inconsistent values are `ConfigError`s naming the culprit (dotted key, expected
type, file and line). Over 400 lines by design: one place holds every check, each section's and those across sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class UserError(Exception):
    """An error caused by the user's input: the CLI prints it without a traceback and exits non-zero."""


class ConfigError(UserError):
    """A config file or override is wrong; the message names the dotted key or the file and line."""


# ----------------------------------------------------------------------------------------------
# The tree. Every field has a default so that a YAML file only states what differs.
# ----------------------------------------------------------------------------------------------


def _check_ranges(
    section: Any, prefix: str, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (), unit: tuple[str, ...] = ()
) -> None:
    """ConfigError naming the first field of `section` out of its range: > 0, >= 0, or in [0, 1]."""
    for name in positive:
        if not getattr(section, name) > 0:
            raise ConfigError(f"{prefix}.{name} must be > 0, got {getattr(section, name)}")
    for name in non_negative:
        if not getattr(section, name) >= 0:
            raise ConfigError(f"{prefix}.{name} must be >= 0, got {getattr(section, name)}")
    for name in unit:
        if not 0.0 <= getattr(section, name) <= 1.0:
            raise ConfigError(f"{prefix}.{name} must be in [0, 1], got {getattr(section, name)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""

    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 384
    max_seq_len: int = 384
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has biases on q, k, v
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def validate(self, prefix: str) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{prefix}.n_heads ({self.n_heads}) must be a multiple of {prefix}.n_kv_heads ({self.n_kv_heads})"
            )
        if not self.head_dim and self.d_model % self.n_heads:
            raise ConfigError(f"{prefix}.d_model ({self.d_model}) must be divisible by {prefix}.n_heads ({self.n_heads})")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"{prefix}.head_dim must be even for rotary embeddings, got {self.resolved_head_dim}")


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    """The sampler: how the policy writes essays."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False
    max_new_tokens: int = 128
    prompt_buckets: tuple[int, ...] = (64, 128)  # prompts are left-padded to the smallest bucket that fits
    too_long_prompt: Literal["error", "truncate"] = "error"  # truncate keeps the prompt's last tokens
    samples_per_prompt: int = 4  # G
    prompts_per_round: int = 16

    def validate(self, prefix: str) -> None:
        if self.temperature <= 0 and not self.greedy:
            raise ConfigError(f"{prefix}.temperature must be > 0 (or set {prefix}.greedy=true), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{prefix}.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"{prefix}.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"{prefix}.max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.prompt_buckets or list(self.prompt_buckets) != sorted(set(self.prompt_buckets)):
            raise ConfigError(f"{prefix}.prompt_buckets must be non-empty and strictly increasing, got {list(self.prompt_buckets)}")
        if self.samples_per_prompt < 1 or self.prompts_per_round < 1:
            raise ConfigError(f"{prefix}.samples_per_prompt and {prefix}.prompts_per_round must be >= 1")


@dataclasses.dataclass(frozen=True)
class FlawRates:
    """Probabilities that a simulated human writer makes each kind of mistake (the unit is in each comment)."""

    omit_fact: float = 0.15  # per asked fact: left out
    wrong_fact: float = 0.08  # per stated asked fact: a value that contradicts the sheet / fact base
    unsupported_fact: float = 0.25  # per grounded essay whose sheet leaves an attribute out: a true claim about it
    repeat_sentence: float = 0.15  # per essay: one sentence said twice
    off_topic: float = 0.1  # per essay: a true fact sentence about another entity
    no_conclusion: float = 0.15  # per essay: the conclusion is missing


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """The embedded essay world: fact base, prompts, human corpus, gold grader, labeller."""

    seed: int = 0  # seeds the fact base; also the default seed of World.corpus and `world sample`
    n_entities: int = 300  # dealt round-robin to the kinds (city, river, animal, inventor)
    corpus_size: int = 3000  # human essays used for SFT and the tokenizer
    grounded_fraction: float = 0.75  # share of prompts with a fact sheet; the rest are closed-book
    min_sheet_facts: int = 2
    max_sheet_facts: int = 5
    flaws: FlawRates = FlawRates()
    tokenizer_vocab_size: int = 1024

    def validate(self, prefix: str) -> None:
        if not 2 <= self.min_sheet_facts <= self.max_sheet_facts <= 5:
            raise ConfigError(
                f"{prefix}.min_sheet_facts/max_sheet_facts must satisfy 2 <= min <= max <= 5, "
                f"got {self.min_sheet_facts}, {self.max_sheet_facts}"
            )
        if not 0.0 <= self.grounded_fraction <= 1.0:
            raise ConfigError(f"{prefix}.grounded_fraction must be in [0, 1], got {self.grounded_fraction}")
        for f in dataclasses.fields(FlawRates):
            v = getattr(self.flaws, f.name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{prefix}.flaws.{f.name} must be a probability in [0, 1], got {v}")
        if self.n_entities < 8:
            raise ConfigError(f"{prefix}.n_entities must be >= 8, got {self.n_entities}")
        if self.seed < 0:
            raise ConfigError(f"{prefix}.seed must be >= 0, got {self.seed}")
        if self.corpus_size < 1:
            raise ConfigError(f"{prefix}.corpus_size must be >= 1, got {self.corpus_size}")
        if self.tokenizer_vocab_size < 260:
            raise ConfigError(f"{prefix}.tokenizer_vocab_size must be >= 260 (256 bytes + 4 special tokens), got {self.tokenizer_vocab_size}")


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    """The arithmetic task (run.task=arithmetic, selfplay.tasks.arithmetic): seeded sums and products, worked examples."""

    seed: int = 0  # seeds the held-out problems, the training prompts and the corpus
    corpus_size: int = 2000  # worked examples for SFT and the tokenizer
    slip_rate: float = 0.3  # share of worked examples with a slip (+-1 or +-10) in the first value computed
    tokenizer_vocab_size: int = 320

    def validate(self, prefix: str) -> None:
        _check_ranges(self, prefix, positive=("corpus_size",), non_negative=("seed",), unit=("slip_rate",))
        if self.tokenizer_vocab_size < 260:
            raise ConfigError(f"{prefix}.tokenizer_vocab_size must be >= 260 (256 bytes + 4 special tokens), got {self.tokenizer_vocab_size}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Supervised next-token training of the initial (SFT) policy on the human corpus."""

    steps: int = 600
    seq_len: int = 256  # examples are packed end to end into rows of this many tokens
    batch_size: int = 16  # rows per step
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_every: int = 100
    # Held-out gold along the way (the essay world): every gold_every steps and at the end, the policy writes two
    # essays for each of the table's run.eval_prompts held-out prompts (same draws and seeds as the table's SFT column)
    # and the gold grader scores them: sft/gold/* in TensorBoard, "heldout_gold" rows in sft_report.json. 0: only at
    # the end.
    gold_every: int = 250
    heldout_fraction: float = 0.05
    sample_essays: int = 32  # essays sampled and graded at the end

    def validate(self, prefix: str) -> None:
        _check_ranges(self, prefix, positive=("steps", "seq_len", "batch_size", "lr", "max_grad_norm", "eval_every"),
                      non_negative=("warmup_steps", "weight_decay", "sample_essays", "gold_every"), unit=("min_lr_ratio",))
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"{prefix}.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.gold_every % 10:
            raise ConfigError(f"{prefix}.gold_every must be a multiple of 10 (the steps the history keeps), got {self.gold_every}")


# The tampering operators of `selfplay.critic.tamper` (self-made negatives), named here so a config can list them.
TamperKind = Literal["swap_value", "duplicate", "drop_last", "splice"]


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """The learned reward model (Bradley-Terry on a transformer trunk), optionally an ensemble."""

    # Small on purpose: the default job trains it from scratch on ~2000 pairs in about a minute of CPU.
    model: ModelConfig = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192)
    init_from_policy: bool = False  # start the trunk from the policy's params (needs critic.model shaped like model)
    ensemble_size: int = 1
    combine: Literal["mean", "min", "mean_minus_std"] = "mean"
    uncertainty_coef: float = 1.0  # lambda in mean - lambda * std
    bootstrap: bool = False  # each member trains on its own resample (with replacement) of the training pairs
    label_source: Literal["world", "discriminator", "file"] = "world"  # file: `critic train --pairs FILE.jsonl`
    # Labels for the whole run: the initial critic spends `initial_labels`, each refresh `refresh_budget`.
    label_budget: int = 2000
    # Labels `critic train` spends. 0: all of label_budget but the refreshes' reserve, refresh_budget * (run.rounds //
    # refresh_every) -- which ties the initial critic to run.rounds, so such a run refuses a run.rounds change on
    # resume. Set it to extend a run later: then run.rounds (and label_budget) may change on resume.
    initial_labels: int = 0
    label_noise: float = 0.0
    heldout_fraction: float = 0.1  # share of the labelled pairs kept out of training, for accuracy
    margin: float = 0.0
    centering_coef: float = 0.0  # weight of mean((r_chosen + r_rejected)^2), which pins rewards near 0
    lr: float = 1e-3
    weight_decay: float = 0.1  # a from-scratch model memorises a few thousand pairs quickly
    max_grad_norm: float = 1.0
    steps: int = 120
    batch_size: int = 32  # pairs per step (and prompts per sampling call while collecting pairs)
    # A batch is right-padded to the smallest that fits; batches group pairs of similar length, so more buckets pad
    # less (each costs one compilation).
    seq_buckets: tuple[int, ...] = (128, 160, 192, 256, 384)
    eval_samples: int = 128  # fresh policy essays scored against the gold grader (Spearman)
    norm_momentum: float = 0.99  # EMA of the reward normaliser over scored batches
    # Rounds; 0: never. Only in the essay world and not with label_source=file (`critic_refreshes`); with
    # reward.critic_weight 0 the refreshes alone train the critic (from untrained), whose score is then only logged.
    refresh_every: int = 0
    refresh_budget: int = 64
    refresh_steps: int = 20
    normalize: bool = True
    # Self-made negatives (selfplay.critic.tamper): for every labelled pair a collection brings, this many synthetic
    # pairs -- one of its essays beats a tampered copy of itself -- join the pool. They cost no label and are counted
    # apart (critic/synthetic_pairs; held-out accuracy per kind); the held-out accuracy the reports lead with is the
    # labelled pairs' only.
    synthetic_per_label: float = 0.0
    # Operators drawn uniformly. On the policy's own essays only swap_value makes a reliable negative (gold prefers the
    # original in 85 % of pairs, the copy in 0.5 %); the sentence operators remove or replace a wrong sentence as often
    # as a right one (gold prefers the tampered copy in 12-27 % of pairs), though on flawless essays all four are worse.
    tamper_ops: tuple[TamperKind, ...] = ("swap_value",)
    # Token heads (selfplay.critic.model): per-token `flag` (tampered) and `cover` (states a prompt's value) read-outs
    # whose counts join the reward with learned weights; trained on free token labels (selfplay.critic.tokens) with
    # weight token_loss_coef next to the Bradley-Terry loss. Flag labels come from self-made pairs only.
    token_heads: bool = False
    token_loss_coef: float = 1.0
    # The self-judging critic (selfplay.critic.judge): the reward is a Bradley-Terry model over the frozen SFT policy's
    # log-probs of the essay and the essay's restated prompt values and repeats, fitted on the pool's training pairs
    # (judge_l2: its L2 weight). The transformer reward model is then neither trained nor read (critic.model sizes
    # only its unused checkpoint). Needs ensemble_size 1 and no token heads.
    judge: bool = False
    judge_l2: float = 1.0

    def validate(self, prefix: str) -> None:
        self.model.validate(prefix + ".model")
        if self.ensemble_size < 1:
            raise ConfigError(f"{prefix}.ensemble_size must be >= 1, got {self.ensemble_size}")
        if not 0.0 <= self.label_noise <= 0.5:
            raise ConfigError(f"{prefix}.label_noise must be in [0, 0.5], got {self.label_noise}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"{prefix}.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        for name in ("label_budget", "initial_labels", "steps", "refresh_every", "refresh_budget", "refresh_steps", "eval_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size must be >= 1, got {self.batch_size}")
        _check_ranges(self, prefix, positive=("lr", "max_grad_norm"), non_negative=("weight_decay", "margin", "centering_coef"))
        if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)) or self.seq_buckets[0] < 2:
            raise ConfigError(f"{prefix}.seq_buckets must be non-empty, strictly increasing and >= 2, got {list(self.seq_buckets)}")
        if self.seq_buckets[-1] > self.model.max_seq_len:
            raise ConfigError(
                f"{prefix}.seq_buckets max ({self.seq_buckets[-1]}) exceeds {prefix}.model.max_seq_len ({self.model.max_seq_len})"
            )
        if not 0.0 <= self.norm_momentum < 1.0:
            raise ConfigError(f"{prefix}.norm_momentum must be in [0, 1), got {self.norm_momentum}")
        if self.uncertainty_coef < 0:
            raise ConfigError(f"{prefix}.uncertainty_coef must be >= 0, got {self.uncertainty_coef}")
        if self.synthetic_per_label < 0:
            raise ConfigError(f"{prefix}.synthetic_per_label must be >= 0, got {self.synthetic_per_label}")
        if self.token_loss_coef < 0:
            raise ConfigError(f"{prefix}.token_loss_coef must be >= 0, got {self.token_loss_coef}")
        if self.judge_l2 <= 0:
            raise ConfigError(f"{prefix}.judge_l2 must be > 0, got {self.judge_l2}")
        if self.judge and (self.ensemble_size != 1 or self.token_heads or self.init_from_policy):
            raise ConfigError(
                f"{prefix}.judge=true is one Bradley-Terry head over the judge's features: it takes no ensemble "
                f"(ensemble_size {self.ensemble_size}), no token heads ({self.token_heads}) and no trunk "
                f"(init_from_policy {self.init_from_policy})"
            )
        if self.synthetic_per_label > 0 and not self.tamper_ops:
            raise ConfigError(f"{prefix}.tamper_ops is empty but {prefix}.synthetic_per_label is {self.synthetic_per_label}; name an operator")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """The policy-gradient learner (GRPO, RLOO, REINFORCE++, PPO) and its optax chain."""

    # expert_iteration (ReST, RAFT, rejection-sampling fine-tuning): keep the ei_keep best-rewarded completions of each
    # prompt's group and fit them by likelihood (the NLL of the kept completions; KL and the pretraining-data term as
    # for grpo). A filtered-reward policy gradient: no baseline, no ratio, no clipping.
    algorithm: Literal["grpo", "rloo", "reinforce_pp", "ppo", "expert_iteration"] = "grpo"
    ei_keep: int = 1  # expert_iteration: completions kept per prompt (1 .. actor.samples_per_prompt - 1)
    # Train the distribution that was sampled: the training forward (policy, pi_old, reference, the human examples'
    # NLL) divides the logits by actor.temperature, as TRL, verl and OpenRLHF do. False: the plain temperature-1 policy.
    temperature_in_loss: bool = False
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    epochs: int = 1
    minibatches: int = 1
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    loss_agg: Literal["seq_mean", "token_mean", "constant"] = "seq_mean"
    loss_agg_constant: float = 0.0  # Dr. GRPO's normaliser for loss_agg=constant; 0: the loss arrays' token width T
    std_normalize: bool = True  # GRPO's division by the group std (Dr. GRPO: false)
    std_ddof: int = 0  # GRPO's group std divides by G - std_ddof: 0 population std (ours), 1 sample std (TRL, Tunix)
    kl_coef: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # ppo's token reward is k1 by definition
    kl_in_reward: bool = False  # grpo/rloo: subtract beta * sum_t KL_t from the reward instead of a loss term
    # (ppo and reinforce_pp always fold KL into the reward)
    adaptive_kl: bool = False
    kl_target: float = 0.1  # adaptive_kl aims the learner's `kl` metric here: per-token mean KL(pi || pi_ref), nats
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    # The pretraining-data term (InstructGPT's "PPO-ptx"): + ptx_coef * mean token NLL of ptx_batch human examples
    # per update step, so the policy keeps the human distribution while it chases the reward. The examples: the
    # world's human corpus, or run.ptx_file. 0: off.
    ptx_coef: float = 0.0
    ptx_batch: int = 16  # human examples per update step, split over learner.minibatches
    token_credit_coef: float = 0.5  # weight of run.token_credit's per-token credit in the advantages (when it is on)
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    vf_coef: float = 0.5
    adv_eps: float = 1e-6

    def validate(self, prefix: str) -> None:
        for name in ("epochs", "minibatches", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name} must be >= 1, got {getattr(self, name)}")
        _check_ranges(self, prefix, positive=("lr", "adv_eps", "value_clip"),
                      non_negative=("warmup_steps", "weight_decay", "clip_eps_low", "clip_eps_high", "loss_agg_constant",
                                    "kl_coef", "entropy_coef", "vf_coef", "token_credit_coef"),
                      unit=("gamma", "lam"))
        if self.max_grad_norm <= 0:
            raise ConfigError(f"{prefix}.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.std_ddof not in (0, 1):
            raise ConfigError(f"{prefix}.std_ddof must be 0 (population std) or 1 (sample std, as TRL and Tunix), got {self.std_ddof}")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0):
            raise ConfigError(f"{prefix}.kl_target and {prefix}.kl_horizon must be > 0 with {prefix}.adaptive_kl")
        if self.ptx_coef < 0:
            raise ConfigError(f"{prefix}.ptx_coef must be >= 0, got {self.ptx_coef}")
        if self.ptx_coef > 0 and (self.ptx_batch < 1 or self.ptx_batch % self.minibatches):
            raise ConfigError(
                f"{prefix}.ptx_batch ({self.ptx_batch}) must be a positive multiple of {prefix}.minibatches ({self.minibatches})"
            )


# "package.module:function" (dotted module path, a colon, then the attribute: TRL users' own reward functions)
REWARD_FN_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """What the learner maximises: critic_weight x the critic's (normalised) score + sum_i weights[i] x fns[i]'s reward.

    Each of `fns` is "package.module:function", importable where the run starts, with TRL's signature
    `fn(prompts, completions, **columns) -> list[float | None]`: prompts and completions are the batch's texts (a
    conversational prompt rendered with the chat template, as the policy saw it), columns the prompts file's other
    keys as lists aligned with them. None means "does not apply": left out of that function's mean, 0 in the sum.
    Imports are checked before any work (selfplay.rewards). With run.reward_source=gold the gold grader takes the
    critic's place in the sum. With fns or critic_weight != 1, `reward/mean` and `reward/std` report the total (TRL's
    `reward`), `reward/critic_mean` and `/std` the critic's score, `rewards/<fn name>/mean` and `/std` each function's.

    critic_weight 0 without critic refreshes (`uses_critic`): the run has no critic at all -- none is built, checked
    against the tokenizer, trained, scored, logged or checkpointed. critic_weight 0 with refreshes
    (critic.refresh_every > 0 in the essay world): the refreshes train one from untrained and its score is logged (the
    `reward/critic_*`, `reward/raw_mean` and `critic/*` figures), never rewarded.
    """

    critic_weight: float = 1.0  # 0: the critic's score does not enter the reward (see `uses_critic`)
    fns: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # one per fn; empty: 1.0 each

    def validate(self, prefix: str) -> None:
        if self.critic_weight < 0:
            raise ConfigError(f"{prefix}.critic_weight must be >= 0, got {self.critic_weight}")
        for i, ref in enumerate(self.fns):
            if not REWARD_FN_PATTERN.match(ref):
                raise ConfigError(f"{prefix}.fns[{i}]: expected 'package.module:function', got {ref!r}")
        if self.weights and len(self.weights) != len(self.fns):
            raise ConfigError(
                f"{prefix}.weights has {len(self.weights)} entries for {len(self.fns)} {prefix}.fns (give one per fn, or none for 1.0 each)"
            )

    @property
    def resolved_weights(self) -> tuple[float, ...]:
        return self.weights or (1.0,) * len(self.fns)


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """Alarms for over-optimisation (proxy up, gold down), KL growth and diversity collapse."""

    window: int = 8  # rounds over which reward and gold trends are compared
    min_change: float = 0.02  # both trends must move at least this much over the window
    kl_max: float = 0.0  # alarm when KL to the reference exceeds this; 0: off
    collapse_fraction: float = 0.8  # alarm when distinct-2 falls below this fraction of the SFT policy's
    stop_on_alarm: bool = False  # stop the run (after a checkpoint) when any alarm fires

    def validate(self, prefix: str) -> None:
        if self.window < 2:
            raise ConfigError(f"{prefix}.window must be >= 2, got {self.window}")
        if not 0.0 <= self.collapse_fraction <= 1.0:
            raise ConfigError(f"{prefix}.collapse_fraction must be in [0, 1], got {self.collapse_fraction}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run: seed, rounds and how often to log, refresh and checkpoint."""

    seed: int = 0
    # What the run trains on: the essay world (its prompts, or prompts_file's), or the arithmetic task (section
    # `arithmetic`; configs/arithmetic.yaml) whose prompts, held-out problems and SFT corpus come from the package.
    task: Literal["essays", "arithmetic"] = "essays"
    rounds: int = 40
    log_every: int = 1
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    eval_prompts: int = 64  # held-out prompts of the final SFT-vs-trained table (two essays each)
    train_prompts: int = 4096  # size of the world's training-prompt pool the rounds cycle through
    # JSONL of {"prompt": "..."} or TRL's conversational {"prompt": [{"role": ..., "content": ...}, ...]} (rendered with
    # RUN_DIR/tokenizer_config.json's chat_template): train on these instead of the world's prompts (no gold grader).
    # A line's other keys (e.g. "answer") reach the reward.fns as columns.
    prompts_file: str = ""
    pairs_file: str = ""  # JSONL preference pairs for the initial critic (with critic.label_source=file)
    # gold: train on the gold grader itself (an ablation). none: the control arm -- every reward is 0, so GRPO/RLOO
    # advantages are 0 and the update is the KL and pretraining-data (learner.ptx_coef) terms alone, on the same
    # rollouts, prompts, human examples and number of updates as the other arms: what "more SFT" does without a reward.
    reward_source: Literal["critic", "gold", "none"] = "critic"
    # Fine-Grained RLHF's dense credit, added to each token's advantage: learner.token_credit_coef x the credit of the span
    # holding the token, from the gold grader's verdict on each sentence (selfplay.world.grader.SENTENCE_CREDIT: +1 a
    # correct asked fact, -1 a hallucinated, repeated, unparsed or off-topic sentence, 0 else). gold_sentence: the whole
    # sentence earns it; gold_value: a claim's stated value alone (grader.credit_spans). With reward_source=gold only.
    token_credit: Literal["none", "gold_sentence", "gold_value"] = "none"
    # With token_credit: the credit of leaving an asked fact out, which no sentence holds. On a grounded prompt (the
    # sheet is in the prompt, so an omission is a choice) an essay that closes with an on-topic sentence while asked
    # facts are still unstated has that closing sentence credited -omission_credit per unstated fact: the decision to
    # stop (grader.omission_spans). 0: off.
    omission_credit: float = 0.0
    ptx_file: str = ""  # JSONL of {"prompt": ..., "completion": ...}: the human examples of learner.ptx_coef (default: the world's corpus)

    def validate(self, prefix: str) -> None:
        for name in ("rounds", "log_every", "checkpoint_every", "keep_checkpoints", "eval_prompts", "train_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"{prefix}.seed must be >= 0, got {self.seed}")
        if self.omission_credit < 0 or (self.omission_credit > 0 and self.token_credit == "none"):
            raise ConfigError(
                f"{prefix}.omission_credit ({self.omission_credit}) must be >= 0, and > 0 only with {prefix}.token_credit"
            )


ARM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclasses.dataclass(frozen=True)
class ArmConfig:
    """One arm of the collapse lab: what generation n+1 trains on, given what generation n wrote.

    data: replace (only generation n's essays, as many as the human corpus), accumulate (the human corpus plus every
    generation's essays so far), mix (human_fraction of the set drawn from the human corpus, the rest generation n's),
    graded (generation n writes best_of essays per prompt and the grader, critic or gold, keeps the best one)."""

    name: str = "replace"  # the arm's directory and TensorBoard run: lower-case letters, digits, - and _
    data: Literal["replace", "accumulate", "mix", "graded"] = "replace"
    temperature: float = 1.0  # sampling temperature of the essays generation n writes for generation n+1
    human_fraction: float = 0.5  # mix only
    grader: Literal["critic", "gold"] = "critic"  # graded only: the learned critic (trained once, on generation 0) or gold
    best_of: int = 2  # graded only: essays written per prompt; the grader keeps the best one

    def validate(self, prefix: str) -> None:
        if not ARM_NAME_RE.fullmatch(self.name):
            raise ConfigError(f"{prefix}.name must be lower-case letters, digits, '-' and '_' (a directory name), got {self.name!r}")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.human_fraction <= 1.0:
            raise ConfigError(f"{prefix}.human_fraction must be in [0, 1], got {self.human_fraction}")
        if self.best_of < 2 and self.data == "graded":
            raise ConfigError(f"{prefix}.best_of must be >= 2 for a graded arm (one essay per prompt leaves nothing to grade), got {self.best_of}")


DEFAULT_ARMS = (
    ArmConfig("replace", "replace"),
    ArmConfig("accumulate", "accumulate"),
    ArmConfig("graded-critic", "graded", grader="critic"),
    ArmConfig("graded-gold", "graded", grader="gold"),
)


@dataclasses.dataclass(frozen=True)
class CollapseConfig:
    """The model-collapse lab (`selfplay collapse`): generation 0 is the SFT policy (section pretrain, on the human
    corpus); generation n+1 is a model of the same shape trained for pretrain.steps on a training set each arm builds
    from what generation n wrote. Every generation is judged on the same held-out human essays and prompts."""

    generations: int = 5  # generations after generation 0
    arms: tuple[ArmConfig, ...] = DEFAULT_ARMS
    # continue: generation n+1 starts from generation n's params (fine-tuning, as Shumailov et al. fine-tune); fresh: a
    # new initialisation per generation (as Gerstgrasser et al.), which needs steps enough to train a model from scratch
    init: Literal["fresh", "continue"] = "continue"
    steps: int = 0  # training steps of each generation after 0; 0: pretrain.steps
    lr: float = 0.0  # their peak learning rate (warm-up, cosine decay as pretrain); 0: pretrain.lr
    synthetic_size: int = 0  # essays generation n writes per arm (graded: prompts); 0: world.corpus_size
    heldout_essays: int = 256  # held-out human essays (a corpus seed of their own) for the cross-entropy
    eval_prompts: int = 128  # held-out prompts: one essay each, at actor.temperature, for gold, diversity and the tail
    tail_mass: float = 0.1  # the tail: the rarest templates (and values) that make up this share of the human corpus's
    sample_batch: int = 64  # prompts per sampler call

    def validate(self, prefix: str) -> None:
        _check_ranges(self, prefix, positive=("generations", "heldout_essays", "eval_prompts", "sample_batch"),
                      non_negative=("synthetic_size", "steps", "lr"))
        if not 0.0 < self.tail_mass < 1.0:
            raise ConfigError(f"{prefix}.tail_mass must be in (0, 1), got {self.tail_mass}")
        if not self.arms:
            raise ConfigError(f"{prefix}.arms must name at least one arm")
        names = [a.name for a in self.arms]
        for i, arm in enumerate(self.arms):
            arm.validate(f"{prefix}.arms[{i}]")
            if names.index(arm.name) != i:
                raise ConfigError(f"{prefix}.arms[{i}].name: {arm.name!r} is also the name of {prefix}.arms[{names.index(arm.name)}]")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Throughput benchmarks (`selfplay bench`): timing and the actor's sweep. Shapes come from the other sections:
    model, critic.model, actor (prompts_per_round x samples_per_prompt, max_new_tokens, prompt_buckets), learner."""

    warmup: int = 1  # untimed calls after the first (compiling) one
    iterations: int = 5  # timed calls; figures are their median, with min/max and quartiles
    batches: tuple[int, ...] = ()  # actor sweep: sequences per sampler call; empty: prompts_per_round x samples_per_prompt
    new_tokens: tuple[int, ...] = ()  # actor sweep: tokens written per sequence; empty: actor.max_new_tokens
    prompt_len: int = 0  # tokens in each synthetic prompt; 0: the smallest of actor.prompt_buckets
    eos_id: int = -1  # -1: no token ends a row, so every row writes exactly its new-token count
    baseline: bool = True  # actor: also time the no-KV-cache baseline (the whole prefix recomputed for every token)
    baseline_max_gflop: float = 5000.0  # skip the baseline where one call would cost more than this
    baseline_iterations: int = 2  # timed baseline calls, right after its compiling call (it is slow; its spread is small)
    matmul_size: int = 2048  # n of the n x n @ n x n matmul that probes the peak FLOP/s, in model.compute_dtype
    bandwidth_mib: int = 256  # size of the float32 array scaled in place (read and written) to probe memory bandwidth

    def validate(self, prefix: str) -> None:
        if self.warmup < 0 or self.iterations < 1 or self.baseline_iterations < 1:
            raise ConfigError(
                f"{prefix}.warmup must be >= 0, {prefix}.iterations and {prefix}.baseline_iterations >= 1, "
                f"got {self.warmup}, {self.iterations}, {self.baseline_iterations}"
            )
        for name in ("batches", "new_tokens"):
            if any(v < 1 for v in getattr(self, name)):
                raise ConfigError(f"{prefix}.{name} must hold positive counts, got {list(getattr(self, name))}")
        if self.prompt_len < 0 or self.eos_id < -1:
            raise ConfigError(f"{prefix}.prompt_len must be >= 0 and {prefix}.eos_id >= -1, got {self.prompt_len}, {self.eos_id}")
        if self.matmul_size < 1 or self.bandwidth_mib < 1 or self.baseline_max_gflop < 0:
            raise ConfigError(f"{prefix}.matmul_size and {prefix}.bandwidth_mib must be positive, {prefix}.baseline_max_gflop >= 0")


MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (None: replicated; a list: the dimension is split over several mesh axes).
# Its names are every logical name a parameter or batch may carry (see selfplay.models.transformer).
DEFAULT_MESH_RULES: tuple[tuple[str | None | tuple[str, ...], ...], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("ensemble", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data x fsdp x tensor; -1: all remaining devices), the logical-axis -> mesh-axis rules, and how
    a multi-host run finds its peers (see selfplay.sharding.initialize_distributed)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # [logical, mesh axis | null | [mesh axes]] pairs; a pair overrides that logical name's default (DEFAULT_MESH_RULES),
    # names not listed keep theirs.
    rules: tuple[tuple[str | None | tuple[str, ...], ...], ...] = DEFAULT_MESH_RULES
    # Multi-host. Unset fields fall back to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID, then to
    # jax's cluster auto-detection (TPU pods, SLURM, Open MPI). One process needs none of them.
    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0  # 0: from the environment
    process_id: int = -1  # -1: from the environment
    multihost: bool = False  # start jax.distributed even with nothing above set (auto-detection on TPU pods)

    def validate(self, prefix: str) -> None:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"{prefix}.{name} must be a positive device count or -1 (all remaining devices), got {size}")
        if sum(size == -1 for size in sizes.values()) > 1:
            auto = [f"{prefix}.{n}" for n, s in sizes.items() if s == -1]
            raise ConfigError(f"only one mesh axis may be -1 (all remaining devices), got {' and '.join(auto)}")
        known = [name for name, _ in DEFAULT_MESH_RULES]
        for i, rule in enumerate(self.rules):
            key = f"{prefix}.rules[{i}]"
            if len(rule) != 2 or not isinstance(rule[0], str):
                raise ConfigError(f"{key}: expected a [logical axis, mesh axis or null or list of mesh axes] pair, got {list(rule)}")
            logical, target = rule
            if logical not in known:
                close = difflib.get_close_matches(logical, known, n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{key}: unknown logical axis '{logical}'{hint} (known: {', '.join(known)})")
            axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
            for axis in axes:
                if axis not in MESH_AXES:
                    raise ConfigError(f"{key}: '{logical}' maps to unknown mesh axis '{axis}' (mesh axes: {', '.join(MESH_AXES)})")
            if len(set(axes)) != len(axes):
                raise ConfigError(f"{key}: '{logical}' names a mesh axis twice: {list(axes)}")
        if self.num_processes < 0:
            raise ConfigError(f"{prefix}.num_processes must be >= 0 (0: from the environment), got {self.num_processes}")
        if self.process_id < -1 or (self.num_processes and self.process_id >= self.num_processes):
            raise ConfigError(
                f"{prefix}.process_id must be -1 (from the environment) or in [0, {prefix}.num_processes), got {self.process_id}"
            )


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    actor: ActorConfig = ActorConfig()
    critic: CriticConfig = CriticConfig()
    learner: LearnerConfig = LearnerConfig()
    reward: RewardConfig = RewardConfig()
    world: WorldConfig = WorldConfig()
    arithmetic: ArithmeticConfig = ArithmeticConfig()
    pretrain: PretrainConfig = PretrainConfig()
    monitor: MonitorConfig = MonitorConfig()
    run: RunConfig = RunConfig()
    mesh: MeshConfig = MeshConfig()
    collapse: CollapseConfig = CollapseConfig()

    def validate(self) -> "Config":
        """Every section's own checks, then the checks across sections; returns self (also after dataclasses.replace)."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        check_actor_fits_model(self.actor, self.model)
        check_critic_init(self.critic, self.model)
        if uses_critic(self):  # the critic's labels matter only to a run that has one
            check_label_reserve(self)
        check_batch_minibatches(self.actor, self.learner)
        check_group_std(self.actor, self.learner)
        check_expert_iteration(self.actor, self.learner)
        check_something_rewards(self)
        check_reward_source(self.run)
        check_control_arm(self.run, self.reward, self.learner)
        check_ptx_source(self.learner, self.run)
        return self


# ----------------------------------------------------------------------------------------------
# Checks across sections: Config.validate runs them all; a factory given sections directly calls its own.
# ----------------------------------------------------------------------------------------------


def check_actor_fits_model(actor: ActorConfig, model: ModelConfig) -> None:
    """The longest prompt bucket plus the tokens the actor writes must fit the model's context."""
    if max(actor.prompt_buckets) + actor.max_new_tokens > model.max_seq_len:
        raise ConfigError(
            f"actor.prompt_buckets max ({max(actor.prompt_buckets)}) + actor.max_new_tokens ({actor.max_new_tokens}) "
            f"exceeds model.max_seq_len ({model.max_seq_len})"
        )


# The fields that fix a trunk's parameter shapes and dtype: critic.init_from_policy needs them equal.
CRITIC_INIT_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "resolved_head_dim", "d_ff",
                            "tie_embeddings", "attention_bias", "param_dtype")


def check_critic_init(critic: CriticConfig, model: ModelConfig) -> None:
    """critic.init_from_policy needs the trunk shaped exactly like the policy (`model`); the error lists every difference."""
    if not critic.init_from_policy:
        return
    diff = [
        f"critic.model.{f}={getattr(critic.model, f)!r} vs model.{f}={getattr(model, f)!r}"
        for f in CRITIC_INIT_SHAPE_FIELDS
        if getattr(critic.model, f) != getattr(model, f)
    ]
    if diff:
        raise ConfigError(
            "critic.init_from_policy=true needs critic.model shaped like the policy's model: " + "; ".join(diff)
            + " (copy the policy's model section into critic.model, or set critic.init_from_policy=false)"
        )


def critic_refreshes(cfg: Config) -> bool:
    """The rounds retrain the critic every critic.refresh_every rounds: only in a run the critic rewards
    (run.reward_source=critic) and only where new pairs can be labelled, in the essay world (its labeller, or its human
    essays as the discriminator's winners), never with label_source=file."""
    c = cfg.critic
    return (cfg.run.reward_source == "critic" and c.refresh_every > 0 and cfg.run.task == "essays" and not cfg.run.prompts_file
            and c.label_source != "file")


def uses_critic(cfg: Config) -> bool:
    """The run has a critic: the critic rewards (run.reward_source=critic) and its score enters the reward
    (reward.critic_weight > 0) or refreshes train it. Without one nothing about a critic is built, checked, trained,
    scored, logged or checkpointed: the gold-reward and control arms (run.reward_source=gold or none) have none."""
    return (cfg.run.reward_source == "critic" and cfg.reward.critic_weight > 0) or critic_refreshes(cfg)


def label_reserve(cfg: Config) -> int:
    """Labels kept back for the critic refreshes of the whole run: critic.refresh_budget x (run.rounds //
    critic.refresh_every), 0 without refreshes."""
    c = cfg.critic
    return c.refresh_budget * (cfg.run.rounds // c.refresh_every) if c.refresh_every else 0


def initial_label_count(cfg: Config) -> int:
    """Labels `critic train` spends: critic.initial_labels, or (0) critic.label_budget minus the refreshes' reserve."""
    c = cfg.critic
    return c.initial_labels or c.label_budget - label_reserve(cfg)


def check_label_reserve(cfg: Config) -> None:
    """The initial training and the refreshes' reserve must fit critic.label_budget, leaving the initial training
    some labels (whatever critic.label_source)."""
    c, reserve = cfg.critic, label_reserve(cfg)
    how = (f"critic.refresh_budget {c.refresh_budget} x run.rounds {cfg.run.rounds} // critic.refresh_every "
           f"{c.refresh_every} = {reserve}")
    if c.initial_labels and c.initial_labels + reserve > c.label_budget:
        raise ConfigError(
            f"critic.label_budget ({c.label_budget}) is smaller than critic.initial_labels ({c.initial_labels}) plus the "
            f"refreshes' reserve ({how}): raise critic.label_budget"
        )
    if reserve and reserve >= c.label_budget:
        raise ConfigError(
            f"critic.label_budget ({c.label_budget}) leaves nothing for the initial training after the refreshes' reserve ({how})"
        )


def check_batch_minibatches(actor: ActorConfig, learner: LearnerConfig) -> None:
    """A round's rows (prompts x samples) split evenly into the learner's minibatches."""
    rows = actor.prompts_per_round * actor.samples_per_prompt
    if rows % learner.minibatches:
        raise ConfigError(
            f"actor.prompts_per_round x actor.samples_per_prompt ({rows}) "
            f"must be divisible by learner.minibatches ({learner.minibatches})"
        )


def check_group_std(actor: ActorConfig, learner: LearnerConfig) -> None:
    """GRPO's sample std (learner.std_ddof=1) of a group of one essay divides by zero."""
    if learner.algorithm == "grpo" and learner.std_normalize and actor.samples_per_prompt <= learner.std_ddof:
        raise ConfigError(
            f"learner.std_ddof=1 (sample std) needs actor.samples_per_prompt >= 2, got {actor.samples_per_prompt}"
        )


def check_expert_iteration(actor: ActorConfig, learner: LearnerConfig) -> None:
    """Expert iteration keeps some but not all of each prompt's completions, and folds no KL into a reward it filters."""
    if learner.algorithm != "expert_iteration":
        return
    if not 1 <= learner.ei_keep < actor.samples_per_prompt:
        raise ConfigError(
            f"learner.ei_keep ({learner.ei_keep}) must be 1 .. actor.samples_per_prompt - 1 ({actor.samples_per_prompt - 1}): "
            "expert iteration keeps the best of each prompt's completions, not all of them"
        )
    if learner.kl_in_reward:
        raise ConfigError("learner.algorithm=expert_iteration takes KL as a loss term: set learner.kl_in_reward false")


def check_something_rewards(cfg: Config) -> None:
    """A run whose reward is the critic's with critic_weight 0 and no reward function has nothing to learn from."""
    if cfg.run.reward_source == "critic" and cfg.reward.critic_weight == 0 and not cfg.reward.fns:
        raise ConfigError("reward.critic_weight=0 without reward.fns leaves nothing to reward")


def check_reward_source(run: RunConfig) -> None:
    """The gold reward is the essay world's grader: a prompts file or the arithmetic task has none; a prompts file and a
    package task are two sources of prompts."""
    if run.reward_source == "gold" and run.prompts_file:
        raise ConfigError("run.reward_source=gold needs the essay world (no run.prompts_file)")
    if run.token_credit != "none" and run.reward_source != "gold":
        raise ConfigError(
            f"run.token_credit={run.token_credit} reads the gold grader: it needs run.reward_source=gold, got {run.reward_source}"
        )
    if run.reward_source == "gold" and run.task != "essays":
        raise ConfigError(f"run.reward_source=gold needs the essay world, not run.task={run.task}")
    if run.prompts_file and run.task != "essays":
        raise ConfigError(f"run.prompts_file replaces the essay world's prompts; run.task={run.task} brings its own")


def check_control_arm(run: RunConfig, reward: RewardConfig, learner: LearnerConfig) -> None:
    """run.reward_source=none trains on no reward at all: reward functions would be one, and without the
    pretraining-data term nothing but the KL pull would move the policy."""
    if run.reward_source != "none":
        return
    if reward.fns:
        raise ConfigError("run.reward_source=none is the control arm (no reward at all); drop reward.fns, or use another source")
    if learner.ptx_coef <= 0:
        raise ConfigError("run.reward_source=none trains on the human-data term alone: set learner.ptx_coef > 0")


def check_ptx_source(learner: LearnerConfig, run: RunConfig) -> None:
    """The pretraining-data term needs human examples: the world's corpus, which a prompts file replaces, or run.ptx_file."""
    if learner.ptx_coef > 0 and run.prompts_file and not run.ptx_file:
        raise ConfigError("learner.ptx_coef > 0 with run.prompts_file needs human examples: set run.ptx_file")


# ----------------------------------------------------------------------------------------------
# Loading: YAML -> nested dicts -> dataclasses, checking every key and type on the way.
# ----------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, second_line: int):
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`) and refuses a key given twice in one
    mapping (plain YAML keeps the last one silently, dropping a whole section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise ConfigError(f"{source}:{e.second_line}: key '{e.key}' is given twice (first at line {e.first_line})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: YAML error: {e}") from None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in that type (int -> float only)."""

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _build(cls: type, data: dict, prefix: str, base: Any = None) -> Any:
    """A `cls` instance: `base` (default: `cls()`) with the keys of `data` checked and replaced."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint} (valid keys here: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            # A section given in part keeps its parent's defaults for the rest.
            kwargs[k] = _build(hints[k], v, key, getattr(base, k))
        else:
            kwargs[k] = _coerce(v, hints[k], key)
    return dataclasses.replace(base, **kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["learner.lr=3e-4", "world.seed=7"]` -> nested dict with YAML-typed values."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key part")
        _set_dotted(tree, key, _parse_yaml(raw, f"override {key}") if raw.strip() else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


BASE_KEY = "base"  # top-level key of a config file: the file it extends (relative to the file that names it)
BENCH_KEY = "bench"  # top-level section read by load_bench_config; load_config checks it and leaves it out


def _read_file(p: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping of config file `p` over its `base:` chain (each file's keys merged onto its base's, key by key).
    `chain`: the files that led here, each naming the next as its base."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        if chain:
            raise ConfigError(f"{chain[-1]}: cannot read its base config {p}: {e.strerror}") from None
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    loaded = _parse_yaml(text, str(p))
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level of a config must be a mapping of sections, got {type(loaded).__name__}")
    if BASE_KEY not in loaded:
        return loaded
    loaded = dict(loaded)
    base = loaded.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{p}: {BASE_KEY} must be a string, the path of the config file this one extends, got {base!r}")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = p.parent / base_path
    here = (*chain, p)
    seen = [q.resolve() for q in here]
    if base_path.resolve() in seen:
        cycle = [*here[seen.index(base_path.resolve()):], base_path]
        raise ConfigError(f"config {BASE_KEY} cycle: {' -> '.join(str(q) for q in cycle)}")
    return _merge(_read_file(base_path, here), loaded)


def _split_bench(data: dict) -> tuple[Config, BenchConfig]:
    """(the validated Config of `data` without its bench section, the validated BenchConfig of that section)."""
    data = dict(data)
    bench = _coerce(data.pop(BENCH_KEY, {}), BenchConfig, BENCH_KEY)
    cfg = _build(Config, data, "").validate()
    bench.validate(BENCH_KEY)
    return cfg, bench


def config_from_dict(data: dict) -> Config:
    """The validated Config of a nested dict; a `bench` section is checked, then left out."""
    return _split_bench(data)[0]


def _load_tree(path: str | Path | None, overrides: list[str] | None) -> dict:
    data: dict = {} if path is None else _read_file(Path(path))
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None) over its `base:` chain and apply dotted overrides.
    A `bench:` section (or bench.* override) is validated as a BenchConfig and left out: see `load_bench_config`."""
    return config_from_dict(_load_tree(path, overrides))


def load_bench_config(path: str | Path | None = None, overrides: list[str] | None = None) -> tuple[Config, BenchConfig]:
    """Like `load_config`, plus the BenchConfig of the file's `bench:` section and the bench.* overrides."""
    return _split_bench(_load_tree(path, overrides))


def to_dict(cfg: Any) -> dict:
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config as `RUN_DIR/config.yaml` (atomically), so the run can be repeated."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text("# Resolved config of this run; repeat it with: selfplay <cmd> --config " + str(path) + "\n" + dump_config(cfg))
    tmp.replace(path)
    return path
