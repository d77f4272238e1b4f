"""`selfplay import-hf --critic SRC RUN_DIR`: a Hugging Face reward model (Llama / Mistral / Qwen2
`*ForSequenceClassification`, num_labels 1) as the run's initial critic in RUN_DIR/critic, and config.yaml's critic
section made to match it.

    selfplay import-hf path/to/policy runs/mine            # the policy first (or `selfplay pretrain`)
    selfplay import-hf --critic path/to/reward_model runs/mine
    selfplay train --run-dir runs/mine run.prompts_file=prompts.jsonl [critic.refresh_every=0]

Mapping. transformers' model is the causal LM's base model, then `score` (a Linear [1, hidden] without bias) on the
final-normed hidden states. The trunk maps onto `Transformer` exactly as the policy import does (`selfplay.models.hf`,
the same tensor names); there is no lm_head, so the critic's trunk is tied (its unused LM head is the embedding, no
extra params). `score.weight` becomes the `ScalarHead` kernel, its bias 0. `Transformer.hidden` applies the final
norm as transformers' base model does, so the head reads the same vector.

Which token is read. transformers reads each row at the rightmost token that is not `pad_token_id`
(`argmax(arange(T) * (input_ids != pad_token_id))`); our critic reads at each row's last valid token by mask (its true
length). On right-padded rows whose last real token is not the pad id they are the same token. They differ when a row
ends in the pad id: transformers then reads the token before that run. Our rows end in [eos] (pairs) or the
policy's last completion token (eos, or where max_new_tokens cut it), so an import whose `pad_token_id` is the eos id
(common: pad = eos) is refused rather than read one token off; a policy that writes the pad id as its last token
(or is cut at it) is scored at that token, where transformers would skip it. Without a pad_token_id transformers
scores one unpadded row at a time, at its last token: ours again. Positions: ours start at 0 at each row's first
real token (a rollout's prompt is left-padded), transformers' default is `arange`, the same on right-padded rows; so
a rollout scores as transformers scores its tokens unpadded (tests/test_hf_critic.py checks both layouts).

Decided: the reward model's tokenizer.json must equal the run's (the critic scores the policy's tokens; another
tokenizer would need re-tokenising every rollout); an imported critic is one member (critic.ensemble_size 1: copies of
one model give zero disagreement, so min / mean - std combine would be the mean at k times the cost); the import
refuses a run directory that already holds a critic or checkpoints. Frozen: critic.refresh_every=0; refreshed: the
usual refresh (`selfplay.critic.refresh`) trains it further on newly labelled pairs, from an empty pair pool; and
`selfplay critic train` on the run directory trains it further too (critic.steps on its pairs) instead of replacing
it by a critic trained from scratch (RUN_DIR/critic/imported_from.json marks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfplay.config import CriticConfig, ModelConfig, UserError, save_config
from selfplay.critic import CRITIC_DIR, critic_from_state, has_critic, init_state, save_critic
from selfplay.models import hf
from selfplay.models.hf.load import check_vocab, open_checkpoint, read_params
from selfplay.policy import TOKENIZER_FILE, has_policy, load_run_config
from selfplay.run.setup import CHECKPOINT_DIR
from selfplay.tokenizer import Tokenizer

# The reward-model class of each causal-LM architecture the policy import reads; the trunk is the same.
ARCHITECTURES = {arch.replace("ForCausalLM", "ForSequenceClassification"): arch for arch in hf.ARCHITECTURES}
SCORE_TENSOR = "score.weight"
ORIGIN_FILE = "imported_from.json"  # in RUN_DIR/critic: the source of an imported critic (`critic train` keeps it)


def imported_from(critic_dir: str | os.PathLike) -> dict | None:
    """{"source", "architecture"} of the critic in `critic_dir` when it was imported (and maybe trained further)."""
    path = Path(critic_dir) / ORIGIN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def mark_imported(critic_dir: str | os.PathLike, origin: dict) -> None:
    (Path(critic_dir) / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")


def _num_labels(raw: dict) -> int:
    """transformers' num_labels: the explicit field, else the size of id2label (2 when neither is saved)."""
    if "num_labels" in raw:
        return raw["num_labels"]
    return len(raw["id2label"]) if isinstance(raw.get("id2label"), dict) else 2


def _critic_model_config(raw: dict, src: Path, tokenizer: Tokenizer, param_dtype: str) -> tuple[ModelConfig, str]:
    """The critic trunk's ModelConfig (tied: no lm_head) of a reward model's config.json, and its architecture."""
    path = src / hf.CONFIG_FILE
    archs = raw.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if arch in hf.ARCHITECTURES:
        raise UserError(
            f"{path}: {arch} is a causal LM, not a reward model; import it as the policy with "
            f"`selfplay import-hf {src} RUN_DIR`, or give a {' / '.join(ARCHITECTURES)} checkpoint"
        )
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: 'architectures' must list exactly one of {', '.join(ARCHITECTURES)}, got {archs!r}")
    if _num_labels(raw) != 1:
        raise UserError(
            f"{path}: num_labels is {_num_labels(raw)} (id2label {raw.get('id2label')!r}); a reward model gives one "
            "score: num_labels 1"
        )
    if raw.get("pad_token_id") is not None and raw["pad_token_id"] == tokenizer.eos_id:
        raise UserError(
            f"{path}: pad_token_id {raw['pad_token_id']} is the eos token: transformers scores a row ending in eos at "
            "the token before it, our critic at the eos itself; give the reward model a pad token of its own"
        )
    causal = {k: v for k, v in raw.items() if k != "num_labels"} | {"architectures": [ARCHITECTURES[arch]]}
    cfg, _ = hf.model_config_from_hf(causal, path, param_dtype)
    return dataclasses.replace(cfg, tie_embeddings=True), arch


