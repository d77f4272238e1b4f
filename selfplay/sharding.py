"""Scale-out on JAX's own engine: the device mesh, logical->mesh axis rules, where every array lives, multi-host start-up.

The rest of the package is sharding-agnostic; this module turns `mesh` config into NamedShardings and jitted steps.

Mesh. Three axes, ("data", "fsdp", "tensor"), sized by `mesh.data/fsdp/tensor` (one of them may be -1: the devices
left over). "data" and "fsdp" both split the batch; "fsdp" also splits the weights (ZeRO-3 style: each device holds
a slice, XLA gathers a layer's weights when it needs them); "tensor" splits heads and the MLP (Megatron style).

Rules. Every parameter carries logical axis names (`out_sharding` metadata, see selfplay.models.transformer); a
rule maps a logical name to mesh axes (`mesh.rules`, defaults in `selfplay.config.DEFAULT_MESH_RULES`). A dimension
whose size does not divide by its mesh axes falls back to the longest prefix of those axes that divides it, in the
end to replicated: a config that shards `kv_heads` over tensor=4 still runs a model with 2 kv heads, with the kv
projections replicated, instead of failing. A mesh axis already used by an earlier dimension of the same array is
skipped (an axis can split only one dimension), and so are mesh axes of size 1.

Birth. Params and optimiser states are made directly sharded: `jax.eval_shape` of the init gives shapes and logical
names, those give shardings, and `jax.jit(init, out_shardings=...)` builds every shard where it lives; nothing is
materialised whole on one device first. Optimiser moments are built by optax with a tree_map over the params, so
they keep each Param's wrapper and logical names and are sharded exactly like their param; counts, hyperparameters
and other non-param leaves are replicated.

Multi-host: one process per host. `initialize_distributed` first (before any JAX computation); each process feeds
its share of the prompts (`process_share`, then `shard_batch` assembles the global batch); only process 0 logs
(`is_logging_process`); every process calls the checkpointer (orbax writes each process's shards).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from selfplay.config import DEFAULT_MESH_RULES, MESH_AXES, Config, ConfigError, MeshConfig, ModelConfig, UserError
from selfplay.models import transformer

BATCH = "batch"
Rules = Mapping[str, tuple[str, ...]]  # logical axis -> mesh axes, in order (empty: replicated)
T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# Mesh and rules
# ----------------------------------------------------------------------------------------------


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 resolved; a ConfigError naming the mesh keys when they do not fit n_devices."""
    mesh_cfg.validate("mesh")
    sizes = [getattr(mesh_cfg, name) for name in MESH_AXES]
    stated = " x ".join(f"mesh.{name} ({size})" for name, size in zip(MESH_AXES, sizes))
    if -1 in sizes:
        auto = MESH_AXES[sizes.index(-1)]
        fixed = math.prod(s for s in sizes if s != -1)
        if n_devices % fixed:
            others = " x ".join(f"mesh.{n}" for n, s in zip(MESH_AXES, sizes) if s != -1)
            raise ConfigError(
                f"mesh.{auto}=-1 takes the devices left over, but the {n_devices} devices do not divide by {others} = {fixed}"
            )
        sizes[sizes.index(-1)] = n_devices // fixed
    elif math.prod(sizes) != n_devices:
        raise ConfigError(
            f"{stated} = {math.prod(sizes)} devices, but there are {n_devices}; make the product match "
            "or set one of mesh.data, mesh.fsdp, mesh.tensor to -1 (all remaining devices)"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh over `devices` (default: every device of every process), laid out by
    `jax.make_mesh` so that neighbouring mesh positions are neighbours on the interconnect (TPU torus, NVLink)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: XLA propagates shardings through the model code, which names no mesh axis itself.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(mesh_cfg: MeshConfig) -> dict[str, tuple[str, ...]]:
    """The defaults, overridden by each `mesh.rules` pair: {logical name: mesh axes}."""
    mesh_cfg.validate("mesh")
    rules: dict[str, tuple[str, ...]] = {}
    for logical, target in (*DEFAULT_MESH_RULES, *mesh_cfg.rules):
        rules[logical] = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return rules


def logical_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules, *, what: str = "an array") -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions carry `logical_axes` (None: not split), with the
    divisibility fallback of the module docstring."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"{what} has shape {tuple(shape)} but {len(logical_axes)} logical axes {tuple(logical_axes)}")
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for size, name in zip(shape, logical_axes):
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise ValueError(f"{what} carries logical axis '{name}', which has no mesh rule (known: {', '.join(rules)})")
        axes = [a for a in rules[name] if a not in used and mesh.shape[a] > 1]
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def logical_sharding(
    shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules, *, what: str = "an array"
) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(shape, logical_axes, mesh, rules, what=what))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------
# Params and states
# ----------------------------------------------------------------------------------------------


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for `abstract_tree` (arrays or ShapeDtypeStructs), in the same pytree structure: usable as
    jit in/out shardings, `jax.device_put` targets and restore targets (`with_shardings`).

    Works on any state: params (an nnx.State; its Variables then hold NamedShardings), an optimiser state from
    `jax.eval_shape(optimizer.init, params)`, a TrainState or CriticState. A leaf wrapped in an nnx.Variable with
    logical names (`out_sharding` metadata) is sharded by the rules; every other array (step counters, optimiser
    counts, hyperparameters, the KL controller) is replicated.
    """

    def one(path: tuple, x: Any) -> Any:
        if _is_variable(x):
            value = x.get_value()
            if not hasattr(value, "shape"):  # e.g. optax.MaskedNode: nothing stored
                return x
            names = x.get_metadata("out_sharding", None)
            if names is None or len(names) != len(value.shape):
                return x.replace(replicated(mesh))
            what = f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')}"
            return x.replace(logical_sharding(value.shape, names, mesh, rules, what=what))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_tree, is_leaf=_is_variable)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: a restore target that places each array where it will be used."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def init_sharded(init_fn: Callable[..., T], *args: Any, mesh: Mesh, rules: Rules) -> T:
    """`init_fn(*args)` built shard by shard in place: eval_shape -> shardings -> jit(init_fn, out_shardings).

    `init_fn` returns a state pytree (see `param_shardings`); args are arrays (already placed) or pytrees of them.
    E.g. `init_sharded(functools.partial(learner.init_train_state, cfg, optimizer=opt), params, mesh=, rules=)` or
    `init_sharded(lambda: critic.init_state(cfg.critic, seed), mesh=, rules=)`.
    """
    shardings = param_shardings(jax.eval_shape(init_fn, *args), mesh, rules)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def init_params(model_cfg: ModelConfig, seed: int, mesh: Mesh, rules: Rules) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a fresh policy, each param born sharded (same values as `transformer.create_model`)."""
    graphdef, _ = transformer.split(transformer.abstract_model(model_cfg))
    params = init_sharded(lambda: transformer.split(transformer.create_model(model_cfg, seed))[1], mesh=mesh, rules=rules)
    return graphdef, params


