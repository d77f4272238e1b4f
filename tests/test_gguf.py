"""GGUF files (llama.cpp's format): weights equal the Hugging Face fixtures' after the same quantize -> dequantize, q/k
rows put back in HF's order, logits equal transformers', the byte-level BPE tokenizer rebuilt from the metadata, import
into a run directory and export back, and loud refusals that name the file and the key or tensor.

The files are written here with the `gguf` package's GGUFWriter from tests/fixtures/hf/, as llama.cpp's
convert_hf_to_gguf.py writes them: its tensor names, q/k permuted per head for the llama architecture, 1-D tensors
kept F32, a vocabulary padded with [PAD<i>] tokens up to the model's vocab_size.
"""

import contextlib
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from selfplay import policy
from selfplay.chat import ChatTemplate, RenderedPrompt, load_chat_template
from selfplay.config import UserError
from selfplay.models import hf, transformer
from selfplay.models.hf.load import open_checkpoint

gguf = pytest.importorskip("gguf")
import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
LLAMA, QWEN2 = FIXTURES / "llama", FIXTURES / "qwen2"
CHAT_TEMPLATE = (FIXTURES / "qwen2_instruct" / "chat_template.jinja").read_text()
Q = gguf.GGMLQuantizationType
NORMAL, CONTROL, USER_DEFINED, UNUSED = (int(t) for t in (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL,
                                                          gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED))

# Hugging Face's tensor names -> llama.cpp's (convert_hf_to_gguf.py's tensor map); "{i}": the layer.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", hf_name)
    if m:
        return GGUF_NAMES["model.layers.{i}." + m[2]].format(i=m[1])
    return GGUF_NAMES[hf_name]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows from HF's rotate-half order to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for f in sorted(directory.glob("model*.safetensors")):
        tensors |= load_file(str(f))
    return tensors


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))  # bitwise


# ----------------------------------------------------------------------------------------------
# Writing GGUF files as llama.cpp's converter does
# ----------------------------------------------------------------------------------------------


def _byte_level_bpe(texts, vocab_size, specials=(), full_alphabet=True) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE (the shape of a gpt2 / smollm / qwen2 tokenizer.json), trained on `texts`."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    return tk


def _vocab_meta(tk: tokenizers.Tokenizer, n_vocab: int, pre: str, **ids) -> dict:
    """tokenizer.* metadata as convert_hf_to_gguf.py writes it for a byte-level BPE (get_vocab_base): every id up to
    the model's vocab_size, unused ones as [PAD<i>], added special tokens CONTROL; merges as "a b" strings."""
    reverse = {i: t for t, i in tk.get_vocab(with_added_tokens=True).items()}
    added = {i: t for i, t in tk.get_added_tokens_decoder().items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(reverse[i])
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tk.to_str())["model"]["merges"]]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    meta.update((f"tokenizer.ggml.{k}", v) for k, v in ids.items())
    return meta


