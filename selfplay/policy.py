"""The policy as a run directory stores it: config.yaml, tokenizer.json and the policy/ orbax checkpoint.

`pretrain` and `import-hf` write a policy; `generate`, the critic and `train` read one. Given a `sharding.Layout`,
the params load directly into their shards.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Sequence

from flax import nnx

from selfplay import checkpoint, sharding
from selfplay.config import Config, UserError, load_config, save_config
from selfplay.models import transformer
from selfplay.tokenizer import Tokenizer

POLICY_DIR = "policy"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class Policy:
    """A model config, its tokenizer, the static graphdef and the params (an nnx.State)."""

    cfg: Config
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    params: nnx.State


def init_policy(cfg: Config, tokenizer: Tokenizer, seed: int) -> Policy:
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    graphdef, params = transformer.split(transformer.create_model(cfg.model, seed))
    return Policy(cfg, tokenizer, graphdef, params)


def abstract_params(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params of ShapeDtypeStructs) for `cfg.model`, built without allocating weights."""
    return transformer.split(transformer.abstract_model(cfg.model))


def params_to_tree(params: nnx.State | dict) -> dict:
    """The params as a plain nested dict of arrays (what orbax stores)."""
    return params if isinstance(params, dict) else nnx.to_pure_dict(params)


def tree_to_params(cfg: Config, tree: dict) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, abstract = abstract_params(cfg)
    nnx.replace_by_pure_dict(abstract, tree)
    return graphdef, abstract


def save_policy(run_dir: str | Path, cfg: Config, tokenizer: Tokenizer, params: nnx.State | dict, meta: dict | None = None) -> Path:
    """Write tokenizer.json and config.yaml, then the params to `run_dir/policy/` (synchronous; orbax makes the step
    appear whole or not at all): the params' commit is the commit of the three. A policy is complete once its params
    are there (`has_policy`): a save killed earlier leaves no usable policy, which `clear_incomplete_policy` removes
    before the next try."""
    run_dir = Path(run_dir)
    tokenizer.save(run_dir / TOKENIZER_FILE)
    save_config(cfg, run_dir)
    checkpoint.save_once(run_dir / POLICY_DIR, params_to_tree(params), meta)
    return run_dir / POLICY_DIR


def has_policy(run_dir: str | Path) -> bool:
    """A complete policy: its params, the tokenizer they were trained with and the config that shaped them."""
    run_dir = Path(run_dir)
    return all((checkpoint.has_checkpoint(run_dir / POLICY_DIR), (run_dir / TOKENIZER_FILE).is_file(), (run_dir / CONFIG_FILE).is_file()))


def clear_incomplete_policy(run_dir: str | Path) -> bool:
    """Remove what a killed `save_policy` left (a policy/ without a complete step), so the policy can be written again;
    True when something was removed. A complete policy is never touched, nor complete params whose tokenizer.json or
    config.yaml is missing: `save_policy` writes those first, so such params were copied in by hand, and removing them
    would lose them (UserError naming the missing files)."""
    run_dir = Path(run_dir)
    if has_policy(run_dir) or not (run_dir / POLICY_DIR).exists():
        return False
    if checkpoint.has_checkpoint(run_dir / POLICY_DIR):
        missing = " and ".join(f for f in (TOKENIZER_FILE, CONFIG_FILE) if not (run_dir / f).is_file())
        raise UserError(
            f"{run_dir / POLICY_DIR} holds complete params but {run_dir} has no {missing}: copy {missing} from the run "
            f"the policy came from, or remove {run_dir / POLICY_DIR} to pretrain a new one (nothing was removed)"
        )
    shutil.rmtree(run_dir / POLICY_DIR)
    return True


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a selfplay run directory: {path} is missing")
    return load_config(path, list(overrides))


def load_policy(
    run_dir: str | Path, cfg: Config | None = None, directory: str | Path | None = None, *, layout: sharding.Layout | None = None
) -> Policy:
    """The policy stored in `run_dir` (params from `directory`, default `run_dir/policy/`); with a `layout`, each
    param is read straight into its shards (the restore target carries the shardings)."""
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    tok_path = run_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise UserError(f"{run_dir} has no {TOKENIZER_FILE}; run `selfplay pretrain` or `selfplay import-hf` first")
    tokenizer = Tokenizer.load(tok_path)
    graphdef, abstract = abstract_params(cfg)
    target = abstract if layout is None else sharding.with_shardings(abstract, layout.shardings(abstract))
    tree, _, _ = checkpoint.restore_latest(directory or run_dir / POLICY_DIR, params_to_tree(target))
    _, params = tree_to_params(cfg, tree)
    return Policy(cfg, tokenizer, graphdef, params)
