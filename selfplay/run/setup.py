"""Getting a run ready: its config (a resumed run keeps its own), jax.distributed for several processes, and the
pieces every round reads (`Setup`) with the fresh state they change (`RunState`), on the configured mesh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from selfplay import checkpoint, learner, sharding
from selfplay.actor import Generator
from selfplay.chat import load_chat_template
from selfplay.config import Config, ConfigError, load_config, to_dict
from selfplay.critic import CRITIC_DIR, PairSource, generator_sample_fn, has_critic, init_critic, load_critic, read_preference_file
from selfplay.data import DataError, PromptStream, prompt_texts, read_examples, read_prompt_rows
from selfplay.monitors import Monitor
from selfplay.policy import CONFIG_FILE, TOKENIZER_FILE, load_policy
from selfplay.rewards import Rewards, load_reward_fns
from selfplay.run.round import Setup, Steps, init_learner
from selfplay.run.state import RunState
from selfplay.run.task import make_ptx_stream, make_task
from selfplay.tokenizer import Tokenizer

CHECKPOINT_DIR = "checkpoints"

# Keys a resumed run may change: how long it runs and how it reports, never what it computes. Every `mesh.*` key
# may change too: the layout moves arrays between devices, it does not change the maths (only float rounding).
RESUMABLE_CHANGES = ("run.rounds", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "monitor.stop_on_alarm")
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
    RESUMABLE_CHANGES); one holding just a policy (pretrain, import-hf) keeps that policy's model section."""
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
        return cfg
    if cfg.model != saved.model:
        cfg = dataclasses.replace(cfg, model=saved.model).validate()
    return cfg


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


def build(cfg: Config, run_dir: Path, layout: sharding.Layout) -> tuple[Setup, RunState]:
    """The run's pieces from a run directory holding a policy and a critic, and the state of round 0: the policy and
    its frozen reference read into their shards, the learner state and the critic placed on the mesh."""
    policy = load_policy(run_dir, cfg, layout=layout)
    task = make_task(cfg, run_dir)
    if cfg.reward.critic_weight == 0 and not has_critic(run_dir / CRITIC_DIR):  # `prepare` trained none: the score
        # of an untrained critic is logged (reward/critic_mean), never trained on
        critic = init_critic(cfg, policy.tokenizer, world=task.world, policy_params=policy.params, policy_model=policy.cfg.model,
                             layout=layout)
    else:
        critic = load_critic(run_dir / CRITIC_DIR, cfg, policy.tokenizer, world=task.world, layout=layout)
    refresh_source = None
    if cfg.critic.refresh_every and task.world is not None and cfg.critic.label_source != "file":
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
