"""`selfplay train`: prepare the run directory (SFT and the initial critic when missing), then self-play rounds from
the latest complete checkpoint to run.rounds, a checkpoint every run.checkpoint_every rounds, and the final table.

Where it runs: jax.distributed starts when the config or environment asks for several processes; every device
array lives on the ("data", "fsdp", "tensor") mesh of `mesh` (selfplay.sharding), so on one device this is a plain
single-device run, bit for bit. Many hosts: every process draws the same prompts and feeds its devices their rows;
only the logging process writes TensorBoard, eval.json and the console; every process saves and restores the
checkpoints. SFT and the initial critic are single-device jobs: a multi-process run needs a run directory with both.

Run directory: config.yaml, tokenizer.json, policy/ (the SFT or imported policy, also the frozen reference), critic/
(the initial critic; none when reward.critic_weight is 0), checkpoints/ (RunState per saved round), tb/ (TensorBoard
+ metrics.jsonl of the rounds; tb/sft and tb/critic for the SFT and critic curves), eval_sft.json, eval.json (the final
comparison table).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
from rich.console import Console

from selfplay import checkpoint, sharding
from selfplay.config import Config, UserError, save_config, uses_critic
from selfplay.critic import CRITIC_DIR, has_critic
from selfplay.jobs.critic import train_critic
from selfplay.jobs.sft import pretrain
from selfplay.policy import has_policy
from selfplay.run.evaluate import EVAL_FILE, evaluate, print_table, sft_column, sft_evaluation
from selfplay.run.lock import RunLock
from selfplay.run.round import Setup, run_round
from selfplay.run.setup import CHECKPOINT_DIR, TB_DIR, build, check_inputs, check_run_dir, resolve_config, start_distributed
from selfplay.run.state import RunState
from selfplay.run.task import sft_corpus
from selfplay.tracking import ProgressBar, Tracker, json_safe

DAMAGED_DIR = "checkpoints.damaged"
MAX_NONFINITE_ROUNDS = 3  # rounds in a row whose update was skipped as non-finite before the run stops


def train(
    run_dir: str | Path,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    console: Console | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """`selfplay train` on `devices` (default: every device of every process). Returns what eval.json holds."""
    run_dir = Path(run_dir)
    start_distributed(run_dir, config_path, list(overrides or []))
    logging_process = sharding.is_logging_process()
    console = console if console is not None and logging_process else Console(quiet=not logging_process)
    progress = progress and logging_process
    cfg = resolve_config(run_dir, config_path, list(overrides or []))
    check_inputs(cfg, run_dir)
    check_run_dir(cfg, run_dir)
    # One run per directory: the logging process holds the lock for all processes of a multi-process run.
    with RunLock(run_dir) if logging_process else contextlib.nullcontext():
        return _train(cfg, run_dir, devices, progress=progress, console=console, logging_process=logging_process)


def _train(cfg: Config, run_dir: Path, devices: Sequence[jax.Device] | None, *, progress: bool, console: Console,
           logging_process: bool) -> dict:
    t_run = time.perf_counter()
    prepare(cfg, run_dir, progress=progress, console=console, logging_process=logging_process)
    setup, run = build(cfg, run_dir, sharding.Layout.from_config(cfg.mesh, devices))
    sft_eval = sft_evaluation(setup, run.critic, run_dir, write=logging_process)
    run.monitor.sft_distinct_2 = sft_eval.get("diversity/distinct_2")
    best = "gold/score" if setup.task.world is not None else "reward/mean"
    with checkpoint.Checkpointer(run_dir / CHECKPOINT_DIR, keep_last=cfg.run.keep_checkpoints, best_metric=best) as ckpt:
        start_round = resume(run, ckpt, run_dir, cfg.run.rounds, console.print)
        with Tracker(run_dir / TB_DIR, enabled=logging_process, resume_from=start_round) as tracker:
            stopped_by, last_metrics = rounds(setup, run, ckpt, tracker, best, progress=progress, console=console)

    final_eval = evaluate(setup, run.learner.params, run.critic)
    sft_eval = sft_column(sft_eval, setup, run.critic)
    result = {
        "rounds": cfg.run.rounds,
        "stopped_by_alarm": stopped_by,
        "seconds": round(time.perf_counter() - t_run, 1),
        "skipped_nonfinite": run.skipped_nonfinite,
        "sft": sft_eval,
        "final": final_eval,
        "last_round": {k: v for k, v in last_metrics.items() if isinstance(v, (int, float))} or previous_last_round(run_dir),
    }
    if logging_process:
        (run_dir / EVAL_FILE).write_text(json.dumps(json_safe(result), indent=2))
        done = start_round if stopped_by is None and start_round >= cfg.run.rounds else cfg.run.rounds
        print_table(sft_eval, final_eval, f"SFT vs after {done} rounds", console)
    return result


def previous_last_round(run_dir: Path) -> dict:
    """The last round's figures an earlier run of this directory reported (a finished run run again trains no round)."""
    path = run_dir / EVAL_FILE
    return json.loads(path.read_text()).get("last_round", {}) if path.is_file() else {}


