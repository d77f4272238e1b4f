"""The self-judging critic (critic.judge): its features against hand counts and a direct forward, the Bradley-Terry
head against the optimality condition, the critic around it (ranking, save/load, refusals)."""

import json
import math
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from selfplay import critic as C
from selfplay.checkpoint import CheckpointError
from selfplay.cli import main
from selfplay.config import ConfigError, FlawRates, UserError, load_config
from selfplay.data import read_examples
from selfplay.critic.judge import FEATURES, BASE_FEATURES, Judge, JudgeHead, essay_features, fit_head, text_features
from selfplay.models import transformer
from selfplay.policy import load_policy
from selfplay.world import World

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLEAN = FlawRates(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
FLAWED = FlawRates(omit_fact=0.6, wrong_fact=0.3, unsupported_fact=0.5, repeat_sentence=0.6, off_topic=0.3, no_conclusion=0.5)


def tiny_cfg(*overrides):
    return load_config(CONFIGS / "tiny.yaml", ["critic.judge=true", *overrides])


@pytest.fixture(scope="module")
def policy(tiny_run):
    return load_policy(tiny_run)


def test_text_features_count_distinct_restated_values_and_repeats():
    prompt = "Write an essay about Hagond, an animal. Facts: feeds on berries; lives about 2 years; lives in marshes."
    essay = ("Hagond is an animal worth knowing. The diet of Hagond is mostly berries. Hagond lives for about 2 years. "
             "The diet of Hagond is mostly berries. Hagond lives in caves. In short, Hagond is well worth remembering.")
    phrasing = frozenset({"write", "essay", "about", "facts", "animal", "feeds", "lives", "years"})
    stated, share, repeated, sentences = text_features(prompt, essay, phrasing)
    # given: hagond, berries, 2, marshes; stated: berries (twice: counted once) and 2; caves is not a given value
    assert (stated, repeated, sentences) == (2, 1, 6)
    assert share == pytest.approx(2 / 4)
    assert text_features("Write an essay about Hagond.", essay, phrasing)[:2] == [0, 0.0]


def test_policy_features_match_a_direct_forward_whatever_the_batch(policy):
    tok = policy.tokenizer
    judge = Judge(tok, policy.graphdef, policy.params, (64, 128, 256), batch=4)
    prompts = ["Write an essay about Hagond, an animal.", "Write an essay about a city."]
    essays = ["Hagond lives in caves. Hagond lives in caves.", "It is a city. " * 12]
    both = judge.policy_features(prompts, essays)
    alone = judge.policy_features(prompts[:1], essays[:1])  # a shorter bucket, padded rows beside it
    np.testing.assert_allclose(both[0], alone[0], rtol=1e-5, atol=1e-5)
    for i, (p, e) in enumerate(zip(prompts, essays)):
        ids, mask = tok.encode_example(p, e)
        t = jnp.asarray([ids], jnp.int32)
        pos = jnp.arange(len(ids))[None]
        lp = np.asarray(transformer.token_logprobs(policy.graphdef, policy.params, t, pos, jnp.ones_like(t, bool))[0])[0]
        x = lp[np.asarray(mask, bool)].astype(np.float64)
        want = [x.sum(), x.mean(), x.min(), (x < math.log(0.1)).sum(), len(x)]
        np.testing.assert_allclose(both[i], want, rtol=1e-4, atol=1e-4)
    phi = essay_features(judge, prompts, essays, frozenset({"write", "essay", "about", "animal", "city"}))
    assert phi.shape == (2, len(FEATURES)) == (2, 2 * len(BASE_FEATURES))
    np.testing.assert_array_equal(phi[:, :5], both)
    np.testing.assert_array_equal(phi[:, len(BASE_FEATURES):], 0.0)  # no prompt gives values besides a name: no sheet
    phi = essay_features(judge, prompts, essays, frozenset())  # without phrasing, "write", "essay", ... are values
    np.testing.assert_array_equal(phi[:, len(BASE_FEATURES):], phi[:, : len(BASE_FEATURES)])


def test_fit_head_meets_its_optimality_condition_and_orders_the_pairs():
    rng = np.random.default_rng(0)
    n, f = 400, len(FEATURES)
    chosen, rejected = rng.normal(size=(n, f)), rng.normal(size=(n, f))
    truth = np.zeros(f)
    truth[:3] = [2.0, -1.0, 0.5]
    swap = (chosen - rejected) @ truth < 0  # label by the true direction
    chosen[swap], rejected[swap] = rejected[swap].copy(), chosen[swap].copy()
    chosen[:, 5] = rejected[:, 5] = 7.0  # a constant feature keeps weight 0 and a unit scale
    head = fit_head(chosen, rejected, l2=1.0)
    d = (chosen - rejected) / head.scale
    p = 1 / (1 + np.exp(-(d @ head.w)))
    np.testing.assert_allclose(-d.T @ (1 - p) + 1.0 * head.w, 0.0, atol=1e-8)  # the gradient of the objective is 0
    assert head.w[5] == 0.0 and head.scale[5] == 1.0
    assert np.mean(head(chosen) > head(rejected)) > 0.95
    cos = head.w / head.scale @ truth / np.linalg.norm(head.w / head.scale) / np.linalg.norm(truth)
    assert cos > 0.95
    again = JudgeHead.from_dict(head.to_dict())
    np.testing.assert_array_equal(again(chosen), head(chosen))
    with pytest.raises(ValueError, match="features"):
        JudgeHead.from_dict({"mean": [0.0], "scale": [1.0], "w": [0.0]})


def _human_pairs(world, labeller, n, seed):
    rng = np.random.default_rng(seed)
    prompts = world.sample_prompts(n, rng)
    a = [world.human_essay(p, rng, CLEAN if rng.random() < 0.5 else FLAWED) for p in prompts]
    b = [world.human_essay(p, rng, FLAWED) for p in prompts]
    keep = [i for i in range(n) if a[i] != b[i]]
    labels = labeller.label_batch([prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep])
    return [C.Pair(prompts[i], a[i], b[i]) if lab == 0 else C.Pair(prompts[i], b[i], a[i]) for i, lab in zip(keep, labels)]


def test_the_judge_critic_ranks_held_out_pairs_and_saves_exactly(policy, tmp_path):
    cfg = tiny_cfg("critic.label_budget=400", "critic.heldout_fraction=0.25", "critic.batch_size=8", "critic.seq_buckets=[128,256]")
    world = World(cfg.world)
    critic = C.init_critic(cfg, policy.tokenizer, world=world)
    critic.pool.add(_human_pairs(world, critic.labeller, 400, seed=1))
    with pytest.raises(UserError, match="critic.judge=true"):
        C.train(critic, 1)  # no policy to read the essays with yet
    C.attach_judge(critic, policy)
    assert C.pair_accuracy(critic, critic.pool.indices(heldout=True))["accuracy"] == 0.5  # no head yet: all ties
    history = C.train(critic, 5)
    assert int(critic.state.step) == 0 and len(history) == 1  # one fit; no transformer step
    held = critic.pool.indices(heldout=True)
    acc = C.pair_accuracy(critic, held)["accuracy"]
    assert acc >= 0.75, acc
    C.calibrate_normalizer(critic)
    prompts = [critic.pool.pairs[i].prompt for i in held[:6]]
    essays = [critic.pool.pairs[i].rejected for i in held[:6]]
    before = C.score_texts(critic, prompts, essays)
    scores, raw = C.score_essays(critic, prompts, essays)  # folds the batch into the normaliser
    np.testing.assert_array_equal(scores.rewards_b, before.rewards_b)
    np.testing.assert_array_equal(raw, before.members_kb[0])
    assert float(critic.state.norm.count) == 2
    C.save_critic(tmp_path / "critic", critic)
    loaded = C.load_critic(tmp_path / "critic", cfg, policy.tokenizer, world=world)
    assert loaded.judge_phrasing == critic.judge_phrasing and loaded.judge_head.to_dict() == critic.judge_head.to_dict()
    C.attach_judge(loaded, policy)
    after = C.score_texts(loaded, prompts, essays)
    again = C.score_texts(critic, prompts, essays)
    np.testing.assert_array_equal(after.rewards_b, again.rewards_b)
    with pytest.raises(CheckpointError, match="critic.judge: saved True, config False"):  # its transformer never trained
        C.load_critic(tmp_path / "critic", load_config(CONFIGS / "tiny.yaml"), policy.tokenizer, world=world)


def test_judge_config_refusals():
    for bad, culprit in (("critic.ensemble_size=2", "ensemble_size 2"), ("critic.token_heads=true", "token heads (True)")):
        with pytest.raises(ConfigError, match="critic.judge=true") as e:
            tiny_cfg(bad)
        assert culprit in str(e.value)
    with pytest.raises(ConfigError, match="critic.judge_l2 must be > 0"):
        tiny_cfg("critic.judge_l2=0")


def test_generate_best_of_prints_the_critics_pick_as_a_training_example(tiny_run, policy, tmp_path, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    judge = ["critic.judge=true", "critic.batch_size=8", "critic.seq_buckets=[128,256]"]
    assert main(["generate", "--run-dir", str(run), "--n", "3", "--best-of", "4", *judge]) == 2
    assert "--best-of 4 needs the run's critic" in capsys.readouterr().err
    assert main(["critic", "train", "--run-dir", str(run), "--no-progress", "critic.label_budget=40", "critic.initial_labels=0",
                 "critic.eval_samples=4", *judge]) == 0
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(run), "--n", "3", "--best-of", "4", "--checkpoint", "0", *judge]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(len(r["critic_all"]) == 4 and r["critic"] == max(r["critic_all"]) for r in rows)
    critic = C.load_critic(run / "critic", tiny_cfg(*judge), policy.tokenizer)
    C.attach_judge(critic, policy)
    again = C.score_texts(critic, [r["prompt"] for r in rows], [r["completion"] for r in rows]).rewards_b
    np.testing.assert_allclose(again, [r["critic"] for r in rows], rtol=1e-5, atol=1e-5)
    (tmp_path / "best.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_examples(tmp_path / "best.jsonl") == [(r["prompt"], r["completion"]) for r in rows]  # a run.ptx_file
