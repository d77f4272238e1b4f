"""The critic: Bradley-Terry loss, ensembles under vmap, label sources and budgets, save/load, `selfplay critic train`."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from selfplay import critic as C, sharding
from selfplay.checkpoint import CheckpointError
from selfplay.cli import main
from selfplay.config import ConfigError, FlawRates, MeshConfig, load_config
from selfplay.data import DataError
from selfplay.policy import load_policy
from selfplay.tokenizer import Tokenizer
from selfplay.types import Rollout
from selfplay.world import World

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLEAN = FlawRates(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
FLAWED = FlawRates(omit_fact=0.5, wrong_fact=0.3, unsupported_fact=0.5, repeat_sentence=0.5, off_topic=0.5, no_conclusion=0.6)


def tiny_cfg(*overrides):
    return load_config(CONFIGS / "tiny.yaml", list(overrides))


@pytest.fixture(scope="module")
def tokenizer(tiny_run):
    return Tokenizer.load(tiny_run / "tokenizer.json")


@pytest.fixture(scope="module")
def world():
    return World(tiny_cfg().world)


def human_pairs(world, labeller, n, seed):
    """Clean vs flawed human essays for the same prompt, labelled by the labeller (random order within the pair)."""
    rng = np.random.default_rng(seed)
    prompts = world.sample_prompts(n, rng)
    a, b = [], []
    for p in prompts:
        clean, flawed = world.human_essay(p, rng, CLEAN), world.human_essay(p, rng, FLAWED)
        first, second = (clean, flawed) if rng.random() < 0.5 else (flawed, clean)
        a.append(first)
        b.append(second)
    labels = labeller.label_batch(prompts, a, b)
    return [C.Pair(p, x, y) if lab == 0 else C.Pair(p, y, x) for p, x, y, lab in zip(prompts, a, b, labels)]


def stub_sample_fn(world, identical_every=4):
    """A policy stand-in: human essays with flaws; every `identical_every`-th prompt gets two identical samples."""
    calls = {"n": 0}

    def sample(params, prompts, key, g):
        rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
        out = []
        for i, p in enumerate(prompts):
            first = world.human_essay(p, rng, FLAWED)
            same = g == 2 and (calls["n"] + i) % identical_every == 0
            out += [first] + [first if same else world.human_essay(p, rng, CLEAN if rng.random() < 0.5 else FLAWED) for _ in range(g - 1)]
        calls["n"] += len(prompts)
        return out

    return sample


# ----------------------------------------------------------------------------------------------
# Pure pieces against numpy
# ----------------------------------------------------------------------------------------------


def test_bradley_terry_loss_and_gradient_sign():
    rc = np.array([1.0, -0.5, 2.0, 0.0], np.float32)
    rr = np.array([0.5, 0.5, -1.0, 0.0], np.float32)
    margin, coef = 0.3, 0.1
    loss, m = C.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), margin, coef)
    bt = np.mean(np.log1p(np.exp(-(rc - rr - margin))))
    centre = np.mean((rc + rr) ** 2)
    np.testing.assert_allclose(float(m["bt_loss"]), bt, rtol=1e-6)
    np.testing.assert_allclose(float(m["centering"]), centre, rtol=1e-6)
    np.testing.assert_allclose(float(loss), bt + coef * centre, rtol=1e-6)
    np.testing.assert_allclose(float(m["accuracy"]), (1 + 0 + 1 + 0.5) / 4)

    g_c, g_r = jax.grad(lambda c, r: C.bradley_terry_loss(c, r, margin, 0.0)[0], argnums=(0, 1))(jnp.asarray(rc), jnp.asarray(rr))
    assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)  # descent pushes chosen up, rejected down
    sig = 1 / (1 + np.exp(rc - rr - margin))  # d/dd -log sigma(d) = -sigma(-d)
    np.testing.assert_allclose(np.asarray(g_c), -sig / 4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_r), sig / 4, rtol=1e-5)
    g_centre = jax.grad(lambda c: C.bradley_terry_loss(c, jnp.asarray(rr), 0.0, coef)[0] - C.bradley_terry_loss(c, jnp.asarray(rr), 0.0, 0.0)[0])(jnp.asarray(rc))
    np.testing.assert_allclose(np.asarray(g_centre), coef * 2 * (rc + rr) / 4, rtol=1e-5, atol=1e-7)


def test_combine_members_against_numpy():
    members = np.array([[1.0, 2.0, -1.0], [3.0, 0.0, -1.0], [2.0, 1.0, 5.0]], np.float32)
    np.testing.assert_allclose(C.combine_members(jnp.asarray(members), "mean"), members.mean(0), rtol=1e-6)
    np.testing.assert_allclose(C.combine_members(jnp.asarray(members), "min"), members.min(0))
    np.testing.assert_allclose(
        C.combine_members(jnp.asarray(members), "mean_minus_std", 0.5), members.mean(0) - 0.5 * members.std(0), rtol=1e-6
    )
    with pytest.raises(ConfigError):
        C.combine_members(jnp.asarray(members), "median")


def test_normalizer_ema_against_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, 16).astype(np.float32) for _ in range(5)]
    norm, m = C.init_normalizer(), 0.9
    np.testing.assert_allclose(C.normalize(norm, jnp.asarray(batches[0])), batches[0])  # empty: identity
    mean, var = batches[0].mean(), batches[0].var()
    norm = C.update_normalizer(norm, jnp.asarray(batches[0]), m)
    for b in batches[1:]:
        var = m * var + (1 - m) * b.var() + m * (1 - m) * (b.mean() - mean) ** 2
        mean = m * mean + (1 - m) * b.mean()
        norm = C.update_normalizer(norm, jnp.asarray(b), m)
    np.testing.assert_allclose([float(norm.mean), float(norm.var), float(norm.count)], [mean, var, 5], rtol=1e-5)
    np.testing.assert_allclose(C.normalize(norm, jnp.asarray(batches[0])), (batches[0] - mean) / np.sqrt(var + 1e-8), rtol=1e-5)


def test_spearman_with_ties():
    np.testing.assert_allclose(C.rankdata(np.array([5, 6, 7, 8, 7])), [1, 2, 3.5, 5, 3.5])
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    np.testing.assert_allclose(C.spearman(x, y), np.corrcoef([1, 2, 3, 4, 5], [1, 2, 3.5, 5, 3.5])[0, 1])
    assert C.spearman(x, [10, 20, 30, 40, 50]) == pytest.approx(1.0)
    assert C.spearman(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(C.spearman(x, [1, 1, 1, 1, 1]))


# ----------------------------------------------------------------------------------------------
# The model and the ensemble
# ----------------------------------------------------------------------------------------------


def test_ensemble_one_compilation_members_differ_and_rollout_read_out(tokenizer):
    cfg = tiny_cfg("critic.ensemble_size=3", "critic.batch_size=4", "critic.seq_buckets=[32]", "critic.normalize=false")
    c = cfg.critic
    state = C.init_state(c, seed=0)
    emb = state.params["trunk"]["embed"]
    assert emb.shape[0] == 3 and emb.get_metadata("out_sharding") == ("ensemble", "vocab", "embed")
    assert state.params["head"]["kernel"].get_metadata("out_sharding") == ("ensemble", "embed")
    graphdef = C.reward_graphdef(c.model)
    fns = C.make_critic_fns(graphdef, c)

    rng = np.random.default_rng(0)
    lens = rng.integers(8, 33, (3, 8)).astype(np.int32)
    tokens = np.where(np.arange(32) < lens[..., None], rng.integers(4, 500, (3, 8, 32)), tokenizer.pad_id).astype(np.int32)
    at_init = np.asarray(fns.score_tokens(state, tokens[0], lens[0]).members_kb)
    assert np.abs(at_init[0] - at_init[1]).min() > 1e-4 and np.abs(at_init[1] - at_init[2]).min() > 1e-4  # own seeds
    before = C.trace_counts["member_loss"]
    for _ in range(3):
        state, metrics = fns.train_step(state, tokens, lens)
    assert C.trace_counts["member_loss"] - before == 1  # k members traced once, not k times
    assert fns.train_step._cache_size() == 1
    assert metrics["loss"].shape == (3,) and int(state.step) == 3

    scores = fns.score_tokens(state, tokens[0], lens[0])
    members = np.asarray(scores.members_kb)
    assert members.shape == (3, 8)
    assert np.abs(members[0] - members[1]).max() > 1e-3 and np.abs(members[1] - members[2]).max() > 1e-3
    np.testing.assert_allclose(scores.rewards_b, members.mean(0), rtol=1e-5)

    # The same sequences as a Rollout (prompt left-padded to P, completion from column P, pad after) read the same
    # member scores as the right-padded text rows: the read-out is the last completion token.
    p, l = 16, 40
    prompt_len = np.minimum(lens[0] // 2, p).astype(np.int32)
    buf = np.full((8, l), tokenizer.pad_id, np.int32)
    cmask = np.zeros((8, l), np.float32)
    for i in range(8):
        seq = tokens[0, i, : lens[0, i]]
        buf[i, p - prompt_len[i] : p] = seq[: prompt_len[i]]
        rest = seq[prompt_len[i] :]
        buf[i, p : p + len(rest)] = rest
        cmask[i, p : p + len(rest)] = 1.0
    rollout = Rollout(jnp.asarray(buf), jnp.asarray(prompt_len), jnp.asarray(cmask), jnp.zeros((8, l)), jnp.ones(8, bool))
    from_rollout = fns.score(state, rollout, p)
    np.testing.assert_allclose(from_rollout.members_kb, members, rtol=1e-4, atol=1e-4)


def test_accuracy_rises_on_world_pairs(tokenizer):
    # Short grounded prompts keep every sequence in one 192-token bucket: one compilation, cheap steps.
    cfg = tiny_cfg(
        "critic.batch_size=8", "critic.seq_buckets=[192]", "critic.lr=2e-3", "critic.heldout_fraction=0.25",
        "critic.label_budget=240", "world.grounded_fraction=1.0", "world.max_sheet_facts=2",
    )
    world = World(cfg.world)
    critic = C.init_critic(cfg, tokenizer, world=world)
    critic.pool.add(human_pairs(world, critic.labeller, 240, seed=1))
    held = critic.pool.indices(heldout=True)
    assert len(held) == 60
    C.train(critic, 40)
    acc = C.pair_accuracy(critic, held)["accuracy"]
    assert acc >= 0.75, acc


def test_init_from_policy(tiny_run, tokenizer):
    policy = load_policy(tiny_run)
    cfg = tiny_cfg("critic.init_from_policy=true", "critic.ensemble_size=2")
    critic = C.init_critic(cfg, tokenizer, policy_params=policy.params, policy_model=policy.cfg.model)
    for m in range(2):
        np.testing.assert_array_equal(critic.state.params["trunk"]["embed"][...][m], policy.params["embed"][...])
    with pytest.raises(ConfigError, match="critic.init_from_policy=true needs critic.model shaped like") as e:
        bad = tiny_cfg("critic.init_from_policy=true", "critic.model.d_model=64", "critic.model.d_ff=32")
        C.init_critic(bad, tokenizer, policy_params=policy.params, policy_model=policy.cfg.model)
    assert "critic.model.d_model=64 vs model.d_model=32" in str(e.value) and "critic.model.d_ff=32 vs model.d_ff=64" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Labels: budget, noise, files
# ----------------------------------------------------------------------------------------------


def test_label_budget_is_exact_and_refresh_respects_it(tokenizer, world, monkeypatch):
    cfg = tiny_cfg(
        "critic.label_budget=50", "critic.initial_labels=0", "critic.refresh_every=1", "critic.refresh_budget=15", "critic.refresh_steps=2",
        "run.rounds=2", "critic.batch_size=4", "critic.seq_buckets=[256]",
    )
    assert C.initial_label_count(cfg) == 50 - 2 * 15
    critic = C.init_critic(cfg, tokenizer, world=world)
    asked = []
    real = critic.labeller.label_batch
    monkeypatch.setattr(critic.labeller, "label_batch", lambda p, a, b: asked.append(len(p)) or real(p, a, b))
    source = C.PairSource(world, stub_sample_fn(world), "world", prompts_per_call=6)

    pairs, stats = C.collect_pairs(source, critic.labeller, None, 20, np.random.default_rng(0), jax.random.key(0))
    assert len(pairs) == 20 and sum(asked) == 20 == stats["labels"] == critic.labeller.used
    assert stats["skipped_identical"] > 0 and all(p.chosen != p.rejected for p in pairs)
    critic.pool.add(pairs)

    m1 = C.refresh(critic, None, source)
    assert m1["critic/labels"] == 15 and critic.labeller.used == 35 and len(critic.pool) == 35
    assert int(critic.state.step) == 2
    m2 = C.refresh(critic, None, source, budget=40)  # more than is left: the global budget wins
    assert m2["critic/labels"] == 15 and critic.labeller.used == 50
    m3 = C.refresh(critic, None, source)
    assert m3["critic/labels"] == 0 and critic.labeller.used == 50 == sum(asked)
    assert len(critic.pool) == 50 and int(critic.state.step) == 6  # pairs accumulate; every refresh trains


def test_label_noise_flips_about_the_configured_share(tokenizer, world):
    cfg = tiny_cfg("critic.label_noise=0.2", "critic.label_budget=600")
    critic = C.init_critic(cfg, tokenizer, world=world)
    source = C.PairSource(world, stub_sample_fn(world, identical_every=10**9), "world", prompts_per_call=50)
    pairs, _ = C.collect_pairs(source, critic.labeller, None, 600, np.random.default_rng(1), jax.random.key(1))
    gold = np.array([(world.grade(p.prompt, p.chosen).score, world.grade(p.prompt, p.rejected).score) for p in pairs])
    decided = gold[:, 0] != gold[:, 1]
    flipped = np.mean(gold[decided, 0] < gold[decided, 1])
    assert decided.sum() > 400 and 0.15 < flipped < 0.25, flipped


def test_discriminator_pairs_prefer_the_human_essay(world):
    source = C.PairSource(world, stub_sample_fn(world), "discriminator", prompts_per_call=4)
    pairs, stats = C.collect_pairs(source, None, None, 6, np.random.default_rng(2), jax.random.key(2))
    assert len(pairs) == 6 and stats["labels"] == 0
    for p in pairs:  # the chosen side is a human essay for the prompt (parses, names the topic)
        assert world.parse_prompt(p.prompt).topic in p.chosen


def test_preference_file_formats_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"}) + "\n\n"
        + json.dumps({"chosen": "Human: hi there\nAssistant: hello friend", "rejected": "Human: hi there\nAssistant: go away"}) + "\n"
        + json.dumps({"chosen": "abc", "rejected": "abd"}) + "\n"
    )
    pairs = C.read_preference_file(good)
    assert pairs[0] == C.Pair("Q?", "yes", "no")
    assert pairs[1] == C.Pair("Human: hi there\nAssistant:", "hello friend", "go away")
    assert pairs[2] == C.Pair("", "abc", "abd")  # no whitespace in the common prefix: no prompt

    cases = {
        '{"prompt": "Q", "chosen": "a"}': ":1: missing key 'rejected'",
        '{"prompt": "Q", "chosen": " ", "rejected": "b"}': ":1: 'chosen' is empty",
        '{"prompt": "", "chosen": "a", "rejected": "b"}': ":1: 'prompt' is empty",
        '{"prompt": "Q", "chosen": "same", "rejected": "same"}': ":1: 'chosen' and 'rejected' are identical",
        '{"chosen": "x y ", "rejected": "x y z"}': ":1: cannot split",
        '{"chosen": ["a"], "rejected": "b"}': ":1: 'chosen' must be a str",
        '{"chosen": "a", "rejected": "b"': ":1: invalid JSON",
    }
    for i, (line, msg) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(DataError) as e:
            C.read_preference_file(bad)
        assert str(e.value).startswith(f"{bad}:1:") and msg in str(e.value), str(e.value)
    two = tmp_path / "two.jsonl"
    two.write_text('{"chosen": "a", "rejected": "b"}\n{"prompt": "Q", "chosen": "a"}\n')
    with pytest.raises(DataError, match=rf"^{two}:2: missing key 'rejected'"):
        C.read_preference_file(two)


# ----------------------------------------------------------------------------------------------
# Save / load, CLI
# ----------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, tokenizer, world):
    cfg = tiny_cfg("critic.ensemble_size=2", "critic.batch_size=4", "critic.seq_buckets=[256]", "critic.label_budget=40", "critic.initial_labels=0")
    critic = C.init_critic(cfg, tokenizer, world=world)
    critic.pool.add(human_pairs(world, critic.labeller, 12, seed=3))
    C.train(critic, 2)
    C.calibrate_normalizer(critic)
    critic.state = critic.fns.observe(critic.state, jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)), jnp.float32))
    assert float(critic.state.norm.count) == 2
    prompts = [p.prompt for p in critic.pool.pairs[:3]]
    essays = [p.chosen for p in critic.pool.pairs[:3]]
    before = C.score_texts(critic, prompts, essays)
    C.save_critic(tmp_path / "critic", critic)

    loaded = C.load_critic(tmp_path / "critic", cfg, tokenizer, world=world)
    after = C.score_texts(loaded, prompts, essays)
    np.testing.assert_array_equal(after.members_kb, before.members_kb)
    np.testing.assert_array_equal(after.rewards_b, before.rewards_b)
    for a, b in zip(jax.tree.leaves(loaded.state), jax.tree.leaves(critic.state)):
        np.testing.assert_array_equal(a, b)
    assert loaded.pool.pairs == critic.pool.pairs and loaded.pool.heldout == critic.pool.heldout
    assert loaded.labeller.used == critic.labeller.used == 12
    p, a, b = prompts[0], essays[0], critic.pool.pairs[0].rejected
    assert loaded.labeller.label_batch([p] * 5, [a] * 5, [b] * 5).tolist() == critic.labeller.label_batch([p] * 5, [a] * 5, [b] * 5).tolist()
    meta = C.critic_meta(loaded)
    assert meta["pool_size"] == 12 and meta["labels_used"] == 17 and meta["label_budget"] == 40

    # Onto a mesh: each array read straight into its shards (the restore a multi-process run needs).
    layout = sharding.Layout.from_config(MeshConfig(data=2, fsdp=4))
    placed = C.load_critic(tmp_path / "critic", cfg, tokenizer, world=world, layout=layout)
    q = placed.state.params["trunk"]["layers"]["q_proj"].get_value()  # [ensemble, layers, embed, heads, head_dim]
    assert q.sharding.spec == P(None, None, "fsdp") and len(q.sharding.device_set) == 8
    assert jax.tree.leaves(layout.shardings(placed.state)) == [x.sharding for x in jax.tree.leaves(placed.state)]
    for a, b in zip(jax.tree.leaves(placed.state), jax.tree.leaves(critic.state)):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(CheckpointError, match="ensemble_size: saved 2, config 3"):
        C.load_critic(tmp_path / "critic", tiny_cfg("critic.ensemble_size=3"), tokenizer, world=world)


def test_cli_critic_train(tiny_run, tmp_path, capsys):
    args = ["critic.steps=6", "critic.label_budget=20", "critic.initial_labels=0", "critic.refresh_every=0", "critic.eval_samples=4", "critic.batch_size=4", "critic.seq_buckets=[128,256]"]
    assert main(["critic", "train", "--run-dir", str(tiny_run), "--no-progress", *args]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "Spearman with gold" in out
    report = json.loads((tiny_run / "critic_report.json").read_text())
    assert {"heldout_accuracy", "spearman_gold", "heldout_gold_accuracy", "labels_used", "seconds"} <= set(report)
    assert report["labels_used"] == 20 and report["pairs"] == 20
    assert report["pairs_heldout"] == 2 and 0.0 <= report["heldout_accuracy"] <= 1.0
    assert C.has_critic(tiny_run / "critic") and (tiny_run / "critic" / "pairs.jsonl").is_file()

    assert main(["critic", "train", "--run-dir", str(tmp_path / "nope"), "--config", str(CONFIGS / "tiny.yaml")]) == 2
    assert "run `selfplay pretrain" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{"prompt": "Q", "chosen": "a", "rejected": "a"}\n')
    assert main(["critic", "train", "--run-dir", str(tiny_run), "--pairs", str(bad)]) == 2
    assert f"{bad}:2: 'chosen' and 'rejected' are identical" in capsys.readouterr().err
