"""Two JAX processes on localhost (jax.distributed, gloo CPU collectives, 2 fake CPU devices each): a data-parallel
learner update on a global batch split across them leaves identical params in both, equal to the single-process
update; a checkpoint saved by both restores onto a mesh that splits the weights across them.

Tolerance: 1e-5 absolute (float32) against the single-process update; the two processes' replicas must be equal.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import multiprocess_worker as case
from selfplay import learner
from selfplay.models import transformer

TOL = 1e-5
N_PROCESSES = 2
TIMEOUT_S = 300  # a hung collective fails the test instead of blocking CI
WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 35-50 s on 2 busy cores with a cold compilation cache (two processes start jax and compile)
def test_two_processes_data_parallel_update_equals_single_process(tmp_path):
    port = free_port()
    procs = []
    for pid in range(N_PROCESSES):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        env |= {
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(N_PROCESSES),
            "JAX_PROCESS_ID": str(pid),
            "SELFPLAY_TEST_JAX_CACHE": jax.config.jax_compilation_cache_dir,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(tmp_path), str(tmp_path / "ckpt")],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
        )

    # The single-process reference, computed while the workers run.
    graphdef, params = transformer.split(transformer.create_model(case.MODEL, 0))
    state = learner.init_train_state(case.LEARNER, params)
    want_state, want_metrics = case.make_update_step(graphdef)(state, case.host_batch(), jax.random.key(3))
    want_params = case.flat(jax.device_get(want_state.params))

    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} failed (exit {p.returncode}):\n{log[-4000:]}"

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
