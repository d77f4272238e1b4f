"""A critic on disk, the one place that reads and writes one: orbax state + JSON meta + pairs.jsonl in a directory,
and the host-side meta (labeller, refreshes, pair pool) that a run checkpoint carries too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from selfplay import checkpoint, sharding
from selfplay.config import Config, to_dict
from selfplay.critic.critic import Critic, critic_from_state
from selfplay.critic.judge import JudgeHead
from selfplay.critic.model import abstract_state
from selfplay.critic.pairs import POOL_ROW, POOL_ROW_OPTIONAL, check_pool_row
from selfplay.data import read_jsonl
from selfplay.tokenizer import Tokenizer
from selfplay.world import World

CRITIC_DIR = "critic"  # a run directory's initial critic
PAIRS_FILE = "pairs.jsonl"
FORMAT_VERSION = 2  # 2: the state is stored as checkpoint.flatten_tree paths


def critic_meta(critic: Critic) -> dict:
    """The JSON side of a saved critic: config, label budget counters, labeller state, pool size, refreshes."""
    lab = critic.labeller
    return {
        "format": FORMAT_VERSION,
        "critic": to_dict(critic.ccfg),
        "step": int(critic.state.step),
        "refreshes": critic.refreshes,
        "label_budget": lab.budget if lab else critic.ccfg.label_budget,
        "labels_used": lab.used if lab else 0,
        "labeller": lab.state_dict() if lab else None,
        "pool_size": len(critic.pool),
        "pool_heldout": int(sum(critic.pool.heldout)),
        "pool_synthetic": critic.pool.synthetic,
        "judge": None if critic.judge_head is None else
        {"head": critic.judge_head.to_dict(), "phrasing": sorted(critic.judge_phrasing)},
    }


def host_meta(critic: Critic) -> dict:
    """`critic_meta` plus the whole pair pool: what a run checkpoint needs to resume the critic's host side."""
    return critic_meta(critic) | {"pool": critic.pool.rows()}


def restore_host(critic: Critic, meta: dict, pool_rows: list[dict] | None = None) -> None:
    """Put back the host side saved by `critic_meta` / `host_meta`: refreshes, the labeller's counter and stream,
    and the pool (from `pool_rows`, else meta["pool"]), replacing whatever the critic held."""
    critic.refreshes = int(meta.get("refreshes", 0))
    judged = meta.get("judge")
    critic.judge_head = None if not judged else JudgeHead.from_dict(judged["head"])
    critic.judge_phrasing = frozenset(judged["phrasing"]) if judged else frozenset()
    critic.feature_cache, critic.feature_phrasing = {}, frozenset()
    if critic.labeller is not None and meta.get("labeller"):
        critic.labeller.load_state_dict(meta["labeller"])
    rows = meta.get("pool", []) if pool_rows is None else pool_rows
    old = critic.pool
    critic.pool = type(old)(old.tokenizer, old.max_len, old.heldout_fraction, old.seed)
    critic.pool.add_rows(rows)


def save_critic(directory: str | Path, critic: Critic) -> Path:
    """Write the state (orbax), meta JSON and the pair pool (`pairs.jsonl`) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (PAIRS_FILE + ".tmp")
    tmp.write_text(critic.pool.to_jsonl())
    tmp.replace(directory / PAIRS_FILE)
    checkpoint.save_once(directory, checkpoint.flatten_tree(critic.state), critic_meta(critic), step=int(critic.state.step))
    return directory


def save_replacing(directory: str | Path, critic: Critic) -> None:
    """Save to a fresh sibling directory, then swap it in: an older critic there is replaced whole (its later steps
    would otherwise shadow this one), and a failed save leaves it untouched."""
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    for d in (tmp, old):
        if d.exists():
            shutil.rmtree(d)
    save_critic(tmp, critic)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def has_critic(directory: str | Path) -> bool:
    return checkpoint.has_checkpoint(directory)


def load_critic(
    directory: str | Path, cfg: Config, tokenizer: Tokenizer, *, world: World | None = None, layout: sharding.Layout | None = None
) -> Critic:
    """The critic saved in `directory`. Shape-defining settings (critic.model, critic.ensemble_size) and critic.judge
    (a judge's transformer was never trained) must match the saved ones; the labeller (world labels) resumes its
    budget counter and random stream. With a `layout`, the state is read straight into its shards (the restore target
    carries the shardings; a multi-process run needs it) and the critic's steps are pinned to the mesh."""
    directory = Path(directory)
    if not directory.is_dir():
        raise checkpoint.CheckpointError(f"no critic at {directory}; run `selfplay critic train` first")
    c = cfg.critic
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise checkpoint.CheckpointError(f"no complete critic checkpoint in {directory.absolute()}")
        meta = ckpt.restore_meta(step)  # meta first: a shape mismatch gets a clear message, not orbax's
        saved = meta.get("critic", {})
        mismatch = [
            f"critic.{k}: saved {saved.get(k, default)!r}, config {v!r}"
            # a critic saved before critic.judge existed is a transformer critic
            for k, v, default in (("model", to_dict(c.model), None), ("ensemble_size", c.ensemble_size, None), ("judge", c.judge, False))
            if saved.get(k, default) != v
        ]
        if mismatch:
            raise checkpoint.CheckpointError(
                f"the critic in {directory} was saved with other settings: " + "; ".join(mismatch)
                + " (set them as saved, or train a new critic in a new run directory)"
            )
        if meta.get("format") != FORMAT_VERSION:
            raise checkpoint.CheckpointError(
                f"the critic in {directory} has format {meta.get('format')}, this version reads {FORMAT_VERSION}; "
                "train it again with `selfplay critic train`"
            )
        target = abstract_state(c)
        if layout is not None:
            target = sharding.with_shardings(target, layout.shardings(target))
        flat, meta = ckpt.restore(step, checkpoint.flatten_tree(target))
    critic = critic_from_state(cfg, tokenizer, checkpoint.unflatten_like(target, flat), world=world, layout=layout)
    pairs_path = directory / PAIRS_FILE
    rows = read_jsonl(pairs_path, POOL_ROW, POOL_ROW_OPTIONAL, check=check_pool_row) if pairs_path.is_file() and pairs_path.stat().st_size else []
    restore_host(critic, meta, rows)
    return critic
