"""Reward functions with TRL's signature: columns passed through, None left out, weights, the critic's weight; a
function that fails stops the round before its update with one line naming it; bad `reward.fns` fail before work."""

import json
import math
import shutil

import numpy as np
import pytest
from rich.console import Console
from test_loop import TINY, _copy, _rows, prepared  # noqa: F401  (prepared: the tiny run directory fixture)

import toy_rewards
from selfplay import checkpoint
from selfplay.chat import TOKENIZER_CONFIG_FILE
from selfplay.cli import main
from selfplay.config import ConfigError, RewardConfig, load_config
from selfplay.rewards import NamedRewardFn, RewardFnError, Rewards, load_reward_fns
from selfplay.run import round as round_module
from selfplay.run.setup import CHECKPOINT_DIR
from selfplay.run.task import Task
from selfplay.run.train import train

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def fresh_calls():
    toy_rewards.CALLS.clear()
    toy_rewards.FAIL_FROM_CALL["n"] = 1


def test_trl_signature_columns_none_and_weights():
    rewards = Rewards(RewardConfig(critic_weight=0.5, fns=("toy_rewards:answer_match", "toy_rewards:length_reward"), weights=(2.0, -1.0)))
    prompts = ["p1", "p1", "p2", "p2"]
    completions = ["it is 5", "no", "x" * 50, "7"]
    r_fb = rewards.call(prompts, completions, {"answer": ["5", "5", None, None], "source": ["a", "a", "b", "b"]}, rnd=3)
    (call,) = toy_rewards.CALLS
    assert call == {"prompts": prompts, "completions": completions, "answer": ["5", "5", None, None], "source": ["a", "a", "b", "b"]}
    np.testing.assert_array_equal(r_fb[0], [1.0, 0.0, np.nan, np.nan])  # None: does not apply
    np.testing.assert_allclose(r_fb[1], [0.07, 0.02, 0.5, 0.01])
    critic_b = np.array([1.0, -1.0, 0.0, 2.0], np.float32)
    total = rewards.total(critic_b, r_fb)
    np.testing.assert_allclose(total, 0.5 * critic_b + [2.0 - 0.07, 0.0 - 0.02, 0.0 - 0.5, 0.0 - 0.01], rtol=1e-6)
    m = rewards.metrics(critic_b, r_fb, total)
    assert m["rewards/answer_match/mean"] == 0.5 and m["rewards/answer_match/std"] == 0.5  # two rows applied
    assert m["rewards/length_reward/mean"] == pytest.approx(0.15)
    assert m["reward/mean"] == pytest.approx(float(total.mean())) and m["reward/critic_mean"] == 0.5
    none_apply = rewards.call(prompts, completions, {"answer": [None] * 4}, rnd=3)
    assert math.isnan(rewards.metrics(critic_b, none_apply, total)["rewards/answer_match/mean"])
    assert rewards.total(critic_b, none_apply)[0] == pytest.approx(0.5 - 0.07)  # None adds 0 (TRL's nansum)
    fns_only = Rewards(RewardConfig(critic_weight=0.0, fns=("toy_rewards:length_reward",)))
    np.testing.assert_allclose(fns_only.total(np.full(4, np.nan, np.float32), r_fb[1:]), r_fb[1], rtol=1e-6)  # no critic
    np.testing.assert_allclose(fns_only.total(None, r_fb[1:]), r_fb[1], rtol=1e-6)  # a run without a critic at all
    assert set(fns_only.metrics(None, r_fb[1:], r_fb[1])) == {"reward/mean", "reward/std", "rewards/length_reward/mean",
                                                               "rewards/length_reward/std"}


def test_default_is_the_critic_alone():
    rewards = Rewards(RewardConfig())
    assert rewards.critic_only and rewards.fns == []
    assert not Rewards(RewardConfig(critic_weight=2.0)).critic_only


