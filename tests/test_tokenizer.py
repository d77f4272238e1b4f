"""The byte-level BPE tokenizer: training on the world corpus, special ids, exact round trips, tokenizer.json I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from selfplay.config import UserError, WorldConfig
from selfplay.tokenizer import BOS, EOS, PAD, SEP, Tokenizer
from selfplay.world import World


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    return World.from_config(WorldConfig()).corpus(1500, seed=0)


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return Tokenizer.train([t for pair in corpus for t in pair], 1024)


def test_special_tokens_have_fixed_ids(tok: Tokenizer):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 1, 2, 3)
    assert [tok.tk.id_to_token(i) for i in range(4)] == [PAD, BOS, EOS, SEP]
    assert tok.vocab_size == 1024


def test_round_trip_is_exact(tok: Tokenizer, corpus):
    for prompt, essay in corpus:
        for text in (prompt, essay):
            ids = tok.encode(text)
            assert min(ids) >= 4 and max(ids) < tok.vocab_size
            assert tok.decode(ids) == text
    odd = ["", " leading and trailing ", "tabs\tand\nnewlines\n", "ünïcödé ✓ 漢字 🙂", "<|eos|> is just text <|pad|>"]
    for text in odd:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & {tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id}
    assert tok.decode_batch([tok.encode(t) for t in odd]) == odd


def test_decode_skips_special_tokens(tok: Tokenizer):
    ids = tok.encode("Hello there.")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == "Hello there."


def test_example_layout_and_loss_mask(tok: Tokenizer, corpus):
    prompt, essay = corpus[0]
    p_ids, e_ids = tok.encode(prompt), tok.encode(essay)
    assert tok.encode_prompt(prompt) == [tok.bos_id, *p_ids, tok.sep_id]
    ids, mask = tok.encode_example(prompt, essay)
    assert ids == [tok.bos_id, *p_ids, tok.sep_id, *e_ids, tok.eos_id]
    assert mask == [0] * (len(p_ids) + 2) + [1] * (len(e_ids) + 1)
    assert tok.decode(ids[len(p_ids) + 2:]) == essay


def test_save_load_gives_identical_encodings(tok: Tokenizer, corpus, tmp_path):
    path = tok.save(tmp_path / "run")  # a directory: tokenizer.json inside
    assert path == tmp_path / "run" / "tokenizer.json"
    json.loads(path.read_text())
    loaded = Tokenizer.load(tmp_path / "run")
    raw = tokenizers.Tokenizer.from_file(str(path))
    assert raw.get_vocab_size() == tok.vocab_size
    for prompt, essay in corpus[:300]:
        for text in (prompt, essay):
            ids = tok.encode(text)
            assert loaded.encode(text) == ids
            assert raw.encode(text, add_special_tokens=False).ids == ids
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.sep_id) == (0, 1, 2, 3)
    assert tok.save(tmp_path / "named.json") == tmp_path / "named.json"
    assert Tokenizer.load(tmp_path / "named.json").encode("Velmo.") == tok.encode("Velmo.")


def _foreign(tmp_path, specials: list[str]):
    """A tokenizer.json as a Hugging Face model might ship it: its own special tokens, none of ours."""
    vocab = {"a": 0, "b": 1, "ab": 2, "\u010a": 3, "\u0120": 4}
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    return path


def test_load_foreign_tokenizer_finds_equivalent_specials(tmp_path):
    t = Tokenizer.load(_foreign(tmp_path, ["<s>", "</s>", "<pad>"]))
    assert (t.bos_id, t.eos_id, t.pad_id) == (5, 6, 7)
    assert t.sep_id == 3  # no separator token: the single token of "\n"
    t = Tokenizer.load(_foreign(tmp_path, ["<|endoftext|>"]))
    assert t.bos_id == t.eos_id == t.pad_id == 5
    assert t.encode("ab") == [2] and t.decode([5, 2, 5]) == "ab"


def test_load_errors_name_the_file(tmp_path):
    path = _foreign(tmp_path, ["<unk>"])
    with pytest.raises(UserError, match=f"{path}: no bos token: none of generation_config.json"):
        Tokenizer.load(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=f"{bad}: not a valid tokenizer.json"):
        Tokenizer.load(bad)
    with pytest.raises(UserError, match="cannot read tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(UserError, match="vocab_size must be >= 260"):
        Tokenizer.train(["abc"], 100)


def test_token_credits_follow_the_text_spans(tok: Tokenizer, corpus):
    """Each completion token gets the credit of the span holding its last character, including for text whose
    characters span several byte-level tokens; prompt columns, EOS and padding get 0."""
    from selfplay.actor import decode_completions, token_char_ends, token_credits

    essays = [corpus[0][1], "ünïcödé ✓ 漢字 🙂. Second sentence here."]
    width, p = 160, 5
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.float32)
    for b, text in enumerate(essays):
        ids = tok.encode(text) + [tok.eos_id]
        tokens[b, :p] = 7
        tokens[b, p:p + len(ids)] = ids
        mask[b, p:p + len(ids)] = 1.0
    assert decode_completions(tok, tokens, mask, p) == essays
    spans = [[(0, 10, 1.0), (10, len(essays[0]), -1.0)], [(0, len(essays[1]) // 2, 0.5)]]
    credits = token_credits(tok, tokens, mask, p, spans)
    assert credits.shape == tokens.shape and not credits[:, :p].any()
    for b, text in enumerate(essays):
        ids = tok.encode(text)
        ends = token_char_ends(tok, ids)
        assert ends[-1] == len(text) and ends == [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
        for i, e in enumerate(ends):
            want = next((v for a, z, v in spans[b] if a <= e - 1 < z), 0.0) if e > (ends[i - 1] if i else 0) else 0.0
            assert credits[b, p + i] == want, (b, i)
        assert credits[b, p + len(ids)] == 0.0  # EOS
    assert (credits[0, p:] == 1.0).any() and (credits[0, p:] == -1.0).any() and (credits[1, p:] == 0.5).any()