def shard_state(state: T, mesh: Mesh, rules: Rules) -> T:
    """An existing state (params, TrainState, CriticState, ...) moved onto the mesh, sharded by the rules."""
    return jax.device_put(state, param_shardings(state, mesh, rules))


# ----------------------------------------------------------------------------------------------
# Batches, rollouts, the KV cache
# ----------------------------------------------------------------------------------------------


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """Every leaf split along its leading (batch) axis over the `batch` rule's mesh axes; scalars replicated."""

    def one(x: Any) -> NamedSharding:
        if not x.shape:
            return replicated(mesh)
        return logical_sharding(x.shape, (BATCH,) + (None,) * (len(x.shape) - 1), mesh, rules)

    return jax.tree.map(one, batch)


def shard_batch(host_batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """This process's rows (numpy or jax arrays, leading axis = batch) -> global arrays split over the batch axes.

    With one process `host_batch` is the whole batch. With several, each passes its own consecutive share (see
    `process_share`) and the global batch is their concatenation in process order.
    """
    n_proc = jax.process_count()

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, replicated(mesh))
        global_shape = (x.shape[0] * n_proc, *x.shape[1:])
        sharding = logical_sharding(global_shape, (BATCH,) + (None,) * (x.ndim - 1), mesh, rules)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, host_batch)


KV_CACHE_AXES = transformer.KVCache(
    k_nbshd=("layers", BATCH, None, "kv_heads", "head_dim"),
    v_nbshd=("layers", BATCH, None, "kv_heads", "head_dim"),
    valid_bs=(BATCH, None),
)


