"""Hugging Face checkpoints: logits match transformers' own, the weight mapping, exact export/import round trips,
bf16 and sharded files, import into a run directory, and loud refusals that name the file, field or tensor.

The fixtures under tests/fixtures/hf/ were written by make_fixtures.py (transformers in a separate venv).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from selfplay import policy
from selfplay.config import UserError, load_config
from selfplay.models import hf, transformer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
TOL = 1e-4  # f32 against f32 HF eager attention; the measured error is ~4e-6 on O(1) logits

fwd = jax.jit(transformer.forward)


def _logits(cfg, params, ref):
    graphdef, state = transformer.split(nnx.eval_shape(lambda: transformer.create_model(cfg, 0)))
    nnx.replace_by_pure_dict(state, params)
    logits, _ = fwd(graphdef, state, ref["tokens"], ref["position_ids"], ref["attention_mask"].astype(bool))
    return np.asarray(logits)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))  # bitwise


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------

EXPECTED = {
    "llama": dict(vocab_size=96, tie_embeddings=False, attention_bias=False, n_kv_heads=2, head_dim=0, max_seq_len=64),
    "qwen2": dict(vocab_size=112, tie_embeddings=True, attention_bias=True, n_kv_heads=2, norm_eps=1e-5),
    # head_dim 16 != 32 / 4; the sliding window (16) caps the context.
    "mistral": dict(vocab_size=128, tie_embeddings=False, head_dim=16, rope_theta=1e6, max_seq_len=16),
}


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_logits_match_transformers(name):
    src = FIXTURES / name
    cfg, params, tok = hf.load_hf(src)
    for field, value in EXPECTED[name].items():
        assert getattr(cfg, field) == value, field
    ref = load_file(str(src / "reference_logits.safetensors"))
    with safe_open(str(src / "reference_logits.safetensors"), framework="np") as f:
        texts = json.loads(f.metadata()["texts"])
    valid = ref["attention_mask"].astype(bool)
    for text, row, mask in zip(texts, ref["tokens"], valid):  # the tokenizer is the one HF used
        assert list(row[mask]) == ([tok.bos_id] + tok.encode(text))[: len(row)]
    assert ref["logits"][valid].std() > 0.5  # O(1) logits, so the tolerance means something

    err = np.abs(_logits(cfg, params, ref) - ref["logits"])[valid].max()
    print(f"{name}: max |logits - HF logits| = {err:.2e}")
    assert err <= TOL

    # The comparison can fail: the same weights with two query heads swapped are far off.
    swapped = {**params, "layers": {**params["layers"], "q_proj": params["layers"]["q_proj"][:, :, [1, 0, 2, 3]]}}
    assert np.abs(_logits(cfg, swapped, ref) - ref["logits"])[valid].max() > 100 * TOL


def test_the_llama_fixture_is_sharded():
    assert not (FIXTURES / "llama" / hf.WEIGHTS_FILE).exists()
    index = json.loads((FIXTURES / "llama" / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 2


# ----------------------------------------------------------------------------------------------
# A checkpoint written by hand (no transformers): the mapping itself
# ----------------------------------------------------------------------------------------------

D, H, KV, HD, F, V, N = 16, 4, 2, 4, 24, 96, 2  # hidden, heads, kv heads, head_dim, mlp, vocab, layers


def _hf_config(**overrides):
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
        "intermediate_size": F, "num_hidden_layers": N, "num_attention_heads": H, "num_key_value_heads": KV,
        "hidden_act": "silu", "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v != "<drop>"}


def _hf_tensors(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.normal(size=(V, D)), "model.norm.weight": rng.normal(size=(D,)),
         "lm_head.weight": rng.normal(size=(V, D))}
    for i in range(N):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": rng.normal(size=(D,)),
            p + "post_attention_layernorm.weight": rng.normal(size=(D,)),
            p + "self_attn.q_proj.weight": rng.normal(size=(H * HD, D)),
            p + "self_attn.k_proj.weight": rng.normal(size=(KV * HD, D)),
            p + "self_attn.v_proj.weight": rng.normal(size=(KV * HD, D)),
            p + "self_attn.o_proj.weight": rng.normal(size=(D, H * HD)),
            p + "mlp.gate_proj.weight": rng.normal(size=(F, D)),
            p + "mlp.up_proj.weight": rng.normal(size=(F, D)),
            p + "mlp.down_proj.weight": rng.normal(size=(D, F)),
        }
    return {k: v.astype(dtype) for k, v in t.items()}


def _write(tmp_path, config=None, tensors=None, name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_hf_config() if config is None else config))
    shutil.copy(FIXTURES / "llama" / "tokenizer.json", d / "tokenizer.json")
    save_file(_hf_tensors() if tensors is None else tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_a_hand_written_checkpoint_maps_onto_the_documented_layout(tmp_path):
    t = _hf_tensors()
    cfg, params, tok = hf.load_hf(_write(tmp_path, tensors=t))
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.rope_theta, cfg.norm_eps) == (D, H, KV, F, 5e5, 1e-5)
    assert tok.bos_id == 1 and cfg.param_dtype == "float32"
    lp = params["layers"]
    l, d, h, k, f = 1, 3, 2, 1, 5  # arbitrary indices
    w = f"model.layers.{l}."
    assert lp["q_proj"][l, d, h, k] == t[w + "self_attn.q_proj.weight"][h * HD + k, d]
    assert lp["k_proj"][l, d, 1, k] == t[w + "self_attn.k_proj.weight"][HD + k, d]
    assert lp["v_proj"][l, d, 0, k] == t[w + "self_attn.v_proj.weight"][k, d]
    assert lp["o_proj"][l, h, k, d] == t[w + "self_attn.o_proj.weight"][d, h * HD + k]
    assert lp["gate_proj"][l, d, f] == t[w + "mlp.gate_proj.weight"][f, d]
    assert lp["down_proj"][l, f, d] == t[w + "mlp.down_proj.weight"][d, f]
    np.testing.assert_array_equal(lp["mlp_norm"][l], t[w + "post_attention_layernorm.weight"])
    np.testing.assert_array_equal(params["lm_head"], t["lm_head.weight"].T)
    np.testing.assert_array_equal(params["embed"], t["model.embed_tokens.weight"])


def test_bfloat16_safetensors_load_exactly(tmp_path):
    t = _hf_tensors(dtype=jnp.bfloat16)
    cfg, params, _ = hf.load_hf(_write(tmp_path, _hf_config(torch_dtype="bfloat16"), t))
    assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"
    assert params["layers"]["o_proj"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["o_proj"][1]).view(np.uint16),
        t["model.layers.1.self_attn.o_proj.weight"].T.reshape(H, HD, D).view(np.uint16),
    )
    # A mixed checkpoint widens to float32, exactly.
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.float32)
    cfg, params, _ = hf.load_hf(_write(tmp_path, _hf_config(), t, name="mixed"))
    assert cfg.param_dtype == "float32"
    np.testing.assert_array_equal(params["embed"], t["model.embed_tokens.weight"].astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Export -> import
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, arch", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM")]
)
def test_export_then_import_is_exact(tmp_path, name, arch):
    cfg, params, tok = hf.load_hf(FIXTURES / name)
    hf.save_hf(tmp_path / "out", cfg, params, tok, arch)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    cfg2, params2, tok2 = hf.load_hf(tmp_path / "out")
    assert cfg2 == cfg
    assert tok2.tk.to_str() == tok.tk.to_str()
    _assert_trees_equal(params2, params)


def test_bfloat16_model_exports_and_imports_exactly(tmp_path):
    cfg, _, tok = hf.load_hf(FIXTURES / "qwen2")
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16")
    model = transformer.create_model(cfg, 3)
    hf.save_hf(tmp_path / "out", cfg, nnx.state(model), tok, "Qwen2ForCausalLM")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    cfg2, params2, _ = hf.load_hf(tmp_path / "out")
    assert cfg2 == cfg
    _assert_trees_equal(params2, nnx.to_pure_dict(nnx.state(model)))


def test_export_refuses_a_mismatched_architecture_or_tree(tmp_path):
    cfg, params, tok = hf.load_hf(FIXTURES / "qwen2")
    with pytest.raises(UserError, match="attention_bias=True cannot be exported as LlamaForCausalLM"):
        hf.save_hf(tmp_path / "a", cfg, params, tok, "LlamaForCausalLM")
    del params["layers"]["k_bias"]
    with pytest.raises(UserError, match="param 'layers.k_bias' is missing"):
        hf.save_hf(tmp_path / "b", cfg, params, tok, "Qwen2ForCausalLM")


# ----------------------------------------------------------------------------------------------
# import_hf: a run directory
# ----------------------------------------------------------------------------------------------


def test_import_hf_writes_a_run_dir_whose_params_restore_equal(tmp_path):
    run = hf.import_hf(FIXTURES / "qwen2", tmp_path / "run")
    cfg, params, tok = hf.load_hf(FIXTURES / "qwen2")
    assert load_config(run / "config.yaml").model == cfg
    assert (run / "tokenizer.json").read_text() == tok.tk.to_str(pretty=True)
    stored = policy.load_policy(run)  # what pretrain, generate and train read
    assert stored.cfg.model == cfg and stored.tokenizer.eos_id == tok.eos_id
    _assert_trees_equal(nnx.to_pure_dict(stored.params), params)
    with pytest.raises(UserError, match="already holds a run"):
        hf.import_hf(FIXTURES / "qwen2", run)


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------


def test_pickle_weights_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_hf_config()))
    shutil.copy(FIXTURES / "llama" / "tokenizer.json", d / "tokenizer.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*pickle weights are refused; convert to safetensors"):
        hf.load_hf(d)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="no weights found: expected model.safetensors"):
        hf.load_hf(d)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling .* is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type 'yarn'"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "rope_parameters.partial_rotary_factor"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"quantization_config": {"bits": 4}}, "field 'quantization_config' is not supported"),
        ({"sliding_window": 8}, "field 'sliding_window' is not supported for LlamaForCausalLM"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
        ({"model_type": "mistral"}, "model_type 'mistral' does not match"),
        ({"num_key_value_heads": 3}, "n_heads .* must be a multiple"),
        ({"hidden_size": "<drop>"}, "required field 'hidden_size' is missing"),
        ({"num_hidden_layers": 2.5}, "field 'num_hidden_layers' must be int"),
    ],
)
def test_unsupported_config_fields_fail_loudly_naming_the_field(tmp_path, overrides, match):
    d = _write(tmp_path, _hf_config(**overrides))
    with pytest.raises(UserError, match=match) as err:
        hf.load_hf(d)
    assert str(d / "config.json") in str(err.value)


def test_sliding_window_caps_the_context_only_when_active():
    def max_len(**overrides):
        return hf.model_config_from_hf(_hf_config(**overrides), Path("config.json"))[0].max_seq_len

    mistral = dict(architectures=["MistralForCausalLM"], model_type="mistral", max_position_embeddings=8192)
    assert max_len(**mistral, sliding_window=4096) == 4096
    assert max_len(**mistral) == 4096  # absent: HF Mistral's default window
    assert max_len(**mistral, sliding_window=None) == 8192
    qwen2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=8192, sliding_window=1024)
    assert max_len(**qwen2, use_sliding_window=False) == 8192
    assert max_len(**qwen2, use_sliding_window=True, max_window_layers=N) == 8192  # no layer slides
    assert max_len(**qwen2, use_sliding_window=True, max_window_layers=1) == 1024


def test_shape_mismatch_missing_and_spare_tensors_are_named(tmp_path):
    t = _hf_tensors()
    t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:4]
    shape_msg = r"tensor 'model.layers.1.self_attn.k_proj.weight' has shape \[4, 16\], but config.json implies \[8, 16\]"
    with pytest.raises(UserError, match=shape_msg):
        hf.load_hf(_write(tmp_path, tensors=t, name="shape"))
    t = _hf_tensors()
    del t["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(UserError, match="tensor 'model.layers.0.mlp.up_proj.weight' is missing"):
        hf.load_hf(_write(tmp_path, tensors=t, name="missing"))
    t = _hf_tensors()
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(D, np.float32)
    with pytest.raises(UserError, match="not used by a LlamaForCausalLM.*o_proj.bias"):
        hf.load_hf(_write(tmp_path, tensors=t, name="spare"))
    t = _hf_tensors()  # tied, but the checkpoint's lm_head is not the embedding
    with pytest.raises(UserError, match="lm_head.weight' differs from model.embed_tokens.weight"):
        hf.load_hf(_write(tmp_path, _hf_config(tie_word_embeddings=True), t, name="tied"))
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"].astype(np.int8)
    with pytest.raises(UserError, match="'model.embed_tokens.weight' has dtype I8"):
        hf.load_hf(_write(tmp_path, tensors=t, name="int8"))


def test_sharded_checkpoint_problems_name_the_shard(tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama", d)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="shard model-00002-of-00002.safetensors is missing"):
        hf.load_hf(d)
    (d / "config.json").unlink()
    with pytest.raises(UserError, match="cannot read .*config.json"):
        hf.load_hf(d)


def test_import_hf_cli_then_generate(tmp_path, capsys):
    from selfplay.cli import main

    run = tmp_path / "imported"
    assert main(["import-hf", str(FIXTURES / "llama"), str(run)]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["generate", "--run-dir", str(run), "--prompt", "hello", "actor.max_new_tokens=4", "actor.prompt_buckets=[16]"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["prompt"] == "hello" and isinstance(row["essay"], str)
    assert main(["import-hf", str(tmp_path / "nowhere"), str(tmp_path / "r2")]) == 2
    assert "nowhere" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Special ids from the checkpoint's own files
# ----------------------------------------------------------------------------------------------


def _bare_tokenizer(d):
    """A tokenizer.json with no token named like an EOS (nor a BOS): only the files can say which ids they are."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tk = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(V - 2)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|stop|>", "<|turn_end|>"])  # ids V-2, V-1
    tk.save(str(d / "tokenizer.json"))


