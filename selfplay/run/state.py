"""RunState: everything a self-play run changes, in one object with one save and one restore: the learner state, the
critic (device state + pool + labeller; None in a run without one), the key, the prompt and human-example streams, the
monitor and the counters.

On disk it is one orbax checkpoint per saved round in RUN_DIR/checkpoints/: a pytree of arrays (`arrays()`) and a
JSON meta (`meta()`); `load_round_policy` reads a round's policy alone from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from selfplay import checkpoint, learner
from selfplay.config import Config, UserError
from selfplay.critic import Critic, host_meta, restore_host
from selfplay.data import ExampleStream, PromptStream
from selfplay.monitors import Monitor
from selfplay.policy import TOKENIZER_FILE, Policy, abstract_params, load_policy
from selfplay.tokenizer import Tokenizer

CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class RunState:
    learner: learner.TrainState
    critic: Critic | None
    key: jax.Array
    prompts: PromptStream
    ptx: ExampleStream | None
    monitor: Monitor
    round: int = 0
    skipped_nonfinite: int = 0

    def arrays(self) -> dict:
        """The device side, one pytree: learner state, critic state (when the run has a critic), the key's data."""
        critic = {} if self.critic is None else {"critic": self.critic.state}
        return {"learner": self.learner, **critic, "key": jax.random.key_data(self.key)}

    def meta(self) -> dict:
        """The host side, JSON: counters, stream positions, the monitor's window, the critic's pool and labeller."""
        critic = {} if self.critic is None else {"critic": host_meta(self.critic)}
        return {
            "round": self.round,
            "prompt_position": self.prompts.position,
            "ptx_position": self.ptx.position if self.ptx is not None else 0,
            "monitor": self.monitor.state_dict(),
            "skipped_nonfinite": self.skipped_nonfinite,
            **critic,
        }

    def save(self, ckpt: checkpoint.Checkpointer, metrics: dict | None = None) -> None:
        """Start saving round `self.round` (asynchronous; refused, raising CheckpointError, when a leaf is not finite)."""
        ckpt.save(self.round, checkpoint.flatten_tree(self.arrays()), self.meta(), metrics=metrics)

    def restore(self, ckpt: checkpoint.Checkpointer, step: int) -> None:
        """Replace every part by checkpoint `step`'s: arrays come back with the shapes, dtypes and shardings of the
        current ones (so a run resumes on another mesh), then the host side. A damaged step (unreadable, or not
        finite) raises CheckpointError before anything is replaced."""
        saved_critic = "critic" in ckpt.restore_meta(step)
        if saved_critic != (self.critic is not None):  # not damage: a checkpoint of another kind of run
            raise UserError(
                f"{ckpt.directory}: round {step} was saved {'with' if saved_critic else 'without'} a critic, but this run "
                f"has {'none (run.reward_source gold or none, or reward.critic_weight 0 without refreshes)' if self.critic is None else 'one'}; runs with "
                "critic_weight 0 saved an unused critic before 2026-12-06: resume those with that version, or start a "
                "new run directory"
            )
        template = abstract(self.arrays())
        flat, meta = ckpt.restore(step, checkpoint.flatten_tree(template))
        restored = checkpoint.unflatten_like(template, flat)
        if not checkpoint.tree_is_finite(restored):
            raise checkpoint.CheckpointError(f"step {step} in {ckpt.directory} holds NaN or Inf")
        self.learner = restored["learner"]
        self.key = jax.random.wrap_key_data(restored["key"])
        self.round = int(meta["round"])
        self.prompts.position = int(meta["prompt_position"])
        if self.ptx is not None:
            self.ptx.position = int(meta["ptx_position"])
        self.monitor.load_state_dict(meta["monitor"])
        self.skipped_nonfinite = int(meta["skipped_nonfinite"])
        if self.critic is not None:
            self.critic.state = restored["critic"]
            restore_host(self.critic, meta["critic"])


def abstract(tree: Any) -> Any:
    """A restore target: each leaf's shape, dtype and sharding (the array comes back where the fresh one lives)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)


def load_round_policy(run_dir: Path, cfg: Config, step: int | None = None) -> tuple[int, Policy]:
    """(the round, the policy) a run directory holds after round `step`: N >= 1 is round N's learner params, read alone
    from its checkpoint (without the optimiser state, the critic and the rest); 0 is the SFT or imported policy
    (RUN_DIR/policy/), which no round saves as 0; None is the latest saved round, else the SFT policy. A round with no
    checkpoint is a CheckpointError naming the run directory and the rounds it saved."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if step is None and not checkpoint.has_checkpoint(ckpt_dir):
        step = 0
    if step == 0:
        return 0, load_policy(run_dir, cfg)
    graphdef, abstract = abstract_params(cfg)
    target = {"learner": {"params": abstract}}  # flattens to the paths `RunState.arrays` saves
    with checkpoint.Checkpointer(ckpt_dir, read_only=True) as ckpt:
        saved = ckpt.steps()
        step = saved[-1] if step is None else step
        if step not in saved:
            raise checkpoint.CheckpointError(
                f"{run_dir} has no checkpoint of round {step}; saved rounds: {', '.join(map(str, saved)) or 'none'} "
                "(0: the SFT or imported policy)"
            )
        flat = ckpt.restore_part(step, checkpoint.flatten_tree(target))
    params = checkpoint.unflatten_like(target, flat)["learner"]["params"]
    return step, Policy(cfg, Tokenizer.load(run_dir / TOKENIZER_FILE), graphdef, params)
