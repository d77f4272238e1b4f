"""Judging a policy on the held-out prompts: gold score and sub-scores, the reward functions' means, diversity, length,
the critic's agreement with gold and KL to the reference (`evaluate`); the SFT-vs-trained table; `selfplay eval` of any saved round.
A run without a critic has no critic rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from selfplay import checkpoint, sharding
from selfplay.config import UserError
from selfplay.critic import Critic, raw_rewards, score_texts
from selfplay.data import fixed_chunks
from selfplay.monitors import diversity
from selfplay.run.round import Setup, pair_agreement
from selfplay.run.setup import CHECKPOINT_DIR, build, resolve_config, start_distributed
from selfplay.run.task import EVAL_PROMPTS_SEED, EVAL_SAMPLES_PER_PROMPT
from selfplay.world import mean_scores

EVAL_FILE = "eval.json"
SFT_EVAL_FILE = "eval_sft.json"
CRITIC_KEYS = ("reward/mean", "reward/raw_mean", "critic/accuracy")

TABLE_ROWS = [
    ("gold/score", "gold score", "up"),
    ("gold/coverage", "coverage", "up"),
    ("gold/hallucination_rate", "hallucination rate", "down"),
    ("gold/contradiction_rate", "  contradicting", "down"),
    ("gold/unsupported_rate", "  unsupported", "down"),
    ("gold/repetition_rate", "repetition", "down"),
    ("gold/relevance", "relevance", "up"),
    ("gold/structure", "structure", "up"),
    ("gold/fluency", "fluency", "up"),
    ("diversity/distinct_2", "distinct-2", "up"),
    ("diversity/self_bleu", "self-BLEU", "down"),
    ("completions/mean_length", "mean length (tokens)", ""),
    ("reward/raw_mean", "critic score (raw)", "up"),
    ("critic/accuracy", "critic agrees with gold", "up"),
    ("kl/sequence", "KL to SFT (per essay)", ""),
]


def evaluate(setup: Setup, params: Any, critic: Critic | None) -> dict[str, float]:
    """The table's figures for `params` on the held-out prompts (fixed seed, so every checkpoint is judged on the
    same draws); the critic is only read (None: no critic figures)."""
    cfg, gen, task = setup.cfg, setup.gen, setup.task
    g = EVAL_SAMPLES_PER_PROMPT
    key = jax.random.fold_in(jax.random.key(cfg.run.seed), EVAL_PROMPTS_SEED)
    essays: list[str] = []
    lengths: list[float] = []
    kls: list[float] = []
    rewards: list[np.ndarray] = []
    raws: list[np.ndarray] = []
    for c, chunk, real in fixed_chunks(task.eval_prompts, gen.batch):
        rollout, p = gen.rollout(params, chunk, jax.random.fold_in(key, c), g)
        n = real * g
        texts = gen.completions(rollout, p)
        essays += texts[:n]
        lp, _ = setup.steps.logprob_fn(params, rollout.tokens_bl, rollout.positions_bl(p), rollout.valid_mask_bl(p))
        ref = setup.steps.reference(p)(setup.ref_params, rollout)
        mask, delta = sharding.to_host((rollout.completion_mask_bl, lp - ref))
        mask = mask[:n]
        lengths += list(mask.sum(1))
        kls += list((delta[:n] * mask).sum(1))
        if critic is not None and critic.ccfg.judge:  # a judge reads the decoded essays
            scores = score_texts(critic, [q for q in chunk for _ in range(g)], texts)
            reward, raw = scores.rewards_b, scores.members_kb[0]
        elif critic is not None:
            scores = critic.fns.score(critic.state, rollout, p)
            reward, raw = sharding.to_host((scores.rewards_b, raw_rewards(critic.ccfg, scores)))
        if critic is not None:
            rewards.append(reward[:n])
            raws.append(raw[:n])
    rep = [p for p in task.eval_prompts for _ in range(g)]
    critic_b = np.concatenate(rewards) if critic is not None else None
    out: dict[str, float] = {}
    grades = task.grades(rep, essays)
    if grades is not None:
        out |= {f"gold/{k}": v for k, v in mean_scores(grades).items()}
    if grades is not None and critic_b is not None:
        agreement = pair_agreement(critic_b, np.array([x.score for x in grades]), g)
        if agreement is not None:
            out["critic/accuracy"] = agreement
    if setup.rewards.fns:  # e.g. the arithmetic task's held-out accuracy, rewards/exact_answer/mean
        r_fb = setup.rewards.call(rep, essays, task.columns(range(len(task.eval_prompts)), g, held_out=True), rnd=None)
        fn_metrics = setup.rewards.metrics(critic_b, r_fb, setup.rewards.total(critic_b, r_fb))
        out |= {k: v for k, v in fn_metrics.items() if k.startswith("rewards/")}
    out |= diversity(essays)
    out["completions/mean_length"] = float(np.mean(lengths))
    out["kl/sequence"] = float(np.mean(kls))
    if critic_b is not None:
        out["reward/mean"] = float(np.mean(critic_b))
        out["reward/raw_mean"] = float(np.mean(np.concatenate(raws)))
    return out


def sft_evaluation(setup: Setup, critic: Critic | None, run_dir: Path, *, write: bool) -> dict:
    """The SFT policy's figures, computed once per run directory and kept in eval_sft.json (`write`: this process
    writes files)."""
    path = run_dir / SFT_EVAL_FILE
    if path.is_file():
        return json.loads(path.read_text())
    out = evaluate(setup, setup.ref_params, critic)
    if write:
        path.write_text(json.dumps(out, indent=2))
    return out


def sft_column(sft_eval: dict, setup: Setup, critic: Critic | None) -> dict:
    """The table's SFT column next to a policy judged by `critic`: once the critic has been refreshed its scores
    have another scale, so the SFT policy's critic rows are scored again by it (the gold rows are kept)."""
    if critic is None or critic.refreshes == 0:
        return sft_eval
    again = evaluate(setup, setup.ref_params, critic)
    return sft_eval | {k: again[k] for k in CRITIC_KEYS if k in again}