def test_eos_from_config_json_int_even_without_a_known_eos_name(tmp_path):
    d = _write(tmp_path, _hf_config(bos_token_id=3, eos_token_id=V - 1))
    _bare_tokenizer(d)
    _, _, tok = hf.load_hf(d)
    assert tok.eos_ids == (V - 1,) and tok.eos_id == V - 1 and tok.bos_id == 3 and tok.pad_id == V - 1
    # Text decoding drops every EOS id, a plain word declared as one too (w5 is no special token).
    from types import SimpleNamespace

    from selfplay.actor import Generator
    from selfplay.types import Rollout

    (d / "config.json").write_text(json.dumps(_hf_config(bos_token_id=3, eos_token_id=[V - 1, 5])))
    _, _, tok = hf.load_hf(d)
    assert tok.eos_ids == (V - 1, 5)
    tokens = np.array([[3, 8, 7, 5, V - 1], [3, 8, 7, V - 1, 0]])
    mask = np.array([[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]], np.float32)
    rollout = Rollout(tokens_bl=tokens, prompt_len_b=np.array([2, 2]), completion_mask_bl=mask, logprobs_bl=mask, eos_b=np.ones(2, bool))
    assert Generator.completions(SimpleNamespace(policy=SimpleNamespace(tokenizer=tok)), rollout, 2) == ["w7", "w7"]

    (d / "config.json").write_text(json.dumps(_hf_config(bos_token_id=3)))  # no file gives one: one line naming the file
    with pytest.raises(UserError, match=rf"^{d / 'tokenizer.json'}: no eos token: none of generation_config.json, config.json, tokenizer_config.json") as err:
        hf.load_hf(d)
    assert "\n" not in str(err.value)


