"""The self-play loop behind `selfplay train`: host-side orchestration only, no math.

    prompts -> actor.sample -> critic.score -> reference log-probs -> learner.update (+ human examples, learner.ptx_coef)
    every critic.refresh_every rounds: critic.refresh on the policy's own samples
    every round: gold grader (when the world is the task), diversity, alarms -> TensorBoard
    every run.checkpoint_every rounds and at the end: one orbax checkpoint of everything needed to resume exactly

Where it runs: `train` starts jax.distributed when the config or environment asks for several processes, then
builds the ("data", "fsdp", "tensor") mesh from `mesh` (a `sharding.Layout`). Every device array lives on it: the
policy and frozen reference params load straight into their shards, the learner state (params, optimiser moments,
PPO value params) and the critic state are placed by their logical axis names, rollouts and rewards are split over
the batch axes, and the update step, reference log-probs and the critic's score/train steps are pinned to those
shardings (selfplay.sharding). On one device that is today's single-device run, bit for bit.

Many hosts: every process draws the same prompts from the same seed and feeds its devices their rows; host-side
work that needs whole arrays (decoding for the gold grader, diversity, the tables) reads them gathered
(`sharding.to_host`); only the logging process writes TensorBoard, eval.json, eval_sft.json and the console; every
process saves and restores the orbax checkpoints (restore targets carry the shardings, so a run resumes on another
mesh). SFT and the initial critic are single-device jobs: a multi-process run needs a run directory that has them.

Run-directory layout: config.yaml, tokenizer.json, policy/ (the SFT or imported policy, also the frozen
reference), critic/ (the initial critic), checkpoints/ (the loop's state), tb/ (TensorBoard + metrics.jsonl),
eval.json (the final comparison table).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from selfplay import checkpoint, critic as C, learner, sharding
from selfplay.config import Config, ConfigError, UserError, load_config, save_config, to_dict
from selfplay.critic_cli import CRITIC_DIR, train_critic
from selfplay.data import ExampleStream, PromptStream, read_examples, read_prompts
from selfplay.models import heads, transformer
from selfplay.monitors import Monitor, diversity
from selfplay.policy import CONFIG_FILE, Generator, Policy, has_policy, load_policy
from selfplay.sft import pretrain
from selfplay.tracking import Tracker
from selfplay.types import Rollout
from selfplay.world.essays import World, mean_scores

CHECKPOINT_DIR = "checkpoints"
TB_DIR = "tb"
EVAL_FILE = "eval.json"
SFT_EVAL_FILE = "eval_sft.json"

# Keys a resumed run may change: how long it runs and how it reports, never what it computes. Every `mesh.*` key
# may change too: the layout moves arrays between devices, it does not change the maths (only float rounding).
RESUMABLE_CHANGES = ("run.rounds", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "monitor.stop_on_alarm")
RESUMABLE_PREFIXES = ("mesh.",)

_TRAIN_PROMPTS_SEED = 0x7EA1
_EVAL_PROMPTS_SEED = 0xE7A1
_PTX_SEED = 0x97


def _flat_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat_keys(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def config_differences(a: Config, b: Config) -> list[str]:
    fa, fb = _flat_keys(to_dict(a)), _flat_keys(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def resolve_config(run_dir: Path, config_path: str | None, overrides: list[str]) -> Config:
    """The run's config. A run directory that already trained keeps its config.yaml (overrides may change only
    RESUMABLE_CHANGES); one holding just a policy (pretrain, import-hf) keeps that policy's model section."""
    saved_path = run_dir / CONFIG_FILE
    saved = load_config(saved_path) if saved_path.is_file() else None
    if saved is not None and config_path is None:
        cfg = load_config(saved_path, overrides)
    else:
        cfg = load_config(config_path, overrides)
    if saved is None:
        return cfg
    if _has_checkpoint(run_dir):
        diff = [k for k in config_differences(saved, cfg) if k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_PREFIXES)]
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run whose config.yaml differs from the given config in: {', '.join(diff)}. "
                "Resume with the same config (omit --config to reuse the saved one), or use a new run directory"
            )
        return cfg
    if cfg.model != saved.model:
        cfg = dataclasses.replace(cfg, model=saved.model)
    return cfg