@pytest.mark.parametrize(
    "fn, expected",
    [
        ("failing_raises", "raised ZeroDivisionError: division by zero in the grader"),
        ("failing_length", "returned 3 rewards for 4 completions"),
        ("failing_nan", "returned nan as reward 0 (None means 'does not apply')"),
    ],
)
def test_each_failure_names_the_function_and_the_round(fn, expected):
    rewards = Rewards(RewardConfig(fns=("toy_rewards:length_reward", f"toy_rewards:{fn}")))
    toy_rewards.FAIL_FROM_CALL["n"] = 0
    with pytest.raises(RewardFnError) as e:
        rewards.call(["p"] * 4, ["c"] * 4, {}, rnd=7)
    assert str(e.value) == f"round 7: reward function {fn} (reward.fns[1]) {expected}; the round stops before its update"
    toy_rewards.FAIL_FROM_CALL["n"] = 0
    with pytest.raises(RewardFnError) as e:  # the final table's call on the held-out prompts
        rewards.call(["p"] * 4, ["c"] * 4, {}, rnd=None)
    assert str(e.value) == f"held-out evaluation: reward function {fn} (reward.fns[1]) {expected}; the evaluation stops"


@pytest.mark.parametrize(
    "output, expected",
    [([math.inf, 0.0], "returned inf as reward 0 (None means 'does not apply')"),
     ([0.0, "1"], "returned '1' (str) as reward 1, expected a float or None"),
     ({"a": 1.0}, "returned a dict, expected a list of 2 floats or None"),
     (0.5, "returned a float, expected a list of 2 floats or None")],
)  # fmt: skip
def test_bad_outputs_are_refused(output, expected):
    rewards = Rewards(RewardConfig(fns=("toy_rewards:length_reward",)))
    rewards.fns[0] = NamedRewardFn("bad", lambda prompts, completions: output, 1.0, "reward.fns[0]")
    with pytest.raises(RewardFnError) as e:
        rewards.call(["p", "p"], ["a", "b"], {}, rnd=2)
    assert str(e.value) == f"round 2: reward function bad (reward.fns[0]) {expected}; the round stops before its update"


def test_columns_follow_the_rollout_rows():
    task = Task(["a", "b", "c"], [], None, [{"answer": 1}, {}, {"answer": 3, "tag": "x"}])
    assert task.columns([2, 1], g=2) == {"answer": [3, 3, None, None], "tag": ["x", "x", None, None]}
    assert Task(["a"], [], None).columns([0], g=3) == {}  # the world: no columns


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["reward.fns=[toy_rewards]"], "reward.fns[0]: expected 'package.module:function', got 'toy_rewards'"),
        (["reward.fns=[toy_rewards:length_reward]", "reward.weights=[1.0, 2.0]"],
         "reward.weights has 2 entries for 1 reward.fns (give one per fn, or none for 1.0 each)"),
        (["reward.critic_weight=0"], "reward.critic_weight=0 without reward.fns leaves nothing to reward"),
        (["reward.critic_weight=-1"], "reward.critic_weight must be >= 0, got -1.0"),
    ],
)  # fmt: skip
def test_config_checks(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == expected


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("no_such_module_xyz:f", "reward.fns[1]: cannot import module 'no_such_module_xyz' of 'no_such_module_xyz:f': No module named"),
        ("toy_rewards:missing", "reward.fns[1]: module 'toy_rewards' has no attribute 'missing' ('toy_rewards:missing')"),
        ("toy_rewards:NOT_CALLABLE", "reward.fns[1]: 'toy_rewards:NOT_CALLABLE' is a float, not a callable reward function"),
        ("toy_rewards:length_reward", "reward.fns[1]: 'toy_rewards:length_reward' is named 'length_reward' like reward.fns[0]"),
    ],
)  # fmt: skip
def test_import_errors_name_the_config_key(ref, expected):
    cfg = load_config(None, [f"reward.fns=[toy_rewards:length_reward, '{ref}']"])
    with pytest.raises(ConfigError) as e:
        load_reward_fns(cfg.reward)
    assert str(e.value).startswith(expected)


