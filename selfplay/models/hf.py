"""Hugging Face checkpoints in and out (config.json + safetensors + tokenizer files + generation_config.json), and
`import_hf`, which turns one into a run directory's initial policy (config.yaml, tokenizer.json, orbax params under
policy/, and the files export needs to give the checkpoint back unchanged: hf_config.json, generation_config.json,
tokenizer_config.json).
Over 400 lines because each refused field of a foreign checkpoint gets its own one-line check and message here.

Architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases). Weights map onto the
stacked param tree documented in `transformer.py`; every tensor's shape is checked against `nnx.eval_shape`
of the model that config.json describes before any weight is read.

What is refused (a `UserError` naming the file and the field or tensor), because our transformer would
compute something else:
- pickle weights (*.bin, *.pt, *.pth, *.ckpt, *.pkl): we never unpickle; convert them to safetensors;
- non-null `rope_scaling`, or `rope_parameters` other than plain RoPE (`rope_type: default` + `rope_theta`);
- `hidden_act` other than silu; Llama `attention_bias` or `mlp_bias` true (they also add o_proj and MLP
  biases, which the transformer lacks); non-zero `attention_dropout` (the transformer has no dropout);
- tensors other than float32 / float16 / bfloat16 (e.g. quantized weights), and tensors the model does not use;
- any config.json field outside `_METADATA_FIELDS`, `_MODEL_FIELDS` and the architecture's `_ARCH_FIELDS`: an
  unknown field may change the math, so it stops the import instead of being ignored (e.g. quantization_config).
Special ids (bos, eos, pad) come from the checkpoint's generation_config.json, config.json and tokenizer_config.json
(`selfplay.tokenizer.declared_specials`); a row stops on any of its eos ids.

Decided, not refused: an active sliding window (Mistral `sliding_window`; Qwen2 `use_sliding_window` with
sliding layers) caps `max_seq_len` at the window, since no sequence that fits in the window attends
differently (export writes the window back: it keeps the imported config.json); `pretraining_tp` only splits HF's
matmuls, so it is accepted.

Dtypes: params are bfloat16 when every stored tensor is bfloat16, else float32 (float16 widens exactly);
`compute_dtype` follows `param_dtype`, as HF computes in the dtype it loads. `config.json`'s dtype field is
not trusted over the tensors. bfloat16 tensors are read from the raw file (offsets from the safetensors
header), because older safetensors cannot build numpy bfloat16 arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from selfplay.config import ActorConfig, Config, ModelConfig, UserError
from selfplay.models import transformer
from selfplay.tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, Tokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where recent transformers save a chat template instead of tokenizer_config
# In a run directory made by import_hf: the source's config.json (every field, for export), generation_config.json
# with the special ids the run uses, tokenizer_config.json (with the chat template when the source has one).
HF_CONFIG_FILE = "hf_config.json"
DEFAULT_MAX_SHARD_BYTES = 50 * 1000**3  # transformers' save_pretrained default max_shard_size, "50GB"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# config.json fields that describe the file or generation, never the forward pass (also any "_private" key).
_METADATA_FIELDS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_bfloat16",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "tokenizer_class",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "pretraining_tp",
}
_MODEL_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
    "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_dropout",
}
_ARCH_FIELDS = {
    "llama": {"attention_bias", "mlp_bias"},
    "mistral": {"sliding_window"},
    "qwen2": {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
}

# Our param path -> (HF tensor name, kind); "{i}" is the layer. Kinds: "copy" (same shape), "flat" (HF is ours
# flattened), "T1"/"T2" (a torch Linear weight [out, in]; ours is its transpose with `in` over our first 1/2 axes).
_TENSORS: dict[tuple[str, ...], tuple[str, str]] = {
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
_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------------------------
# Param tree helpers
# ----------------------------------------------------------------------------------------------


def abstract_params(cfg: ModelConfig) -> dict:
    """The pure-dict param tree of `cfg` as ShapeDtypeStructs (no weights allocated)."""
    return nnx.to_pure_dict(nnx.state(transformer.abstract_model(cfg)))


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, (*prefix, str(k))) if isinstance(v, dict) else {(*prefix, str(k)): v})
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def _hf_names(path: tuple[str, ...], n_layers: int) -> list[str]:
    name = _TENSORS[path][0]
    return [name.format(i=i) for i in range(n_layers)] if path[0] == "layers" else [name]


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of one (per-layer) param of ours."""
    if kind == "copy":
        return tuple(shape)
    if kind == "flat":
        return (math.prod(shape),)
    n_in = int(kind[1])
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (w.T if kind[0] == "T" else w).reshape(shape)


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    shape = _hf_shape(kind, w.shape)
    return np.ascontiguousarray(w.reshape(shape[::-1]).T if kind[0] == "T" else w.reshape(shape))


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------

