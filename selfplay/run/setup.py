"""Getting a run ready: its config (a resumed run keeps its own), jax.distributed for several processes, and the
pieces every round reads (`Setup`) with the fresh state they change (`RunState`), on the configured mesh.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax

from selfplay import checkpoint, learner, perf, sharding
from selfplay.actor import Generator
from selfplay.chat import load_chat_template
from selfplay.config import (
    Config,
    ConfigError,
    ModelConfig,
    UserError,
    critic_refreshes,
    initial_label_count,
    load_config,
    to_dict,
    uses_critic,
)
from selfplay.critic import (
    CRITIC_DIR, PairSource, attach_judge, generator_sample_fn, has_critic, init_critic, load_critic, read_preference_file,
)
from selfplay.data import DataError, PromptStream, prompt_texts, read_examples, read_prompt_rows
from selfplay.monitors import Monitor
from selfplay.policy import CONFIG_FILE, TOKENIZER_FILE, load_policy
from selfplay.rewards import Rewards, load_reward_fns
from selfplay.run.round import Setup, Steps, init_learner
from selfplay.run.state import CHECKPOINT_DIR, RunState
from selfplay.run.task import make_ptx_stream, make_task
from selfplay.tokenizer import Tokenizer

TB_DIR = "tb"

# Keys a resumed run may change: how long it runs and how it reports, never what it computes. Every `mesh.*` key
# may change too: the layout moves arrays between devices, it does not change the maths (only float rounding).
# run.rounds and critic.label_budget only where nothing already computed depends on them (`check_length_change`).
RESUMABLE_CHANGES = ("run.rounds", "critic.label_budget", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints",
                     "monitor.stop_on_alarm")
RESUMABLE_PREFIXES = ("mesh.",)


def _flat_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat_keys(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def config_differences(a: Config, b: Config) -> list[str]:
    fa, fb = _flat_keys(to_dict(a)), _flat_keys(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def resolve_config(run_dir: Path, config_path: str | None, overrides: list[str]) -> Config:
    """The run's config. A run directory that already trained keeps its config.yaml (overrides may change only
    RESUMABLE_CHANGES); one holding just a policy (pretrain, import-hf) keeps that policy's model section, and the
    shape of its critic when it holds one too (critic train, import-hf --critic): critic.model, ensemble_size and
    init_from_policy, with critic.seq_buckets cut to that model's context."""
    saved_path = run_dir / CONFIG_FILE
    saved = load_config(saved_path) if saved_path.is_file() else None
    cfg = load_config(saved_path if saved is not None and config_path is None else config_path, overrides)
    if saved is None:
        return cfg
    if checkpoint.has_checkpoint(run_dir / CHECKPOINT_DIR):
        diff = [k for k in config_differences(saved, cfg) if k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_PREFIXES)]
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run whose config.yaml differs from the given config in: {', '.join(diff)}. "
                "Resume with the same config (omit --config to reuse the saved one), or use a new run directory"
            )
        check_length_change(saved, cfg, run_dir)
        return cfg
    if cfg.model != saved.model:
        cfg = dataclasses.replace(cfg, model=saved.model).validate()
    if has_critic(run_dir / CRITIC_DIR):
        c = saved.critic
        buckets = tuple(b for b in cfg.critic.seq_buckets if b <= c.model.max_seq_len) or c.seq_buckets
        critic = dataclasses.replace(cfg.critic, model=c.model, ensemble_size=c.ensemble_size,
                                     init_from_policy=c.init_from_policy, seq_buckets=buckets)
        if critic != cfg.critic:
            cfg = dataclasses.replace(cfg, critic=critic).validate()
    return cfg


def check_length_change(saved: Config, cfg: Config, run_dir: Path) -> None:
    """A resumed run may change run.rounds (and critic.label_budget) only where that leaves what it already computed
    as an uninterrupted run of the new length would have computed it: not the cosine schedule's length, and not the
    initial critic's label share when it is derived from run.rounds (critic.initial_labels 0)."""
    rounds_changed = saved.run.rounds != cfg.run.rounds
    if rounds_changed and cfg.learner.schedule == "cosine":
        raise ConfigError(
            f"{run_dir}: run.rounds cannot change from {saved.run.rounds} to {cfg.run.rounds} on resume with "
            "learner.schedule=cosine (the learning rate decays over all the rounds, so the rounds already run would have "
            "had other rates); use a new run directory"
        )
    budget_changed = saved.critic.label_budget != cfg.critic.label_budget
    derived = cfg.critic.initial_labels == 0 and (budget_changed or cfg.critic.refresh_every > 0)
    if derived and initial_label_count(saved) != initial_label_count(cfg):
        what = " and ".join(k for k, changed in (("run.rounds", rounds_changed), ("critic.label_budget", budget_changed)) if changed)
        raise ConfigError(
            f"{run_dir}: changing {what} on resume would change the initial critic's labels ({initial_label_count(saved)} "
            f"spent; critic.initial_labels=0 derives them from the label budget minus the refreshes' reserve for "
            "run.rounds); set critic.initial_labels when starting a run you may extend, or use a new run directory"
        )


def start_distributed(run_dir: Path, config_path: str | None, overrides: list[str]) -> None:
    """`sharding.initialize_distributed` with the mesh section `resolve_config` will pick; it must run before any
    JAX computation, and opening a checkpoint directory (orbax asks for the process index) is one."""
    saved = run_dir / CONFIG_FILE
    path = str(saved) if config_path is None and saved.is_file() else config_path
    sharding.initialize_distributed(load_config(path, overrides))


