"""Kill `selfplay train` at every phase, run the same command again each time, and compare the end bit for bit with a
run that was never interrupted: SFT, the initial critic, the rounds, the checkpoints and the logged metrics."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from selfplay import checkpoint
from selfplay.run.setup import CHECKPOINT_DIR, TB_DIR
from selfplay.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ARGS = ["--config", TINY, "--no-progress", "run.rounds=4", "run.checkpoint_every=1"]
NOT_REPRODUCIBLE = ("timing/", "perf/")

# (what the run prints when it reaches the phase, seconds to wait after it before the SIGKILL)
KILL_POINTS = [
    (r"1/3 SFT", 3.0),  # during SFT (30 steps, about 6 s): nothing saved yet
    (r"2/3 critic", 1.0),  # the policy saved, the critic's pairs being sampled and labelled
    (r"round 1/4", 0.0),  # right after round 1: its checkpoint is being written
    (r"round 3/4", 0.3),  # in round 4, after round 3's checkpoint
]


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "selfplay.cli", "train", "--run-dir", str(run_dir), *ARGS]


def _run_until(run_dir: Path, pattern: str, delay: float, timeout: float = 300) -> str:
    """Start the run, SIGKILL its whole process group `delay` s after a line matches `pattern`; returns the output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cmd(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    seen, hit = [], threading.Event()

    def read() -> None:
        for line in proc.stdout:
            seen.append(line)
            if re.search(pattern, line):
                hit.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + timeout
        while not hit.wait(0.05) and proc.poll() is None and time.time() < deadline:
            pass
        assert hit.is_set(), f"never reached {pattern!r}:\n" + "".join(seen)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before the kill at {pattern!r}:\n" + "".join(seen)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=5)
    return "".join(seen)


def _state(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    with checkpoint.Checkpointer(run_dir / CHECKPOINT_DIR, read_only=True) as ck:
        flat, meta = ck.restore(ck.latest_step())
    rows = [{k: v for k, v in r.items() if not k.startswith(NOT_REPRODUCIBLE)} for r in read_jsonl(run_dir / TB_DIR / "metrics.jsonl")]
    return {k: np.asarray(v) for k, v in flat.items()}, meta, rows


@pytest.mark.slow
def test_a_run_killed_at_every_phase_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight), check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    for pattern, delay in KILL_POINTS:
        _run_until(killed, pattern, delay)
    done = subprocess.run(_cmd(killed), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout  # the last kill came after a checkpoint

    (fa, ma, ra), (fb, mb, rb) = _state(straight), _state(killed)
    assert ma["round"] == mb["round"] == 4
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    assert ma == mb
    assert [r["step"] for r in rb] == [1, 2, 3, 4]  # each round logged once
    assert ra == rb
