"""The arithmetic task: seeded problems with right answers, held-out problems kept out of training, the exact-answer
reward's parsing, and a tiny end-to-end run (SFT on worked examples, rounds on the reward function, no critic)."""

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from selfplay.config import ArithmeticConfig, ConfigError, UserError, load_config
from selfplay.critic import CRITIC_DIR
from selfplay.run.train import train
from selfplay.tasks import arithmetic as A

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "arithmetic.yaml")
TINY_RUN = [  # the shipped config, cut down to seconds
    "pretrain.steps=6", "pretrain.batch_size=4", "pretrain.eval_every=6", "arithmetic.corpus_size=200",
    "run.rounds=2", "run.eval_prompts=4", "run.train_prompts=32", "actor.prompts_per_round=2", "actor.samples_per_prompt=2",
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=32",
]


def _evaluate(expr: str) -> int:
    """The expression's value from its text, * before + (an independent recomputation)."""
    return sum(int(np.prod([int(f) for f in term.split("*")])) for term in expr.replace(" ", "").split("+"))


def test_problems_are_seeded_with_right_answers_and_held_out_kept_out():
    cfg = ArithmeticConfig(seed=3, corpus_size=300)
    train, again = A.train_problems(cfg, 200, 50), A.train_problems(cfg, 200, 50)
    assert [p.expr for p, _ in train] == [p.expr for p, _ in again]
    assert [p.expr for p, _ in train] != [p.expr for p, _ in A.train_problems(ArithmeticConfig(seed=4), 200, 50)]
    held = {p.expr for p, _ in A.held_out(cfg, 50)}
    assert len(held) == 50 and not held & {p.expr for p, _ in train}
    for p, t in train:
        assert p.answer == _evaluate(p.expr)
        assert p.prompt(t) in (f"What is {p.expr}?", f"Compute {p.expr}.")
    assert {len(p.numbers) for p, _ in train} == {2, 3} and {op for p, _ in train for op in p.ops} == {"+", "*"}

    corpus = A.corpus(cfg, 50)
    assert not held & {prompt.removeprefix("What is ").removeprefix("Compute ").rstrip("?.") for prompt, _ in corpus}
    right = [A.last_number(c) == _evaluate(c.split(" = ")[0]) for _, c in corpus]
    assert 0.55 < np.mean(right) < 0.85  # slip_rate 0.3: the worked examples are imperfect on purpose
    assert A.worked(A.Problem((17, 4, 3), ("+", "*"))) == "17 + 4 * 3 = 17 + 12 = 29. The answer is 29."
    assert A.worked(A.Problem((5, 6, 30), ("*", "+")), slip=1) == "5 * 6 + 30 = 31 + 30 = 61. The answer is 61."


def test_exact_answer_parses_the_last_integer():
    completions = ["23 + 58 = 81. The answer is 81.", "23 + 58 = 81. The answer is 82.", "no idea", "it is -4", "81 or 80", "x"]
    answers = [81, 81, 81, -4, 81, None]
    assert A.exact_answer(["p"] * 6, completions, answers) == [1.0, 0.0, 0.0, 1.0, 0.0, None]
    assert A.exact_answer(["p"], ["The answer is 12."], ["12"]) == [1.0]  # a string answer column works too
    assert A.last_number("") is None and A.last_number("1,000") == 0  # no thousands separators: the last run of digits


def test_arithmetic_refuses_a_prompts_file_the_gold_reward_and_too_many_held_out():
    with pytest.raises(UserError, match="more than a quarter"):
        A.held_out(ArithmeticConfig(), A.PROBLEM_COUNT // 4 + 1)
    with pytest.raises(ConfigError, match="run.prompts_file"):
        load_config(CONFIG, ["run.prompts_file=x.jsonl"])
    with pytest.raises(ConfigError, match="reward_source=gold"):
        load_config(CONFIG, ["run.reward_source=gold"])


def test_tiny_run_trains_on_the_exact_answer_reward(tmp_path):
    run = tmp_path / "run"
    result = train(run, CONFIG, TINY_RUN, progress=False, console=Console(quiet=True))
    assert not (run / CRITIC_DIR).exists()  # critic_weight 0: no critic trained
    rounds = [json.loads(line) for line in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all(0.0 <= r["rewards/exact_answer/mean"] <= 1.0 for r in rounds)
    assert rounds[-1]["reward/mean"] == pytest.approx(rounds[-1]["rewards/exact_answer/mean"])  # the reward is the fn's alone
    for column in ("sft", "final"):
        assert 0.0 <= result[column]["rewards/exact_answer/mean"] <= 1.0