def test_eos_from_generation_config_list_and_tokenizer_config(tmp_path):
    d = _write(tmp_path, _hf_config(eos_token_id=2))  # the llama fixture's tokenizer: </s> = 2, <pad> = 3
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2], "pad_token_id": 3}))
    _, _, tok = hf.load_hf(d)
    assert tok.eos_ids == (5, 2) and tok.eos_id == 5 and tok.pad_id == 3
    assert tok.special_ids() == {"bos_token_id": 1, "eos_token_id": [5, 2], "pad_token_id": 3}
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}, "bos_token": None}))
    assert hf.load_hf(d)[2].eos_ids == (5, 2, 0)  # every file's EOS ends a row
    (d / "generation_config.json").unlink()
    (d / "config.json").write_text(json.dumps(_hf_config()))
    assert hf.load_hf(d)[2].eos_ids == (0,)  # tokenizer_config.json alone
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, V + 5]}))
    with pytest.raises(UserError, match=r"generation_config.json: eos_token_id must be a token id or a list of token ids below 96"):
        hf.load_hf(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(UserError, match=r"tokenizer_config.json: eos_token '<\|im_end\|>' is not a token of the tokenizer"):
        hf.load_hf(d)


INSTRUCT = FIXTURES / "qwen2_instruct"


def test_an_instruct_qwen2_stops_at_im_end_as_transformers_does(tmp_path):
    cfg, params, tok = hf.load_hf(INSTRUCT)
    im_end, endoftext = tok.tk.token_to_id("<|im_end|>"), tok.tk.token_to_id("<|endoftext|>")
    assert tok.eos_ids == (im_end, endoftext) == (2, 0)  # generation_config.json's list, as Qwen2.5-Instruct ships it
    ref = load_file(str(INSTRUCT / "reference_logits.safetensors"))
    valid = ref["attention_mask"].astype(bool)
    assert np.abs(_logits(cfg, params, ref) - ref["logits"])[valid].max() <= TOL

    from selfplay.actor import make_sampler, pad_prompts
    from selfplay.config import ActorConfig

    want = json.loads((INSTRUCT / "greedy.json").read_text())  # transformers' greedy generate(), stopped by <|im_end|>
    prompt = want["prompt"]
    actor = ActorConfig(greedy=True, samples_per_prompt=1, max_new_tokens=want["max_new_tokens"], prompt_buckets=(len(prompt),))
    graphdef, state = transformer.split(nnx.eval_shape(lambda: transformer.create_model(cfg, 0)))
    nnx.replace_by_pure_dict(state, params)
    tokens_bp, len_b, p = pad_prompts([prompt], actor.prompt_buckets, tok.pad_id)

    def completion(eos_ids):
        r, _ = make_sampler(cfg, actor, eos_ids=eos_ids, pad_id=tok.pad_id)(graphdef, state, tokens_bp, len_b, jax.random.key(0))
        n = int(np.asarray(r.completion_mask_bl).sum())
        return list(np.asarray(r.tokens_bl)[0, p : p + n]), bool(np.asarray(r.eos_b)[0])

    got, ended = completion(tok.eos_ids)
    assert got == want["completion"] and got[-1] == im_end and ended
    # The ids a name-guess would give (<|endoftext|>) keep writing past <|im_end|>.
    longer, _ = completion((endoftext,))
    assert len(longer) > len(got) and longer[: len(got)] == got


def test_import_keeps_the_special_ids_and_the_chat_template_in_the_run_dir(tmp_path):
    run = hf.import_hf(INSTRUCT, tmp_path / "run")
    assert policy.load_policy(run).tokenizer.eos_ids == (2, 0)  # what train, generate and export read
    gen = json.loads((run / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, [2, 0], 0)
    tc = json.loads((run / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>"
    assert tc["chat_template"] == (INSTRUCT / "chat_template.jinja").read_text()  # transformers 5 saves it apart
    assert json.loads((run / "hf_config.json").read_text()) == json.loads((INSTRUCT / "config.json").read_text())


def test_the_config_transformers_writes_for_smollm2_is_accepted():
    """tests/fixtures/smollm2/hf_config.json: what transformers 5.24 saved for SmolLM2-135M-Instruct read from GGUF
    (unk_token_id, use_cache, dtype, pretraining_tp, _model_name_or_path, ...): none of it changes the math."""
    path = Path(__file__).parent / "fixtures" / "smollm2" / "hf_config.json"
    raw = json.loads(path.read_text())
    assert {"unk_token_id", "use_cache", "pretraining_tp", "mlp_bias", "attention_bias"} <= set(raw)
    cfg, arch = hf.model_config_from_hf(raw, path)
    assert arch == "LlamaForCausalLM"
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (
        49152, 576, 30, 9, 3, 0, 1536)
    assert cfg.tie_embeddings and cfg.rope_theta == 1e5
    older = raw | {"output_attentions": False, "return_dict": True, "max_length": 20, "temperature": 1.0,
                   "sep_token_id": None, "is_decoder": False, "pruned_heads": {}, "hidden_dropout": 0.0}
    assert hf.model_config_from_hf(older, path)[0] == cfg
    for field, value in (("pruned_heads", {"0": [1]}), ("hidden_dropout", 0.1), ("add_cross_attention", True),
                         ("attention_dropout", False)):
        with pytest.raises(UserError, match=rf"{field}=.* is not supported for LlamaForCausalLM"):
            hf.model_config_from_hf(raw | {field: value}, path)


def test_import_splits_the_update_into_micro_batches_only_for_a_large_vocabulary():
    from selfplay.config import ActorConfig, LearnerConfig, ModelConfig
    from selfplay.models.hf.importer import UPDATE_LOGITS_BUDGET, fit_learner

    def model(vocab):
        return ModelConfig(vocab_size=vocab, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=8192)

    actor = ActorConfig()  # 16 x 4 rows of 128 + 128 tokens at most
    assert fit_learner(LearnerConfig(), actor, model(1024)) == LearnerConfig()
    big = fit_learner(LearnerConfig(), actor, model(49152))
    rows, width = 64, max(actor.prompt_buckets) + actor.max_new_tokens
    assert (big.minibatches, big.grad_accum) == (4, 4)  # one optimiser update a round, as before
    assert rows // big.minibatches * width * 49152 <= UPDATE_LOGITS_BUDGET < rows // 2 * width * 49152
    twice = fit_learner(LearnerConfig(epochs=2, minibatches=2, grad_accum=1), actor, model(49152))
    assert (twice.minibatches, twice.grad_accum) == (4, 2)  # 4 updates a round before and after
