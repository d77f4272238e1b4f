"""Checkpoints: the only module that imports orbax.

One `Checkpointer` per directory wraps an orbax `CheckpointManager` with two items per step: `state`
(a pytree of arrays) and `meta` (JSON: counters, RNG states of host-side generators, data position).
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when
complete); a state with NaN/Inf is refused, so a bad step never replaces a good checkpoint. Once a save is complete,
`CHECKSUM_FILE` in its step directory records the SHA-256 of every file orbax wrote; a restore checks them first, so
damage that orbax itself would read back without complaint (flipped bytes, a truncated data file) is a
CheckpointError naming the file. A step without that file (saved by an older version, or killed between the commit
and the checksums) is restored on orbax's own checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from selfplay.config import UserError


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or would be unsafe to write; the message names the path."""


CHECKSUM_FILE = "selfplay_checksums.json"
_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _step_files(step_dir: Path) -> dict[str, Path]:
    return {p.relative_to(step_dir).as_posix(): p for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUM_FILE}


def _one_line(message: str, limit: int = 300) -> str:
    """The first line of a library's error, its middle cut when long: tensorstore names the file first and the
    operating system's reason (`File too large`, `No space left on device`) last."""
    line = message.splitlines()[0] if message else ""
    return line if len(line) <= limit else line[: limit // 2] + " ... " + line[-limit // 2:]


def write_checksums(step_dir: Path) -> None:
    """Record the SHA-256 of every file of a complete step directory (atomically: a temporary file, then a rename)."""
    sums = {name: _sha256(p) for name, p in _step_files(step_dir).items()}
    tmp = step_dir / (CHECKSUM_FILE + ".tmp")
    tmp.write_text(json.dumps(sums, indent=0, sort_keys=True))
    os.replace(tmp, step_dir / CHECKSUM_FILE)


def verify_checksums(step_dir: Path) -> None:
    """CheckpointError naming the first file of `step_dir` that is missing or differs from its recorded SHA-256; a
    step without recorded checksums passes."""
    path = step_dir / CHECKSUM_FILE
    if not path.is_file():
        return
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}): the step cannot be verified") from None
    for name, digest in sums.items():
        f = step_dir / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {CHECKSUM_FILE})")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} differs from its checksum (damaged after it was written)")


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    # One compiled reduction: leaf-by-leaf eager checks cost a dispatch (and, on many hosts, a collective) each.
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def tree_is_finite(tree: Any) -> bool:
    """True when every floating-point leaf of `tree` is free of NaN and Inf."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    if not leaves:
        return True
    return bool(_all_finite(leaves))


class Checkpointer:
    """Keeps the last `keep_last` steps of a directory, plus the best by `best_metric` when given."""

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policies: list[Any] = [pp.LatestN(n=keep_last)]
        if best_metric is not None:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda metrics: float(metrics[best_metric]),
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes orbax write each step's metrics; the preservation policy decides what stays.
            best_fn=(lambda metrics: float(metrics[best_metric])) if best_metric is not None else None,
            best_mode=best_mode,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._unsummed: list[int] = []  # steps saved (maybe still in flight) whose checksums are not written yet

    # -- writing ---------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: dict | None = None, metrics: dict | None = None) -> None:
        """Start an asynchronous save of `state` at `step`; refuses a state containing NaN/Inf."""
        if not tree_is_finite(state):
            raise CheckpointError(
                f"refusing to save step {step} to {self.directory}: the state holds NaN/Inf; the last good checkpoint is kept"
            )
        clean_metrics = None
        if metrics is not None:
            clean_metrics = {k: float(v) for k, v in metrics.items() if np.isfinite(float(v))}
        self.wait()  # the previous save must be complete (and summed) before this one starts; orbax would wait too
        with self._save_errors(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})),
                metrics=clean_metrics,
                force=True,
            )
        self._unsummed.append(step)

    @contextlib.contextmanager
    def _save_errors(self, step: int | None) -> Iterator[None]:
        """Any failure of a save (orbax raises OSError, or re-raises an asynchronous save's error, of any type, on the
        next call) as one CheckpointError line."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:
            reason = _one_line(getattr(e, "strerror", None) or str(e) or type(e).__name__)
            what = f"step {step}" if step is not None else "a checkpoint"
            raise CheckpointError(f"cannot save {what} to {self.directory}: {reason}; the last good checkpoint is kept") from None

    def wait(self) -> None:
        """Block until every pending asynchronous save is complete on disk, then record its checksums
        (CheckpointError if a save failed: the last good checkpoint stays)."""
        pending = self._unsummed[-1] if self._unsummed else None
        with self._save_errors(pending):
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                for step in self._unsummed:
                    step_dir = self.directory / str(step)
                    if step_dir.is_dir():  # it may have been removed by the preservation policy already
                        write_checksums(step_dir)
        self._unsummed.clear()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    # -- reading ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None without a metric)."""
        if self.best_metric is None:
            return None
        self._manager.reload()
        return self._manager.best_step()

    def _step(self, step: int | None) -> int:
        """`step`, or the latest when None; a CheckpointError naming the directory when it is not there."""
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (available: {steps or 'none'})")
        return step

    def _restore(self, step: int, **items: Any) -> Any:
        if "state" in items:
            verify_checksums(self.directory / str(step))
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise bare Exceptions for damaged files
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {_one_line(str(e) or type(e).__name__)}") from None

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """Restore (state, meta) at `step` (default: latest). `target` (arrays or ShapeDtypeStructs,
        with shardings where wanted) fixes the tree structure, dtypes and placement. Without a target the arrays
        come back as they were saved, which needs the saving topology: in a multi-process run pass shardings."""
        step = self._step(step)
        state_args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        restored = self._restore(step, state=state_args, meta=ocp.args.JsonRestore())
        return restored["state"], dict(restored["meta"] or {})

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the JSON `meta` of `step` (default: latest), no arrays: what to read before building a target."""
        return dict(self._restore(self._step(step), meta=ocp.args.JsonRestore())["meta"] or {})

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def flatten_tree(tree: Any) -> dict[str, Any]:
    """{"path/to/leaf": array} for any pytree (NamedTuples, nnx.State, optax states): what `Checkpointer` stores
    for states whose node types orbax need not know. Paths are jax key paths, readable in the files."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[jax.tree_util.keystr(path, simple=True, separator="/")] = leaf
    return flat


def unflatten_like(abstract: Any, flat: dict[str, Any]) -> Any:
    """Inverse of `flatten_tree`, shaped like `abstract` (a tree of arrays or ShapeDtypeStructs)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in paths_leaves]
    missing = [k for k in keys if k not in flat]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} entries of the expected state, e.g. {missing[:3]}")
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def save_once(directory: str | Path, state: Any, meta: dict | None = None, step: int = 0) -> None:
    """Write one synchronous checkpoint (e.g. the SFT policy) and wait for it."""
    with Checkpointer(directory, keep_last=1, async_save=False) as ckpt:
        ckpt.save(step, state, meta)


def has_checkpoint(directory: str | Path) -> bool:
    """True when `directory` is a directory holding at least one complete checkpoint step (never raises for a
    missing directory: False)."""
    d = Path(directory)
    if not d.is_dir():
        return False
    with Checkpointer(d, read_only=True) as ckpt:
        return ckpt.latest_step() is not None


def restore_latest(directory: str | Path, target: Any = None) -> tuple[Any, dict, int]:
    """(state, meta, step) of the latest complete checkpoint in `directory`."""
    with Checkpointer(directory, read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {Path(directory).absolute()}")
        state, meta = ckpt.restore(step, target)
        return state, meta, step
