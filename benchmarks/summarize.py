"""Markdown tables from the JSON lines `selfplay bench` writes, for benchmarks/RESULTS.md (figures are copied, never
typed in by hand):

    python benchmarks/summarize.py benchmarks/results.jsonl
"""

import json
import sys


def _machine(r: dict) -> str:
    m = r["machine"]
    return f"{m['cpu']}, {m['cores']} cores, {m['backend']}"


def _roof(r: dict) -> str:
    """The probed peak during the timed calls (median), as `selfplay bench` judged them against."""
    return f"{r['peak_flops_during'] / 1e9:.0f} GFLOP/s, {r['bandwidth_during'] / 1e9:.0f} GB/s"


def _cpu(r: dict) -> str:
    c = r.get("cpu") or {}
    return f"{c['other_share']:.0%}" if c else "–"


def _load(r: dict) -> str:
    return f"{r['load_avg']['start'][0]:.1f} → {r['load_avg']['end'][0]:.1f} | {_cpu(r)}"


def _spread(s: dict, fmt: str = ".0f") -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def actor_rows(r: dict) -> list[str]:
    out = []
    for p in r["points"]:
        base = p.get("baseline") or {}
        bt = _spread(base["tokens_per_s"]) if "tokens_per_s" in base else "skipped"
        speed = f"{p['speedup']:.1f}×" if "speedup" in p else "–"
        out.append(
            f"| {r['date'][:10]} | {p['batch']} | {p['new_tokens']} | {_spread(p['tokens_per_s'])} | {bt} | {speed} "
            f"| {p['mfu']:.1%} | {p['roofline_ratio']:.1%} | {p['compile_s']:.1f} | {p['compilations_timed']} "
            f"| {_roof(p)} | {_load(r)} |"
        )
    return out


def learner_row(r: dict) -> str:
    f = r["figure"]
    return (
        f"| {r['date'][:10]} | {r['config']['rows']} × {r['config']['prompt_width'] + r['config']['new_tokens']} "
        f"| {_spread(f)} | {f['median_s']:.2f} | {r['mfu']:.1%} | {r['compile_s']:.1f} | {r['compilations_timed']} "
        f"| {_roof(r)} | {_load(r)} |"
    )


def round_row(r: dict) -> str:
    f = r["figure"]
    st = r["stages"]
    split = " / ".join(f"{st[s]['median_s']:.2f}" for s in ("rollout", "score", "reference", "update", "critic") if s in st)
    return (
        f"| {r['date'][:10]} | {_spread(f, '.1f')} | {r['completions_per_s_refresh_round']:.1f} | {split} "
        f"| {r['mfu']:.1%} | {r['roofline_ratio']:.1%} | {r['compile_s']:.1f} | {r['compilations_timed']} "
        f"| {_roof(r)} | {_load(r)} |"
    )


def peer_rows(r: dict) -> list[str]:
    """benchmarks/peer/compare.py's records: a row per pair, the median ratio as a comment; each side's own record is
    summarised by its pair (ours is also a round or actor record above it)."""
    if r["benchmark"] == "peer_comparison":
        return [f"<!-- peer comparison ({r['what']}): {r['command']}: median ratio ours/TRL {r['median_ratio']:.2f} "
                f"over {r['pairs']} pairs -->"]
    if r["benchmark"] != "peer_pair":
        return []
    ours, trl = r["ours"], r["trl"]
    v, t = trl["versions"], trl["threads"]
    return [
        f"| {r['date'][:10]} | {r['what']} ({r['unit']}) | {r['pair'] + 1}/{r['of']}, {r['first']} first "
        f"| {_spread(ours['figure'], '.1f')} | {_spread(trl['figure'], '.1f')} | {r['ratio_ours_over_trl']:.2f} "
        f"| jax {ours['versions']['jax']}, {ours['threads']['cores_visible']} cores "
        f"| trl {v['trl']}, torch {v['torch']}, {t['torch_threads']} threads "
        f"| {ours['load_avg']['start'][0]:.1f} / {trl['load_avg']['start'][0]:.1f} |"
    ]


def main(path: str) -> None:
    records = [json.loads(line) for line in open(path) if line.strip()]
    for r in records:
        if r["benchmark"].startswith("peer_"):
            rows = peer_rows(r)
            if rows:
                print("\n".join(rows))
            continue
        print(f"<!-- {r['benchmark']}: {r['command']} ({_machine(r)}, jax {r['machine']['jax']}) -->")
        if r["benchmark"] == "actor":
            print("\n".join(actor_rows(r)))
        elif r["benchmark"] == "learner":
            print(learner_row(r))
        else:
            print(round_row(r))
            names = {"score": "critic score", "critic": "critic refresh (÷ refresh_every)"}
            for stage, st in r["stages"].items():
                print(f"| {names.get(stage, stage)} | {st['share']:.1%} | {st['flops'] / 1e9:.1f} | {st['mfu']:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results.jsonl")
