"""The decoder-only policy LM (RMSNorm, RoPE, SwiGLU, GQA) in Flax NNX, its KV cache, and teacher-forced log-probs.

`token_logprobs` is the one place where teacher-forced log pi(token | prefix) is computed (learner, reference).

Param tree (paths as in `nnx.state(model)` / `nnx.to_pure_dict`), stacked over layers, with logical axis names:

    embed                  [vocab, embed]                       ("vocab", "embed")
    layers.attn_norm       [layers, embed]                      ("layers", "norm")
    layers.q_proj          [layers, embed, heads, head_dim]     ("layers", "embed", "heads", "head_dim")
    layers.k_proj          [layers, embed, kv_heads, head_dim]  ("layers", "embed", "kv_heads", "head_dim")
    layers.v_proj          [layers, embed, kv_heads, head_dim]  ("layers", "embed", "kv_heads", "head_dim")
    layers.q_bias          [layers, heads, head_dim]            only with attention_bias (Qwen2)
    layers.k_bias          [layers, kv_heads, head_dim]         only with attention_bias
    layers.v_bias          [layers, kv_heads, head_dim]         only with attention_bias
    layers.o_proj          [layers, heads, head_dim, embed]     ("layers", "heads", "head_dim", "embed")
    layers.mlp_norm        [layers, embed]                      ("layers", "norm")
    layers.gate_proj       [layers, embed, mlp]                 ("layers", "embed", "mlp")
    layers.up_proj         [layers, embed, mlp]                 ("layers", "embed", "mlp")
    layers.down_proj       [layers, mlp, embed]                 ("layers", "mlp", "embed")
    final_norm             [embed]                              ("norm",)
    lm_head                [embed, vocab]                       ("embed", "vocab"); absent when tie_embeddings

Mapping from a Hugging Face Llama/Qwen2 checkpoint (torch Linear weights are [out, in]):
    q_proj[i] = W_q.T.reshape(embed, heads, head_dim)   (k, v alike with kv_heads; biases reshape(heads, head_dim))
    o_proj[i] = W_o.T.reshape(heads, head_dim, embed)
    gate/up[i] = W.T, down[i] = W_down.T, norms = weight (y = x / rms(x) * weight), lm_head = W_lm.T
RoPE uses the HF "rotate_half" convention (first half of head_dim paired with the second half) and query head h uses
kv head h // (heads // kv_heads) (HF `repeat_kv`), so HF weights need no permutation.

Logical names live in each Param's `out_sharding` metadata (no eager placement, so no mesh is needed to build a
model); sharding code maps them onto a mesh with `nnx.get_partition_spec` under logical axis rules.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from selfplay.config import ModelConfig

LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class KVCache(NamedTuple):
    """Keys and values of every layer, one slot per buffer column; all rows share the slot index.

    k_bgsd    tuple, one per layer, of [B, kv_heads, S, head_dim]  rotated keys
    v_bgsd    tuple, one per layer, of [B, kv_heads, S, head_dim]
    valid_bs  bool [B, S]        the slot holds a real token (padding and unwritten slots: False)

    One array per layer, head-major (slots second to last): a decode step writes its new slot into each in place and
    the attention's batched dots read them as they lie ([B, kv_heads] batch, [S, head_dim] matrix). With one stacked
    [layers, B, S, kv_heads, head_dim] array XLA's CPU backend copied every layer's whole K and V on every step, to
    re-lay them out and to slice the layer (benchmarks/RESULTS.md).
    """

    k_bgsd: tuple[jax.Array, ...]
    v_bgsd: tuple[jax.Array, ...]
    valid_bs: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache of `max_len` slots (default dtype: the compute dtype)."""
    dtype = _DTYPES[cfg.compute_dtype] if dtype is None else dtype
    shape = (batch, cfg.n_kv_heads, max_len, cfg.resolved_head_dim)
    layers = range(cfg.n_layers)
    return KVCache(
        tuple(jnp.zeros(shape, dtype) for _ in layers),
        tuple(jnp.zeros(shape, dtype) for _ in layers),
        jnp.zeros((batch, max_len), bool),
    )


