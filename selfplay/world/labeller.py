"""The budgeted labeller: the gold grader playing a human who labels a budget of essay comparisons, with
seeded label noise and a JSON-able state (`state_dict`, `load_state_dict`) a checkpoint can hold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from selfplay.config import UserError
from selfplay.world.world import Prompt, World


class BudgetExhausted(UserError):
    """More comparison labels were asked for than the labeller's budget has left."""


class Labeller:
    """Labels pairs of essays by the gold score: 0 if essay A is preferred, 1 if essay B.

    Ties go to a seeded fair coin; then each label is flipped with probability `noise`. Every
    labelled pair counts against `budget`; a request for more labels than remain raises
    BudgetExhausted before labelling any of them. Two uniforms are drawn per pair whatever the
    outcome, so the random stream depends only on the number of labels given.
    """

    def __init__(self, world: World, budget: int, noise: float = 0.0, seed: int = 0):
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"label budget must be a non-negative integer, got {budget!r}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"label noise must be a probability in [0, 1], got {noise}")
        self.world = world
        self.budget = int(budget)
        self.noise = float(noise)
        self.used = 0
        self._rng = np.random.default_rng([seed, 0x1AB])

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def label(self, prompt: str | Prompt, essay_a: str, essay_b: str) -> int:
        return int(self.label_batch([prompt], [essay_a], [essay_b])[0])

    def label_batch(
        self, prompts: Sequence[str | Prompt], essays_a: Sequence[str], essays_b: Sequence[str]
    ) -> np.ndarray:
        """int32 [k] labels (0: A preferred, 1: B preferred) for k pairs; uses k of the budget."""
        k = len(prompts)
        if len(essays_a) != k or len(essays_b) != k:
            raise ValueError(f"label_batch got {k} prompts, {len(essays_a)} essays A, {len(essays_b)} essays B")
        if k > self.remaining:
            raise BudgetExhausted(
                f"label budget exhausted: {k} label(s) asked, {self.remaining} of {self.budget} left "
                "(raise critic.label_budget)"
            )
        parsed = [self.world._as_prompt(p) for p in prompts]  # a bad prompt fails before any budget is used
        out = np.empty(k, np.int32)
        for i, (p, a, b) in enumerate(zip(parsed, essays_a, essays_b)):
            coin, flip = self._rng.random(2)
            sa, sb = self.world.grade(p, a).score, self.world.grade(p, b).score
            pref = 0 if sa > sb else 1 if sb > sa else int(coin < 0.5)
            out[i] = pref ^ int(flip < self.noise)
        self.used += k
        return out

    def state_dict(self) -> dict:
        """Plain JSON-able state: labels used and the PCG64 state (its 128-bit integers as decimal strings)."""
        s = self._rng.bit_generator.state
        return {
            "used": self.used,
            "rng": {
                "bit_generator": s["bit_generator"],
                "state": str(s["state"]["state"]),
                "inc": str(s["state"]["inc"]),
                "has_uint32": int(s["has_uint32"]),
                "uinteger": int(s["uinteger"]),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        r = state["rng"]
        if r["bit_generator"] != type(self._rng.bit_generator).__name__:
            raise ValueError(f"labeller state holds a {r['bit_generator']} generator, expected PCG64")
        self._rng.bit_generator.state = {
            "bit_generator": r["bit_generator"],
            "state": {"state": int(r["state"]), "inc": int(r["inc"])},
            "has_uint32": int(r["has_uint32"]),
            "uinteger": int(r["uinteger"]),
        }
        self.used = int(state["used"])
