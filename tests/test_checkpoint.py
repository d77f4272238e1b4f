"""Orbax checkpoints: keep-last-N plus best, NaN refusal, exact restore, clear errors."""

import resource
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay.checkpoint import CHECKSUM_FILE, CheckpointError, Checkpointer, has_checkpoint, restore_latest, save_once, tree_is_finite


def _state(s: int) -> dict:
    return {"w": jnp.full((3, 2), float(s)), "nested": {"count": jnp.asarray(s, jnp.int32)}, "key": jax.random.key_data(jax.random.key(s))}


def test_keeps_last_n_and_the_best(tmp_path):
    gold = [0.1, 0.9, 0.2, 0.3, 0.4, 0.35]
    with Checkpointer(tmp_path / "ck", keep_last=2, best_metric="gold") as ck:
        for s, g in enumerate(gold):
            ck.save(s, _state(s), meta={"position": s * 10}, metrics={"gold": g})
        ck.wait()
        assert ck.steps() == [1, 4, 5]
        assert ck.best_step() == 1
        state, meta = ck.restore(1)
    np.testing.assert_array_equal(state["w"], np.full((3, 2), 1.0))
    assert meta == {"position": 10}


def test_nan_state_is_refused_and_the_good_checkpoint_stays(tmp_path):
    with Checkpointer(tmp_path / "ck", keep_last=1) as ck:
        ck.save(1, _state(1))
        ck.wait()
        bad = _state(2)
        bad["w"] = bad["w"].at[0, 0].set(jnp.nan)
        with pytest.raises(CheckpointError, match="NaN/Inf"):
            ck.save(2, bad)
        ck.wait()
        assert ck.steps() == [1]
    state, _, step = restore_latest(tmp_path / "ck")
    assert step == 1 and bool(jnp.all(state["w"] == 1.0))


def test_restore_with_target_keeps_dtypes(tmp_path):
    tree = {"a": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3), "b": jnp.ones((4,), jnp.int32)}
    save_once(tmp_path / "one", tree, meta={"note": "x"})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    restored, meta, step = restore_latest(tmp_path / "one", target)
    assert step == 0 and meta == {"note": "x"}
    assert restored["a"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored["a"], np.float32), np.asarray(tree["a"], np.float32))


def test_missing_checkpoints_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
        restore_latest(tmp_path / "nothing")
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(3, _state(3))
        ck.wait()
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .*available: \[3\]"):
            ck.restore(7)


def test_tree_is_finite():
    assert tree_is_finite({"a": jnp.ones(2), "i": jnp.arange(3)})
    assert not tree_is_finite({"a": jnp.array([1.0, jnp.inf])})


def test_flatten_round_trip_of_namedtuples_and_nnx_state(tmp_path):
    import optax
    from flax import nnx

    from selfplay.checkpoint import flatten_tree, unflatten_like
    from selfplay.config import ModelConfig
    from selfplay.models import transformer

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16)
    _, params = transformer.split(transformer.create_model(cfg, 0))
    opt = optax.adamw(1e-3)
    tree = {"params": params, "opt": opt.init(params), "step": jnp.int32(7)}
    flat = flatten_tree(tree)
    assert "params/layers/q_proj/value" in flat and all(isinstance(k, str) for k in flat)
    save_once(tmp_path / "flat", flat)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    restored_flat, _, _ = restore_latest(tmp_path / "flat", flatten_tree(abstract))
    back = unflatten_like(abstract, restored_flat)
    assert isinstance(back["params"], nnx.State)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, tree)
    with pytest.raises(CheckpointError, match="lacks"):
        unflatten_like(abstract, {})


def test_has_checkpoint_needs_a_complete_step(tmp_path):
    assert not has_checkpoint(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # asking does not create the directory
    (tmp_path / "empty").mkdir()
    assert not has_checkpoint(tmp_path / "empty")
    (tmp_path / "partial" / "5.orbax-checkpoint-tmp-123").mkdir(parents=True)  # an interrupted save
    assert not has_checkpoint(tmp_path / "partial")
    save_once(tmp_path / "one", _state(2), step=2)
    assert has_checkpoint(tmp_path / "one")
    assert has_checkpoint(str(tmp_path / "one"))


def _random_state(seed: int) -> dict:
    # random values: orbax compresses, and a file limit must be reached by a real write
    return {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(512, 512)), jnp.float32)}


def test_flipped_bytes_are_caught_by_the_checksums_and_name_the_file(tmp_path):
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, _random_state(1))
        ck.wait()
        step_dir = tmp_path / "ck" / "1"
        assert (step_dir / CHECKSUM_FILE).is_file()
        data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 8])
        data.write_bytes(bytes(raw))
        with pytest.raises(CheckpointError, match=f"{data}.*differs from its checksum"):
            ck.restore(1)
        (step_dir / CHECKSUM_FILE).unlink()  # a step saved without checksums is restored on orbax's checks alone
        ck.restore(1)


def test_a_failed_asynchronous_save_is_one_error_and_the_last_good_checkpoint_stays(tmp_path):
    """A full disk, simulated by a file-size limit: orbax's background write fails; the error reaches the caller as one
    CheckpointError at the next wait, and the previous step is intact and restorable."""
    with Checkpointer(tmp_path / "ck", keep_last=1) as ck:
        ck.save(1, _random_state(1))
        ck.wait()
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            with pytest.raises(CheckpointError, match=r"cannot save step 2 .*File too large.*last good checkpoint is kept"):
                ck.save(2, _random_state(2))
                ck.wait()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)
        assert ck.steps() == [1]
        state, _ = ck.restore(1)
    np.testing.assert_array_equal(state["w"], _random_state(1)["w"])
