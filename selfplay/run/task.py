"""What a run trains on: its prompts (the world's, or run.prompts_file), the held-out prompts of the table, the gold
grader when the world is the task, and the human examples of the learner's pretraining-data term.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from selfplay.config import Config
from selfplay.data import ExampleStream, read_examples, read_prompts
from selfplay.policy import Policy
from selfplay.world import World

TRAIN_PROMPTS_SEED = 0x7EA1
EVAL_PROMPTS_SEED = 0xE7A1
PTX_SEED = 0x97


@dataclasses.dataclass
class Task:
    """Where prompts come from and, in the essay world, the gold grader."""

    train_prompts: list[str]
    eval_prompts: list[str]
    world: World | None

    def grades(self, prompts: list[str], essays: list[str]) -> list | None:
        """The gold grader's scores of each essay (None without the world): grade once, derive the rest."""
        if self.world is None:
            return None
        return [self.world.grade(p, e) for p, e in zip(prompts, essays)]


def make_task(cfg: Config) -> Task:
    if cfg.run.prompts_file:
        prompts = read_prompts(cfg.run.prompts_file)
        n_eval = min(cfg.run.eval_prompts, max(1, len(prompts) // 10))
        return Task(prompts[n_eval:] or prompts, prompts[:n_eval], None)
    world = World.from_config(cfg.world)
    train = world.sample_prompts(cfg.run.train_prompts, np.random.default_rng([cfg.run.seed, TRAIN_PROMPTS_SEED]))
    evals = world.sample_prompts(cfg.run.eval_prompts, np.random.default_rng([cfg.run.seed, EVAL_PROMPTS_SEED]))
    return Task(train, evals, world)


def make_ptx_stream(cfg: Config, policy: Policy, task: Task) -> ExampleStream | None:
    """The human examples of the learner's pretraining-data term (None when learner.ptx_coef is 0): run.ptx_file,
    else the world's human corpus (the SFT data). Config.validate refuses ptx without either."""
    if cfg.learner.ptx_coef <= 0:
        return None
    if cfg.run.ptx_file:
        examples, source = read_examples(cfg.run.ptx_file), cfg.run.ptx_file
    else:
        assert task.world is not None
        examples, source = task.world.corpus(cfg.world.corpus_size), "the world's human corpus"
    return ExampleStream(policy.tokenizer, examples, cfg.run.seed + PTX_SEED, cfg.model.max_seq_len, source)
