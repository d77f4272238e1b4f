"""`selfplay generate`: essays from a run directory's policy, as JSON lines (with gold scores for world prompts); which
policy writes them (a saved round's, or the SFT/imported one) is `selfplay.run.state.load_round_policy`'s rule.

With --best-of K the policy writes K essays per prompt and the run's critic (RUN_DIR/critic; a self-judging one reads
with the run's SFT policy) keeps the best: `{"prompt", "completion", "critic", "critic_all"}` lines, a training file
for `run.ptx_file` (ReST's grow step: the model writes, grades itself, and the best is what it learns from).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from selfplay.actor import Generator
from selfplay.chat import load_chat_template
from selfplay.config import UserError
from selfplay.critic import CRITIC_DIR, attach_judge, has_critic, load_critic, score_texts
from selfplay.data import read_prompts
from selfplay.policy import load_policy, load_run_config
from selfplay.run.state import load_round_policy
from selfplay.world import World


def run(run_dir: str | Path, *, overrides: list[str], n: int, prompt: str | None, prompts_file: str | None, seed: int,
        step: int | None = None, best_of: int = 1) -> int:
    """Print one JSON line per prompt, written by round `step`'s policy (None: the latest saved round, else the SFT
    policy; 0: the SFT policy); which one goes to stderr. With a chat template in the run (an imported chat model),
    --prompt is sent as a user turn. best_of > 1: the critic's pick of that many (module docstring)."""
    run_dir = Path(run_dir)
    if best_of < 1:
        raise UserError(f"--best-of must be >= 1, got {best_of}")
    if best_of > 1 and not has_critic(run_dir / CRITIC_DIR):
        raise UserError(f"--best-of {best_of} needs the run's critic ({run_dir / CRITIC_DIR}); run `selfplay critic train --run-dir {run_dir}` first")
    cfg = load_run_config(run_dir, overrides)
    world = World.from_config(cfg.world)
    chat = load_chat_template(run_dir)
    if prompt is not None:  # a chat model is asked as a user, in its own template, as a prompts file's conversations are
        prompts = [chat.render([{"role": "user", "content": prompt}]) if chat else prompt]
    elif prompts_file is not None:
        prompts = read_prompts(prompts_file, chat)
    else:
        if n < 1:
            raise UserError(f"--n must be >= 1, got {n}")
        prompts = world.sample_prompts(n, np.random.default_rng([seed, 7]), "mixed")
    shown = [prompt] if prompt is not None else prompts
    step, policy = load_round_policy(run_dir, cfg, step)
    print(f"generating with {f'round {step}' if step else 'the SFT or imported policy'} of {run_dir}", file=sys.stderr, flush=True)
    gen = Generator(policy, cfg.actor, batch=min(len(prompts), cfg.actor.prompts_per_round))
    essays = gen.generate(prompts, jax.random.key(seed), samples_per_prompt=best_of)
    if best_of > 1:
        critic = load_critic(run_dir / CRITIC_DIR, cfg, policy.tokenizer)
        if cfg.critic.judge:  # a judge reads with the SFT policy, whichever round writes (round 0: the one writing)
            attach_judge(critic, load_policy(run_dir, cfg) if step else policy)
        scores = np.asarray(score_texts(critic, [p for p in prompts for _ in range(best_of)], essays).rewards_b)
        for i, (p, shown_p) in enumerate(zip(prompts, shown)):
            group = scores[i * best_of : (i + 1) * best_of]
            best = essays[i * best_of + int(np.argmax(group))]
            row = {"prompt": shown_p, "completion": best, "critic": float(group.max()), "critic_all": group.tolist()}
            print(json.dumps(row), flush=True)
        return 0
    for p, shown_p, e in zip(prompts, shown, essays):
        row: dict = {"prompt": shown_p, "essay": e}
        if world.parse_prompt(p) is not None:
            row["gold"] = world.grade(p, e).to_dict()
        print(json.dumps(row), flush=True)
    return 0
