"""Sampler throughput: generated tokens/s with the KV cache (actor.make_sampler) against the no-cache baseline, over a batch x new-token sweep.

The same as `selfplay bench actor` (the code is selfplay/jobs/bench.py, its counting and timing
selfplay/perf.py); arguments pass through:

    python benchmarks/bench_actor.py --config configs/bench_reference.yaml --out benchmarks/results.jsonl
"""

import sys

from selfplay.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "actor", *sys.argv[1:]]))