def test_import_errors_stop_train_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--config", TINY, "--run-dir", str(run), "--no-progress", "reward.fns=[toy_rewards:missing]"])
    assert rc == 2
    assert "reward.fns[0]: module 'toy_rewards' has no attribute 'missing'" in capsys.readouterr().err
    assert not run.exists() or not any(run.iterdir())  # nothing was started


def test_reward_functions_in_a_run_see_the_policys_text_and_the_columns(prepared, tmp_path):  # noqa: F811
    run = _copy(prepared, tmp_path, "fns")
    (run / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"chat_template": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}essay:{% endif %}"
    )}))  # fmt: skip
    rows = [
        {"prompt": [{"role": "user", "content": f"Write about the number {i}."}], "answer": str(i)} if i % 2
        else {"prompt": f"Write about the number {i}.", **({"answer": str(i)} if i % 4 else {})}
        for i in range(12)
    ]  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(run, TINY, [f"run.prompts_file={prompts}", "run.rounds=1", "reward.critic_weight=0.5",
                      "reward.fns=[toy_rewards:answer_match, toy_rewards:length_reward]", "reward.weights=[2.0, -1.0]"],
          progress=False, console=QUIET)  # fmt: skip
    # the one round, then the table's final column (1 held-out prompt x 2 samples; the copied run directory keeps
    # its SFT column, eval_sft.json)
    call, final_table = toy_rewards.CALLS
    assert len(final_table["completions"]) == 2
    assert len(call["prompts"]) == len(call["completions"]) == len(call["answer"]) == 8  # 4 prompts x 2 samples
    assert any(p.startswith("user: Write about the number") and p.endswith("\nessay:") for p in call["prompts"])
    assert any(p.startswith("Write about the number") for p in call["prompts"])
    for p, a in zip(call["prompts"], call["answer"]):  # each row's column belongs to its own prompt
        assert a is None or f"number {a}." in p
    (m,) = _rows(run)
    applied = [float(a in c) for a, c in zip(call["answer"], call["completions"]) if a is not None]
    assert m["rewards/answer_match/mean"] == (pytest.approx(np.mean(applied)) if applied else None)
    lengths = [len(c) / 100 for c in call["completions"]]
    assert m["rewards/length_reward/mean"] == pytest.approx(np.mean(lengths))
    fn_sum = np.mean([2.0 * (a is not None and a in c) - n for a, c, n in zip(call["answer"], call["completions"], lengths)])
    assert m["reward/mean"] == pytest.approx(0.5 * m["reward/critic_mean"] + fn_sum, abs=1e-5)  # what the learner maximised


@pytest.mark.parametrize("fn", ["failing_raises", "failing_length", "failing_nan"])
def test_a_failing_reward_function_stops_the_round_before_its_update(prepared, tmp_path, monkeypatch, capsys, fn):  # noqa: F811
    run = _copy(prepared, tmp_path, fn)
    updates = []
    real_update = round_module.Steps.update

    def counting_update(self, p):
        step = real_update(self, p)
        return lambda *args: updates.append(1) or step(*args)

    monkeypatch.setattr(round_module.Steps, "update", counting_update)
    args = ["--config", TINY, "--run-dir", str(run), "--no-progress", "run.rounds=3", "run.checkpoint_every=1",
            f"reward.fns=[toy_rewards:{fn}]"]  # fmt: skip
    assert main(["train", *args]) == 2  # round 1 succeeds and is saved, round 2's call fails
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"selfplay: error: round 2: reward function {fn} (reward.fns[0])")
    assert updates == [1], "round 2 must stop before its update"
    assert [r["step"] for r in _rows(run)] == [1]
    with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
        assert ck.steps() == [1]
        _, meta = ck.restore(1)  # the last checkpoint is intact
    assert meta["round"] == 1
    if fn == "failing_raises":
        toy_rewards.CALLS.clear()  # the function works again: the run resumes after round 1
        toy_rewards.FAIL_FROM_CALL["n"] = 10
        assert main(["train", *args]) == 0
        assert [r["step"] for r in _rows(run)] == [1, 2, 3] and updates == [1, 1, 1]
    shutil.rmtree(run)
