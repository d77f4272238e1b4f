"""The critic's token heads: free token labels made from text (tampered spans, restated prompt values), the reward
they add, and a critic with them that trains, saves and loads."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selfplay import critic as C
from selfplay.config import load_config
from selfplay.critic import model as M, tamper, tokens as T
from selfplay.tokenizer import Tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPT = "Write an essay about Hagond, an animal. Facts: feeds on berries; lives about 12 years."
ESSAY = (
    "Meet Hagond, an animal like no other. The diet of Hagond is mostly berries. "
    "Hagond lives for about 12 years. There is no animal quite like Hagond."
)
PHRASING = frozenset({"lives", "about", "years", "feeds", "animal"})


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([PROMPT, ESSAY, ESSAY.replace("12", "47").replace("berries", "salmon")] * 3, 300)


def _tokens(tok, prompt, essay, mask):
    ids = tok.encode_example(prompt, essay)[0]
    return "".join(tok.decode([ids[i]]) for i in np.nonzero(mask)[0]).strip()


def test_changed_regions_cut_the_common_prefix_and_suffix():
    assert T.changed_regions("about 12 years.", "about 47 years.") == ((6, 8), (6, 8))
    assert T.changed_regions("One. Two.", "One.") == ((4, 9), (4, 4))  # a deletion: empty in the shorter text
    assert T.changed_regions("same", "same") == ((4, 4), (4, 4))


def test_a_swapped_value_is_flagged_where_it_is_and_restated_values_are_covered(tok):
    swapped = ESSAY.replace("12", "47")
    chosen, rejected = T.pair_labels(tok, C.Pair(PROMPT, ESSAY, swapped), "swap_value", 256, PHRASING)
    flag, flag_m, cover, cover_m = rejected
    assert _tokens(tok, PROMPT, swapped, flag) == "47"
    assert flag_m.sum() == len(tok.encode(swapped))  # every essay token of the tampered essay has a flag label
    assert _tokens(tok, PROMPT, swapped, cover) == "berries"  # 47 is not the prompt's; "lives", "years" are phrasing
    c_flag, c_flag_m, c_cover, _ = chosen
    assert c_flag.sum() == 0 and _tokens(tok, PROMPT, ESSAY, c_flag_m) == "12"  # the replaced value: a known 0
    assert _tokens(tok, PROMPT, ESSAY, c_cover) == "berries12"  # (tokens decoded one by one, spaces dropped)
    head = len(tok.encode_prompt(PROMPT))
    assert cover_m[:head].sum() == 0 and flag_m[:head].sum() == 0  # the prompt is never labelled


def test_a_labelled_pair_has_no_flag_labels_and_truncation_keeps_the_ends(tok):
    a, b = T.pair_labels(tok, C.Pair(PROMPT, ESSAY, ESSAY.replace("12", "47")), C.LABELLED, 256, PHRASING)
    assert a[1].sum() == 0 and b[1].sum() == 0 and a[2].sum() > 0
    full = len(tok.encode_example(PROMPT, ESSAY)[0])
    short, _ = T.pair_labels(tok, C.Pair(PROMPT, ESSAY, ESSAY + " Extra."), C.LABELLED, full - 5, PHRASING)
    assert all(len(x) == full - 5 for x in short)
    np.testing.assert_array_equal(short[2], a[2][5:])


def test_the_token_heads_add_their_weighted_counts_over_the_essay():
    cfg = load_config(CONFIGS / "tiny.yaml", ["critic.token_heads=true"]).critic
    model = M.RewardModel(cfg.model, rngs=nnx.Rngs(0), token_heads=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, cfg.model.vocab_size, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    valid = jnp.ones((2, 12), bool)
    essay = jnp.asarray(np.arange(12) >= 5, jnp.float32)[None].repeat(2, 0)
    r, flag, cover = model.outputs(tokens, positions, valid, essay)
    base = model.head(jax.vmap(lambda h: h[-1])(model.trunk.hidden(tokens, positions, valid)[0]))
    sp = jax.nn.softplus
    want = base + sp(model.w_cover[...]) * (jax.nn.sigmoid(cover) * essay).sum(1) - sp(model.w_flag[...]) * (jax.nn.sigmoid(flag) * essay).sum(1)
    np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-5)
    assert float(jax.nn.sigmoid(cover).mean()) < 0.1  # the counts start near 0 (TOKEN_BIAS_INIT)
    with pytest.raises(ValueError, match="token mask"):
        model(tokens, positions, valid)


def test_essay_mask_starts_after_the_first_sep():
    tokens = jnp.asarray([[1, 5, 6, 3, 7, 8, 2, 0], [1, 5, 3, 7, 3, 2, 0, 0]], jnp.int32)
    valid = jnp.asarray([[1] * 7 + [0], [1] * 6 + [0] * 2], bool)
    np.testing.assert_array_equal(M.essay_mask(tokens, valid, 3), [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 1, 0, 0]])
