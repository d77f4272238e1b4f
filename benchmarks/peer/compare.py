"""Ours against TRL on the same machine, in alternating pairs: one command for issue #14's comparison.

Run from the repository root with selfplay's virtualenv (the peer's is benchmarks/peer/.venv, from setup.sh):

    python benchmarks/peer/compare.py                       # round: completions/s, 3 pairs
    python benchmarks/peer/compare.py --what decode         # batch-1 decode tokens/s, 3 pairs
    python benchmarks/peer/compare.py --pairs 1 --warmup 1 --steps 1 --out /tmp/smoke.jsonl   # a smoke run
    python benchmarks/peer/compare.py --what smollm2 --run-dir runs/bench-smollm2 --hf-dir runs/bench-smollm2-hf  # #28

round: `selfplay bench round --config CONFIG critic.refresh_every=0` (no critic refresh: TRL's reward model is
frozen) against `benchmarks/peer/trl_grpo.py round`. decode: `selfplay bench actor bench.batches=[1]
bench.baseline=false` against `trl_grpo.py decode --batch 1` (`model.generate`). smollm2, the real-model round
(configs/bench_smollm2.yaml): `benchmarks/peer/ours_round.py --run-dir RUN_DIR` (the loop's own round on the imported
policy) against `trl_grpo.py smollm2 --model-dir HF_DIR`, where HF_DIR is benchmarks/peer/smollm2_hf.py's directory
and RUN_DIR its import (`selfplay import-hf HF_DIR RUN_DIR`): the same weights, prompts, reward function, group size
and completion length; both sides' stage splits go into each pair's record. The pairs alternate which side runs
first, so a drift in the machine's load falls on both. Appends to --out each side's own JSON record, one
`peer_pair` record per pair (both figures, the ratio ours/TRL, versions and thread counts), and a
`peer_comparison` record with the median ratio, which it also prints. Uses the standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / "benchmarks" / "peer" / ".venv" / "bin" / "python"


def commands(a: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(ours, TRL's) command lines for the comparison `a.what`."""
    timing = [*([f"bench.warmup={a.warmup}"] if a.warmup is not None else []),
              *([f"bench.iterations={a.steps}"] if a.steps is not None else [])]
    peer_timing = [*(["--warmup", str(a.warmup)] if a.warmup is not None else []),
                   *(["--steps", str(a.steps)] if a.steps is not None else [])]
    if a.what == "round":
        ours = ["-m", "selfplay.cli", "bench", "round", "--config", a.config, "critic.refresh_every=0"]
        peer = ["round", "--config", a.config]
    elif a.what == "smollm2":
        ours = [str(REPO / "benchmarks" / "peer" / "ours_round.py"), "--run-dir", a.run_dir, "--config", a.config]
        peer = ["smollm2", "--model-dir", a.hf_dir, "--config", a.config]
    else:
        ours = ["-m", "selfplay.cli", "bench", "actor", "--config", a.config, "bench.batches=[1]", "bench.baseline=false"]
        peer = ["decode", "--config", a.config, "--batch", "1"]
    ours = [a.ours_python, *ours, *timing, *a.ours_override]
    peer = [a.peer_python, str(REPO / "benchmarks" / "peer" / "trl_grpo.py"), *peer, *peer_timing, *a.peer_arg]
    return ours, peer


