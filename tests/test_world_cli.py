"""`selfplay world sample` and `selfplay world grade`, run in-process through the CLI entry point."""

from __future__ import annotations

import io
import json

import pytest

from selfplay.cli import EXIT_USER_ERROR, main
from selfplay.world import GOLD_FIELDS


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_sample_prints_n_json_lines_with_gold(capsys):
    assert main(["world", "sample", "--n", "6", "--seed", "3"]) == 0
    rows = _lines(capsys.readouterr().out)
    assert len(rows) == 6
    for r in rows:
        assert set(r) == {"prompt", "essay", "gold"}
        assert list(r["gold"]) == list(GOLD_FIELDS)
        assert 0.0 <= r["gold"]["score"] <= 1.0
    assert main(["world", "sample", "--n", "6", "--seed", "3"]) == 0
    assert _lines(capsys.readouterr().out) == rows
    assert main(["world", "sample", "--n", "6", "--seed", "4"]) == 0
    assert _lines(capsys.readouterr().out) != rows


def test_sample_modes_and_overrides(capsys):
    assert main(["world", "sample", "--n", "5", "--mode", "closed"]) == 0
    assert all("Facts:" not in r["prompt"] for r in _lines(capsys.readouterr().out))
    assert main(["world", "sample", "--n", "5", "--mode", "grounded", "world.seed=7"]) == 0
    assert all("Facts:" in r["prompt"] for r in _lines(capsys.readouterr().out))
    assert main(["world", "sample", "--n", "-1"]) == EXIT_USER_ERROR
    assert "--n must be >= 0" in capsys.readouterr().err


def test_grade_good_file(tmp_path, capsys):
    assert main(["world", "sample", "--n", "5"]) == 0
    sampled = _lines(capsys.readouterr().out)
    path = tmp_path / "essays.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in sampled[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in sampled[3:]) + "\n")
    assert main(["world", "grade", str(path)]) == 0
    rows = _lines(capsys.readouterr().out)
    assert len(rows) == 6
    assert [r["line"] for r in rows[:5]] == [1, 2, 3, 5, 6]
    assert [r["gold"] for r in rows[:5]] == [r["gold"] for r in sampled]
    summary = rows[-1]["summary"]
    assert summary["n"] == 5
    assert summary["mean"]["score"] == pytest.approx(sum(r["gold"]["score"] for r in sampled) / 5)


def test_grade_reads_stdin(monkeypatch, capsys):
    assert main(["world", "sample", "--n", "2"]) == 0
    out = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(out))
    assert main(["world", "grade", "-"]) == 0
    assert len(_lines(capsys.readouterr().out)) == 3


@pytest.mark.parametrize(
    "bad, what",
    [
        ('{"prompt": "x", "essay": ', "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"essay": "text"}', "missing key 'prompt'"),
        ('{"prompt": PROMPT, "essay": 3}', "'essay' must be a str"),
        ('{"prompt": "Write an essay about Nobody, a city.", "essay": "x"}', "not a prompt of this world"),
    ],
)
def test_grade_malformed_line_fails_before_printing(tmp_path, capsys, bad, what):
    assert main(["world", "sample", "--n", "3"]) == 0
    good = capsys.readouterr().out.splitlines()
    bad = bad.replace("PROMPT", json.dumps(json.loads(good[0])["prompt"]))
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([good[0], good[1], bad, good[2]]) + "\n")
    assert main(["world", "grade", str(path)]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{path}:3: " in captured.err and what in captured.err


def test_grade_missing_or_empty_file(tmp_path, capsys):
    assert main(["world", "grade", str(tmp_path / "nope.jsonl")]) == EXIT_USER_ERROR
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["world", "grade", str(empty)]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and "no essays to grade" in captured.err
