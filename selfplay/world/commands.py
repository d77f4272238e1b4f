"""`selfplay world sample` and `selfplay world grade`: the human corpus and the gold grader as JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selfplay.config import Config, UserError
from selfplay.world.essays import World, mean_scores


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


def _read_lines(path: str) -> tuple[str, list[str]]:
    if path == "-":
        return "<stdin>", sys.stdin.read().splitlines()
    p = Path(path)
    try:
        return path, p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a JSONL file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None


def grade(cfg: Config, path: str) -> int:
    """Grade a JSONL file of {"prompt": str, "essay": str} lines (other keys are ignored; blank lines
    skipped). Every line is checked before anything is printed; then one {"line", "gold"} JSON line
    per essay and a final {"summary": {"n", "mean"}} line."""
    world = World.from_config(cfg.world)
    name, raw = _read_lines(path)
    items: list[tuple[int, str, str]] = []
    for lineno, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with \"prompt\" and \"essay\", got {type(obj).__name__}")
        for key in ("prompt", "essay"):
            if key not in obj:
                raise UserError(f"{where}: missing key \"{key}\"")
            if not isinstance(obj[key], str):
                raise UserError(f"{where}: \"{key}\" must be a string, got {type(obj[key]).__name__}")
        if world.parse_prompt(obj["prompt"]) is None:
            raise UserError(
                f"{where}: \"prompt\" is not a prompt of this world (world.seed={cfg.world.seed}, "
                f"world.n_entities={cfg.world.n_entities}): {obj['prompt'][:120]!r}"
            )
        items.append((lineno, obj["prompt"], obj["essay"]))
    if not items:
        raise UserError(f"{name}: no essays to grade (the file has no JSON lines)")
    scores = [world.grade(p, e) for _, p, e in items]
    out = [json.dumps({"line": lineno, "gold": s.to_dict()}) for (lineno, _, _), s in zip(items, scores)]
    out.append(json.dumps({"summary": {"n": len(scores), "mean": mean_scores(scores)}}))
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()
    return 0
