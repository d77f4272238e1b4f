"""Where each Hugging Face tensor of a Llama / Mistral / Qwen2 causal LM lives in the transformer's stacked param tree
(`transformer.py`), and the reshapes between a torch `Linear` weight and ours; shared by every format, in and out."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfplay.config import ModelConfig
from selfplay.models import transformer

# Our param path -> (HF tensor name, kind); "{i}" is the layer. Kinds: "copy" (same shape), "flat" (HF is ours
# flattened), "T1"/"T2" (a torch Linear weight [out, in]; ours is its transpose with `in` over our first 1/2 axes).
TENSORS: dict[tuple[str, ...], tuple[str, str]] = {
    ("embed",): ("model.embed_tokens.weight", "copy"),
    ("layers", "attn_norm"): ("model.layers.{i}.input_layernorm.weight", "copy"),
    ("layers", "q_proj"): ("model.layers.{i}.self_attn.q_proj.weight", "T1"),
    ("layers", "k_proj"): ("model.layers.{i}.self_attn.k_proj.weight", "T1"),
    ("layers", "v_proj"): ("model.layers.{i}.self_attn.v_proj.weight", "T1"),
    ("layers", "q_bias"): ("model.layers.{i}.self_attn.q_proj.bias", "flat"),
    ("layers", "k_bias"): ("model.layers.{i}.self_attn.k_proj.bias", "flat"),
    ("layers", "v_bias"): ("model.layers.{i}.self_attn.v_proj.bias", "flat"),
    ("layers", "o_proj"): ("model.layers.{i}.self_attn.o_proj.weight", "T2"),
    ("layers", "mlp_norm"): ("model.layers.{i}.post_attention_layernorm.weight", "copy"),
    ("layers", "gate_proj"): ("model.layers.{i}.mlp.gate_proj.weight", "T1"),
    ("layers", "up_proj"): ("model.layers.{i}.mlp.up_proj.weight", "T1"),
    ("layers", "down_proj"): ("model.layers.{i}.mlp.down_proj.weight", "T1"),
    ("final_norm",): ("model.norm.weight", "copy"),
    ("lm_head",): ("lm_head.weight", "T1"),
}
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16)}


def abstract_params(cfg: ModelConfig) -> dict:
    """The pure-dict param tree of `cfg` as ShapeDtypeStructs (no weights allocated)."""
    return nnx.to_pure_dict(nnx.state(transformer.abstract_model(cfg)))


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, (*prefix, str(k))) if isinstance(v, dict) else {(*prefix, str(k)): v})
    return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def hf_names(path: tuple[str, ...], n_layers: int) -> list[str]:
    name = TENSORS[path][0]
    return [name.format(i=i) for i in range(n_layers)] if path[0] == "layers" else [name]


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of one (per-layer) param of ours."""
    if kind == "copy":
        return tuple(shape)
    if kind == "flat":
        return (math.prod(shape),)
    n_in = int(kind[1])
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (w.T if kind[0] == "T" else w).reshape(shape)


def to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    shape = hf_shape(kind, w.shape)
    return np.ascontiguousarray(w.reshape(shape[::-1]).T if kind[0] == "T" else w.reshape(shape))
