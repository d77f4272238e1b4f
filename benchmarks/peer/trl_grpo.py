"""The peer of `selfplay bench round`: TRL's GRPOTrainer on the same shapes, in PyTorch on the same CPU (issue #14).

Runs in the peer virtualenv (benchmarks/peer/setup.sh), never in selfplay's; prints one JSON line:

    benchmarks/peer/.venv/bin/python benchmarks/peer/trl_grpo.py round  --config configs/bench_reference.yaml
    benchmarks/peer/.venv/bin/python benchmarks/peer/trl_grpo.py decode --config configs/bench_reference.yaml
    benchmarks/peer/.venv/bin/python benchmarks/peer/trl_grpo.py smollm2 --model-dir runs/bench-smollm2-hf

`round`: GRPOTrainer steps of prompts_per_round x samples_per_prompt completions of exactly actor.max_new_tokens
tokens each (min_new_tokens = max_completion_length, so no row ends early, as bench.eos_id -1 does for ours), GRPO with
beta = learner.kl_coef against a reference model, a LlamaForSequenceClassification reward model of critic.model's
shape, one optimiser step per generation batch (learner.epochs 1, minibatches 1), gradient checkpointing off. The
figure is completions per second over the steps after warm-up; each step is timed from the end of the previous one, so
everything TRL's loop does per step counts. The phase split comes from TRL's own profiling hooks.
`decode`: `model.generate` alone on one prompt (batch 1 by default) of bench.prompt_len tokens, exactly
actor.max_new_tokens new tokens, KV cache on: decode tokens per second.

`smollm2` (issue #28): GRPOTrainer on a real checkpoint, the Hugging Face directory benchmarks/peer/smollm2_hf.py
writes (the same weights ours imports), its tokenizer and chat template, the conversational prompts of --prompts
(benchmarks/peer/smollm2_prompts.jsonl) and the reward function ours calls, selfplay.tasks.arithmetic:exact_answer
(imported from this checkout; TRL hands it message lists, `exact_answer_on_text` hands it their text), no reward
model; shapes, beta and learning rate from configs/bench_smollm2.yaml, the rest as in `round`.

In `round` and `decode`, weights are random and built here; the tokenizer is a word-level `tokenizers` model built
here ("w3" .. "wV-1", one token per word), so nothing is downloaded. The policy is written to a temporary directory
because TRL builds its reference model with from_pretrained on the policy's path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
import trl
import yaml
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl.extras import profiling

REPO = Path(__file__).resolve().parents[2]
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"  # ids 0, 1, 2; words take the rest of the vocabulary
# selfplay.config.ModelConfig's defaults, for keys a config file leaves out
MODEL_DEFAULTS = {"n_kv_heads": 2, "head_dim": 0, "rope_theta": 10000.0, "norm_eps": 1e-5, "tie_embeddings": True,
                  "attention_bias": False, "param_dtype": "float32"}


def load_shapes(path: Path) -> dict:
    """The keys of a selfplay benchmark config this script mirrors, with selfplay's defaults where the file has none.
    Single-file configs only (the bench configs extend nothing)."""
    raw = yaml.safe_load(path.read_text())
    actor, learner, bench = raw.get("actor", {}), raw.get("learner", {}), raw.get("bench", {})
    return {
        "model": {**MODEL_DEFAULTS, **raw["model"]},
        "critic_model": {**MODEL_DEFAULTS, **raw.get("critic", {}).get("model", raw["model"])},
        "prompts": actor.get("prompts_per_round", 16),
        "samples_per_prompt": actor.get("samples_per_prompt", 4),
        "new_tokens": actor.get("max_new_tokens", 128),
        "temperature": actor.get("temperature", 1.0),
        "prompt_len": bench.get("prompt_len") or min(actor.get("prompt_buckets", [64])),
        "beta": learner.get("kl_coef", 0.0),
        "lr": float(learner.get("lr", 1e-4)),
        "max_grad_norm": learner.get("max_grad_norm", 1.0),
        "epochs": learner.get("epochs", 1),
        "minibatches": learner.get("minibatches", 1),
        "warmup": bench.get("warmup", 1),
        "iterations": bench.get("iterations", 5),
    }


def llama_config(m: dict) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["d_ff"],
        num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
        head_dim=m["head_dim"] or m["d_model"] // m["n_heads"], max_position_embeddings=m["max_seq_len"],
        rope_parameters={"rope_type": "default", "rope_theta": float(m["rope_theta"])}, rms_norm_eps=m["norm_eps"],
        tie_word_embeddings=m["tie_embeddings"], attention_bias=m["attention_bias"],
        pad_token_id=0, bos_token_id=None, eos_token_id=1, num_labels=1,
    )


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[str]:
    """n prompts of `length` words, each one token; the trailing space keeps a prompt's last word apart from the
    completion when TRL concatenates the two texts for the reward model."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in row) + " " for row in rng.integers(3, vocab_size, size=(n, length))]


