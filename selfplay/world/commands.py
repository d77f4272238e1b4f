"""`selfplay world sample` and `selfplay world grade`: the human corpus and the gold grader as JSON lines."""

from __future__ import annotations

import json
import sys

from selfplay.config import Config, UserError
from selfplay.data import read_jsonl
from selfplay.world.grader import mean_scores
from selfplay.world.world import World


def sample(cfg: Config, n: int, seed: int | None = None, mode: str = "mixed") -> int:
    """Print n human-corpus essays as {"prompt", "essay", "gold"} JSON lines: the first n of
    `World.corpus(n, seed, mode)`, seed defaulting to world.seed."""
    if n < 0:
        raise UserError(f"--n must be >= 0, got {n}")
    if seed is not None and seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if mode not in ("grounded", "closed", "mixed"):
        raise UserError(f"--mode must be grounded, closed or mixed, got {mode!r}")
    world = World.from_config(cfg.world)
    lines = []
    for prompt, essay in world.corpus(n, seed=seed, mode=mode):  # type: ignore[arg-type]
        lines.append(json.dumps({"prompt": prompt, "essay": essay, "gold": world.grade(prompt, essay).to_dict()}))
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return 0


def grade(cfg: Config, path: str) -> int:
    """Grade a JSONL file of {"prompt": str, "essay": str} lines (other keys are ignored; blank lines
    skipped). Every line is checked before anything is printed; then one {"line", "gold"} JSON line
    per essay and a final {"summary": {"n", "mean"}} line."""
    world = World.from_config(cfg.world)

    def not_of_this_world(row: dict) -> str | None:
        if world.parse_prompt(row["prompt"]) is not None:
            return None
        return (
            f"\"prompt\" is not a prompt of this world (world.seed={cfg.world.seed}, "
            f"world.n_entities={cfg.world.n_entities}): {row['prompt'][:120]!r}"
        )

    rows = read_jsonl(path, {"prompt": str, "essay": str}, what="essays to grade", check=not_of_this_world)
    scores = [world.grade(r["prompt"], r["essay"]) for r in rows]
    out = [json.dumps({"line": r["_line"], "gold": s.to_dict()}) for r, s in zip(rows, scores)]
    out.append(json.dumps({"summary": {"n": len(scores), "mean": mean_scores(scores)}}))
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()
    return 0
