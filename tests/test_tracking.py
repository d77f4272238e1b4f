"""TensorBoard event files read back with TensorBoard's own reader, and the JSON-lines twin."""

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfplay.tracking import Tracker, read_jsonl


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
