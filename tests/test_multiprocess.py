"""Two JAX processes on localhost (jax.distributed, gloo CPU collectives, 2 fake CPU devices each).

1. A data-parallel learner update on a global batch split across them leaves identical params in both, equal to the
   single-process update; a checkpoint saved by both restores onto a mesh that splits the weights across them.
2. `selfplay train` run by both processes on a (data 2, fsdp 2) mesh of their 4 devices (policy and critic restored
   onto that mesh, each process feeding its devices their rows), resumed by both for one more round, then
   `selfplay eval` by both: the same rounds, checkpoint and evaluation as one process on a mesh of 4 devices of the
   same shape, and only process 0 writes TensorBoard and the console.

Tolerance: 1e-5 absolute (float32) against the single-process update; the two processes' replicas must be equal.
The `selfplay train` comparison uses tests/test_loop_sharded.py's tolerances (see its docstring).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from rich.console import Console

import multiprocess_worker as case
from selfplay import checkpoint, learner
from selfplay.jobs.critic import train_critic
from selfplay.jobs.sft import pretrain
from selfplay.models import transformer
from selfplay.run.evaluate import EVAL_FILE
from selfplay.run.setup import CHECKPOINT_DIR, resolve_config
from selfplay.run.train import TB_DIR, train
from test_loop_sharded import TINY, _checkpoint, _rows, assert_meta_close, assert_metrics_close, assert_state_close

TOL = 1e-5
N_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 300  # a hung collective fails the test instead of blocking CI
WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], log_dir: Path, name: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """N_PROCESSES `python argv...` joined by jax.distributed on a free localhost port; output to log_dir/<name>_<id>.log."""
    port = free_port()
    procs, logs = [], []
    for pid in range(N_PROCESSES):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        env |= {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(N_PROCESSES),
            "JAX_PROCESS_ID": str(pid),
            # What tests/conftest.py sets in this process.
            "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "PYTHONUNBUFFERED": "1",
        }
        log = log_dir / f"{name}_{pid}.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


FAILED = ("selfplay: error:", "Traceback (most recent call last)")


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Every process's output once all have exited 0. A failed process does not exit at once: jax's shutdown waits
    (minutes) for the others, which wait for it in a collective. So when one exits non-zero or prints an error, or
    TIMEOUT_S passes, all are killed; the failure shows each process's log (its start, where the error is, and end)."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs) or any(m in log.read_text() for log in logs for m in FAILED):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    if any(p.returncode for p in procs):
        shown = [text if len(text) < 4000 else f"{text[:2000]}\n[...]\n{text[-2000:]}" for text in texts]
        report = [f"process {pid}: exit {p.returncode} ({log}):\n{text}" for pid, (p, log, text) in enumerate(zip(procs, logs, shown))]
        pytest.fail(f"a process failed or hung (limit {TIMEOUT_S} s; exit -9: killed here)\n" + "\n\n".join(report))
    return texts


@pytest.mark.slow  # 35-50 s on 2 busy cores with a cold compilation cache (two processes start jax and compile)
def test_two_processes_data_parallel_update_equals_single_process(tmp_path):
    procs, logs = launch([str(WORKER), str(tmp_path), str(tmp_path / "ckpt")], tmp_path, "worker")

    # The single-process reference, computed while the workers run.
    graphdef, params = transformer.split(transformer.create_model(case.MODEL, 0))
    state = learner.init_train_state(case.LEARNER, params)
    want_state, want_metrics = case.make_update_step(graphdef)(state, case.host_batch(), jax.random.key(3))
    want_params = case.flat(jax.device_get(want_state.params))

    finish(procs, logs)
    results = [dict(np.load(tmp_path / f"process_{pid}.npz")) for pid in range(N_PROCESSES)]
    assert [bool(r["is_logging_process"]) for r in results] == [True, False]
    for key, want in want_params.items():
        replicas = [r[f"params/{key}"] for r in results]
        np.testing.assert_array_equal(replicas[0], replicas[1], err_msg=key)
        np.testing.assert_allclose(replicas[0], np.asarray(want), atol=TOL, rtol=0, err_msg=key)
        for r in results:  # restored from the sharded checkpoint, gathered from both processes
            np.testing.assert_array_equal(r[f"restored/params/{key}"], replicas[0], err_msg=key)
    for name, want in want_metrics.items():
        np.testing.assert_allclose(results[0][f"metrics/{name}"], np.asarray(want), atol=TOL, rtol=0, err_msg=name)


PREPARE = ["critic.centering_coef=0.1"]  # see tests/test_loop_sharded.py
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"]  # weights split within a process, rows across both
TRAIN = ["run.checkpoint_every=1", *MESH]  # critic.refresh_every=2 (tiny): round 2 refreshes the critic


def _tensorboard_writers(run: Path) -> set[int]:
    """The process ids in the names of the event files (events.out.tfevents.<time>.<host>.<pid>.<n>)."""
    return {int(f.name.split(".")[-2]) for f in (run / TB_DIR).glob("events.out.tfevents.*")}


@pytest.mark.slow  # 85-100 s on 2 busy cores: SFT and critic here, three two-process launches, one reference run
def test_selfplay_train_on_two_processes_equals_one_process_resumes_and_evaluates(tmp_path):
    quiet = Console(quiet=True)
    base = tmp_path / "base"
    cfg = resolve_config(base, TINY, PREPARE)
    pretrain(cfg, base, progress=False, log=quiet.print)
    train_critic(cfg, base, progress=False, log=quiet.print)
    two, one = tmp_path / "two", tmp_path / "one"
    shutil.copytree(base, two)
    shutil.copytree(base, one)
    selfplay = ["-m", "selfplay.cli"]

    procs, logs = launch([*selfplay, "train", "--run-dir", str(two), "--no-progress", "run.rounds=2", *TRAIN], tmp_path, "train")
    # The reference while they run: one process, 4 of its devices in the same mesh, 3 rounds straight.
    train(one, None, ["run.rounds=3", *TRAIN], progress=False, console=quiet, devices=jax.devices()[:4])
    out = finish(procs, logs)
    assert "round 2/2" in out[0] and "round 1/2" not in out[1], "only process 0 writes the console"
    writers = {procs[0].pid}
    assert _tensorboard_writers(two) == writers, "only process 0 writes TensorBoard"
    assert [r["step"] for r in _rows(two)] == [1, 2] and "loss/critic" in _rows(two)[1]

    procs, logs = launch([*selfplay, "train", "--run-dir", str(two), "--no-progress", "run.rounds=3", *TRAIN], tmp_path, "resume")
    out = finish(procs, logs)
    assert "after round 2" in " ".join(out[0].split())  # the console wraps at 80 columns
    writers.add(procs[0].pid)
    assert _tensorboard_writers(two) == writers, "only process 0 writes TensorBoard"

    # The same essays (the metrics computed from their tokens are exact), updates and critic as on one process.
    want, got = _rows(one), _rows(two)
    assert [r["step"] for r in got] == [1, 2, 3], "a resumed run must neither repeat nor skip a round"
    for r_got, r_want in zip(got, want):
        assert_metrics_close(r_got, r_want, f"round {r_want['step']}")
    want_state, want_meta = _checkpoint(one)
    # A checkpoint written by several processes restores only onto a target: here, whole arrays on one device.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in want_state.items()}
    with checkpoint.Checkpointer(two / CHECKPOINT_DIR, read_only=True) as ck:
        got_state, got_meta = ck.restore(ck.latest_step(), target)
    got_state = {k: np.asarray(v) for k, v in got_state.items()}
    assert_state_close(got_state, want_state)
    assert_meta_close(got_meta, want_meta)
    trained = json.loads((two / EVAL_FILE).read_text())
    for part in ("sft", "final"):
        assert_metrics_close(trained[part], json.loads((one / EVAL_FILE).read_text())[part], part)

    # `selfplay eval` restores the checkpoint onto the two processes' mesh: the table of the params trained in memory.
    procs, logs = launch([*selfplay, "eval", "--run-dir", str(two), "--json"], tmp_path, "eval")
    out = finish(procs, logs)
    assert '"final"' not in out[1], "only process 0 prints the table"
    table = json.loads(out[0].strip().splitlines()[-1])
    assert table["step"] == 3
    assert_metrics_close(table["final"], trained["final"], "eval")
