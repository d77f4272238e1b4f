"""End-to-end throughput: completions/s of a synthetic self-play round and its time split by stage.

The same as `selfplay bench round` (the code is selfplay/jobs/bench.py, its counting and timing
selfplay/perf.py); arguments pass through:

    python benchmarks/bench_round.py --config configs/bench_reference.yaml --out benchmarks/results.jsonl
"""

import sys

from selfplay.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "round", *sys.argv[1:]]))
