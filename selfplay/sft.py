"""Supervised pretraining of the initial (SFT) policy on the essay world's human corpus.

Next-token loss on the essay tokens only (prompt tokens are context); AdamW with warm-up and cosine
decay, gradient clipping; held-out perplexity; the policy is saved to the run directory, then a batch
of sampled essays is graded by the gold grader, so the report shows what flaws the policy inherited.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from selfplay.config import Config, PretrainConfig, UserError
from selfplay.data import minibatches
from selfplay.models import transformer
from selfplay.policy import Generator, Policy, init_policy, save_policy
from selfplay.tokenizer import Tokenizer
from selfplay.world.essays import World, mean_scores

SEQ_MULTIPLE = 32  # example buffers are padded to a multiple of this: one compilation for the whole run


def encode_corpus(tokenizer: Tokenizer, pairs: list[tuple[str, str]], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (tokens_bl, loss_mask_bl) of `[bos] prompt [sep] essay [eos]` examples."""
    encoded = [tokenizer.encode_example(p, e) for p, e in pairs]
    longest = max(len(ids) for ids, _ in encoded)
    length = min(-(-longest // SEQ_MULTIPLE) * SEQ_MULTIPLE, max_seq_len)
    if longest > length:
        raise UserError(f"a corpus example has {longest} tokens, more than model.max_seq_len ({max_seq_len})")
    tokens = np.full((len(encoded), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(encoded), length), np.float32)
    for i, (ids, m) in enumerate(encoded):
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = m
    return tokens, mask


def _lengths_to_inputs(tokens_bl: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Positions and validity of right-padded rows (every row starts with BOS, so pad only trails)."""
    valid_bl = tokens_bl != pad_id
    positions_bl = jnp.broadcast_to(jnp.arange(tokens_bl.shape[1], dtype=jnp.int32), tokens_bl.shape)
    return positions_bl, valid_bl


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


def make_sft_fns(graphdef: Any, optimizer: optax.GradientTransformation, pad_id: int) -> tuple[Callable, Callable]:
    """(train_step, eval_nll): jitted; train_step donates params and optimiser state."""

    def nll(params, tokens_bl, mask_bl):
        positions_bl, valid_bl = _lengths_to_inputs(tokens_bl, pad_id)
        logprobs_bl, _ = transformer.token_logprobs(graphdef, params, tokens_bl, positions_bl, valid_bl)
        return -jnp.sum(logprobs_bl * mask_bl), jnp.sum(mask_bl)

    def loss_fn(params, tokens_bl, mask_bl):
        total, count = nll(params, tokens_bl, mask_bl)
        return total / jnp.maximum(count, 1.0)

    def train_step(params, opt_state, tokens_bl, mask_bl):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_bl, mask_bl)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": opt_state[1].hyperparams["learning_rate"],
        }
        return params, opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(nll)


def heldout_perplexity(eval_nll: Callable, params: Any, tokens: np.ndarray, mask: np.ndarray, batch: int) -> float:
    total, count = 0.0, 0.0
    for start in range(0, len(tokens) - batch + 1, batch):
        t, c = eval_nll(params, tokens[start : start + batch], mask[start : start + batch])
        total += float(t)
        count += float(c)
    return math.exp(total / max(count, 1.0))


def pretrain(cfg: Config, run_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train the SFT policy from scratch on the world's corpus and save it to `run_dir`; returns the report."""
    run_dir = Path(run_dir)
    pcfg = cfg.pretrain
    t0 = time.perf_counter()
    world = World.from_config(cfg.world)
    pairs = world.corpus(cfg.world.corpus_size)
    tokenizer = Tokenizer.train([p for p, _ in pairs] + [e for _, e in pairs], cfg.world.tokenizer_vocab_size)
    policy = init_policy(cfg, tokenizer, cfg.run.seed)

    tokens, mask = encode_corpus(tokenizer, pairs, cfg.model.max_seq_len)
    n_heldout = max(pcfg.batch_size, int(len(tokens) * pcfg.heldout_fraction))
    if len(tokens) - n_heldout < pcfg.batch_size:
        raise UserError(
            f"world.corpus_size ({len(tokens)}) is too small for pretrain.batch_size ({pcfg.batch_size}) plus a held-out split"
        )
    train_t, train_m = tokens[n_heldout:], mask[n_heldout:]
    held_t, held_m = tokens[:n_heldout], mask[:n_heldout]

    optimizer = make_optimizer(pcfg)
    params = policy.params
    opt_state = optimizer.init(params)
    train_step, eval_nll = make_sft_fns(policy.graphdef, optimizer, tokenizer.pad_id)
    batches = minibatches(len(train_t), pcfg.batch_size, np.random.default_rng([cfg.run.seed, 1]))

    history: list[dict] = []
    ppl0 = heldout_perplexity(eval_nll, params, held_t, held_m, pcfg.batch_size)
    columns = [TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("pretrain", total=pcfg.steps, status="")
        loss_ema = None
        for step in range(1, pcfg.steps + 1):
            idx = next(batches)
            params, opt_state, m = train_step(params, opt_state, train_t[idx], train_m[idx])
            if step % 10 == 0 or step == pcfg.steps:
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise UserError(f"pretraining diverged at step {step} (loss {loss}); lower pretrain.lr")
                loss_ema = loss if loss_ema is None else 0.8 * loss_ema + 0.2 * loss
                row = {"step": step, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"])}
                if step % pcfg.eval_every == 0 or step == pcfg.steps:
                    row["heldout_ppl"] = heldout_perplexity(eval_nll, params, held_t, held_m, pcfg.batch_size)
                history.append(row)
                bar.update(task, status=f"loss {loss_ema:.3f}" + (f"  held-out ppl {row['heldout_ppl']:.2f}" if "heldout_ppl" in row else ""))
            bar.update(task, advance=1)
    train_seconds = time.perf_counter() - t0

    policy.params = params
    save_policy(run_dir, policy, meta={"kind": "sft", "steps": pcfg.steps})

    gold = sample_and_grade(policy, world, cfg, n=pcfg.sample_essays, seed=cfg.run.seed + 12345)
    report = {
        "steps": pcfg.steps,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_example_mean": float((tokens != tokenizer.pad_id).sum(1).mean()),
        "heldout_ppl_initial": ppl0,
        "heldout_ppl": history[-1]["heldout_ppl"],
        "final_loss": history[-1]["loss"],
        "vocab_size": tokenizer.vocab_size,
        "gold": gold,
        "history": history,
    }
    (run_dir / "sft_report.json").write_text(json.dumps(report, indent=2))
    log(
        f"pretrain: {pcfg.steps} steps in {train_seconds:.0f} s; held-out perplexity {ppl0:.1f} -> {report['heldout_ppl']:.2f}; "
        f"policy saved to {run_dir / 'policy'}"
    )
    log("gold sub-scores of sampled essays: " + json.dumps({k: round(v, 3) for k, v in gold.items()}))
    return report


def sample_and_grade(policy: Policy, world: World, cfg: Config, *, n: int, seed: int) -> dict:
    """Mean gold sub-scores of one essay per prompt for `n` fresh world prompts."""
    prompts = world.sample_prompts(n, np.random.default_rng(seed), "mixed")
    gen = Generator(policy, cfg.actor, batch=min(n, cfg.actor.prompts_per_round))
    essays = gen.generate(prompts, jax.random.key(seed), samples_per_prompt=1)
    return mean_scores([world.grade(p, e) for p, e in zip(prompts, essays)])
