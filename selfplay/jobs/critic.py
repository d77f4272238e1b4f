"""`selfplay critic train`: label pairs (a preference file, or the world's labeller on the run's own policy samples),
train the reward model, report held-out accuracy and (in the world) Spearman with the gold grader; save to RUN_DIR.

    selfplay pretrain --config configs/tiny.yaml --run-dir runs/tiny
    selfplay critic train --run-dir runs/tiny

Writes RUN_DIR/critic/ (state, meta, pairs.jsonl), RUN_DIR/critic_report.json and the training curve to
RUN_DIR/tb/critic (TensorBoard). A critic brought by `import-hf --critic` is trained further, not replaced.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from rich.console import Console

from selfplay.actor import Generator
from selfplay.config import Config, ConfigError, UserError, to_dict
from selfplay.critic import (
    CRITIC_DIR,
    LABELLED,
    Critic,
    PairSource,
    accuracy_by_kind,
    add_synthetic,
    attach_judge,
    calibrate_normalizer,
    collect_pairs,
    collection_rngs,
    generator_sample_fn,
    init_critic,
    initial_label_count,
    load_critic,
    pair_accuracy,
    read_preference_file,
    save_replacing,
    score_texts,
    spearman,
    train,
)
from selfplay.critic.judge import FEATURES
from selfplay.jobs.import_critic import imported_from, mark_imported
from selfplay.policy import has_policy, load_policy
from selfplay.tracking import Tracker, json_safe
from selfplay.world import World

REPORT_FILE = "critic_report.json"
GOLD_GAP = 0.05  # the pairs a critic is judged on: gold scores at least this far apart (ties and near-ties say little)
TB_DIR = "tb/critic"


def train_critic(
    cfg: Config,
    run_dir: str | Path,
    *,
    pairs_file: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    console: Console | None = None,
) -> dict:
    """Train a critic for the policy in `run_dir` and save it; returns the report (also written as JSON)."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    c = cfg.critic
    kind = "file" if pairs_file is not None else c.label_source
    if kind == "file" and pairs_file is None:
        raise ConfigError("critic.label_source=file needs a preference file: selfplay critic train --pairs FILE.jsonl")
    file_pairs = read_preference_file(pairs_file) if pairs_file is not None else None  # a bad file fails first
    if not has_policy(run_dir):
        raise UserError(f"{run_dir} has no policy ({run_dir / 'policy'}); run `selfplay pretrain --run-dir {run_dir}` first")
    policy = load_policy(run_dir)
    world = World.from_config(cfg.world) if kind != "file" else None
    origin = imported_from(run_dir / CRITIC_DIR)
    if origin is not None and c.judge:
        raise ConfigError(
            f"critic.judge=true fits a head over the policy's judgement, but {run_dir / CRITIC_DIR} holds a reward model "
            f"imported from {origin.get('source')}, which it would never read; set critic.judge=false to train that one further"
        )
    if origin is None:
        critic = init_critic(cfg, policy.tokenizer, world=world, policy_params=policy.params, policy_model=policy.cfg.model)
    else:  # an imported reward model is trained further, never replaced by one trained from scratch
        critic = load_critic(run_dir / CRITIC_DIR, cfg, policy.tokenizer, world=world)
    attach_judge(critic, policy)
    gen = Generator(policy, cfg.actor, batch=c.batch_size)
    seed = cfg.run.seed

    t0 = time.perf_counter()
    stats = {"labels": 0, "skipped_identical": 0, "sampler_calls": 0}
    if file_pairs is not None:
        pairs = file_pairs
    else:
        assert world is not None
        source = PairSource(world, generator_sample_fn(gen), kind, c.batch_size)
        n = initial_label_count(cfg)
        pairs, stats = collect_pairs(source, critic.labeller, policy.params, n, *collection_rngs(seed, 0))
        if len(pairs) < n:
            log(f"critic: only {len(pairs)} of {n} pairs collected ({stats['skipped_identical']} identical samples skipped)")
    critic.pool.add(pairs)
    synthetic = add_synthetic(critic, pairs, 0)
    collect_seconds = time.perf_counter() - t0
    if critic.pool.truncated:
        log(f"critic: {critic.pool.truncated} sequence(s) longer than critic.seq_buckets max ({c.seq_buckets[-1]}) keep only their last tokens")

    t0 = time.perf_counter()
    history = train(critic, c.steps, progress=progress, console=console)
    calibrate_normalizer(critic)
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    held_idx = critic.pool.indices(heldout=True, kind=LABELLED)
    held = pair_accuracy(critic, held_idx)
    labelled = critic.pool.count(LABELLED)
    report: dict = {
        "label_source": kind,
        "pairs": labelled,
        "pairs_train": labelled - len(held_idx),
        "pairs_heldout": len(held_idx),
        "synthetic_pairs": synthetic,
        "tamper_ops": list(c.tamper_ops) if synthetic else [],
        "label_budget": c.label_budget if kind == "world" else None,
        "labels_used": critic.labeller.used if critic.labeller else 0,
        "skipped_identical": stats["skipped_identical"],
        "truncated_sequences": critic.pool.truncated,
        "ensemble_size": c.ensemble_size,
        "combine": c.combine,
        "steps": c.steps,
        "final_loss": history[-1]["loss"] if history else None,
        "train_accuracy": history[-1]["accuracy"] if history else None,
        "heldout_accuracy": held["accuracy"],
        "heldout_member_accuracy": held["member_accuracy"],
        "heldout_accuracy_by_kind": accuracy_by_kind(critic) if synthetic else {},
        "judge_weights": None if critic.judge_head is None else  # per unit of each feature (FEATURES)
        dict(zip(FEATURES, (critic.judge_head.w / critic.judge_head.scale).tolist())),
        "heldout_gold_accuracy": None,
        "heldout_gold_accuracy_clear": None,
        "spearman_gold": None,
    }
    if world is not None:
        report |= _gold_eval(critic, world, gen, held_idx, held, seed)
    eval_seconds = time.perf_counter() - t0

    save_replacing(run_dir / CRITIC_DIR, critic)
    if origin is not None:
        mark_imported(run_dir / CRITIC_DIR, origin)
    report["seconds"] = {
        "collect": round(collect_seconds, 1), "train": round(train_seconds, 1), "eval": round(eval_seconds, 1),
        "total": round(time.perf_counter() - t_start, 1),
    }
    report["critic_config"] = to_dict(c)
    report["history"] = history
    (run_dir / REPORT_FILE).write_text(json.dumps(json_safe(report), indent=2))
    with Tracker(run_dir / TB_DIR) as tb:
        for row in history:
            tb.scalars(row["step"], {"loss/critic": row["loss"], "critic/train_accuracy": row["accuracy"]})
        tb.scalars(c.steps, {f"critic/{k}": report[k] for k in ("heldout_accuracy", "heldout_gold_accuracy", "heldout_gold_accuracy_clear", "spearman_gold") if report[k] is not None})
        tb.scalars(c.steps, {"critic/synthetic_pairs": synthetic} | {f"critic/heldout_accuracy/{k}": v for k, v in report["heldout_accuracy_by_kind"].items()})
    sp = report["spearman_gold"]
    log(
        f"critic: {report['pairs_train']} train / {report['pairs_heldout']} held-out pairs ({kind}"
        + (f", {report['labels_used']} of {c.label_budget} labels" if kind == "world" else "")
        + (f"; {synthetic} self-made pairs ({', '.join(c.tamper_ops)})" if synthetic else "")
        + ("), judge head fitted" if c.judge else f"), {c.steps} steps x {c.ensemble_size} member(s)")
        + f"; held-out accuracy {held['accuracy']:.3f}"
        + (f", Spearman with gold {sp:.3f} on {report['eval_samples']} fresh essays" if sp is not None else "")
        + f"; {report['seconds']['total']:.0f} s; saved to {run_dir / CRITIC_DIR}"
    )
    return report