def print_table(sft: dict, final: dict, title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    table.add_column("held-out prompts")
    table.add_column("SFT", justify="right")
    table.add_column("final", justify="right")
    table.add_column("change", justify="right")
    fn_rows = [(k, f"{k.split('/')[1]} (mean)", "up") for k in sorted(sft.keys() | final.keys()) if k.startswith("rewards/") and k.endswith("/mean")]
    for key, name, _ in fn_rows + TABLE_ROWS:
        if key not in sft and key not in final:
            continue
        a, b = sft.get(key, float("nan")), final.get(key, float("nan"))
        table.add_row(name, f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}")
    (console or Console()).print(table)


def evaluate_checkpoint(
    run_dir: str | Path, step: int | None = None, overrides: list[str] | None = None, *, devices: Sequence[jax.Device] | None = None
) -> dict:
    """`selfplay eval`: the SFT-vs-checkpoint table for any saved round (default: the latest), on the run's mesh
    (overrides: `mesh.*` keys, to evaluate on other devices than it trained on)."""
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    start_distributed(run_dir, None, overrides)
    cfg = resolve_config(run_dir, None, overrides)
    setup, run = build(cfg, run_dir, sharding.Layout.from_config(cfg.mesh, devices))
    with checkpoint.Checkpointer(run_dir / CHECKPOINT_DIR, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{run_dir} has no training checkpoint yet; run `selfplay train --run-dir {run_dir}`")
        run.restore(ckpt, step)
    sft_path = run_dir / SFT_EVAL_FILE
    if sft_path.is_file():
        sft = sft_column(json.loads(sft_path.read_text()), setup, run.critic)
    else:
        sft = evaluate(setup, setup.ref_params, run.critic)
    final = evaluate(setup, run.learner.params, run.critic)
    return {"step": step, "sft": sft, "final": final}
