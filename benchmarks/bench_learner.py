"""Learner throughput: tokens/s and MFU of one update step (forward, backward, optimiser) on a synthetic rollout.

The same as `selfplay bench learner` (the code is selfplay/jobs/bench.py, its counting and timing
selfplay/perf.py); arguments pass through:

    python benchmarks/bench_learner.py --config configs/bench_reference.yaml --out benchmarks/results.jsonl
"""

import sys

from selfplay.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "learner", *sys.argv[1:]]))
