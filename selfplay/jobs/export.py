"""`selfplay export-hf`: a run's policy (the SFT or imported one, or a saved round's) as a directory transformers loads
unchanged; written into a temporary sibling and renamed into place, so a killed export leaves nothing half-written.

Which params: `step` as `selfplay.run.state.load_round_policy` reads it (N >= 1: round N's; 0: the SFT/imported
policy; None: the latest saved round, else the SFT/imported policy), the rule `selfplay generate --checkpoint` shares.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from selfplay.config import UserError
from selfplay.models import hf
from selfplay.policy import POLICY_DIR, TOKENIZER_FILE, has_policy, load_run_config
from selfplay.run.state import load_round_policy
from selfplay.tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE


def _optional_json(path: Path) -> dict | None:
    return hf.read_json(path) if path.is_file() else None


def export_hf(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None, *,
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
) -> int:
    """Write the policy of `run_dir` (see the module docstring) to the new or empty `out_dir` with `hf.save_hf`; an
    imported run gives back its checkpoint's config.json, generation and tokenizer configs with their fields kept, a
    pretrained one is a LlamaForCausalLM (Qwen2ForCausalLM with attention biases). Returns the round exported, 0 for
    the SFT policy."""
    run, out = Path(run_dir), Path(out_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not empty; export into a new directory")
    cfg = load_run_config(run)
    if not has_policy(run):
        raise UserError(f"{run} has no policy ({run / POLICY_DIR}, {run / TOKENIZER_FILE}); run `selfplay pretrain` or `selfplay import-hf`")
    step, policy = load_round_policy(run, cfg, step)
    hf_config = _optional_json(run / hf.HF_CONFIG_FILE)
    arch = "Qwen2ForCausalLM" if cfg.model.attention_bias else "LlamaForCausalLM"

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_hf(
            tmp, cfg.model, policy.params, policy.tokenizer, arch, hf_config=hf_config,
            base_generation_config=_optional_json(run / GENERATION_CONFIG_FILE),
            base_tokenizer_config=_optional_json(run / TOKENIZER_CONFIG_FILE), max_shard_bytes=max_shard_bytes,
        )
        os.rename(tmp, out)  # replaces an empty out_dir; whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return step