def _gold_eval(critic: Critic, world: World, gen: Generator, held_idx: np.ndarray, held: dict, seed: int) -> dict:
    """Gold-grader checks: held-out pairs ordered as gold orders them, and Spearman on fresh policy essays."""
    out: dict = {}
    if len(held_idx):
        gold_c = np.array([world.grade(critic.pool.pairs[i].prompt, critic.pool.pairs[i].chosen).score for i in held_idx])
        gold_r = np.array([world.grade(critic.pool.pairs[i].prompt, critic.pool.pairs[i].rejected).score for i in held_idx])
        decided = gold_c != gold_r
        agree = (held["chosen"] > held["rejected"]) == (gold_c > gold_r)
        if decided.any():
            out["heldout_gold_accuracy"] = float(agree[decided].mean())
        clear = np.abs(gold_c - gold_r) >= GOLD_GAP
        if clear.any():
            out["heldout_gold_accuracy_clear"] = float(agree[clear].mean())
            out["heldout_clear_pairs"] = int(clear.sum())
    n = critic.ccfg.eval_samples
    if n:
        prompts = world.sample_prompts(n, np.random.default_rng([seed, 0x5EA7]))
        essays = gen.generate(prompts, jax.random.fold_in(jax.random.key(seed), 0x5EA7), samples_per_prompt=1)
        gold = np.array([world.grade(p, e).score for p, e in zip(prompts, essays)])
        scores = score_texts(critic, prompts, essays).rewards_b
        out["spearman_gold"] = spearman(scores, gold)
        out["eval_samples"] = n
        out["gold_mean_fresh"] = float(gold.mean())
    return out