def load_hf_critic(src_dir: str | os.PathLike) -> tuple[ModelConfig, dict, Tokenizer, str]:
    """(trunk ModelConfig, one `RewardModel`'s params as a pure dict {trunk, head}, Tokenizer, architecture) of a local
    Hugging Face reward-model directory; every tensor's name and shape is checked before any is read."""
    src = Path(src_dir)
    if not src.is_dir():
        raise UserError(f"{src} is not a directory (a Hugging Face reward model: {hf.CONFIG_FILE}, {hf.WEIGHTS_FILE}, "
                        f"{TOKENIZER_FILE})")
    with contextlib.ExitStack() as stack:
        ck = open_checkpoint(src, stack)
        cfg, arch = _critic_model_config(ck.config, src, ck.tokenizer, ck.param_dtype)
        check_vocab(ck.tokenizer, cfg)
        # the score head is the one tensor the policy import lacks
        trunk, extra = read_params(ck, cfg, arch, {SCORE_TENSOR: (1, cfg.d_model)})
    kernel = jnp.asarray(extra[SCORE_TENSOR][0].astype(np.float32))
    head = {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}  # transformers' score has no bias
    return cfg, {"trunk": trunk, "head": head}, ck.tokenizer, arch


def fit_critic(critic: CriticConfig, model: ModelConfig) -> CriticConfig:
    """`critic` around an imported trunk: its model, one member, no init from the policy, read as a reward model (not
    critic.judge), and seq_buckets cut to the model's context (the context itself when none fits)."""
    buckets = tuple(b for b in critic.seq_buckets if b <= model.max_seq_len) or (model.max_seq_len,)
    return dataclasses.replace(critic, model=model, ensemble_size=1, init_from_policy=False, seq_buckets=buckets, judge=False)


def import_hf_critic(src_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Make the reward model in `src_dir` the initial critic of `run_dir`, a run directory that holds a policy (from
    `import-hf` or `pretrain`) and neither a critic nor checkpoints: RUN_DIR/critic (state, empty pair pool) and
    config.yaml's critic section fitted to it (`fit_critic`). Returns the critic directory."""
    run = Path(run_dir)
    if not has_policy(run):
        raise UserError(f"{run} has no policy; import one first (`selfplay import-hf SRC {run}`) or `selfplay pretrain` it")
    critic_dir = run / CRITIC_DIR
    if has_critic(critic_dir) or (critic_dir.is_dir() and any(critic_dir.iterdir())) or (run / CHECKPOINT_DIR).exists():
        raise UserError(
            f"{run} already holds a critic ({CRITIC_DIR}/) or a run ({CHECKPOINT_DIR}/); import into a run with only a policy"
        )
    src = Path(src_dir)
    run_tok, src_tok = run / TOKENIZER_FILE, src / TOKENIZER_FILE
    # compared as the tokenizers library writes them, so formatting and field order do not count
    if src_tok.is_file() and Tokenizer.load(src_tok).tk.to_str() != Tokenizer.load(run_tok).tk.to_str():
        raise UserError(f"{src_tok} differs from the policy's {run_tok}: the critic must use the policy's tokenizer")
    model, params, tokenizer, arch = load_hf_critic(src)

    cfg = load_run_config(run)
    cfg = dataclasses.replace(cfg, critic=fit_critic(cfg.critic, model)).validate()
    width = max(cfg.actor.prompt_buckets) + cfg.actor.max_new_tokens
    if width > model.max_seq_len:
        raise UserError(
            f"{src / hf.CONFIG_FILE}: the reward model's context ({model.max_seq_len}) is shorter than the run's rollouts "
            f"(actor.prompt_buckets max + actor.max_new_tokens = {width}); lower them in {run / 'config.yaml'} first"
        )
    state = init_state(cfg.critic, cfg.run.seed)
    pure = nnx.to_pure_dict(state.params)
    member = jax.tree.map(lambda x, like: jnp.asarray(x)[None].astype(like.dtype), params, pure)  # ensemble axis of 1
    nnx.replace_by_pure_dict(state.params, member)
    save_critic(critic_dir, critic_from_state(cfg, tokenizer, state))
    mark_imported(critic_dir, {"source": str(src.absolute()), "architecture": arch})
    save_config(cfg, run)
    return critic_dir

