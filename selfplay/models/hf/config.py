"""config.json <-> `ModelConfig` for Llama / Mistral / Qwen2 causal LMs: which fields we read, which we accept because
they never touch the forward pass, and which we refuse because our transformer would compute something else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfplay.config import ModelConfig, UserError
from selfplay.tokenizer import Tokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

# Fields that describe the file, the tokenizer, training or generation defaults, never the forward pass (also any
# "_private" key such as _name_or_path). transformers writes many of them into every config.json it saves.
_METADATA_FIELDS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_bfloat16",
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "use_cache", "tokenizer_class", "output_attentions", "output_hidden_states", "return_dict",
    "torchscript", "id2label", "label2id", "problem_type", "finetuning_task", "prefix", "task_specific_params",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "tie_encoder_decoder", "pretraining_tp",
    # generation defaults that older transformers wrote into config.json (generation_config.json holds them today)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
}
# Fields accepted only with the value that leaves the math as our transformer computes it (any other value: refused).
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "attention_dropout": (0, 0.0),
    "hidden_dropout": (0, 0.0),
    "mlp_bias": (False,),
    "attention_bias": (False,),  # Llama's; Qwen2's q/k/v biases are its architecture, not this field
    "add_cross_attention": (False,),
    "pruned_heads": ({},),
    "cross_attention_hidden_size": (None,),
}
_MODEL_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
    "max_position_embeddings", "tie_word_embeddings", "hidden_act",
}
_ARCH_FIELDS = {
    "llama": set(),
    "mistral": {"sliding_window"},
    "qwen2": {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
}
ACCEPTED_FIELDS = _METADATA_FIELDS | set(_NEUTRAL_VALUES) | _MODEL_FIELDS  # documented in the README


_REQUIRED = object()


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


def architecture(hf: dict, path: Path) -> str:
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


def _check_fields(hf: dict, arch: str, path: Path) -> None:
    """Every field is read, known to be metadata, or has its neutral value; anything else stops the import."""
    family = ARCHITECTURES[arch]
    for key, value in hf.items():
        if key.startswith("_") or key in _METADATA_FIELDS | _MODEL_FIELDS | _ARCH_FIELDS[family]:
            continue
        if key in _NEUTRAL_VALUES and not (family == "qwen2" and key == "attention_bias"):
            if value not in _NEUTRAL_VALUES[key] or isinstance(value, bool) != isinstance(_NEUTRAL_VALUES[key][0], bool):
                allowed = " or ".join(json.dumps(v) for v in _NEUTRAL_VALUES[key][:1])
                raise UserError(
                    f"{path}: {key}={json.dumps(value)} is not supported for {arch} (only {allowed}: "
                    "the transformer would compute something else)"
                )
            continue
        raise UserError(
            f"{path}: field '{key}' is not supported for {arch}; it may change the model's math, so the import "
            "stops instead of ignoring it (remove it from config.json only if you know it is harmless)"
        )


def model_config_from_hf(hf: dict, path: Path, param_dtype: str = "float32") -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) of a parsed config.json; refuses every field that would change the math."""
    arch = architecture(hf, path)
    family = ARCHITECTURES[arch]
    _check_fields(hf, arch, path)
    act = _field(hf, "hidden_act", path, str, "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"{path}: hidden_act {act!r} is not supported (only silu: the MLP is SwiGLU)")

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