def _param(key: jax.Array, shape: tuple[int, ...], axes: tuple[str, ...], std: float | None, dtype: Any) -> nnx.Param:
    """A Param drawn from N(0, std^2) (std None: ones), tagged with its logical axis names."""
    assert len(axes) == len(shape), (shape, axes)
    value = jnp.ones(shape, dtype) if std is None else std * jax.random.normal(key, shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Layers(nnx.Module):
    """All decoder blocks, each parameter stacked along a leading `layers` axis and run with one `lax.scan`."""

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        n, d, h, k, hd, f = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
        dt = _DTYPES[cfg.param_dtype]
        ks = iter(jax.random.split(key, 9))
        std = 0.02
        out_std = std / math.sqrt(2 * n)  # GPT-2 style: residual-branch outputs shrink with depth
        self.attn_norm = _param(next(ks), (n, d), ("layers", "norm"), None, dt)
        self.q_proj = _param(next(ks), (n, d, h, hd), ("layers", "embed", "heads", "head_dim"), std, dt)
        self.k_proj = _param(next(ks), (n, d, k, hd), ("layers", "embed", "kv_heads", "head_dim"), std, dt)
        self.v_proj = _param(next(ks), (n, d, k, hd), ("layers", "embed", "kv_heads", "head_dim"), std, dt)
        if cfg.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h, hd), dt), out_sharding=("layers", "heads", "head_dim"), eager_sharding=False)
            self.k_bias = nnx.Param(jnp.zeros((n, k, hd), dt), out_sharding=("layers", "kv_heads", "head_dim"), eager_sharding=False)
            self.v_bias = nnx.Param(jnp.zeros((n, k, hd), dt), out_sharding=("layers", "kv_heads", "head_dim"), eager_sharding=False)
        self.o_proj = _param(next(ks), (n, h, hd, d), ("layers", "heads", "head_dim", "embed"), out_std, dt)
        self.mlp_norm = _param(next(ks), (n, d), ("layers", "norm"), None, dt)
        self.gate_proj = _param(next(ks), (n, d, f), ("layers", "embed", "mlp"), std, dt)
        self.up_proj = _param(next(ks), (n, d, f), ("layers", "embed", "mlp"), std, dt)
        self.down_proj = _param(next(ks), (n, f, d), ("layers", "mlp", "embed"), out_std, dt)

    def arrays(self) -> dict[str, jax.Array]:
        return {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Param)}


