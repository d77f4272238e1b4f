"""The policy transformer: cached decoding equals a full forward, GQA / tied / bias variants, axis names, log-probs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selfplay.config import ModelConfig
from selfplay.models import transformer
from selfplay.models.transformer import LOGICAL_AXES

# f32 everywhere: cached and uncached attention differ only in summation order, so 1e-5 is ample on O(1) logits.
TOL = 1e-5
PAD = 0

GQA = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
    tie_embeddings=False, attention_bias=True,
)
MQA_TIED = dataclasses.replace(GQA, n_kv_heads=1, tie_embeddings=True, attention_bias=False)

fwd = jax.jit(transformer.forward)


def _model(cfg, seed=0, noise=0.2):
    """A model whose params are perturbed well away from init, so logits are O(1) and every weight matters."""
    graphdef, params = transformer.split(transformer.create_model(cfg, seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


def _left_padded(rng, lens, width, vocab):
    """tokens, valid, positions of rows left-padded to `width`, laid out like a Rollout."""
    lens = np.asarray(lens)
    col = np.arange(width)[None, :]
    start = width - lens[:, None]
    valid = col >= start
    tokens = np.where(valid, rng.integers(1, vocab, size=(len(lens), width)), PAD).astype(np.int32)
    positions = np.maximum(col - start, 0).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(positions)


def test_every_param_has_logical_axis_names_and_the_documented_layout():
    model = transformer.create_model(GQA, 0)
    flat, _ = jax.tree_util.tree_flatten_with_path(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))
    found = {}
    for path, var in flat:
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        assert isinstance(var, nnx.Param), name
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim, (name, axes)
        assert set(axes) <= set(LOGICAL_AXES) and len(set(axes)) == len(axes), (name, axes)
        found[name] = (var[...].shape, tuple(axes))
    n, d, h, k, hd, f, v = 2, 32, 4, 2, 8, 64, 64
    assert found == {
        "embed": ((v, d), ("vocab", "embed")),
        "layers.attn_norm": ((n, d), ("layers", "norm")),
        "layers.q_proj": ((n, d, h, hd), ("layers", "embed", "heads", "head_dim")),
        "layers.k_proj": ((n, d, k, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "layers.v_proj": ((n, d, k, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "layers.q_bias": ((n, h, hd), ("layers", "heads", "head_dim")),
        "layers.k_bias": ((n, k, hd), ("layers", "kv_heads", "head_dim")),
        "layers.v_bias": ((n, k, hd), ("layers", "kv_heads", "head_dim")),
        "layers.o_proj": ((n, h, hd, d), ("layers", "heads", "head_dim", "embed")),
        "layers.mlp_norm": ((n, d), ("layers", "norm")),
        "layers.gate_proj": ((n, d, f), ("layers", "embed", "mlp")),
        "layers.up_proj": ((n, d, f), ("layers", "embed", "mlp")),
        "layers.down_proj": ((n, f, d), ("layers", "mlp", "embed")),
        "final_norm": ((d,), ("norm",)),
        "lm_head": ((d, v), ("embed", "vocab")),
    }
    tied = nnx.to_pure_dict(nnx.state(transformer.create_model(MQA_TIED, 0)))
    assert "lm_head" not in tied and "q_bias" not in tied["layers"]
    # The names are usable as partition specs once a sharding config maps them onto mesh axes.
    specs = nnx.get_partition_spec(nnx.state(model))
    assert nnx.to_pure_dict(specs)["layers"]["q_proj"] == jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")


def _numpy_reference(cfg, params, tokens, positions, valid):
    """A plain per-head float64 Llama/Qwen2 forward (HF conventions: rotate_half RoPE, repeat_kv grouping)."""
    w = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(params))
    hd, group = cfg.resolved_head_dim, cfg.n_heads // cfg.n_kv_heads
    inv_freq = cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)

    def norm(x, scale):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale

    def rope(x, pos):  # x [T, hd]
        ang = pos[:, None] * inv_freq[None, :]
        cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
        rotated = np.concatenate([-x[:, hd // 2 :], x[:, : hd // 2]], -1)
        return x * cos + rotated * sin

    out = []
    for tok, pos, val in zip(np.asarray(tokens), np.asarray(positions), np.asarray(valid)):
        t = len(tok)
        allowed = np.tril(np.ones((t, t), bool)) & val[None, :]
        h = w["embed"][tok]
        for i in range(cfg.n_layers):
            lw = {k: v[i] for k, v in w["layers"].items()}
            x = norm(h, lw["attn_norm"])
            attn = np.zeros((t, cfg.n_heads, hd))
            for head in range(cfg.n_heads):
                kv = head // group
                q = rope(x @ lw["q_proj"][:, head] + lw.get("q_bias", np.zeros((cfg.n_heads, hd)))[head], pos)
                k = rope(x @ lw["k_proj"][:, kv] + lw.get("k_bias", np.zeros((cfg.n_kv_heads, hd)))[kv], pos)
                v = x @ lw["v_proj"][:, kv] + lw.get("v_bias", np.zeros((cfg.n_kv_heads, hd)))[kv]
                scores = np.where(allowed, q @ k.T / np.sqrt(hd), -np.inf)
                for r in range(t):
                    if allowed[r].any():
                        p = np.exp(scores[r] - scores[r].max())
                        attn[r, head] = (p / p.sum()) @ v
            h = h + np.einsum("thk,hkd->td", attn, lw["o_proj"])
            x = norm(h, lw["mlp_norm"])
            gate = x @ lw["gate_proj"]
            h = h + (gate / (1 + np.exp(-gate)) * (x @ lw["up_proj"])) @ lw["down_proj"]
        h = norm(h, w["final_norm"])
        out.append(h @ (w["embed"].T if cfg.tie_embeddings else w["lm_head"]))
    return np.stack(out)


@pytest.mark.parametrize("cfg", [GQA, MQA_TIED], ids=["gqa_bias_untied", "mqa_tied"])
def test_forward_matches_a_plain_numpy_reference(cfg):
    graphdef, params = _model(cfg)
    tokens, valid, positions = _left_padded(np.random.default_rng(6), [10, 6, 1], 10, cfg.vocab_size)
    logits, _ = fwd(graphdef, params, tokens, positions, valid)
    want = _numpy_reference(cfg, params, tokens, positions, valid)
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(logits)[v], want[v], atol=1e-4, rtol=1e-4)  # f32 model vs f64 reference


@pytest.mark.parametrize("cfg", [GQA, MQA_TIED], ids=["gqa_bias_untied", "mqa_tied"])
def test_cached_decoding_matches_full_forward_at_every_step(cfg):
    graphdef, params = _model(cfg)
    # Rows of prompt length 6, 3 and 1 left-padded to P=6, then 4 more tokens decoded one at a time.
    p, new = 6, 4
    tokens, valid, positions = _left_padded(np.random.default_rng(0), [p + new, 3 + new, 1 + new], p + new, cfg.vocab_size)
    full, _ = fwd(graphdef, params, tokens, positions, valid)

    cache = transformer.init_cache(cfg, 3, p + new)
    got = []
    # The prompt in two chunks of 3 (the second chunk attends to the first through the cache), then one by one.
    for lo, hi in [(0, 3), (3, 6)] + [(c, c + 1) for c in range(p, p + new)]:
        logits, cache = fwd(graphdef, params, tokens[:, lo:hi], positions[:, lo:hi], valid[:, lo:hi], cache=cache, cache_index=lo)
        got.append(logits)
    got = jnp.concatenate(got, axis=1)

    assert bool(jnp.all(jnp.isfinite(got)))
    assert float(jnp.abs(full).max()) > 1.0  # logits are O(1), so the tolerance below means something
    np.testing.assert_allclose(np.where(valid[..., None], got, 0), np.where(valid[..., None], full, 0), atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(np.asarray(cache.valid_bs), np.asarray(valid))


def test_left_padding_and_positions_do_not_change_a_row():
    graphdef, params = _model(GQA)
    tokens, valid, positions = _left_padded(np.random.default_rng(1), [10, 6, 1], 10, GQA.vocab_size)
    base = tokens[0]
    tokens = tokens.at[1, 4:].set(base[:6]).at[2, 9:].set(base[:1])
    logits, _ = fwd(graphdef, params, tokens, positions, valid)
    np.testing.assert_allclose(logits[1, 4:], logits[0, :6], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(logits[2, 9:], logits[0, :1], atol=TOL, rtol=TOL)


def test_gqa_equals_multi_head_attention_with_each_kv_head_repeated_per_group():
    graphdef, params = _model(GQA)
    mha_cfg = dataclasses.replace(GQA, n_kv_heads=GQA.n_heads)
    mha_graphdef, mha_params = transformer.split(transformer.create_model(mha_cfg, 0))
    d = nnx.to_pure_dict(params)
    group = GQA.n_heads // GQA.n_kv_heads
    for name in ("k_proj", "v_proj"):
        d["layers"][name] = jnp.repeat(d["layers"][name], group, axis=2)
    for name in ("k_bias", "v_bias"):
        d["layers"][name] = jnp.repeat(d["layers"][name], group, axis=1)
    nnx.replace_by_pure_dict(mha_params, d)

    tokens, valid, positions = _left_padded(np.random.default_rng(2), [10, 6, 1], 10, GQA.vocab_size)
    gqa_logits, _ = fwd(graphdef, params, tokens, positions, valid)
    mha_logits, _ = fwd(mha_graphdef, mha_params, tokens, positions, valid)
    np.testing.assert_allclose(np.asarray(gqa_logits)[np.asarray(valid)], np.asarray(mha_logits)[np.asarray(valid)], atol=TOL, rtol=TOL)


def test_tied_head_is_the_embedding_and_attention_bias_is_applied():
    untied_cfg = dataclasses.replace(MQA_TIED, tie_embeddings=False, attention_bias=True)
    graphdef, params = _model(MQA_TIED)
    u_graphdef, u_params = transformer.split(transformer.create_model(untied_cfg, 0))
    d = nnx.to_pure_dict(params)
    d["lm_head"] = d["embed"].T
    for name in ("q_bias", "k_bias", "v_bias"):
        d["layers"][name] = jnp.zeros_like(u_params["layers"][name][...])
    nnx.replace_by_pure_dict(u_params, d)

    tokens, valid, positions = _left_padded(np.random.default_rng(3), [6, 4], 6, MQA_TIED.vocab_size)
    tied_logits, _ = fwd(graphdef, params, tokens, positions, valid)
    untied_logits, _ = fwd(u_graphdef, u_params, tokens, positions, valid)
    np.testing.assert_allclose(untied_logits, tied_logits, atol=TOL, rtol=TOL)

    for name in ("q_bias", "k_bias", "v_bias"):
        biased = jax.tree.map(lambda x: x, u_params)
        biased["layers"][name][...] = jnp.full_like(biased["layers"][name][...], 0.5)
        biased_logits, _ = fwd(u_graphdef, biased, tokens, positions, valid)
        assert float(jnp.abs(biased_logits - untied_logits).max()) > 1e-2, name


def test_token_logprobs_are_aligned_like_rollout_logprobs():
    graphdef, params = _model(GQA)
    tokens, valid, positions = _left_padded(np.random.default_rng(4), [10, 6, 1], 10, GQA.vocab_size)
    lp, ent = jax.jit(transformer.token_logprobs)(graphdef, params, tokens, positions, valid)
    logits, _ = fwd(graphdef, params, tokens, positions, valid)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    want_lp, want_ent = np.zeros((3, 10)), np.zeros((3, 10))
    for b in range(3):
        for t in range(1, 10):
            if valid[b, t] and valid[b, t - 1]:
                want_lp[b, t] = logp[b, t - 1, tokens[b, t]]
                want_ent[b, t] = -(np.exp(logp[b, t - 1]) * logp[b, t - 1]).sum()
    np.testing.assert_allclose(lp, want_lp, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(ent, want_ent, atol=TOL, rtol=TOL)
    # Column 0, padding and each row's first real token (no context) get 0; everything else is a real log-prob.
    assert np.all(np.asarray(lp)[:, 0] == 0) and np.all(np.asarray(lp)[~valid] == 0)
    assert np.asarray(lp)[1, 4] == 0 and np.all(np.asarray(lp)[1, 5:] < 0)


def test_bfloat16_compute_keeps_float32_logits_and_exposes_hidden_states():
    bf16 = dataclasses.replace(GQA, compute_dtype="bfloat16")
    graphdef, params = _model(GQA)
    bf16_graphdef, _ = transformer.split(transformer.create_model(bf16, 0))
    tokens, valid, positions = _left_padded(np.random.default_rng(5), [6, 3], 6, GQA.vocab_size)

    @jax.jit
    def run(params, tokens, positions, valid):
        model = transformer.merge(bf16_graphdef, params)
        hidden, _ = model.hidden(tokens, positions, valid)
        logits, _ = model(tokens, positions, valid)
        return hidden, model.logits(hidden), logits

    hidden, from_hidden, logits = run(params, tokens, positions, valid)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (2, 6, GQA.d_model)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(from_hidden, logits)
    f32_logits, _ = fwd(graphdef, params, tokens, positions, valid)
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(logits)[v], np.asarray(f32_logits)[v], atol=0.15, rtol=0.05)


def test_packed_segments_equal_separate_rows():
    """Two sequences packed into one row (segment ids, positions restarting) give each its own log-probs."""
    cfg = GQA
    graphdef, params = _model(cfg)
    rng = np.random.default_rng(3)
    a, b = rng.integers(1, cfg.vocab_size, 7), rng.integers(1, cfg.vocab_size, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    lp_packed, _ = transformer.token_logprobs(graphdef, params, jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg > 0), jnp.asarray(seg))
    for seq, start in ((a, 0), (b, 7)):
        n = len(seq)
        lp, _ = transformer.token_logprobs(graphdef, params, jnp.asarray(seq[None]), jnp.arange(n)[None], jnp.ones((1, n), bool))
        np.testing.assert_allclose(np.asarray(lp_packed[0, start : start + n]), np.asarray(lp[0]), atol=1e-5)
    assert float(lp_packed[0, 7]) == 0.0  # a segment's first token has no context


def test_rows_matmul_is_the_einsum_with_its_gradients():
    """The 2-D matmuls over B*T rows (faster backward on CPU) give the 3-D einsums' numbers: exactly for the MLP's
    [D, F] weights, to float32 rounding for the attention's [D, heads, head_dim] and [heads, head_dim, D] ones."""
    from selfplay.models.transformer import _rows_matmul

    kx, kw, kq, ko = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (3, 7, 16))
    cases = [
        (x, jax.random.normal(kw, (16, 24)), "btd,df->btf", True),
        (x, jax.random.normal(kq, (16, 4, 6)), "btd,dhk->bthk", False),
        (x.reshape(3, 7, 4, 4), jax.random.normal(ko, (4, 4, 10)), "bthk,hkd->btd", False),
    ]
    for xi, w, spec, exact in cases:

        def via(f, xi=xi, w=w):
            return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w))), argnums=(0, 1)))(xi, w)

        rows = via(_rows_matmul)
        einsum = via(lambda x, w, spec=spec: jnp.einsum(spec, x, w))
        assert _rows_matmul(xi, w).shape == jnp.einsum(spec, xi, w).shape
        for a, b in zip(jax.tree.leaves(rows), jax.tree.leaves(einsum)):
            if exact:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
