"""Test set-up: 8 fake CPU devices for sharding tests, set once here before jax starts a backend."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compile time dominates the tiny test models; optimised code buys nothing here.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir", os.environ.get("SELFPLAY_TEST_JAX_CACHE", "/tmp/selfplay-test-jax-cache"))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory holding configs/tiny.yaml's SFT policy (pretrained once per test module that asks)."""
    from pathlib import Path

    from selfplay.cli import main

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert main(["pretrain", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir
