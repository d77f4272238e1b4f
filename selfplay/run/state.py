"""RunState: everything a self-play run changes, in one object with one save and one restore: the learner state, the
critic (device state + pool + labeller), the key, the prompt and human-example streams, the monitor and the counters.

On disk it is one orbax checkpoint per saved round: a pytree of arrays (`arrays()`) and a JSON meta (`meta()`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from selfplay import checkpoint, learner
from selfplay.critic import Critic, host_meta, restore_host
from selfplay.data import ExampleStream, PromptStream
from selfplay.monitors import Monitor


@dataclasses.dataclass
class RunState:
    learner: learner.TrainState
    critic: Critic
    key: jax.Array
    prompts: PromptStream
    ptx: ExampleStream | None
    monitor: Monitor
    round: int = 0
    skipped_nonfinite: int = 0

    def arrays(self) -> dict:
        """The device side, one pytree: learner state, critic state, the key's data."""
        return {"learner": self.learner, "critic": self.critic.state, "key": jax.random.key_data(self.key)}

    def meta(self) -> dict:
        """The host side, JSON: counters, stream positions, the monitor's window, the critic's pool and labeller."""
        return {
            "round": self.round,
            "prompt_position": self.prompts.position,
            "ptx_position": self.ptx.position if self.ptx is not None else 0,
            "monitor": self.monitor.state_dict(),
            "skipped_nonfinite": self.skipped_nonfinite,
            "critic": host_meta(self.critic),
        }

    def save(self, ckpt: checkpoint.Checkpointer, metrics: dict | None = None) -> None:
        """Start saving round `self.round` (asynchronous; refused, raising CheckpointError, when a leaf is not finite)."""
        ckpt.save(self.round, checkpoint.flatten_tree(self.arrays()), self.meta(), metrics=metrics)

    def restore(self, ckpt: checkpoint.Checkpointer, step: int) -> None:
        """Replace every part by checkpoint `step`'s: arrays come back with the shapes, dtypes and shardings of the
        current ones (so a run resumes on another mesh), then the host side. A damaged step (unreadable, or not
        finite) raises CheckpointError before anything is replaced."""
        template = abstract(self.arrays())
        flat, meta = ckpt.restore(step, checkpoint.flatten_tree(template))
        restored = checkpoint.unflatten_like(template, flat)
        if not checkpoint.tree_is_finite(restored):
            raise checkpoint.CheckpointError(f"step {step} in {ckpt.directory} holds NaN or Inf")
        self.learner, self.critic.state = restored["learner"], restored["critic"]
        self.key = jax.random.wrap_key_data(restored["key"])
        self.round = int(meta["round"])
        self.prompts.position = int(meta["prompt_position"])
        if self.ptx is not None:
            self.ptx.position = int(meta["ptx_position"])
        self.monitor.load_state_dict(meta["monitor"])
        self.skipped_nonfinite = int(meta["skipped_nonfinite"])
        restore_host(self.critic, meta["critic"])


def abstract(tree: Any) -> Any:
    """A restore target: each leaf's shape, dtype and sharding (the array comes back where the fresh one lives)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)