def _rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, T, *in] @ w [*in, *out] -> [B, T, *out] as one 2-D matmul [B*T, prod(in)] @ [prod(in), prod(out)], where
    `in` is x's trailing dims after (B, T) (the model dim, or heads x head_dim for o_proj). XLA's CPU backend runs the
    backward's weight-gradient dots of the 3-D einsum form with transposes around them, 2.5x slower (benchmarks/RESULTS.md).
    The same math as the einsum; not always the same bits (the summation order of a dot may differ)."""
    b, t, *din = x.shape
    k = math.prod(din)
    dout = w.shape[len(din):]
    return jnp.matmul(x.reshape(b * t, k), w.reshape(k, math.prod(dout))).reshape(b, t, *dout)


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens_bt, positions_bt, valid_bt, cache=, cache_index=) -> (logits_btv, cache)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = _DTYPES[cfg.param_dtype]
        self.embed = _param(rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 0.02, dt)
        self.layers = Layers(cfg, rngs.params())
        self.final_norm = _param(rngs.params(), (cfg.d_model,), ("norm",), None, dt)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 0.02, dt)

    def hidden(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        valid_bt: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        segment_ids_bt: jax.Array | None = None,
        layer_weights: list[dict[str, jax.Array]] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states (after the final norm, compute dtype) [B, T, d_model] and the updated cache.

        positions_bt: RoPE position of each token (0 at a row's first real token).
        valid_bt: which of the T tokens are real (keys other tokens may attend to); None: all.
        Without a cache: causal attention among the T tokens, masked to valid keys.
        With a cache: the T tokens are written to slots cache_index..cache_index+T (the same for every row) and
        each attends causally to the valid slots up to its own.
        segment_ids_bt: packed rows (no cache): a token attends only to tokens of its own segment.
        layer_weights: with a cache, `self.layer_weights()` taken once outside a decode loop, so the loop does not
        slice every layer's weights out of the stacked arrays on every step (XLA's CPU backend copies them); None:
        sliced here.
        """
        cfg = self.cfg
        cdt = _DTYPES[cfg.compute_dtype]
        b, t = tokens_bt.shape
        valid_bt = jnp.ones((b, t), bool) if valid_bt is None else valid_bt.astype(bool)
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(cdt)
        sin_btk, cos_btk = _rope_tables(positions_bt, cfg.resolved_head_dim, cfg.rope_theta)

        if cache is None:
            key_valid_bs = valid_bt
            q_slot_t = jnp.arange(t)
        else:
            assert cache_index is not None, "a cache needs a cache_index"
            cache_index = jnp.asarray(cache_index, jnp.int32)
            key_valid_bs = jax.lax.dynamic_update_slice(cache.valid_bs, valid_bt, (0, cache_index))
            q_slot_t = cache_index + jnp.arange(t)
        s = key_valid_bs.shape[1]
        mask_bts = key_valid_bs[:, None, :] & (jnp.arange(s)[None, None, :] <= q_slot_t[None, :, None])
        if segment_ids_bt is not None:
            assert cache is None, "packed segments are for training forwards, not the cache"
            mask_bts = mask_bts & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])

        def block(h_btd, p, k_cache, v_cache):
            """One decoder block; with a layer's cache [B, kv_heads, S, head_dim] (else None) it writes its slots."""
            p = {name: w.astype(cdt) for name, w in p.items()}
            x = _rms_norm(h_btd, p["attn_norm"], cfg.norm_eps)
            q, k, v = (_rows_matmul(x, p[name]) for name in ("q_proj", "k_proj", "v_proj"))
            if cfg.attention_bias:
                q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
            q, k = _rope(q, sin_btk, cos_btk), _rope(k, sin_btk, cos_btk)
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv_heads, T, head_dim]
            if k_cache is None:
                keys, values = k, v
            else:
                start = (0, 0, cache_index, 0)
                k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
                v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
                keys, values = k_cache.astype(cdt), v_cache.astype(cdt)
            attn = _attention(q, keys, values, mask_bts)
            h_btd = h_btd + _rows_matmul(attn, p["o_proj"])
            x = _rms_norm(h_btd, p["mlp_norm"], cfg.norm_eps)
            gate = jax.nn.silu(_rows_matmul(x, p["gate_proj"]))
            h_btd = h_btd + _rows_matmul(gate * _rows_matmul(x, p["up_proj"]), p["down_proj"])
            return h_btd, k_cache, v_cache

        if cache is None:  # training and scoring forwards: one scan over the stacked layers
            h_btd, _ = jax.lax.scan(lambda h, p: (block(h, p, None, None)[0], None), x_btd, self.layers.arrays())
            new_cache = None
        else:
            # With a cache the layers are unrolled: each layer's K/V is an array of its own, written in place and read
            # as it lies, and each layer's weights a slice a decode loop can take once (`layer_weights`).
            ks, vs = [], []
            h_btd = x_btd
            layer_weights = self.layer_weights() if layer_weights is None else layer_weights
            for i in range(cfg.n_layers):
                h_btd, k_i, v_i = block(h_btd, layer_weights[i], cache.k_bgsd[i], cache.v_bgsd[i])
                ks.append(k_i)
                vs.append(v_i)
            new_cache = KVCache(tuple(ks), tuple(vs), key_valid_bs)
        h_btd = _rms_norm(h_btd, self.final_norm[...].astype(cdt), cfg.norm_eps)
        return h_btd, new_cache

    def layer_weights(self) -> list[dict[str, jax.Array]]:
        """Each layer's weights sliced out of the stacked arrays (for `hidden(layer_weights=...)`)."""
        stacked = self.layers.arrays()
        return [{name: w[i] for name, w in stacked.items()} for i in range(self.cfg.n_layers)]

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """LM head in float32 [B, T, vocab]."""
        cdt = h_btd.dtype
        if self.cfg.tie_embeddings:
            return jnp.einsum("btd,vd->btv", h_btd, self.embed[...].astype(cdt), preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", h_btd, self.lm_head[...].astype(cdt), preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        valid_bt: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        segment_ids_bt: jax.Array | None = None,
        layer_weights: list[dict[str, jax.Array]] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        h_btd, cache = self.hidden(
            tokens_bt, positions_bt, valid_bt, cache=cache, cache_index=cache_index, segment_ids_bt=segment_ids_bt,
            layer_weights=layer_weights,
        )
        return self.logits(h_btd), cache


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _rope_tables(positions_bt: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    inv_freq_k = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angle_btk = positions_bt.astype(jnp.float32)[..., None] * inv_freq_k
    return jnp.sin(angle_btk), jnp.cos(angle_btk)


def _rope(x_bthk: jax.Array, sin_btk: jax.Array, cos_btk: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + head_dim/2) by position * inv_freq_i (HF rotate_half), computed in float32."""
    x = x_bthk.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    sin, cos = sin_btk[:, :, None, :], cos_btk[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_bthk.dtype)


def _attention(q_bthk: jax.Array, k_bgsk: jax.Array, v_bgsk: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """Grouped-query attention; scores and softmax in float32. Query head h reads kv head h // group.
    Keys and values head-major [B, kv_heads, S, head_dim] (the KV cache's layout)."""
    b, t, h, hd = q_bthk.shape
    g = k_bgsk.shape[1]
    q = q_bthk.reshape(b, t, g, h // g, hd)
    scores = jnp.einsum("btgrk,bgsk->bgrts", q, k_bgsk, preferred_element_type=jnp.float32) / math.sqrt(hd)
    # A finite fill keeps rows with no valid key (padding queries) finite; their outputs are never used.
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bgsk.dtype)
    out = jnp.einsum("bgrts,bgsk->btgrk", probs, v_bgsk)
    return out.reshape(b, t, h, hd)


# ----------------------------------------------------------------------------------------------
# Functional core: build eagerly, split once, merge inside jitted code.
# ----------------------------------------------------------------------------------------------


def create_model(cfg: ModelConfig, rng: jax.Array | int) -> Transformer:
    """A freshly initialised model (eager; wrap in `nnx.eval_shape` for shapes only)."""
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    return Transformer(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStructs for weights (nothing allocated): restore targets, shardings."""
    return nnx.eval_shape(lambda: create_model(cfg, 0))


def split(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): graphdef is static (a pytree without leaves), params the nnx.State of Params."""
    return nnx.split(model)


def merge(graphdef: nnx.GraphDef, params: nnx.State) -> Transformer:
    return nnx.merge(graphdef, params)


def forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_bt: jax.Array,
    positions_bt: jax.Array,
    valid_bt: jax.Array | None = None,
    *,
    cache: KVCache | None = None,
    cache_index: jax.Array | int | None = None,
    segment_ids_bt: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Pure forward for jitted code: (float32 logits_btv, new cache or None)."""
    return merge(graphdef, params)(
        tokens_bt, positions_bt, valid_bt, cache=cache, cache_index=cache_index, segment_ids_bt=segment_ids_bt
    )


def token_logprobs(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_bl: jax.Array,
    positions_bl: jax.Array,
    valid_bl: jax.Array,
    segment_ids_bl: jax.Array | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced log pi(tokens_bl[:, t] | tokens_bl[:, <t]) and the entropy of that predictive distribution.

    The plain policy (no truncation) at `temperature` (the logits divided by it; 1: the model's own distribution,
    learner.temperature_in_loss: the sampler's), aligned like `Rollout.logprobs_bl`: entry t is predicted
    from the logits at t-1. Entries are 0 at column 0, where token t is padding, and where token t-1 is padding
    (a left-padded row's first token has no context), or, in packed rows (`segment_ids_bl`), where token t
    starts a new segment. Float32 [B, L] each.
    """
    logits_blv, _ = forward(graphdef, params, tokens_bl, positions_bl, valid_bl, segment_ids_bt=segment_ids_bl)
    if temperature != 1.0:
        logits_blv = logits_blv / temperature
    logp_blv = jax.nn.log_softmax(logits_blv[:, :-1], axis=-1)
    target_bl = tokens_bl[:, 1:]
    # A masked sum, not take_along_axis: the same numbers, and its gradient is an elementwise select rather than a
    # scatter into a zeroed [B, L, vocab] buffer.
    vocab_v = jnp.arange(logp_blv.shape[-1], dtype=target_bl.dtype)
    lp_bl = jnp.sum(jnp.where(target_bl[..., None] == vocab_v, logp_blv, 0.0), axis=-1)
    ent_bl = -jnp.sum(jnp.exp(logp_blv) * logp_blv, axis=-1)
    valid = valid_bl.astype(bool)
    keep_bl = valid[:, 1:] & valid[:, :-1]
    if segment_ids_bl is not None:
        keep_bl = keep_bl & (segment_ids_bl[:, 1:] == segment_ids_bl[:, :-1])
    pad_b1 = jnp.zeros((tokens_bl.shape[0], 1), jnp.float32)
    lp_bl = jnp.concatenate([pad_b1, jnp.where(keep_bl, lp_bl, 0.0)], axis=1)
    ent_bl = jnp.concatenate([pad_b1, jnp.where(keep_bl, ent_bl, 0.0)], axis=1)
    return lp_bl, ent_bl