def prepare(cfg: Config, run_dir: Path, *, progress: bool, console: Console, logging_process: bool) -> None:
    """The policy and the critic the rounds start from: SFT and the initial critic when the run directory lacks them
    (single-process jobs), and the resolved config.yaml."""
    log = console.print
    need_policy = not has_policy(run_dir)
    need_critic = uses_critic(cfg) and cfg.reward.critic_weight > 0 and not has_critic(run_dir / CRITIC_DIR)
    if (need_policy or need_critic) and jax.process_count() > 1:
        raise UserError(
            f"{run_dir} has no {'policy' if need_policy else 'critic'}; on several processes `selfplay train` runs only the "
            "self-play rounds: prepare the run directory on one host first (`selfplay pretrain` or `selfplay import-hf`, "
            "then `selfplay critic train`)"
        )
    if need_policy:
        if cfg.run.prompts_file:
            raise UserError(f"{run_dir} has no policy; bring one with `selfplay import-hf` or `selfplay pretrain` first")
        log(f"[bold]1/3 SFT[/bold]: no policy in the run directory, pretraining one on {sft_corpus(cfg)[2]}")
        pretrain(cfg, run_dir, progress=progress, log=log, console=console)
    if logging_process:
        save_config(cfg, run_dir)
    if need_critic:
        what = "fitting the self-judging critic" if cfg.critic.judge else "training the reward model"
        log(f"[bold]2/3 critic[/bold]: {what} on labelled pairs of the policy's essays")
        train_critic(cfg, run_dir, pairs_file=cfg.run.pairs_file or None, progress=progress, log=log, console=console)
    elif cfg.run.reward_source != "critic":
        log(f"[bold]2/3 critic[/bold]: none, run.reward_source={cfg.run.reward_source} rewards without one")
    elif not uses_critic(cfg):
        log("[bold]2/3 critic[/bold]: none, reward.critic_weight is 0 and no refresh trains one")
    elif cfg.reward.critic_weight == 0 and not has_critic(run_dir / CRITIC_DIR):
        log("[bold]2/3 critic[/bold]: skipped, reward.critic_weight is 0 (refreshes train one from untrained, its score only logged)")


