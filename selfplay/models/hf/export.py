"""`save_hf`: a policy as a Hugging Face directory that transformers loads unchanged and `load_hf` reads back exactly,
with the tokenizer_config.json and generation_config.json that go with it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from selfplay.config import ModelConfig, UserError
from selfplay.models.hf.config import ARCHITECTURES, architecture as config_architecture, model_config_from_hf, model_config_to_hf
from selfplay.models.hf.directory import CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, TOKENIZER_FILE, write_json, write_weights
from selfplay.models.hf.layout import DTYPES, TENSORS, abstract_params, flatten, hf_names, to_hf
from selfplay.tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, Tokenizer

# In a run directory made by import_hf: the source's config.json (every field, for export).
HF_CONFIG_FILE = "hf_config.json"


def tokenizer_config(tokenizer: Tokenizer, base: dict | None, model_max_length: int) -> dict:
    """tokenizer_config.json for `tokenizer.json`: `base` (e.g. an imported one, with its chat template) with the
    bos/eos/pad tokens, the fast tokenizer class and the context length set."""
    token = tokenizer.tk.id_to_token
    return {
        **(base or {}),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(tokenizer.bos_id),
        "eos_token": token(tokenizer.eos_id),
        "pad_token": token(tokenizer.pad_id),
        "model_max_length": model_max_length,
    }


def generation_config(tokenizer: Tokenizer, base: dict | None) -> dict:
    """generation_config.json: `base` (e.g. an imported one, with its sampling defaults) with the tokenizer's special
    ids, eos as the list when several end a completion."""
    fields = {k: v for k, v in (base or {}).items() if k != "_from_model_config"}
    return {**fields, **tokenizer.special_ids()}


def save_hf(
    dst_dir: str | os.PathLike,
    model_cfg: ModelConfig,
    params: dict | nnx.State,
    tokenizer: Tokenizer,
    architecture: str = "LlamaForCausalLM",
    *,
    hf_config: dict | None = None,
    base_generation_config: dict | None = None,
    base_tokenizer_config: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write, into a new or empty `dst_dir`, what `load_hf` reads back exactly and transformers loads unchanged:
    config.json, the weights (`write_weights`; in `model_cfg.param_dtype`), tokenizer.json, tokenizer_config.json
    and generation_config.json. config.json is `hf_config` (an imported checkpoint's, every field kept; it must
    describe `model_cfg` and decides the architecture) or else `model_config_to_hf`; the base_* dicts are kept under
    the fields written (`tokenizer_config`, `generation_config`). Returns `dst_dir`."""
    dst = Path(dst_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst} is not an empty directory; export into a new one")
    if hf_config is not None:
        architecture = config_architecture(hf_config, Path(HF_CONFIG_FILE))
        described, _ = model_config_from_hf(hf_config, Path(HF_CONFIG_FILE), model_cfg.param_dtype)
        if described != dataclasses.replace(model_cfg, compute_dtype=described.compute_dtype):
            raise UserError(f"{HF_CONFIG_FILE} describes another model than the one exported: {described} != {model_cfg}")
    if architecture not in ARCHITECTURES:
        raise UserError(f"cannot export as {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    if model_cfg.attention_bias != (ARCHITECTURES[architecture] == "qwen2"):
        raise UserError(
            f"a model with attention_bias={model_cfg.attention_bias} cannot be exported as {architecture}: "
            "Qwen2ForCausalLM always has q/k/v biases and Llama/Mistral never do (without o_proj biases)"
        )
    tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    got, wanted = flatten(tree), flatten(abstract_params(model_cfg))
    odd = sorted(set(got) ^ set(wanted))
    if odd:
        where = "missing from the params" if odd[0] in wanted else "not part of this model config"
        raise UserError(f"param '{'.'.join(odd[0])}' is {where}")
    dtype = DTYPES["BF16" if model_cfg.param_dtype == "bfloat16" else "F32"]
    tensors = {}
    for path, leaf in wanted.items():
        value = np.asarray(jax.device_get(got[path]))
        if value.shape != leaf.shape:
            raise UserError(f"param '{'.'.join(path)}' has shape {list(value.shape)}, the config implies {list(leaf.shape)}")
        kind = TENSORS[path][1]
        layers = list(value) if path[0] == "layers" else [value]
        for name, w in zip(hf_names(path, model_cfg.n_layers), layers):
            tensors[name] = to_hf(kind, w.astype(dtype))

    config = hf_config if hf_config is not None else model_config_to_hf(model_cfg, architecture, tokenizer)
    dst.mkdir(parents=True, exist_ok=True)
    write_weights(dst, tensors, max_shard_bytes)
    write_json(dst / CONFIG_FILE, config)
    tokenizer.save(dst / TOKENIZER_FILE)
    write_json(dst / TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer, base_tokenizer_config, config["max_position_embeddings"]))
    write_json(dst / GENERATION_CONFIG_FILE, generation_config(tokenizer, base_generation_config))
    return dst
