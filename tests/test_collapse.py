"""The model-collapse lab: each data policy builds the training set it names, the tail metric, and a tiny lab that runs
end to end, writes its JSON, TensorBoard and PNG files, and resumes after a kill with identical results."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfplay.cli import main
from selfplay.config import ArmConfig, ConfigError, UserError, load_config
from selfplay.jobs.collapse import HUMAN, RESULTS_FILE, Tail, Written, essay_items, rarest, run_lab, training_set
from selfplay.world import World

ROOT = Path(__file__).resolve().parents[1]


def _written(gen: int, n: int, k: int = 1) -> Written:
    """n prompts with k essays each; the first essay of each prompt is kept (k > 1: a grader kept one)."""
    prompts = [f"p{gen}-{i}" for i in range(n) for _ in range(k)]
    essays = [f"e{gen}-{i}-{j}" for i in range(n) for j in range(k)]
    kept = [j == 0 for _ in range(n) for j in range(k)]
    return Written(prompts, essays, kept, f"gen {gen}")


HUMAN_SET = [(f"h{i}", f"human essay {i}") for i in range(10)]


def test_replace_trains_on_the_last_generation_only():
    rows = training_set(ArmConfig("r", "replace"), HUMAN_SET, [_written(0, 10), _written(1, 10)], np.random.default_rng(0))
    assert Counter(src for _, _, src in rows) == {"gen 1": 10}
    assert [e for _, e, _ in rows] == [f"e1-{i}-0" for i in range(10)]


def test_accumulate_keeps_the_human_corpus_and_every_generation():
    rows = training_set(ArmConfig("a", "accumulate"), HUMAN_SET, [_written(0, 10), _written(1, 10), _written(2, 10)],
                        np.random.default_rng(0))
    assert Counter(src for _, _, src in rows) == {HUMAN: 10, "gen 0": 10, "gen 1": 10, "gen 2": 10}
    assert rows[:10] == [(p, e, HUMAN) for p, e in HUMAN_SET]


def test_mix_keeps_a_share_of_human_essays_drawn_without_replacement():
    rows = training_set(ArmConfig("m", "mix", human_fraction=0.3), HUMAN_SET, [_written(0, 10), _written(1, 10)],
                        np.random.default_rng(0))
    assert Counter(src for _, _, src in rows) == {HUMAN: 3, "gen 1": 7}
    humans = [(p, e) for p, e, s in rows if s == HUMAN]
    assert len(set(humans)) == 3 and set(humans) <= set(HUMAN_SET)
    assert [e for _, e, s in rows if s == "gen 1"] == [f"e1-{i}-0" for i in range(7)]


def test_graded_trains_on_the_kept_essays_only():
    w = _written(0, 10, k=3)
    rows = training_set(ArmConfig("g", "graded", best_of=3), HUMAN_SET, [w], np.random.default_rng(0))
    assert len(w.essays) == 30 and len(rows) == 10
    assert Counter(src for _, _, src in rows) == {"gen 0": 10}
    assert {p for p, _, _ in rows} == set(w.prompts)  # one essay per prompt


def test_rarest_takes_the_rarest_items_up_to_the_mass():
    counts = Counter({"a": 50, "b": 30, "c": 10, "d": 6, "e": 4})
    assert rarest(counts, 0.10) == {"d", "e"}  # 4 + 6 = 10 of 100
    assert rarest(counts, 0.05) == {"e"}
    assert rarest(counts, 0.01) == {"e"}  # at least the single rarest item


def test_tail_coverage_is_one_for_human_essays_and_zero_without_the_tail():
    cfg = load_config(ROOT / "configs/tiny.yaml")
    world = World.from_config(cfg.world)
    corpus = [e for _, e in world.corpus(cfg.world.corpus_size)]
    rng = np.random.default_rng(3)
    prompts = world.sample_prompts(40, rng)
    reference = [world.human_essay(p, rng) for p in prompts]
    tail = Tail.of(world, corpus, reference, 0.1)
    assert tail.templates and tail.values
    assert tail.coverage(world, reference)["tail/coverage"] == pytest.approx(1.0)
    # The same essays with every tail sentence dropped: nothing of the tail is left.
    pruned = []
    for essay in reference:
        kept = []
        for sentence in essay.split(". "):
            s = sentence if sentence.endswith(".") else sentence + "."
            ts, vs = essay_items(world, s)
            if not (set(ts) & tail.templates or set(vs) & tail.values):
                kept.append(s)
        pruned.append(" ".join(kept))
    assert tail.coverage(world, pruned)["tail/coverage"] == 0.0


def test_arm_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"collapse\.arms\[1\]\.name: 'x' is also the name of collapse\.arms\[0\]"):
        load_config(None, ["collapse.arms=[{name: x}, {name: x, data: accumulate}]"])
    with pytest.raises(ConfigError, match=r"collapse\.arms\[0\]\.best_of must be >= 2"):
        load_config(None, ["collapse.arms=[{name: g, data: graded, best_of: 1}]"])
    with pytest.raises(ConfigError, match=r"collapse\.arms\[0\]\.name must be"):
        load_config(None, ["collapse.arms=[{name: 'Bad Name'}]"])


# --- a tiny lab end to end ---------------------------------------------------------------------------

TINY_LAB = [
    "collapse.generations=2", "collapse.steps=8", "collapse.synthetic_size=32", "collapse.heldout_essays=24",
    "collapse.eval_prompts=16", "collapse.sample_batch=16",
    "collapse.arms=[{name: replace}, {name: accumulate, data: accumulate}, {name: mix, data: mix, human_fraction: 0.25},"
    " {name: graded-critic, data: graded, grader: critic}, {name: graded-gold, data: graded, grader: gold, temperature: 0.7}]",
]


def _figures(summary: dict) -> dict:
    return {arm: [{k: v for k, v in r.items() if k != "seconds"} for r in rows] for arm, rows in summary["arms"].items()}


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    cfg = load_config(ROOT / "configs/tiny.yaml", TINY_LAB)
    run_dir = tmp_path_factory.mktemp("lab")
    return cfg, run_dir, run_lab(cfg, run_dir, progress=False, log=lambda _: None)


def test_tiny_lab_writes_its_outputs(tiny_lab):
    cfg, run_dir, summary = tiny_lab
    saved = json.loads((run_dir / RESULTS_FILE).read_text())
    assert _figures(saved) == json.loads(json.dumps(_figures(summary)))
    assert set(saved["arms"]) == {"replace", "accumulate", "mix", "graded-critic", "graded-gold"}
    for rows in saved["arms"].values():
        assert [r["generation"] for r in rows] == [0, 1, 2]
        assert all(np.isfinite(r["heldout_ce"]) and 0 <= r["tail/coverage"] for r in rows)
    # What each generation trained on, by source (human corpus 240 in tiny.yaml; 32 essays a generation).
    data = {arm: [r["data"] for r in rows] for arm, rows in saved["arms"].items()}
    assert data["replace"][1:] == [{"gen 0": 32}, {"gen 1": 32}]
    assert data["accumulate"][1:] == [{"human": 240, "gen 0": 32}, {"human": 240, "gen 0": 32, "gen 1": 32}]
    assert data["mix"][1:] == [{"human": 60, "gen 0": 32}, {"human": 60, "gen 1": 32}]
    assert data["graded-gold"][1:] == [{"gen 0": 32}, {"gen 1": 32}]
    # A graded arm's data file: two essays per prompt, the one gold prefers kept.
    world = World.from_config(cfg.world)
    rows = [json.loads(line) for line in (run_dir / "graded-gold/data_1.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and sum(r["kept"] for r in rows) == 32
    for a, b in zip(rows[0::2], rows[1::2]):
        assert a["prompt"] == b["prompt"] and a["kept"] != b["kept"]
        best, other = (a, b) if a["kept"] else (b, a)
        assert world.grade(best["prompt"], best["essay"]).score >= world.grade(other["prompt"], other["essay"]).score
    assert (run_dir / "gen_0/critic").is_dir()  # the graded-critic arm's critic, trained once on generation 0
    # The plot is a real PNG; TensorBoard reads one run per arm with the generation as the step.
    assert (run_dir / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in saved["arms"]:
        acc = EventAccumulator(str(run_dir / "tb" / arm), size_guidance={"scalars": 0})
        acc.Reload()
        events = acc.Scalars("collapse/heldout_ce")
        assert [e.step for e in events] == [0, 1, 2]
        assert [e.value for e in events] == pytest.approx([r["heldout_ce"] for r in saved["arms"][arm]], rel=1e-6)


def test_tiny_lab_resumes_after_a_kill_with_identical_results(tiny_lab, tmp_path):
    """What a kill during generation 2 can leave: replace's model saved without its metrics, accumulate's data file
    without a model, mix without either, the graded arms not started; the same command finishes with the same figures."""
    cfg, done, summary = tiny_lab
    run_dir = tmp_path / "lab"
    shutil.copytree(done, run_dir)
    (run_dir / RESULTS_FILE).unlink()
    (run_dir / "replace/gen_2/metrics.json").unlink()
    shutil.rmtree(run_dir / "accumulate/gen_2")
    shutil.rmtree(run_dir / "mix/gen_2")
    (run_dir / "mix/data_1.jsonl").unlink()
    for arm in ("graded-critic", "graded-gold"):
        shutil.rmtree(run_dir / arm / "gen_2")
    (run_dir / "graded-gold/data_1.jsonl").unlink()
    resumed = run_lab(cfg, run_dir, progress=False, log=lambda _: None)
    assert _figures(resumed) == _figures(summary)
    assert (run_dir / "mix/data_1.jsonl").read_bytes() == (done / "mix/data_1.jsonl").read_bytes()


def test_a_lab_refuses_another_config(tiny_lab, tmp_path, capsys):
    cfg, done, _ = tiny_lab
    run_dir = tmp_path / "lab"
    shutil.copytree(done, run_dir)
    other = load_config(ROOT / "configs/tiny.yaml", [*TINY_LAB, "collapse.steps=9"])
    with pytest.raises(UserError, match=r"another config \(sections collapse differ"):
        run_lab(other, run_dir, progress=False, log=lambda _: None)
    argv = ["collapse", "--config", str(ROOT / "configs/tiny.yaml"), "--run-dir", str(run_dir), "--no-progress", *TINY_LAB]
    assert main([*argv, "world.seed=3"]) == 2
    assert "sections world differ" in capsys.readouterr().err
