"""`selfplay collapse`: the model-collapse lab. Generation 0 is the SFT policy on the human corpus; generation n+1 is a
model of the same shape trained on what generation n wrote, under each arm's data policy (replace, accumulate, mix,
graded by the learned critic or by the gold grader). Every generation is judged on the same held-out human essays
(cross-entropy) and held-out prompts (gold score and sub-scores, diversity, tail coverage).

    selfplay collapse --config configs/collapse.yaml --run-dir runs/collapse

RUN_DIR holds gen_0/ (the shared SFT policy, its critic), one directory per arm with data_<n>.jsonl (the essays
generation n wrote, with their grades and whether they were kept) and gen_<n>/ (the policy, metrics.json), plus
collapse.json, collapse.png and tb/<arm>/ (TensorBoard, the generation as the step). A generation is done once its
metrics.json is written; a killed lab resumes from there, and the same command gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from selfplay.actor import Generator
from selfplay.config import ArmConfig, Config, UserError, dump_config, to_dict
from selfplay.jobs import sft
from selfplay.monitors import diversity
from selfplay.policy import Policy, clear_incomplete_policy, has_policy, init_policy, load_policy, save_policy
from selfplay.tracking import Tracker, json_safe
from selfplay.world import World, mean_scores
from selfplay.world.grammar import split_sentences

GEN0 = "gen_0"
RESULTS_FILE = "collapse.json"
PLOT_FILE = "collapse.png"
METRICS_FILE = "metrics.json"
HELDOUT_SEED = 0xC011  # the held-out human essays: a corpus seed the training corpus never uses
EVAL_SEED = 0xE7A2  # the held-out prompts and their sampling keys
HUMAN = "human"

# The figures of each generation, in the table's order: (key, label, format, which way is good).
FIGURES = (
    ("heldout_ce", "human CE", "{:.3f}", "down"),
    ("ce_change", "vs gen 0", "{:+.1%}", "down"),
    ("gold/score", "gold", "{:.3f}", "up"),
    ("gold/coverage", "coverage", "{:.3f}", "up"),
    ("gold/hallucination_rate", "halluc.", "{:.3f}", "down"),
    ("diversity/distinct_2", "distinct-2", "{:.3f}", "up"),
    ("diversity/self_bleu", "self-BLEU", "{:.3f}", "down"),
    ("tail/coverage", "tail", "{:.3f}", "up"),
)


# --- the tail of the human corpus ----------------------------------------------------------------


def essay_items(world: World, essay: str) -> tuple[list[int], list[tuple[str, str, str]]]:
    """(the template index of every sentence the grammar parses, the (kind, attribute, value) of every fact stated)."""
    templates, values = [], []
    for sentence in split_sentences(essay):
        parsed = world.parse_sentence(sentence)
        if parsed is None:
            continue
        t, slots = parsed
        templates.append(t.index)
        if t.role == "fact":
            values.append((t.kind, t.attr, slots["value"]))
    return templates, values


def rarest(counts: Counter, mass: float) -> frozenset:
    """The rarest items (ties broken by the item, so the set is deterministic) whose counts together make up at most
    `mass` of all occurrences; at least the single rarest item."""
    total = sum(counts.values())
    out, acc = [], 0
    for item, c in sorted(counts.items(), key=lambda kv: (kv[1], repr(kv[0]))):
        if out and acc + c > mass * total:
            break
        out.append(item)
        acc += c
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class Tail:
    """The tail of the human corpus: its rarest templates and stated values (`rarest` with collapse.tail_mass), and
    how often they occur among the parsed templates / stated values of human essays on the held-out prompts."""

    templates: frozenset
    values: frozenset
    human_template_share: float
    human_value_share: float

    @classmethod
    def of(cls, world: World, corpus: Sequence[str], reference: Sequence[str], mass: float) -> Tail:
        t_counts, v_counts = Counter(), Counter()
        for essay in corpus:
            ts, vs = essay_items(world, essay)
            t_counts.update(ts)
            v_counts.update(vs)
        tail = cls(rarest(t_counts, mass), rarest(v_counts, mass), 0.0, 0.0)
        shares = tail.shares(world, reference)
        return dataclasses.replace(tail, human_template_share=shares[0], human_value_share=shares[1])

    def shares(self, world: World, essays: Sequence[str]) -> tuple[float, float]:
        """(share of parsed sentences whose template is in the tail, share of stated values in the tail)."""
        t_all = v_all = t_tail = v_tail = 0
        for essay in essays:
            ts, vs = essay_items(world, essay)
            t_all += len(ts)
            v_all += len(vs)
            t_tail += sum(t in self.templates for t in ts)
            v_tail += sum(v in self.values for v in vs)
        return t_tail / max(t_all, 1), v_tail / max(v_all, 1)

    def coverage(self, world: World, essays: Sequence[str]) -> dict[str, float]:
        """tail/coverage: the mean over templates and values of (tail share in `essays`) / (tail share in the human
        essays on the same prompts): 1 is as often as human writers use the tail, 0 is never."""
        t, v = self.shares(world, essays)
        rt = t / self.human_template_share if self.human_template_share else 0.0
        rv = v / self.human_value_share if self.human_value_share else 0.0
        return {"tail/coverage": (rt + rv) / 2, "tail/templates": rt, "tail/values": rv,
                "tail/template_share": t, "tail/value_share": v}


# --- training sets -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Written:
    """The essays one generation wrote for the next: prompt, essay, source ("gen <n>") and whether the arm keeps it."""

    prompts: list[str]
    essays: list[str]
    kept: list[bool]
    source: str

    def kept_pairs(self) -> list[tuple[str, str, str]]:
        return [(p, e, self.source) for p, e, k in zip(self.prompts, self.essays, self.kept) if k]


def training_set(
    arm: ArmConfig, human: Sequence[tuple[str, str]], written: Sequence[Written], rng: np.random.Generator
) -> list[tuple[str, str, str]]:
    """The (prompt, essay, source) examples generation len(written) trains on; `written[k]` is what generation k wrote
    (its kept essays) and sources are "human" or "gen <k>".

    replace: the kept essays of the last generation only; accumulate: the human corpus plus every generation's kept
    essays; mix: round(human_fraction * N) human examples drawn without replacement plus the first N minus that of the
    last generation's kept essays (N: the size of the human corpus); graded: the last generation's kept essays (the
    grader kept the best of each prompt's essays)."""
    human_rows = [(p, e, HUMAN) for p, e in human]
    last = written[-1].kept_pairs()
    if arm.data in ("replace", "graded"):
        return last
    if arm.data == "accumulate":
        return human_rows + [row for w in written for row in w.kept_pairs()]
    n = len(human_rows)
    n_human = round(arm.human_fraction * n)
    pick = sorted(rng.choice(n, size=n_human, replace=False).tolist())
    return [human_rows[i] for i in pick] + last[: n - n_human]


# --- the lab ---------------------------------------------------------------------------------------


def _arm_id(name: str) -> int:
    return zlib.crc32(name.encode())


def _write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2))
    tmp.replace(path)


