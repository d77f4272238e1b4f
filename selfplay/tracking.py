"""Metrics out: TensorBoard event files (no TensorFlow needed) and a JSON-lines twin for tests and plots.

One `Tracker` per run; only the process that owns logging (process 0 on many hosts) writes.
`ProgressBar` is the one progress display (a rich bar on a terminal, plain lines in a log file) and
`json_safe` the one NaN-to-null conversion for JSON reports.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
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
    """Writes scalars, text and histograms to `logdir` (TensorBoard) and scalars to `logdir/metrics.jsonl`.

    `resume_from=N`: the run goes on after step N, so whatever an earlier run logged after N (rounds it ran past its
    last checkpoint, then replays) is dropped: metrics.jsonl keeps its rows up to N, and TensorBoard is told to purge
    later steps (a SessionLog START at N + 1, TensorBoard's own restart mechanism)."""

    def __init__(self, logdir: str | Path, *, enabled: bool = True, resume_from: int | None = None):
        self.logdir = Path(logdir)
        self.enabled = enabled
        self._writer: EventFileWriter | None = None
        self._jsonl = None
        if enabled:
            self.logdir.mkdir(parents=True, exist_ok=True)
            jsonl = self.logdir / "metrics.jsonl"
            if resume_from is not None and jsonl.is_file():
                kept = [r for r in read_jsonl(jsonl) if r["step"] <= resume_from]
                tmp = jsonl.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(jsonl)
            self._writer = EventFileWriter(str(self.logdir))
            if resume_from is not None:
                start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
                self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=resume_from + 1, session_log=start))
            self._jsonl = open(jsonl, "a", buffering=1)

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


def json_safe(x: Any) -> Any:
    """A JSON-ready copy of `x`: dicts, lists and tuples are copied recursively (tuples become lists), NumPy
    scalars and arrays become Python numbers and lists, and non-finite floats (NaN, +-inf) become None,
    since JSON has no NaN. Everything else (ints, bools, strings, None) is returned as it is."""
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class ProgressBar:
    """Progress of a loop of `total` steps, readable on a terminal and in a log file alike.

        with ProgressBar("critic", total=steps, enabled=show) as bar:
            for i in range(steps):
                ...
                bar.update(status=f"loss {loss:.3f}")   # advance one step, show this status

    On a terminal (`console.is_terminal`; default console `Console()`) it is a rich bar with the columns
    desc | bar | done/total | status | elapsed [| remaining when `remaining`], left on screen at the end.
    Elsewhere (stdout redirected to a file) there is no bar: the line `f"{desc} {done}/{total}  {status}  {s} s"`
    is printed, and flushed, each time `done` reaches a multiple of `every` (default max(1, total // 20)) and
    always when it reaches `total`. `enabled=False` prints nothing. `completed` is where a resumed loop starts.
    `update(advance=0, status=...)` only changes the status; the status given last is kept and shown.
    Use it as a context manager: the rich bar lives between `__enter__` and `__exit__`.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        enabled: bool = True,
        completed: int = 0,
        console: Console | None = None,
        every: int | None = None,
        remaining: bool = True,
    ):
        self.desc = desc
        self.total = int(total)
        self.enabled = enabled
        self.completed = int(completed)
        self.console = console if console is not None else Console()
        self.every = max(1, int(every) if every is not None else self.total // 20)
        self.remaining = remaining
        self.status = ""
        self.terminal = enabled and self.console.is_terminal
        self._start = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> "ProgressBar":
        self._start = time.monotonic()
        if self.terminal:
            columns: list[Any] = [
                TextColumn(self.desc),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
            ]
            if self.remaining:
                columns.append(TimeRemainingColumn())
            self._progress = Progress(*columns, console=self.console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.desc, total=self.total, completed=self.completed, status=self.status)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
            self._task = None

    def update(self, advance: int = 1, status: str | None = None) -> None:
        """Advance by `advance` steps (0: none) and, when given, replace the status shown."""
        before = self.completed
        self.completed += int(advance)
        if status is not None:
            self.status = status
        if not self.enabled:
            return
        if self.terminal:
            if self._progress is not None and self._task is not None:
                fields = {"status": status} if status is not None else {}
                self._progress.update(self._task, advance=advance, **fields)
            return
        if advance <= 0:
            return
        crossed = self.completed // self.every > before // self.every
        last = before < self.total <= self.completed
        if crossed or last:
            self._print_line()

    def _print_line(self) -> None:
        elapsed = time.monotonic() - self._start
        line = f"{self.desc} {self.completed}/{self.total}  {self.status}  {elapsed:.0f} s"
        self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        try:
            self.console.file.flush()
        except (AttributeError, OSError, ValueError):
            pass
