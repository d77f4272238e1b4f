"""Causal-LM checkpoints in and out: Hugging Face directories (config.json + safetensors + tokenizer files) both ways,
GGUF files in; `import_hf` turns either into a run directory's initial policy, `save_hf` writes a policy back.

Architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases). One module per concern:
`layout` (HF tensor names <-> our stacked param tree), `config` (config.json <-> ModelConfig: what is read, accepted,
refused), `directory` (safetensors files), `gguf` (GGUF files: metadata, dequantized tensors, tokenizer), `load`
(any format -> checked params), `export` (save_hf), `importer` (import_hf).

What is refused (a `UserError` naming the file and the field or tensor), because our transformer would compute
something else: pickle weights; non-null `rope_scaling` or `rope_parameters` other than plain RoPE; `hidden_act`
other than silu; Llama `attention_bias` / `mlp_bias` true; non-zero dropouts; tensors the model does not use; any
config.json field outside `config.ACCEPTED_FIELDS` (e.g. quantization_config). Fields that never touch the forward
pass (ids, dtypes, `use_cache`, `output_*`, generation defaults, `pretraining_tp`, `_name_or_path`) are accepted.

Decided, not refused: an active sliding window caps `max_seq_len` at the window (export writes the window back).
Dtypes: params are bfloat16 when every stored tensor is bfloat16, else float32 (float16 and quantized GGUF tensors
widen: dequantized exactly as ggml defines them); `compute_dtype` follows `param_dtype`.
"""

from selfplay.models.hf.config import ACCEPTED_FIELDS, ARCHITECTURES, model_config_from_hf, model_config_to_hf, read_json
from selfplay.models.hf.directory import (
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from selfplay.models.hf.export import HF_CONFIG_FILE, generation_config, save_hf, tokenizer_config
from selfplay.models.hf.importer import fit_actor, import_hf
from selfplay.models.hf.layout import abstract_params
from selfplay.models.hf.load import load_hf

__all__ = [
    "ACCEPTED_FIELDS", "ARCHITECTURES", "CHAT_TEMPLATE_FILE", "CONFIG_FILE", "DEFAULT_MAX_SHARD_BYTES", "HF_CONFIG_FILE",
    "INDEX_FILE", "TOKENIZER_FILE", "WEIGHTS_FILE", "abstract_params", "fit_actor", "generation_config", "import_hf",
    "load_hf", "model_config_from_hf", "model_config_to_hf", "read_json", "save_hf", "tokenizer_config",
]