def rate_stats(work: float, times_s: list[float]) -> dict:
    """As selfplay.perf.rate_stats: work / time, median, min, max and quartiles."""
    t = np.asarray(times_s)
    q1, q3 = np.percentile(t, [75, 25])
    return {"median": work / float(np.median(t)), "min": work / float(t.max()), "max": work / float(t.min()),
            "q1": work / float(q1), "q3": work / float(q3), "median_s": float(np.median(t)), "n": len(times_s)}


def environment() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cores": cores, "device": "cpu",
    }


class StepTimer(TrainerCallback):
    """Wall time between consecutive step ends, and TRL's profiling events by the step they ran in."""

    def __init__(self) -> None:
        self.last = None
        self.step_s: list[float] = []
        self.events: list[list[tuple[str, float]]] = [[]]

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_s.append(now - self.last)
        self.last = now
        self.events.append([])

    def record(self, name: str, duration: float) -> None:
        self.events[-1].append((name.split(".", 1)[-1], duration))


def phase_split(events: list[tuple[str, float]], step_s: float) -> dict:
    """One step's time by phase, from TRL's profiling events (logged as each block exits, inner before outer):
    generate, reward, reference (the log-prob passes inside _prepare_inputs), rest of _prepare_inputs (tokenising,
    decoding, advantages), and update (the rest of the step: loss forward, backward, optimiser, TRL's bookkeeping)."""
    out = {"generate": 0.0, "reward": 0.0, "reference": 0.0, "prepare_other": 0.0, "update": step_s}
    prepare, inside = 0.0, True
    for name, d in events:
        if name == "transformers.generate":
            out["generate"] += d
        elif name == "_calculate_rewards":
            out["reward"] += d
        elif name == "_get_per_token_logps_and_entropies" and inside:
            out["reference"] += d
        elif name == "_prepare_inputs":
            prepare += d
            inside = False
    out["prepare_other"] = prepare - out["generate"] - out["reward"] - out["reference"]
    out["update"] = step_s - prepare
    return out


def grpo_args(s: dict, out_dir: str, rows: int, total: int, seed: int):
    """GRPOConfig for `total` steps of `rows` completions (s["samples_per_prompt"] per prompt) of exactly
    s["new_tokens"] tokens, one optimiser step per generation batch, float32, no activation checkpointing."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=seed, max_steps=total, num_train_epochs=1,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_generations=s["samples_per_prompt"],
        num_iterations=1, max_completion_length=s["new_tokens"],
        generation_kwargs={"min_new_tokens": s["new_tokens"]}, temperature=s["temperature"],
        beta=s["beta"], learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=s["max_grad_norm"], activation_checkpointing=False, bf16=False, fp16=False,
        model_init_kwargs={"dtype": torch.float32}, dataloader_num_workers=0, log_completions=False,
    )


def train_timed(trainer, timer: StepTimer, s: dict, warmup: int, steps: int, rows: int) -> dict:
    """Run the trainer's `warmup + steps` steps; check the reference model, the completion lengths (exactly
    s["new_tokens"]); return the figure over the timed steps, TRL's phase split and what was seen."""
    total = warmup + steps
    if trainer.ref_model is None or trainer.model.is_activation_checkpointing or trainer.args.bf16:
        raise SystemExit("GRPOTrainer built no reference model, or checkpoints activations, or runs bf16")
    lengths: set[int] = set()
    prompt_lengths: set[int] = set()
    generate_and_score = trainer._generate_and_score_completions

    def checked(inputs):
        out = generate_and_score(inputs)
        lengths.update(out["completion_mask"].sum(1).tolist())
        prompt_lengths.update(out["prompt_mask"].sum(1).tolist())
        return out

    trainer._generate_and_score_completions = checked
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its summary; stdout is the JSON line only
        trainer.train()
    wall = time.perf_counter() - t0
    if len(timer.step_s) != total:
        raise SystemExit(f"expected {total} steps, timed {len(timer.step_s)}")
    if lengths != {s["new_tokens"]}:
        raise SystemExit(f"completion lengths {sorted(set(lengths))}, expected exactly {s['new_tokens']}")
    timed = timer.step_s[warmup:]
    splits = [phase_split(ev, t) for ev, t in zip(timer.events[warmup:total], timed)]
    split = {k: float(np.median([sp[k] for sp in splits])) for k in splits[0]}
    return {
        "figure": {"name": "completions_per_s", "unit": "completions per second, whole GRPOTrainer steps",
                   **rate_stats(float(rows), timed)},
        "phases_s": split,
        "phase_shares": {k: v / sum(split.values()) for k, v in split.items()},
        "completion_lengths_seen": sorted(set(lengths)), "prompt_lengths_seen": sorted(prompt_lengths),
        "first_step_s": timer.step_s[0], "wall_s": wall,
    }


