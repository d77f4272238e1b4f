#!/usr/bin/env bash
# The GPU check, in one script under 8 minutes on one H200: install, a GPU test subset, then `selfplay bench
# actor|learner|round` on configs/bench_gpu_125m.yaml and configs/bench_gpu_1b.yaml (bf16 compute, float32 weights).
#
#   OUT=/some/dir bash benchmarks/gpu.sh          # on the GPU machine (no network; jax 0.11.x with CUDA installed)
#   GPU_SH_DRY_RUN=1 nice -n 19 bash benchmarks/gpu.sh   # anywhere: CPU, tiny shapes, no install, tests collected only
#
# Writes under $OUT (default runs/gpu-<UTC time>): results.jsonl (one JSON line per benchmark, as RESULTS.md's tables
# want; `python benchmarks/summarize.py $OUT/results.jsonl` > tables.md is run at the end), logs/<step>.log, env.txt
# (versions, nvidia-smi), summary.txt (each step: ok / failed / skipped, seconds). Every step has its own time limit
# and the whole run a budget (GPU_SH_BUDGET_S, default 420 s): a step that would not fit is skipped and says so, in
# priority order: tests, then 125M actor/learner/round, then 1B actor/learner/round, then the sharding tests.
#
# Decode: batch 1 / 64 / 256 x 256 new tokens, KV cache, no no-cache baseline (its compile and time would not fit);
# each point's roofline_ratio is against the HBM bandwidth and bf16 matmul peak probed in the same run. Learner: MFU
# of one update step. Round: completions/s and the stage split, the critic refresh amortised over 10 rounds.
# Tests on the GPU: cached decoding vs the full forward, the forward vs a NumPy reference, bf16 compute numerics, the
# sampler's log-probs vs teacher forcing, and tests/test_bench.py (zero compilations during timed calls), with
# float32 matmuls at full precision (JAX_DEFAULT_MATMUL_PRECISION=highest: the tests' 1e-5 tolerances are float32's,
# not TF32's). tests/test_sharding.py needs 8 devices: on fewer GPUs it runs on 8 fake CPU devices and says so.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PYTHON="${PYTHON:-python3}"
DRY="${GPU_SH_DRY_RUN:-0}"
BUDGET="${GPU_SH_BUDGET_S:-420}"
OUT="${OUT:-$REPO/runs/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT/logs"
RESULTS="$OUT/results.jsonl"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$SECONDS