def resume(run: RunState, ckpt: checkpoint.Checkpointer, run_dir: Path, rounds: int, log: Callable[[str], None]) -> int:
    """Restore the newest intact checkpoint into `run`, if there is one; returns the round it ends (of `rounds`).
    A damaged newer one is moved aside to checkpoints.damaged/ (never deleted; the run saves that round again)."""
    steps = ckpt.steps()
    for i, step in enumerate(reversed(steps)):
        try:
            run.restore(ckpt, step)
        except checkpoint.CheckpointError as e:
            aside = run_dir / DAMAGED_DIR / str(step)
            if jax.process_index() == 0:
                aside.parent.mkdir(parents=True, exist_ok=True)
                (ckpt.directory / str(step)).rename(aside)
            ckpt.steps()  # orbax re-reads the directory: that step is gone
            log(f"[bold red]checkpoint {step} skipped[/bold red] and kept in {aside}: {e}")
            if i == len(steps) - 1:
                raise UserError(f"no intact checkpoint in {ckpt.directory}; the damaged ones are kept in {aside.parent}") from None
            continue
        log(f"resuming {run_dir} after round {run.round} (latest complete checkpoint)")
        break
    if run.round >= rounds:
        log(f"{run_dir} has already run {run.round} of run.rounds={rounds} rounds; raise run.rounds to continue")
    return run.round


def rounds(
    setup: Setup, run: RunState, ckpt: checkpoint.Checkpointer, tracker: Tracker, best: str, *, progress: bool, console: Console
) -> tuple[str | None, dict]:
    """Rounds after run.round up to run.rounds: log, watch, checkpoint. Returns (the alarm that stopped the run or
    None, the last round's metrics)."""
    cfg, rc, log = setup.cfg, setup.cfg.run, console.print
    if run.round >= rc.rounds:
        return None, {}
    log(f"[bold]3/3 self-play[/bold]: rounds {run.round + 1}..{rc.rounds}, "
        f"{cfg.actor.prompts_per_round} prompts x {cfg.actor.samples_per_prompt} completions each")
    metrics: dict = {}
    bad_rounds = 0
    with ProgressBar("round", rc.rounds, completed=run.round, enabled=progress, console=console, remaining=False) as bar:
        for rnd in range(run.round + 1, rc.rounds + 1):
            result = run_round(setup, run, rnd)
            run.round, metrics = rnd, result.metrics
            run.skipped_nonfinite += int(metrics["skipped_nonfinite"])
            metrics["skipped_nonfinite_total"] = run.skipped_nonfinite
            bad_rounds = bad_rounds + 1 if metrics["skipped_nonfinite"] else 0
            if bad_rounds >= MAX_NONFINITE_ROUNDS:
                raise UserError(
                    f"round {rnd}: the update was non-finite (and skipped) {bad_rounds} rounds in a row; stopping, the last "
                    f"good checkpoint is kept in {ckpt.directory} (lower learner.lr, or check the rewards)"
                )
            alarms, alarm_scalars = run.monitor.observe(metrics)
            metrics |= alarm_scalars
            for a in alarms:
                log(f"[bold yellow]alarm[/bold yellow] round {rnd}: {a.message}")
            if result.refreshed:  # later rounds are scored by the retrained critic
                run.monitor.critic_changed()
            if rnd % rc.log_every == 0 or rnd == rc.rounds:
                tracker.scalars(rnd, metrics)
                tracker.histogram(rnd, "reward/hist", result.rewards_b)
                tracker.text(rnd, "essays", result.text)
                tracker.flush()
            gold = f"  gold {metrics['gold/score']:.3f}" if "gold/score" in metrics else ""
            bar.update(1, f"reward {metrics['reward/mean']:+.3f}{gold}  kl {metrics['kl']:.4f}  {metrics['perf/tokens_per_s']:.0f} tok/s")
            if not progress:
                log(f"round {rnd}/{rc.rounds}: reward {metrics['reward/mean']:+.3f}{gold}  kl {metrics['kl']:.4f}")
            stop = bool(alarms) and cfg.monitor.stop_on_alarm
            if rnd % rc.checkpoint_every == 0 or rnd == rc.rounds or stop:
                try:
                    run.save(ckpt, {best: metrics.get(best, float("nan"))})
                except checkpoint.CheckpointError as e:  # a state that cannot be saved must not train on unsaved
                    raise UserError(f"round {rnd}: {e}; stopping") from None
            if stop:
                log(f"stopping: monitor.stop_on_alarm is set and the {alarms[0].name} alarm fired")
                return alarms[0].name, metrics
    return None, metrics
