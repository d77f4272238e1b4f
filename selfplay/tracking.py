"""Metrics out: TensorBoard event files (no TensorFlow needed) and a JSON-lines twin for tests and plots.

One `Tracker` per run; only the process that owns logging (process 0 on many hosts) writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util


def _histogram_proto(values: np.ndarray, bins: int) -> summary_pb2.HistogramProto:
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return summary_pb2.HistogramProto()
    counts, edges = np.histogram(values, bins=bins)
    return summary_pb2.HistogramProto(
        min=float(values.min()),
        max=float(values.max()),
        num=float(values.size),
        sum=float(values.sum()),
        sum_squares=float(np.square(values).sum()),
        bucket_limit=[float(e) for e in edges[1:]],
        bucket=[float(c) for c in counts],
    )


class Tracker:
    """Writes scalars, text and histograms to `logdir` (TensorBoard) and scalars to `logdir/metrics.jsonl`."""

    def __init__(self, logdir: str | Path, *, enabled: bool = True):
        self.logdir = Path(logdir)
        self.enabled = enabled
        self._writer: EventFileWriter | None = None
        self._jsonl = None
        if enabled:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = EventFileWriter(str(self.logdir))
            self._jsonl = open(self.logdir / "metrics.jsonl", "a", buffering=1)

    def _add(self, step: int, value: summary_pb2.Summary.Value) -> None:
        assert self._writer is not None
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value]))
        self._writer.add_event(event)

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log every finite number of `metrics` under its tag; non-finite values are logged as NaN."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        for tag, v in metrics.items():
            x = float(v)
            self._add(step, summary_pb2.Summary.Value(tag=tag, simple_value=x))
            row[tag] = x if math.isfinite(x) else None
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(row) + "\n")

    def text(self, step: int, tag: str, markdown: str) -> None:
        if not self.enabled:
            return
        meta = text_metadata.create_summary_metadata(display_name=tag, description="")
        tensor = tensor_util.make_tensor_proto(np.array([markdown.encode("utf-8")], dtype=object))
        self._add(step, summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor))

    def histogram(self, step: int, tag: str, values: Any, bins: int = 30) -> None:
        if not self.enabled:
            return
        self._add(step, summary_pb2.Summary.Value(tag=tag, histo=_histogram_proto(np.asarray(values), bins)))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """The scalar rows a Tracker wrote, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