export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/selfplay-gpu-jax-cache}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's selfplay even where the editable install failed
if [[ "$DRY" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  BACKEND=cpu
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  BACKEND=gpu
fi

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S MIN_S CMD...: run CMD with its output in logs/NAME.log, under min(LIMIT_S, what the budget has
# left); skipped when less than MIN_S is left.
step() {
  local name="$1" limit="$2" min="$3"
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < min)); then
    note "skipped  $name (budget: ${left}s left, needs ${min}s)"
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  if ((rc == 0)); then
    note "ok       $name ($((SECONDS - t0))s)"
  elif ((rc == 124 || rc == 137)); then
    note "timeout  $name (limit ${limit}s; log: logs/$name.log)"
  else
    note "failed   $name (exit $rc, $((SECONDS - t0))s; log: logs/$name.log)"
    tail -5 "$OUT/logs/$name.log" >&2
  fi
  return 0
}

# --- environment ------------------------------------------------------------------------------------------------
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" - <<'PY'
import importlib, platform
print("python:", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "tokenizers", "safetensors", "yaml", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report every missing package, not just the first
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
import jax
print("backend:", jax.default_backend(), "devices:", jax.devices())
PY
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >&2

if [[ "$DRY" == 1 ]]; then
  note "dry run: skipped pip install --no-deps --no-build-isolation -e ."
else
  # No network: no build isolation (it would fetch setuptools >= 77); PYTHONPATH above covers a failed install.
  if timeout 60 "$PYTHON" -m pip install --no-deps --no-build-isolation -e . > "$OUT/logs/install.log" 2>&1; then
    note "ok       pip install --no-deps --no-build-isolation -e ."
  else
    note "note     pip install -e . failed (logs/install.log); selfplay runs from PYTHONPATH=$REPO"
  fi
fi
if ! "$PYTHON" -c "import selfplay.jobs.bench, jax, sys; sys.exit(jax.default_backend() != '$BACKEND')" >> "$OUT/env.txt" 2>&1; then
  note "failed   selfplay.jobs.bench does not import, or jax's backend is not $BACKEND (see env.txt)"
  exit 1
fi

# --- tests on the GPU -------------------------------------------------------------------------------------------
GPU_TESTS=(
  "tests/test_transformer.py::test_cached_decoding_matches_full_forward_at_every_step"
  "tests/test_transformer.py::test_forward_matches_a_plain_numpy_reference"
  "tests/test_transformer.py::test_bfloat16_compute_keeps_float32_logits_and_exposes_hidden_states"
  "tests/test_actor.py::test_sampling_stops_rows_at_eos_and_its_logprobs_match_teacher_forcing"
  "tests/test_bench.py"
)
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider)
if [[ "$DRY" == 1 ]]; then
  step tests-gpu 60 10 "${PYTEST[@]}" --collect-only "${GPU_TESTS[@]}" tests/test_sharding.py
else
  step tests-gpu 120 30 env JAX_DEFAULT_MATMUL_PRECISION=highest "${PYTEST[@]}" --junitxml="$OUT/tests-gpu.xml" "${GPU_TESTS[@]}"
fi

# --- benchmarks -------------------------------------------------------------------------------------------------
ACTOR=("bench.batches=[1, 64, 256]" "bench.new_tokens=[256]" "bench.baseline=false" "bench.warmup=1" "bench.iterations=5")
LEARNER=("bench.warmup=1" "bench.iterations=5")
ROUND=("bench.warmup=1" "bench.iterations=3")
TINY=()
if [[ "$DRY" == 1 ]]; then  # the same commands on shapes a CPU runs in seconds
  for m in model critic.model; do
    TINY+=("$m.vocab_size=256" "$m.d_model=32" "$m.n_layers=1" "$m.n_heads=2" "$m.n_kv_heads=1" "$m.d_ff=64")
  done
  TINY+=("bench.batches=[2]" "bench.new_tokens=[6]" "bench.prompt_len=10" "bench.iterations=1" "bench.matmul_size=128"
         "bench.bandwidth_mib=4" "actor.max_new_tokens=6" "actor.prompt_buckets=[12]" "actor.prompts_per_round=2"
         "actor.samples_per_prompt=2" "critic.batch_size=2" "critic.seq_buckets=[24, 64]" "critic.refresh_budget=2"
         "critic.refresh_steps=1" "critic.label_budget=16" "critic.initial_labels=0" "learner.minibatches=1")
fi

bench() {  # bench NAME CONFIG WHICH LIMIT MIN OVERRIDES...
  local name="$1" config="$2" which="$3" limit="$4" min="$5"
  shift 5
  step "$name" "$limit" "$min" "$PYTHON" -m selfplay.cli bench "$which" --config "$config" --out "$RESULTS" "$@" "${TINY[@]}"
}

for size in 125m 1b; do
  cfg="configs/bench_gpu_$size.yaml"
  if [[ $size == 125m ]]; then lim=(60 60 90); else lim=(75 75 120); fi
  bench "actor-$size" "$cfg" actor "${lim[0]}" 30 "${ACTOR[@]}"
  bench "learner-$size" "$cfg" learner "${lim[1]}" 30 "${LEARNER[@]}"
  bench "round-$size" "$cfg" round "${lim[2]}" 45 "${ROUND[@]}"
done

# --- sharding tests: 8 devices ----------------------------------------------------------------------------------
if [[ "$DRY" != 1 ]]; then
  gpus=$("$PYTHON" -c "import jax; print(jax.device_count())" 2>/dev/null || echo 0)
  if ((gpus >= 8)); then
    step tests-sharding-gpu 90 30 "${PYTEST[@]}" tests/test_sharding.py
  else
    note "note     tests/test_sharding.py needs 8 devices, this machine has $gpus GPU(s): run on 8 fake CPU devices"
    step tests-sharding-cpu 90 30 env JAX_PLATFORMS=cpu "${PYTEST[@]}" tests/test_sharding.py
  fi
fi

[[ -s "$RESULTS" ]] && "$PYTHON" benchmarks/summarize.py "$RESULTS" > "$OUT/tables.md" 2> "$OUT/logs/summarize.log"
note "total    $((SECONDS - START))s; results in $OUT"
grep -qE "^(failed|timeout)" "$SUMMARY" && exit 1
exit 0