def bench_round(s: dict, warmup: int, steps: int, seed: int, log) -> dict:
    if s["epochs"] != 1 or s["minibatches"] != 1:
        raise SystemExit("trl_grpo.py mirrors learner.epochs 1 and learner.minibatches 1 only")
    from trl import GRPOTrainer

    torch.manual_seed(seed)
    m, cm = s["model"], s["critic_model"]
    tok = word_tokenizer(m["vocab_size"])
    rows = s["prompts"] * s["samples_per_prompt"]
    total = warmup + steps
    prompts = random_prompts(s["prompts"] * total, s["prompt_len"], m["vocab_size"], seed)
    if any(len(tok(p)["input_ids"]) != s["prompt_len"] for p in prompts):
        raise SystemExit(f"a prompt does not tokenise to {s['prompt_len']} tokens")
    reward_model = LlamaForSequenceClassification(llama_config(cm)).eval()
    timer = StepTimer()
    profiling.ProfilingContext._log_metrics = lambda ctx, d: timer.record(ctx.name, d)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(llama_config(m)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        trainer = GRPOTrainer(
            model=tmp, reward_funcs=reward_model, args=grpo_args(s, os.path.join(tmp, "out"), rows, total, seed),
            processing_class=tok, reward_processing_classes=word_tokenizer(cm["vocab_size"]),
            train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[timer],
        )
        log(f"trl round: {s['prompts']} prompts x {s['samples_per_prompt']}, {s['new_tokens']} new tokens, "
            f"{warmup} warm-up + {steps} timed steps, {torch.get_num_threads()} torch threads")
        result = train_timed(trainer, timer, s, warmup, steps, rows)
    return {
        **result,
        "config": {"rows": rows, "prompts": s["prompts"], "samples_per_prompt": s["samples_per_prompt"],
                   "prompt_len": s["prompt_len"], "new_tokens": s["new_tokens"], "beta": s["beta"],
                   "reference_model": True, "reward_model": "LlamaForSequenceClassification",
                   "gradient_checkpointing": False, "policy": m, "reward": cm},
    }


def exact_answer_on_text(prompts, completions, answer, **kwargs):
    """selfplay.tasks.arithmetic.exact_answer, the reward ours calls, on each completion's text: TRL hands a
    conversational prompt's completions over as message lists ([{"role": "assistant", "content": ...}]), ours as text."""
    from selfplay.tasks.arithmetic import exact_answer  # numpy and PyYAML only: importable from this venv

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return exact_answer(prompts, texts, answer, **kwargs)


def bench_smollm2(s: dict, model_dir: Path, prompts_file: Path, warmup: int, steps: int, seed: int, log) -> dict:
    """GRPOTrainer on a Hugging Face checkpoint (benchmarks/peer/smollm2_hf.py's directory), its tokenizer and chat
    template, the conversational prompts of `prompts_file` with their `answer` column, and the exact-answer reward
    function ours uses; no reward model. The checkpoint's shape must be the config's model section."""
    if s["epochs"] != 1 or s["minibatches"] != 1:
        raise SystemExit("trl_grpo.py mirrors learner.epochs 1 and learner.minibatches 1 only")
    from transformers import AutoConfig, AutoTokenizer
    from trl import GRPOTrainer

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    torch.manual_seed(seed)
    m, hf = s["model"], AutoConfig.from_pretrained(model_dir)
    shape = {"n_layers": hf.num_hidden_layers, "d_model": hf.hidden_size, "n_heads": hf.num_attention_heads,
             "n_kv_heads": hf.num_key_value_heads, "d_ff": hf.intermediate_size, "vocab_size": hf.vocab_size,
             "tie_embeddings": hf.tie_word_embeddings}
    if any(shape[k] != m[k] for k in shape):
        raise SystemExit(f"{model_dir} is shaped {shape}, not as the config's model section {m}")
    rows = s["prompts"] * s["samples_per_prompt"]
    total = warmup + steps
    data = [json.loads(line) for line in prompts_file.read_text().splitlines() if line.strip()]
    timer = StepTimer()
    profiling.ProfilingContext._log_metrics = lambda ctx, d: timer.record(ctx.name, d)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = GRPOTrainer(
            model=str(model_dir), reward_funcs=[exact_answer_on_text], args=grpo_args(s, tmp, rows, total, seed),
            processing_class=AutoTokenizer.from_pretrained(model_dir), train_dataset=Dataset.from_list(data),
            callbacks=[timer],
        )
        log(f"trl smollm2: {model_dir}, {s['prompts']} prompts x {s['samples_per_prompt']} of {prompts_file}, "
            f"{s['new_tokens']} new tokens, {warmup} warm-up + {steps} timed steps, "
            f"{torch.get_num_threads()} torch threads")
        result = train_timed(trainer, timer, s, warmup, steps, rows)
    return {
        **result,
        "config": {"model_dir": str(model_dir), "prompts_file": str(prompts_file), "rows": rows, "prompts": s["prompts"],
                   "samples_per_prompt": s["samples_per_prompt"], "new_tokens": s["new_tokens"], "beta": s["beta"],
                   "lr": s["lr"], "reference_model": True, "reward_fn": "selfplay.tasks.arithmetic:exact_answer",
                   "gradient_checkpointing": False, "policy": shape},
    }


def bench_decode(s: dict, warmup: int, steps: int, batch: int, seed: int, log) -> dict:
    torch.manual_seed(seed)
    m = s["model"]
    model = LlamaForCausalLM(llama_config(m)).eval()
    rng = np.random.default_rng(seed)
    ids = torch.tensor(rng.integers(3, m["vocab_size"], size=(batch, s["prompt_len"])))
    new = s["new_tokens"]
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=s["temperature"], top_k=0,
              max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=1, use_cache=True)
    log(f"trl decode: model.generate, batch {batch}, {s['prompt_len']}-token prompt, {new} new tokens, "
        f"{torch.get_num_threads()} torch threads")
    times = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            times.append(time.perf_counter() - t0)
            if out.shape[1] - ids.shape[1] != new:
                raise SystemExit(f"generate wrote {out.shape[1] - ids.shape[1]} tokens, expected {new}")
    return {
        "figure": {"name": "tokens_per_s", "unit": "generated tokens per second (model.generate, KV cache)",
                   **rate_stats(float(batch * new), times[warmup:])},
        "first_call_s": times[0],
        "config": {"batch": batch, "prompt_len": s["prompt_len"], "new_tokens": new, "policy": m},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["round", "decode", "smollm2"])
    p.add_argument("--config", default=None,
                   help="configs/bench_reference.yaml, or configs/bench_smollm2.yaml for smollm2 (the defaults)")
    p.add_argument("--model-dir", default=None, help="smollm2 mode: the Hugging Face directory of smollm2_hf.py")
    p.add_argument("--prompts", default=str(REPO / "benchmarks" / "peer" / "smollm2_prompts.jsonl"),
                   help="smollm2 mode: conversational prompts with an `answer` column (JSON lines)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: bench.warmup)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: bench.iterations)")
    p.add_argument("--batch", type=int, default=1, help="decode mode: rows per generate call")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the JSON line to this file")
    a = p.parse_args(argv)
    if a.mode == "smollm2" and not a.model_dir:
        p.error("smollm2 mode needs --model-dir (benchmarks/peer/smollm2_hf.py writes it)")
    a.config = a.config or str(REPO / "configs" / ("bench_smollm2.yaml" if a.mode == "smollm2" else "bench_reference.yaml"))
    if a.threads:
        torch.set_num_threads(a.threads)
    s = load_shapes(Path(a.config))
    if s["model"].get("compute_dtype", "float32") != "float32" or s["model"]["param_dtype"] != "float32":
        raise SystemExit("trl_grpo.py runs float32 only, on CPU")
    warmup = s["warmup"] if a.warmup is None else a.warmup
    steps = s["iterations"] if a.steps is None else a.steps
    transformers.logging.set_verbosity_error()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load_start = [round(x, 2) for x in os.getloadavg()]
    if a.mode == "round":
        result = bench_round(s, warmup, steps, a.seed, log)
    elif a.mode == "smollm2":
        result = bench_smollm2(s, Path(a.model_dir), Path(a.prompts), warmup, steps, a.seed, log)
    else:
        result = bench_decode(s, warmup, steps, a.batch, a.seed, log)
    record = {
        "benchmark": f"peer_trl_{a.mode}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/peer/trl_grpo.py", *(sys.argv[1:] if argv is None else argv)]),
        "config_file": a.config,
        **environment(),
        "load_avg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        **result,
        "timing": {"warmup": warmup, "iterations": steps},
        "host_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    line = json.dumps(record)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
