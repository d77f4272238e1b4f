"""Test set-up: 8 fake CPU devices for sharding tests, set once here before jax starts a backend."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compile time dominates the tiny test models; optimised code buys nothing here.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir", os.environ.get("SELFPLAY_TEST_JAX_CACHE", "/tmp/selfplay-test-jax-cache"))
