"""Throughput benchmarks behind `selfplay bench actor|learner|round`: compile, then time steady-state calls.

Owns the FLOP and byte counts, the in-run roofline (a matmul peak and memory bandwidth probed before every timed call),
the no-KV-cache sampling baseline and the synthetic self-play round; each benchmark returns one JSON-able record.

Counting conventions (also in benchmarks/RESULTS.md). A forward pass costs 2 FLOPs per matmul weight per token
(`matmul_params`: the layers' projections and the LM head; the embedding lookup is a gather) plus, per layer,
4 * n_heads * head_dim FLOPs per (query, key) pair (QK^T and PV). Only the keys a query may see count (causal
attention over l tokens: (l + 1) / 2 keys on average), not the masked ones the implementation also computes.
Norms, RoPE, softmax and sampling are left out (O(d) per token). Backward = 2 forwards, so training = 3x.
A decode step reads every weight once and the keys and values of every token before it (`sample_work`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from selfplay import actor, critic as C, learner
from selfplay.config import ActorConfig, Config, ConfigError, ModelConfig, UserError, to_dict
from selfplay.models import transformer
from selfplay.types import Rollout

BENCHMARKS = ("actor", "learner", "round")
FULL_SWEEP = ("bench.batches=[1, 8, 64, 256]", "bench.new_tokens=[64, 256]")  # `selfplay bench actor --full`
PAD_ID = 0
TRAIN_FACTOR = 3  # forward + backward, the backward costing two forwards (input and weight gradients)
_CALIBRATION_PAIRS = 512  # pairs critic.calibrate_normalizer scores after a refresh (its max_pairs)
_BYTES = {"float32": 4, "bfloat16": 2}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# jax fires the backend-compile event once per executable it builds or loads from the persistent cache, and the
# trace event once per traced function; neither fires when a jitted call hits its in-memory cache.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


# ----------------------------------------------------------------------------------------------
# Counting: FLOPs and bytes
# ----------------------------------------------------------------------------------------------


def matmul_params(cfg: ModelConfig, lm_head: bool = True) -> int:
    """Weights every token is multiplied through: q, k, v, o and the SwiGLU MLP of each layer, and the LM head."""
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
    per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f
    return cfg.n_layers * per_layer + (d * cfg.vocab_size if lm_head else 0)


def forward_flops(cfg: ModelConfig, tokens: float, keys_per_token: float, lm_head: bool = True) -> float:
    """FLOPs of a forward pass over `tokens` tokens attending to `keys_per_token` keys each on average."""
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * keys_per_token
    return tokens * (2 * matmul_params(cfg, lm_head) + attention)


def causal_keys(length: int) -> float:
    """Mean keys a query sees under causal attention over `length` tokens."""
    return (length + 1) / 2


def param_bytes(cfg: ModelConfig) -> int:
    """Bytes of the weights a decode step reads (the matmul weights; the embedding rows it gathers are negligible)."""
    return matmul_params(cfg) * _BYTES[cfg.param_dtype]


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes of cached keys and values one token holds across all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.resolved_head_dim * _BYTES[cfg.compute_dtype]


@dataclasses.dataclass(frozen=True)
class Work:
    """Useful work of a stage: compute-bound FLOPs, plus FLOPs and bytes of a bandwidth-bound part (decode)."""

    flops: float = 0.0
    stream_flops: float = 0.0
    stream_bytes: float = 0.0

    @property
    def total_flops(self) -> float:
        return self.flops + self.stream_flops

    def roofline_s(self, peak_flops: float, bandwidth: float) -> float:
        """Fastest possible time: compute at the peak; the streamed part at the slower of its two bounds."""
        return self.flops / peak_flops + max(self.stream_flops / peak_flops, self.stream_bytes / bandwidth)

    def __add__(self, other: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def scaled(self, s: float) -> "Work":
        return Work(*(s * a for a in dataclasses.astuple(self)))


def sample_work(cfg: ModelConfig, n_prompts: int, batch: int, prompt_len: int, new_tokens: int) -> Work:
    """One sampler call: prefill of the n distinct prompts (compute-bound), then new_tokens - 1 decode steps of
    `batch` rows (the last token is chosen but never fed back), each reading the weights and the KV cache so far."""
    prefill = forward_flops(cfg, n_prompts * prompt_len, causal_keys(prompt_len))
    steps = new_tokens - 1
    mean_context = prompt_len + new_tokens / 2  # step i attends to prompt_len + i keys, i = 1 .. steps
    decode = forward_flops(cfg, batch * steps, mean_context)
    decode_bytes = steps * param_bytes(cfg) + batch * steps * mean_context * kv_bytes_per_token(cfg)
    return Work(prefill, decode, decode_bytes)


def nocache_flops_executed(cfg: ModelConfig, batch: int, width: int, new_tokens: int) -> float:
    """What the no-cache baseline actually computes: new_tokens forwards over the whole [batch, width] buffer,
    every query scoring all `width` keys, and the LM head on one column per step."""
    trunk = forward_flops(cfg, batch * width, width, lm_head=False)
    return new_tokens * (trunk + 2 * cfg.d_model * cfg.vocab_size * batch)


# ----------------------------------------------------------------------------------------------
# Timing, compilations, machine
# ----------------------------------------------------------------------------------------------


class CompileWatch:
    """Counts jax's compile and trace events (and their seconds) while open."""

    def __init__(self) -> None:
        self.compiles = 0
        self.traces = 0
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event not in (COMPILE_EVENT, TRACE_EVENT, LOWER_EVENT):
            return
        self.compiles += event == COMPILE_EVENT
        self.traces += event == TRACE_EVENT
        self.seconds += duration

    def __enter__(self) -> "CompileWatch":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