def run_json(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd` in the repository root; its last stdout line is its JSON record. Stderr goes to `log_path`."""
    print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    with log_path.open("a") as err:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}); its stderr is in {log_path}")
    return json.loads(lines[-1])


def figure(record: dict) -> dict:
    """The headline figure (median, min, max, ...) of either side's record."""
    if record["benchmark"] == "actor":
        return record["points"][0]["tokens_per_s"]
    return record["figure"]


def ours_summary(r: dict) -> dict:
    return {
        "benchmark": r["benchmark"], "date": r["date"], "command": r["command"], "figure": figure(r),
        "versions": {"jax": r["machine"]["jax"], "jaxlib": r["machine"]["jaxlib"], "python": r["machine"]["python"]},
        # XLA's CPU client runs one intra-op thread per visible core unless XLA_FLAGS says otherwise
        "threads": {"cores_visible": r["machine"]["cores"], "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
        "load_avg": r["load_avg"], "cpu": r.get("cpu"),
        **({"stages_s": {k: v["median_s"] for k, v in r["stages"].items()}} if "stages" in r else {}),
    }


def peer_summary(r: dict) -> dict:
    return {
        "benchmark": r["benchmark"], "date": r["date"], "command": r["command"], "figure": r["figure"],
        "versions": r["versions"],
        "threads": {"torch_threads": r["torch_threads"], "torch_interop_threads": r["torch_interop_threads"],
                    "cores_visible": r["cores"]},
        "load_avg": r["load_avg"], **({"phases_s": r["phases_s"]} if "phases_s" in r else {}),
    }


def append(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=["round", "decode", "smollm2"], default="round")
    p.add_argument("--pairs", type=int, default=3, help="alternating (ours, TRL) pairs (default 3)")
    p.add_argument("--config", default=None,
                   help="configs/bench_reference.yaml, or configs/bench_smollm2.yaml for smollm2 (the defaults)")
    p.add_argument("--run-dir", default=None, help="smollm2: ours' run directory (selfplay import-hf HF_DIR RUN_DIR)")
    p.add_argument("--hf-dir", default=None, help="smollm2: TRL's checkpoint directory (benchmarks/peer/smollm2_hf.py)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls, both sides (default: the config's bench.warmup)")
    p.add_argument("--steps", type=int, default=None, help="timed calls, both sides (default: bench.iterations)")
    p.add_argument("--ours-python", default=sys.executable, help="selfplay's interpreter (default: this one)")
    p.add_argument("--peer-python", default=str(PEER_PYTHON), help="the peer venv's interpreter")
    p.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE", help="extra override for ours")
    p.add_argument("--peer-arg", action="append", default=[], metavar="ARG", help="extra argument for trl_grpo.py")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results.jsonl"))
    p.add_argument("--log", default=None, help="both sides' stderr (default: OUT with .log)")
    a = p.parse_args(argv)
    if a.pairs < 1:
        p.error("--pairs must be >= 1")
    if a.what == "smollm2" and not (a.run_dir and a.hf_dir):
        p.error("--what smollm2 needs --run-dir (ours) and --hf-dir (TRL's): see configs/bench_smollm2.yaml")
    a.config = a.config or ("configs/bench_smollm2.yaml" if a.what == "smollm2" else "configs/bench_reference.yaml")
    if a.what == "smollm2":  # both sides run in the repository root
        a.run_dir, a.hf_dir = str(Path(a.run_dir).resolve()), str(Path(a.hf_dir).resolve())
    if not Path(a.peer_python).exists():
        p.error(f"no peer interpreter at {a.peer_python}: run benchmarks/peer/setup.sh, or pass --peer-python")
    out = Path(a.out)
    log_path = Path(a.log) if a.log else out.with_suffix(".log")
    ours_cmd, peer_cmd = commands(a)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ratios = []
    for i in range(a.pairs):
        order = ("ours", "trl") if i % 2 == 0 else ("trl", "ours")
        rec = {}
        for side in order:
            rec[side] = run_json(ours_cmd if side == "ours" else peer_cmd, log_path)
            append(out, rec[side])
        if a.what == "smollm2" and rec["ours"]["config"]["prompt_tokens"] != rec["trl"]["prompt_lengths_seen"]:
            raise SystemExit(f"the prompts tokenise to {rec['ours']['config']['prompt_tokens']} tokens for ours and to "
                             f"{rec['trl']['prompt_lengths_seen']} for TRL: not the same prompts")
        ours_fig, trl_fig = figure(rec["ours"]), figure(rec["trl"])
        ratio = ours_fig["median"] / trl_fig["median"]
        ratios.append(ratio)
        unit = "tokens/s" if a.what == "decode" else "completions/s"
        append(out, {
            "benchmark": "peer_pair", "what": a.what, "unit": unit, "pair": i, "of": a.pairs, "first": order[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "ours": ours_summary(rec["ours"]), "trl": peer_summary(rec["trl"]), "ratio_ours_over_trl": ratio,
        })
        print(f"pair {i + 1}/{a.pairs} ({order[0]} first): ours {ours_fig['median']:.2f} {unit}, "
              f"TRL {trl_fig['median']:.2f} {unit}, ratio {ratio:.2f}", flush=True)
        if a.what == "smollm2":
            for side, split in (("ours", ours_summary(rec["ours"])["stages_s"]), ("TRL", rec["trl"]["phases_s"])):
                print(f"  {side} s: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()), flush=True)
    median = statistics.median(ratios)
    append(out, {
        "benchmark": "peer_comparison", "what": a.what, "started": started,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/peer/compare.py", *(sys.argv[1:] if argv is None else argv)]),
        "ours_command": shlex.join(ours_cmd[1:]), "trl_command": shlex.join(peer_cmd[1:]),
        "pairs": a.pairs, "ratios_ours_over_trl": ratios, "median_ratio": median,
    })
    print(f"median ratio ours/TRL ({a.what}, {a.pairs} pairs): {median:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
