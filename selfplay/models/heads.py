"""Scalar heads on a transformer trunk's hidden states: the reward model's head, and PPO's value head.

`ScalarHead` maps [..., d_model] -> [...] in float32; `last_valid_index` finds the column a sequence-level head reads.

Param tree (logical axis names in each Param's `out_sharding`, as in `transformer.py`):

    kernel   [embed]   ("embed",)
    bias     []        ()
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = ("embed",)


class ScalarHead(nnx.Module):
    """r = h . kernel + bias, computed in float32 whatever the trunk's compute dtype."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, std: float | None = None, param_dtype: Any = jnp.float32):
        # 1/sqrt(d) keeps the initial score of a unit-RMS hidden state at unit scale; smaller starts nearer 0.
        std = d_model**-0.5 if std is None else std
        kernel = std * jax.random.normal(rngs.params(), (d_model,), param_dtype)
        self.kernel = nnx.Param(kernel, out_sharding=("embed",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((), param_dtype), out_sharding=(), eager_sharding=False)

    def __call__(self, h_xd: jax.Array) -> jax.Array:
        h = h_xd.astype(jnp.float32)
        return jnp.einsum("...d,d->...", h, self.kernel[...].astype(jnp.float32)) + self.bias[...].astype(jnp.float32)


def last_valid_index(valid_bl: jax.Array) -> jax.Array:
    """int32 [B]: the last column where `valid_bl` is nonzero (0 for a row with none)."""
    l = valid_bl.shape[1]
    col_bl = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), valid_bl.shape)
    return jnp.max(jnp.where(valid_bl > 0, col_bl, 0), axis=1)


def gather_last(h_bld: jax.Array, valid_bl: jax.Array) -> jax.Array:
    """[B, d]: each row's hidden state at its last valid column."""
    idx_b = last_valid_index(valid_bl)
    return jnp.take_along_axis(h_bld, idx_b[:, None, None], axis=1)[:, 0]


class ValueModel(nnx.Module):
    """PPO's value function: a `Transformer` trunk + `ScalarHead` on every position.

    `values(tokens_bl, positions_bl, valid_bl)[:, t]` is V of the state before token t is emitted, read from the
    hidden state at t - 1 (so it sees tokens < t only), aligned like `Rollout.logprobs_bl`; column 0 is 0.
    """

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        from selfplay.models.transformer import Transformer

        self.trunk = Transformer(cfg, rngs=rngs)
        self.head = ScalarHead(cfg.d_model, rngs=rngs, std=0.0)

    def __call__(self, tokens_bl: jax.Array, positions_bl: jax.Array, valid_bl: jax.Array) -> jax.Array:
        h_bld, _ = self.trunk.hidden(tokens_bl, positions_bl, valid_bl)
        v_bl = self.head(h_bld)
        return jnp.concatenate([jnp.zeros_like(v_bl[:, :1]), v_bl[:, :-1]], axis=1)
