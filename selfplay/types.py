"""Pytrees that cross module borders: Rollout, PtxRows, Scores.

Names carry their shapes: b batch, l buffer length (prompt bucket P + max_new_tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Rollout(NamedTuple):
    """What the actor wrote, in one fixed-size buffer per row.

    Layout: prompts are LEFT-padded to a bucket width P, so every completion starts at column P;
    row b's prompt occupies columns [P - prompt_len_b[b], P). Completion tokens follow from column P;
    after EOS (or `max_new_tokens`) the row holds the pad id.

    tokens_bl           int32 [B, L]   prompt and completion tokens, pad elsewhere
    prompt_len_b        int32 [B]      true prompt length of each row (without padding)
    completion_mask_bl  float32 [B, L] 1.0 on generated tokens (the EOS token included), else 0
    logprobs_bl         float32 [B, L] sampling-time log pi(token_t | tokens_<t) on completion tokens, else 0
    eos_b               bool [B]       the row ended with EOS (False: cut by max_new_tokens)
    """

    tokens_bl: jax.Array
    prompt_len_b: jax.Array
    completion_mask_bl: jax.Array
    logprobs_bl: jax.Array
    eos_b: jax.Array

    def valid_mask_bl(self, prompt_width: int) -> jax.Array:
        """1 where the buffer holds a real token (prompt or completion), 0 on padding."""
        l = self.tokens_bl.shape[1]
        col_l = jnp.arange(l)[None, :]
        in_prompt = (col_l >= prompt_width - self.prompt_len_b[:, None]) & (col_l < prompt_width)
        return (in_prompt | (self.completion_mask_bl > 0)).astype(jnp.float32)

    def positions_bl(self, prompt_width: int) -> jax.Array:
        """RoPE positions: 0 at each row's first prompt token, counting up; padding before it gets 0."""
        l = self.tokens_bl.shape[1]
        col_l = jnp.arange(l)[None, :]
        return jnp.maximum(col_l - (prompt_width - self.prompt_len_b[:, None]), 0).astype(jnp.int32)

    def completion_len_b(self) -> jax.Array:
        return self.completion_mask_bl.sum(axis=1).astype(jnp.int32)


class Scores(NamedTuple):
    """What the critic said about a batch of rollouts.

    rewards_b   float32 [B]     the combined (and, if configured, normalised) reward
    members_kb  float32 [K, B]  each ensemble member's raw score (K = 1 without an ensemble)
    """

    rewards_b: jax.Array
    members_kb: jax.Array


class PtxRows(NamedTuple):
    """Human-written examples for the learner's pretraining-data term (learner.ptx_coef): one
    `[bos] prompt [sep] essay [eos]` per row, right-padded to a fixed width.

    tokens_bl      int32 [B, L]
    positions_bl   int32 [B, L]    0.. from each row's first token
    valid_bl       float32 [B, L]  1 on real tokens, 0 on padding
    loss_mask_bl   float32 [B, L]  1 on the tokens the next-token loss counts (essay and EOS)
    """

    tokens_bl: jax.Array
    positions_bl: jax.Array
    valid_bl: jax.Array
    loss_mask_bl: jax.Array
