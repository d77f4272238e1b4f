"""The arithmetic task (run.task=arithmetic): seeded two- and three-number sums and products with their answers, the
worked examples the SFT policy learns from (a share with a slip, on purpose), and `exact_answer`, its reward function.

    prompt      What is 17 + 4 * 3?                     (or: Compute 17 + 4 * 3.)
    completion  17 + 4 * 3 = 17 + 12 = 29. The answer is 29.
"""

from __future__ import annotations

import dataclasses
import re
from typing import AbstractSet as Set, Any, Sequence

import numpy as np

from selfplay.config import ArithmeticConfig, UserError

HELD_OUT_SEED = 0xE7A1
TRAIN_SEED = 0x7EA1
CORPUS_SEED = 0xC095
NUMBER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class Problem:
    """`a op1 b [op2 c]`, evaluated with * before +; `answer` is its value."""

    numbers: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def expr(self) -> str:
        out = str(self.numbers[0])
        for op, n in zip(self.ops, self.numbers[1:]):
            out += f" {op} {n}"
        return out

    @property
    def answer(self) -> int:
        return _steps(self.numbers, self.ops)[-1]

    def prompt(self, template: int) -> str:
        return f"What is {self.expr}?" if template == 0 else f"Compute {self.expr}."


def _steps(numbers: Sequence[int], ops: Sequence[str]) -> list[int]:
    """The worked example's values: after the product (if it is not the whole sum), then the result."""
    a, *rest = numbers
    if len(numbers) == 2:
        return [a + rest[0] if ops[0] == "+" else a * rest[0]]
    b, c = rest
    if ops == ("+", "+"):
        return [a + b + c]
    if ops == ("*", "*"):
        return [a * b * c]
    if ops == ("+", "*"):
        return [b * c, a + b * c]
    return [a * b, a * b + c]  # ("*", "+")


# (ops, range of the summands, range of the factors): small enough for a tiny model to learn in a minute of CPU.
FORMS = (
    (("+",), (1, 20), None),
    (("*",), None, (2, 9)),
    (("+", "+"), (1, 9), None),
    (("+", "*"), (1, 20), (2, 9)),
    (("*", "+"), (1, 20), (2, 9)),
    (("*", "*"), None, (2, 5)),
)


def _ranges(ops: tuple[str, ...], summand: tuple[int, int] | None, factor: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Each number's range: a factor's when an operator next to it is *, else a summand's."""
    return [
        factor if (i > 0 and ops[i - 1] == "*") or (i < len(ops) and ops[i] == "*") else summand  # type: ignore[misc]
        for i in range(len(ops) + 1)
    ]


PROBLEM_COUNT = sum(int(np.prod([hi - lo + 1 for lo, hi in _ranges(*form)])) for form in FORMS)  # 3817


def _draw(rng: np.random.Generator) -> Problem:
    ops, summand, factor = FORMS[rng.integers(len(FORMS))]
    return Problem(tuple(int(rng.integers(lo, hi + 1)) for lo, hi in _ranges(ops, summand, factor)), ops)


def draw_problems(n: int, rng: np.random.Generator, exclude: Set[str] = frozenset(), distinct: bool = False) -> list[tuple[Problem, int]]:
    """`n` (problem, prompt template) draws whose expressions are not in `exclude`, all different when `distinct`."""
    seen, out = set(exclude), []
    while len(out) < n:
        p = _draw(rng)
        if p.expr in seen:
            continue
        if distinct:
            seen.add(p.expr)
        out.append((p, int(rng.integers(2))))
    return out


def worked(p: Problem, slip: int = 0) -> str:
    """The worked example; `slip` is added to the first value computed (what follows is computed from it)."""
    first = _steps(p.numbers, p.ops)[0] + slip
    if p.ops == ("+", "*"):
        middle, result = f"{p.numbers[0]} + {first}", p.numbers[0] + first
    elif p.ops == ("*", "+"):
        middle, result = f"{first} + {p.numbers[2]}", first + p.numbers[2]
    else:
        return f"{p.expr} = {first}. The answer is {first}."
    return f"{p.expr} = {middle} = {result}. The answer is {result}."


def held_out(cfg: ArithmeticConfig, n: int) -> list[tuple[Problem, int]]:
    """The held-out problems of the table, all different: fixed by arithmetic.seed, never in the training prompts or
    the corpus (which may repeat a problem)."""
    if n > PROBLEM_COUNT // 4:
        raise UserError(f"run.eval_prompts ({n}) would hold out more than a quarter of the {PROBLEM_COUNT} arithmetic problems")
    return draw_problems(n, np.random.default_rng([cfg.seed, HELD_OUT_SEED]), distinct=True)


def train_problems(cfg: ArithmeticConfig, n: int, n_held_out: int) -> list[tuple[Problem, int]]:
    exclude = {p.expr for p, _ in held_out(cfg, n_held_out)}
    return draw_problems(n, np.random.default_rng([cfg.seed, TRAIN_SEED]), exclude)


def corpus(cfg: ArithmeticConfig, n_held_out: int) -> list[tuple[str, str]]:
    """arithmetic.corpus_size (prompt, worked example) pairs, a share arithmetic.slip_rate of them with a slip of
    +-1 or +-10 in the first value computed, so the SFT policy inherits a habit RL can remove."""
    rng = np.random.default_rng([cfg.seed, CORPUS_SEED])
    exclude = {p.expr for p, _ in held_out(cfg, n_held_out)}
    out = []
    for p, t in draw_problems(cfg.corpus_size, rng, exclude):
        slip = int(rng.choice([-10, -1, 1, 10])) if rng.random() < cfg.slip_rate else 0
        out.append((p.prompt(t), worked(p, slip)))
    return out


def last_number(text: str) -> int | None:
    """The last integer written in `text` (an optional minus sign, then digits), None when there is none."""
    found = NUMBER.findall(text)
    return int(found[-1]) if found else None


def exact_answer(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **_: Any) -> list[float | None]:
    """1.0 when the last integer in the completion (see `last_number`) equals the row's `answer`, else 0.0 (also for
    a completion without a number); None for a row without an answer. TRL's reward-function signature."""
    out: list[float | None] = []
    for completion, want in zip(completions, answer):
        if want is None:
            out.append(None)
            continue
        out.append(1.0 if last_number(completion) == int(want) else 0.0)
    return out
