"""Scale-out on JAX's own engine: the device mesh, logical->mesh axis rules, where every array lives, multi-host start-up.

The rest of the package is sharding-agnostic; this module turns `mesh` config into NamedShardings and jitted steps.
It is over 400 lines because every placement decision lives here, so no other module needs to know about meshes.

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

Placement. `place` moves a tree onto given shardings (a no-op for arrays already there; host values are copied in
from the host). `Layout` (a mesh and its rules, from `mesh` config) is the handle the self-play loop holds: it
places states by their logical names and whole batches over the batch axes, and pins the loop's jitted steps (the
learner update, reference log-probs, the critic's score and train steps) to the mesh, moving their inputs first,
since jit refuses a committed argument sharded otherwise than its in_shardings.

Multi-host: one process per host. `initialize_distributed` first (before any JAX computation). Each process feeds
its share of the prompts (`process_share`, then `shard_batch` assembles the global batch), or every process holds
the same whole batch and `shard_global_batch` hands each device its rows (what the loop does: every process draws
the same prompts from the same seed); host code that needs whole arrays reads them with `to_host` (gathered across
processes); only process 0 logs (`is_logging_process`); every process calls the checkpointer (orbax writes each
process's shards).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from selfplay.config import DEFAULT_MESH_RULES, MESH_AXES, Config, ConfigError, MeshConfig, ModelConfig, UserError
from selfplay.models import transformer
from selfplay.types import Scores

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


def place(tree: T, shardings: Any) -> T:
    """`tree` (arrays, numpy, PRNG keys) moved onto `shardings` (same structure): arrays already there are returned
    as they are (so a donated state stays donatable). Host values, and in a multi-process run a process-local array
    bound for a mesh that spans processes, are copied in from the host; every process must pass the same value."""

    def one(x: Any, s: NamedSharding) -> Any:
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and (s.is_fully_addressable or not x.is_fully_addressable):
            return jax.device_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def shard_state(state: T, mesh: Mesh, rules: Rules) -> T:
    """An existing state (params, TrainState, CriticState, ...) moved onto the mesh, sharded by the rules."""
    return place(state, param_shardings(state, mesh, rules))


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


def shard_global_batch(host_batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """The WHOLE batch (numpy, leading axis = batch; identical in every process) -> global arrays split over the
    batch axes, each device receiving only its rows. With one process the same as `shard_batch`."""
    return place(host_batch, batch_shardings(host_batch, mesh, rules))


def to_host(tree: Any) -> Any:
    """numpy copies of whole arrays, for host-side work (decoding, the gold grader, diversity): an array of which
    this process holds only some shards is gathered from every process (a collective: all processes call it)."""

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


KV_LAYER_AXES = (BATCH, "kv_heads", None, "head_dim")  # each layer's K and V in `transformer.KVCache`
KV_VALID_AXES = (BATCH, None)


def kv_cache_constraint(mesh: Mesh, rules: Rules) -> Callable[[transformer.KVCache], transformer.KVCache]:
    """For `actor.make_sampler(constrain_cache=...)`: pins the cache's rows to the batch axes and its kv heads to
    the `kv_heads` rule (each device keeps the keys and values of its own rows and heads)."""

    def pin(x: jax.Array, axes: tuple) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, logical_sharding(x.shape, axes, mesh, rules))

    def constrain(cache: transformer.KVCache) -> transformer.KVCache:
        return transformer.KVCache(
            tuple(pin(k, KV_LAYER_AXES) for k in cache.k_bgsd),
            tuple(pin(v, KV_LAYER_AXES) for v in cache.v_bgsd),
            pin(cache.valid_bs, KV_VALID_AXES),
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


def shard_critic_step(
    train_step: Callable, state_shardings: Any, mesh: Mesh, rules: Rules, *, members: int, rows: int, labels: bool = False
) -> Callable:
    """`critic.make_train_step`'s step pinned to the mesh: the state keeps `state_shardings`, each member's rows
    (tokens_knl [members, rows, l], len_kn [members, rows], and with `labels` the token heads' `TokenLabels`, each
    like tokens_knl) are split over the batch axes, the members by the `ensemble` rule (default: not split;
    `[ensemble, data]` trains members on separate devices)."""
    tok = logical_sharding((members, rows, 1), ("ensemble", BATCH, None), mesh, rules)
    lens = logical_sharding((members, rows), ("ensemble", BATCH), mesh, rules)
    rep = replicated(mesh)
    in_sh = (state_shardings, tok, lens, tok) if labels else (state_shardings, tok, lens)
    return jax.jit(train_step, in_shardings=in_sh, out_shardings=(state_shardings, rep), donate_argnums=0)


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
# The loop's handle: a mesh, its rules, and its steps pinned to them
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Where the self-play loop's arrays live: a mesh and its logical rules (see the module docstring)."""

    mesh: Mesh
    rules: Rules

    @classmethod
    def from_config(cls, mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Layout:
        return cls(make_mesh(mesh_cfg, devices), logical_rules(mesh_cfg))

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    def shardings(self, state: Any) -> Any:
        return param_shardings(state, self.mesh, self.rules)

    def place_state(self, state: T) -> T:
        """Params, a TrainState, a CriticState, ...: sharded by their logical axis names, the rest replicated."""
        return place(state, self.shardings(state))

    def place_batch(self, host_batch: T) -> T:
        """A whole batch (numpy or arrays, identical in every process): split over the batch axes."""
        return shard_global_batch(host_batch, self.mesh, self.rules)

    def update_step(self, update_step: Callable) -> Callable:
        """`learner.make_update_step`'s step pinned by `shard_update_step` (shardings from the first call's state
        and batch; donation kept), its inputs moved there first."""
        pinned: list[tuple[Callable, tuple]] = []

        def call(state: Any, batch: Any, rng: jax.Array) -> tuple[Any, dict]:
            if not pinned:
                state_sh, batch_sh = self.shardings(state), batch_shardings(batch, self.mesh, self.rules)
                step = shard_update_step(update_step, state_sh, batch_sh, self.mesh)
                pinned.append((step, (state_sh, batch_sh, self.replicated)))
            step, in_sh = pinned[0]
            return step(*place((state, batch, rng), in_sh))

        return call

    def reference_step(self, reference_logprobs: Callable) -> Callable:
        """`learner.make_reference_logprobs`'s function with its [B, L] log-probs split over the batch axes like
        the rollout's rows (the params and rollout keep the shardings they come with)."""
        jitted: dict[tuple, Callable] = {}

        def call(ref_params: Any, rollout: Any) -> jax.Array:
            shape = rollout.tokens_bl.shape
            if shape not in jitted:
                out = logical_sharding(shape, (BATCH, None), self.mesh, self.rules)
                jitted[shape] = jax.jit(reference_logprobs, out_shardings=out)
            return jitted[shape](ref_params, rollout)

        return call

    def critic_fns(self, fns: T, state: Any, *, members: int, rows: int) -> T:
        """A `selfplay.critic.CriticFns` pinned to the mesh, for a state shaped like `state`: train_step by
        `shard_critic_step` (inputs moved first; donation kept); score's Scores split over the batch axes (members
        by the `ensemble` rule); score_tokens' rows split over the batch axes and its Scores replicated, because
        host code reads them whole. observe is left as it is (scalars)."""
        state_sh = self.shardings(state)
        tok = logical_sharding((members, rows, 1), ("ensemble", BATCH, None), self.mesh, self.rules)
        lens = logical_sharding((members, rows), ("ensemble", BATCH), self.mesh, self.rules)
        train = shard_critic_step(fns.train_step, state_sh, self.mesh, self.rules, members=members, rows=rows)
        train_labelled = shard_critic_step(fns.train_step, state_sh, self.mesh, self.rules, members=members, rows=rows, labels=True)
        scores: dict[tuple, Callable] = {}
        tokens: dict[tuple, Callable] = {}

        def train_step(state: Any, tokens_knl: Any, len_kn: Any, labels: Any = None) -> tuple[Any, dict]:
            if labels is None:
                return train(*place((state, tokens_knl, len_kn), (state_sh, tok, lens)))
            label_sh = jax.tree.map(lambda _: tok, labels)
            return train_labelled(*place((state, tokens_knl, len_kn, labels), (state_sh, tok, lens, label_sh)))

        def score(state: Any, rollout: Any, prompt_width: int) -> Scores:
            key = (rollout.tokens_bl.shape, prompt_width)
            if key not in scores:
                b = rollout.tokens_bl.shape[0]
                out = Scores(
                    logical_sharding((b,), (BATCH,), self.mesh, self.rules),
                    logical_sharding((members, b), ("ensemble", BATCH), self.mesh, self.rules),
                )
                scores[key] = jax.jit(lambda s, r: fns.score(s, r, prompt_width), out_shardings=out)
            return scores[key](state, rollout)

        def score_tokens(state: Any, tokens_nl: Any, len_n: Any) -> Scores:
            shape = np.shape(tokens_nl)
            if shape not in tokens:
                in_sh = (state_sh, *batch_shardings((tokens_nl, len_n), self.mesh, self.rules))
                step = jax.jit(fns.score_tokens, in_shardings=in_sh, out_shardings=self.replicated)
                tokens[shape] = (step, in_sh)
            step, in_sh = tokens[shape]
            return step(*place((state, tokens_nl, len_n), in_sh))

        return fns._replace(train_step=train_step, score=score, score_tokens=score_tokens)


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