_REQUIRED = object()


def _field(hf: dict, key: str, path: Path, tp: type, default: Any = _REQUIRED) -> Any:
    """config.json's `key` checked against `tp` (a missing or null field takes `default`)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"{path}: required field '{key}' is missing")
        return default
    if tp is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float) if tp is float else tp) and not isinstance(value, bool)
    if not ok:
        raise UserError(f"{path}: field '{key}' must be {tp.__name__}, got {value!r}")
    return tp(value)


def _architecture(hf: dict, path: Path) -> str:
    archs = hf.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise UserError(f"{path}: 'architectures' must list exactly one of {', '.join(ARCHITECTURES)}, got {archs!r}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    model_type = hf.get("model_type", ARCHITECTURES[arch])
    if model_type != ARCHITECTURES[arch]:
        raise UserError(f"{path}: model_type {model_type!r} does not match architecture {arch}")
    return arch


def _rope_theta(hf: dict, path: Path) -> float:
    if hf.get("rope_scaling") is not None:
        raise UserError(
            f"{path}: rope_scaling {hf['rope_scaling']!r} is not supported (only plain RoPE); "
            "refusing rather than computing different positions"
        )
    top = _field(hf, "rope_theta", path, float, None)  # the field's place before transformers v5
    params = hf.get("rope_parameters")
    if params is None:
        return 10000.0 if top is None else top
    if not isinstance(params, dict):
        raise UserError(f"{path}: rope_parameters must be a mapping, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"{path}: rope_parameters.rope_type {rope_type!r} is not supported (only 'default', plain RoPE)")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise UserError(f"{path}: rope_parameters.{extra[0]} is not supported (only rope_type 'default' and rope_theta)")
    theta = _field(params, "rope_theta", path, float, 10000.0 if top is None else top)
    if top is not None and top != theta:
        raise UserError(f"{path}: rope_theta ({top}) and rope_parameters.rope_theta ({theta}) disagree")
    return theta


def _window(hf: dict, family: str, n_layers: int, path: Path) -> int | None:
    """The attention window of a sliding-window config, None when every layer attends to all positions."""
    if family == "mistral":
        # Absent means HF Mistral's default window of 4096; null means full attention.
        return _field(hf, "sliding_window", path, int, None) if "sliding_window" in hf else 4096
    if family != "qwen2":
        return None
    window = _field(hf, "sliding_window", path, int, None)
    if not _field(hf, "use_sliding_window", path, bool, False) or window is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = _field(hf, "max_window_layers", path, int, 28)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    bad = [t for t in layer_types if t not in ("full_attention", "sliding_attention")]
    if bad or len(layer_types) != n_layers:
        raise UserError(f"{path}: layer_types must list {n_layers} of full_attention / sliding_attention, got {layer_types!r}")
    return window if "sliding_attention" in layer_types else None


def model_config_from_hf(hf: dict, path: Path, param_dtype: str = "float32") -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) of a parsed config.json; refuses every field that would change the math."""
    arch = _architecture(hf, path)
    family = ARCHITECTURES[arch]
    allowed = _METADATA_FIELDS | _MODEL_FIELDS | _ARCH_FIELDS[family]
    for key in hf:
        if key not in allowed and not key.startswith("_"):
            raise UserError(
                f"{path}: field '{key}' is not supported for {arch}; it may change the model's math, so the import "
                "stops instead of ignoring it (remove it from config.json only if you know it is harmless)"
            )
    act = _field(hf, "hidden_act", path, str, "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"{path}: hidden_act {act!r} is not supported (only silu: the MLP is SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if _field(hf, key, path, bool, False):
            raise UserError(f"{path}: {key}=true is not supported for {arch} (the transformer has no o_proj or MLP biases)")
    if _field(hf, "attention_dropout", path, float, 0.0) != 0.0:
        raise UserError(f"{path}: attention_dropout {hf['attention_dropout']} is not supported (the transformer has no dropout)")

    d_model = _field(hf, "hidden_size", path, int)
    n_heads = _field(hf, "num_attention_heads", path, int)
    n_layers = _field(hf, "num_hidden_layers", path, int)
    head_dim = _field(hf, "head_dim", path, int, 0)
    max_seq_len = _field(hf, "max_position_embeddings", path, int)
    window = _window(hf, family, n_layers, path)
    if window is not None:
        max_seq_len = min(max_seq_len, window)
    cfg = ModelConfig(
        vocab_size=_field(hf, "vocab_size", path, int),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_field(hf, "num_key_value_heads", path, int, n_heads),
        head_dim=0 if head_dim * n_heads == d_model else head_dim,
        d_ff=_field(hf, "intermediate_size", path, int),
        max_seq_len=max_seq_len,
        rope_theta=_rope_theta(hf, path),
        norm_eps=_field(hf, "rms_norm_eps", path, float, 1e-6),
        tie_embeddings=_field(hf, "tie_word_embeddings", path, bool, False),
        attention_bias=family == "qwen2",
        param_dtype=param_dtype,  # type: ignore[arg-type]
        compute_dtype=param_dtype,  # type: ignore[arg-type]
    )
    try:
        cfg.validate("model")
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return cfg, arch


def model_config_to_hf(cfg: ModelConfig, architecture: str, tokenizer: Tokenizer) -> dict:
    """config.json for `cfg` as `architecture` (plain RoPE, full attention, no extra biases)."""
    family = ARCHITECTURES[architecture]
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
        **tokenizer.special_ids(),
    }
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif family == "mistral":
        hf.update(sliding_window=None)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return hf


# ----------------------------------------------------------------------------------------------
# safetensors files
# ----------------------------------------------------------------------------------------------


class _Weights:
    """Every tensor of a checkpoint directory (model.safetensors, or an index + shards): names, dtypes and shapes
    from the headers; data read one tensor at a time. Files stay open until `stack` closes."""

    def __init__(self, src: Path, stack: contextlib.ExitStack):
        self._stack = stack
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.file_of = self._locate(src)
        self.info: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (safetensors dtype, shape)
        keys = {file: set(self._open(file).keys()) for file in set(self.file_of.values())}
        for name, file in self.file_of.items():
            if name not in keys[file]:
                raise UserError(f"{src / INDEX_FILE}: tensor '{name}' is mapped to {file.name}, which does not contain it")
            sl = self._open(file).get_slice(name)
            self.info[name] = (sl.get_dtype(), tuple(sl.get_shape()))

    def _locate(self, src: Path) -> dict[str, Path]:
        single, index = src / WEIGHTS_FILE, src / INDEX_FILE
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {str(name): src / shard for name, shard in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' of tensor -> shard file): {e}") from None
            missing = sorted({f.name for f in files.values() if not f.is_file()})
            if missing:
                raise UserError(f"{index}: shard {missing[0]} is missing from {src}")
            return files
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES or p.name.endswith(".bin.index.json"))
        if pickles:
            raise UserError(
                f"{src}: only pickle weights found ({', '.join(pickles)}): pickle weights are refused; convert to "
                "safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)` with transformers)"
            )
        raise UserError(f"{src}: no weights found: expected {WEIGHTS_FILE} or {INDEX_FILE}")

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="np"))
            except Exception as e:  # safetensors raises its own SafetensorError on a corrupt header
                raise UserError(f"{file}: not a readable safetensors file: {e}") from None
        return self._handles[file]

    def read(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        dtype, shape = self.info[name]
        if dtype != "BF16":
            return self._open(file).get_tensor(name)
        if file not in self._headers:
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[file] = (8 + n, json.loads(fh.read(n)))
        data_start, header = self._headers[file]
        begin, end = header[name]["data_offsets"]
        raw = np.fromfile(file, dtype=np.uint16, count=(end - begin) // 2, offset=data_start + begin)
        return raw.view(_DTYPES["BF16"]).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A JSON object file; a UserError naming the file (and line) when it is unreadable or not an object."""
    try:
        hf = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def _load(src_dir: str | os.PathLike) -> tuple[ModelConfig, dict, Tokenizer, dict]:
    src = Path(src_dir)
    if not src.is_dir():
        raise UserError(f"{src} is not a directory (a Hugging Face checkpoint: {CONFIG_FILE}, {WEIGHTS_FILE}, {TOKENIZER_FILE})")
    hf = read_json(src / CONFIG_FILE)
    if not (src / TOKENIZER_FILE).is_file():
        raise UserError(f"{src}: {TOKENIZER_FILE} is missing (a tokenizer in another format must be converted first)")
    tokenizer = Tokenizer.load(src / TOKENIZER_FILE)
    with contextlib.ExitStack() as stack:
        weights = _Weights(src, stack)
        for name, (dtype, _) in weights.info.items():
            if dtype not in _DTYPES:
                raise UserError(
                    f"{weights.file_of[name]}: tensor '{name}' has dtype {dtype}; only F32, F16 and BF16 are supported"
                )
        all_bf16 = all(dtype == "BF16" for dtype, _ in weights.info.values())
        cfg, arch = model_config_from_hf(hf, src / CONFIG_FILE, "bfloat16" if all_bf16 else "float32")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(
                f"{src / TOKENIZER_FILE}: the tokenizer has {tokenizer.vocab_size} tokens, "
                f"more than config.json's vocab_size {cfg.vocab_size}"
            )
        wanted = _flatten(abstract_params(cfg))

        # Every name and shape first, so a wrong checkpoint fails before any weight is read.
        for path, leaf in wanted.items():
            kind = _TENSORS[path][1]
            shape = leaf.shape[1:] if path[0] == "layers" else leaf.shape
            for name in _hf_names(path, cfg.n_layers):
                if name not in weights.info:
                    raise UserError(f"{src}: tensor '{name}' is missing; a {arch} with this config.json needs it")
                got, want = weights.info[name][1], _hf_shape(kind, shape)
                if got != want:
                    raise UserError(
                        f"{weights.file_of[name]}: tensor '{name}' has shape {list(got)}, but config.json implies {list(want)}"
                    )
        used = {name for path in wanted for name in _hf_names(path, cfg.n_layers)}
        spare = sorted(n for n in weights.info if n not in used and not n.endswith("rotary_emb.inv_freq"))
        tied_head = "lm_head.weight" in spare and cfg.tie_embeddings
        if tied_head:
            spare.remove("lm_head.weight")
        if spare:
            raise UserError(
                f"{src}: {len(spare)} tensor(s) not used by a {arch} with this config.json, e.g. {', '.join(spare[:4])}"
            )

        dtype = _DTYPES["BF16" if all_bf16 else "F32"]
        flat = {}
        for path, leaf in wanted.items():
            kind = _TENSORS[path][1]
            shape = leaf.shape[1:] if path[0] == "layers" else leaf.shape
            parts = [_to_ours(kind, weights.read(name), shape).astype(dtype) for name in _hf_names(path, cfg.n_layers)]
            flat[path] = jnp.asarray(np.stack(parts) if path[0] == "layers" else parts[0])
        if tied_head and not np.array_equal(weights.read("lm_head.weight").astype(dtype), np.asarray(flat[("embed",)])):
            raise UserError(
                f"{weights.file_of['lm_head.weight']}: tensor 'lm_head.weight' differs from model.embed_tokens.weight, "
                "but config.json says tie_word_embeddings=true"
            )
    return cfg, _unflatten(flat), tokenizer, hf


def load_hf(src_dir: str | os.PathLike) -> tuple[ModelConfig, dict, Tokenizer]:
    """(ModelConfig, params as a pure dict of jax arrays in the transformer's layout, Tokenizer) of a local
    Hugging Face checkpoint directory. Feed the params to `nnx.replace_by_pure_dict` on `transformer.split`'s
    state, or store them with orbax as they are."""
    cfg, params, tokenizer, _ = _load(src_dir)
    return cfg, params, tokenizer


def _write_json(path: Path, fields: dict) -> None:
    path.write_text(json.dumps(fields, indent=2) + "\n")


def _write_weights(dst: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """model.safetensors, or (as transformers' save_pretrained) shards model-0000k-of-0000n.safetensors of at most
    `max_shard_bytes` each (a larger tensor gets a shard of its own) and model.safetensors.index.json."""
    shards: list[dict[str, np.ndarray]] = [{}]
    for name, w in tensors.items():
        if shards[-1] and sum(x.nbytes for x in shards[-1].values()) + w.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = w
    files = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)])
    for file, shard in zip(files, shards):
        save_file(shard, str(dst / file), metadata={"format": "pt"})  # transformers refuses files without format=pt
        (dst / file).chmod(0o644)  # safetensors writes 0600; the checkpoint is meant to be shared like the JSON files
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        _write_json(dst / INDEX_FILE, {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())}, "weight_map": weight_map})


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
    config.json, the weights (`_write_weights`; in `model_cfg.param_dtype`), tokenizer.json, tokenizer_config.json
    and generation_config.json. config.json is `hf_config` (an imported checkpoint's, every field kept; it must
    describe `model_cfg` and decides the architecture) or else `model_config_to_hf`; the base_* dicts are kept under
    the fields written (`tokenizer_config`, `generation_config`). Returns `dst_dir`."""
    dst = Path(dst_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst} is not an empty directory; export into a new one")
    if hf_config is not None:
        architecture = _architecture(hf_config, Path(HF_CONFIG_FILE))
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
    got, wanted = _flatten(tree), _flatten(abstract_params(model_cfg))
    odd = sorted(set(got) ^ set(wanted))
    if odd:
        where = "missing from the params" if odd[0] in wanted else "not part of this model config"
        raise UserError(f"param '{'.'.join(odd[0])}' is {where}")
    dtype = _DTYPES["BF16" if model_cfg.param_dtype == "bfloat16" else "F32"]
    tensors = {}
    for path, leaf in wanted.items():
        value = np.asarray(jax.device_get(got[path]))
        if value.shape != leaf.shape:
            raise UserError(f"param '{'.'.join(path)}' has shape {list(value.shape)}, the config implies {list(leaf.shape)}")
        kind = _TENSORS[path][1]
        layers = list(value) if path[0] == "layers" else [value]
        for name, w in zip(_hf_names(path, model_cfg.n_layers), layers):
            tensors[name] = _to_hf(kind, w.astype(dtype))

    config = hf_config if hf_config is not None else model_config_to_hf(model_cfg, architecture, tokenizer)
    dst.mkdir(parents=True, exist_ok=True)
    _write_weights(dst, tensors, max_shard_bytes)
    _write_json(dst / CONFIG_FILE, config)
    tokenizer.save(dst / TOKENIZER_FILE)
    _write_json(dst / TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer, base_tokenizer_config, config["max_position_embeddings"]))
    _write_json(dst / GENERATION_CONFIG_FILE, generation_config(tokenizer, base_generation_config))
    return dst


def fit_actor(actor: ActorConfig, model: ModelConfig) -> ActorConfig:
    """`actor` with max_new_tokens and prompt_buckets shrunk, where needed, so that the largest prompt plus the
    completion fits model.max_seq_len (at most half the context for the completion)."""
    n = model.max_seq_len
    new = min(actor.max_new_tokens, max(1, n // 2))
    buckets = tuple(b for b in actor.prompt_buckets if b + new <= n) or (n - new,)
    return dataclasses.replace(actor, max_new_tokens=new, prompt_buckets=buckets)


def import_hf(src_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Make `run_dir` an initial policy from a Hugging Face checkpoint: config.yaml (default config, model
    section from config.json, the actor's lengths fitted into its context), tokenizer.json, the params as an
    orbax checkpoint in policy/, and `RUN_FILES`: the source's config.json as hf_config.json, generation_config.json
    with the special ids the tokenizer resolved (so every later job reading tokenizer.json uses the same ones), and
    tokenizer_config.json (its chat template taken from chat_template.jinja when only that file has it). Refuses a
    directory that already holds a run, so nothing is overwritten. Returns `run_dir`."""
    from selfplay.policy import POLICY_DIR, save_policy

    run = Path(run_dir)
    policy_dir = run / POLICY_DIR
    if (run / "config.yaml").exists() or (policy_dir.is_dir() and any(policy_dir.iterdir())):
        raise UserError(f"{run} already holds a run (config.yaml or {POLICY_DIR}/); import into a fresh directory")
    src = Path(src_dir)
    model_cfg, params, tokenizer, hf = _load(src)
    cfg = dataclasses.replace(Config(), model=model_cfg, actor=fit_actor(ActorConfig(), model_cfg)).validate()
    source_tc = read_json(src / TOKENIZER_CONFIG_FILE) if (src / TOKENIZER_CONFIG_FILE).is_file() else None
    source_gc = read_json(src / GENERATION_CONFIG_FILE) if (src / GENERATION_CONFIG_FILE).is_file() else None
    # Before the policy: a run directory with a policy is complete, and its special ids must already be there.
    run.mkdir(parents=True, exist_ok=True)
    _write_json(run / HF_CONFIG_FILE, hf)
    _write_json(run / GENERATION_CONFIG_FILE, generation_config(tokenizer, source_gc))
    if source_tc is not None or (src / CHAT_TEMPLATE_FILE).is_file():
        tc = dict(source_tc or {})
        if "chat_template" not in tc and (src / CHAT_TEMPLATE_FILE).is_file():
            tc["chat_template"] = (src / CHAT_TEMPLATE_FILE).read_text()
        _write_json(run / TOKENIZER_CONFIG_FILE, tc)
    meta = {"imported_from": str(src.absolute()), "architecture": hf["architectures"][0]}
    save_policy(run, cfg, tokenizer, params, meta)
    return run
