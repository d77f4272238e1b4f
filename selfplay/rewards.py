"""Reward functions with TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`, and how they
combine with the critic: critic_weight x the critic's (normalised) score + sum_i weight_i x r_i (config `reward`).

A function that raises, returns the wrong length or a non-finite value stops the round before its update.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from selfplay.config import ConfigError, RewardConfig, UserError

RewardFn = Callable[..., Sequence[float | None]]


class RewardFnError(UserError):
    """A reward function failed during a round; the message names the function and the round."""


@dataclasses.dataclass(frozen=True)
class NamedRewardFn:
    """One of reward.fns: `name` (the function's __name__, as in TRL's `rewards/<name>/mean`), its config key."""

    name: str
    fn: RewardFn
    weight: float
    key: str


def import_reward_fn(ref: str, key: str) -> RewardFn:
    """The callable "package.module:function" names; a ConfigError naming `key` when it cannot be imported."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:  # ModuleNotFoundError included; the message names the missing module
        raise ConfigError(f"{key}: cannot import module '{module_name}' of {ref!r}: {e} (is it installed, or on PYTHONPATH?)") from None
    except Exception as e:  # the module itself fails while importing
        raise ConfigError(f"{key}: importing module '{module_name}' of {ref!r} raised {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module '{module_name}' has no attribute '{attr}' ({ref!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {ref!r} is a {type(obj).__name__}, not a callable reward function")
    return obj


def load_reward_fns(cfg: RewardConfig, prefix: str = "reward") -> list[NamedRewardFn]:
    """reward.fns imported, each with its weight; two with the same name (their metrics would collide) are an error."""
    fns: list[NamedRewardFn] = []
    for i, (ref, weight) in enumerate(zip(cfg.fns, cfg.resolved_weights)):
        key = f"{prefix}.fns[{i}]"
        fn = import_reward_fn(ref, key)
        name = getattr(fn, "__name__", None) or type(fn).__name__
        clash = next((f for f in fns if f.name == name), None)
        if clash is not None:
            raise ConfigError(f"{key}: {ref!r} is named '{name}' like {clash.key}; its rewards/{name}/* metrics would collide")
        fns.append(NamedRewardFn(name, fn, weight, key))
    return fns


def _as_rewards(out: Any, n: int) -> tuple[np.ndarray, str | None]:
    """(the function's output as float64 [n] with NaN for None, what is wrong with it or None)."""
    r = np.full(n, np.nan)
    if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__"):
        return r, f"returned a {type(out).__name__}, expected a list of {n} floats or None"
    values = list(out)
    if len(values) != n:
        return r, f"returned {len(values)} rewards for {n} completions"
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return r, f"returned {v!r} ({type(v).__name__}) as reward {i}, expected a float or None"
        if not math.isfinite(v):
            return r, f"returned {v} as reward {i} (None means 'does not apply')"
        r[i] = float(v)
    return r, None


class Rewards:
    """The run's reward: the critic's weight and the imported reward.fns."""

    def __init__(self, cfg: RewardConfig):
        self.critic_weight = cfg.critic_weight
        self.fns = load_reward_fns(cfg)

    @property
    def critic_only(self) -> bool:
        """The reward is the critic's score itself (the default): nothing to call, nothing to add."""
        return not self.fns and self.critic_weight == 1.0

    def call(self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, list], rnd: int | None) -> np.ndarray:
        """Each function's rewards for the batch, float64 [F, B] with NaN where it returned None. A function that
        raises or returns a wrong length or a non-finite value is a RewardFnError naming it and round `rnd` (None:
        the held-out evaluation)."""
        n = len(completions)
        out = np.full((len(self.fns), n), np.nan)
        for j, f in enumerate(self.fns):
            try:
                raw = f.fn(prompts=list(prompts), completions=list(completions), **{k: list(v) for k, v in columns.items()})
            except Exception as e:
                problem: str | None = f"raised {type(e).__name__}: {e}"
            else:
                out[j], problem = _as_rewards(raw, n)
            if problem is not None:
                where, then = (f"round {rnd}", "the round stops before its update") if rnd is not None else (
                    "held-out evaluation", "the evaluation stops")
                raise RewardFnError(f"{where}: reward function {f.name} ({f.key}) {problem}; {then}")
        return out

    def total(self, base_b: np.ndarray | None, r_fb: np.ndarray) -> np.ndarray:
        """critic_weight x base + sum_i weight_i x r_i, None (NaN) counting 0 (TRL's nansum). float32 [B]. With
        critic_weight 0 the base is left out (None: a run without a critic), so a non-finite critic score cannot
        reach the learner."""
        w_f = np.array([f.weight for f in self.fns], np.float64)
        fn_sum_b = np.nansum(w_f[:, None] * r_fb, axis=0) if self.fns else np.zeros(r_fb.shape[1])
        base = self.critic_weight * np.asarray(base_b, np.float64) if self.critic_weight else 0.0
        return (base + fn_sum_b).astype(np.float32)

    def metrics(self, critic_b: np.ndarray | None, r_fb: np.ndarray, total_b: np.ndarray) -> dict[str, float]:
        """TRL's figures: `reward/mean` and `/std` of the total reward the learner maximised (the critic's own move to
        `reward/critic_mean` and `/std`; none without a critic), `rewards/<name>/mean` and `/std` over the rows each
        function applied to (NaN when none)."""
        out = {"reward/mean": float(total_b.mean()), "reward/std": float(total_b.std())}
        if critic_b is not None:
            out |= {"reward/critic_mean": float(critic_b.mean()), "reward/critic_std": float(critic_b.std())}
        for f, r in zip(self.fns, r_fb):
            applied = r[~np.isnan(r)]
            out[f"rewards/{f.name}/mean"] = float(applied.mean()) if applied.size else float("nan")
            out[f"rewards/{f.name}/std"] = float(applied.std()) if applied.size else float("nan")
        return out
