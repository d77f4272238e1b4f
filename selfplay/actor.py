"""The actor: the jitted sampler (one prefill of the prompts shared by their G samples, then a `lax.while_loop`
decode) and the `Generator` that feeds it text prompts and decodes what it wrote.

Also owns host-side prompt bucketing (`pad_prompts`) and the temperature / top-k / top-p / greedy token choice.

Sampling-time log-probs (`Rollout.logprobs_bl`) are log q(token) under the distribution actually sampled from:
softmax(logits / temperature) restricted to the top-k, then to the top-p nucleus, renormalised. They equal the
policy's log-probs only at temperature 1 without truncation; the learner gets the plain policy log-prob from
`selfplay.models.transformer.token_logprobs`. Greedy decoding samples from a point mass, so there it reports the
plain temperature-1 log-prob of the chosen token instead (a constant 0 would carry nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from selfplay import sharding
from selfplay.config import ActorConfig, ModelConfig, UserError, check_actor_fits_model
from selfplay.data import fixed_chunks
from selfplay.models import transformer
from selfplay.types import Rollout

if TYPE_CHECKING:
    from selfplay.policy import Policy


def pad_prompts(
    token_lists: Sequence[Sequence[int]],
    buckets: Sequence[int],
    pad_id: int,
    too_long: Literal["error", "truncate"] = "error",
    *,
    max_new_tokens: int = 0,
    max_seq_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-pad prompts to the smallest bucket that fits the longest: (prompt_tokens_bp, prompt_len_b, P), int32.

    A prompt longer than the largest bucket is a `UserError`, or keeps its last tokens with too_long="truncate".
    With `max_seq_len`, P + max_new_tokens must fit in it.
    """
    if not token_lists:
        raise UserError("pad_prompts: no prompts given")
    largest = max(buckets)
    rows = []
    for i, toks in enumerate(token_lists):
        toks = [int(t) for t in toks]
        if not toks:
            raise UserError(f"prompt {i} is empty; the sampler needs at least one prompt token (e.g. BOS)")
        if len(toks) > largest:
            if too_long != "truncate":
                raise UserError(
                    f"prompt {i} has {len(toks)} tokens, more than the largest prompt bucket ({largest}); "
                    "raise actor.prompt_buckets or set actor.too_long_prompt=truncate (keeps the last tokens)"
                )
            toks = toks[-largest:]
        rows.append(toks)
    longest = max(len(r) for r in rows)
    p = min(b for b in buckets if b >= longest)
    if max_seq_len is not None and p + max_new_tokens > max_seq_len:
        raise UserError(
            f"prompt bucket {p} + actor.max_new_tokens ({max_new_tokens}) = {p + max_new_tokens} "
            f"exceeds model.max_seq_len ({max_seq_len}); use shorter prompts, fewer new tokens or a longer context"
        )
    tokens_bp = np.full((len(rows), p), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens_bp[i, p - len(r) :] = r
    return tokens_bp, np.array([len(r) for r in rows], np.int32), p


# ----------------------------------------------------------------------------------------------
# Choosing a token.
# ----------------------------------------------------------------------------------------------


def _candidates(logits_bv: jax.Array, top_k: int, top_p: float) -> tuple[jax.Array, jax.Array | None]:
    """The candidate logits after top-k then top-p, as (logits_bk, vocab ids_bk) sorted descending (-inf: dropped).

    ids is None when nothing is truncated (candidates = the whole vocabulary, in vocabulary order).
    top-p keeps the smallest prefix whose probability (renormalised over the top-k) reaches p, so always the top token.
    """
    v = logits_bv.shape[-1]
    k = top_k if 0 < top_k < v else v
    if k == v and top_p >= 1.0:
        return logits_bv, None
    vals_bk, ids_bk = jax.lax.top_k(logits_bv, k)
    if top_p < 1.0:
        probs_bk = jax.nn.softmax(vals_bk, axis=-1)
        mass_before_bk = jnp.concatenate([jnp.zeros_like(probs_bk[:, :1]), jnp.cumsum(probs_bk, axis=-1)[:, :-1]], axis=-1)
        vals_bk = jnp.where(mass_before_bk < top_p, vals_bk, -jnp.inf)
    return vals_bk, ids_bk


def truncate_logits(logits_bv: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """`logits_bv` with -inf on every token that top-k (0: off) then top-p (1.0: off) drops."""
    vals_bk, ids_bk = _candidates(logits_bv, top_k, top_p)
    if ids_bk is None:
        return logits_bv
    rows_b1 = jnp.arange(logits_bv.shape[0])[:, None]
    return jnp.full_like(logits_bv, -jnp.inf).at[rows_b1, ids_bk].set(vals_bk)


def sample_token(
    logits_bv: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its sampling-time log-prob (see the module docstring): (int32 [B], float32 [B])."""
    logits_bv = logits_bv.astype(jnp.float32)
    if greedy:
        tok_b = jnp.argmax(logits_bv, axis=-1)
        lp_b = jnp.take_along_axis(jax.nn.log_softmax(logits_bv, axis=-1), tok_b[:, None], axis=-1)[:, 0]
        return tok_b.astype(jnp.int32), lp_b
    vals_bk, ids_bk = _candidates(logits_bv / temperature, top_k, top_p)
    logp_bk = jax.nn.log_softmax(vals_bk, axis=-1)
    j_b = _inverse_cdf(jnp.exp(logp_bk), key)
    lp_b = jnp.take_along_axis(logp_bk, j_b[:, None], axis=-1)[:, 0]
    tok_b = j_b if ids_bk is None else jnp.take_along_axis(ids_bk, j_b[:, None], axis=-1)[:, 0]
    return tok_b.astype(jnp.int32), lp_b


def _inverse_cdf(probs_bk: jax.Array, key: jax.Array) -> jax.Array:
    """One index per row drawn with probability probs_bk (rows sum to ~1), by inverting the cumulative sum at one
    uniform per row: the first index whose cumulative mass exceeds it. One random number per row where Gumbel-max
    (`jax.random.categorical`) draws one per candidate: 64 instead of 131 072 per step at batch 64 and a 2048-token
    vocabulary, whose generation took a sixth of a decode step on CPU (benchmarks/RESULTS.md). A zero-probability
    index is never drawn: the count stops below it, and the float edge (u rounding up to the total) falls back to the
    last index with mass."""
    cdf_bk = jnp.cumsum(probs_bk, axis=-1)
    u_b1 = jax.random.uniform(key, (probs_bk.shape[0], 1), jnp.float32) * cdf_bk[:, -1:]
    j_b = jnp.sum(cdf_bk <= u_b1, axis=-1)
    k = probs_bk.shape[-1]
    last_b = k - 1 - jnp.argmax(probs_bk[:, ::-1] > 0, axis=-1)
    return jnp.minimum(j_b, last_b).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The sampler.
# ----------------------------------------------------------------------------------------------

DecodeBuffers = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]  # tokens_bl, lp_bl, mask_bl, done_b, eos_b


def emit_token(
    bufs: DecodeBuffers, col: int | jax.Array, tok_b: jax.Array, lp_b: jax.Array, *, pad_id: int, eos_ids: tuple[int, ...]
) -> DecodeBuffers:
    """Write the token chosen for buffer column `col` (pad, log-prob 0 and mask 0 on rows already done); a row
    that writes any of `eos_ids` (static; empty: no row ends) is done from then on."""
    tokens_bl, lp_bl, mask_bl, done_b, eos_b = bufs
    live_b = ~done_b
    tok_b = jnp.where(live_b, tok_b, pad_id)
    tokens_bl = jax.lax.dynamic_update_slice(tokens_bl, tok_b[:, None], (0, col))
    lp_bl = jax.lax.dynamic_update_slice(lp_bl, jnp.where(live_b, lp_b, 0.0)[:, None], (0, col))
    mask_bl = jax.lax.dynamic_update_slice(mask_bl, live_b.astype(jnp.float32)[:, None], (0, col))
    hit_b = live_b & jnp.isin(tok_b, jnp.asarray(eos_ids, jnp.int32))
    return tokens_bl, lp_bl, mask_bl, done_b | hit_b, eos_b | hit_b



def make_sampler(
    model_cfg: ModelConfig,
    actor_cfg: ActorConfig,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    constrain_cache: Callable[[transformer.KVCache], transformer.KVCache] | None = None,
) -> Callable:
    """`sample(graphdef, params, prompt_tokens_bp, prompt_len_b, rng, samples_per_prompt=None)`, one jitted program.

    A row ends when it writes any of `eos_ids` (closed over: one compilation whatever their number).
    Returns (Rollout with B = n_prompts * G rows, row = prompt * G + g, and L = P + max_new_tokens;
    {"decode_steps": int32, the one-token forward passes run after the prefill}). samples_per_prompt is static
    (None: actor.samples_per_prompt). One compilation per (P, n_prompts, G).
    constrain_cache: applied to the KV cache when it is made and when it is copied per sample, to pin its
    placement on a mesh (`selfplay.sharding.kv_cache_constraint`); None: left to the compiler.
    """
    constrain = constrain_cache or (lambda cache: cache)
    eos_ids = tuple(int(i) for i in eos_ids)
    max_new = actor_cfg.max_new_tokens
    check_actor_fits_model(actor_cfg, model_cfg)
    choose = dict(
        temperature=actor_cfg.temperature, top_k=actor_cfg.top_k, top_p=actor_cfg.top_p, greedy=actor_cfg.greedy
    )

    def sample(graphdef, params, prompt_tokens_bp, prompt_len_b, rng, samples_per_prompt):
        g = samples_per_prompt
        n, p = prompt_tokens_bp.shape
        if p + max_new > model_cfg.max_seq_len:
            raise UserError(f"prompt width {p} + actor.max_new_tokens ({max_new}) exceeds model.max_seq_len ({model_cfg.max_seq_len})")
        b, l = n * g, p + max_new
        model = transformer.merge(graphdef, params)
        layer_weights = model.layer_weights()  # sliced once, outside the decode loop
        prompt_len_n = prompt_len_b.astype(jnp.int32)

        # Prefill the n distinct prompts once, then give each of the G samples its own copy of the cache.
        # The cache is born and dies inside this one jitted program, so there is no boundary to donate it across.
        col_p = jnp.arange(p)[None, :]
        start_n1 = p - prompt_len_n[:, None]
        logits_npv, cache = model(
            prompt_tokens_bp,
            jnp.maximum(col_p - start_n1, 0),
            col_p >= start_n1,
            cache=constrain(transformer.init_cache(model_cfg, n, l)),
            cache_index=0,
        )
        cache = constrain(jax.tree.map(lambda x: jnp.repeat(x, g, axis=0), cache))
        len_b = jnp.repeat(prompt_len_n, g)
        tokens_bl = jnp.concatenate(
            [jnp.repeat(prompt_tokens_bp.astype(jnp.int32), g, axis=0), jnp.full((b, max_new), pad_id, jnp.int32)], axis=1
        )
        zeros_bl = jnp.zeros((b, l), jnp.float32)
        no_b = jnp.zeros((b,), bool)

        def emit(i, tok_b, lp_b, bufs):  # completion column i
            return emit_token(bufs, p + i, tok_b, lp_b, pad_id=pad_id, eos_ids=eos_ids)

        last_bv = jnp.repeat(logits_npv[:, -1], g, axis=0)
        tok_b, lp_b = sample_token(last_bv, jax.random.fold_in(rng, 0), **choose)
        bufs = emit(0, tok_b, lp_b, (tokens_bl, zeros_bl, zeros_bl, no_b, no_b))

        def cond(carry):
            i, bufs, _ = carry
            return (i < max_new) & ~jnp.all(bufs[3])

        def body(carry):
            i, bufs, cache = carry
            tokens_bl, _, mask_bl = bufs[:3]
            col = p + i - 1  # feed the token chosen last step
            prev_b1 = jax.lax.dynamic_slice_in_dim(tokens_bl, col, 1, axis=1)
            prev_valid_b1 = jax.lax.dynamic_slice_in_dim(mask_bl, col, 1, axis=1) > 0
            logits_b1v, cache = model(
                prev_b1, (len_b + i - 1)[:, None], prev_valid_b1, cache=cache, cache_index=col, layer_weights=layer_weights
            )
            tok_b, lp_b = sample_token(logits_b1v[:, 0], jax.random.fold_in(rng, i), **choose)
            return i + 1, emit(i, tok_b, lp_b, bufs), cache

        steps, (tokens_bl, lp_bl, mask_bl, _, eos_b), _ = jax.lax.while_loop(cond, body, (jnp.int32(1), bufs, cache))
        rollout = Rollout(tokens_bl=tokens_bl, prompt_len_b=len_b, completion_mask_bl=mask_bl, logprobs_bl=lp_bl, eos_b=eos_b)
        return rollout, {"decode_steps": steps - 1}

    jitted = jax.jit(sample, static_argnames=("samples_per_prompt",))

    def sampler(graphdef, params, prompt_tokens_bp, prompt_len_b, rng, samples_per_prompt=None):
        # Resolve the default here so that "default" and an explicit equal G share one compilation.
        return jitted(
            graphdef, params, prompt_tokens_bp, prompt_len_b, rng,
            samples_per_prompt=samples_per_prompt or actor_cfg.samples_per_prompt,
        )

    return sampler


class Generator:
    """Writes completions for text prompts with fixed shapes: prompts go in chunks of `batch` (the last chunk
    padded by repeating a prompt), so one compilation serves every chunk of a bucket.

    With a `layout` the sampler runs on its mesh: every process encodes the same whole chunk, each device gets its
    prompt rows, the KV cache and the Rollout are split over the batch axes (pass params placed on the same mesh);
    `completions` gathers the rows to decode them."""

    def __init__(
        self, policy: Policy, actor_cfg: ActorConfig, batch: int, layout: sharding.Layout | None = None, *,
        eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
    ):
        """eos_ids / pad_id: the tokenizer's unless given (a benchmark on synthetic tokens passes eos_ids=(): no row ends)."""
        self.policy = policy
        self.actor_cfg = actor_cfg
        self.batch = batch
        self.layout = layout
        eos_ids = policy.tokenizer.eos_ids if eos_ids is None else eos_ids
        pad_id = policy.tokenizer.pad_id if pad_id is None else pad_id
        if layout is None:
            self._sample = make_sampler(policy.cfg.model, actor_cfg, eos_ids=eos_ids, pad_id=pad_id)
        else:
            constrain = sharding.kv_cache_constraint(layout.mesh, layout.rules)
            sampler = make_sampler(policy.cfg.model, actor_cfg, eos_ids=eos_ids, pad_id=pad_id, constrain_cache=constrain)
            self._sample = sharding.shard_sampler(sampler, layout.mesh, layout.rules)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        tok = self.policy.tokenizer
        return pad_prompts(
            [tok.encode_prompt(p) for p in prompts],
            self.actor_cfg.prompt_buckets,
            tok.pad_id,
            self.actor_cfg.too_long_prompt,
            max_new_tokens=self.actor_cfg.max_new_tokens,
            max_seq_len=self.policy.cfg.model.max_seq_len,
        )

    def rollout(self, params: Any, prompts: Sequence[str], rng: jax.Array, samples_per_prompt: int) -> tuple[Rollout, int]:
        """One sampler call on exactly `self.batch` prompts: (Rollout of batch * G rows, prompt width P)."""
        if len(prompts) != self.batch:
            raise ValueError(f"Generator.rollout takes exactly {self.batch} prompts, got {len(prompts)}")
        tokens_bp, len_b, p = self.encode(prompts)
        return self.sample(params, tokens_bp, len_b, rng, samples_per_prompt), p

    def sample(self, params: Any, tokens_bp: Any, len_b: Any, rng: jax.Array, samples_per_prompt: int) -> Rollout:
        """The sampler on already encoded, left-padded prompts (`encode`'s first two outputs)."""
        if self.layout is not None:  # the key too: a committed and an uncommitted key would compile twice
            tokens_bp, len_b = self.layout.place_batch((tokens_bp, len_b))
            rng = sharding.place(rng, self.layout.replicated)
        rollout, _ = self._sample(self.policy.graphdef, params, tokens_bp, len_b, rng, samples_per_prompt)
        return rollout

    def completions(self, rollout: Rollout, prompt_width: int) -> list[str]:
        """The decoded completion of every row (every EOS id and padding dropped)."""
        tokens, mask = sharding.to_host((rollout.tokens_bl, rollout.completion_mask_bl))
        return decode_completions(self.policy.tokenizer, tokens, mask, prompt_width)

    def generate(self, prompts: Sequence[str], rng: jax.Array, samples_per_prompt: int = 1, params: Any = None) -> list[str]:
        """Completions for every prompt, grouped: [p0 s0, p0 s1, ..., p1 s0, ...]."""
        params = self.policy.params if params is None else params
        out: list[str] = []
        for c, chunk, real in fixed_chunks(prompts, self.batch):
            rollout, p = self.rollout(params, chunk, jax.random.fold_in(rng, c), samples_per_prompt)
            out += self.completions(rollout, p)[: real * samples_per_prompt]
        return out


def decode_completions(tok: Any, tokens_bl: np.ndarray, mask_bl: np.ndarray, prompt_width: int) -> list[str]:
    """Each row's completion as text: the columns after `prompt_width` that the mask keeps, EOS ids dropped. Host
    arrays only (no device access), so it may run on another thread while the device works."""
    return [tok.decode(ids) for _, ids in _completion_ids(tok, tokens_bl, mask_bl, prompt_width)]


def _completion_ids(tok: Any, tokens_bl: np.ndarray, mask_bl: np.ndarray, prompt_width: int) -> list[tuple[list[int], list[int]]]:
    """Each row's (columns, ids) of the completion tokens that reach the text: after `prompt_width`, kept by the mask,
    not an EOS id."""
    eos = set(tok.eos_ids)
    out = []
    for row, mrow in zip(tokens_bl, mask_bl):
        cols = [c for c in range(prompt_width, len(row)) if mrow[c] > 0 and int(row[c]) not in eos]
        out.append((cols, [int(row[c]) for c in cols]))
    return out


def token_char_ends(tok: Any, ids: Sequence[int]) -> list[int]:
    """For each id of `ids`, the length of `tok.decode(ids[: i + 1])`: where its text ends in the decoded text (ids
    that add no text end where the previous one did). One decode per id when the pieces add up to the whole, else
    one decode per prefix (a multi-byte character split over ids)."""
    ends, n = [], 0
    for t in ids:
        n += len(tok.decode([t]))
        ends.append(n)
    if n == len(tok.decode(ids)):
        return ends
    return [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]


def token_credits(tok: Any, tokens_bl: np.ndarray, mask_bl: np.ndarray, prompt_width: int,
                  spans: Sequence[Sequence[tuple[int, int, float]]]) -> np.ndarray:
    """float32 [B, L]: each completion token gets the credit of the text span (start, end, credit) of its row's
    decoded completion (`decode_completions`) that holds the token's last character; 0 elsewhere (prompt, padding,
    EOS, text between spans). Host arrays only."""
    out = np.zeros(tokens_bl.shape, np.float32)
    for b, (row_spans, (cols, ids)) in enumerate(zip(spans, _completion_ids(tok, tokens_bl, mask_bl, prompt_width))):
        ends = token_char_ends(tok, ids)
        starts = [0, *ends[:-1]]
        for c, s, e in zip(cols, starts, ends):
            if e > s:
                out[b, c] = next((v for a, z, v in row_spans if a <= e - 1 < z), 0.0)
    return out