class Lab:
    """Everything a generation is judged against (the world, the human corpus and its tail, the held-out essays and
    prompts), built once from the config; `run` goes generation by generation, every arm in turn."""

    def __init__(self, cfg: Config, run_dir: Path, *, progress: bool, log: Callable[[str], None], console: Console | None):
        if cfg.run.task != "essays" or cfg.run.prompts_file:
            raise UserError("selfplay collapse runs in the essay world (run.task=essays, no run.prompts_file): it needs the gold grader")
        self.cfg, self.run_dir, self.progress, self.log, self.console = cfg, run_dir, progress, log, console
        c = cfg.collapse
        self.world = World.from_config(cfg.world)
        self.human = self.world.corpus(cfg.world.corpus_size)
        self.n_synthetic = c.synthetic_size or len(self.human)
        self.heldout = self.world.corpus(c.heldout_essays, seed=HELDOUT_SEED)
        rng = np.random.default_rng([cfg.run.seed, EVAL_SEED])
        self.eval_prompts = self.world.sample_prompts(c.eval_prompts, rng)
        reference = [self.world.human_essay(p, rng) for p in self.eval_prompts]
        self.tail = Tail.of(self.world, [e for _, e in self.human], reference, c.tail_mass)
        steps = c.steps or cfg.pretrain.steps
        self.later_cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(
            cfg.pretrain, steps=steps, lr=c.lr or cfg.pretrain.lr, warmup_steps=min(cfg.pretrain.warmup_steps, steps // 5), eval_every=steps))
        self.critic = None
        self.results: dict[str, list[dict]] = {}
        self._compiled_fns: tuple | None = None
        self._heldout_rows: sft.Packed | None = None
        self._generators: dict[tuple[float, int], Generator] = {}

    # ---- compiled once: every generation has generation 0's shape and tokenizer ------------------------

    def _fns(self, policy: Policy) -> tuple:
        """(optimiser, train_step, eval_nll) of the generations after 0 (collapse.steps, collapse.lr)."""
        if self._compiled_fns is None:
            self._compiled_fns = sft.sft_fns(policy.graphdef, self.later_cfg.pretrain)
        return self._compiled_fns

    def _generator(self, temperature: float, batch: int) -> Generator:
        """One sampler per (temperature, batch), shared by every generation (the params are passed per call)."""
        key = (temperature, batch)
        if key not in self._generators:
            self._generators[key] = Generator(self.gen0, dataclasses.replace(self.cfg.actor, temperature=temperature), batch=batch)
        return self._generators[key]

    # ---- one model -------------------------------------------------------------------------------

    def _packed_heldout(self, policy: Policy) -> sft.Packed:
        """The held-out human essays, packed once (every generation shares generation 0's tokenizer)."""
        if self._heldout_rows is None:
            self._heldout_rows = sft.pack_examples(policy.tokenizer, self.heldout, self.cfg.pretrain.seq_len)
        return self._heldout_rows

    def _train(self, parent: Policy, examples: Sequence[tuple[str, str, str]], n: int, arm: ArmConfig) -> Policy:
        """A model of the parent's shape trained for collapse.steps on `examples` (from the parent's params, or a fresh
        initialisation with collapse.init=fresh)."""
        cfg, c = self.cfg, self.cfg.collapse
        seed = [cfg.run.seed, n, _arm_id(arm.name)]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(examples))
        packed = sft.pack_examples(parent.tokenizer, [examples[i][:2] for i in order], cfg.pretrain.seq_len)
        if len(packed.tokens_bl) < cfg.pretrain.batch_size:
            raise UserError(
                f"collapse: arm {arm.name!r} generation {n} has {len(examples)} examples, {len(packed.tokens_bl)} packed rows: "
                f"fewer than pretrain.batch_size ({cfg.pretrain.batch_size}); raise collapse.synthetic_size"
            )
        if c.init == "fresh":
            params = init_policy(cfg, parent.tokenizer, int(np.random.default_rng(seed).integers(2**31))).params
        else:  # a copy: the training step donates its params, and the parent (generation 0 for every arm) lives on
            params = jax.tree.map(jnp.copy, parent.params)
        params, _, _ = sft.fit(self.later_cfg, parent.graphdef, params, packed, self._packed_heldout(parent), rng,
                               desc=f"{arm.name} gen {n}", progress=self.progress, log=self.log, console=self.console,
                               fns=self._fns(parent))
        return Policy(cfg, parent.tokenizer, parent.graphdef, params)

    def _write(self, policy: Policy, arm: ArmConfig, n: int) -> Written:
        """The essays generation n writes for generation n+1 of `arm`, graded and filtered where the arm says so."""
        cfg, c = self.cfg, self.cfg.collapse
        k = arm.best_of if arm.data == "graded" else 1
        rng = np.random.default_rng([cfg.run.seed, n, _arm_id(arm.name), 1])
        prompts = self.world.sample_prompts(self.n_synthetic, rng)
        gen = self._generator(arm.temperature, c.sample_batch)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.run.seed), n), _arm_id(arm.name) % 2**31)
        essays = gen.generate(prompts, key, samples_per_prompt=k, params=policy.params)
        prompts_k = [p for p in prompts for _ in range(k)]
        kept = [True] * len(essays)
        if k > 1:
            if arm.grader == "gold":
                scores = np.array([self.world.grade(p, e).score for p, e in zip(prompts_k, essays)])
            else:
                from selfplay.critic import score_texts

                scores = np.asarray(score_texts(self._critic(), prompts_k, essays).rewards_b)
            best = scores.reshape(-1, k).argmax(axis=1) + np.arange(len(prompts)) * k
            kept = [False] * len(essays)
            for i in best.tolist():
                kept[i] = True
        return Written(prompts_k, essays, kept, f"gen {n}")

    def _critic(self) -> Any:
        """The learned critic of the graded-by-critic arms: trained once on generation 0's essays (critic section, the
        world's labeller within critic.label_budget), saved in gen_0/critic/."""
        if self.critic is None:
            from selfplay.critic import CRITIC_DIR, attach_judge, has_critic, load_critic
            from selfplay.jobs.critic import train_critic

            gen0 = self.run_dir / GEN0
            if not has_critic(gen0 / CRITIC_DIR):
                train_critic(self.cfg, gen0, progress=self.progress, log=self.log, console=self.console)
            self.critic = load_critic(gen0 / CRITIC_DIR, self.cfg, self.gen0.tokenizer, world=self.world)
            attach_judge(self.critic, self.gen0)
        return self.critic

    def _evaluate(self, policy: Policy, n: int) -> dict[str, float]:
        cfg, c = self.cfg, self.cfg.collapse
        _, _, eval_nll = self._fns(policy)
        ce = sft.heldout_nll(eval_nll, policy.params, self._packed_heldout(policy), cfg.pretrain.batch_size)
        gen = self._generator(cfg.actor.temperature, min(c.sample_batch, c.eval_prompts))
        key = jax.random.fold_in(jax.random.key(cfg.run.seed), EVAL_SEED)
        essays = gen.generate(self.eval_prompts, key, samples_per_prompt=1, params=policy.params)
        gold = mean_scores(self.world.grade(p, e) for p, e in zip(self.eval_prompts, essays))
        out = {"generation": n, "heldout_ce": ce}
        out |= {f"gold/{k}": gold[k] for k in ("score", "coverage", "hallucination_rate", "repetition_rate", "structure", "fluency")}
        out |= diversity(essays)
        out |= self.tail.coverage(self.world, essays)
        out["sample"] = {"prompt": self.eval_prompts[0], "essay": essays[0]}
        return out

    # ---- generations -----------------------------------------------------------------------------

    def _generation_0(self) -> dict:
        gen0 = self.run_dir / GEN0
        if not has_policy(gen0):
            clear_incomplete_policy(gen0)
            sft.pretrain(self.cfg, gen0, progress=self.progress, log=self.log, console=self.console)
        self.gen0 = load_policy(gen0, self.cfg)
        metrics_path = gen0 / METRICS_FILE
        if metrics_path.is_file():
            return json.loads(metrics_path.read_text())
        m = self._evaluate(self.gen0, 0) | {"data": {HUMAN: len(self.human)}}
        _write_json_atomic(metrics_path, m)
        return m

    def _load_written(self, path: Path) -> Written:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return Written([r["prompt"] for r in rows], [r["essay"] for r in rows], [r["kept"] for r in rows], rows[0]["source"])

    def _written(self, arm: ArmConfig, n: int, policy: Policy) -> Written:
        """What generation n of `arm` wrote, from its data file when an earlier run wrote it."""
        path = self.run_dir / arm.name / f"data_{n}.jsonl"
        if path.is_file():
            return self._load_written(path)
        w = self._write(policy, arm, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl_atomic(path, [{"prompt": p, "essay": e, "kept": k, "source": w.source}
                                   for p, e, k in zip(w.prompts, w.essays, w.kept)])
        return w

    def _step(self, arm: ArmConfig, n: int, parent: Policy) -> tuple[dict, Policy]:
        """Generation n of `arm` (n >= 1): trained on what generations < n wrote, judged, saved."""
        gdir = self.run_dir / arm.name / f"gen_{n}"
        metrics_path = gdir / METRICS_FILE
        if metrics_path.is_file() and has_policy(gdir):
            return json.loads(metrics_path.read_text()), load_policy(gdir, self.cfg)
        t0 = time.perf_counter()
        written = [self._written(arm, k, parent if k == n - 1 else None) for k in range(n)]  # earlier ones are on disk
        examples = training_set(arm, self.human, written, np.random.default_rng([self.cfg.run.seed, n, _arm_id(arm.name), 2]))
        if has_policy(gdir):
            policy = load_policy(gdir, self.cfg)
        else:
            clear_incomplete_policy(gdir)
            policy = self._train(parent, examples, n, arm)
            save_policy(gdir, self.cfg, policy.tokenizer, policy.params, meta={"kind": "collapse", "arm": arm.name, "generation": n})
        m = self._evaluate(policy, n)
        m["data"] = dict(Counter(src for _, _, src in examples))
        m["seconds"] = round(time.perf_counter() - t0, 1)
        _write_json_atomic(metrics_path, m)
        return m, policy

    def run(self) -> dict:
        cfg, c = self.cfg, self.cfg.collapse
        t0 = time.perf_counter()
        m0 = self._generation_0()
        self.results = {arm.name: [m0] for arm in c.arms}
        parents = {arm.name: self.gen0 for arm in c.arms}
        self._report(0)
        for n in range(1, c.generations + 1):
            for arm in c.arms:
                if arm.data == "graded" and arm.grader == "critic":
                    self._critic()
                m, parents[arm.name] = self._step(arm, n, parents[arm.name])
                self.results[arm.name].append(m)
            self._report(n)
        summary = self.summary()
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        self._save(summary)
        return summary

    # ---- outputs ---------------------------------------------------------------------------------

    def summary(self) -> dict:
        for rows in self.results.values():
            ce0 = rows[0]["heldout_ce"]
            for r in rows:
                r["ce_change"] = r["heldout_ce"] / ce0 - 1.0
        return {"config": to_dict(self.cfg.collapse), "tail": {
            "templates": len(self.tail.templates), "values": len(self.tail.values),
            "human_template_share": self.tail.human_template_share, "human_value_share": self.tail.human_value_share,
        }, "arms": self.results}

    def _save(self, summary: dict) -> None:
        _write_json_atomic(self.run_dir / RESULTS_FILE, summary)
        write_tensorboard(self.run_dir / "tb", summary["arms"])
        plot(summary["arms"], self.run_dir / PLOT_FILE)

    def _report(self, n: int) -> None:
        """The table of generation n (every arm) on the console, and every output rewritten with what is done."""
        summary = self.summary()
        self._save(summary)
        table = Table(title=f"generation {n}" + (" (SFT on the human corpus, shared by every arm)" if n == 0 else "")
                      + ": human CE = cross-entropy on held-out human essays (nats/token); tail = tail coverage (1: as human)")
        table.add_column("arm")
        for _, label, _, _ in FIGURES:
            table.add_column(label, justify="right")
        table.add_column("trained on", justify="left")
        arms = self.cfg.collapse.arms[:1] if n == 0 else self.cfg.collapse.arms
        for arm in arms:
            r = self.results[arm.name][n]
            data = ", ".join(f"{v} {k}" for k, v in r.get("data", {}).items())
            table.add_row("all" if n == 0 else arm.name, *(fmt.format(r[key]) for key, _, fmt, _ in FIGURES), data)
        console = self.console or Console()
        if not console.is_terminal:  # a log file: wide enough for the whole table (rich would wrap it at 80 columns)
            console = Console(file=console.file, width=132)
        console.print(table)


def write_tensorboard(logdir: Path, arms: dict[str, list[dict]]) -> None:
    """tb/<arm>/: every figure with the generation as the step (rewritten whole, so a resumed lab logs each once)."""
    import shutil

    for name, rows in arms.items():
        d = logdir / name
        if d.exists():
            shutil.rmtree(d)
        with Tracker(d) as tb:
            for r in rows:
                tb.scalars(r["generation"], {f"collapse/{k}": r[k] for k, _, _, _ in FIGURES if k in r}
                           | {f"collapse/{k}": v for k, v in r.items() if k.startswith("tail/")})


def plot(arms: dict[str, list[dict]], path: Path) -> None:
    """Cross-entropy on held-out human essays, gold score and tail coverage against the generation, a line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("heldout_ce", "cross-entropy on held-out human essays"), ("gold/score", "gold score (held-out prompts)"),
              ("tail/coverage", "tail coverage (1 = human)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        for name, rows in arms.items():
            ax.plot([r["generation"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("generation")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _but_generations(cfg: Config) -> Config:
    return dataclasses.replace(cfg, collapse=dataclasses.replace(cfg.collapse, generations=0))


def run_lab(cfg: Config, run_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
            console: Console | None = None) -> dict:
    """The lab in `run_dir` (resumed where a killed one stopped); returns what collapse.json holds."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "collapse_config.yaml"
    if saved.is_file():
        from selfplay.config import load_config

        before = load_config(saved)
        if _but_generations(before) != _but_generations(cfg):
            changed = [f.name for f in dataclasses.fields(cfg)
                       if getattr(_but_generations(before), f.name) != getattr(_but_generations(cfg), f.name)]
            raise UserError(
                f"{run_dir} holds a lab run with another config (sections {', '.join(changed)} differ from {saved}); "
                "resume it with the same config (only collapse.generations may change), or start a new --run-dir"
            )
    if not saved.is_file() or before.collapse.generations != cfg.collapse.generations:
        tmp = saved.with_suffix(".yaml.tmp")
        tmp.write_text("# The lab's resolved config; resume with the same one\n" + dump_config(cfg))
        tmp.replace(saved)
    lab = Lab(cfg, run_dir, progress=progress, log=log, console=console)
    summary = lab.run()
    log(f"collapse: {cfg.collapse.generations} generations x {len(cfg.collapse.arms)} arms in {summary['seconds']:.0f} s; "
        f"{run_dir / RESULTS_FILE}, {run_dir / PLOT_FILE}, TensorBoard: {run_dir / 'tb'}")
    return summary
