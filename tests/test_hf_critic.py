"""Hugging Face reward models as the critic (`selfplay import-hf --critic`): scores match transformers' own on padded
batches, what is refused (one line each), and the imported critic refreshed by the usual refresh, or kept frozen
through a tiny `selfplay train` run.

The fixtures under tests/fixtures/hf_critic/ were written by make_fixtures.py (transformers in a separate venv); the
policy comes from tests/fixtures/hf/llama, whose tokenizer.json the reward models share.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file, save_file

from selfplay import checkpoint
from selfplay.cli import main
from selfplay.checkpoint import CheckpointError
from selfplay.config import ConfigError, UserError, load_config, save_config
from selfplay.critic import CRITIC_DIR, PairSource, load_critic, refresh
from selfplay.jobs.critic import train_critic
from selfplay.jobs.import_critic import import_hf_critic
from selfplay.models import hf
from selfplay.policy import load_run_config
from selfplay.run.setup import CHECKPOINT_DIR, resolve_config
from selfplay.run.train import train
from selfplay.tokenizer import Tokenizer
from selfplay.types import Rollout
from selfplay.world import World

FIXTURES = Path(__file__).parent / "fixtures"
CRITICS = FIXTURES / "hf_critic"
POLICY = FIXTURES / "hf" / "llama"
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TOL = 1e-4  # f32 against f32 HF eager attention; the measured error is ~4e-6 on O(1) scores


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    """A run directory holding only the imported Llama policy: what every test copies."""
    return hf.import_hf(POLICY, tmp_path_factory.mktemp("hf_critic") / "policy")


def _run(policy_run, tmp_path, name="run"):
    return Path(shutil.copytree(policy_run, tmp_path / name))


def _critic(run, cfg=None, world=None):
    cfg = cfg or load_run_config(run)
    return load_critic(run / CRITIC_DIR, cfg, Tokenizer.load(run / "tokenizer.json"), world=world)


def _params(critic):
    return [np.asarray(x) for x in jax.tree.leaves(critic.state.params)]


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_scores_match_transformers_on_padded_batches(policy_run, tmp_path, name):
    run = _run(policy_run, tmp_path)
    import_hf_critic(CRITICS / name, run)
    cfg = load_run_config(run)
    hf_cfg = json.loads((CRITICS / name / "config.json").read_text())
    assert cfg.critic.ensemble_size == 1 and cfg.critic.model.d_model == hf_cfg["hidden_size"]
    assert cfg.critic.model.max_seq_len == 256 and cfg.critic.seq_buckets[-1] <= 256
    assert cfg.model == load_config(policy_run / "config.yaml").model  # the policy is untouched

    ref = json.loads((CRITICS / name / "reference_scores.json").read_text())
    tokens = np.asarray(ref["tokens"], np.int32)
    lens = np.asarray(ref["attention_mask"], np.int32).sum(axis=1)
    assert lens.max() == tokens.shape[1] and lens.min() < tokens.shape[1]  # one full row, right padding in others
    critic = _critic(run)
    scores = critic.fns.score_tokens(critic.state, tokens, lens)
    np.testing.assert_allclose(np.asarray(scores.members_kb[0]), ref["scores"], atol=TOL, rtol=0)
    # wider padding changes nothing: rows are read at their last real token, pads are masked
    wide = np.pad(tokens, ((0, 0), (0, 12)), constant_values=Tokenizer.load(run / "tokenizer.json").pad_id)
    np.testing.assert_allclose(np.asarray(critic.fns.score_tokens(critic.state, wide, lens).members_kb[0]), ref["scores"], atol=TOL)

    # the loop's path: a rollout's prompt (the first 3 tokens) left-padded to width 6, its completion after it
    p, width = 3, 6
    rollout_bl = np.full((len(lens), width + tokens.shape[1] - p), wide[0, -1], np.int32)
    completion_mask = np.zeros(rollout_bl.shape, np.float32)
    for b, n in enumerate(lens):
        rollout_bl[b, width - p : width + n - p] = tokens[b, :n]
        completion_mask[b, width : width + n - p] = 1
    zeros = np.zeros(rollout_bl.shape, np.float32)
    rollout = Rollout(rollout_bl, np.full(len(lens), p, np.int32), completion_mask, zeros, np.ones(len(lens), bool))
    np.testing.assert_allclose(np.asarray(critic.fns.score(critic.state, rollout, width).members_kb[0]), ref["scores"], atol=TOL)


def _edited(tmp_path, name, **config):
    d = Path(shutil.copytree(CRITICS / "llama", tmp_path / name))
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(raw | config))
    return d


def test_what_is_refused_in_one_line(policy_run, tmp_path, capsys):
    run = _run(policy_run, tmp_path)
    cases = [
        (POLICY, "LlamaForCausalLM is a causal LM, not a reward model"),
        (_edited(tmp_path, "two", id2label={"0": "bad", "1": "good"}), "num_labels is 2"),
        (_edited(tmp_path, "pad_eos", pad_token_id=2), "pad_token_id 2 is the eos token"),
    ]
    for src, match in cases:
        with pytest.raises(UserError, match=match):
            import_hf_critic(src, run)
    other_tok = Path(shutil.copytree(CRITICS / "llama", tmp_path / "other_tok"))
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    (other_tok / "tokenizer.json").write_text(json.dumps(tok | {"normalizer": None}))
    with pytest.raises(UserError, match="differs from the policy's .*tokenizer.json"):
        import_hf_critic(other_tok, run)
    with pytest.raises(UserError, match="has no policy"):
        import_hf_critic(CRITICS / "llama", tmp_path / "empty")
    assert not (run / CRITIC_DIR).exists()

    assert main(["import-hf", "--critic", str(POLICY), str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a causal LM" in err
    assert main(["import-hf", "--critic", str(CRITICS / "qwen2"), str(run)]) == 0
    assert "critic" in capsys.readouterr().out
    assert main(["import-hf", "--critic", str(CRITICS / "qwen2"), str(run)]) == 2  # nothing is overwritten
    assert "already holds a critic" in capsys.readouterr().err


def test_refresh_trains_the_imported_critic_further(policy_run, tmp_path):
    """critic.refresh_every > 0: the usual refresh labels new pairs of policy samples (the world's labeller) and
    trains the imported critic on them, from an empty pool."""
    run = _run(policy_run, tmp_path)
    import_hf_critic(CRITICS / "mistral", run)
    cfg = load_run_config(run)
    cfg = dataclasses.replace(cfg, world=load_config(TINY).world, critic=dataclasses.replace(
        cfg.critic, batch_size=4, seq_buckets=(128,), refresh_every=1, refresh_budget=8, label_budget=400)).validate()
    world = World.from_config(cfg.world)
    critic = _critic(run, cfg, world)
    before = _params(critic)

    def sample(params, prompts, key, g):  # stands in for the policy: one full human essay, one cut to a sentence
        essays = [world.human_essay(p, np.random.default_rng(i)) for i, p in enumerate(prompts)]
        return [text for e in essays for text in (e, e.split(". ")[0] + ".")][: g * len(prompts)]

    out = refresh(critic, None, PairSource(world, sample, "world", 4), budget=8, steps=3)
    assert out["critic/new_pairs"] == 8 and np.isfinite(out["loss/critic"])
    assert int(critic.state.step) == 3 and critic.refreshes == 1
    after = _params(critic)
    assert all(np.isfinite(a).all() for a in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) == len(before)  # trunk and head both train


def test_a_tiny_train_run_scores_with_the_frozen_critic_and_leaves_it_bit_identical(policy_run, tmp_path):
    run = _run(policy_run, tmp_path)
    assert main(["import-hf", "--critic", str(CRITICS / "qwen2"), str(run)]) == 0
    imported = checkpoint.flatten_tree(_critic(run).state.params)
    prompts = tmp_path / "prompts.jsonl"
    texts = ["the river runs", "an essay ends", "the city was founded", "an inventor built", "the animal lives"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts * 2))
    out = train(
        run, None,
        [f"run.prompts_file={prompts}", "critic.refresh_every=0", "run.rounds=2", "run.checkpoint_every=2",
         "actor.prompts_per_round=2", "actor.samples_per_prompt=2", "actor.max_new_tokens=8", "actor.prompt_buckets=[16]",
         "critic.batch_size=4", "critic.seq_buckets=[32]"],
        progress=False, console=Console(quiet=True),
    )  # fmt: skip
    assert np.isfinite(out["final"]["reward/mean"]) and out["last_round"]
    with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
        flat, _ = ck.restore(ck.latest_step())
    for path, value in imported.items():
        saved = flat[f"critic/params/{path}"]
        np.testing.assert_array_equal(np.asarray(saved).view(np.uint8), np.asarray(value).view(np.uint8))


def test_train_with_another_config_keeps_the_imported_critics_shape(policy_run, tmp_path):
    """`selfplay train --config OTHER` on a run directory holding a policy and a critic keeps both their shapes (the
    critic's buckets cut to its context), as the policy's model section is kept."""
    run = _run(policy_run, tmp_path)
    import_hf_critic(CRITICS / "mistral", run)
    saved = load_run_config(run).critic
    cfg = resolve_config(run, str(TINY), ["actor.prompt_buckets=[16]", "actor.max_new_tokens=8"])
    assert cfg.critic.model == saved.model and cfg.critic.ensemble_size == 1
    assert cfg.critic.seq_buckets == (128, 160, 192, 256)  # tiny.yaml's buckets up to the critic's 256 positions
    assert cfg.critic.steps == load_config(TINY).critic.steps  # what is not a shape comes from the given config


def test_critic_train_trains_an_imported_critic_further_instead_of_replacing_it(policy_run, tmp_path, capsys):
    run = _run(policy_run, tmp_path)
    import_hf_critic(CRITICS / "llama", run)
    imported = _params(_critic(run))
    pairs = tmp_path / "pairs.jsonl"
    texts = ["the river runs past the old city", "an inventor built a machine", "the animal lives in the forest"]
    pairs.write_text("".join(json.dumps({"prompt": "essay", "chosen": t, "rejected": t.split()[-1]}) + "\n" for t in texts * 4))
    args = ["critic", "train", "--run-dir", str(run), "--pairs", str(pairs), "--no-progress", "critic.steps=2",
            "critic.batch_size=4", "critic.seq_buckets=[64]", "critic.eval_samples=0"]
    assert main(args) == 0, capsys.readouterr().err
    critic = _critic(run)
    assert int(critic.state.step) == 2 and (run / CRITIC_DIR / "imported_from.json").is_file()
    moved = [np.abs(a - b).max() for a, b in zip(_params(critic), imported)]
    assert 0 < max(moved) < 0.01  # two AdamW steps at lr 1e-3 from the imported weights, not a fresh init


def test_a_tiny_train_run_in_the_world_refreshes_the_imported_critic(policy_run, tmp_path):
    """critic.refresh_every=1: every round labels new pairs of the policy's essays and trains the imported critic on
    them; the run's checkpoint holds the trained critic, RUN_DIR/critic the imported one."""
    run = _run(policy_run, tmp_path)
    import_hf_critic(CRITICS / "llama", run)
    imported = checkpoint.flatten_tree(_critic(run).state.params)
    out = train(
        run, str(TINY),
        ["run.rounds=2", "run.checkpoint_every=2", "critic.refresh_every=1", "critic.refresh_steps=2",
         "critic.refresh_budget=4", "critic.batch_size=4", "critic.seq_buckets=[64]", "actor.prompt_buckets=[32]",
         "actor.max_new_tokens=16", "actor.too_long_prompt=truncate", "run.eval_prompts=2"],
        progress=False, console=Console(quiet=True),
    )  # fmt: skip
    assert np.isfinite(out["last_round"]["loss/critic"]) and out["last_round"]["critic/new_pairs"] > 0
    with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
        flat, _ = ck.restore(ck.latest_step())
    assert int(flat["critic/step"]) == 4
    assert all(not np.array_equal(flat[f"critic/params/{k}"], v) for k, v in imported.items())
    assert load_run_config(run).critic.model == _critic(run).ccfg.model  # config.yaml keeps the imported shape


def _with_tensors(tmp_path, name, edit):
    d = Path(shutil.copytree(CRITICS / "llama", tmp_path / name))
    tensors = load_file(str(d / "model.safetensors"))
    save_file(edit(tensors), str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_bfloat16_reward_model_and_odd_tensors(policy_run, tmp_path):
    run = _run(policy_run, tmp_path)
    extra = _with_tensors(tmp_path, "extra", lambda t: t | {"lm_head.weight": t["model.embed_tokens.weight"]})
    with pytest.raises(UserError, match="1 tensor\\(s\\) not used by a LlamaForSequenceClassification.*lm_head.weight"):
        import_hf_critic(extra, run)
    wide = _with_tensors(tmp_path, "wide", lambda t: t | {"score.weight": np.concatenate([t["score.weight"]] * 2)})
    with pytest.raises(UserError, match="'score.weight' has shape \\[2, 32\\], but config.json implies \\[1, 32\\]"):
        import_hf_critic(wide, run)

    bf16 = _with_tensors(tmp_path, "bf16", lambda t: {k: v.astype(jnp.bfloat16) for k, v in t.items()})
    import_hf_critic(bf16, run)
    critic = _critic(run)
    assert critic.ccfg.model.param_dtype == critic.ccfg.model.compute_dtype == "bfloat16"
    assert critic.state.params["trunk"]["embed"].dtype == jnp.bfloat16 and critic.state.params["head"]["kernel"].dtype == jnp.float32
    ref = json.loads((CRITICS / "llama" / "reference_scores.json").read_text())
    tokens, lens = np.asarray(ref["tokens"], np.int32), np.asarray(ref["attention_mask"], np.int32).sum(axis=1)
    got = np.asarray(critic.fns.score_tokens(critic.state, tokens, lens).members_kb[0])
    np.testing.assert_allclose(got, ref["scores"], atol=0.1)  # bfloat16 weights and compute: close, not exact


def test_an_imported_reward_model_is_read_as_one_not_as_a_judge(policy_run, tmp_path):
    run = _run(policy_run, tmp_path)
    cfg0 = load_run_config(run)
    save_config(dataclasses.replace(cfg0, critic=dataclasses.replace(cfg0.critic, judge=True)), run)
    import_hf_critic(CRITICS / "llama", run)
    assert load_run_config(run).critic.judge is False  # config.yaml's critic section fitted to the reward model
    with pytest.raises(ConfigError, match="critic.judge=true fits a head over the policy's judgement"):
        train_critic(load_run_config(run, ["critic.judge=true"]), run, progress=False)
    with pytest.raises(CheckpointError, match="critic.judge: saved False, config True"):
        _critic(run, load_run_config(run, ["critic.judge=true"]))
