"""Throughput benchmarks behind `selfplay bench actor|learner|round`: compile, then time steady-state calls.

Owns the runners (each returns one JSON-able record), their synthetic inputs and the no-KV-cache sampling baseline;
the round times selfplay.run.round's own stages. What they count and time with is `selfplay.perf`.
Over 400 lines because each of the three benchmarks builds its own inputs and writes its own record fields.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from selfplay import actor, learner
from selfplay import critic as C
from selfplay.config import (
    ActorConfig,
    BenchConfig,
    Config,
    ConfigError,
    ModelConfig,
    UserError,
    critic_refreshes,
    to_dict,
    uses_critic,
)
from selfplay.models import transformer
from selfplay.perf import (
    Probe,
    Work,
    cpu_shares,
    cpu_ticks,
    load_avg,
    machine_info,
    matmul_params,
    memory_info,
    nocache_flops_executed,
    rate_stats,
    ratio_stats,
    rss_trend,
    round_work,
    sample_work,
    time_calls,
    update_work,
)
from selfplay.policy import Policy
from selfplay.run.round import Steps, Stopwatch, init_learner
from selfplay.types import Rollout

BENCHMARKS = ("actor", "learner", "round")
FULL_SWEEP = ("bench.batches=[1, 8, 64, 256]", "bench.new_tokens=[64, 256]")  # `selfplay bench actor --full`
PAD_ID = 0
# pairs critic.calibrate_normalizer scores after a refresh: its max_pairs default
_CALIBRATION_PAIRS = inspect.signature(C.calibrate_normalizer).parameters["max_pairs"].default

# ----------------------------------------------------------------------------------------------
# Synthetic inputs
# ----------------------------------------------------------------------------------------------


def _prompt_len(cfg: Config, bcfg: BenchConfig) -> int:
    return bcfg.prompt_len or min(cfg.actor.prompt_buckets)


def synthetic_prompts(cfg: Config, bcfg: BenchConfig, n: int, new_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """n random prompts of bench.prompt_len tokens (never the pad id), bucketed like real ones by `pad_prompts`."""
    rng = np.random.default_rng([seed, 0xBE7C])
    rows = rng.integers(1, cfg.model.vocab_size, size=(n, _prompt_len(cfg, bcfg)))
    return actor.pad_prompts(
        rows.tolist(), cfg.actor.prompt_buckets, PAD_ID, cfg.actor.too_long_prompt,
        max_new_tokens=new_tokens, max_seq_len=cfg.model.max_seq_len,
    )


def synthetic_rollout(cfg: Config, bcfg: BenchConfig, n: int, g: int, seed: int) -> tuple[Rollout, int]:
    """A rollout of n prompts x g samples of exactly actor.max_new_tokens random tokens each, and its prompt width."""
    new = cfg.actor.max_new_tokens
    tokens_np, len_n, p = synthetic_prompts(cfg, bcfg, n, new, seed)
    rng = np.random.default_rng([seed, 0x5011])
    b, l = n * g, p + new
    completion = rng.integers(1, cfg.model.vocab_size, size=(b, new))
    tokens_bl = np.concatenate([np.repeat(tokens_np, g, axis=0), completion], axis=1).astype(np.int32)
    mask_bl = np.zeros((b, l), np.float32)
    mask_bl[:, p:] = 1.0
    logprobs_bl = mask_bl * rng.normal(-math.log(cfg.model.vocab_size), 0.5, size=(b, l)).astype(np.float32)
    rollout = Rollout(
        tokens_bl=jnp.asarray(tokens_bl),
        prompt_len_b=jnp.asarray(np.repeat(len_n, g)),
        completion_mask_bl=jnp.asarray(mask_bl),
        logprobs_bl=jnp.asarray(logprobs_bl),
        eos_b=jnp.zeros((b,), bool),
    )
    return rollout, p


def _group(batch: int, g: int) -> tuple[int, int]:
    """(prompts, samples per prompt) for `batch` sequences: G samples per prompt when G divides the batch, else 1."""
    g = g if batch % g == 0 else 1
    return batch // g, g


def _keys(seed: int, tag: int, count: int) -> list[jax.Array]:
    """Per-call keys, made before any timing so the timed calls run nothing but the step."""
    base = jax.random.fold_in(jax.random.key(seed), tag)
    return [jax.random.fold_in(base, i) for i in range(count)]


# ----------------------------------------------------------------------------------------------
# The no-cache baseline
# ----------------------------------------------------------------------------------------------


def make_nocache_sampler(model_cfg: ModelConfig, actor_cfg: ActorConfig, *, eos_id: int, pad_id: int) -> Callable:
    """The sampler without a KV cache, as a baseline: for every new token one forward over the whole fixed-size
    buffer (prompt + tokens so far valid, the rest masked), reading the logits at the last written column.
    Same signature, token choice, per-step keys and outputs as `actor.make_sampler` (without decode_steps)."""
    max_new = actor_cfg.max_new_tokens
    choose = dict(temperature=actor_cfg.temperature, top_k=actor_cfg.top_k, top_p=actor_cfg.top_p, greedy=actor_cfg.greedy)

    def sample(graphdef, params, prompt_tokens_bp, prompt_len_b, rng, samples_per_prompt):
        g = samples_per_prompt
        n, p = prompt_tokens_bp.shape
        b, l = n * g, p + max_new
        model = transformer.merge(graphdef, params)
        len_b = jnp.repeat(prompt_len_b.astype(jnp.int32), g)
        col_bl = jnp.broadcast_to(jnp.arange(l), (b, l))
        start_b1 = p - len_b[:, None]
        positions_bl = jnp.maximum(col_bl - start_b1, 0)
        prompt_bl = (col_bl >= start_b1) & (col_bl < p)
        tokens_bl = jnp.concatenate(
            [jnp.repeat(prompt_tokens_bp.astype(jnp.int32), g, axis=0), jnp.full((b, max_new), pad_id, jnp.int32)], axis=1
        )
        zeros_bl = jnp.zeros((b, l), jnp.float32)

        def body(i, bufs):
            tokens_bl, _, mask_bl = bufs[:3]
            valid_bl = prompt_bl | (mask_bl > 0)
            h_bld, _ = model.hidden(tokens_bl, positions_bl, valid_bl)
            last_b1d = jax.lax.dynamic_slice_in_dim(h_bld, p + i - 1, 1, axis=1)
            tok_b, lp_b = actor.sample_token(model.logits(last_b1d)[:, 0], jax.random.fold_in(rng, i), **choose)
            return actor.emit_token(bufs, p + i, tok_b, lp_b, pad_id=pad_id, eos_ids=(eos_id,))

        no_b = jnp.zeros((b,), bool)
        tokens_bl, lp_bl, mask_bl, _, eos_b = jax.lax.fori_loop(0, max_new, body, (tokens_bl, zeros_bl, zeros_bl, no_b, no_b))
        return Rollout(tokens_bl=tokens_bl, prompt_len_b=len_b, completion_mask_bl=mask_bl, logprobs_bl=lp_bl, eos_b=eos_b)

    return jax.jit(sample, static_argnames=("samples_per_prompt",))


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------


def _policy(cfg: Config) -> tuple[Any, Any]:
    model = transformer.create_model(cfg.model, jax.random.key(cfg.run.seed))
    return transformer.split(model)


def _model_dims(m: ModelConfig) -> dict[str, Any]:
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "tie_embeddings",
            "param_dtype", "compute_dtype")
    out = {k: getattr(m, k) for k in keys}
    out["head_dim"] = m.resolved_head_dim
    out["matmul_params"] = matmul_params(m)
    return out


def _actor_point(cfg: Config, b: BenchConfig, graphdef: Any, params: Any, batch: int, new: int, probe: Probe, log: Callable) -> dict:
    n, g = _group(batch, cfg.actor.samples_per_prompt)
    actor_cfg = dataclasses.replace(cfg.actor, max_new_tokens=new)
    prompts_bp, len_n, p = synthetic_prompts(cfg, b, n, new, cfg.run.seed)
    prompts_bp, len_n = jnp.asarray(prompts_bp), jnp.asarray(len_n)
    keys = _keys(cfg.run.seed, 1, 1 + b.warmup + b.iterations)
    sampler = actor.make_sampler(cfg.model, actor_cfg, eos_ids=(b.eos_id,), pad_id=PAD_ID)
    log(f"actor: batch {batch} ({n} prompts x {g}), {new} new tokens, KV cache")
    cached = time_calls(lambda i: sampler(graphdef, params, prompts_bp, len_n, keys[i], g), b.warmup, b.iterations, probe)
    rollout, info = cached.last
    tokens = float(np.asarray(rollout.completion_mask_bl).sum())
    if b.eos_id == -1 and (tokens != batch * new or int(info["decode_steps"]) != new - 1):
        raise RuntimeError(f"the sampler wrote {tokens:.0f} tokens in {int(info['decode_steps'])} steps, expected {batch * new}")
    work = sample_work(cfg.model, n, batch, _prompt_len(cfg, b), new)
    stats = rate_stats(tokens, cached.times_s)
    point: dict[str, Any] = {
        "batch": batch, "prompts": n, "samples_per_prompt": g, "new_tokens": new, "prompt_width": p,
        "tokens_per_s": stats, "compile_s": cached.compile_s, "first_call_s": cached.first_s,
        "compilations_timed": cached.compilations, "traces_timed": cached.traces,
        "flops": work.total_flops, "decode_bytes": work.stream_bytes,
        **ratio_stats(work, cached.times_s, cached.peaks),
    }
    executed = nocache_flops_executed(cfg.model, batch, p + new, new)
    if not b.baseline or executed > b.baseline_max_gflop * 1e9:
        point["baseline"] = None if not b.baseline else {"skipped": f"{executed / 1e9:.0f} GFLOP per call > bench.baseline_max_gflop"}
        return point
    log(f"actor: batch {batch}, {new} new tokens, no-cache baseline ({executed / 1e9:.0f} GFLOP per call)")
    base_sampler = make_nocache_sampler(cfg.model, actor_cfg, eos_id=b.eos_id, pad_id=PAD_ID)
    base_keys = _keys(cfg.run.seed, 4, 1 + b.baseline_iterations)
    base = time_calls(
        lambda i: base_sampler(graphdef, params, prompts_bp, len_n, base_keys[i], samples_per_prompt=g), 0, b.baseline_iterations, probe
    )
    base_tokens = float(np.asarray(base.last.completion_mask_bl).sum())
    base_stats = rate_stats(base_tokens, base.times_s)
    point["baseline"] = {
        "tokens_per_s": base_stats, "compile_s": base.compile_s, "first_call_s": base.first_s,
        "compilations_timed": base.compilations, "traces_timed": base.traces,
        "flops_executed": executed, "mfu_executed": ratio_stats(Work(executed), base.times_s, base.peaks)["mfu"],
    }
    point["speedup"] = stats["median"] / base_stats["median"]
    point["compilations_timed"] += base.compilations
    point["traces_timed"] += base.traces
    return point


def bench_actor(cfg: Config, bcfg: BenchConfig, probe: Probe, log: Callable) -> dict[str, Any]:
    """Generated tokens/s of the real sampler (`actor.make_sampler`, KV cache) over bench.batches x bench.new_tokens,
    against the no-cache baseline, and the speed-up."""
    graphdef, params = _policy(cfg)
    batches = bcfg.batches or (cfg.actor.prompts_per_round * cfg.actor.samples_per_prompt,)
    news = bcfg.new_tokens or (cfg.actor.max_new_tokens,)
    points = [_actor_point(cfg, bcfg, graphdef, params, batch, new, probe, log) for new in news for batch in batches]
    return {
        "config": {
            "model": _model_dims(cfg.model), "batches": list(batches), "new_tokens": list(news),
            "prompt_len": _prompt_len(cfg, bcfg), "eos_id": bcfg.eos_id,
            "sampling": {k: getattr(cfg.actor, k) for k in ("temperature", "top_k", "top_p", "greedy", "samples_per_prompt")},
        },
        "points": points,
        "compilations_timed": sum(pt["compilations_timed"] for pt in points),
        "traces_timed": sum(pt["traces_timed"] for pt in points),
        "compile_s": sum(pt["compile_s"] + (pt.get("baseline") or {}).get("compile_s", 0.0) for pt in points),
    }




def _learner_steps(cfg: Config, graphdef: Any, params: Any) -> tuple[Steps, learner.TrainState]:
    """The loop's compiled update and reference steps (`selfplay.run.round.Steps`) and its fresh learner state."""
    if cfg.learner.algorithm == "ppo":
        raise UserError("selfplay bench: learner.algorithm=ppo (a value model) is not benchmarked; use grpo, rloo or reinforce_pp")
    optimizer = learner.make_optimizer(cfg.learner)
    state, value_graphdef = init_learner(cfg, params, optimizer)
    return Steps(cfg, graphdef, optimizer, value_graphdef), state


