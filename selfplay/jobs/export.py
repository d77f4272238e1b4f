"""`selfplay export-hf`: a run's policy (the SFT or imported one, or a saved round's) as a directory transformers loads
unchanged; written into a temporary sibling and renamed into place, so a killed export leaves nothing half-written.

Which params: `step` N >= 1 is round N's learner params (RUN_DIR/checkpoints/N, read without the rest of the RunState);
0 is the SFT/imported policy (RUN_DIR/policy/), which no round saves as 0; None is the latest saved round when the run
has one, else the SFT/imported policy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flax import nnx

from selfplay import checkpoint
from selfplay.config import Config, UserError
from selfplay.models import hf
from selfplay.policy import POLICY_DIR, TOKENIZER_FILE, abstract_params, has_policy, load_policy, load_run_config
from selfplay.run.setup import CHECKPOINT_DIR
from selfplay.tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, Tokenizer


def round_params(run_dir: Path, cfg: Config, step: int | None = None) -> tuple[int, nnx.State]:
    """(step, the learner's params at round `step`, default the latest) read alone from the run's checkpoints."""
    _, abstract = abstract_params(cfg)
    target = {"learner": {"params": abstract}}  # flattens to the RunState checkpoint's own paths
    with checkpoint.Checkpointer(run_dir / CHECKPOINT_DIR, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        flat = ckpt.restore_part(step, checkpoint.flatten_tree(target))
    return step, checkpoint.unflatten_like(target, flat)["learner"]["params"]


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
    tokenizer = Tokenizer.load(run / TOKENIZER_FILE)
    if step is None and not checkpoint.has_checkpoint(run / CHECKPOINT_DIR):
        step = 0
    if step == 0:
        params = load_policy(run, cfg).params
    else:
        step, params = round_params(run, cfg, step)
    hf_config = _optional_json(run / hf.HF_CONFIG_FILE)
    arch = "Qwen2ForCausalLM" if cfg.model.attention_bias else "LlamaForCausalLM"

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_hf(
            tmp, cfg.model, params, tokenizer, arch, hf_config=hf_config,
            base_generation_config=_optional_json(run / GENERATION_CONFIG_FILE),
            base_tokenizer_config=_optional_json(run / TOKENIZER_CONFIG_FILE), max_shard_bytes=max_shard_bytes,
        )
        os.rename(tmp, out)  # replaces an empty out_dir; whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return step
