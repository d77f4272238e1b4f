"""What a run trains on: its prompts (the world's, run.prompts_file's, plain or conversational, or the arithmetic
task's) with the columns reward functions receive, the held-out prompts of the table, the gold grader when the world
is the task, and the human examples of SFT and of the learner's pretraining-data term.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from selfplay.chat import load_chat_template
from selfplay.config import Config
from selfplay.data import ExampleStream, prompt_texts, read_examples, read_prompt_rows
from selfplay.policy import Policy
from selfplay.tasks import arithmetic
from selfplay.world import World

TRAIN_PROMPTS_SEED = 0x7EA1
EVAL_PROMPTS_SEED = 0xE7A1
EVAL_SAMPLES_PER_PROMPT = 2  # the table's essays per held-out prompt: pairs for the critic's agreement with gold
PTX_SEED = 0x97


@dataclasses.dataclass
class Task:
    """Where prompts come from and, in the essay world, the gold grader. `train_columns[i]` (`eval_columns[i]`): the
    other JSONL keys of train (held-out) prompt i, or the arithmetic task's answer; empty in the world. Reward functions
    receive them."""

    train_prompts: list[str]
    eval_prompts: list[str]
    world: World | None
    train_columns: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_columns: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def columns(self, idx: Sequence[int], g: int, held_out: bool = False) -> dict[str, list]:
        """The reward functions' columns for train (`held_out`: held-out) prompts `idx`, each sampled g times: one list
        per column, aligned with the rollout's rows; a row without a column another row of the file has gets None (as
        in a datasets table)."""
        table = self.eval_columns if held_out else self.train_columns
        rows = [table[i] if table else {} for i in idx]
        names = sorted({k for r in self.train_columns + self.eval_columns for k in r})
        return {k: [r.get(k) for r in rows for _ in range(g)] for k in names}

    def grades(self, prompts: list[str], essays: list[str]) -> list | None:
        """The gold grader's scores of each essay (None without the world): grade once, derive the rest."""
        if self.world is None:
            return None
        return [self.world.grade(p, e) for p, e in zip(prompts, essays)]


def make_task(cfg: Config, run_dir: str | Path) -> Task:
    """The world's prompts, run.prompts_file's (conversations rendered with RUN_DIR's chat template; its first tenth,
    at most run.eval_prompts, is held out for the table), or the arithmetic task's with their `answer` column (as a
    user turn in RUN_DIR's chat template when it has one: an imported chat model)."""
    if cfg.run.task == "arithmetic":
        train = arithmetic.train_problems(cfg.arithmetic, cfg.run.train_prompts, cfg.run.eval_prompts)
        evals = arithmetic.held_out(cfg.arithmetic, cfg.run.eval_prompts)
        chat = load_chat_template(run_dir)  # an imported chat model is asked as a user, in its own template

        def text(p: arithmetic.Problem, template: int) -> str:
            return chat.render([{"role": "user", "content": p.prompt(template)}]) if chat else p.prompt(template)

        return Task([text(p, t) for p, t in train], [text(p, t) for p, t in evals], None,
                    [{"answer": p.answer} for p, _ in train], [{"answer": p.answer} for p, _ in evals])
    if cfg.run.prompts_file:
        rows = read_prompt_rows(cfg.run.prompts_file)
        prompts = prompt_texts(rows, load_chat_template(run_dir), cfg.run.prompts_file)
        columns = [{k: v for k, v in r.items() if k not in ("prompt", "_line")} for r in rows]
        n_eval = min(cfg.run.eval_prompts, max(1, len(prompts) // 10))
        train = slice(n_eval, None) if len(prompts) > n_eval else slice(None)  # too few to hold out: train on all
        return Task(prompts[train], prompts[:n_eval], None, columns[train], columns[:n_eval])
    world = World.from_config(cfg.world)
    train = world.sample_prompts(cfg.run.train_prompts, np.random.default_rng([cfg.run.seed, TRAIN_PROMPTS_SEED]))
    return Task(train, world_eval_prompts(cfg, world), world)


def world_eval_prompts(cfg: Config, world: World) -> list[str]:
    """The table's held-out world prompts (also SFT's held-out gold along the way)."""
    return world.sample_prompts(cfg.run.eval_prompts, np.random.default_rng([cfg.run.seed, EVAL_PROMPTS_SEED]))


def sft_corpus(cfg: Config) -> tuple[list[tuple[str, str]], int, str]:
    """(the (prompt, completion) examples SFT trains the tokenizer and the policy on, the tokenizer's vocabulary size,
    what they are): the world's human corpus, or the arithmetic task's worked examples."""
    if cfg.run.task == "arithmetic":
        a = cfg.arithmetic
        return arithmetic.corpus(a, cfg.run.eval_prompts), a.tokenizer_vocab_size, "the arithmetic task's worked examples"
    return World.from_config(cfg.world).corpus(cfg.world.corpus_size), cfg.world.tokenizer_vocab_size, "the world's human corpus"


def make_ptx_stream(cfg: Config, policy: Policy) -> ExampleStream | None:
    """The human examples of the learner's pretraining-data term (None when learner.ptx_coef is 0): run.ptx_file,
    else the SFT data (`sft_corpus`). Config.validate refuses ptx with a prompts file and no ptx file."""
    if cfg.learner.ptx_coef <= 0:
        return None
    if cfg.run.ptx_file:
        examples, source = read_examples(cfg.run.ptx_file), cfg.run.ptx_file
    else:
        examples, _, source = sft_corpus(cfg)
    return ExampleStream(policy.tokenizer, examples, cfg.run.seed + PTX_SEED, cfg.model.max_seq_len, source)