def _learner_dims(cfg: Config, bcfg: BenchConfig, rows: int, p: int) -> dict[str, Any]:
    lc = cfg.learner
    return {
        "model": _model_dims(cfg.model), "prompts": cfg.actor.prompts_per_round, "samples_per_prompt": cfg.actor.samples_per_prompt,
        "rows": rows, "prompt_len": _prompt_len(cfg, bcfg), "prompt_width": p, "new_tokens": cfg.actor.max_new_tokens,
        "algorithm": lc.algorithm, "kl_coef": lc.kl_coef, "epochs": lc.epochs, "minibatches": lc.minibatches,
    }


def bench_learner(cfg: Config, bcfg: BenchConfig, probe: Probe, log: Callable) -> dict[str, Any]:
    """Tokens/s and MFU of one update step (the loop's `Steps.update`: forward, backward, optimiser) on a synthetic
    rollout of prompts_per_round x samples_per_prompt rows of prompt_len + max_new_tokens tokens."""
    b = bcfg
    graphdef, params = _policy(cfg)
    n, g = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt
    rollout, p = synthetic_rollout(cfg, b, n, g, cfg.run.seed)
    rows, width = rollout.tokens_bl.shape
    rng = np.random.default_rng([cfg.run.seed, 0x1EA2])
    rewards_b = jnp.asarray(rng.normal(size=rows).astype(np.float32))
    ref_bl = rollout.logprobs_bl + rollout.completion_mask_bl * jnp.asarray(rng.normal(0, 0.05, size=(rows, width)).astype(np.float32))
    batch = learner.Batch(rollout, rewards_b, ref_bl)
    steps, state0 = _learner_steps(cfg, graphdef, params)
    update = steps.update(p)
    state = [state0]
    keys = _keys(cfg.run.seed, 2, 1 + b.warmup + b.iterations)

    def step(i: int) -> Any:
        state[0], metrics = update(state[0], batch, keys[i])
        return state[0].params, metrics

    log(f"learner: {rows} rows x {width} tokens, {cfg.learner.epochs} epoch(s) x {cfg.learner.minibatches} minibatch(es)")
    timed = time_calls(step, b.warmup, b.iterations, probe)
    real_len = _prompt_len(cfg, b) + cfg.actor.max_new_tokens
    work = update_work(cfg, rows, real_len)
    stats = rate_stats(float(rows * real_len), timed.times_s)
    return {
        "config": _learner_dims(cfg, b, rows, p),
        "figure": {"name": "tokens_per_s", "unit": "tokens (prompt + completion) per second", **stats},
        "flops": work.total_flops,
        **ratio_stats(work, timed.times_s, timed.peaks),
        "compile_s": timed.compile_s, "first_call_s": timed.first_s,
        "compilations_timed": timed.compilations, "traces_timed": timed.traces,
        "host_rss_mib": rss_trend(timed.rss_mib),
    }


