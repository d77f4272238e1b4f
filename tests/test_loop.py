"""`selfplay train` end to end on the tiny config: exact resume, kills, TensorBoard tags, the eval table."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfplay import checkpoint
from selfplay.cli import main
from selfplay.config import ConfigError, UserError
from selfplay.run.evaluate import EVAL_FILE, SFT_EVAL_FILE
from selfplay.run.setup import CHECKPOINT_DIR
from selfplay.run.train import TB_DIR, train
from selfplay.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# Every figure a round computes, but wall-clock ones, must repeat exactly on resume.
NOT_REPRODUCIBLE = ("timing/", "perf/")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory with the SFT policy, the initial critic and the SFT eval: what every test copies."""
    run = tmp_path_factory.mktemp("loop") / "base"
    out = train(run, TINY, ["run.rounds=1"], progress=False, console=Console(quiet=True))
    assert out["rounds"] == 1
    shutil.rmtree(run / CHECKPOINT_DIR)
    for f in (run / TB_DIR).iterdir():  # the rounds' logs go; the SFT and critic curves (subdirectories) stay
        if f.is_file():
            f.unlink()
    return run


def _copy(prepared, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(prepared, dst)
    return dst


def _rows(run):
    return read_jsonl(run / TB_DIR / "metrics.jsonl")


def _reproducible(row):
    return {k: v for k, v in row.items() if not k.startswith(NOT_REPRODUCIBLE)}


def _final_flat(run):
    with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
        flat, meta = ck.restore(ck.latest_step())
    return flat, meta


def assert_same_run(straight, split):
    """Two runs of one config, one resumed along the way, logged every figure alike (wall-clock ones aside) and ended
    with the same checkpoint, leaf for leaf."""
    a, b = _rows(straight), _rows(split)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert _reproducible(ra) == _reproducible(rb)
    (fa, ma), (fb, mb) = _final_flat(straight), _final_flat(split)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    assert ma == mb


def test_resume_is_exact_across_a_critic_refresh(prepared, tmp_path):
    quiet = Console(quiet=True)
    ptx = ["learner.ptx_coef=0.5", "learner.ptx_batch=4"]  # the human-example stream must resume where it was too
    straight = _copy(prepared, tmp_path, "straight")
    train(straight, None, ["run.rounds=4", "run.checkpoint_every=2", *ptx], progress=False, console=quiet)

    split = _copy(prepared, tmp_path, "split")
    train(split, None, ["run.rounds=2", "run.checkpoint_every=2", *ptx], progress=False, console=quiet)  # round 2 refreshes
    train(split, None, ["run.rounds=4", "run.checkpoint_every=2"], progress=False, console=quiet)

    a, b = _rows(straight), _rows(split)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert [r["step"] for r in b] == [1, 2, 3, 4], "a resumed run must neither repeat nor skip a round"
    assert "loss/critic" in a[1] and "loss/critic" in a[3]  # refreshes at rounds 2 and 4
    assert all(r["loss/ptx"] > 0 for r in a)
    assert_same_run(straight, split)
    table = json.loads((straight / EVAL_FILE).read_text())
    first = json.loads((straight / SFT_EVAL_FILE).read_text())  # the SFT policy as the initial critic saw it
    assert table["sft"]["gold/score"] == first["gold/score"]
    assert table["sft"]["reward/raw_mean"] != first["reward/raw_mean"], "the refreshed critic must re-score the SFT column"


def test_gold_token_credits_train_and_resume_exactly(prepared, tmp_path):
    """run.token_credit=gold_value (the gold reward's dense credit): a run resumed after round 1 equals the straight
    one in every logged figure and every leaf, and the credits reach the update (token_credit/mean)."""
    quiet = Console(quiet=True)
    gold = ["run.reward_source=gold", "run.checkpoint_every=1"]
    runs = {}
    for name, extra, lengths in (("straight", ["run.token_credit=gold_value"], [2]),
                                 ("split", ["run.token_credit=gold_value"], [1, 2]), ("plain", [], [2])):
        run = runs[name] = _copy(prepared, tmp_path, name)
        for n in lengths:
            train(run, None, [*gold, *extra, f"run.rounds={n}"], progress=False, console=quiet)
    assert [r["step"] for r in _rows(runs["split"])] == [1, 2]
    assert_same_run(runs["straight"], runs["split"])
    a = _rows(runs["straight"])
    # The tiny policy writes text that does not parse: its tokens are credited -1 (centred, that moves nothing; the
    # credits' effect on the update is tests/test_learner.py's).
    assert all(-1.0 <= r["token_credit/mean"] < -0.5 for r in a), [r["token_credit/mean"] for r in a]
    assert all("token_credit/mean" not in r for r in _rows(runs["plain"]))


def test_expert_iteration_with_the_gold_reward_trains_and_resumes_exactly(prepared, tmp_path):
    """learner.algorithm=expert_iteration (at the sampler's temperature, two epochs a round): a run resumed after round 1
    equals the straight one; at most one of each prompt's two essays is kept."""
    quiet = Console(quiet=True)
    opts = ["run.reward_source=gold", "learner.algorithm=expert_iteration", "learner.ei_keep=1", "run.checkpoint_every=1",
            "learner.epochs=2", "learner.temperature_in_loss=true"]
    runs = {}
    for name, lengths in (("straight", [2]), ("split", [1, 2])):
        run = runs[name] = _copy(prepared, tmp_path, name)
        for n in lengths:
            train(run, None, [*opts, f"run.rounds={n}"], progress=False, console=quiet)
    assert [r["step"] for r in _rows(runs["split"])] == [1, 2]
    assert all(0.0 <= r["expert_iteration/kept_tokens"] <= 0.5 + 1e-6 for r in _rows(runs["straight"]))  # 1 of 2 essays
    assert_same_run(runs["straight"], runs["split"])


def test_self_made_pairs_and_token_heads_train_are_counted_apart_and_resume_exactly(prepared, tmp_path):
    """critic.synthetic_per_label with critic.token_heads: the initial critic and each refresh add tampered copies of
    their essays to the pool, counted apart (critic/synthetic_pairs), and the token heads train on their labels; a
    run resumed after the first refresh equals the straight one, pool and token heads included."""
    quiet = Console(quiet=True)
    syn = ["critic.synthetic_per_label=2", "critic.tamper_ops=[swap_value,duplicate,drop_last,splice]", "run.checkpoint_every=2",
           "critic.token_heads=true"]
    base = _copy(prepared, tmp_path, "base")
    shutil.rmtree(base / "critic")  # this critic has token heads: trained here, with the self-made pairs
    assert main(["critic", "train", "--run-dir", str(base), "--no-progress", *syn]) == 0
    report = json.loads((base / "critic_report.json").read_text())
    assert report["synthetic_pairs"] > 0 and set(report["heldout_accuracy_by_kind"]) > {"label"}
    assert np.isfinite(report["history"][-1]["flag_loss"]) and np.isfinite(report["history"][-1]["cover_loss"])
    straight, split = _copy(base, tmp_path, "straight"), _copy(base, tmp_path, "split")
    train(straight, None, [*syn, "run.rounds=4"], progress=False, console=quiet)
    train(split, None, [*syn, "run.rounds=2"], progress=False, console=quiet)
    train(split, None, [*syn, "run.rounds=4"], progress=False, console=quiet)
    a, b = _rows(straight), _rows(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert _reproducible(ra) == _reproducible(rb)
    made = [report["synthetic_pairs"], a[1]["critic/new_synthetic_pairs"], a[3]["critic/new_synthetic_pairs"]]
    assert made[1] > 0 and a[3]["critic/synthetic_pairs"] == sum(made)
    assert a[3]["critic/pool_size"] == a[3]["critic/synthetic_pairs"] + a[3]["critic/labels_used"]
    (fa, ma), (fb, mb) = (_final_flat(r) for r in (straight, split))
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    assert ma == mb
    kinds = [row.get("kind", "label") for row in ma["critic"]["pool"]]
    assert kinds.count("label") == a[3]["critic/labels_used"] and len(kinds) == a[3]["critic/pool_size"]


def test_extending_a_run_equals_a_run_of_the_new_length_from_the_start(prepared, tmp_path):
    """run.rounds may grow on resume when nothing already computed depends on it: the initial critic (trained here, in
    the run, from critic.initial_labels) and the refreshes' labels are those of a run that was that long from the
    start, and so is every leaf of the final state."""
    quiet = Console(quiet=True)
    runs = {}
    for name, lengths in (("straight", [4]), ("extended", [2, 4])):
        run = runs[name] = _copy(prepared, tmp_path, name)
        shutil.rmtree(run / "critic")
        (run / SFT_EVAL_FILE).unlink()
        for n in lengths:
            train(run, None if n != lengths[0] else TINY, [f"run.rounds={n}", "run.checkpoint_every=1"], progress=False,
                  console=quiet)
    (fa, ma), (fb, mb) = _final_flat(runs["straight"]), _final_flat(runs["extended"])
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    assert ma == mb and ma["critic"]["labels_used"] == 48 + 2 * 8  # the initial labels, then rounds 2 and 4 refresh


def test_a_length_change_that_would_change_the_past_is_refused(prepared, tmp_path, capsys):
    cases = {
        "cosine": (["learner.schedule=cosine"], "run.rounds cannot change from 2 to 4 on resume with learner.schedule=cosine"),
        "derived": (["critic.initial_labels=0"], "changing run.rounds on resume would change the initial critic's labels"),
    }
    for name, (extra, message) in cases.items():
        run = _copy(prepared, tmp_path, name)
        train(run, TINY, ["run.rounds=2", *extra], progress=False, console=Console(quiet=True))
        assert main(["train", "--run-dir", str(run), "--no-progress", "run.rounds=4"]) == 2
        assert message in capsys.readouterr().err
        assert main(["train", "--run-dir", str(run), "--no-progress", "run.rounds=2"]) == 0  # the same length resumes


def test_rerun_at_the_final_round_runs_nothing_and_eval_repeats_the_table(prepared, tmp_path, capsys):
    run = _copy(prepared, tmp_path, "final")
    quiet = Console(quiet=True)
    train(run, None, ["run.rounds=2"], progress=False, console=quiet)
    first = json.loads((run / EVAL_FILE).read_text())
    console = Console(record=True, width=200)
    train(run, None, ["run.rounds=2"], progress=False, console=console)
    assert "already run 2 of run.rounds=2" in console.export_text()
    assert [r["step"] for r in _rows(run)] == [1, 2]
    table = json.loads((run / EVAL_FILE).read_text())
    assert table["last_round"] == first["last_round"] and "gold/score" in table["last_round"]  # kept, not {}
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--json", "mesh.fsdp=1"]) == 0  # mesh.* overrides are accepted
    again = json.loads(capsys.readouterr().out)
    assert again["step"] == 2
    for column in ("sft", "final"):  # the same checkpoint, critic and held-out draws: the same table
        for k in ("gold/score", "diversity/distinct_2", "reward/raw_mean", "kl/sequence"):
            assert again[column][k] == pytest.approx(table[column][k], rel=1e-5, abs=1e-6), (column, k)
    assert main(["eval", "--run-dir", str(run), "learner.lr=0.5"]) == 2
    assert "differs from the given config in: learner.lr" in capsys.readouterr().err


def test_changing_what_a_run_computes_is_refused(prepared, tmp_path, capsys):
    run = _copy(prepared, tmp_path, "refuse")
    train(run, None, ["run.rounds=1"], progress=False, console=Console(quiet=True))
    assert main(["train", "--run-dir", str(run), "--no-progress", "learner.lr=0.5"]) == 2
    assert "differs from the given config in: learner.lr" in capsys.readouterr().err


def test_critic_weight_0_with_refreshes_trains_and_logs_a_critic_it_never_rewards(prepared, tmp_path):
    """reward.critic_weight=0 with critic.refresh_every=2: no initial critic is trained; the run's critic starts
    untrained, round 2's refresh trains it, its figures are logged and it is checkpointed, and the reward is the
    functions' alone."""
    run = tmp_path / "refreshed"
    shutil.copytree(prepared, run, ignore=shutil.ignore_patterns("critic", SFT_EVAL_FILE))
    train(run, None, ["run.rounds=2", "reward.critic_weight=0", "reward.fns=[toy_rewards:length_reward]"], progress=False,
          console=Console(quiet=True))
    assert not (run / "critic").exists()
    rows = _rows(run)
    assert all(np.isfinite(r["reward/critic_mean"]) and np.isfinite(r["reward/raw_mean"]) for r in rows)
    assert all(r["reward/mean"] == pytest.approx(r["rewards/length_reward/mean"]) for r in rows)
    assert "loss/critic" not in rows[0] and np.isfinite(rows[1]["loss/critic"])
    flat, meta = _final_flat(run)
    assert int(flat["critic/step"]) == 2 and meta["critic"]["refreshes"] == 1  # critic.refresh_steps from untrained

    # A run of weight 0 saved before runs without a critic existed kept an unused critic in every checkpoint: its
    # resume is refused with what happened, and nothing is moved aside as damaged.
    saved = (run / "config.yaml").read_text()
    assert "refresh_every: 2" in saved
    (run / "config.yaml").write_text(saved.replace("refresh_every: 2", "refresh_every: 0"))
    with pytest.raises(UserError, match=r"round 2 was saved with a critic, but this run has none"):
        train(run, None, ["run.rounds=3"], progress=False, console=Console(quiet=True))
    assert not (run / "checkpoints.damaged").exists() and _final_flat(run)[1]["round"] == 2


def test_the_control_arm_trains_like_the_default_minus_the_reward(prepared, tmp_path):
    """run.reward_source=none: the same rollouts, human-example stream and number of updates as the critic-rewarded
    run, every advantage 0, so only the pretraining-data and KL terms move the policy."""
    quiet = Console(quiet=True)
    ptx = ["run.rounds=2", "learner.ptx_coef=0.5", "learner.ptx_batch=4"]
    arms = {}
    for source in ("critic", "none"):
        run = _copy(prepared, tmp_path, source)
        train(run, None, [*ptx, f"run.reward_source={source}"], progress=False, console=quiet)
        arms[source] = (_rows(run), *_final_flat(run))
    (rows_c, flat_c, meta_c), (rows_n, flat_n, meta_n) = arms["critic"], arms["none"]
    assert [r["step"] for r in rows_n] == [1, 2]
    assert all(r["advantages/std"] == 0.0 and r["loss/policy"] == 0.0 and r["loss/ptx"] > 0 for r in rows_n)
    assert all(r["advantages/std"] > 0 for r in rows_c)
    assert meta_n["ptx_position"] == meta_c["ptx_position"] > 0 and meta_n["prompt_position"] == meta_c["prompt_position"]
    counts = [k for k in flat_n if k.endswith("count")]
    assert counts and all(np.array_equal(flat_n[k], flat_c[k]) for k in counts)  # the same optimiser updates
    moved = [k for k in flat_n if k.startswith("learner/params/") and not np.array_equal(flat_n[k], flat_c[k])]
    assert moved, "the reward must make a difference"
    with pytest.raises(ConfigError, match="set learner.ptx_coef > 0"):
        train(_copy(prepared, tmp_path, "bad"), None, ["run.reward_source=none"], progress=False, console=quiet)


def test_tensorboard_shows_the_sft_and_critic_curves(prepared):
    sft_report = json.loads((prepared / "sft_report.json").read_text())
    curves = {}
    for sub in ("sft", "critic"):
        acc = EventAccumulator(str(prepared / TB_DIR / sub), size_guidance={"scalars": 0})
        acc.Reload()
        curves[sub] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    sft = curves["sft"]
    assert {"sft/loss", "sft/perplexity", "sft/lr", "sft/grad_norm"} <= sft.keys()
    assert [s for s, _ in sft["sft/loss"]] == [r["step"] for r in sft_report["history"]]
    assert sft["sft/perplexity"][0] == (0, pytest.approx(sft_report["heldout_ppl_initial"], rel=1e-6))
    assert sft["sft/perplexity"][-1][1] == pytest.approx(sft_report["heldout_ppl"], rel=1e-6)
    critic_report = json.loads((prepared / "critic_report.json").read_text())
    critic = curves["critic"]
    assert [s for s, _ in critic["loss/critic"]] == [r["step"] for r in critic_report["history"]]
    assert critic["critic/train_accuracy"][-1][1] == pytest.approx(critic_report["train_accuracy"], rel=1e-6)
    assert critic["critic/heldout_accuracy"] == [(critic_report["steps"], pytest.approx(critic_report["heldout_accuracy"], rel=1e-6))]


def test_tensorboard_has_the_documented_tags(prepared, tmp_path):
    run = _copy(prepared, tmp_path, "tb")
    train(run, None, ["run.rounds=2"], progress=False, console=Console(quiet=True))
    acc = EventAccumulator(str(run / TB_DIR), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {
        "reward/mean", "reward/std", "reward/raw_mean", "gold/score", "gold/coverage", "gold/hallucination_rate", "gold/repetition_rate",
        "kl", "entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "loss/policy", "loss/value",
        "loss/critic", "critic/accuracy", "completions/mean_length", "completions/clipped_ratio",
        "diversity/distinct_2", "diversity/self_bleu", "perf/tokens_per_s", "perf/step_time",
        "timing/rollout", "timing/score", "timing/reference", "timing/update", "timing/critic", "timing/host",
        "alarm/over_optimisation", "alarm/kl", "alarm/collapse",
    }
    assert expected <= scalars, sorted(expected - scalars)
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2]
    rows = _rows(run)
    assert acc.Scalars("gold/score")[1].value == pytest.approx(rows[1]["gold/score"])
    assert "essays" in acc.Tags()["tensors"]
    assert "**critic**" in acc.Tensors("essays")[0].tensor_proto.string_val[0].decode()
    assert acc.Histograms("reward/hist")[0].histogram_value.num == 8  # 4 prompts x 2 essays


def test_a_partial_save_is_ignored_and_a_killed_run_resumes(prepared, tmp_path):
    run = _copy(prepared, tmp_path, "killed")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "selfplay.cli", "train", "--run-dir", str(run), "--no-progress", "run.rounds=8", "run.checkpoint_every=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ckdir = run / CHECKPOINT_DIR
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [p for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.is_dir() else []
            if len(done) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with checkpoint.Checkpointer(ckdir, read_only=True) as ck:
        latest = ck.latest_step()
    assert latest is not None and latest < 8
    # What a kill in the middle of a save leaves: a later step's temporary directory without its commit marker.
    partial = ckdir / f"{latest + 1}.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ckdir / str(latest), partial)
    (partial / "commit_success.txt").unlink(missing_ok=True)

    console = Console(record=True, width=200)
    train(run, None, ["run.rounds=8", "run.checkpoint_every=1"], progress=False, console=console)
    assert f"after round {latest}" in console.export_text()
    # Rounds after the last complete checkpoint ran before the kill and again after it: each is logged once.
    assert [r["step"] for r in _rows(run)] == list(range(1, 9))
    acc = EventAccumulator(str(run / TB_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/mean")] == list(range(1, 9))
    _, meta = _final_flat(run)
    assert meta["round"] == 8
    assert not partial.exists(), "the partial save must be cleaned up"


def test_a_users_own_prompts_preferences_and_human_examples(prepared, tmp_path):
    """No world at all: the policy of the run directory, prompts and preference pairs and human examples from JSONL
    files (the shapes TRL uses). The loop trains the critic on the file's pairs, runs its rounds on those prompts
    with the pretraining-data term on those examples, and reports no gold figures (there is no gold grader)."""
    from selfplay.config import load_config
    from selfplay.world import World

    run = tmp_path / "own"
    run.mkdir()
    for name in ("policy", "tokenizer.json", "config.yaml"):  # what `selfplay import-hf` or `pretrain` leaves
        src = prepared / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run / name)
    world = World.from_config(load_config(TINY).world)  # only to write plausible files; the run never sees it
    corpus = world.corpus(24, seed=9)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in corpus))
    (tmp_path / "human.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": e}) + "\n" for p, e in corpus))
    pairs = [{"prompt": p, "chosen": e, "rejected": e.split(". ")[0] + "."} for p, e in corpus]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = train(
        run, TINY,
        [f"run.prompts_file={tmp_path / 'prompts.jsonl'}", f"run.pairs_file={tmp_path / 'pairs.jsonl'}",
         f"run.ptx_file={tmp_path / 'human.jsonl'}", "critic.label_source=file", "critic.refresh_every=0",
         "learner.ptx_coef=0.5", "learner.ptx_batch=4", "run.rounds=2"],
        progress=False, console=Console(quiet=True),
    )  # fmt: skip
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss/ptx"] > 0 and np.isfinite(r["reward/mean"]) for r in rows)
    assert not any(k.startswith("gold/") for r in rows for k in r)
    assert "gold/score" not in out["final"] and np.isfinite(out["final"]["reward/mean"])
    report = json.loads((run / "critic_report.json").read_text())
    assert report["label_source"] == "file" and report["pairs"] == len(pairs)

    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("checkpoints", "tb", "config.yaml", "eval*.json"))
    with pytest.raises(ConfigError, match="needs human examples: set run.ptx_file"):
        train(bare, TINY, [f"run.prompts_file={tmp_path / 'prompts.jsonl'}", "critic.label_source=file",
                                "critic.refresh_every=0", "learner.ptx_coef=0.5"], progress=False, console=Console(quiet=True))


