"""JSONL readers name the bad line; the prompt and human-example streams are seeded and resumable."""

import numpy as np
import pytest

from selfplay.config import UserError, WorldConfig
from selfplay.data import DataError, ExampleStream, PromptStream, minibatches, read_examples, read_jsonl, read_prompts
from selfplay.tokenizer import Tokenizer
from selfplay.world import World


def test_read_prompts_and_line_numbers(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b", "extra": 1}\n')
    assert read_prompts(p) == ["a", "b"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"prompt": "a"}\n{"prompt": "b"\n', ":2: invalid JSON"),
        ('{"prompt": "a"}\n["x"]\n', ":2: expected a JSON object, got list"),
        ('{"prompt": "a"}\n{"promt": "b"}\n', ":2: missing key 'prompt'"),
        ('{"prompt": 3}\n', ":1: 'prompt' must be a str or a list of {\"role\", \"content\"} messages, got int"),
        ('{"prompt": []}\n', ":1: 'prompt' is an empty conversation"),
        ('{"prompt": [{"role": "user"}]}\n', ":1: 'prompt' message 1 must be an object with string 'role' and 'content'"),
        ('{"prompt": "  "}\n', ":1: 'prompt' is empty"),
        ('{"prompt": "a", "completions": 1}\n', ":1: 'completions' cannot be a column: reward functions receive the batch's"),
        ("\n\n", ": no prompts"),
    ],
)
def test_malformed_lines_are_named(tmp_path, text, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        read_prompts(p)
    assert str(e.value).startswith(str(p))
    assert expected in str(e.value)


def test_optional_keys_are_type_checked(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"chosen": "a", "rejected": "b", "prompt": 1}\n')
    with pytest.raises(DataError, match=":1: 'prompt' must be a str"):
        read_jsonl(p, {"chosen": str, "rejected": str}, {"prompt": str})


def test_prompt_stream_is_seeded_covers_epochs_and_resumes():
    s = PromptStream(7, seed=3)
    first = s.take(7)
    assert sorted(first.tolist()) == list(range(7))
    rest = s.take(10)
    again = PromptStream(7, seed=3)
    assert np.array_equal(np.concatenate([again.take(3), again.take(14)]), np.concatenate([first, rest]))
    resumed = PromptStream(7, seed=3, position=7)
    assert np.array_equal(resumed.take(10), rest)
    assert not np.array_equal(PromptStream(7, seed=4).take(7), first)


def test_minibatches_fixed_size():
    it = minibatches(10, 4, np.random.default_rng(0))
    batches = [next(it) for _ in range(4)]
    assert all(b.shape == (4,) for b in batches)
    assert len(set(batches[0].tolist()) | set(batches[1].tolist())) == 8


def test_read_examples_names_the_bad_line(tmp_path):
    p = tmp_path / "human.jsonl"
    p.write_text('{"prompt": "Write about A.", "completion": "A is a city."}\n')
    assert read_examples(p) == [("Write about A.", "A is a city.")]
    p.write_text('{"prompt": "Write about A.", "completion": "A is a city."}\n{"prompt": "x", "completion": " "}\n')
    with pytest.raises(DataError, match=r"human.jsonl:2: 'completion' is empty"):
        read_examples(p)
    p.write_text('{"prompt": "x", "essay": "y"}\n')
    with pytest.raises(DataError, match=r":1: missing key 'completion'"):
        read_examples(p)


def test_example_stream_rows_are_the_tokenizer_examples_padded_to_one_width():
    examples = World.from_config(WorldConfig(n_entities=40)).corpus(30, seed=0)
    tok = Tokenizer.train([t for pair in examples for t in pair], 300)
    stream = ExampleStream(tok, examples, seed=5, max_len=512, source="corpus")
    encoded = [tok.encode_example(p, e) for p, e in examples]
    width = max(len(ids) for ids, _ in encoded)
    first = stream.take(4)
    assert first.tokens_bl.shape == first.loss_mask_bl.shape == first.valid_bl.shape == first.positions_bl.shape == (4, width)
    order = PromptStream(len(examples), seed=5).take(4)
    for row, i in enumerate(order):
        ids, mask = encoded[i]
        n = len(ids)
        assert first.tokens_bl[row, :n].tolist() == ids and (first.tokens_bl[row, n:] == tok.pad_id).all()
        assert first.loss_mask_bl[row, :n].tolist() == mask and not first.loss_mask_bl[row, n:].any()
        assert first.valid_bl[row].sum() == n and first.positions_bl[row, 3] == 3
    later = stream.take(40)  # wraps into a second epoch with the same width
    resumed = ExampleStream(tok, examples, seed=5, max_len=512, source="corpus")
    resumed.position = 4
    np.testing.assert_array_equal(resumed.take(40).tokens_bl, later.tokens_bl)
    with pytest.raises(UserError, match=rf"corpus: example \d+ has {width} tokens, more than model.max_seq_len \(20\)"):
        ExampleStream(tok, examples, seed=5, max_len=20, source="corpus")
