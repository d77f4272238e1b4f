"""JSONL readers name the bad line; the prompt stream is seeded and resumable."""

import numpy as np
import pytest

from selfplay.data import DataError, PromptStream, minibatches, read_jsonl, read_prompts


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
        ('{"prompt": 3}\n', ":1: 'prompt' must be a str, got int"),
        ('{"prompt": "  "}\n', ":1: 'prompt' is empty"),
        ("\n\n", ": no records"),
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
