"""GGUF files in (llama.cpp's format): the metadata mapped onto the config.json a Hugging Face checkpoint of the same
model has, every tensor dequantized as ggml defines it (the `gguf` package's numpy reference) under its HF name and
torch shape, and the byte-level BPE tokenizer rebuilt from the file's own vocabulary, merges, token types, special ids
and pre-tokenizer name, with its chat template.

Architectures: `llama` (Llama, Mistral and SmolLM files: llama.cpp's converter stores their q/k rows interleaved
for its rotary kernel, so they are put back in Hugging Face's order) and `qwen2` (stored in HF's order). Refused, with
the metadata key or tensor named: other architectures, sentencepiece vocabularies (`tokenizer.ggml.model` other than
gpt2), pre-tokenizers we do not know, RoPE scaling or partial rotary dimensions, head counts that differ by layer, and any
`<arch>.*` key we do not read (it may change the math, as an unknown config.json field may). Quantized tensors widen
to float32; params are bfloat16 only when every tensor is stored as bfloat16.

Pre-tokenizers follow llama.cpp, whose format it is (llama-vocab.cpp), where transformers' GGUF loader (5.24) differs:
`smollm` and the StarCoder family split every digit apart before GPT-2's pattern, as SmolLM2's own tokenizer.json
does (transformers keeps GPT-2's pattern alone; SmolLM2's merges hold no digit pair, so its ids agree either way);
`default` (or no key) is llama.cpp's four-pattern default; the llama3 family looks a whole word up before merging
(`ignore_merges`). Added tokens keep their text (the converter writes them so), normal ones are byte-spelled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from selfplay.config import ModelConfig, UserError
from selfplay.models.hf.config import model_config_to_hf
from selfplay.models.hf.load import Checkpoint
from selfplay.tokenizer import Tokenizer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# llama.cpp's tensor names -> Hugging Face's ("{i}": the layer)
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# `<arch>.*` keys we read (the rest of that namespace is refused); `general.*` and `tokenizer.*` describe the file.
_READ_KEYS = {
    "vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.key_length", "attention.value_length",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type",
}

# Pre-tokenizers by `tokenizer.ggml.pre`, as llama.cpp splits text for each (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),  # also a file without the key
    **{name: (_GPT2_SPLIT,) for name in ("gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{name: (r"\p{N}", _GPT2_SPLIT) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{name: (_LLAMA3_SPLIT,) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{name: (_QWEN2_SPLIT,) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}  # a whole-vocabulary word is one token, as llama.cpp does
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp's token types


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable characters map, as the ByteLevel pre-tokenizer spells tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class GgufTensors:
    """The file's tensors under their Hugging Face names (`info`: name -> (ggml type, torch shape)); unknown names
    keep the file's own, so the loader reports them as unused. `read` dequantizes one tensor to float32."""

    def __init__(self, path: Path, reader: Any, n_heads: int, n_kv_heads: int, interleaved_qk: bool):
        self.path = path
        self._tensors: dict[str, Any] = {}
        for t in reader.tensors:
            self._tensors[self._hf_name(t.name)] = t
        # ggml lists dimensions fastest first; torch's shape is the reverse
        self.info = {name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape))) for name, t in self._tensors.items()}
        self._heads = {"q_proj.weight": n_heads, "k_proj.weight": n_kv_heads} if interleaved_qk else {}

    @staticmethod
    def _hf_name(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
            template = _NAMES.get(".".join(["blk", "{i}", *parts[2:]]))
            return template.format(i=parts[1]) if template else name
        return _NAMES.get(name, name)

    def where(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise UserError(f"{self.path}: tensor '{t.name}' is stored as {t.tensor_type.name}, which cannot be dequantized: {e}") from None
        w = w.reshape(self.info[name][1])
        heads = next((n for suffix, n in self._heads.items() if name.endswith(suffix)), None)
        if heads is not None:  # llama.cpp's converter permuted each head's rows (x0..x/2, x/2..x) -> (x0, x/2, x1, ...)
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w


def _metadata(reader: Any) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _int(meta: dict, key: str, path: Path, default: Any = None) -> int:
    value = meta.get(key, default)
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise UserError(f"{path}: {key} differs between layers ({value!r}); only one value for every layer is supported")
        value = value[0]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{path}: metadata key '{key}' is {'missing' if value is None else f'not an integer: {value!r}'}")
    return int(value)


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06):
    the value the model's config.json had before conversion."""
    return float(str(np.float32(value)))


def _model_config(meta: dict, arch: str, path: Path, tied: bool, n_tokens: int) -> ModelConfig:
    unread = sorted(k for k in meta if k.startswith(f"{arch}.") and k[len(arch) + 1:] not in _READ_KEYS)
    if unread:
        raise UserError(f"{path}: metadata key '{unread[0]}' is not supported; it may change the model's math, so the import stops")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise UserError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported (only plain RoPE)")
    d_model = _int(meta, f"{arch}.embedding_length", path)
    n_heads = _int(meta, f"{arch}.attention.head_count", path)
    head_dim = _int(meta, f"{arch}.attention.key_length", path, d_model // n_heads)
    for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
        if _int(meta, key, path, head_dim) != head_dim:
            raise UserError(f"{path}: {key} {meta[key]} differs from the head size {head_dim} (only full-width heads and RoPE)")
    return ModelConfig(
        vocab_size=_int(meta, f"{arch}.vocab_size", path, n_tokens),
        d_model=d_model,
        n_layers=_int(meta, f"{arch}.block_count", path),
        n_heads=n_heads,
        n_kv_heads=_int(meta, f"{arch}.attention.head_count_kv", path, n_heads),
        head_dim=0 if head_dim * n_heads == d_model else head_dim,
        d_ff=_int(meta, f"{arch}.feed_forward_length", path),
        max_seq_len=_int(meta, f"{arch}.context_length", path),
        rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=_f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        tie_embeddings=tied,
        attention_bias=arch == "qwen2",
    )


def _tokenizer(meta: dict, path: Path) -> Tokenizer:
    """The byte-level BPE tokenizer the file describes, with its control tokens special and its user-defined ones
    matched whole, and the special ids its metadata declares (eot as a second eos, as llama.cpp stops on it)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', byte-level BPE); convert the model "
            "to a Hugging Face directory with its tokenizer.json instead"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise UserError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(sorted(_PRE_SPLITS))})")
    tokens, merges = list(meta["tokenizer.ggml.tokens"]), meta.get("tokenizer.ggml.merges")
    if not merges:
        raise UserError(f"{path}: tokenizer.ggml.merges is missing (a byte-level BPE vocabulary needs its merges)")
    types = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    # The converter writes normal tokens in the byte alphabet and added ones as their text; an odd normal one is
    # re-spelled (as transformers does), an added one kept, so it is matched under its own text.
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet or kind != _NORMAL else "".join(spelling[b] for b in t.encode("utf-8"))
               for t, kind in zip(tokens, types)]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     ignore_merges=pre in _IGNORE_MERGES)
    tk = tokenizers.Tokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in _PRE_SPLITS[pre]]
    tk.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED])
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise UserError(f"{path}: the rebuilt tokenizer has {tk.get_vocab_size(with_added_tokens=True)} tokens, the file lists {len(tokens)}")

    def ids(*keys: str) -> list[int]:
        found = [_int(meta, k, path) for k in keys if k in meta]
        bad = [i for i in found if not 0 <= i < len(tokens)]
        if bad:
            raise UserError(f"{path}: {keys[0]} {bad[0]} is not a token id below {len(tokens)}")
        return list(dict.fromkeys(found))

    declared = {
        "bos": ids("tokenizer.ggml.bos_token_id"),
        "eos": ids("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"),
        "pad": ids("tokenizer.ggml.padding_token_id"),
    }
    return Tokenizer(tk, source=str(path), declared=declared)


def open_gguf(path: Path) -> Checkpoint:
    """`path`'s model as a `Checkpoint`: its config.json equivalent, tokenizer, chat template and tensors."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"{path}: reading GGUF files needs the `gguf` package: pip install 'selfplay[real]' (or gguf)") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable GGUF file: {e}") from None
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: general.architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    tokenizer = _tokenizer(meta, path)
    names = {t.name for t in reader.tensors}
    cfg = _model_config(meta, arch, path, tied="output.weight" not in names, n_tokens=tokenizer.vocab_size)
    tensors = GgufTensors(path, reader, cfg.n_heads, cfg.n_kv_heads, interleaved_qk=arch == "llama")
    all_bf16 = all(kind == "BF16" for kind, _ in tensors.info.values())
    dtype = "bfloat16" if all_bf16 else "float32"
    hf = model_config_to_hf(dataclasses.replace(cfg, param_dtype=dtype, compute_dtype=dtype), ARCHITECTURES[arch], tokenizer)
    tokenizer_config = {k: meta[f"tokenizer.ggml.{k}"] for k in ("add_bos_token", "add_eos_token") if f"tokenizer.ggml.{k}" in meta}
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return Checkpoint(
        source=path,
        config=hf,
        config_path=path,
        tokenizer=tokenizer,
        tokenizer_config=tokenizer_config or None,
        generation_config=tokenizer.special_ids(),
        tensors=tensors,
        param_dtype=dtype,
    )
