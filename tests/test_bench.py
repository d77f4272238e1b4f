"""`selfplay bench` on the tiny config: every benchmark writes one JSON line with its fields and compiles nothing
while timed; the FLOP count, the compile counter and the no-cache baseline are checked on their own. No timings
are asserted (throughput lives in benchmarks/RESULTS.md)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay import actor, perf
from selfplay.cli import main
from selfplay.config import load_config
from selfplay.jobs import bench
from selfplay.models import transformer

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
SMALL = [
    "bench.warmup=1", "bench.iterations=1", "bench.batches=[2]", "bench.new_tokens=[6]", "bench.prompt_len=10",
    "bench.matmul_size=128", "bench.bandwidth_mib=4", "actor.max_new_tokens=6", "actor.prompt_buckets=[12]",
    "actor.prompts_per_round=2", "actor.samples_per_prompt=2", "critic.batch_size=2", "critic.seq_buckets=[24, 64]",
    "critic.refresh_every=2", "critic.refresh_budget=2", "critic.refresh_steps=1", "critic.label_budget=4", "critic.initial_labels=0",
]
COMMON = {"benchmark", "date", "command", "machine", "load_avg", "roofline", "config", "compile_s", "compilations_timed",
          "traces_timed", "memory", "timing"}
STATS = {"median", "min", "max", "q1", "q3", "median_s", "n"}


@pytest.mark.parametrize("which", bench.BENCHMARKS)
def test_bench_writes_one_json_line_without_timed_compilations(which, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["bench", which, "--config", TINY, "--out", str(out), *SMALL]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == lines[0]
    rec = json.loads(lines[0])
    assert COMMON <= rec.keys() and rec["benchmark"] == which
    assert {"cpu", "cores", "backend", "device_kind", "jax", "jaxlib"} <= rec["machine"].keys()
    assert rec["roofline"]["peak_flops"] > 0 and rec["roofline"]["bandwidth_bytes_per_s"] > 0
    assert rec["memory"]["host_peak_rss_mib"] > 0
    assert rec["compile_s"] > 0
    assert rec["compilations_timed"] == 0 and rec["traces_timed"] == 0
    if which == "actor":
        (pt,) = rec["points"]
        assert (pt["batch"], pt["new_tokens"], pt["prompts"], pt["samples_per_prompt"]) == (2, 6, 1, 2)
        assert STATS <= pt["tokens_per_s"].keys() and STATS <= pt["baseline"]["tokens_per_s"].keys()
        assert pt["speedup"] > 0 and 0 < pt["roofline_ratio"] and pt["decode_bytes"] > 0
    else:
        assert STATS <= rec["figure"].keys() and rec["figure"]["n"] == 1
        assert rec["flops"] > 0 and rec["mfu"] > 0 and rec["roofline_ratio"] > 0
        assert rec["config"]["kl_coef"] == pytest.approx(0.04) and rec["config"]["rows"] == 4
    if which == "round":
        assert set(rec["stages"]) == {"rollout", "score", "reference", "update", "critic"}
    if which != "actor":
        assert rec["host_rss_mib"]["calls"] == 1 and rec["host_rss_mib"]["first"] > 0


@pytest.mark.parametrize("extra, stages", [
    ([], {"rollout", "score", "reference", "update"}),
    (["reward.critic_weight=0", "reward.fns=[toy_rewards:length_reward]"], {"rollout", "reference", "update"}),  # no critic
], ids=["no_refresh", "no_critic"])  # fmt: skip
def test_round_without_refresh_counts_only_the_stages_that_ran(tmp_path, extra, stages):
    out = tmp_path / "results.jsonl"
    assert main(["bench", "round", "--config", TINY, "--out", str(out), *SMALL, "critic.refresh_every=0", *extra]) == 0
    rec = json.loads(out.read_text().splitlines()[-1])
    assert set(rec["stages"]) == stages
    assert rec["flops"] == pytest.approx(sum(st["flops"] for st in rec["stages"].values()))


def test_round_refuses_the_self_judging_critic(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["bench", "round", "--config", TINY, "--out", str(out), *SMALL, "critic.judge=true"]) == 2
    assert "critic.judge=true reads decoded text" in capsys.readouterr().err and not out.exists()


def test_rss_trend_sees_a_leak_and_not_a_steady_process():
    kept = []

    def leaky(i):
        kept.append(np.ones(2**20 // 8 * 4))  # 4 MiB more, kept, per call
        return jnp.zeros(())

    leak = perf.rss_trend(perf.time_calls(leaky, warmup=0, iterations=6).rss_mib)
    steady = perf.rss_trend(perf.time_calls(lambda i: jnp.zeros(()) + i, warmup=2, iterations=6).rss_mib)
    assert leak["slope_mib_per_100_calls"] > 300 and leak["last"] - leak["first"] > 15
    assert abs(steady["slope_mib_per_100_calls"]) < 50


def test_flop_count_by_hand():
    cfg = load_config(None, ["model.vocab_size=100", "model.d_model=8", "model.n_layers=2", "model.n_heads=2",
                             "model.n_kv_heads=1", "model.d_ff=16"]).model
    # per layer: q 8*2*4, k and v 8*1*4 each, o 2*4*8, MLP 3*8*16; LM head 8*100
    assert perf.matmul_params(cfg) == 2 * (64 + 64 + 64 + 384) + 800
    # 3 tokens attending to 2 keys each: 2 FLOPs per weight, 4 * heads * head_dim per (query, key) per layer
    assert perf.forward_flops(cfg, 3, 2) == 3 * (2 * 1952 + 4 * 2 * 2 * 4 * 2)
    w = perf.sample_work(cfg, n_prompts=1, batch=2, prompt_len=4, new_tokens=3)
    assert w.flops == perf.forward_flops(cfg, 4, 2.5)
    assert w.stream_flops == perf.forward_flops(cfg, 2 * 2, 5.5)  # steps at contexts 5 and 6


def test_compile_watch_sees_a_recompilation():
    f = jax.jit(lambda x: x * 2)
    xs = [jnp.ones(1)] * 3 + [jnp.ones(2)]  # the last timed call sees a new shape
    timed = perf.time_calls(lambda i: f(xs[i]), warmup=1, iterations=2)
    assert (timed.compilations, timed.traces) == (1, 1)


def test_nocache_baseline_writes_what_the_cached_sampler_writes():
    cfg = load_config(TINY, ["actor.greedy=true", "actor.max_new_tokens=5"])
    graphdef, params = transformer.split(transformer.create_model(cfg.model, 0))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    tokens_bp, len_b, _ = actor.pad_prompts(prompts, [8], 0)
    key = jax.random.key(1)
    cached, _ = actor.make_sampler(cfg.model, cfg.actor, eos_ids=(), pad_id=0)(graphdef, params, tokens_bp, len_b, key, 2)
    base = bench.make_nocache_sampler(cfg.model, cfg.actor, eos_id=-1, pad_id=0)(
        graphdef, params, tokens_bp, len_b, key, samples_per_prompt=2
    )
    np.testing.assert_array_equal(np.asarray(base.tokens_bl), np.asarray(cached.tokens_bl))
    np.testing.assert_array_equal(np.asarray(base.completion_mask_bl), np.asarray(cached.completion_mask_bl))
    np.testing.assert_allclose(np.asarray(base.logprobs_bl), np.asarray(cached.logprobs_bl), atol=1e-4)