def _truncate(step_dir):
    for data in [p for p in (step_dir / "state").rglob("*") if p.is_file()]:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated files, as a full disk leaves them


def _flip(step_dir):
    # 8 flipped bytes in the largest data file: orbax reads them back without complaint; the checksums catch them
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 8] = bytes(b ^ 0xFF for b in raw[mid: mid + 8])
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
def test_a_damaged_checkpoint_is_skipped_kept_aside_and_its_round_run_again(prepared, tmp_path, damage):
    run = _copy(prepared, tmp_path, "damaged")
    quiet = Console(quiet=True)
    train(run, None, ["run.rounds=3", "run.checkpoint_every=1"], progress=False, console=quiet)
    damage(run / CHECKPOINT_DIR / "3")
    console = Console(record=True, width=300)
    train(run, None, ["run.rounds=4", "run.checkpoint_every=1"], progress=False, console=console)
    text = console.export_text()
    assert "checkpoint 3 skipped" in text and "after round 2" in text
    assert (run / "checkpoints.damaged" / "3" / "state").is_dir()  # never deleted
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    _, meta = _final_flat(run)
    assert meta["round"] == 4


def test_non_finite_updates_stop_the_run_with_the_last_good_checkpoint_kept(prepared, tmp_path, monkeypatch, capsys):
    from selfplay.run import round as round_module

    run = _copy(prepared, tmp_path, "nan")
    train(run, None, ["run.rounds=2", "run.checkpoint_every=1"], progress=False, console=Console(quiet=True))
    real = round_module.score_rollout

    def nan_scores(critic, rollout, p):  # a critic gone bad: every reward NaN, so every update is skipped
        scores, raw = real(critic, rollout, p)
        return scores._replace(rewards_b=scores.rewards_b * float("nan")), raw

    monkeypatch.setattr(round_module, "score_rollout", nan_scores)
    with pytest.raises(UserError, match=r"round 5: the update was non-finite \(and skipped\) 3 rounds in a row"):
        train(run, None, ["run.rounds=8", "run.checkpoint_every=10"], progress=False, console=Console(quiet=True))
    with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
        assert ck.latest_step() == 2  # nothing after the last good round was saved
    assert main(["train", "--run-dir", str(run), "--no-progress", "run.rounds=8", "run.checkpoint_every=10"]) == 2
    assert "non-finite" in capsys.readouterr().err


