"""`selfplay train` on a mesh of the 8 fake CPU devices equals the single-device run; the trained state is sharded;
a checkpoint written on one mesh resumes on another.

The tiny config, 2 rounds (round 2 refreshes the critic), sampling at temperature 1 with the same keys (random bits
do not depend on the layout, and the logits agree closely enough that no token flips, so greedy decoding is not
needed). Tolerances (float32): per-round and eval metrics within 1e-4 relative plus 2e-6 absolute (the policy loss
and the sampling log-prob gap are ~1e-7 quantities: pure rounding); every float in the final checkpoint (policy,
Adam moments, critic) within 1e-5 absolute. The metrics computed on the host from the sampled tokens (gold grades,
lengths, diversity) must be exactly equal, which shows the essays are the same token for token.
critic.centering_coef=0.1: without it the Bradley-Terry gradient of the critic head's bias is exactly zero, and Adam
blows its rounding noise (which differs between layouts) up to a step of ~lr in the refresh.
Cost: three layouts compile (1 device, (2, 2, 2), (8, 1, 1)): ~35 s with a warm compilation cache, ~2 min cold on
2 busy cores.
"""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from rich.console import Console

from selfplay import checkpoint
from selfplay.jobs.critic import train_critic
from selfplay.jobs.sft import pretrain
from selfplay.run.setup import CHECKPOINT_DIR, resolve_config
from selfplay.run.state import RunState
from selfplay.run.train import TB_DIR, train
from selfplay.tracking import read_jsonl

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")

OVERRIDES = ["run.rounds=2", "run.checkpoint_every=1", "critic.centering_coef=0.1"]
ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
MESH_222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
MESH_811 = ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"]
RTOL, ATOL, PARAM_ATOL = 1e-4, 2e-6, 1e-5
# Means of zero-centred advantages times ratios near 1: O(1) terms that cancel to ~0, so float32 rounding that depends
# on the layout's reduction order shows up at a few 1e-6 absolute (seen: 2.9e-6 on 2 processes); the params' tolerance.
CANCELLING = ("loss/policy", "advantages/mean")
FROM_TOKENS = ("gold/", "completions/", "diversity/")  # host-side functions of the sampled tokens: exact
NOT_REPRODUCIBLE = ("timing/", "perf/")
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory holding the SFT policy and the initial critic (single-device jobs)."""
    run = tmp_path_factory.mktemp("sharded") / "base"
    cfg = resolve_config(run, TINY, OVERRIDES)
    pretrain(cfg, run, progress=False, log=QUIET.print)
    train_critic(cfg, run, progress=False, log=QUIET.print)
    return run


def _train(prepared, dst, mesh, devices=None):
    shutil.copytree(prepared, dst)
    return train(dst, None, OVERRIDES + mesh, progress=False, console=QUIET, devices=devices)


@pytest.fixture(scope="module")
def single(prepared):
    run = prepared.parent / "single"
    return run, _train(prepared, run, ONE_DEVICE, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def sharded(prepared):
    """The (2, 2, 2) run, with the state it checkpoints at each round (as it was on the devices)."""
    run = prepared.parent / "sharded"
    saved = {}
    original = RunState.save

    def spy(self, ckpt, metrics=None):
        saved[self.round] = (self.learner, self.critic.state)
        original(self, ckpt, metrics)

    RunState.save = spy
    try:
        result = _train(prepared, run, MESH_222)
    finally:
        RunState.save = original
    return run, result, saved


def _rows(run):
    return read_jsonl(run / TB_DIR / "metrics.jsonl")


def _checkpoint(run):
    with checkpoint.Checkpointer(run / CHECKPOINT_DIR, read_only=True) as ck:
        flat, meta = ck.restore(ck.latest_step())
    return {k: np.asarray(v) for k, v in flat.items()}, meta


def assert_metrics_close(got: dict, want: dict, where: str) -> None:
    keys = {k for k in want if not k.startswith(NOT_REPRODUCIBLE)}
    assert keys == {k for k in got if not k.startswith(NOT_REPRODUCIBLE)}, where
    for k in sorted(keys):
        if k == "step" or k.startswith(FROM_TOKENS) or want[k] is None:  # None: NaN in JSON
            assert got[k] == want[k], f"{where} {k}: {got[k]} != {want[k]}"
        else:
            atol = PARAM_ATOL if k in CANCELLING else ATOL
            np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=atol, err_msg=f"{where} {k}")


def assert_state_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(got[k], w, rtol=0, atol=PARAM_ATOL, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], w, err_msg=k)


def assert_meta_close(got: dict, want: dict) -> None:
    """Host-side state: exact (the critic's pair pool and labeller, the prompt position: the same essays went in),
    but the monitor's history of critic rewards (floats from the devices)."""
    got, want = dict(got), dict(want)
    got_monitor, want_monitor = got.pop("monitor"), want.pop("monitor")
    assert got == want
    np.testing.assert_allclose(got_monitor.pop("rewards"), want_monitor.pop("rewards"), rtol=RTOL, atol=ATOL)
    assert got_monitor == want_monitor


def test_training_on_a_2x2x2_mesh_equals_the_single_device_run(single, sharded):
    (one_run, one_result), (run, result, _) = single, sharded
    want, got = _rows(one_run), _rows(run)
    assert [r["step"] for r in got] == [1, 2] and "loss/critic" in got[1]
    for r_got, r_want in zip(got, want):
        assert_metrics_close(r_got, r_want, f"round {r_want['step']}")
    for part in ("sft", "final"):
        assert_metrics_close(result[part], one_result[part], part)
    (got_state, got_meta), (want_state, want_meta) = _checkpoint(run), _checkpoint(one_run)
    assert_state_close(got_state, want_state)
    assert_meta_close(got_meta, want_meta)


def test_the_trained_state_lives_in_shards_across_the_mesh(sharded):
    _, _, saved = sharded
    state, critic_state = saved[2]
    q = state.params["layers"]["q_proj"].get_value()  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor") and len(q.sharding.device_set) == 8
    assert q.addressable_shards[0].data.shape == (1, 32 // 2, 2 // 2, 16)
    assert state.params["embed"].get_value().sharding.spec == P("tensor", "fsdp")  # [vocab, embed]
    mu = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state) if "mu" in jax.tree_util.keystr(path)]
    assert [m.sharding.spec for m in mu] == [x.sharding.spec for x in jax.tree.leaves(state.params)]
    assert state.step.sharding.spec == P() and len(state.step.sharding.device_set) == 8
    # The critic: members on a leading (unsplit) ensemble axis, then the trunk's own layout.
    cq = critic_state.params["trunk"]["layers"]["q_proj"].get_value()  # [ensemble, layers, embed, heads, head_dim]
    assert cq.sharding.spec == P(None, None, "fsdp", "tensor")


def test_a_checkpoint_written_on_2x2x2_resumes_on_8x1x1(single, sharded):
    (one_run, _), (run, _, _) = single, sharded
    resumed = run.parent / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / CHECKPOINT_DIR / "2")  # as if the (2, 2, 2) run had stopped after round 1
    console = Console(record=True, width=200)
    train(resumed, None, OVERRIDES + MESH_811, progress=False, console=console)
    assert "after round 1" in console.export_text()
    assert_metrics_close(_rows(resumed)[-1], _rows(one_run)[1], "resumed round 2")
    (got_state, got_meta), (want_state, want_meta) = _checkpoint(resumed), _checkpoint(one_run)
    assert_state_close(got_state, want_state)
    assert_meta_close(got_meta, want_meta)