def _critic_rows(cfg: Config, bcfg: BenchConfig, count: int, seed: int) -> tuple[jax.Array, jax.Array, int]:
    """`count` right-padded critic rows as long as a rollout's `[bos] prompt [sep] essay [eos]`: (tokens, lens, length)."""
    length = _prompt_len(cfg, bcfg) + cfg.actor.max_new_tokens + 3
    fits = [s for s in cfg.critic.seq_buckets if s >= length]
    if not fits:
        raise ConfigError(f"critic.seq_buckets (max {max(cfg.critic.seq_buckets)}) has no bucket for critic rows of {length} tokens")
    rng = np.random.default_rng([seed, 0xC217])
    tokens = np.full((count, fits[0]), PAD_ID, np.int32)
    tokens[:, :length] = rng.integers(1, cfg.critic.model.vocab_size, size=(count, length))
    return jnp.asarray(tokens), jnp.full((count,), length, jnp.int32), length


def _synthetic_critic(cfg: Config) -> C.Critic:
    """A fresh critic handle with the compiled functions the loop's critic has; no tokenizer and no pair pool, since a
    synthetic round has no text (`critic_from_state` needs a tokenizer for them)."""
    graphdef = C.reward_graphdef(cfg.critic.model)
    state = C.init_state(cfg.critic, cfg.run.seed)
    return C.Critic(cfg, None, graphdef, state, pool=None, fns=C.make_critic_fns(graphdef, cfg.critic))


