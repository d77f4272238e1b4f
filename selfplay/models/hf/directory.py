"""A Hugging Face checkpoint directory: config.json, model.safetensors (or an index and its shards), tokenizer.json and
the JSON files beside it; read tensor by tensor, written as transformers' save_pretrained writes it. Pickle weights
are refused, never loaded."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from selfplay.config import UserError
from selfplay.models.hf.layout import DTYPES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where recent transformers save a chat template instead of tokenizer_config
DEFAULT_MAX_SHARD_BYTES = 50 * 1000**3  # transformers' save_pretrained default max_shard_size, "50GB"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class SafetensorsWeights:
    """Every tensor of a checkpoint directory (model.safetensors, or an index + shards): names, dtypes and shapes
    from the headers (`info`: name -> (safetensors dtype, shape)); data read one tensor at a time. Files stay open
    until `stack` closes."""

    def __init__(self, src: Path, stack: contextlib.ExitStack):
        self._stack = stack
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.file_of = self._locate(src)
        self.info: dict[str, tuple[str, tuple[int, ...]]] = {}
        keys = {file: set(self._open(file).keys()) for file in set(self.file_of.values())}
        for name, file in self.file_of.items():
            if name not in keys[file]:
                raise UserError(f"{src / INDEX_FILE}: tensor '{name}' is mapped to {file.name}, which does not contain it")
            sl = self._open(file).get_slice(name)
            self.info[name] = (sl.get_dtype(), tuple(sl.get_shape()))

    def _locate(self, src: Path) -> dict[str, Path]:
        single, index = src / WEIGHTS_FILE, src / INDEX_FILE
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {str(name): src / shard for name, shard in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' of tensor -> shard file): {e}") from None
            missing = sorted({f.name for f in files.values() if not f.is_file()})
            if missing:
                raise UserError(f"{index}: shard {missing[0]} is missing from {src}")
            return files
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES or p.name.endswith(".bin.index.json"))
        if pickles:
            raise UserError(
                f"{src}: only pickle weights found ({', '.join(pickles)}): pickle weights are refused; convert to "
                "safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)` with transformers)"
            )
        raise UserError(f"{src}: no weights found: expected {WEIGHTS_FILE} or {INDEX_FILE}")

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="np"))
            except Exception as e:  # safetensors raises its own SafetensorError on a corrupt header
                raise UserError(f"{file}: not a readable safetensors file: {e}") from None
        return self._handles[file]

    def check_dtypes(self) -> None:
        for name, (dtype, _) in self.info.items():
            if dtype not in DTYPES:
                raise UserError(f"{self.where(name)}: tensor '{name}' has dtype {dtype}; only F32, F16 and BF16 are supported")

    def where(self, name: str) -> Path:
        return self.file_of[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor as stored (bfloat16 read from the raw file: older safetensors cannot build numpy bfloat16)."""
        file = self.file_of[name]
        dtype, shape = self.info[name]
        if dtype != "BF16":
            return self._open(file).get_tensor(name)
        if file not in self._headers:
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[file] = (8 + n, json.loads(fh.read(n)))
        data_start, header = self._headers[file]
        begin, end = header[name]["data_offsets"]
        raw = np.fromfile(file, dtype=np.uint16, count=(end - begin) // 2, offset=data_start + begin)
        return raw.view(DTYPES["BF16"]).reshape(shape)


def write_json(path: Path, fields: dict) -> None:
    path.write_text(json.dumps(fields, indent=2) + "\n")


def write_weights(dst: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """model.safetensors, or (as transformers' save_pretrained) shards model-0000k-of-0000n.safetensors of at most
    `max_shard_bytes` each (a larger tensor gets a shard of its own) and model.safetensors.index.json."""
    shards: list[dict[str, np.ndarray]] = [{}]
    for name, w in tensors.items():
        if shards[-1] and sum(x.nbytes for x in shards[-1].values()) + w.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = w
    files = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)])
    for file, shard in zip(files, shards):
        save_file(shard, str(dst / file), metadata={"format": "pt"})  # transformers refuses files without format=pt
        (dst / file).chmod(0o644)  # safetensors writes 0600; the checkpoint is meant to be shared like the JSON files
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        write_json(dst / INDEX_FILE, {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())}, "weight_map": weight_map})