def test_user_files_are_checked_before_any_work(prepared, tmp_path, capsys):
    run = tmp_path / "files"
    run.mkdir()
    shutil.copy(prepared / "tokenizer.json", run / "tokenizer.json")  # a run directory whose policy is yet to come
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "short"}\n\n{"prompt": "' + "a very long prompt " * 40 + '"}\n')
    common = ["train", "--config", TINY, "--run-dir", str(run), "--no-progress", "critic.label_source=file", "critic.refresh_every=0"]
    assert main([*common, f"run.prompts_file={prompts}"]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:3: the prompt has" in err and "largest of actor.prompt_buckets" in err  # lines count from 1
    human = tmp_path / "human.jsonl"
    human.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n')
    assert main([*common, f"run.prompts_file={tmp_path / 'nothing.jsonl'}"]) == 2
    assert "nothing.jsonl: no such file" in capsys.readouterr().err
    assert main([*common, "actor.too_long_prompt=truncate", f"run.prompts_file={prompts}", f"run.ptx_file={human}",
                 "learner.ptx_coef=1.0"]) == 2
    assert f"{human}:2: missing key 'completion'" in capsys.readouterr().err
    assert not (run / "policy").exists() and not (run / "config.yaml").exists()  # nothing was started


def test_a_failed_save_stops_the_run_and_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch, capsys):
    """A full disk at round 3's save: the run stops with one line (exit 2), round 2's checkpoint stays the latest and
    intact, and the same command resumes from it once there is room again."""
    from orbax.checkpoint import CheckpointManager

    run = _copy(prepared, tmp_path, "full")
    real_save = CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", save)
    assert main(["train", "--config", TINY, "--run-dir", str(run), "--no-progress", "run.rounds=4", "run.checkpoint_every=1"]) == 2
    err = capsys.readouterr().err
    assert "round 3: cannot save step 3" in err and "No space left on device" in err and "Traceback" not in err
    with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
        assert ck.steps() == [1, 2]
        ck.restore(2)
    monkeypatch.setattr(CheckpointManager, "save", real_save)
    assert main(["train", "--run-dir", str(run), "--no-progress", "run.rounds=4", "run.checkpoint_every=1"]) == 0
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]