class Probe:
    """The roofline, sampled: the faster of two n x n x n matmuls in the compute dtype (2 n^3 FLOPs) and one donated
    in-place scale of a float32 array (read and written once), compiled up front. `time_calls` runs it before every
    timed call, so the calls are judged against the peak the machine gave while they ran (cores are shared)."""

    def __init__(self, dtype_name: str, matmul_size: int, bandwidth_mib: int):
        n = matmul_size
        k1, k2 = jax.random.split(jax.random.key(0))
        self.dtype_name, self.n, self.mib = dtype_name, n, bandwidth_mib
        self._a = jax.random.normal(k1, (n, n), _DTYPES[dtype_name])
        self._b = jax.random.normal(k2, (n, n), _DTYPES[dtype_name])
        self._mm = jax.jit(jnp.matmul)
        self._buf = jnp.ones((bandwidth_mib * 2**20 // 4,), jnp.float32)
        self._scale = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
        self()

    def __call__(self) -> tuple[float, float]:
        """(FLOP/s of the matmul, bytes/s of the scale), one call each."""
        t_mm = math.inf
        for _ in range(2):
            t = time.perf_counter()
            jax.block_until_ready(self._mm(self._a, self._b))
            t_mm = min(t_mm, time.perf_counter() - t)
        t = time.perf_counter()
        self._buf = jax.block_until_ready(self._scale(self._buf))
        t_bw = time.perf_counter() - t
        return 2.0 * self.n**3 / t_mm, 2.0 * self._buf.nbytes / t_bw

    def measure(self, calls: int) -> dict[str, Any]:
        """Medians (and the best) of `calls` probes: the roofline reported on its own."""
        flops, bw = np.asarray([self() for _ in range(calls)]).T
        return {
            "matmul_dtype": self.dtype_name, "matmul_size": self.n, "bandwidth_mib": self.mib,
            "peak_flops": float(np.median(flops)), "peak_flops_max": float(flops.max()),
            "bandwidth_bytes_per_s": float(np.median(bw)), "bandwidth_max": float(bw.max()),
        }


@dataclasses.dataclass
class Timed:
    """first_s: the first call (compiles); compile_s: seconds jax spent tracing, lowering and compiling in it;
    times_s: the timed calls; peaks: the probe's (FLOP/s, bytes/s) just before each; compilations / traces:
    compile and trace events during the timed calls (want 0)."""

    first_s: float
    compile_s: float
    times_s: list[float]
    peaks: list[tuple[float, float]]
    compilations: int
    traces: int
    last: Any


def time_calls(call: Callable[[int], Any], warmup: int, iterations: int, probe: Callable[[], tuple[float, float]] | None = None) -> Timed:
    """call(i) runs step i and returns what to wait for: once to compile, `warmup` more, then `iterations` timed,
    each right after a `probe` (when given)."""
    with CompileWatch() as first:
        t = time.perf_counter()
        out = jax.block_until_ready(call(0))
        first_s = time.perf_counter() - t
    for i in range(1, 1 + warmup):
        out = jax.block_until_ready(call(i))
    times, peaks = [], []
    with CompileWatch() as timed:
        for i in range(1 + warmup, 1 + warmup + iterations):
            if probe is not None:
                peaks.append(probe())
            t = time.perf_counter()
            out = jax.block_until_ready(call(i))
            times.append(time.perf_counter() - t)
    return Timed(first_s, first.seconds, times, peaks, timed.compiles, timed.traces, out)


def rate_stats(work: float, times_s: list[float]) -> dict[str, float]:
    """work / time for the timed calls: median, min, max and quartiles (a rate's quartiles come from the times')."""
    t = np.asarray(times_s)
    q1, q3 = np.percentile(t, [75, 25])  # the slow quartile of times is the low quartile of rates
    return {
        "median": work / float(np.median(t)),
        "min": work / float(t.max()),
        "max": work / float(t.min()),
        "q1": work / float(q1),
        "q3": work / float(q3),
        "median_s": float(np.median(t)),
        "n": len(times_s),
    }


def ratio_stats(work: Work, times_s: list[float], peaks: list[tuple[float, float]]) -> dict[str, Any]:
    """mfu: useful FLOP/s over the matmul peak (the FLOP roofline); roofline_ratio: the fastest possible time (FLOPs
    at the peak, decode bytes at the bandwidth) over the measured time. Both from the median time and the median
    probe; their ranges pair each call with the probe taken just before it."""
    t = float(np.median(times_s))
    pf, bw = (float(np.median(x)) for x in zip(*peaks))
    mfu = [work.total_flops / ti / pfi for ti, (pfi, _) in zip(times_s, peaks)]
    roof = [work.roofline_s(pfi, bwi) / ti for ti, (pfi, bwi) in zip(times_s, peaks)]
    return {
        "mfu": work.total_flops / t / pf, "mfu_range": [min(mfu), max(mfu)],
        "roofline_ratio": work.roofline_s(pf, bw) / t, "roofline_ratio_range": [min(roof), max(roof)],
        "peak_flops_during": pf, "bandwidth_during": bw,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import jaxlib

    dev = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
    }


def memory_info() -> dict[str, Any]:
    """Peak host RSS of this process so far, and the device's peak where its backend reports one (not on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "host_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
    }


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_ticks() -> tuple[float, float, float] | None:
    """(machine busy, machine total, this process's) CPU seconds so far, from /proc/stat; None where it is missing."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    own = os.times()
    return (total - idle) / hz, total / hz, own.user + own.system


def cpu_shares(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> dict[str, float] | None:
    """Shares of the machine's CPU time used by this process and by everything else between two `_cpu_ticks`:
    other_share well above 0 means other jobs competed for the cores and the figures are pessimistic."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    busy, total, own = (e - s for s, e in zip(start, end))
    return {"own_share": round(own / total, 3), "other_share": round(max(busy - own, 0.0) / total, 3)}


# ----------------------------------------------------------------------------------------------
# Synthetic inputs
# ----------------------------------------------------------------------------------------------


def _prompt_len(cfg: Config) -> int:
    return cfg.bench.prompt_len or min(cfg.actor.prompt_buckets)


def synthetic_prompts(cfg: Config, n: int, new_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """n random prompts of bench.prompt_len tokens (never the pad id), bucketed like real ones by `pad_prompts`."""
    rng = np.random.default_rng([seed, 0xBE7C])
    rows = rng.integers(1, cfg.model.vocab_size, size=(n, _prompt_len(cfg)))
    return actor.pad_prompts(
        rows.tolist(), cfg.actor.prompt_buckets, PAD_ID, cfg.actor.too_long_prompt,
        max_new_tokens=new_tokens, max_seq_len=cfg.model.max_seq_len,
    )


def synthetic_rollout(cfg: Config, n: int, g: int, seed: int) -> tuple[Rollout, int]:
    """A rollout of n prompts x g samples of exactly actor.max_new_tokens random tokens each, and its prompt width."""
    new = cfg.actor.max_new_tokens
    tokens_np, len_n, p = synthetic_prompts(cfg, n, new, seed)
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
            return actor.emit_token(bufs, p + i, tok_b, lp_b, pad_id=pad_id, eos_id=eos_id)

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


def _actor_point(cfg: Config, graphdef: Any, params: Any, batch: int, new: int, probe: Probe, log: Callable) -> dict:
    b = cfg.bench
    n, g = _group(batch, cfg.actor.samples_per_prompt)
    actor_cfg = dataclasses.replace(cfg.actor, max_new_tokens=new)
    prompts_bp, len_n, p = synthetic_prompts(cfg, n, new, cfg.run.seed)
    prompts_bp, len_n = jnp.asarray(prompts_bp), jnp.asarray(len_n)
    keys = _keys(cfg.run.seed, 1, 1 + b.warmup + b.iterations)
    sampler = actor.make_sampler(cfg.model, actor_cfg, eos_id=b.eos_id, pad_id=PAD_ID)
    log(f"actor: batch {batch} ({n} prompts x {g}), {new} new tokens, KV cache")
    cached = time_calls(lambda i: sampler(graphdef, params, prompts_bp, len_n, keys[i], g), b.warmup, b.iterations, probe)
    rollout, info = cached.last
    tokens = float(np.asarray(rollout.completion_mask_bl).sum())
    if b.eos_id == -1 and (tokens != batch * new or int(info["decode_steps"]) != new - 1):
        raise RuntimeError(f"the sampler wrote {tokens:.0f} tokens in {int(info['decode_steps'])} steps, expected {batch * new}")
    work = sample_work(cfg.model, n, batch, _prompt_len(cfg), new)
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


def bench_actor(cfg: Config, probe: Probe, log: Callable) -> dict[str, Any]:
    """Generated tokens/s of the real sampler (`actor.make_sampler`, KV cache) over bench.batches x bench.new_tokens,
    against the no-cache baseline, and the speed-up."""
    graphdef, params = _policy(cfg)
    batches = cfg.bench.batches or (cfg.actor.prompts_per_round * cfg.actor.samples_per_prompt,)
    news = cfg.bench.new_tokens or (cfg.actor.max_new_tokens,)
    points = [_actor_point(cfg, graphdef, params, batch, new, probe, log) for new in news for batch in batches]
    return {
        "config": {
            "model": _model_dims(cfg.model), "batches": list(batches), "new_tokens": list(news),
            "prompt_len": _prompt_len(cfg), "eos_id": cfg.bench.eos_id,
            "sampling": {k: getattr(cfg.actor, k) for k in ("temperature", "top_k", "top_p", "greedy", "samples_per_prompt")},
        },
        "points": points,
        "compilations_timed": sum(pt["compilations_timed"] for pt in points),
        "traces_timed": sum(pt["traces_timed"] for pt in points),
        "compile_s": sum(pt["compile_s"] + (pt.get("baseline") or {}).get("compile_s", 0.0) for pt in points),
    }


def _update_parts(cfg: Config, graphdef: Any, p: int) -> tuple[Callable, Callable]:
    if cfg.learner.algorithm == "ppo":
        raise UserError("selfplay bench: learner.algorithm=ppo (a value model) is not benchmarked; use grpo, rloo or reinforce_pp")
    logprob_fn = functools.partial(transformer.token_logprobs, graphdef)
    optimizer = learner.make_optimizer(cfg.learner)
    update = learner.make_update_step(
        cfg.learner, group_size=cfg.actor.samples_per_prompt, prompt_width=p, logprob_fn=logprob_fn,
        optimizer=optimizer, actor_cfg=cfg.actor,
    )
    return update, functools.partial(learner.init_train_state, cfg.learner, optimizer=optimizer)


def _learner_dims(cfg: Config, rows: int, p: int) -> dict[str, Any]:
    lc = cfg.learner
    return {
        "model": _model_dims(cfg.model), "prompts": cfg.actor.prompts_per_round, "samples_per_prompt": cfg.actor.samples_per_prompt,
        "rows": rows, "prompt_len": _prompt_len(cfg), "prompt_width": p, "new_tokens": cfg.actor.max_new_tokens,
        "algorithm": lc.algorithm, "kl_coef": lc.kl_coef, "epochs": lc.epochs, "minibatches": lc.minibatches,
    }


def update_work(cfg: Config, rows: int, real_len: int) -> Work:
    """One update step: the pi_old forward, then epochs x (forward + backward) over every row."""
    fwd = forward_flops(cfg.model, rows * real_len, causal_keys(real_len))
    return Work(fwd * (1 + TRAIN_FACTOR * cfg.learner.epochs))


def bench_learner(cfg: Config, probe: Probe, log: Callable) -> dict[str, Any]:
    """Tokens/s and MFU of one update step (`learner.make_update_step`: forward, backward, optimiser) on a synthetic
    rollout of prompts_per_round x samples_per_prompt rows of prompt_len + max_new_tokens tokens."""
    b = cfg.bench
    graphdef, params = _policy(cfg)
    n, g = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt
    rollout, p = synthetic_rollout(cfg, n, g, cfg.run.seed)
    rows, width = rollout.tokens_bl.shape
    rng = np.random.default_rng([cfg.run.seed, 0x1EA2])
    rewards_b = jnp.asarray(rng.normal(size=rows).astype(np.float32))
    ref_bl = rollout.logprobs_bl + rollout.completion_mask_bl * jnp.asarray(rng.normal(0, 0.05, size=(rows, width)).astype(np.float32))
    batch = learner.Batch(rollout, rewards_b, ref_bl)
    update, init = _update_parts(cfg, graphdef, p)
    state = [init(params)]
    keys = _keys(cfg.run.seed, 2, 1 + b.warmup + b.iterations)

    def step(i: int) -> Any:
        state[0], metrics = update(state[0], batch, keys[i])
        return state[0].params, metrics

    log(f"learner: {rows} rows x {width} tokens, {cfg.learner.epochs} epoch(s) x {cfg.learner.minibatches} minibatch(es)")
    timed = time_calls(step, b.warmup, b.iterations, probe)
    real_len = _prompt_len(cfg) + cfg.actor.max_new_tokens
    work = update_work(cfg, rows, real_len)
    stats = rate_stats(float(rows * real_len), timed.times_s)
    return {
        "config": _learner_dims(cfg, rows, p),
        "figure": {"name": "tokens_per_s", "unit": "tokens (prompt + completion) per second", **stats},
        "flops": work.total_flops,
        **ratio_stats(work, timed.times_s, timed.peaks),
        "compile_s": timed.compile_s, "first_call_s": timed.first_s,
        "compilations_timed": timed.compilations, "traces_timed": timed.traces,
    }


def _critic_rows(cfg: Config, count: int, seed: int) -> tuple[jax.Array, jax.Array, int]:
    """`count` right-padded critic rows as long as a rollout's `[bos] prompt [sep] essay [eos]`: (tokens, lens, length)."""
    length = _prompt_len(cfg) + cfg.actor.max_new_tokens + 3
    fits = [s for s in cfg.critic.seq_buckets if s >= length]
    if not fits:
        raise ConfigError(f"critic.seq_buckets (max {max(cfg.critic.seq_buckets)}) has no bucket for critic rows of {length} tokens")
    rng = np.random.default_rng([seed, 0xC217])
    tokens = np.full((count, fits[0]), PAD_ID, np.int32)
    tokens[:, :length] = rng.integers(1, cfg.critic.model.vocab_size, size=(count, length))
    return jnp.asarray(tokens), jnp.full((count,), length, jnp.int32), length


def round_work(cfg: Config, rows: int, refresh_calls: int, calib_chunks: int) -> dict[str, Work]:
    """Useful work of each stage of a round (the refresh unamortised)."""
    n, new, pl = cfg.actor.prompts_per_round, cfg.actor.max_new_tokens, _prompt_len(cfg)
    cc = cfg.critic
    k = cc.ensemble_size
    real_len = pl + new
    critic_fwd = forward_flops(cc.model, rows * real_len, causal_keys(real_len), lm_head=False) * k
    row_len = real_len + 3
    pair_rows = 2 * cc.batch_size
    critic_row_fwd = forward_flops(cc.model, pair_rows * row_len, causal_keys(row_len), lm_head=False) * k
    refresh = sample_work(cfg.model, cc.batch_size, pair_rows, pl, new).scaled(refresh_calls)
    refresh = refresh + Work(critic_row_fwd * (TRAIN_FACTOR * cc.refresh_steps + calib_chunks))
    return {
        "rollout": sample_work(cfg.model, n, rows, pl, new),
        "score": Work(critic_fwd),
        "reference": Work(forward_flops(cfg.model, rows * real_len, causal_keys(real_len))),
        "update": update_work(cfg, rows, real_len),
        "critic": refresh,
    }


def bench_round(cfg: Config, probe: Probe, log: Callable) -> dict[str, Any]:
    """A synthetic self-play round built from the public functions, staged and timed like `loop.run_round`
    (block_until_ready after each stage): rollout (the real sampler), critic score + normaliser, reference
    log-probs, the update step and the critic refresh's device work: sampling its pairs (ceil(refresh_budget /
    critic.batch_size) calls of critic.batch_size prompts x 2), refresh_steps train steps, and the normaliser's
    re-calibration (scoring min(512, label_budget) pairs). Host-side work of the loop (text decoding, the gold
    grader, diversity, logging) is left out. The refresh runs in every timed round; the headline figure counts
    it once per critic.refresh_every rounds, as the loop does."""
    b, cc = cfg.bench, cfg.critic
    graphdef, params = _policy(cfg)
    ref_params = params
    n, g, new = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt, cfg.actor.max_new_tokens
    rows = n * g
    prompts_bp, len_n, p = synthetic_prompts(cfg, n, new, cfg.run.seed)
    prompts_bp, len_n = jnp.asarray(prompts_bp), jnp.asarray(len_n)
    sampler = actor.make_sampler(cfg.model, cfg.actor, eos_id=b.eos_id, pad_id=PAD_ID)
    update, init = _update_parts(cfg, graphdef, p)
    reference = learner.make_reference_logprobs(functools.partial(transformer.token_logprobs, graphdef), prompt_width=p)
    state = init(params)
    critic_graphdef = C.reward_graphdef(cc.model)
    fns = C.make_critic_fns(critic_graphdef, cc)
    critic_state = C.init_state(cc, cfg.run.seed)

    refresh_calls = math.ceil(cc.refresh_budget / cc.batch_size) if cc.refresh_every else 0
    pair_rows = 2 * cc.batch_size
    calib_chunks = math.ceil(2 * min(_CALIBRATION_PAIRS, cc.label_budget) / pair_rows) if cc.refresh_every else 0
    r_prompts, r_len, r_p = synthetic_prompts(cfg, cc.batch_size, new, cfg.run.seed + 1)
    if r_p != p:
        raise ConfigError(f"refresh prompts bucket {r_p} differs from the round's {p}")
    r_prompts, r_len = jnp.asarray(r_prompts), jnp.asarray(r_len)
    train_tokens, train_len, _ = _critic_rows(cfg, cc.ensemble_size * pair_rows, cfg.run.seed)
    train_tokens_knl = train_tokens.reshape(cc.ensemble_size, pair_rows, -1)
    train_len_kn = train_len.reshape(cc.ensemble_size, pair_rows)
    calib_tokens, calib_len, _ = _critic_rows(cfg, pair_rows, cfg.run.seed + 2)

    calls = 1 + b.warmup + b.iterations
    keys = _keys(cfg.run.seed, 3, calls)
    stage_times: dict[str, list[float]] = {s: [] for s in ("rollout", "score", "reference", "update", "critic")}
    holder = {"state": state, "critic": critic_state}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        stage_times[name].append(time.perf_counter() - t)
        return out

    def one_round(i: int) -> Any:
        key = keys[i]
        rollout, _ = stage("rollout", lambda: sampler(graphdef, holder["state"].params, prompts_bp, len_n, jax.random.fold_in(key, 0), g))

        def score() -> Any:
            scores = fns.score(holder["critic"], rollout, p)
            holder["critic"] = fns.observe(holder["critic"], scores.members_kb)
            return scores.rewards_b, holder["critic"]

        rewards_b, _ = stage("score", score)
        ref_lp = stage("reference", lambda: reference(ref_params, rollout))

        def update_stage() -> Any:
            holder["state"], metrics = update(holder["state"], learner.Batch(rollout, rewards_b, ref_lp), jax.random.fold_in(key, 1))
            return holder["state"].params, metrics

        out = stage("update", update_stage)
        if not refresh_calls:
            return out

        def refresh() -> Any:
            samples = [
                sampler(graphdef, holder["state"].params, r_prompts, r_len, jax.random.fold_in(key, 2 + c), 2)[0].tokens_bl
                for c in range(refresh_calls)
            ]
            for _ in range(cc.refresh_steps):
                holder["critic"], _ = fns.train_step(holder["critic"], train_tokens_knl, train_len_kn)
            calib = [fns.score_tokens(holder["critic"], calib_tokens, calib_len).members_kb for _ in range(calib_chunks)]
            return samples, calib, holder["critic"]

        stage("critic", refresh)
        return out

    log(f"round: {n} prompts x {g} samples, {new} new tokens; refresh: {refresh_calls} sampler calls, "
        f"{cc.refresh_steps} critic steps, {calib_chunks} calibration batches (every {cc.refresh_every or 'no'} rounds)")
    timed = time_calls(one_round, b.warmup, b.iterations, probe)
    timed_from = 1 + b.warmup
    split = {s: float(np.median(ts[timed_from:])) for s, ts in stage_times.items() if ts}
    works = round_work(cfg, rows, refresh_calls, calib_chunks)
    every = cc.refresh_every or 1
    amortised = {s: t / every if s == "critic" else t for s, t in split.items()}
    work = functools.reduce(lambda a, w: a + w, (w.scaled(1 / every) if s == "critic" else w for s, w in works.items()))
    per_round = [sum(stage_times[s][i] / (every if s == "critic" else 1) for s in split) for i in range(timed_from, calls)]
    stats = rate_stats(float(rows), per_round)
    return {
        "config": {
            **_learner_dims(cfg, rows, p),
            "critic_model": _model_dims(cc.model),
            "critic": {k: getattr(cc, k) for k in ("ensemble_size", "batch_size", "refresh_every", "refresh_budget", "refresh_steps")},
            "refresh_sampler_calls": refresh_calls, "calibration_batches": calib_chunks, "eos_id": b.eos_id,
        },
        "round_kind": "synthetic (selfplay.bench.bench_round), the stages of loop.run_round from the public functions",
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
    }


_RUNNERS = {"actor": bench_actor, "learner": bench_learner, "round": bench_round}


def run(which: str, cfg: Config, *, command: str = "", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run benchmark `which` with the roofline probed before every timed call (and measured on its own before and
    after), and return the JSON record."""
    if which not in _RUNNERS:
        raise UserError(f"unknown benchmark {which!r}; choose one of {', '.join(BENCHMARKS)}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    b = cfg.bench
    load_start = _load_avg()
    cores = machine_info()["cores"] or 1
    if load_start[0] > cores:
        log(f"warning: 1-minute load average {load_start[0]} exceeds the {cores} cores; figures will be noisy, re-run when quieter")
    log(f"roofline: {b.matmul_size}^3 {cfg.model.compute_dtype} matmul, {b.bandwidth_mib} MiB in-place scale")
    probe = Probe(cfg.model.compute_dtype, b.matmul_size, b.bandwidth_mib)
    roof_before = probe.measure(max(b.iterations, 3))
    t0, ticks0 = time.perf_counter(), _cpu_ticks()
    result = _RUNNERS[which](cfg, probe, log)
    wall, ticks1 = time.perf_counter() - t0, _cpu_ticks()
    roof_after = probe.measure(max(b.iterations, 3))
    return {
        "benchmark": which,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "load_avg": {"start": load_start, "end": _load_avg()},
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