def bench_round(cfg: Config, bcfg: BenchConfig, probe: Probe, log: Callable) -> dict[str, Any]:
    """A synthetic self-play round: the stages of `selfplay.run.round.run_round` from the loop's own pieces, timed by
    its `Stopwatch` (block_until_ready after each stage): rollout (`Generator.sample`), critic score + normaliser
    (`critic.score_rollout`), reference log-probs (`Steps.reference`), the update step (`Steps.update`) and the
    critic refresh's device work, from the critic's compiled fns: sampling its pairs (ceil(refresh_budget /
    critic.batch_size) calls of critic.batch_size prompts x 2), refresh_steps train steps, and the normaliser's
    re-calibration (scoring min(calibrate_normalizer's max_pairs, label_budget) pairs). Host-side work of the loop
    (text decoding, the gold grader, the reward functions, diversity, logging) is left out. The refresh runs in every
    timed round; the headline figure counts it once per critic.refresh_every rounds, as the loop does. A config without
    a critic (`config.uses_critic`) has no score stage: the update gets zero rewards."""
    b, cc = bcfg, cfg.critic
    if uses_critic(cfg) and cc.judge:
        raise ConfigError(
            "selfplay bench round times the critic's device work on synthetic tokens, but critic.judge=true reads "
            "decoded text with the SFT policy (its device work is one more reference forward): set critic.judge=false"
        )
    graphdef, params = _policy(cfg)
    policy = Policy(cfg, None, graphdef, params)  # no tokenizer: the generators get eos_ids and pad_id
    ref_params = params
    n, g, new = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt, cfg.actor.max_new_tokens
    rows = n * g
    prompts_bp, len_n, p = synthetic_prompts(cfg, b, n, new, cfg.run.seed)
    prompts_bp, len_n = jnp.asarray(prompts_bp), jnp.asarray(len_n)
    gen = actor.Generator(policy, cfg.actor, n, eos_ids=(b.eos_id,), pad_id=PAD_ID)
    steps, state = _learner_steps(cfg, graphdef, params)
    critic = _synthetic_critic(cfg) if uses_critic(cfg) else None
    zero_rewards_b = jnp.zeros(rows, jnp.float32)

    refresh_calls = math.ceil(cc.refresh_budget / cc.batch_size) if critic_refreshes(cfg) else 0
    pair_rows = 2 * cc.batch_size
    calib_chunks = math.ceil(2 * min(_CALIBRATION_PAIRS, cc.label_budget) / pair_rows) if critic_refreshes(cfg) else 0
    refresh_gen = actor.Generator(policy, cfg.actor, cc.batch_size, eos_ids=(b.eos_id,), pad_id=PAD_ID)  # as selfplay.run.setup's
    r_prompts, r_len, r_p = synthetic_prompts(cfg, b, cc.batch_size, new, cfg.run.seed + 1)
    if r_p != p:
        raise ConfigError(f"refresh prompts bucket {r_p} differs from the round's {p}")
    r_prompts, r_len = jnp.asarray(r_prompts), jnp.asarray(r_len)
    train_tokens, train_len, _ = _critic_rows(cfg, b, cc.ensemble_size * pair_rows, cfg.run.seed)
    train_tokens_knl = train_tokens.reshape(cc.ensemble_size, pair_rows, -1)
    train_len_kn = train_len.reshape(cc.ensemble_size, pair_rows)
    calib_tokens, calib_len, _ = _critic_rows(cfg, b, pair_rows, cfg.run.seed + 2)

    calls = 1 + b.warmup + b.iterations
    keys = _keys(cfg.run.seed, 3, calls)
    sw = Stopwatch()
    holder = {"state": state}

    def update(rollout: Rollout, rewards_b: jax.Array, ref_lp: jax.Array, key: jax.Array) -> Any:
        holder["state"], metrics = steps.update(p)(holder["state"], learner.Batch(rollout, rewards_b, ref_lp), key)
        return holder["state"].params, metrics

    def refresh(policy_params: Any, key: jax.Array) -> Any:
        samples = [
            refresh_gen.sample(policy_params, r_prompts, r_len, jax.random.fold_in(key, 2 + c), 2).tokens_bl
            for c in range(refresh_calls)
        ]
        for _ in range(cc.refresh_steps):
            critic.state, _ = critic.fns.train_step(critic.state, train_tokens_knl, train_len_kn)
        calib = [critic.fns.score_tokens(critic.state, calib_tokens, calib_len).members_kb for _ in range(calib_chunks)]
        return samples, calib, critic.state

    def one_round(i: int) -> Any:
        key = keys[i]
        rollout = sw("rollout", gen.sample, holder["state"].params, prompts_bp, len_n, jax.random.fold_in(key, 0), g)
        rewards_b = zero_rewards_b if critic is None else sw("score", C.score_rollout, critic, rollout, p)[0].rewards_b
        ref_lp = sw("reference", steps.reference(p), ref_params, rollout)
        out = sw("update", update, rollout, rewards_b, ref_lp, jax.random.fold_in(key, 1))
        if refresh_calls:
            sw("critic", refresh, holder["state"].params, key)
        return out

    log(f"round: {n} prompts x {g} samples, {new} new tokens; refresh: {refresh_calls} sampler calls, "
        f"{cc.refresh_steps} critic steps, {calib_chunks} calibration batches (every {cc.refresh_every or 'no'} rounds)")
    timed = time_calls(one_round, b.warmup, b.iterations, probe)
    timed_from = 1 + b.warmup
    stage_times = sw.seconds
    split = {s: float(np.median(ts[timed_from:])) for s, ts in stage_times.items() if ts}
    works = round_work(cfg, rows, _prompt_len(cfg, b), refresh_calls, calib_chunks)
    every = cc.refresh_every or 1
    amortised = {s: t / every if s == "critic" else t for s, t in split.items()}
    # only the stages that ran: with critic.refresh_every=0 there is no refresh, and its work must not count
    work = functools.reduce(
        lambda a, w: a + w, (w.scaled(1 / every) if s == "critic" else w for s, w in works.items() if s in split)
    )
    per_round = [sum(stage_times[s][i] / (every if s == "critic" else 1) for s in split) for i in range(timed_from, calls)]
    stats = rate_stats(float(rows), per_round)
    return {
        "config": {
            **_learner_dims(cfg, b, rows, p),
            "critic_model": _model_dims(cc.model),
            "critic": {k: getattr(cc, k) for k in ("ensemble_size", "batch_size", "refresh_every", "refresh_budget", "refresh_steps")},
            "refresh_sampler_calls": refresh_calls, "calibration_batches": calib_chunks, "eos_id": b.eos_id,
        },
        "round_kind": "synthetic (selfplay.jobs.bench.bench_round): the stages of selfplay.run.round, timed by its Stopwatch",
        "figure": {"name": "completions_per_s", "unit": "completions per second, refresh amortised over critic.refresh_every", **stats},
        "completions_per_s_refresh_round": rows / sum(split.values()),
        "flops": work.total_flops,
        **ratio_stats(work, per_round, timed.peaks),
        "stages": {
            s: {"median_s": split[s], "share": amortised[s] / sum(amortised.values()), "flops": works[s].total_flops,
                **ratio_stats(works[s], stage_times[s][timed_from:], timed.peaks)}
            for s in split
        },
        "compile_s": timed.compile_s, "first_call_s": timed.first_s,
        "compilations_timed": timed.compilations, "traces_timed": timed.traces,
        "host_rss_mib": rss_trend(timed.rss_mib),
    }