def start_distributed(run_dir: Path, config_path: str | None, overrides: list[str]) -> None:
    """`sharding.initialize_distributed` with the mesh section `resolve_config` will pick; it must run before any
    JAX computation, and opening a checkpoint directory (orbax asks for the process index) is one."""
    saved = run_dir / CONFIG_FILE
    path = str(saved) if config_path is None and saved.is_file() else config_path
    sharding.initialize_distributed(load_config(path, overrides))


def _has_checkpoint(run_dir: Path) -> bool:
    d = run_dir / CHECKPOINT_DIR
    if not d.is_dir():
        return False
    with checkpoint.Checkpointer(d, read_only=True) as ckpt:
        return ckpt.latest_step() is not None


# ----------------------------------------------------------------------------------------------
# The pieces a run holds
# ----------------------------------------------------------------------------------------------


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


def make_ptx_stream(cfg: Config, policy: Policy, task: Task) -> ExampleStream | None:
    """The human examples of the learner's pretraining-data term (None when learner.ptx_coef is 0): run.ptx_file,
    else the world's human corpus (the SFT data)."""
    if cfg.learner.ptx_coef <= 0:
        return None
    if cfg.run.ptx_file:
        examples, source = read_examples(cfg.run.ptx_file), cfg.run.ptx_file
    elif task.world is not None:
        examples, source = task.world.corpus(cfg.world.corpus_size), "the world's human corpus"
    else:
        raise ConfigError("learner.ptx_coef > 0 with run.prompts_file needs human examples: set run.ptx_file")
    return ExampleStream(policy.tokenizer, examples, cfg.run.seed + _PTX_SEED, cfg.model.max_seq_len, source)


