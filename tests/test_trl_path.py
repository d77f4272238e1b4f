"""The README's TRL path on the tiny Qwen2-Instruct fixture: import-hf, train on reward functions with no critic at all
(reward.critic_weight=0, critic.refresh_every=0), resume exactly, then `generate` with a trained round's policy."""

import json
from pathlib import Path

import numpy as np
import pytest

from selfplay import checkpoint
from selfplay.chat import load_chat_template
from selfplay.cli import main
from selfplay.critic import CRITIC_DIR
from selfplay.jobs import generate
from selfplay.policy import TOKENIZER_FILE, load_policy, load_run_config
from selfplay.run.setup import CHECKPOINT_DIR
from selfplay.run.train import TB_DIR
from selfplay.tokenizer import Tokenizer
from selfplay.tracking import read_jsonl

INSTRUCT = Path(__file__).parent / "fixtures" / "hf" / "qwen2_instruct"
# length_reward differs between a prompt's samples, so the GRPO update moves the params.
TRAIN = ["reward.fns=[toy_rewards:length_reward]", "reward.critic_weight=0", "critic.refresh_every=0",
         "critic.model.vocab_size=64",  # below the policy's 96 tokens, as the default 1024 is below a real model's 49 152
         "run.checkpoint_every=1", "actor.prompts_per_round=2", "actor.samples_per_prompt=2", "actor.max_new_tokens=8"]
CRITIC_FIGURES = ("critic/", "reward/critic", "reward/raw_mean", "loss/critic", "timing/score")
WALL_CLOCK = ("timing/", "perf/")


def _train(run, prompts, rounds):
    args = ["train", "--run-dir", str(run), "--no-progress", f"run.prompts_file={prompts}", *TRAIN, f"run.rounds={rounds}"]
    assert main(args) == 0


def _reproducible(row):
    return {k: v for k, v in row.items() if not k.startswith(WALL_CLOCK)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(straight: 2 rounds in one go, split: 1 round then resumed to 2), each imported from the fixture."""
    tmp = tmp_path_factory.mktemp("trl")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                                           "answer": str(2 * i)}) + "\n" for i in range(10)))  # fmt: skip
    straight, split = tmp / "straight", tmp / "split"
    for run in (straight, split):
        assert main(["import-hf", str(INSTRUCT), str(run)]) == 0
    _train(straight, prompts, 2)
    _train(split, prompts, 1)
    _train(split, prompts, 2)
    return straight, split


def _final(run):
    with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
        return ck.restore(ck.latest_step())


def test_no_critic_is_built_logged_or_saved_and_the_run_resumes_exactly(runs, capsys):
    straight, split = runs
    cfg = load_run_config(straight)
    assert Tokenizer.load(straight / TOKENIZER_FILE).vocab_size > cfg.critic.model.vocab_size  # a critic could not be built
    for run in runs:
        assert not (run / CRITIC_DIR).exists()
        rows = read_jsonl(run / TB_DIR / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2]
        for r in rows:  # the reward is the function's alone
            assert np.isfinite(r["reward/mean"]) and r["reward/mean"] == pytest.approx(r["rewards/length_reward/mean"])
        assert not [k for r in rows for k in r if k.startswith(CRITIC_FIGURES)]
        flat, meta = _final(run)
        assert meta["round"] == 2 and "critic" not in meta
        assert not [k for k in flat if k.startswith("critic")] and any(k.startswith("learner/params/") for k in flat)
        table = json.loads((run / "eval.json").read_text())
        assert not [k for column in ("sft", "final") for k in table[column] if k.startswith(CRITIC_FIGURES + ("reward/mean",))]

    a, b = (read_jsonl(run / TB_DIR / "metrics.jsonl") for run in runs)
    assert [_reproducible(r) for r in a] == [_reproducible(r) for r in b]
    (fa, ma), (fb, mb) = _final(straight), _final(split)
    assert fa.keys() == fb.keys() and ma == mb
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)

    capsys.readouterr()
    assert main(["eval", "--run-dir", str(straight)]) == 0  # the table has no critic rows
    out = capsys.readouterr().out
    assert "SFT vs round 2" in out and "KL to SFT" in out and "critic" not in out


def _flat(params):
    return {k: np.asarray(v) for k, v in checkpoint.flatten_tree(params).items()}


def test_generate_writes_with_the_latest_round_or_the_checkpoint_asked_for(runs, monkeypatch, capsys):
    run = runs[0]
    used = []
    real, asked = generate.Generator, []

    def spy(policy, *a, **k):
        used.append(_flat(policy.params))
        gen = real(policy, *a, **k)
        gen.generate = lambda prompts, *ga, _orig=gen.generate, **gk: asked.append(prompts) or _orig(prompts, *ga, **gk)
        return gen

    monkeypatch.setattr(generate, "Generator", spy)
    flat, _ = _final(run)
    round_2 = {k.removeprefix("learner/params/"): np.asarray(v) for k, v in flat.items() if k.startswith("learner/params/")}
    sft = _flat(load_policy(run).params)
    args = ["generate", "--run-dir", str(run), "--prompt", "What is 2 plus 2?", "actor.max_new_tokens=4"]

    capsys.readouterr()
    cases = (([], "round 2", round_2), (["--checkpoint", "0"], "the SFT or imported policy", sft), (["--checkpoint", "1"], "round 1", None))
    for extra, line, want in cases:
        assert main([*args, *extra]) == 0
        out, err = capsys.readouterr()
        assert err == f"generating with {line} of {run}\n" and json.loads(out)["prompt"] == "What is 2 plus 2?"
        if want is not None:
            assert used[-1].keys() == want.keys()
            assert all(np.array_equal(used[-1][k], want[k]) for k in want)
    assert any(not np.array_equal(round_2[k], sft[k]) for k in sft), "two rounds must have moved the policy"
    assert asked[0] == [load_chat_template(run).render([{"role": "user", "content": "What is 2 plus 2?"}])]  # a user turn
    assert any(not np.array_equal(used[2][k], used[0][k]) for k in sft), "round 1's params are not round 2's"

    assert main([*args, "--checkpoint", "5"]) == 2
    err = capsys.readouterr().err
    assert err == f"selfplay: error: {run} has no checkpoint of round 5; saved rounds: 1, 2 (0: the SFT or imported policy)\n"
    bare = run.parent / "bare"
    assert main(["import-hf", str(INSTRUCT), str(bare)]) == 0
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(bare), "--prompt", "hi", "actor.max_new_tokens=2"]) == 0
    assert capsys.readouterr().err == f"generating with the SFT or imported policy of {bare}\n"  # no round saved
