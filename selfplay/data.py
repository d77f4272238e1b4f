"""Data in: JSONL prompt, preference and human-example files (every bad line named as FILE:LINE), and batching
helpers, including the stream of human examples the learner's pretraining-data term mixes back in.

A file is validated whole before anything is returned, so nothing partial looks like a success.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from selfplay.chat import TOKENIZER_CONFIG_FILE, ChatTemplate, ChatTemplateError
from selfplay.config import UserError
from selfplay.types import PtxRows

if TYPE_CHECKING:
    from selfplay.tokenizer import Tokenizer


T = TypeVar("T")


class DataError(UserError):
    """A data file is malformed; the message starts with FILE:LINE."""


def read_jsonl(
    path: str | Path,
    required: Mapping[str, type],
    optional: Mapping[str, type] | None = None,
    what: str = "records",
    check: Callable[[dict], str | None] | None = None,
) -> list[dict]:
    """Every non-blank line of `path` ('-' = stdin) as a dict holding the `required` keys with the given types,
    plus `_line`, its line number (from 1); `what` names the records in the error for a file without any.

    Raises DataError `FILE:LINE: reason` for the first bad line: invalid JSON, not an object, a missing key,
    a value of the wrong type, or the reason `check(row)` gives (None: the row is good; it runs after the key
    checks); `FILE: reason` for a file that cannot be read or has no lines.
    """
    optional = optional or {}
    name = "<stdin>" if str(path) == "-" else str(path)
    try:
        lines = sys.stdin.read().splitlines() if str(path) == "-" else Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, expected a JSONL file") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{i}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{i}: expected a JSON object, got {type(obj).__name__}")
        for key in required:
            if key not in obj:
                need = ", ".join(repr(k) for k in required)
                raise DataError(f"{name}:{i}: missing key '{key}' (need {need})")
        for key, tp in {**required, **optional}.items():
            if key in obj and not isinstance(obj[key], tp):
                raise DataError(f"{name}:{i}: '{key}' must be a {tp.__name__}, got {type(obj[key]).__name__}")
        reason = None if check is None else check(obj)
        if reason is not None:
            raise DataError(f"{name}:{i}: {reason}")
        rows.append(obj | {"_line": i})
    if not rows:
        raise DataError(f"{name}: no {what} (an empty file)")
    return rows


RESERVED_PROMPT_KEYS = ("prompts", "completions")  # the reward functions' own arguments


def _prompt_problem(row: dict) -> str | None:
    """Why `row` is not a prompt: a column named like a reward function's argument, or a "prompt" that is neither a
    non-empty string nor TRL's conversational format, a non-empty list of {"role": str, "content": str} messages."""
    reserved = [k for k in RESERVED_PROMPT_KEYS if k in row]
    if reserved:
        return f"'{reserved[0]}' cannot be a column: reward functions receive the batch's {reserved[0]} under that name"
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return None if prompt.strip() else "'prompt' is empty"
    if not isinstance(prompt, list):
        return f"'prompt' must be a str or a list of {{\"role\", \"content\"}} messages, got {type(prompt).__name__}"
    if not prompt:
        return "'prompt' is an empty conversation"
    for i, m in enumerate(prompt, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"'prompt' message {i} must be an object with string 'role' and 'content', got {json.dumps(m)[:80]}"
    return None


def read_prompt_rows(path: str | Path) -> list[dict]:
    """The rows of a prompts file: `{"prompt": "..."}` (plain) or `{"prompt": [{"role": ..., "content": ...}, ...]}`
    (TRL's conversational format), each with its other keys (the columns reward functions receive) and `_line`."""
    return read_jsonl(path, {"prompt": object}, what="prompts", check=_prompt_problem)


def prompt_texts(rows: Sequence[dict], chat_template: ChatTemplate | None, path: str | Path) -> list[str]:
    """The text the policy sees for each row of `path`: a plain prompt as it is, a conversation rendered with the
    model's chat template. A conversation without a template, or one the template refuses, is a DataError naming
    FILE:LINE."""
    out = []
    for r in rows:
        if isinstance(r["prompt"], str):
            out.append(r["prompt"])
            continue
        if chat_template is None:
            raise DataError(
                f"{path}:{r['_line']}: a conversational prompt needs the model's chat template, and the run directory's "
                f"{TOKENIZER_CONFIG_FILE} has none (no file or no 'chat_template' key; `selfplay import-hf` copies the model's)"
            )
        try:
            out.append(chat_template.render(r["prompt"]))
        except ChatTemplateError as e:
            raise DataError(f"{path}:{r['_line']}: {e}") from None
    return out


def read_prompts(path: str | Path, chat_template: ChatTemplate | None = None) -> list[str]:
    """The prompt texts of a JSONL prompts file (see `read_prompt_rows`, `prompt_texts`)."""
    return prompt_texts(read_prompt_rows(path), chat_template, path)


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a JSONL file of `{"prompt": "...", "completion": "..."}` lines (TRL's
    prompt-completion format); an empty completion is an error."""
    rows = read_jsonl(path, {"prompt": str, "completion": str})
    for r in rows:
        if not r["completion"].strip():
            raise DataError(f"{path}:{r['_line']}: 'completion' is empty")
    return [(r["prompt"], r["completion"]) for r in rows]


class ExampleStream:
    """Human examples for the learner's pretraining-data term: `take(k)` gives the next k as right-padded PtxRows
    (numpy) of one fixed width, the longest example's, so the update step compiles once. Epoch-shuffled and
    seeded like PromptStream; its position is a plain integer a checkpoint can hold."""

    def __init__(self, tokenizer: Tokenizer, examples: Sequence[tuple[str, str]], seed: int, max_len: int, source: str):
        if not examples:
            raise UserError(f"{source} has no examples for the pretraining-data term (learner.ptx_coef)")
        encoded = [tokenizer.encode_example(p, c) for p, c in examples]
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        if len(encoded[longest][0]) > max_len:
            raise UserError(
                f"{source}: example {longest + 1} has {len(encoded[longest][0])} tokens, more than model.max_seq_len ({max_len})"
            )
        width = len(encoded[longest][0])
        n = len(encoded)
        self.tokens = np.full((n, width), tokenizer.pad_id, np.int32)
        self.loss_mask = np.zeros((n, width), np.float32)
        self.valid = np.zeros((n, width), np.float32)
        for i, (ids, mask) in enumerate(encoded):
            self.tokens[i, : len(ids)] = ids
            self.loss_mask[i, : len(ids)] = mask
            self.valid[i, : len(ids)] = 1.0
        self.positions = np.broadcast_to(np.arange(width, dtype=np.int32), (n, width))
        self.stream = PromptStream(n, seed)

    @property
    def position(self) -> int:
        return self.stream.position

    @position.setter
    def position(self, value: int) -> None:
        self.stream.position = value

    def take(self, k: int) -> PtxRows:
        idx = self.stream.take(k)
        return PtxRows(self.tokens[idx], self.positions[idx], self.valid[idx], self.loss_mask[idx])  # indexing copies


class PromptStream:
    """An endless, seeded, epoch-shuffled stream of prompt indices whose position can be saved and restored."""

    def __init__(self, n: int, seed: int, position: int = 0):
        if n <= 0:
            raise ValueError("PromptStream needs at least one prompt")
        self.n = n
        self.seed = seed
        self.position = position
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cached[1]

    def take(self, k: int) -> np.ndarray:
        out = np.empty(k, np.int64)
        for j in range(k):
            epoch, offset = divmod(self.position + j, self.n)
            out[j] = self._order(epoch)[offset]
        self.position += k
        return out


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled index batches of a fixed size (the last partial batch of an epoch is dropped)."""
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} examples")
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def fixed_chunks(items: Sequence[T], size: int) -> Iterator[tuple[int, list[T], int]]:
    """(chunk number, exactly `size` items, how many are real) over `items`: the last chunk is filled up by
    repeating its last item, so a compiled function of one batch size serves every chunk."""
    for c, start in enumerate(range(0, len(items), size)):
        chunk = list(items[start : start + size])
        real = len(chunk)
        yield c, chunk + [chunk[-1]] * (size - real), real