def test_an_unwritable_run_directory_or_a_full_disk_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    run = tmp_path / "blocked"
    run.mkdir()
    (run / "tb").write_text("a file where the run's TensorBoard directory goes")
    assert main(["train", "--config", TINY, "--run-dir", str(run), "--no-progress"]) == 2
    assert f"cannot write in {run / 'tb'}" in capsys.readouterr().err
    (run / "tb").unlink()
    (run / "checkpoints").write_text("in the way of the checkpoints")  # root ignores permissions: a file stands in
    assert main(["train", "--config", TINY, "--run-dir", str(run), "--no-progress"]) == 2
    assert f"cannot write in {run / 'checkpoints'}" in capsys.readouterr().err
    (run / "checkpoints").unlink()
    from selfplay.run import setup

    monkeypatch.setattr(setup.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 4096, 4096))
    assert main(["train", "--config", TINY, "--run-dir", str(run), "--no-progress"]) == 2
    assert "MiB free on its disk, a checkpoint of this run needs about" in capsys.readouterr().err
    assert not (run / "policy").exists() and not (run / "config.yaml").exists()  # nothing was started


def test_the_judge_critic_trains_rewards_and_resumes_exactly(prepared, tmp_path):
    """critic.judge: `critic train` fits the head on the pool (no transformer step), the round scores the decoded
    essays with it, a refresh refits it on the grown pool, and a run resumed after the refresh equals the straight one
    (head and phrasing ride in the critic's meta)."""
    quiet = Console(quiet=True)
    judge = ["critic.judge=true", "run.checkpoint_every=2"]
    base = _copy(prepared, tmp_path, "base")
    shutil.rmtree(base / "critic")
    assert main(["critic", "train", "--run-dir", str(base), "--no-progress", *judge]) == 0
    report = json.loads((base / "critic_report.json").read_text())
    assert report["history"][-1]["step"] == 0 and np.isfinite(report["history"][-1]["loss"])
    straight, split = _copy(base, tmp_path, "straight"), _copy(base, tmp_path, "split")
    train(straight, None, [*judge, "run.rounds=4"], progress=False, console=quiet)
    train(split, None, [*judge, "run.rounds=2"], progress=False, console=quiet)
    train(split, None, [*judge, "run.rounds=4"], progress=False, console=quiet)
    assert_same_run(straight, split)
    a = _rows(straight)
    assert "loss/critic" in a[1] and all(np.isfinite(r["reward/raw_mean"]) for r in a)
    assert len({r["reward/raw_mean"] for r in a}) == 4  # the judge scores every round's own essays
    _, meta = _final_flat(straight)
    head = meta["critic"]["judge"]["head"]
    assert any(abs(w) > 0 for w in head["w"]) and meta["critic"]["judge"]["phrasing"]
