"""TensorBoard event files read back with TensorBoard's own reader, the JSON-lines twin, json_safe and ProgressBar."""

import io
import json
import re

import numpy as np
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfplay.tracking import ProgressBar, Tracker, json_safe, read_jsonl


def test_tensorboard_reads_back_scalars_text_and_histograms(tmp_path):
    with Tracker(tmp_path) as tr:
        for step in range(3):
            tr.scalars(step, {"reward/mean": 0.5 + step, "gold/score": 0.1 * step, "kl": float("nan") if step == 2 else 0.01})
        tr.text(1, "essays", "**critic** 0.7 | gold 0.4\n\nVelmora is a city.")
        tr.histogram(2, "reward/hist", np.arange(100.0))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"reward/mean", "gold/score", "kl"} <= set(tags["scalars"])
    assert [e.value for e in acc.Scalars("reward/mean")] == [0.5, 1.5, 2.5]
    assert [e.step for e in acc.Scalars("gold/score")] == [0, 1, 2]
    assert "essays" in tags["tensors"]
    text = acc.Tensors("essays")[0].tensor_proto.string_val[0].decode()
    assert "Velmora is a city." in text
    hist = acc.Histograms("reward/hist")[0].histogram_value
    assert hist.num == 100 and hist.min == 0 and hist.max == 99 and sum(hist.bucket) == 100

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["kl"] is None and rows[1]["reward/mean"] == 1.5


def test_disabled_tracker_writes_nothing(tmp_path):
    with Tracker(tmp_path / "off", enabled=False) as tr:
        tr.scalars(0, {"a": 1.0})
        tr.text(0, "t", "x")
    assert not (tmp_path / "off").exists()


def test_tracker_creates_missing_parent_directories(tmp_path):
    logdir = tmp_path / "run" / "tb" / "sft"
    assert not logdir.parent.exists()
    with Tracker(logdir) as tr:
        tr.scalars(3, {"sft/loss": 1.25})
    assert read_jsonl(logdir / "metrics.jsonl") == [{"step": 3, "sft/loss": 1.25}]
    assert any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir())


def test_json_safe_nulls_non_finite_floats_and_keeps_the_rest():
    nan, inf = float("nan"), float("inf")
    x = {"a": 1, "b": [0.5, nan, (inf, -inf, 2)], "c": {"d": {"e": nan, "f": True, "g": "s", "h": None}},
         "n": np.float32("nan"), "m": np.int64(7), "arr": np.array([1.0, np.inf])}
    out = json_safe(x)
    assert out == {"a": 1, "b": [0.5, None, [None, None, 2]], "c": {"d": {"e": None, "f": True, "g": "s", "h": None}},
                   "n": None, "m": 7, "arr": [1.0, None]}
    assert type(out["a"]) is int and type(out["b"][2][2]) is int and type(out["m"]) is int
    assert x["b"][1] != x["b"][1]  # the input is not modified
    json.dumps(out, allow_nan=False)


def _plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=60)


def test_progress_prints_plain_lines_when_not_a_terminal():
    console = _plain_console()
    with ProgressBar("critic", total=10, console=console, every=4) as bar:
        for i in range(1, 11):
            bar.update(status=f"loss {i}" if i % 3 == 0 else None)
    lines = console.file.getvalue().splitlines()
    assert [ln.split("  ")[0] for ln in lines] == ["critic 4/10", "critic 8/10", "critic 10/10"]
    assert "loss 3" in lines[0] and "loss 6" in lines[1] and "loss 9" in lines[2]  # the last status is kept
    assert all(re.search(r"  \d+ s$", ln) for ln in lines)
    assert "\x1b" not in console.file.getvalue()


def test_progress_default_every_resume_and_status_only_updates():
    console = _plain_console()
    with ProgressBar("round", total=40, completed=30, console=console) as bar:  # every = 40 // 20 = 2
        bar.update(advance=0, status="gold 0.5")
        assert console.file.getvalue() == ""  # a status alone prints nothing
        for _ in range(3):
            bar.update()
        bar.update(advance=7)  # straight to the last step, past a multiple of `every`
    lines = console.file.getvalue().splitlines()
    assert [ln.split("  ")[0] for ln in lines] == ["round 32/40", "round 40/40"]
    assert all("gold 0.5" in ln for ln in lines)


def test_progress_line_is_flushed_at_once():
    class Recorder(io.StringIO):
        flushed = ""

        def flush(self):
            self.flushed = self.getvalue()

    console = Console(file=Recorder(), force_terminal=False)
    with ProgressBar("sft", total=3, console=console, every=1) as bar:
        bar.update(status="first")
        assert "sft 1/3  first" in console.file.flushed


def test_disabled_progress_prints_nothing():
    for terminal in (False, True):
        console = Console(file=io.StringIO(), force_terminal=terminal)
        with ProgressBar("critic", total=5, console=console, every=1, enabled=False) as bar:
            for _ in range(5):
                bar.update(status="x")
        assert console.file.getvalue() == ""


def test_progress_on_a_terminal_draws_a_rich_bar():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with ProgressBar("critic-train", total=4, console=console, every=1) as bar:
        assert bar._progress is not None and len(bar._progress.columns) == 6
        for _ in range(4):
            bar.update(status="acc 0.9")
    out = console.file.getvalue()
    assert "critic-train" in out and "4/4" in out and "acc 0.9" in out
    assert "critic-train 1/4" not in out  # no plain lines on a terminal
    with ProgressBar("r", total=2, console=Console(file=io.StringIO(), force_terminal=True), remaining=False) as bar:
        assert len(bar._progress.columns) == 5
