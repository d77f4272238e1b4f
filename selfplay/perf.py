"""What the benchmarks measure with: the FLOP and byte counts of a stage, the in-run roofline probe, the timing of
compiled calls (with a compile counter) and the facts about the machine. `selfplay.jobs.bench` runs the benchmarks.

Counting conventions (also in benchmarks/RESULTS.md). A forward pass costs 2 FLOPs per matmul weight per token
(`matmul_params`: the layers' projections and the LM head; the embedding lookup is a gather) plus, per layer,
4 * n_heads * head_dim FLOPs per (query, key) pair (QK^T and PV). Only the keys a query may see count (causal
attention over l tokens: (l + 1) / 2 keys on average), not the masked ones the implementation also computes.
Norms, RoPE, softmax and sampling are left out (O(d) per token). Backward = 2 forwards, so training = 3x.
A decode step reads every weight once and the keys and values of every token before it (`sample_work`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from selfplay.algorithms import pi_old_from_loss
from selfplay.config import Config, ModelConfig

TRAIN_FACTOR = 3  # forward + backward, the backward costing two forwards (input and weight gradients)
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


def update_work(cfg: Config, rows: int, real_len: int) -> Work:
    """One update step: the pi_old forward (none where the loss's forward is pi_old: `pi_old_from_loss`), then
    epochs x (forward + backward) over every row."""
    fwd = forward_flops(cfg.model, rows * real_len, causal_keys(real_len))
    return Work(fwd * (int(not pi_old_from_loss(cfg.learner)) + TRAIN_FACTOR * cfg.learner.epochs))


def round_work(cfg: Config, rows: int, prompt_len: int, refresh_calls: int, calib_chunks: int) -> dict[str, Work]:
    """Useful work of each stage of a round of prompts of `prompt_len` tokens (the refresh unamortised)."""
    n, new, pl = cfg.actor.prompts_per_round, cfg.actor.max_new_tokens, prompt_len
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
    rss_mib: list[float] = dataclasses.field(default_factory=list)  # host RSS right after each timed call


def time_calls(call: Callable[[int], Any], warmup: int, iterations: int, probe: Callable[[], tuple[float, float]] | None = None) -> Timed:
    """call(i) runs step i and returns what to wait for: once to compile, `warmup` more, then `iterations` timed,
    each right after a `probe` (when given)."""
    with CompileWatch() as first:
        t = time.perf_counter()
        out = jax.block_until_ready(call(0))
        first_s = time.perf_counter() - t
    for i in range(1, 1 + warmup):
        out = jax.block_until_ready(call(i))
    times, peaks, rss = [], [], []
    with CompileWatch() as timed:
        for i in range(1 + warmup, 1 + warmup + iterations):
            if probe is not None:
                peaks.append(probe())
            t = time.perf_counter()
            out = jax.block_until_ready(call(i))
            times.append(time.perf_counter() - t)
            rss.append(current_rss_mib())
    return Timed(first_s, first.seconds, times, peaks, timed.compiles, timed.traces, out, rss)


def current_rss_mib() -> float:
    """This process's resident set size now (MiB), from /proc/self/statm; NaN where there is no /proc."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_trend(rss_mib: list[float]) -> dict[str, Any]:
    """Host RSS over the timed calls: first, last, max, and the least-squares slope in MiB per 100 calls (flat: ~0).
    The first timed call comes after the compile and the warm-up, so allocator warm-up is mostly behind it."""
    r = np.asarray(rss_mib, float)
    if not len(r):
        return {}
    slope = float(np.polyfit(np.arange(len(r)), r, 1)[0]) * 100 if len(r) > 1 and np.isfinite(r).all() else float("nan")
    return {"first": float(r[0]), "last": float(r[-1]), "max": float(r.max()), "slope_mib_per_100_calls": slope, "calls": len(r)}


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


def load_avg() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_ticks() -> tuple[float, float, float] | None:
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
    """Shares of the machine's CPU time used by this process and by everything else between two `cpu_ticks`:
    other_share well above 0 means other jobs competed for the cores and the figures are pessimistic."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    busy, total, own = (e - s for s, e in zip(start, end))
    return {"own_share": round(own / total, 3), "other_share": round(max(busy - own, 0.0) / total, 3)}
