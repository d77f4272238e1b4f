"""`import_hf`: a Hugging Face directory or GGUF file as a run directory's initial policy (config.yaml, tokenizer.json,
orbax params under policy/), with the files export needs to give the checkpoint back: hf_config.json,
generation_config.json and tokenizer_config.json (its chat template included)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from selfplay.config import ActorConfig, Config, LearnerConfig, ModelConfig, UserError
from selfplay.models.hf.directory import write_json
from selfplay.models.hf.export import HF_CONFIG_FILE, generation_config
from selfplay.models.hf.load import model_config, open_checkpoint, read_params
from selfplay.tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE


def fit_actor(actor: ActorConfig, model: ModelConfig) -> ActorConfig:
    """`actor` with max_new_tokens and prompt_buckets shrunk, where needed, so that the largest prompt plus the
    completion fits model.max_seq_len (at most half the context for the completion)."""
    n = model.max_seq_len
    new = min(actor.max_new_tokens, max(1, n // 2))
    buckets = tuple(b for b in actor.prompt_buckets if b + new <= n) or (n - new,)
    return dataclasses.replace(actor, max_new_tokens=new, prompt_buckets=buckets)


# float32 logits one micro-batch of the update may hold (1 GiB): the backward keeps several [rows, tokens, vocab] buffers
# alive, so a large vocabulary at the default batch needs the rows split (measured: SmolLM2-135M's 49 152 tokens at 64
# rows of 192 tokens asked XLA for 36 GB in one update step; in 4 micro-batches the whole run peaked at 13 GB).
UPDATE_LOGITS_BUDGET = 2**28


def fit_learner(learner: LearnerConfig, actor: ActorConfig, model: ModelConfig) -> LearnerConfig:
    """`learner` with its minibatches (and grad_accum, by the same factor, so a round still makes the same number of
    optimiser updates) multiplied by the smallest k that divides the round's rows into micro-batches whose logits fit
    `UPDATE_LOGITS_BUDGET`; unchanged where they already fit."""
    rows = actor.prompts_per_round * actor.samples_per_prompt
    per_row = (max(actor.prompt_buckets) + actor.max_new_tokens) * model.vocab_size
    k = 1
    while k * learner.minibatches < rows and (rows % (k * learner.minibatches) or rows // (k * learner.minibatches) * per_row > UPDATE_LOGITS_BUDGET):
        k += 1
    if k == 1:
        return learner
    return dataclasses.replace(learner, minibatches=learner.minibatches * k, grad_accum=learner.grad_accum * k)


def import_hf(src: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Make `run_dir` an initial policy from `src` (a Hugging Face directory or a .gguf file): config.yaml (default
    config, model section from the checkpoint, the actor's lengths fitted into its context, the update's micro-batches
    to its vocabulary: `fit_actor`, `fit_learner`), tokenizer.json, the
    params as an orbax checkpoint in policy/, the source's config (a GGUF file's as the config.json it maps to) as
    hf_config.json, generation_config.json with the special ids the tokenizer resolved (so every later job reading
    tokenizer.json uses the same ones), and tokenizer_config.json when the source has one or a chat template.
    Refuses a directory that already holds a run, so nothing is overwritten. Returns `run_dir`."""
    from selfplay.policy import POLICY_DIR, save_policy

    run = Path(run_dir)
    policy_dir = run / POLICY_DIR
    if (run / "config.yaml").exists() or (policy_dir.is_dir() and any(policy_dir.iterdir())):
        raise UserError(f"{run} already holds a run (config.yaml or {POLICY_DIR}/); import into a fresh directory")
    with contextlib.ExitStack() as stack:
        ck = open_checkpoint(src, stack)
        model_cfg, arch = model_config(ck)
        params, _ = read_params(ck, model_cfg, arch)
    actor = fit_actor(ActorConfig(), model_cfg)
    cfg = dataclasses.replace(Config(), model=model_cfg, actor=actor, learner=fit_learner(LearnerConfig(), actor, model_cfg)).validate()
    # Before the policy: a run directory with a policy is complete, and its special ids must already be there.
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / HF_CONFIG_FILE, ck.config)
    write_json(run / GENERATION_CONFIG_FILE, generation_config(ck.tokenizer, ck.generation_config))
    if ck.tokenizer_config is not None:
        write_json(run / TOKENIZER_CONFIG_FILE, ck.tokenizer_config)
    meta = {"imported_from": str(ck.source.absolute()), "architecture": arch}
    save_policy(run, cfg, ck.tokenizer, params, meta)
    return run