_RUNNERS = {"actor": bench_actor, "learner": bench_learner, "round": bench_round}


def run(which: str, cfg: Config, bcfg: BenchConfig, *, command: str = "", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run benchmark `which` on the shapes of `cfg` with the settings `bcfg`, the roofline probed before every timed
    call (and measured on its own before and after), and return the JSON record."""
    if which not in _RUNNERS:
        raise UserError(f"unknown benchmark {which!r}; choose one of {', '.join(BENCHMARKS)}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    b = bcfg
    load_start = load_avg()
    cores = machine_info()["cores"] or 1
    if load_start[0] > cores:
        log(f"warning: 1-minute load average {load_start[0]} exceeds the {cores} cores; figures will be noisy, re-run when quieter")
    log(f"roofline: {b.matmul_size}^3 {cfg.model.compute_dtype} matmul, {b.bandwidth_mib} MiB in-place scale")
    probe = Probe(cfg.model.compute_dtype, b.matmul_size, b.bandwidth_mib)
    roof_before = probe.measure(max(b.iterations, 3))
    t0, ticks0 = time.perf_counter(), cpu_ticks()
    result = _RUNNERS[which](cfg, b, probe, log)
    wall, ticks1 = time.perf_counter() - t0, cpu_ticks()
    roof_after = probe.measure(max(b.iterations, 3))
    return {
        "benchmark": which,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "load_avg": {"start": load_start, "end": load_avg()},
        "cpu": cpu_shares(ticks0, ticks1),
        "roofline": {**roof_before, "after": {k: roof_after[k] for k in ("peak_flops", "bandwidth_bytes_per_s")}},
        **result,
        "memory": memory_info(),
        "wall_s": wall,
        "timing": {"warmup": b.warmup, "iterations": b.iterations, "baseline_iterations": b.baseline_iterations},
        "run_config": {"bench": to_dict(b), "seed": cfg.run.seed},
    }


def write_record(record: dict[str, Any], out: str | os.PathLike | None) -> str:
    """The record as one JSON line: printed to stdout and, with `out`, appended to that file."""
    line = json.dumps(record, default=float)
    print(line, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line + "\n")
    return line
