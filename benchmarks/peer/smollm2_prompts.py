"""The prompts of the SmolLM2-135M round (issue #28), one file both sides read: TRL's conversational rows with an
`answer` column, "What is 17 plus 25?" with the sum, two numbers of two digits each. Written once and kept:

    python benchmarks/peer/smollm2_prompts.py > benchmarks/peer/smollm2_prompts.jsonl

SmolLM2's tokenizer writes each digit as its own token, so every prompt, rendered with the model's chat template
(its default system turn, the user turn, the assistant's turn opened), is 40 tokens long: one prompt width on both
sides, with no padding (configs/bench_smollm2.yaml's actor.prompt_buckets and bench.prompt_len). The reward is
`selfplay.tasks.arithmetic:exact_answer`. Standard library only.
"""

from __future__ import annotations

import json
import random
import sys

COUNT, SEED = 64, 0


def rows(count: int = COUNT, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "answer": a + b})
    return out


if __name__ == "__main__":
    for row in rows():
        sys.stdout.write(json.dumps(row) + "\n")
