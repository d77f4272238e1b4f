"""Where the time of one update step or one sampler call goes, by XLA operation, from a `jax.profiler` trace.

    python benchmarks/profile_ops.py update --config configs/bench_reference.yaml
    python benchmarks/profile_ops.py sample --config configs/bench_reference.yaml [bench.batches=[64]]

Builds the step exactly as `selfplay bench learner` / `selfplay bench actor` do (selfplay/jobs/bench.py), compiles it,
runs it once more, then traces one call and sums the trace's operation events (XLA CPU thunks / GPU kernels) by
class: matmuls (dot, YNNPACK/XNNPACK/oneDNN fusions), layout copies and transposes, other fusions (elementwise and
reductions), and the rest (loop control). Times are exclusive (a while loop's own time, not its body's) and summed
over threads, so they can exceed the wall time. Prints one JSON object: the classes' milliseconds and the 15 most
expensive operations.
The trace is kept under --trace-dir for TensorBoard's profile plugin or Perfetto.
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import time

import jax
import jax.numpy as jnp

from selfplay import actor, learner
from selfplay.config import load_bench_config
from selfplay.jobs import bench


def classify(name: str) -> str:
    base = re.sub(r"\.\d+$", "", name)
    if re.match(r"(ynn|xnn|onednn)_fusion|dot|custom-call|gemm|cublas|cutlass", base):
        return "matmul"
    if "transpose" in base or base.startswith("copy"):
        return "copy/transpose"
    if "fusion" in base or base in {"add", "multiply", "exponential", "reduce", "select", "scatter", "gather"}:
        return "other fusions"
    return "rest"


def exclusive_ms(events: list[dict]) -> tuple[collections.Counter, collections.Counter]:
    """Milliseconds of each operation without the operations nested in it (a while loop's own time, not its body's),
    summed over threads; and call counts. Runtime bookkeeping events (names with spaces or `$`) are dropped."""
    ops, calls = collections.Counter(), collections.Counter()
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, own]
        for e in evs:
            while stack and stack[-1][0] <= e["ts"]:
                end, name, own = stack.pop()
                ops[name] += own / 1e3
            if stack:
                stack[-1][2] -= e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], e["dur"]])
            calls[e["name"]] += 1
        for end, name, own in stack:
            ops[name] += own / 1e3
    for name in list(ops):
        if name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool", "PjRt", "Thunk")) or " " in name:
            del ops[name]
    return ops, calls


def build(which: str, cfg, bcfg):
    """(call() -> output, description) for one update step or one sampler call, as the benchmarks build them."""
    graphdef, params = bench._policy(cfg)
    if which == "update":
        n, g = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt
        rollout, p = bench.synthetic_rollout(cfg, bcfg, n, g, cfg.run.seed)
        batch = learner.Batch(rollout, jnp.linspace(-1.0, 1.0, n * g), rollout.logprobs_bl)
        steps, state0 = bench._learner_steps(cfg, graphdef, params)
        update = steps.update(p)
        state = [state0]

        def call():
            state[0], metrics = update(state[0], batch, jax.random.key(0))
            return state[0].params, metrics

        return call, f"update step, {n * g} rows x {rollout.tokens_bl.shape[1]} tokens"
    b = (bcfg.batches or (cfg.actor.prompts_per_round * cfg.actor.samples_per_prompt,))[-1]
    new = (bcfg.new_tokens or (cfg.actor.max_new_tokens,))[0]
    n, g = bench._group(b, cfg.actor.samples_per_prompt)
    prompts_bp, len_n, _ = bench.synthetic_prompts(cfg, bcfg, n, new, cfg.run.seed)
    actor_cfg = dataclasses.replace(cfg.actor, max_new_tokens=new)
    sampler = actor.make_sampler(cfg.model, actor_cfg, eos_ids=(bcfg.eos_id,), pad_id=bench.PAD_ID)
    prompts_bp, len_n = jnp.asarray(prompts_bp), jnp.asarray(len_n)
    return (lambda: sampler(graphdef, params, prompts_bp, len_n, jax.random.key(0), g)), f"sampler call, batch {b}, {new} new tokens"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", choices=["update", "sample"])
    ap.add_argument("--config", default=None)
    ap.add_argument("--trace-dir", default="/tmp/selfplay-profile")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    cfg, bcfg = load_bench_config(args.config, args.overrides)
    call, what = build(args.which, cfg, bcfg)
    jax.block_until_ready(call())
    jax.block_until_ready(call())
    t = time.perf_counter()
    jax.block_until_ready(call())
    untraced_s = time.perf_counter() - t
    jax.profiler.start_trace(args.trace_dir, create_perfetto_trace=True)
    t = time.perf_counter()
    jax.block_until_ready(call())
    traced_s = time.perf_counter() - t
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{args.trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    ops, calls = exclusive_ms(events)
    classes = collections.Counter()
    for name, ms in ops.items():
        classes[classify(name)] += ms
    print(json.dumps({
        "what": what, "untraced_s": round(untraced_s, 3), "traced_s": round(traced_s, 3),
        "op_ms_by_class": {k: round(v, 1) for k, v in classes.most_common()},
        "top_ops": [[name, round(ms, 1), calls[name]] for name, ms in ops.most_common(15)],
        "trace": path,
    }, indent=1))


if __name__ == "__main__":
    main()
