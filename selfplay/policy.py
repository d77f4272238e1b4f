"""The policy as a run directory stores it (config.yaml, tokenizer.json, policy/ orbax checkpoint), and text generation.

`pretrain` and `import-hf` write a policy; `generate`, the critic and `train` read one. Given a `sharding.Layout`,
the params load directly into their shards and the Generator samples on the mesh (rows split over the batch axes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from selfplay import checkpoint, sharding
from selfplay.actor import make_sampler, pad_prompts
from selfplay.config import ActorConfig, Config, UserError, load_config, save_config
from selfplay.models import transformer
from selfplay.tokenizer import Tokenizer
from selfplay.types import Rollout

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
    """Write the params to `run_dir/policy/` (synchronous, atomic), tokenizer.json, then config.yaml, which
    comes last because it marks a complete run directory."""
    run_dir = Path(run_dir)
    checkpoint.save_once(run_dir / POLICY_DIR, params_to_tree(params), meta)
    tokenizer.save(run_dir / TOKENIZER_FILE)
    save_config(cfg, run_dir)
    return run_dir / POLICY_DIR


def has_policy(run_dir: str | Path) -> bool:
    d = Path(run_dir) / POLICY_DIR
    if not d.is_dir():
        return False
    with checkpoint.Checkpointer(d, read_only=True) as ckpt:
        return ckpt.latest_step() is not None


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


class Generator:
    """Writes completions for text prompts with fixed shapes: prompts go in chunks of `batch` (the last chunk
    padded by repeating a prompt), so one compilation serves every chunk of a bucket.

    With a `layout` the sampler runs on its mesh: every process encodes the same whole chunk, each device gets its
    prompt rows, the KV cache and the Rollout are split over the batch axes (pass params placed on the same mesh);
    `completions` gathers the rows to decode them."""

    def __init__(self, policy: Policy, actor_cfg: ActorConfig, batch: int, layout: sharding.Layout | None = None):
        self.policy = policy
        self.actor_cfg = actor_cfg
        self.batch = batch
        self.layout = layout
        tok = policy.tokenizer
        if layout is None:
            self._sample = make_sampler(policy.cfg.model, actor_cfg, eos_id=tok.eos_id, pad_id=tok.pad_id)
        else:
            constrain = sharding.kv_cache_constraint(layout.mesh, layout.rules)
            sampler = make_sampler(policy.cfg.model, actor_cfg, eos_id=tok.eos_id, pad_id=tok.pad_id, constrain_cache=constrain)
            self._sample = sharding.shard_sampler(sampler, layout.mesh, layout.rules)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        tok = self.policy.tokenizer
        return pad_prompts(
            [tok.encode_prompt(p) for p in prompts],
            self.actor_cfg.prompt_buckets,
            tok.pad_id,
            self.actor_cfg.too_long_prompt,
            max_new_tokens=self.actor_cfg.max_new_tokens,
            max_seq_len=self.policy.cfg.model.max_seq_len,
        )

    def rollout(self, params: Any, prompts: Sequence[str], rng: jax.Array, samples_per_prompt: int) -> tuple[Rollout, int]:
        """One sampler call on exactly `self.batch` prompts: (Rollout of batch * G rows, prompt width P)."""
        if len(prompts) != self.batch:
            raise ValueError(f"Generator.rollout takes exactly {self.batch} prompts, got {len(prompts)}")
        tokens_bp, len_b, p = self.encode(prompts)
        if self.layout is not None:  # the key too: a committed and an uncommitted key would compile twice
            tokens_bp, len_b = self.layout.place_batch((tokens_bp, len_b))
            rng = sharding.place(rng, self.layout.replicated)
        rollout, _ = self._sample(self.policy.graphdef, params, tokens_bp, len_b, rng, samples_per_prompt)
        return rollout, p

    def completions(self, rollout: Rollout, prompt_width: int) -> list[str]:
        """The decoded completion of every row (EOS and padding dropped)."""
        tok = self.policy.tokenizer
        tokens, mask = sharding.to_host((rollout.tokens_bl, rollout.completion_mask_bl))
        tokens, mask = tokens[:, prompt_width:], mask[:, prompt_width:] > 0
        return [tok.decode([int(t) for t, m in zip(row, mrow) if m and t != tok.eos_id]) for row, mrow in zip(tokens, mask)]

    def generate(self, prompts: Sequence[str], rng: jax.Array, samples_per_prompt: int = 1, params: Any = None) -> list[str]:
        """Completions for every prompt, grouped: [p0 s0, p0 s1, ..., p1 s0, ...]."""
        params = self.policy.params if params is None else params
        out: list[str] = []
        for c, start in enumerate(range(0, len(prompts), self.batch)):
            chunk = list(prompts[start : start + self.batch])
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch - real)
            rollout, p = self.rollout(params, chunk, jax.random.fold_in(rng, c), samples_per_prompt)
            out += self.completions(rollout, p)[: real * samples_per_prompt]
        return out