def _arch_meta(arch: str, config: dict) -> dict:
    """<arch>.* metadata from a config.json, as the converter's set_gguf_parameters writes it."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    rope = config.get("rope_parameters") or {}
    meta = {
        "block_count": config["num_hidden_layers"],
        "context_length": config["max_position_embeddings"],
        "embedding_length": d,
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": heads,
        "attention.head_count_kv": config.get("num_key_value_heads", heads),
        "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "rope.freq_base": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
    }
    if "head_dim" in config:
        meta |= {"attention.key_length": head_dim, "attention.value_length": head_dim}
    if arch == "llama":  # the qwen2 converter writes neither: the reader falls back to the head size and the token count
        meta |= {"rope.dimension_count": head_dim, "vocab_size": config["vocab_size"]}
    return {f"{arch}.{k}": v for k, v in meta.items()}


def _gguf_tensors(tensors: dict[str, np.ndarray], arch: str, config: dict) -> dict[str, np.ndarray]:
    """HF tensors under llama.cpp's names, q/k permuted for llama; an lm_head equal to the embedding is dropped."""
    out = {}
    for name, w in tensors.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = _permute(w, config["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = _permute(w, config["num_key_value_heads"])
        out[_gguf_name(name)] = w
    return out


def _put(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        w.add_uint32(key, int(value))
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def _write_gguf(path: Path, arch: str, meta: dict, tensors: dict[str, np.ndarray], qtype=Q.F32, qtype_1d=Q.F32) -> Path:
    """A GGUF file: `meta` (key -> value; general.architecture comes from `arch`), 2-D tensors stored as `qtype`,
    1-D ones as `qtype_1d` (llama.cpp keeps norms and biases F32)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    for key, value in meta.items():
        _put(w, key, value)
    for name, t in tensors.items():
        kind = qtype if t.ndim == 2 else qtype_1d
        t = np.ascontiguousarray(t, dtype=np.float32)
        if kind == Q.F32:
            w.add_tensor(name, t)
        elif kind == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _roundtrip(t: np.ndarray, kind) -> np.ndarray:
    """What ggml gives back for `t` stored as `kind`."""
    if kind == Q.F32:
        return t
    if kind == Q.F16:
        return t.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(t, dtype=np.float32), kind), kind)


# A byte-level BPE small enough for the llama / qwen2 fixtures' vocabularies (96 and 112 ids): only the characters of
# these sentences, three control tokens at 0..2; the converter pads the rest of the ids with [PAD<i>].
SMALL_CORPUS = ["the cat sat on the mat.", "hello world, the end!", "a dog and a cat\nsat together"] * 4


@pytest.fixture(scope="module")
def small_tokenizer():
    tk = _byte_level_bpe(SMALL_CORPUS, 80, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], full_alphabet=False)
    assert tk.get_vocab_size() <= 80
    return tk


def _llama_meta(small_tokenizer, **overrides):
    """The llama fixture's metadata with `small_tokenizer`, a chat template, <|endoftext|> as bos/eos/pad and
    <|im_end|> as eot; an override of None drops the key."""
    config = json.loads((LLAMA / "config.json").read_text())
    meta = _arch_meta("llama", config) | _vocab_meta(
        small_tokenizer, config["vocab_size"], "gpt2", bos_token_id=0, eos_token_id=0, padding_token_id=0, eot_token_id=2
    )
    meta |= {"tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE}
    meta |= overrides
    return {k: v for k, v in meta.items() if v is not None}


def _llama_tensors():
    config = json.loads((LLAMA / "config.json").read_text())
    return _gguf_tensors(_hf_tensors(LLAMA), "llama", config)


@pytest.fixture(scope="module")
def llama_f32(tmp_path_factory, small_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "llama-f32.gguf"
    return _write_gguf(path, "llama", _llama_meta(small_tokenizer), _llama_tensors())


@pytest.fixture(scope="module")
def llama_hf():
    return hf.load_hf(LLAMA)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_llama_weights_equal_the_hf_fixtures_after_the_same_quantization(tmp_path, small_tokenizer, llama_hf, qtype):
    path = _write_gguf(tmp_path / f"llama-{qtype.name}.gguf", "llama", _llama_meta(small_tokenizer), _llama_tensors(), qtype)
    cfg, params, _ = hf.load_hf(path)
    hf_cfg, hf_params, _ = llama_hf
    assert cfg == hf_cfg  # vocab, dims, n_kv_heads, head_dim, rope theta, eps, tie, dtypes
    assert (cfg.vocab_size, cfg.n_kv_heads, cfg.norm_eps, cfg.param_dtype) == (96, 2, 1e-6, "float32")
    if qtype == Q.F32:
        _assert_trees_equal(params, hf_params)
        return
    # Every 2-D tensor as ggml stores it; the 1-D norms were written F32 and come back bitwise.
    cfg_json = json.loads((LLAMA / "config.json").read_text())
    want = {n: (_roundtrip(t, qtype) if t.ndim == 2 else t) for n, t in _hf_tensors(LLAMA).items()}
    d = tmp_path / "want"
    d.mkdir()
    save_file(want, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg_json))
    for f in ("tokenizer.json", "generation_config.json"):
        (d / f).write_text((LLAMA / f).read_text())
    _, want_params, _ = hf.load_hf(d)
    _assert_trees_equal(params, want_params)
    # The comparison can fail: the quantization changed the weights.
    assert not np.array_equal(np.asarray(params["layers"]["q_proj"]), np.asarray(hf_params["layers"]["q_proj"]))


def test_all_bfloat16_file_gives_bfloat16_params(tmp_path, small_tokenizer, llama_hf):
    path = _write_gguf(tmp_path / "bf16.gguf", "llama", _llama_meta(small_tokenizer), _llama_tensors(), Q.BF16, Q.BF16)
    cfg, params, _ = hf.load_hf(path)
    assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"
    hf_params = llama_hf[1]
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
        assert ours.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs).astype(jax.numpy.bfloat16))


def test_the_q_k_permutation_is_undone(llama_f32):
    """The file holds llama.cpp's interleaved rows (so a loader that skipped the un-permutation would differ), and the
    loader gives HF's rows back."""
    hf_t = _hf_tensors(LLAMA)
    reader = gguf.GGUFReader(str(llama_f32))
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    for layer in range(2):
        for proj, heads in (("q", 4), ("k", 2)):
            want = hf_t[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
            got = stored[f"blk.{layer}.attn_{proj}.weight"]
            assert got.shape == want.shape and not np.array_equal(got, want)
            np.testing.assert_array_equal(got, _permute(want, heads))
    with contextlib.ExitStack() as stack:
        ck = open_checkpoint(llama_f32, stack)
    np.testing.assert_array_equal(ck.tensors.read("model.layers.1.self_attn.k_proj.weight"), hf_t["model.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(ck.tensors.read("model.layers.0.self_attn.q_proj.weight"), hf_t["model.layers.0.self_attn.q_proj.weight"])


def _logits(cfg, params, ref):
    graphdef, state = transformer.split(nnx.eval_shape(lambda: transformer.create_model(cfg, 0)))
    nnx.replace_by_pure_dict(state, params)
    logits, _ = jax.jit(transformer.forward)(graphdef, state, ref["tokens"], ref["position_ids"], ref["attention_mask"].astype(bool))
    return np.asarray(logits)


def test_llama_gguf_logits_match_transformers(llama_f32):
    cfg, params, _ = hf.load_hf(llama_f32)
    ref = load_file(str(LLAMA / "reference_logits.safetensors"))
    valid = ref["attention_mask"].astype(bool)
    assert ref["logits"][valid].std() > 0.5
    err = np.abs(_logits(cfg, params, ref) - ref["logits"])[valid].max()
    assert err <= 1e-4


def test_qwen2_weights_with_biases_are_not_permuted(tmp_path):
    config = json.loads((QWEN2 / "config.json").read_text())
    tk = _byte_level_bpe(SMALL_CORPUS, 90, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], full_alphabet=False)
    meta = _arch_meta("qwen2", config) | _vocab_meta(tk, config["vocab_size"], "qwen2", bos_token_id=0, eos_token_id=2)
    tensors = _gguf_tensors(_hf_tensors(QWEN2), "qwen2", config)
    assert "output.weight" not in tensors and "blk.0.attn_q.bias" in tensors  # tied; q/k/v biases
    path = _write_gguf(tmp_path / "qwen2.gguf", "qwen2", meta, tensors)
    cfg, params, tok = hf.load_hf(path)
    hf_cfg, hf_params, _ = hf.load_hf(QWEN2)
    assert cfg == hf_cfg and cfg.tie_embeddings and cfg.attention_bias and cfg.vocab_size == 112
    _assert_trees_equal(params, hf_params)
    assert tok.vocab_size == 112 and tok.tk.id_to_token(111) == "[PAD111]"


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12 o'clock, 12 12 12!",
    "Prices: 12, 120, 1212 and 2026; don't stop -- we're done.",
    "café — naïve résumé, 12 cafés\n\nnew lines\tand tabs",
] * 8
TEXTS = [
    "Hello, world!  Two  spaces and  more   here.",
    "line one\nline two\n\n  indented\ttab",
    "In 2026 and 17 (or 12) cats' toys: $3.50 each.",
    "café — naïve résumé",
    "don't <|im_end|> you're 12",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE with all 256 bytes, its specials at 0..2 and a merged "12"; a user-defined <think> at the end."""
    tk = _byte_level_bpe(CORPUS, 330, SPECIALS)
    tk.add_tokens([tokenizers.AddedToken("<think>", special=False, normalized=False)])
    assert tk.token_to_id("12") is not None  # gpt2 keeps "12" whole, smollm splits it
    return tk


def _tokenizer_gguf(path: Path, tk: tokenizers.Tokenizer, pre: str, **ids) -> Path:
    """A tiny random llama (1 layer, d 8) whose vocabulary is `tk`'s."""
    n = tk.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(0)
    config = {
        "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
        "num_hidden_layers": 1, "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "vocab_size": n,
    }
    shapes = {
        "model.embed_tokens.weight": (n, 8), "model.norm.weight": (8,), "lm_head.weight": (n, 8),
        "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.self_attn.v_proj.weight": (4, 8), "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.mlp.gate_proj.weight": (32, 8), "model.layers.0.mlp.up_proj.weight": (32, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 32),
    }
    tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    meta = _arch_meta("llama", config) | _vocab_meta(tk, n, pre, **ids)
    return _write_gguf(path, "llama", meta, _gguf_tensors(tensors, "llama", config))


def _hf_style(tk: tokenizers.Tokenizer, pre_tokenizer) -> tokenizers.Tokenizer:
    """`tk` with another pre-tokenizer, as a model's own tokenizer.json has it."""
    other = tokenizers.Tokenizer.from_str(tk.to_str())
    other.pre_tokenizer = pre_tokenizer
    return other


def _smollm_style(tk):  # SmolLM2's tokenizer.json: every digit apart, then GPT-2's byte-level split
    return _hf_style(tk, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]))


def _split_style(pattern):  # Llama-3's and Qwen2's tokenizer.json: a Split regex, then bytes without GPT-2's regex
    return lambda tk: _hf_style(tk, pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]))


LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@pytest.mark.parametrize(
    "pre, original",
    [
        ("gpt2", lambda tk: tk),
        ("smollm", _smollm_style),
        ("llama-bpe", _split_style(LLAMA3_PATTERN)),
        ("qwen2", _split_style(QWEN2_PATTERN)),
    ],
)
def test_rebuilt_tokenizer_encodes_as_the_original(tmp_path, bpe, pre, original):
    _, _, tok = hf.load_hf(_tokenizer_gguf(tmp_path / "tok.gguf", bpe, pre, bos_token_id=0, eos_token_id=0))
    want = tokenizers.Tokenizer.from_str(original(bpe).to_str())
    want.encode_special_tokens = True  # plain text: control tokens are text
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == want.encode(text, add_special_tokens=False).ids, (pre, text)
        assert tok.decode(ids) == text
    assert tok.vocab_size == bpe.get_vocab_size(with_added_tokens=True)


def test_smollm_splits_every_digit_where_gpt2_keeps_merged_digits(tmp_path, bpe):
    twelve, one, two = bpe.token_to_id("12"), bpe.token_to_id("1"), bpe.token_to_id("2")
    _, _, gpt2 = hf.load_hf(_tokenizer_gguf(tmp_path / "gpt2.gguf", bpe, "gpt2", bos_token_id=0, eos_token_id=0))
    _, _, smollm = hf.load_hf(_tokenizer_gguf(tmp_path / "smollm.gguf", bpe, "smollm", bos_token_id=0, eos_token_id=0))
    assert gpt2.encode("12") == [twelve]
    assert smollm.encode("12") == [one, two]
    assert smollm.encode("x2026") == [bpe.token_to_id("x"), *(bpe.token_to_id(c) for c in "2026")]


def test_control_tokens_only_from_a_chat_template_and_special_ids_from_the_metadata(tmp_path, bpe):
    path = _tokenizer_gguf(
        tmp_path / "chat.gguf", bpe, "gpt2", bos_token_id=1, eos_token_id=0, padding_token_id=0, eot_token_id=2
    )
    _, _, tok = hf.load_hf(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (1, 0, 0, (0, 2))  # eot: a second eos
    rendered = ChatTemplate(CHAT_TEMPLATE, {}).render([{"role": "user", "content": "hi 12"}])
    assert rendered.startswith("<|im_start|>user\nhi 12<|im_end|>\n")
    ids = tok.encode_prompt(rendered)
    assert ids == bpe.encode(rendered, add_special_tokens=False).ids
    assert ids.count(1) == 2 and ids.count(2) == 1  # <|im_start|> twice, <|im_end|> once, each one id
    plain = tok.encode(str(rendered))  # the same text as a user's: no control id
    assert not {0, 1, 2} & set(plain) and tok.decode(plain) == rendered
    think = bpe.token_to_id("<think>")  # user-defined (type 4): matched whole, even in plain text
    assert tok.encode("a<think>b") == [bpe.token_to_id("a"), think, bpe.token_to_id("b")]

    _, _, tok = hf.load_hf(_tokenizer_gguf(tmp_path / "no-eot.gguf", bpe, "gpt2", bos_token_id=1, eos_token_id=2))
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 2)


# ----------------------------------------------------------------------------------------------
# import_hf and export
# ----------------------------------------------------------------------------------------------


def test_import_a_gguf_then_export_gives_the_same_params(tmp_path, llama_f32):
    from selfplay.jobs.export import export_hf

    run = hf.import_hf(llama_f32, tmp_path / "run")
    hf_config = json.loads((run / hf.HF_CONFIG_FILE).read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["num_key_value_heads"] == 2
    gen = json.loads((run / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, [0, 2], 0)
    tc = json.loads((run / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT_TEMPLATE and tc["add_bos_token"] is False
    prompt = load_chat_template(run).render([{"role": "user", "content": "the cat"}])
    stored = policy.load_policy(run)
    assert stored.tokenizer.eos_ids == (0, 2) and stored.tokenizer.encode_prompt(prompt)[0] == 1  # <|im_start|>

    cfg, params, tok = hf.load_hf(llama_f32)
    assert export_hf(run, tmp_path / "out", 0) == 0
    cfg2, params2, tok2 = hf.load_hf(tmp_path / "out")
    assert cfg2 == cfg
    _assert_trees_equal(params2, params)
    assert tok2.eos_ids == (0, 2) and tok2.encode("the cat sat") == tok.encode("the cat sat")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        ({"llama.expert_count": 8}, "metadata key 'llama.expert_count' is not supported"),
        ({"llama.rope.scaling.type": "linear"}, "llama.rope.scaling.type 'linear' is not supported"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model 'llama' is not supported"),
        ({"tokenizer.ggml.pre": "unknown-pre"}, "tokenizer.ggml.pre 'unknown-pre' is not supported"),
        ({"llama.rope.dimension_count": 4}, "llama.rope.dimension_count 4 differs from the head size 8"),
        ({"llama.attention.head_count_kv": [2, 1]}, "llama.attention.head_count_kv differs between layers"),
        (
            {"llama.attention.key_length": 16, "llama.attention.value_length": 16, "llama.rope.dimension_count": 16},
            "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [16, 32], but bad.gguf implies [32, 32]",
        ),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges is missing"),
        ({"tokenizer.ggml.eos_token_id": 500}, "tokenizer.ggml.eos_token_id 500 is not a token id below 96"),
        ({"llama.block_count": None}, "metadata key 'llama.block_count' is missing"),
    ],
)
def test_unsupported_metadata_is_refused_naming_file_and_key(tmp_path, small_tokenizer, overrides, culprit):
    path = _write_gguf(tmp_path / "bad.gguf", "llama", _llama_meta(small_tokenizer, **overrides), _llama_tensors())
    with pytest.raises(UserError, match=re.escape(culprit)) as err:
        hf.load_hf(path)
    assert str(err.value).startswith(str(path))


def test_per_layer_head_counts_that_agree_are_read(tmp_path, small_tokenizer, llama_hf):
    path = _write_gguf(tmp_path / "kv.gguf", "llama", _llama_meta(small_tokenizer, **{"llama.attention.head_count_kv": [2, 2]}), _llama_tensors())
    assert hf.load_hf(path)[0] == llama_hf[0]


def test_other_architectures_and_unused_tensors_are_refused(tmp_path, small_tokenizer):
    meta = {k.replace("llama.", "gemma.", 1): v for k, v in _llama_meta(small_tokenizer).items()}
    path = _write_gguf(tmp_path / "gemma.gguf", "gemma", meta, _llama_tensors())
    with pytest.raises(UserError, match=re.escape(f"{path}: general.architecture 'gemma' is not supported")):
        hf.load_hf(path)

    tensors = _llama_tensors() | {"rope_freqs.weight": np.ones(4, np.float32)}  # Llama 3.1's, stored apart by llama.cpp
    path = _write_gguf(tmp_path / "rope-freqs.gguf", "llama", _llama_meta(small_tokenizer), tensors)
    with pytest.raises(UserError, match=r"1 tensor\(s\) not used by a LlamaForCausalLM.*rope_freqs\.weight") as err:
        hf.load_hf(path)
    assert str(err.value).startswith(str(path))

    tensors = _llama_tensors()
    del tensors["blk.1.ffn_up.weight"]
    path = _write_gguf(tmp_path / "missing.gguf", "llama", _llama_meta(small_tokenizer), tensors)
    with pytest.raises(UserError, match=re.escape(f"{path}: tensor 'model.layers.1.mlp.up_proj.weight' is missing")):
        hf.load_hf(path)


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all, just bytes" * 4, b"GGUF\x03\x00\x00\x00\xff\xff"])
def test_a_file_that_is_not_gguf_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"{path}: not a readable GGUF file")):
        hf.load_hf(path)


# llama.cpp llama-vocab.cpp, llm_tokenizer_bpe, `default:` case (used for tokenizer.ggml.pre "default" and a missing pre)
LLAMA_CPP_DEFAULT = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
]


def test_default_pre_splits_as_llama_cpp_default(tmp_path, bpe):
    """llama.cpp: pre "default" (or no pre key) -> LLAMA_VOCAB_PRE_TYPE_DEFAULT, whose regex list isolates punctuation
    runs first and splits digit runs in threes; not GPT-2's single regex."""
    _, _, tok = hf.load_hf(_tokenizer_gguf(tmp_path / "d.gguf", bpe, "default", bos_token_id=0, eos_token_id=0))
    want = tokenizers.Tokenizer.from_str(bpe.to_str())
    want.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(rx), behavior="isolated") for rx in LLAMA_CPP_DEFAULT]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    text = "don't (2026)"
    assert tok.encode(text) == want.encode(text, add_special_tokens=False).ids


