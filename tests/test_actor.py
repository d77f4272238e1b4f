"""The sampler: prompt bucketing, token choice (greedy / temperature / top-k / top-p), EOS, log-probs, no retracing."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from selfplay.actor import make_sampler, pad_prompts, sample_token, truncate_logits
from selfplay.config import ActorConfig, ConfigError, ModelConfig, UserError
from selfplay.models import transformer

TOL = 1e-5  # f32: sampler log-probs (cached decode) vs teacher-forced full forward
EOS, PAD = 1, 0
CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, tie_embeddings=False)
ACTOR = ActorConfig(max_new_tokens=8, prompt_buckets=(4, 8), samples_per_prompt=8)
PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]


@functools.lru_cache(maxsize=None)
def _model():
    """Params perturbed away from init so that the next-token distribution is far from uniform."""
    graphdef, params = transformer.split(transformer.create_model(CFG, 0))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return graphdef, jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _sampler(actor=ACTOR, eos=EOS, pad=PAD):
    return make_sampler(CFG, actor, eos_ids=(eos,), pad_id=pad)


fwd = jax.jit(transformer.forward)
token_logprobs = jax.jit(transformer.token_logprobs)


# ----------------------------------------------------------------------------------------------
# pad_prompts
# ----------------------------------------------------------------------------------------------


def test_pad_prompts_left_pads_to_the_smallest_bucket_that_fits():
    tokens, lens, p = pad_prompts([[5, 6, 7], [8, 9]], (4, 8), PAD)
    assert p == 4 and tokens.dtype == np.int32 and lens.dtype == np.int32
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 8, 9]])
    np.testing.assert_array_equal(lens, [3, 2])
    assert pad_prompts([[1] * 4], (4, 8), PAD)[2] == 4
    assert pad_prompts([[1] * 5, [2]], (4, 8), PAD)[2] == 8


def test_pad_prompts_too_long_is_an_error_naming_the_prompt_or_keeps_the_last_tokens():
    long = list(range(1, 11))
    with pytest.raises(UserError, match=r"prompt 1 has 10 tokens, more than the largest prompt bucket \(8\)"):
        pad_prompts([[1, 2], long], (4, 8), PAD)
    tokens, lens, p = pad_prompts([[1, 2], long], (4, 8), PAD, "truncate")
    assert p == 8
    np.testing.assert_array_equal(tokens[1], long[-8:])
    np.testing.assert_array_equal(lens, [2, 8])


def test_pad_prompts_checks_the_context_length_and_empty_prompts():
    with pytest.raises(UserError, match=r"prompt bucket 8 \+ actor.max_new_tokens \(30\) = 38 exceeds model.max_seq_len \(32\)"):
        pad_prompts([[1] * 6], (4, 8), PAD, max_new_tokens=30, max_seq_len=32)
    assert pad_prompts([[1] * 3], (4, 8), PAD, max_new_tokens=28, max_seq_len=32)[2] == 4
    with pytest.raises(UserError, match="prompt 1 is empty"):
        pad_prompts([[1], []], (4, 8), PAD)
    with pytest.raises(ConfigError, match="max_seq_len"):
        make_sampler(CFG, dataclasses.replace(ACTOR, max_new_tokens=30), eos_ids=(EOS,), pad_id=PAD)


# ----------------------------------------------------------------------------------------------
# Token choice
# ----------------------------------------------------------------------------------------------

PROBS = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # sorted: 0.5 (id 1), 0.2 (3), 0.15 (4), 0.1 (2), 0.05 (0)


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (2, 1.0, {1, 3}),
        (0, 0.3, {1}),  # the top token alone already reaches p
        (0, 0.6, {1, 3}),
        (0, 0.75, {1, 3, 4}),
        (0, 0.9, {1, 3, 4, 2}),
        (0, 0.99, {1, 3, 4, 2, 0}),
        (3, 0.8, {1, 3}),  # nucleus of the top-3 renormalised (0.59, 0.24, 0.18); without renormalising: {1, 3, 4}
        (0, 1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_truncate_logits_keeps_exactly_the_top_k_then_the_nucleus(top_k, top_p, kept):
    logits = np.log(PROBS)
    perm = np.array([3, 0, 4, 1, 2])  # a second row with the same values at other ids
    rows = jnp.asarray(np.stack([logits, logits[perm]]), jnp.float32)
    out = np.asarray(truncate_logits(rows, top_k, top_p))
    for row, ids in ((0, kept), (1, {int(np.where(perm == i)[0][0]) for i in kept})):
        finite = set(np.flatnonzero(np.isfinite(out[row])).tolist())
        assert finite == ids, (row, finite, ids)
        np.testing.assert_array_equal(out[row][list(ids)], np.asarray(rows)[row][list(ids)])
        assert np.all(out[row][[i for i in range(5) if i not in ids]] == -np.inf)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.5, 4, 0.9)])
def test_sampled_token_frequencies_match_the_truncated_softmax(temperature, top_k, top_p):
    n = 40_000
    logits = np.array([1.0, -0.5, 0.3, 2.0, 0.0, -1.5])
    choose = jax.jit(functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p))
    tok, lp = choose(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, 6)), jax.random.key(0))
    tok, lp = np.asarray(tok), np.asarray(lp)

    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros(6, bool)
    keep[order[: top_k or 6]] = True
    q = np.where(keep, np.exp(z - z.max()), 0.0)
    q /= q.sum()
    before = np.cumsum(q[order]) - q[order]
    keep[order[before >= top_p]] = False
    q = np.where(keep, q, 0.0)
    q /= q.sum()

    counts = np.bincount(tok, minlength=6)
    assert np.all(counts[~keep] == 0)
    assert stats.chisquare(counts[keep], n * q[keep]).pvalue > 1e-3
    np.testing.assert_allclose(lp, np.log(q[tok]), atol=TOL)


def test_inverse_cdf_never_draws_a_zero_probability_index():
    from selfplay.actor import _inverse_cdf

    n = 20_000
    probs = jnp.asarray([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
    draws = np.asarray(jax.jit(_inverse_cdf)(jnp.repeat(probs, n, axis=0), jax.random.key(3))).reshape(3, n)
    assert set(np.unique(draws[0]).tolist()) == {1, 3} and abs((draws[0] == 1).mean() - 0.5) < 0.02
    assert np.all(draws[1] == 4) and np.all(draws[2] == 0)


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------


def _check_completion_layout(r, p, max_new, eos, pad):
    tokens, mask, eos_b = np.asarray(r.tokens_bl), np.asarray(r.completion_mask_bl), np.asarray(r.eos_b)
    for b in range(tokens.shape[0]):
        comp, m = tokens[b, p:], mask[b, p:]
        n = int(m.sum())
        np.testing.assert_array_equal(m, np.arange(max_new) < n)
        np.testing.assert_array_equal(comp[n:], pad)
        assert eos not in comp[: n - 1]
        assert eos_b[b] == (comp[n - 1] == eos)
        assert eos_b[b] or n == max_new
    assert np.all(mask[:, :p] == 0) and np.all(np.asarray(r.logprobs_bl)[mask == 0] == 0)


def test_sampling_stops_rows_at_eos_and_its_logprobs_match_teacher_forcing():
    graphdef, params = _model()
    tokens_np, lens, p = pad_prompts(PROMPTS, ACTOR.prompt_buckets, PAD)
    r, info = _sampler()(graphdef, params, tokens_np, lens, jax.random.key(1))
    g, max_new = ACTOR.samples_per_prompt, ACTOR.max_new_tokens
    assert r.tokens_bl.shape == (3 * g, p + max_new) and r.logprobs_bl.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(r.tokens_bl)[:, :p], np.repeat(tokens_np, g, axis=0))
    np.testing.assert_array_equal(r.prompt_len_b, np.repeat(lens, g))
    _check_completion_layout(r, p, max_new, EOS, PAD)
    eos_b = np.asarray(r.eos_b)
    assert eos_b.any() and not eos_b.all()  # both endings are exercised (24 rows of 8 tokens from 16)
    assert int(info["decode_steps"]) == int(r.completion_len_b().max()) - 1
    # The G samples of a prompt share its prefill but draw their own tokens.
    assert len({tuple(row) for row in np.asarray(r.tokens_bl)}) > 3 * 2

    want, _ = token_logprobs(graphdef, params, r.tokens_bl, r.positions_bl(p), r.valid_mask_bl(p))
    np.testing.assert_allclose(r.logprobs_bl, np.asarray(want) * np.asarray(r.completion_mask_bl), atol=TOL, rtol=TOL)


def test_same_bucket_does_not_retrace_and_a_new_bucket_traces_once():
    graphdef, params = _model()
    sample = _sampler()
    a = pad_prompts(PROMPTS, ACTOR.prompt_buckets, PAD)
    b = pad_prompts([[9, 9, 2], [3, 3, 3, 3], [4]], ACTOR.prompt_buckets, PAD)
    c = pad_prompts([[5] * 6, [6], [7, 7]], ACTOR.prompt_buckets, PAD)
    assert a[2] == b[2] == 4 and c[2] == 8
    keys = jax.random.split(jax.random.key(2), 4)
    jax.block_until_ready(sample(graphdef, params, a[0], a[1], keys[0]))

    traces = []

    def on_event(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_trace_duration" and kw.get("fun_name") == "sample":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        jax.block_until_ready(sample(graphdef, params, b[0], b[1], keys[1]))
        assert len(traces) == 0
        jax.block_until_ready(sample(graphdef, params, c[0], c[1], keys[2]))
        assert len(traces) == 1
        r, _ = sample(graphdef, params, c[0], c[1], keys[3], ACTOR.samples_per_prompt)
        assert len(traces) == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    _check_completion_layout(r, 8, ACTOR.max_new_tokens, EOS, PAD)


def test_greedy_is_deterministic_equals_stepwise_argmax_and_exits_early_when_all_rows_end():
    # Token 0 is EOS here so that all-zero logits (below) make every row end at once; 15 pads.
    eos, pad, g = 0, 15, 2
    actor = dataclasses.replace(ACTOR, greedy=True, samples_per_prompt=g)
    sample = _sampler(actor, eos, pad)
    graphdef, params = _model()
    tokens_np, lens, p = pad_prompts(PROMPTS, actor.prompt_buckets, pad)
    r, info = sample(graphdef, params, tokens_np, lens, jax.random.key(3))
    r2, _ = sample(graphdef, params, tokens_np, lens, jax.random.key(4))
    for x, y in zip(r, r2):
        np.testing.assert_array_equal(x, y)

    # Reference: a full forward over the whole buffer each step, argmax at the last written column.
    max_new, n = actor.max_new_tokens, len(PROMPTS)
    tokens = np.concatenate([tokens_np, np.full((n, max_new), pad, np.int32)], axis=1)
    mask = np.zeros(tokens.shape, np.float32)
    done = np.zeros(n, bool)
    col = np.arange(p + max_new)[None, :]
    positions = np.maximum(col - (p - lens[:, None]), 0)
    for i in range(max_new):
        valid = ((col >= p - lens[:, None]) & (col < p)) | (mask > 0)
        logits, _ = fwd(graphdef, params, tokens, positions, valid)
        nxt = np.asarray(jnp.argmax(logits[:, p + i - 1], axis=-1))
        tokens[:, p + i] = np.where(done, pad, nxt)
        mask[:, p + i] = ~done
        done |= nxt == eos
    np.testing.assert_array_equal(r.tokens_bl, np.repeat(tokens, g, axis=0))
    np.testing.assert_array_equal(r.completion_mask_bl, np.repeat(mask, g, axis=0))
    _check_completion_layout(r, p, max_new, eos, pad)
    assert int(info["decode_steps"]) == int(r.completion_len_b().max()) - 1
    # Greedy reports the plain temperature-1 log-prob of its choice.
    want, _ = token_logprobs(graphdef, params, r.tokens_bl, r.positions_bl(p), r.valid_mask_bl(p))
    np.testing.assert_allclose(r.logprobs_bl, np.asarray(want) * np.asarray(r.completion_mask_bl), atol=TOL, rtol=TOL)

    # A zero final norm makes every logit 0, so argmax is token 0 = EOS at once: the loop must not run.
    zeroed = jax.tree.map(lambda x: x, params)
    zeroed["final_norm"][...] = jnp.zeros_like(zeroed["final_norm"][...])
    r, info = sample(graphdef, zeroed, tokens_np, lens, jax.random.key(5))
    assert int(info["decode_steps"]) == 0 and np.all(np.asarray(r.eos_b))
    np.testing.assert_array_equal(r.completion_len_b(), 1)
    _check_completion_layout(r, p, max_new, eos, pad)


def test_truncated_sampling_draws_from_the_tempered_nucleus_and_reports_its_logprob():
    actor = dataclasses.replace(ACTOR, temperature=0.8, top_k=5, top_p=0.9)
    graphdef, params = _model()
    tokens_np, lens, p = pad_prompts(PROMPTS, actor.prompt_buckets, PAD)
    r, _ = _sampler(actor)(graphdef, params, tokens_np, lens, jax.random.key(6), 3)
    assert r.tokens_bl.shape[0] == 9
    _check_completion_layout(r, p, actor.max_new_tokens, EOS, PAD)

    logits, _ = fwd(graphdef, params, r.tokens_bl, r.positions_bl(p), r.valid_mask_bl(p))
    allowed = truncate_logits(logits[:, p - 1 : -1].reshape(-1, CFG.vocab_size) / 0.8, 5, 0.9).reshape(9, -1, CFG.vocab_size)
    want = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(allowed, -1), r.tokens_bl[:, p:, None], -1)[..., 0])
    mask = np.asarray(r.completion_mask_bl)[:, p:] > 0
    assert np.all(np.isfinite(want[mask])), "a sampled token lies outside the top-k / top-p set"
    np.testing.assert_allclose(np.asarray(r.logprobs_bl)[:, p:][mask], want[mask], atol=TOL, rtol=TOL)
    assert np.all(np.isinf(np.asarray(allowed)).sum(-1) >= CFG.vocab_size - 5)


def test_any_of_several_eos_ids_ends_a_row():
    # A zero final norm makes every logit 0, so greedy writes token 0 at every step: the second of two EOS ids.
    actor = dataclasses.replace(ACTOR, greedy=True, samples_per_prompt=2)
    graphdef, params = _model()
    zeroed = jax.tree.map(lambda x: x, params)
    zeroed["final_norm"][...] = jnp.zeros_like(zeroed["final_norm"][...])
    tokens_np, lens, p = pad_prompts(PROMPTS, actor.prompt_buckets, 15)
    r, info = make_sampler(CFG, actor, eos_ids=(7, 0), pad_id=15)(graphdef, zeroed, tokens_np, lens, jax.random.key(8))
    assert int(info["decode_steps"]) == 0 and np.all(np.asarray(r.eos_b))
    np.testing.assert_array_equal(r.completion_len_b(), 1)
    # With the first id alone nothing ends a row: token 0 fills every completion.
    r, info = make_sampler(CFG, actor, eos_ids=(7,), pad_id=15)(graphdef, zeroed, tokens_np, lens, jax.random.key(8))
    assert not np.any(np.asarray(r.eos_b)) and int(info["decode_steps"]) == actor.max_new_tokens - 1
    np.testing.assert_array_equal(np.asarray(r.tokens_bl)[:, p:], 0)

    # Sampling: each row stops at the first of either id, and eos_b says whether it wrote one.
    tokens_np, lens, p = pad_prompts(PROMPTS, ACTOR.prompt_buckets, PAD)
    r, _ = make_sampler(CFG, ACTOR, eos_ids=(EOS, 2), pad_id=PAD)(graphdef, params, tokens_np, lens, jax.random.key(9))
    tokens, mask, eos_b = np.asarray(r.tokens_bl)[:, p:], np.asarray(r.completion_mask_bl)[:, p:], np.asarray(r.eos_b)
    ends = set()
    for row, m, hit in zip(tokens, mask, eos_b):
        n = int(m.sum())
        assert not {EOS, 2} & set(row[: n - 1]) and hit == (row[n - 1] in (EOS, 2))
        ends.add(int(row[n - 1]) if hit else None)
    assert {EOS, 2} <= ends  # both ids ended some row
