"""SFT pretraining on the tiny config lowers held-out perplexity and leaves a usable run directory."""

import json
import shutil
from pathlib import Path

import pytest

from selfplay.cli import main
from selfplay.config import load_config
from selfplay.policy import has_policy, load_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_pretrain_lowers_loss_and_saves(tiny_run):
    report = json.loads((tiny_run / "sft_report.json").read_text())
    assert report["heldout_ppl"] < 0.5 * report["heldout_ppl_initial"]
    losses = [h["loss"] for h in report["history"]]
    assert losses[-1] < losses[0]
    assert {"score", "coverage", "hallucination_rate", "fluency"} <= set(report["gold"])
    assert (tiny_run / "tokenizer.json").is_file() and (tiny_run / "config.yaml").is_file()
    assert has_policy(tiny_run)
    cfg = load_config(tiny_run / "config.yaml")
    policy = load_policy(tiny_run)
    assert policy.cfg == cfg
    assert policy.tokenizer.vocab_size <= cfg.model.vocab_size


def test_sft_reports_held_out_gold_along_the_way_deterministically(tiny_run, tmp_path):
    """pretrain.gold_every: the gold grader's figures on the table's held-out prompts at steps 20 and 30 (the last), in
    sft_report.json and TensorBoard; a second pretraining with the same seed reports the same figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = json.loads((tiny_run / "sft_report.json").read_text())
    judged = [r for r in report["history"] if "heldout_gold" in r]
    assert [r["step"] for r in judged] == [20, 30]
    assert report["heldout_gold"] == judged[-1]["heldout_gold"]
    assert {"gold/score", "gold/coverage", "gold/hallucination_rate", "diversity/distinct_2"} <= set(report["heldout_gold"])
    acc = EventAccumulator(str(tiny_run / "tb" / "sft"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("sft/gold/score")] == [
        (r["step"], pytest.approx(r["heldout_gold"]["gold/score"], rel=1e-6)) for r in judged]
    again = tmp_path / "again"
    assert main(["pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--run-dir", str(again), "--no-progress"]) == 0
    twice = json.loads((again / "sft_report.json").read_text())
    assert [r.get("heldout_gold") for r in twice["history"]] == [r.get("heldout_gold") for r in report["history"]]
    other = tmp_path / "other"
    assert main(["pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--run-dir", str(other), "--no-progress",
                 "run.seed=1"]) == 0
    assert json.loads((other / "sft_report.json").read_text())["heldout_gold"] != report["heldout_gold"]


def test_a_policy_copied_without_its_config_is_kept_and_named(tiny_run, tmp_path, capsys):
    """policy/ and tokenizer.json copied by hand, config.yaml forgotten: train stops with one line naming the missing
    file and removes nothing (it used to take the copy for a killed save, delete it and pretrain a new policy)."""
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(tiny_run / "policy", copy / "policy")
    shutil.copy(tiny_run / "tokenizer.json", copy / "tokenizer.json")
    assert main(["train", "--config", str(CONFIGS / "tiny.yaml"), "--run-dir", str(copy), "--no-progress"]) == 2
    assert "has no config.yaml: copy config.yaml from the run the policy came from" in capsys.readouterr().err
    assert {"policy", "tokenizer.json"} <= {p.name for p in copy.iterdir()} and not (copy / "config.yaml").exists()
    assert sorted(p.name for p in (copy / "policy").iterdir()) == sorted(p.name for p in (tiny_run / "policy").iterdir())


def test_generate_prints_json_lines_with_gold(tiny_run, capsys, tmp_path):
    assert main(["generate", "--run-dir", str(tiny_run), "--n", "3", "actor.temperature=0.7"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    assert all({"prompt", "essay", "gold"} <= set(r) for r in rows)
    assert all(0.0 <= r["gold"]["score"] <= 1.0 for r in rows)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me a story."}\n{"prompt": "Write an essay about nothing."}\n')
    assert main(["generate", "--run-dir", str(tiny_run), "--prompts", str(prompts)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Tell me a story.", "Write an essay about nothing."]
    assert all("gold" not in r for r in rows)


def test_generate_errors_are_user_errors(tiny_run, tmp_path, capsys):
    assert main(["generate", "--run-dir", str(tmp_path / "missing")]) == 2
    assert "not a selfplay run directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["generate", "--run-dir", str(tiny_run), "--prompts", str(bad)]) == 2
    assert f"{bad}:2: missing key 'prompt'" in capsys.readouterr().err
    assert main(["generate", "--run-dir", str(tiny_run), "actor.temprature=0.5"]) == 2
    assert "did you mean 'actor.temperature'" in capsys.readouterr().err


def test_pretrain_refuses_a_run_directory_that_has_a_policy(tiny_run, capsys):
    before = sorted(p.name for p in (tiny_run / "policy").iterdir())
    assert main(["pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--run-dir", str(tiny_run), "--no-progress"]) == 2
    assert "already holds a policy" in capsys.readouterr().err
    assert sorted(p.name for p in (tiny_run / "policy").iterdir()) == before


def test_a_policy_whose_save_was_killed_is_written_again(tiny_run, tmp_path, capsys):
    # What a kill between the params and tokenizer.json used to leave (save_policy now writes them first): policy/
    # complete, no tokenizer, no config. Indistinguishable from params copied by hand, so they are kept and named; once
    # the user removes them, pretraining writes a new policy.
    run = tmp_path / "killed"
    shutil.copytree(tiny_run, run)
    (run / "tokenizer.json").unlink()
    (run / "config.yaml").unlink()
    assert not has_policy(run)
    args = ["pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--run-dir", str(run), "--no-progress"]
    assert main(args) == 2
    assert "has no tokenizer.json and config.yaml" in capsys.readouterr().err and (run / "policy").is_dir()
    shutil.rmtree(run / "policy")
    (run / "policy" / "0.orbax-checkpoint-tmp").mkdir(parents=True)  # what a kill inside the params' save leaves
    assert main(args) == 0
    assert "removed the incomplete policy" in capsys.readouterr().out
    assert has_policy(run) and (run / "config.yaml").is_file()
    load_policy(run)
