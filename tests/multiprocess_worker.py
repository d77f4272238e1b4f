"""One process of tests/test_multiprocess.py: a data-parallel learner update on localhost, then a sharded checkpoint.

    python tests/multiprocess_worker.py OUT_DIR CKPT_DIR

The parent sets, before this process imports jax: XLA_FLAGS (fake CPU devices), JAX_PLATFORMS=cpu,
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by `sharding.initialize_distributed`), and
JAX_DISABLE_MOST_OPTIMIZATIONS, JAX_COMPILATION_CACHE_DIR (the compilation settings the tests share).
Writes OUT_DIR/process_<id>.npz: this process's own replica of the updated params, the metrics, and the
params restored from CKPT_DIR onto an fsdp mesh that spans both processes (gathered).
The case (model, batch, learner) lives here so that the test builds the identical single-process update.
"""

from __future__ import annotations

import functools
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from selfplay import checkpoint, learner, sharding
from selfplay.config import LearnerConfig, MeshConfig, ModelConfig
from selfplay.models import transformer
from selfplay.types import Rollout

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
LEARNER = LearnerConfig(lr=1e-3, kl_coef=0.0)
G, PW, T, B = 2, 4, 4, 16


def host_batch() -> learner.Batch:
    """The global batch (numpy, identical in every process): random completions of 1..T tokens, random rewards."""
    rng = np.random.default_rng(0)
    prompt_len_b = np.repeat(rng.integers(1, PW + 1, B // G), G).astype(np.int32)
    tokens_bl = rng.integers(2, MODEL.vocab_size, (B, PW + T)).astype(np.int32)
    tokens_bl[:, :PW][np.arange(PW)[None, :] < PW - prompt_len_b[:, None]] = 0
    mask_bl = np.zeros((B, PW + T), np.float32)
    mask_bl[:, PW:] = np.arange(T)[None, :] < rng.integers(1, T + 1, B)[:, None]
    zeros_bl = np.zeros((B, PW + T), np.float32)
    rollout = Rollout(tokens_bl, prompt_len_b, mask_bl, zeros_bl, np.zeros(B, bool))
    return learner.Batch(rollout, rng.standard_normal(B).astype(np.float32), zeros_bl)


def make_update_step(graphdef):
    logprob_fn = functools.partial(transformer.token_logprobs, graphdef)
    return learner.make_update_step(LEARNER, group_size=G, prompt_width=PW, logprob_fn=logprob_fn)


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def main(out_dir: str, ckpt_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert sharding.initialize_distributed(MeshConfig()), "the parent must set JAX_COORDINATOR_ADDRESS etc."
    pid = jax.process_index()

    # Data parallel over every device of both processes: params replicated, each process feeds its half of the rows.
    mesh_cfg = MeshConfig(data=-1)
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.logical_rules(mesh_cfg)
    graphdef, params = sharding.init_params(MODEL, 0, mesh, rules)
    init = functools.partial(learner.init_train_state, LEARNER)
    state = sharding.init_sharded(init, params, mesh=mesh, rules=rules)
    state_sh = sharding.param_shardings(state, mesh, rules)
    local = jax.tree.map(sharding.process_share, host_batch())
    batch = sharding.shard_batch(local, mesh, rules)
    step = sharding.shard_update_step(make_update_step(graphdef), state_sh, sharding.batch_shardings(batch, mesh, rules), mesh)
    state, metrics = step(state, batch, jax.random.key(3))
    out = {f"params/{k}": np.asarray(x.addressable_data(0)) for k, x in flat(state.params).items()}
    out |= {f"metrics/{k}": np.asarray(x.addressable_data(0)) for k, x in metrics.items()}

    # Every process saves its shards; the restore target splits the weights over both processes (fsdp=4).
    with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
        ckpt.save(1, flat(state))
    fsdp_cfg = MeshConfig(data=1, fsdp=-1)
    fsdp_mesh = sharding.make_mesh(fsdp_cfg)
    abstract = jax.eval_shape(init, params)
    target = flat(sharding.with_shardings(abstract, sharding.param_shardings(abstract, fsdp_mesh, sharding.logical_rules(fsdp_cfg))))
    restored, _, _ = checkpoint.restore_latest(ckpt_dir, target)
    q = restored["params/layers/q_proj/value"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp"), q.sharding
    assert not q.is_fully_addressable and q.addressable_shards[0].data.shape[1] == MODEL.d_model // 4
    gathered = multihost_utils.process_allgather(
        {k: v for k, v in restored.items() if k.startswith("params/")}, tiled=True
    )
    out |= {f"restored/{k}": np.asarray(v) for k, v in gathered.items()}
    out["is_logging_process"] = np.asarray(sharding.is_logging_process())
    np.savez(f"{out_dir}/process_{pid}.npz", **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