def test_llama3_pre_ignores_merges_as_llama_cpp(tmp_path):
    """llama.cpp sets ignore_merges for llama3/llama-bpe/falcon3 (Llama-3's tokenizer.json has "ignore_merges": true):
    a pre-token that is itself in the vocabulary is emitted whole, before the merges (without the flag
    a word the merge order cannot reach would come out in pieces)."""
    vocab = {c: i for i, c in enumerate(["<|end_of_text|>", "a", "b", "c", "bc", "ab", "abc"])}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b")], ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.add_special_tokens(["<|end_of_text|>"])
    assert tk.encode("abc").ids == [6]  # what llama.cpp and the HF tokenizer give
    _, _, tok = hf.load_hf(_tokenizer_gguf(tmp_path / "l3.gguf", tk, "llama-bpe", bos_token_id=0, eos_token_id=0))
    assert tok.encode("abc") == [6]  # applying the merges would give [1, 4] ("a", "bc")


@pytest.mark.parametrize("content", ["<｜end▁of▁sentence｜>", "<tool call>"])
def test_control_tokens_outside_the_byte_alphabet(tmp_path, bpe, content):
    """The converter stores added tokens as their text (DeepSeek-R1-Distill-Qwen, pre "deepseek-r1-qwen", which gguf.py
    lists: <｜begin▁of▁sentence｜>, <｜end▁of▁sentence｜>): they keep their text, not a byte spelling, so each is
    matched whole under its own id."""
    tk = tokenizers.Tokenizer.from_str(bpe.to_str())
    tk.add_special_tokens([content])
    path = _tokenizer_gguf(tmp_path / "ds.gguf", tk, "deepseek-r1-qwen", bos_token_id=0, eos_token_id=tk.token_to_id(content))
    _, _, tok = hf.load_hf(path)
    assert tok.eos_id == tk.token_to_id(content)
    assert tok.encode_prompt(RenderedPrompt(f"hi{content}")) == tk.encode(f"hi{content}").ids
