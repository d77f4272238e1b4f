"""Ours' side of the real-model round (issue #28): the loop's own round on a run directory's imported policy, timed
as `selfplay bench round` times its calls. Runs in selfplay's virtualenv and prints one JSON line:

    python benchmarks/peer/ours_round.py --run-dir runs/bench-smollm2 [--config configs/bench_smollm2.yaml] [KEY=VALUE]

Why not `selfplay bench round`: it builds random weights from the config's model section, feeds random prompt tokens,
calls no reward function (its rewards are a synthetic critic's, or zero), and `bench:` has no key naming a run
directory. Here the round is `selfplay.run.round.run_round` on the pieces `selfplay train` builds
(`selfplay.run.setup.build`): the imported weights (also the frozen reference), run.prompts_file rendered with the
run's chat template, the rollout decoded to text and reward.fns called on it (reward.critic_weight 0: no critic in the
reward), the update. One change: the generator stops on bench.eos_id alone ((-1,): no row ends), so every row writes
exactly actor.max_new_tokens tokens, as TRL's min_new_tokens makes it do. The model section is the run directory's.
Run from the repository root (run.prompts_file is a relative path).

Timing as `selfplay bench`: one compiling round, bench.warmup untimed rounds, then bench.iterations timed rounds,
each right after the roofline probe; a round is timed whole (its host work included), completions/s = rows / that
time. The stage split is the round's own Stopwatch (`timing/*`): rollout, score, reference, reward_fns, update, and
`other`, the rest of the round (waiting for the host thread, transfers). The run directory is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from selfplay import sharding
from selfplay.actor import Generator
from selfplay.config import load_bench_config, to_dict
from selfplay.jobs.bench import write_record
from selfplay.perf import (
    Probe,
    Work,
    cpu_shares,
    cpu_ticks,
    load_avg,
    machine_info,
    memory_info,
    rate_stats,
    ratio_stats,
    round_work,
    rss_trend,
    time_calls,
)
from selfplay.run.round import run_round
from selfplay.run.setup import build, check_inputs, resolve_config

STAGES = ("rollout", "score", "reference", "reward_fns", "update")


def bench_loop_round(run_dir: Path, config: str, overrides: list[str], log) -> dict:
    _, b = load_bench_config(config, overrides)
    cfg = resolve_config(run_dir, config, overrides)  # the run directory's model section, the config's other keys
    check_inputs(cfg, run_dir)
    layout = sharding.Layout.from_config(cfg.mesh)
    setup, run = build(cfg, run_dir, layout)
    policy = setup.gen.policy
    n, g, new = cfg.actor.prompts_per_round, cfg.actor.samples_per_prompt, cfg.actor.max_new_tokens
    rows = n * g
    gen = Generator(policy, cfg.actor, batch=n, layout=layout, eos_ids=(b.eos_id,))
    setup = dataclasses.replace(setup, gen=gen)
    prompt_tokens = sorted({len(policy.tokenizer.encode_prompt(p)) for p in setup.task.train_prompts})

    log(f"roofline: {b.matmul_size}^3 {cfg.model.compute_dtype} matmul, {b.bandwidth_mib} MiB in-place scale")
    probe = Probe(cfg.model.compute_dtype, b.matmul_size, b.bandwidth_mib)
    roof_before = probe.measure(max(b.iterations, 3))
    log(f"loop round on {run_dir}: {n} prompts x {g}, exactly {new} new tokens (eos ids {(b.eos_id,)}), prompts of "
        f"{prompt_tokens} tokens, 1 compiling + {b.warmup} warm-up + {b.iterations} timed rounds")
    metrics: list[dict] = []

    def one_round(i: int) -> dict:
        metrics.append(run_round(setup, run, i + 1).metrics)
        return metrics[-1]

    t0, ticks0 = time.perf_counter(), cpu_ticks()
    timed = time_calls(one_round, b.warmup, b.iterations, probe)
    wall, ticks1 = time.perf_counter() - t0, cpu_ticks()
    roof_after = probe.measure(max(b.iterations, 3))

    lengths = sorted({m["completions/mean_length"] for m in metrics})
    if b.eos_id == -1 and lengths != [float(new)]:
        raise SystemExit(f"completion lengths {lengths}, expected exactly {new}")
    timed_m = metrics[1 + b.warmup:]
    stage_s = {s: [m[f"timing/{s}"] for m in timed_m] for s in STAGES if f"timing/{s}" in timed_m[0]}
    stage_s["other"] = [t - sum(m[f"timing/{s}"] for s in stage_s) for t, m in zip(timed.times_s, timed_m)]
    split = {s: float(np.median(ts)) for s, ts in stage_s.items()}
    prompt_len = prompt_tokens[-1]
    works = round_work(cfg, rows, prompt_len, 0, 0)
    counted = [works[s] for s in ("rollout", "score", "reference", "update") if s in split]
    work = functools.reduce(lambda a, w: a + w, counted)
    return {
        "benchmark": "loop_round",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "cpu": cpu_shares(ticks0, ticks1),
        "roofline": {**roof_before, "after": {k: roof_after[k] for k in ("peak_flops", "bandwidth_bytes_per_s")}},
        "config": {
            "run_dir": str(run_dir), "config_file": config, "rows": rows, "prompts": n, "samples_per_prompt": g,
            "new_tokens": new, "prompt_tokens": prompt_tokens, "prompt_width": max(cfg.actor.prompt_buckets),
            "eos_id": b.eos_id, "prompts_file": cfg.run.prompts_file, "reward_fns": list(cfg.reward.fns),
            "critic_weight": cfg.reward.critic_weight, "algorithm": cfg.learner.algorithm, "lr": cfg.learner.lr,
            "kl_coef": cfg.learner.kl_coef, "epochs": cfg.learner.epochs, "minibatches": cfg.learner.minibatches,
            "model": to_dict(cfg.model),
        },
        "round_kind": "the loop's run_round on the run directory's policy (benchmarks/peer/ours_round.py)",
        "figure": {"name": "completions_per_s", "unit": "completions per second, whole loop rounds",
                   **rate_stats(float(rows), timed.times_s)},
        "completions_per_s_refresh_round": rows / float(np.median(timed.times_s)),  # no refresh: the same figure
        "flops": work.total_flops,
        **ratio_stats(work, timed.times_s, timed.peaks),
        "stages": {
            s: {"median_s": split[s], "share": split[s] / sum(split.values()), "flops": works.get(s, Work()).total_flops,
                **ratio_stats(works.get(s, Work()), stage_s[s], timed.peaks)}
            for s in split
        },
        "host_overlapped_s": float(np.median([m["timing/host"] for m in timed_m])),
        "step_time_s": [m["perf/step_time"] for m in timed_m],
        "reward_mean": [m.get("reward/mean") for m in metrics],  # every round's, the untimed ones first
        "compile_s": timed.compile_s, "first_call_s": timed.first_s,
        "compilations_timed": timed.compilations, "traces_timed": timed.traces,
        "host_rss_mib": rss_trend(timed.rss_mib), "memory": memory_info(), "wall_s": wall,
        "timing": {"warmup": b.warmup, "iterations": b.iterations},
        "run_config": {"bench": to_dict(b), "seed": cfg.run.seed},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a run directory fresh from `selfplay import-hf` (no rounds trained)")
    p.add_argument("--config", default="configs/bench_smollm2.yaml")
    p.add_argument("--out", default=None, help="also append the JSON line to this file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. bench.iterations=3")
    a = p.parse_args(argv)
    load_start = load_avg()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    record = bench_loop_round(Path(a.run_dir), a.config, list(a.overrides), log)
    record["load_avg"] = {"start": load_start, "end": load_avg()}
    record["command"] = shlex.join(["python", "benchmarks/peer/ours_round.py", *(sys.argv[1:] if argv is None else argv)])
    write_record(record, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