def make_task(cfg: Config) -> Task:
    if cfg.run.prompts_file:
        prompts = read_prompts(cfg.run.prompts_file)
        n_eval = min(cfg.run.eval_prompts, max(1, len(prompts) // 10))
        return Task(prompts[n_eval:] or prompts, prompts[:n_eval], None)
    world = World.from_config(cfg.world)
    train = world.sample_prompts(cfg.run.train_prompts, np.random.default_rng([cfg.run.seed, _TRAIN_PROMPTS_SEED]))
    evals = world.sample_prompts(cfg.run.eval_prompts, np.random.default_rng([cfg.run.seed, _EVAL_PROMPTS_SEED]))
    return Task(train, evals, world)


class Functions:
    """The compiled functions of a run, one per prompt bucket P (fixed shapes: one compilation each); with a
    `layout`, the update and reference steps are pinned to its mesh."""

    def __init__(self, cfg: Config, policy: Policy, optimizer: Any, value_graphdef: Any, layout: sharding.Layout | None = None):
        self.cfg = cfg
        self.policy = policy
        self.optimizer = optimizer
        self.value_graphdef = value_graphdef
        self.layout = layout
        self.logprob_fn = functools.partial(transformer.token_logprobs, policy.graphdef)
        self._update: dict[int, Callable] = {}
        self._reference: dict[int, Callable] = {}
        self._logprobs: dict[int, Callable] = {}

    def value_fn(self, vparams: Any, tokens_bl: jax.Array, positions_bl: jax.Array, valid_bl: jax.Array) -> jax.Array:
        return nnx.merge(self.value_graphdef, vparams)(tokens_bl, positions_bl, valid_bl)

    def update(self, p: int) -> Callable:
        if p not in self._update:
            step = learner.make_update_step(
                self.cfg.learner,
                group_size=self.cfg.actor.samples_per_prompt,
                prompt_width=p,
                logprob_fn=self.logprob_fn,
                value_fn=self.value_fn if self.cfg.learner.algorithm == "ppo" else None,
                optimizer=self.optimizer,
                actor_cfg=self.cfg.actor,
            )
            self._update[p] = step if self.layout is None else self.layout.update_step(step)
        return self._update[p]

    def reference(self, p: int) -> Callable:
        if p not in self._reference:
            step = learner.make_reference_logprobs(self.logprob_fn, prompt_width=p)
            self._reference[p] = step if self.layout is None else self.layout.reference_step(step)
        return self._reference[p]

    def place_batch(self, x_b: np.ndarray) -> jax.Array:
        """A whole per-row host array (e.g. gold rewards) on the device(s), split like the rollout's rows."""
        return jnp.asarray(x_b) if self.layout is None else self.layout.place_batch(x_b)


def load_run_critic(run_dir: Path, cfg: Config, policy: Policy, task: Task, layout: sharding.Layout) -> C.Critic:
    """The run's critic, its state read straight into its shards and its score/train steps pinned to the mesh."""
    critic = C.load_critic(run_dir / CRITIC_DIR, cfg, policy.tokenizer, world=task.world, layout=layout)
    c = critic.ccfg
    critic.fns = layout.critic_fns(critic.fns, critic.state, members=c.ensemble_size, rows=2 * c.batch_size)
    return critic


def init_state(cfg: Config, policy: Policy, optimizer: Any, layout: sharding.Layout | None = None) -> tuple[learner.TrainState, Any]:
    """A fresh learner state from the policy; with PPO a value model initialised from the policy's trunk. With a
    `layout` every leaf is then placed by its logical axes (moments follow their params; counters replicated)."""
    value_params, value_graphdef = None, None
    if cfg.learner.algorithm == "ppo":
        vm = heads.ValueModel(cfg.model, rngs=nnx.Rngs(params=jax.random.key(cfg.run.seed + 1)))
        nnx.update(vm.trunk, policy.params)
        value_graphdef, value_params = nnx.split(vm, nnx.Param)
    state = learner.init_train_state(cfg.learner, policy.params, optimizer=optimizer, value_params=value_params)
    if layout is not None:
        state = layout.place_state(state)
    return state, value_graphdef


# ----------------------------------------------------------------------------------------------
# Evaluation: the table comparing the SFT policy with a trained one
# ----------------------------------------------------------------------------------------------

EVAL_SAMPLES_PER_PROMPT = 2  # two essays per prompt: pairs for the critic's agreement with gold


def evaluate(
    cfg: Config, gen: Generator, params: Any, ref_params: Any, critic: C.Critic, task: Task, fns: Functions
) -> dict[str, float]:
    """Gold score and sub-scores, diversity, length, the critic's agreement with gold, and KL to the reference
    on the held-out prompts (fixed seed, so every checkpoint is judged on the same draws)."""
    prompts = task.eval_prompts
    g = EVAL_SAMPLES_PER_PROMPT
    key = jax.random.fold_in(jax.random.key(cfg.run.seed), _EVAL_PROMPTS_SEED)
    essays: list[str] = []
    lengths: list[float] = []
    kls: list[float] = []
    rewards: list[np.ndarray] = []
    raws: list[np.ndarray] = []
    for c, start in enumerate(range(0, len(prompts), gen.batch)):
        chunk = list(prompts[start : start + gen.batch])
        real = len(chunk)
        chunk += [chunk[-1]] * (gen.batch - real)
        rollout, p = gen.rollout(params, chunk, jax.random.fold_in(key, c), g)
        n = real * g
        essays += gen.completions(rollout, p)[:n]
        lp, _ = fns.logprob_fn(params, *_inputs(rollout, p))
        ref = fns.reference(p)(ref_params, rollout)
        scores = critic.fns.score(critic.state, rollout, p)
        mask, delta, reward, raw = sharding.to_host((rollout.completion_mask_bl, lp - ref, scores.rewards_b, C.raw_rewards(critic.ccfg, scores)))
        mask = mask[:n]
        lengths += list(mask.sum(1))
        kls += list((delta[:n] * mask).sum(1))
        rewards.append(reward[:n])
        raws.append(raw[:n])
    rep = [p for p in prompts for _ in range(g)]
    out: dict[str, float] = {}
    grades = task.grades(rep, essays)
    if grades is not None:
        out |= {f"gold/{k}": v for k, v in mean_scores(grades).items()}
        agreement = _pair_agreement(np.concatenate(rewards), np.array([x.score for x in grades]), g)
        if agreement is not None:
            out["critic/accuracy"] = agreement
    out |= diversity(essays)
    out["completions/mean_length"] = float(np.mean(lengths))
    out["kl/sequence"] = float(np.mean(kls))
    out["reward/mean"] = float(np.mean(np.concatenate(rewards)))
    out["reward/raw_mean"] = float(np.mean(np.concatenate(raws)))
    return out


CRITIC_KEYS = ("reward/mean", "reward/raw_mean", "critic/accuracy")


def sft_column(sft_eval: dict, cfg: Config, gen: Generator, ref_params: Any, critic: C.Critic, task: Task, fns: Functions) -> dict:
    """The table's SFT column next to a policy judged by `critic`: once the critic has been refreshed its scores
    have another scale, so the SFT policy's critic rows are scored again by it (the gold rows are kept)."""
    if critic.refreshes == 0:
        return sft_eval
    again = evaluate(cfg, gen, ref_params, ref_params, critic, task, fns)
    return sft_eval | {k: again[k] for k in CRITIC_KEYS if k in again}


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


def print_table(sft: dict, final: dict, title: str, console: Console | None = None) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("held-out prompts")
    table.add_column("SFT", justify="right")
    table.add_column("final", justify="right")
    table.add_column("change", justify="right")
    for key, name, _ in TABLE_ROWS:
        if key not in sft and key not in final:
            continue
        a, b = sft.get(key, float("nan")), final.get(key, float("nan"))
        table.add_row(name, f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}")
    (console or Console()).print(table)


# ----------------------------------------------------------------------------------------------
# Checkpoints of the loop
# ----------------------------------------------------------------------------------------------


def _inputs(rollout: Rollout, p: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return rollout.tokens_bl, rollout.positions_bl(p), rollout.valid_mask_bl(p)


def _device_state(state: learner.TrainState, critic: C.Critic, key: jax.Array) -> dict:
    return {"learner": state, "critic": critic.state, "key": jax.random.key_data(key)}


def _abstract(tree: Any) -> Any:
    """A restore target: each leaf's shape, dtype and sharding (the array comes back where the fresh one lives)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _critic_meta(critic: C.Critic) -> dict:
    """The critic's host-side state: label counters, labeller stream, refresh count, and the whole pair pool."""
    pool = [[p.prompt, p.chosen, p.rejected, h] for p, h in zip(critic.pool.pairs, critic.pool.heldout)]
    return C.critic_meta(critic) | {"pool": pool}


def _restore_critic_meta(critic: C.Critic, meta: dict) -> None:
    critic.refreshes = int(meta["refreshes"])
    if critic.labeller is not None and meta.get("labeller"):
        critic.labeller.load_state_dict(meta["labeller"])
    old = critic.pool
    critic.pool = C.PairPool(old.tokenizer, old.max_len, old.heldout_fraction, old.seed)
    rows = meta["pool"]
    critic.pool.add([C.Pair(p, c, r) for p, c, r, _ in rows], [bool(h) for *_, h in rows])


def save_round(
    ckpt: checkpoint.Checkpointer, rnd: int, state: learner.TrainState, critic: C.Critic, key: jax.Array, meta: dict, metrics: dict
) -> None:
    flat = checkpoint.flatten_tree(_device_state(state, critic, key))
    ckpt.save(rnd, flat, meta, metrics=metrics)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def train(
    run_dir: str | Path,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    console: Console | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """`selfplay train`: SFT (unless the run directory has a policy), the initial critic (unless it has one),
    then self-play rounds from the latest complete checkpoint to run.rounds. Returns the final eval table.

    The rounds run on the mesh of `mesh` over `devices` (default: every device of every process)."""
    run_dir = Path(run_dir)
    start_distributed(run_dir, config_path, list(overrides or []))
    logging_process = sharding.is_logging_process()
    console = console if console is not None and logging_process else Console(quiet=not logging_process)
    progress = progress and logging_process
    log = console.print
    cfg = resolve_config(run_dir, config_path, list(overrides or []))
    layout = sharding.Layout.from_config(cfg.mesh, devices)
    rc = cfg.run
    if cfg.actor.prompts_per_round * cfg.actor.samples_per_prompt % cfg.learner.minibatches:
        raise ConfigError(
            f"actor.prompts_per_round x actor.samples_per_prompt ({cfg.actor.prompts_per_round * cfg.actor.samples_per_prompt}) "
            f"must be divisible by learner.minibatches ({cfg.learner.minibatches})"
        )
    t_run = time.perf_counter()

    need_policy, need_critic = not has_policy(run_dir), not C.has_critic(run_dir / CRITIC_DIR)
    if (need_policy or need_critic) and jax.process_count() > 1:
        raise UserError(
            f"{run_dir} has no {'policy' if need_policy else 'critic'}; on several processes `selfplay train` runs only the "
            "self-play rounds: prepare the run directory on one host first (`selfplay pretrain` or `selfplay import-hf`, "
            "then `selfplay critic train`)"
        )
    if need_policy:
        if rc.prompts_file:
            raise UserError(f"{run_dir} has no policy; bring one with `selfplay import-hf` or `selfplay pretrain` first")
        log("[bold]1/3 SFT[/bold]: no policy in the run directory, pretraining one on the world's human corpus")
        pretrain(cfg, run_dir, progress=progress, log=log)
    policy = load_policy(run_dir, cfg, layout=layout)
    if logging_process:
        save_config(cfg, run_dir)
    task = make_task(cfg)

    if need_critic:
        log("[bold]2/3 critic[/bold]: training the reward model on labelled pairs of the policy's essays")
        train_critic(cfg, run_dir, pairs_file=rc.pairs_file or None, progress=progress, log=log)
    critic = load_run_critic(run_dir, cfg, policy, task, layout)
    refresh_source = None
    if cfg.critic.refresh_every and task.world is not None and cfg.critic.label_source != "file":
        critic_gen = Generator(policy, cfg.actor, batch=cfg.critic.batch_size, layout=layout)
        refresh_source = C.PairSource(task.world, C.generator_sample_fn(critic_gen), cfg.critic.label_source, cfg.critic.batch_size)

    ref_params = policy.params
    optimizer = learner.make_optimizer(cfg.learner, learner.num_optimizer_updates(cfg.learner, rc.rounds))
    state, value_graphdef = init_state(cfg, policy, optimizer, layout)
    fns = Functions(cfg, policy, optimizer, value_graphdef, layout)
    gen = Generator(policy, cfg.actor, batch=cfg.actor.prompts_per_round, layout=layout)
    key = sharding.place(jax.random.key(rc.seed), layout.replicated)
    stream = PromptStream(len(task.train_prompts), rc.seed)
    ptx = make_ptx_stream(cfg, policy, task)
    monitor = Monitor(cfg.monitor)
    start_round, skipped_total = 0, 0

    sft_eval_path = run_dir / SFT_EVAL_FILE
    if sft_eval_path.is_file():
        sft_eval = json.loads(sft_eval_path.read_text())
    else:
        sft_eval = evaluate(cfg, gen, ref_params, ref_params, critic, task, fns)
        if logging_process:
            sft_eval_path.write_text(json.dumps(sft_eval, indent=2))
    monitor.sft_distinct_2 = sft_eval.get("diversity/distinct_2")

    best = "gold/score" if task.world is not None else "reward/mean"
    ckpt = checkpoint.Checkpointer(run_dir / CHECKPOINT_DIR, keep_last=rc.keep_checkpoints, best_metric=best)
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = checkpoint.flatten_tree(_abstract(_device_state(state, critic, key)))
        flat, meta = ckpt.restore(latest, abstract)
        restored = checkpoint.unflatten_like(_abstract(_device_state(state, critic, key)), flat)
        state, critic.state = restored["learner"], restored["critic"]
        key = jax.random.wrap_key_data(restored["key"])
        start_round = int(meta["round"])
        stream.position = int(meta["prompt_position"])
        if ptx is not None:
            ptx.position = int(meta["ptx_position"])
        monitor.load_state_dict(meta["monitor"])
        skipped_total = int(meta["skipped_nonfinite"])
        _restore_critic_meta(critic, meta["critic"])
        log(f"resuming {run_dir} after round {start_round} (latest complete checkpoint)")
    if start_round >= rc.rounds:
        log(f"{run_dir} has already run {start_round} of run.rounds={rc.rounds} rounds; raise run.rounds to continue")

    tracker = Tracker(run_dir / TB_DIR, enabled=logging_process)
    n_prompts, g = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt
    stopped_by: str | None = None
    last_metrics: dict = {}
    if start_round < rc.rounds:
        log(f"[bold]3/3 self-play[/bold]: rounds {start_round + 1}..{rc.rounds}, {n_prompts} prompts x {g} essays each")
    columns = [TextColumn("round"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            task_id = bar.add_task("rounds", total=rc.rounds, completed=start_round, status="")
            for rnd in range(start_round + 1, rc.rounds + 1):
                metrics, samples = run_round(cfg, rnd, key, state, critic, ref_params, stream, task, gen, fns, refresh_source, ptx)
                state = samples.pop("state")
                skipped_total += int(metrics["skipped_nonfinite"])
                metrics["skipped_nonfinite_total"] = skipped_total
                alarms, alarm_scalars = monitor.observe(metrics)
                metrics |= alarm_scalars
                for a in alarms:
                    log(f"[bold yellow]alarm[/bold yellow] round {rnd}: {a.message}")
                if samples["refreshed"]:  # later rounds are scored by the retrained critic
                    monitor.critic_changed()
                if rnd % rc.log_every == 0 or rnd == rc.rounds:
                    tracker.scalars(rnd, metrics)
                    tracker.histogram(rnd, "reward/hist", samples["rewards"])
                    tracker.text(rnd, "essays", samples["text"])
                    tracker.flush()
                last_metrics = metrics
                gold = f"  gold {metrics['gold/score']:.3f}" if "gold/score" in metrics else ""
                bar.update(
                    task_id, advance=1,
                    status=f"reward {metrics['reward/mean']:+.3f}{gold}  kl {metrics['kl']:.4f}  {metrics['perf/tokens_per_s']:.0f} tok/s",
                )
                if not progress:
                    log(f"round {rnd}/{rc.rounds}: reward {metrics['reward/mean']:+.3f}{gold}  kl {metrics['kl']:.4f}")
                stop = bool(alarms) and cfg.monitor.stop_on_alarm
                if rnd % rc.checkpoint_every == 0 or rnd == rc.rounds or stop:
                    meta = {
                        "round": rnd,
                        "prompt_position": stream.position,
                        "ptx_position": ptx.position if ptx is not None else 0,
                        "monitor": monitor.state_dict(),
                        "skipped_nonfinite": skipped_total,
                        "critic": _critic_meta(critic),
                    }
                    try:
                        save_round(ckpt, rnd, state, critic, key, meta, {best: metrics.get(best, float("nan"))})
                    except checkpoint.CheckpointError as e:
                        log(f"[bold red]checkpoint skipped[/bold red]: {e}")
                if stop:
                    stopped_by = alarms[0].name
                    log(f"stopping: monitor.stop_on_alarm is set and the {stopped_by} alarm fired")
                    break
    finally:
        ckpt.close()
        tracker.close()

    final_eval = evaluate(cfg, gen, state.params, ref_params, critic, task, fns)
    sft_eval = sft_column(sft_eval, cfg, gen, ref_params, critic, task, fns)
    result = {
        "rounds": rc.rounds,
        "stopped_by_alarm": stopped_by,
        "seconds": round(time.perf_counter() - t_run, 1),
        "skipped_nonfinite": skipped_total,
        "sft": sft_eval,
        "final": final_eval,
        "last_round": {k: v for k, v in last_metrics.items() if isinstance(v, (int, float))},
    }
    if logging_process:
        (run_dir / EVAL_FILE).write_text(json.dumps(_json_safe(result), indent=2))
        print_table(sft_eval, final_eval, f"SFT vs after {start_round if stopped_by is None and start_round >= rc.rounds else rc.rounds} rounds", console)
    return result


def run_round(
    cfg: Config,
    rnd: int,
    key: jax.Array,
    state: learner.TrainState,
    critic: C.Critic,
    ref_params: Any,
    stream: PromptStream,
    task: Task,
    gen: Generator,
    fns: Functions,
    refresh_source: C.PairSource | None,
    ptx: ExampleStream | None = None,
) -> tuple[dict[str, float], dict]:
    """One self-play round; returns (metrics, {"state": the new learner state, "rewards", "text", "refreshed":
    whether the critic was retrained at its end})."""
    n_prompts, g = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt
    key_r = jax.random.fold_in(key, rnd)
    timing: dict[str, float] = {}
    t_round = time.perf_counter()

    t = time.perf_counter()
    prompts = [task.train_prompts[i] for i in stream.take(n_prompts)]
    rollout, p = gen.rollout(state.params, prompts, jax.random.fold_in(key_r, 0), g)
    jax.block_until_ready(rollout)
    timing["timing/rollout"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = critic.fns.score(critic.state, rollout, p)
    critic.state = critic.fns.observe(critic.state, scores.members_kb)
    rewards_b = jax.block_until_ready(scores.rewards_b)
    raw_b = C.raw_rewards(critic.ccfg, scores)
    timing["timing/score"] = time.perf_counter() - t

    t = time.perf_counter()
    ref_lp = jax.block_until_ready(fns.reference(p)(ref_params, rollout))
    timing["timing/reference"] = time.perf_counter() - t

    essays = gen.completions(rollout, p)
    rep = [q for q in prompts for _ in range(g)]
    grades = task.grades(rep, essays)
    gold_b = None if grades is None else np.array([x.score for x in grades], np.float32)
    train_rewards = rewards_b
    if cfg.run.reward_source == "gold":
        if gold_b is None:
            raise ConfigError("run.reward_source=gold needs the essay world (no run.prompts_file)")
        train_rewards = fns.place_batch(gold_b)

    t = time.perf_counter()
    ptx_rows = ptx.take(cfg.learner.ptx_batch) if ptx is not None else None
    batch = learner.Batch(rollout, train_rewards, ref_lp, ptx_rows)
    state, m = fns.update(p)(state, batch, jax.random.fold_in(key_r, 1))
    m = jax.device_get(m)
    timing["timing/update"] = time.perf_counter() - t

    metrics: dict[str, float] = {k: float(v) for k, v in m.items()}
    refreshed = refresh_source is not None and rnd % cfg.critic.refresh_every == 0
    if refreshed:
        t = time.perf_counter()
        metrics |= C.refresh(critic, state.params, refresh_source)
        if fns.layout is not None:  # the re-calibrated normaliser is made on the host
            critic.state = fns.layout.place_state(critic.state)
        timing["timing/critic"] = time.perf_counter() - t

    r, raw, mask, eos_b = sharding.to_host((rewards_b, raw_b, rollout.completion_mask_bl, rollout.eos_b))
    n_tokens = float(mask.sum())
    metrics |= {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()),
        "reward/raw_mean": float(raw.mean()),
        "completions/mean_length": n_tokens / len(essays),
        "completions/clipped_ratio": float(1.0 - eos_b.mean()),
    }
    gold_text = [""] * len(essays)
    if grades is not None:
        gold = mean_scores(grades)
        metrics |= {f"gold/{k}": v for k, v in gold.items() if not k.startswith("n_") and not k.startswith("has_")}
        gold_text = [f" · gold {s.score:.2f} (halluc. {s.hallucination_rate:.2f})" for s in grades]
        agreement = _pair_agreement(r, gold_b, g)
        if agreement is not None:
            metrics["critic/accuracy"] = agreement
        elif g >= 2:
            metrics["critic/accuracy"] = float("nan")  # no pair the gold grader could tell apart this round
    metrics |= diversity(essays)
    timing["perf/step_time"] = time.perf_counter() - t_round
    metrics |= timing
    metrics["perf/tokens_per_s"] = n_tokens / max(timing["timing/rollout"], 1e-9)

    shown = range(0, len(essays), max(1, len(essays) // 4))
    text = "\n\n".join(
        f"**prompt:** {rep[i]}\n\n**critic** {r[i]:+.3f}{gold_text[i]}\n\n{essays[i]}" for i in list(shown)[:4]
    )
    return metrics, {"state": state, "rewards": r, "text": text, "refreshed": refreshed}


def _pair_agreement(rewards_b: np.ndarray, gold_b: np.ndarray, g: int) -> float | None:
    """How often the critic orders the first two essays of each prompt as the gold grader does (gold ties left out)."""
    if g < 2:
        return None
    a, b = rewards_b[0::g], rewards_b[1::g]
    ga, gb = gold_b[0::g], gold_b[1::g]
    decided = ga != gb
    return float(np.mean(((a > b) == (ga > gb))[decided])) if decided.any() else None


def evaluate_checkpoint(
    run_dir: str | Path, step: int | None = None, overrides: list[str] | None = None, *, devices: Sequence[jax.Device] | None = None
) -> dict:
    """`selfplay eval`: the SFT-vs-checkpoint table for any saved round (default: the latest), on the run's mesh
    (overrides: `mesh.*` keys, to evaluate on other devices than it trained on)."""
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    start_distributed(run_dir, None, overrides)
    cfg = resolve_config(run_dir, None, overrides)
    layout = sharding.Layout.from_config(cfg.mesh, devices)
    policy = load_policy(run_dir, cfg, layout=layout)
    task = make_task(cfg)
    critic = load_run_critic(run_dir, cfg, policy, task, layout)
    optimizer = learner.make_optimizer(cfg.learner, learner.num_optimizer_updates(cfg.learner, cfg.run.rounds))
    state, value_graphdef = init_state(cfg, policy, optimizer, layout)
    fns = Functions(cfg, policy, optimizer, value_graphdef, layout)
    gen = Generator(policy, cfg.actor, batch=cfg.actor.prompts_per_round, layout=layout)
    key = sharding.place(jax.random.key(cfg.run.seed), layout.replicated)
    with checkpoint.Checkpointer(run_dir / CHECKPOINT_DIR, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{run_dir} has no training checkpoint yet; run `selfplay train --run-dir {run_dir}`")
        template = _abstract(_device_state(state, critic, key))
        flat, meta = ckpt.restore(step, checkpoint.flatten_tree(template))
    restored = checkpoint.unflatten_like(template, flat)
    critic.state = restored["critic"]
    _restore_critic_meta(critic, meta["critic"])
    sft_path = run_dir / SFT_EVAL_FILE
    if sft_path.is_file():
        sft = sft_column(json.loads(sft_path.read_text()), cfg, gen, policy.params, critic, task, fns)
    else:
        sft = evaluate(cfg, gen, policy.params, policy.params, critic, task, fns)
    final = evaluate(cfg, gen, restored["learner"].params, policy.params, critic, task, fns)
    return {"step": step, "sft": sft, "final": final}


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
