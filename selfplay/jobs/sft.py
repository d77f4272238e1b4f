"""Supervised pretraining of the initial (SFT) policy on the essay world's human corpus (or the arithmetic task's
worked examples, run.task=arithmetic).

Next-token loss on the essay tokens only (prompt tokens are context); AdamW with warm-up and cosine
decay, gradient clipping; held-out perplexity; the policy is saved to the run directory, then (in the world) a batch
of sampled essays is graded by the gold grader, so the report shows what flaws the policy inherited.
In the world the policy is also judged along the way where it matters, by the gold grader on the table's held-out
prompts (pretrain.gold_every), so the report shows where more human data stops helping.
The curves go to RUN_DIR/tb/sft (TensorBoard: sft/loss, sft/perplexity, sft/gold/score and the other gold sub-scores,
sft/diversity/distinct_2) and to sft_report.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console

from selfplay.actor import Generator
from selfplay.config import Config, PretrainConfig, UserError
from selfplay.data import minibatches
from selfplay.models import transformer
from selfplay.policy import POLICY_DIR, Policy, clear_incomplete_policy, has_policy, init_policy, save_policy
from selfplay.monitors import diversity
from selfplay.run.task import EVAL_PROMPTS_SEED, EVAL_SAMPLES_PER_PROMPT, sft_corpus, world_eval_prompts
from selfplay.tokenizer import Tokenizer
from selfplay.tracking import ProgressBar, Tracker
from selfplay.world import World, mean_scores

TB_DIR = "tb/sft"

class Packed(NamedTuple):
    """Examples packed end to end into rows of a fixed length (one compilation for the run).

    tokens_bl, loss_mask_bl (1 on essay tokens and EOS), segment_ids_bl (1.. per example, 0 on padding),
    positions_bl (restarting at 0 for each example).
    """

    tokens_bl: np.ndarray
    loss_mask_bl: np.ndarray
    segment_ids_bl: np.ndarray
    positions_bl: np.ndarray


def pack_examples(tokenizer: Tokenizer, pairs: list[tuple[str, str]], seq_len: int) -> Packed:
    """Pack `[bos] prompt [sep] essay [eos]` examples into rows of `seq_len`, first fit in the given order."""
    encoded = [tokenizer.encode_example(p, e) for p, e in pairs]
    shortest = min((len(ids) for ids, _ in encoded), default=1)
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    open_rows: list[int] = []  # rows with room for at least the shortest example, in order: first fit looks only there
    for i, (ids, m) in enumerate(encoded):
        if len(ids) > seq_len:
            raise UserError(f"corpus example {i} has {len(ids)} tokens, more than pretrain.seq_len ({seq_len})")
        for k, r in enumerate(open_rows):
            if room[r] >= len(ids):
                rows[r].append((ids, m))
                room[r] -= len(ids)
                if room[r] < shortest:
                    del open_rows[k]
                break
        else:
            rows.append([(ids, m)])
            room.append(seq_len - len(ids))
            if room[-1] >= shortest:
                open_rows.append(len(rows) - 1)
    shape = (len(rows), seq_len)
    tokens = np.full(shape, tokenizer.pad_id, np.int32)
    mask = np.zeros(shape, np.float32)
    seg = np.zeros(shape, np.int32)
    pos = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for k, (ids, m) in enumerate(row, start=1):
            n = len(ids)
            tokens[r, at : at + n] = ids
            mask[r, at : at + n] = m
            seg[r, at : at + n] = k
            pos[r, at : at + n] = np.arange(n)
            at += n
    return Packed(tokens, mask, seg, pos)


def make_optimizer(pcfg: PretrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=pcfg.lr,
        warmup_steps=pcfg.warmup_steps,
        decay_steps=max(pcfg.steps, pcfg.warmup_steps + 1),
        end_value=pcfg.lr * pcfg.min_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(pcfg.max_grad_norm),
        optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=pcfg.weight_decay),
    )


def make_sft_fns(graphdef: Any, optimizer: optax.GradientTransformation) -> tuple[Callable, Callable]:
    """(train_step, eval_nll): jitted; train_step donates params and optimiser state."""

    def nll(params, batch: Packed):
        logprobs_bl, _ = transformer.token_logprobs(
            graphdef, params, batch.tokens_bl, batch.positions_bl, batch.segment_ids_bl > 0, batch.segment_ids_bl
        )
        return -jnp.sum(logprobs_bl * batch.loss_mask_bl), jnp.sum(batch.loss_mask_bl)

    def loss_fn(params, batch: Packed):
        total, count = nll(params, batch)
        return total / jnp.maximum(count, 1.0)

    def train_step(params, opt_state, batch: Packed):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": opt_state[1].hyperparams["learning_rate"],
        }
        return params, opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(nll)


def sft_fns(graphdef: Any, pcfg: PretrainConfig) -> tuple[optax.GradientTransformation, Callable, Callable]:
    """(the optimiser of `pcfg`, its jitted train_step, eval_nll)."""
    optimizer = make_optimizer(pcfg)
    return (optimizer, *make_sft_fns(graphdef, optimizer))


def _rows(packed: Packed, idx: Any) -> Packed:
    return Packed(*(x[idx] for x in packed))


def heldout_nll(eval_nll: Callable, params: Any, packed: Packed, batch: int) -> float:
    """Mean negative log-likelihood per loss token (nats) over every held-out row; the last batch is filled up with
    rows of no loss token, so one compiled batch size serves them all."""
    total, count = 0.0, 0.0
    n = len(packed.tokens_bl)
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        rows = _rows(packed, np.minimum(idx, n - 1))
        real = (idx < n).astype(np.float32)[:, None]
        t, c = eval_nll(params, rows._replace(loss_mask_bl=rows.loss_mask_bl * real))
        total += float(t)
        count += float(c)
    return total / max(count, 1.0)


def heldout_perplexity(eval_nll: Callable, params: Any, packed: Packed, batch: int) -> float:
    """exp(`heldout_nll`)."""
    return math.exp(heldout_nll(eval_nll, params, packed, batch))

def fit(
    cfg: Config, graphdef: Any, params: Any, train: Packed, held: Packed, rng: np.random.Generator, *,
    desc: str = "pretrain", progress: bool = True, log: Callable[[str], None] = print, console: Console | None = None,
    fns: tuple[optax.GradientTransformation, Callable, Callable] | None = None,
    judge: Callable[[Any], dict] | None = None,
) -> tuple[Any, list[dict], float]:
    """pretrain.steps of next-token training on the packed `train` rows from `params` (minibatches drawn by `rng`);
    returns (params, history: a row every 10 steps, with the held-out perplexity every pretrain.eval_every steps,
    the held-out perplexity before the first step). `fns`: (optimizer, train_step, eval_nll) of `sft_fns`, compiled
    once by a caller that trains many models of one shape; default: built here from `cfg.pretrain`. `judge`: params ->
    figures (`heldout_judge`), called every pretrain.gold_every steps and at the last, kept as the row's "heldout_gold"."""
    pcfg = cfg.pretrain
    optimizer, train_step, eval_nll = fns or sft_fns(graphdef, pcfg)
    opt_state = optimizer.init(params)
    batches = minibatches(len(train.tokens_bl), pcfg.batch_size, rng)

    history: list[dict] = []
    ppl0 = heldout_perplexity(eval_nll, params, held, pcfg.batch_size)
    with ProgressBar(desc, pcfg.steps, enabled=progress, console=console) as bar:
        loss_ema = last_gold = None
        for step in range(1, pcfg.steps + 1):
            idx = next(batches)
            params, opt_state, m = train_step(params, opt_state, _rows(train, idx))
            status = None
            if step % 10 == 0 or step == pcfg.steps:
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise UserError(f"{desc}: training diverged at step {step} (loss {loss}); lower pretrain.lr")
                loss_ema = loss if loss_ema is None else 0.8 * loss_ema + 0.2 * loss
                row = {"step": step, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"])}
                if step % pcfg.eval_every == 0 or step == pcfg.steps:
                    row["heldout_ppl"] = heldout_perplexity(eval_nll, params, held, pcfg.batch_size)
                    if not progress:
                        log(f"{desc} step {step}/{pcfg.steps}: loss {loss:.3f}, held-out perplexity {row['heldout_ppl']:.3f}")
                if judge is not None and ((pcfg.gold_every and step % pcfg.gold_every == 0) or step == pcfg.steps):
                    row["heldout_gold"] = judge(params)
                    if not progress:
                        log(f"{desc} step {step}/{pcfg.steps}: held-out gold {row['heldout_gold']['gold/score']:.3f}")
                history.append(row)
                status = f"loss {loss_ema:.3f}" + (f"  held-out ppl {row['heldout_ppl']:.2f}" if "heldout_ppl" in row else "")
                if "heldout_gold" in row:
                    last_gold = row["heldout_gold"]["gold/score"]
                status += f"  gold {last_gold:.3f}" if last_gold is not None else ""
            bar.update(1, status)
    return params, history, ppl0


def pretrain(
    cfg: Config, run_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print, console: Console | None = None
) -> dict:
    """Train the SFT policy from scratch on the world's corpus and save it to `run_dir`; returns the report."""
    run_dir = Path(run_dir)
    if has_policy(run_dir):
        raise UserError(
            f"{run_dir} already holds a policy ({run_dir / POLICY_DIR}); pretrain into a new run directory, or go on from "
            f"this one with `selfplay train --run-dir {run_dir}`"
        )
    if clear_incomplete_policy(run_dir):
        log(f"pretrain: removed the incomplete policy a killed save left in {run_dir / POLICY_DIR}")
    pcfg = cfg.pretrain
    t0 = time.perf_counter()
    pairs, vocab_size, _ = sft_corpus(cfg)
    tokenizer = Tokenizer.train([p for p, _ in pairs] + [e for _, e in pairs], vocab_size)
    policy = init_policy(cfg, tokenizer, cfg.run.seed)

    n_heldout = max(1, int(len(pairs) * pcfg.heldout_fraction))
    order = np.random.default_rng([cfg.run.seed, 2]).permutation(len(pairs))
    train = pack_examples(tokenizer, [pairs[i] for i in order[n_heldout:]], pcfg.seq_len)
    held = pack_examples(tokenizer, [pairs[i] for i in order[:n_heldout]], pcfg.seq_len)
    if len(train.tokens_bl) < pcfg.batch_size or len(held.tokens_bl) < pcfg.batch_size:
        raise UserError(
            f"the SFT corpus ({len(pairs)} examples, world.corpus_size or arithmetic.corpus_size) packs into {len(train.tokens_bl)} training and {len(held.tokens_bl)} "
            f"held-out rows of pretrain.seq_len ({pcfg.seq_len}), fewer than pretrain.batch_size ({pcfg.batch_size}); "
            "raise world.corpus_size or pretrain.heldout_fraction, or lower pretrain.batch_size"
        )

    world = World.from_config(cfg.world) if cfg.run.task == "essays" else None
    judge = heldout_judge(cfg, policy, world) if world is not None else None
    params, history, ppl0 = fit(cfg, policy.graphdef, policy.params, train, held, np.random.default_rng([cfg.run.seed, 1]),
                                progress=progress, log=log, console=console, judge=judge)
    train_seconds = time.perf_counter() - t0

    policy.params = params
    save_policy(run_dir, cfg, tokenizer, params, meta={"kind": "sft", "steps": pcfg.steps})

    gold = sample_and_grade(policy, world, cfg, n=pcfg.sample_essays, seed=cfg.run.seed + 12345) if world is not None else None
    report = {
        "steps": pcfg.steps,
        "train_seconds": round(train_seconds, 1),
        "examples": len(pairs),
        "packed_rows": int(len(train.tokens_bl)),
        "row_fill": float((train.segment_ids_bl > 0).mean()),
        "heldout_ppl_initial": ppl0,
        "heldout_ppl": history[-1]["heldout_ppl"],
        "final_loss": history[-1]["loss"],
        "vocab_size": tokenizer.vocab_size,
        "gold": gold,
        "heldout_gold": history[-1].get("heldout_gold"),
        "history": history,
    }
    (run_dir / "sft_report.json").write_text(json.dumps(report, indent=2))
    with Tracker(run_dir / TB_DIR) as tb:
        tb.scalars(0, {"sft/perplexity": ppl0})
        for row in history:
            tb.scalars(row["step"], {"sft/loss": row["loss"], "sft/lr": row["lr"], "sft/grad_norm": row["grad_norm"]}
                       | ({"sft/perplexity": row["heldout_ppl"]} if "heldout_ppl" in row else {})
                       | {f"sft/{k}": v for k, v in row.get("heldout_gold", {}).items() if k in JUDGED})
    log(
        f"pretrain: {pcfg.steps} steps in {train_seconds:.0f} s; held-out perplexity {ppl0:.1f} -> {report['heldout_ppl']:.2f}; "
        f"policy saved to {run_dir / 'policy'}"
    )
    shown = ("score", "coverage", "hallucination_rate", "repetition_rate", "structure", "fluency")
    if gold is not None:
        log(f"gold sub-scores of {pcfg.sample_essays} sampled essays: " + ", ".join(f"{k} {gold[k]:.3f}" for k in shown))
    if report["heldout_gold"] is not None:
        curve = ", ".join(f"{r['step']}: {r['heldout_gold']['gold/score']:.3f}" for r in history if "heldout_gold" in r)
        log(f"held-out gold along the way (step: score): {curve}")
    return report


# The figures `heldout_judge` reports (TensorBoard sft/<name>): the gold score and the sub-scores of the table.
JUDGED = ("gold/score", "gold/coverage", "gold/hallucination_rate", "gold/contradiction_rate", "gold/unsupported_rate",
          "gold/repetition_rate", "gold/fluency", "gold/structure", "diversity/distinct_2")


def heldout_judge(cfg: Config, policy: Policy, world: World) -> Callable[[Any], dict]:
    """params -> the gold grader's mean sub-scores ("gold/score", "gold/coverage", ...) and the diversity of two essays for each of
    the table's held-out prompts, sampled at actor.temperature with the table's seed: deterministic for a seed, and
    the same draws every time it is called (the same figures for the same params)."""
    prompts = world_eval_prompts(cfg, world)
    gen = Generator(policy, cfg.actor, batch=min(len(prompts), cfg.actor.prompts_per_round))
    key = jax.random.fold_in(jax.random.key(cfg.run.seed), EVAL_PROMPTS_SEED)
    g = EVAL_SAMPLES_PER_PROMPT

    def judge(params: Any) -> dict:
        essays = gen.generate(prompts, key, samples_per_prompt=g, params=params)
        scores = mean_scores([world.grade(prompts[i // g], e) for i, e in enumerate(essays)])
        return {f"gold/{k}": v for k, v in scores.items()} | diversity(essays)

    return judge


def sample_and_grade(policy: Policy, world: World, cfg: Config, *, n: int, seed: int) -> dict:
    """Mean gold sub-scores of one essay per prompt for `n` fresh world prompts."""
    prompts = world.sample_prompts(n, np.random.default_rng(seed), "mixed")
    gen = Generator(policy, cfg.actor, batch=min(n, cfg.actor.prompts_per_round))
    essays = gen.generate(prompts, jax.random.key(seed), samples_per_prompt=1)
    return mean_scores([world.grade(p, e) for p, e in zip(prompts, essays)])