def check_inputs(cfg: Config, run_dir: Path) -> None:
    """Every user file the run will read, read and checked now, before any work (one line naming FILE:LINE or the
    config key, exit 2): run.prompts_file (conversations rendered with RUN_DIR's chat template), run.ptx_file,
    run.pairs_file, the reward.fns importable; with the run's tokenizer already there, each prompt's length against
    the largest of actor.prompt_buckets (unless actor.too_long_prompt=truncate)."""
    load_reward_fns(cfg.reward)
    rows = read_prompt_rows(cfg.run.prompts_file) if cfg.run.prompts_file else []
    prompts = prompt_texts(rows, load_chat_template(run_dir), cfg.run.prompts_file) if rows else []
    if cfg.run.ptx_file:
        read_examples(cfg.run.ptx_file)
    if cfg.run.pairs_file:
        read_preference_file(cfg.run.pairs_file)
    tok_path = run_dir / TOKENIZER_FILE
    if not rows or cfg.actor.too_long_prompt == "truncate" or not tok_path.is_file():
        return
    tokenizer, largest = Tokenizer.load(tok_path), max(cfg.actor.prompt_buckets)
    for row, prompt in zip(rows, prompts):
        n = len(tokenizer.encode_prompt(prompt))
        if n > largest:
            raise DataError(
                f"{cfg.run.prompts_file}:{row['_line']}: the prompt has {n} tokens, more than the largest of actor.prompt_buckets "
                f"({largest}); raise actor.prompt_buckets or set actor.too_long_prompt=truncate (keeps its last tokens)"
            )


def checkpoint_bytes(cfg: Config) -> int:
    """About what one round's checkpoint takes on disk: the policy's float32 params with Adam's two moments (twice
    for PPO's value model), the critic's likewise per ensemble member when the run has one."""
    def weights(m: ModelConfig) -> int:
        return perf.matmul_params(m) + m.vocab_size * m.d_model

    policy = weights(cfg.model) * (2 if cfg.learner.algorithm == "ppo" else 1)
    critic = weights(cfg.critic.model) * cfg.critic.ensemble_size if uses_critic(cfg) else 0
    return 4 * 3 * (policy + critic)


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """Before any work: the run directory and the parts a run writes (checkpoints/, tb/) can be written, and the disk
    has room for one more checkpoint. One line naming the path (a read-only directory would otherwise fail only at the
    first save, after minutes of SFT and rounds)."""
    for d in (run_dir, run_dir / CHECKPOINT_DIR, run_dir / TB_DIR):
        probe_dir = d if d.exists() else next(p for p in d.parents if p.exists())
        try:
            with tempfile.TemporaryFile(dir=probe_dir):
                pass
        except OSError as e:
            raise UserError(f"cannot write in {probe_dir}: {e.strerror or e} (the run writes {d})") from None
    need = checkpoint_bytes(cfg)
    free = shutil.disk_usage(next(p for p in (run_dir, *run_dir.parents) if p.exists())).free
    if free < need:
        raise UserError(
            f"{run_dir}: {free / 2**20:.1f} MiB free on its disk, a checkpoint of this run needs about {need / 2**20:.1f} MiB"
        )


def build(cfg: Config, run_dir: Path, layout: sharding.Layout) -> tuple[Setup, RunState]:
    """The run's pieces from a run directory holding a policy (and a critic, when its score enters the reward), and
    the state of round 0: the policy and its frozen reference read into their shards, the learner state and the
    critic placed on the mesh. A run without a critic (`uses_critic`) gets None, its critic/ left unread."""
    policy = load_policy(run_dir, cfg, layout=layout)
    task = make_task(cfg, run_dir)
    critic = None
    if uses_critic(cfg):
        if cfg.reward.critic_weight > 0 or has_critic(run_dir / CRITIC_DIR):
            critic = load_critic(run_dir / CRITIC_DIR, cfg, policy.tokenizer, world=task.world, layout=layout)
        else:  # weight 0 and `prepare` trained none: the refreshes train one from untrained
            critic = init_critic(cfg, policy.tokenizer, world=task.world, policy_params=policy.params,
                                 policy_model=policy.cfg.model, layout=layout)
        attach_judge(critic, policy)  # critic.judge: the SFT policy (the run's reference) reads the essays
    refresh_source = None
    if critic_refreshes(cfg):  # only in the essay world: task.world is there
        critic_gen = Generator(policy, cfg.actor, batch=cfg.critic.batch_size, layout=layout)
        refresh_source = PairSource(task.world, generator_sample_fn(critic_gen), cfg.critic.label_source, cfg.critic.batch_size)
    optimizer = learner.make_optimizer(cfg.learner, learner.num_optimizer_updates(cfg.learner, cfg.run.rounds))
    state, value_graphdef = init_learner(cfg, policy.params, optimizer, layout)
    steps = Steps(cfg, policy.graphdef, optimizer, value_graphdef, layout)
    gen = Generator(policy, cfg.actor, batch=cfg.actor.prompts_per_round, layout=layout)
    setup = Setup(cfg, task, gen, steps, policy.params, refresh_source, Rewards(cfg.reward))
    run = RunState(
        learner=state,
        critic=critic,
        key=sharding.place(jax.random.key(cfg.run.seed), layout.replicated),
        prompts=PromptStream(len(task.train_prompts), cfg.run.seed),
        ptx=make_ptx_stream(cfg, policy),
        monitor=Monitor(cfg.monitor),
    )
    return setup, run
