#!/usr/bin/env bash
# Creates benchmarks/peer/.venv with benchmarks/peer/requirements.txt: TRL on CPU PyTorch, for the peer comparison
# (benchmarks/peer/compare.py). It is never a dependency of the selfplay package and shares nothing with its venv.
#
#   bash benchmarks/peer/setup.sh          # PYTHON=python3.11 to choose the interpreter
#
# torch: PyPI's Linux wheel is the CUDA build (several GB of CUDA libraries, unused on CPU). The CPU build is tried
# first from TORCH_INDEX_URL (default: PyTorch's CPU index; 10 s timeout, unreachable from some machines), then from the
# configured indexes and find-links (where a local 2.13.0+cpu wheel may lie); either satisfies the pin torch==2.13.0.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
torch_pin="$(grep -E '^torch==' "$here/requirements.txt")"
if ! "${pip[@]}" --timeout 10 --retries 0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "$torch_pin"; then
  echo "setup.sh: the CPU index was not reachable; installing $torch_pin from the configured indexes" >&2
  "${pip[@]}" "$torch_pin"
fi
"${pip[@]}" -r "$here/requirements.txt"
"$venv/bin/python" - <<'PY'
import torch, transformers, trl, datasets
print(f"peer venv ready: torch {torch.__version__} (CUDA: {torch.version.cuda}), transformers {transformers.__version__}, "
      f"trl {trl.__version__}, datasets {datasets.__version__}, {torch.get_num_threads()} torch threads")
PY