def kv_cache_constraint(mesh: Mesh, rules: Rules) -> Callable[[transformer.KVCache], transformer.KVCache]:
    """For `actor.make_sampler(constrain_cache=...)`: pins the cache's rows to the batch axes and its kv heads to
    the `kv_heads` rule (each device keeps the keys and values of its own rows and heads)."""

    def constrain(cache: transformer.KVCache) -> transformer.KVCache:
        return transformer.KVCache(
            *(
                jax.lax.with_sharding_constraint(x, logical_sharding(x.shape, axes, mesh, rules))
                for x, axes in zip(cache, KV_CACHE_AXES)
            )
        )

    return constrain


# ----------------------------------------------------------------------------------------------
# Jitted steps with explicit shardings (donation kept)
# ----------------------------------------------------------------------------------------------


def shard_update_step(update_step: Callable, state_shardings: Any, batch_sharding: Any, mesh: Mesh) -> Callable:
    """`learner.make_update_step`'s step pinned to the mesh: the state keeps its shardings across steps (so the
    donated buffers are reused and nothing recompiles), the batch as `batch_sharding` (from `batch_shardings`),
    metrics replicated."""
    rep = replicated(mesh)
    return jax.jit(
        update_step, in_shardings=(state_shardings, batch_sharding, rep), out_shardings=(state_shardings, rep), donate_argnums=0
    )


def shard_critic_step(train_step: Callable, state_shardings: Any, mesh: Mesh, rules: Rules, *, members: int, rows: int) -> Callable:
    """`critic.make_train_step`'s step pinned to the mesh: the state keeps `state_shardings`, each member's rows
    (tokens_knl [members, rows, l], len_kn [members, rows]) are split over the batch axes, the members by the
    `ensemble` rule (default: not split; `[ensemble, data]` trains members on separate devices)."""
    tok = logical_sharding((members, rows, 1), ("ensemble", BATCH, None), mesh, rules)
    lens = logical_sharding((members, rows), ("ensemble", BATCH), mesh, rules)
    rep = replicated(mesh)
    return jax.jit(train_step, in_shardings=(state_shardings, tok, lens), out_shardings=(state_shardings, rep), donate_argnums=0)


def shard_sampler(sampler: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """`actor.make_sampler`'s sampler with its Rollout split over the batch axes (its metrics replicated); the
    params and prompts keep the shardings they come with (place them with `shard_state` / `shard_batch`)."""
    jitted: dict[tuple, Callable] = {}

    def sample(graphdef, params, prompt_tokens_bp, prompt_len_b, rng, samples_per_prompt=None):
        key = (prompt_tokens_bp.shape, samples_per_prompt)
        if key not in jitted:
            call = functools.partial(sampler, samples_per_prompt=samples_per_prompt)
            rollout, metrics = jax.eval_shape(call, graphdef, params, prompt_tokens_bp, prompt_len_b, rng)
            out = (batch_shardings(rollout, mesh, rules), jax.tree.map(lambda _: replicated(mesh), metrics))
            jitted[key] = jax.jit(call, out_shardings=out)
        return jitted[key](graphdef, params, prompt_tokens_bp, prompt_len_b, rng)

    return sample


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


def initialize_distributed(cfg: Config | MeshConfig) -> bool:
    """Start `jax.distributed` when this is one process of many; call it first, before any JAX computation.

    Fields (`mesh.coordinator_address`, `mesh.num_processes`, `mesh.process_id`) win over the environment
    ($JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID); whatever is still unset is auto-detected by
    jax on TPU pods, SLURM and Open MPI. A no-op (False) for a single process: nothing set and `mesh.multihost`
    false, or one process. Returns True when jax.distributed is running.
    """
    m = cfg.mesh if isinstance(cfg, Config) else cfg
    if jax.distributed.is_initialized():
        return True
    address = m.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = m.num_processes or _env_int("JAX_NUM_PROCESSES")
    process_id = m.process_id if m.process_id >= 0 else _env_int("JAX_PROCESS_ID")
    if num_processes == 1 or not (m.multihost or address or num_processes):
        return False
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise UserError(f"initialize_distributed must run before any JAX computation: {e}") from None
        raise
    return True


def is_logging_process() -> bool:
    """Only process 0 writes TensorBoard, logs and progress bars."""
    return jax.process_index() == 0


def process_share(items: Sequence[T], *, what: str = "prompts") -> Sequence[T]:
    """This process's consecutive share of a global list (process i gets block i of process_count equal blocks)."""
    n, count, index = len(items), jax.process_count(), jax.process_index()
    if n % count:
        raise UserError(f"{n} {what} do not split evenly over {count} processes; use a multiple of {count}")
    return items[index * n // count : (index + 1) * n // count]
