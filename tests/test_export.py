"""`selfplay export-hf`: an imported, a pretrained-style and a trained run's policy written as a directory transformers
loads unchanged. The files are checked against what transformers made of the same exports (tests/fixtures/hf/export/,
written by make_fixtures.py in a separate venv), the logits against its logits, the params against the run's.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from rich.console import Console
from safetensors.numpy import load_file

from selfplay import checkpoint, policy
from selfplay.cli import main
from selfplay.config import UserError
from selfplay.jobs import export
from selfplay.models import hf
from selfplay.models.hf.layout import flatten
from selfplay.run.setup import CHECKPOINT_DIR
from selfplay.run.train import train

from test_hf import FIXTURES, TOL, _logits

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")

_spec = importlib.util.spec_from_file_location("own_run", FIXTURES / "own_run.py")
own_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(own_run)

def _flat(tree):
    tree = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_params(got, want, equal=True):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    same = all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in got)
    assert same == equal


def _run(name, tmp_path):
    if name == "own":
        return own_run.make_own_run(tmp_path / "run")
    return hf.import_hf(FIXTURES / name, tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# What transformers reads
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2_instruct", "mistral", "own"])
def test_export_writes_the_files_transformers_read_and_its_logits(tmp_path, name):
    expected = json.loads((FIXTURES / "export" / name / "expected.json").read_text())
    run = _run(name, tmp_path)
    assert export.export_hf(run, tmp_path / "out") == 0  # no round yet: the SFT/imported policy
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    for file, fields in expected["files"].items():
        assert json.loads((out / file).read_text()) == fields, file
    assert (out / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()

    # What transformers made of these files (recorded once): the specials in tokenizer_config.json, padding, eos.
    tc, gen, seen = expected["files"]["tokenizer_config.json"], expected["files"]["generation_config.json"], expected["tokenizer"]
    assert (tc["tokenizer_class"], tc["bos_token"], tc["eos_token"], tc["pad_token"]) == (
        "PreTrainedTokenizerFast", seen["bos_token"], seen["eos_token"], seen["pad_token"]
    )
    assert seen["padded"]["attention_mask"][0][-1] == 0 and seen["padded"]["input_ids"][0][-1] == seen["pad_token_id"]
    assert expected["model"]["generation_eos_token_id"] == gen["eos_token_id"]
    stored = policy.load_policy(run)
    assert gen["eos_token_id"] == (list(stored.tokenizer.eos_ids) if len(stored.tokenizer.eos_ids) > 1 else stored.tokenizer.eos_id)

    cfg, params, tok = hf.load_hf(out)
    assert cfg == stored.cfg.model and tok.eos_ids == stored.tokenizer.eos_ids
    _assert_params(params, stored.params)
    ref = load_file(str(FIXTURES / "export" / name / "logits.safetensors"))
    valid = ref["attention_mask"].astype(bool)
    assert ref["logits"][valid].std() > 0.5
    err = np.abs(_logits(cfg, params, ref) - ref["logits"])[valid].max()
    print(f"{name}: max |logits - HF logits of the export| = {err:.2e}")
    assert err <= TOL


def test_import_then_export_keeps_every_config_field_and_the_sliding_window(tmp_path):
    hf.import_hf(FIXTURES / "mistral", tmp_path / "run")
    export.export_hf(tmp_path / "run", tmp_path / "out")
    source = json.loads((FIXTURES / "mistral" / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == source
    assert (source["sliding_window"], source["max_position_embeddings"]) == (16, 64)
    past = json.loads((FIXTURES / "export" / "mistral" / "expected.json").read_text())["past_the_window"]
    assert past["max_diff_to_source"] == 0.0 and past["max_diff_without_window"] > 1e-2  # HF, 24 positions > 16
    # The chat template and the instruct EOS list come back too.
    hf.import_hf(FIXTURES / "qwen2_instruct", tmp_path / "run2")
    export.export_hf(tmp_path / "run2", tmp_path / "out2")
    tc = json.loads((tmp_path / "out2" / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == (FIXTURES / "qwen2_instruct" / "chat_template.jinja").read_text()
    assert json.loads((tmp_path / "out2" / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["eos_token_id"] == 2  # config.json's own, kept


def test_a_large_export_is_sharded_with_an_index(tmp_path):
    run = _run("qwen2_instruct", tmp_path)
    export.export_hf(run, tmp_path / "out", max_shard_bytes=40_000)
    out = tmp_path / "out"
    assert not (out / hf.WEIGHTS_FILE).exists()
    index = json.loads((out / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sizes = [(out / s).stat().st_size for s in shards]
    assert all(size < 40_000 + 4096 for size in sizes)  # a shard holds at most max_shard_bytes of tensors (+ header)
    assert index["metadata"]["total_size"] == sum(v.nbytes for s in shards for v in load_file(str(out / s)).values())
    _, params, _ = hf.load_hf(out)
    _assert_params(params, policy.load_policy(run).params)


# ----------------------------------------------------------------------------------------------
# A trained round
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    train(run, TINY, ["run.rounds=1"], progress=False, console=Console(quiet=True))
    return run


def test_a_rounds_export_holds_that_rounds_params_not_the_sft_ones(trained, tmp_path, capsys):
    assert main(["export-hf", str(trained), str(tmp_path / "latest")]) == 0
    assert capsys.readouterr().out.strip() == f"exported round 1 of {trained} to {tmp_path / 'latest'}"
    assert main(["export-hf", str(trained), str(tmp_path / "sft"), "--checkpoint", "0"]) == 0
    assert "the SFT policy" in capsys.readouterr().out
    with checkpoint.Checkpointer(trained / CHECKPOINT_DIR, read_only=True) as ckpt:
        flat, _ = ckpt.restore(1)  # the whole RunState, as resume reads it
    round_1 = {k.removeprefix("learner/params/").removesuffix("/value"): v for k, v in flat.items() if k.startswith("learner/params/")}

    _, latest, _ = hf.load_hf(tmp_path / "latest")
    _, sft, _ = hf.load_hf(tmp_path / "sft")
    want = {"/".join(p): v for p, v in flatten(latest).items()}
    assert want.keys() == round_1.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(want[k]), np.asarray(round_1[k]))
    _assert_params(sft, policy.load_policy(trained).params)
    _assert_params(latest, sft, equal=False)
    assert json.loads((tmp_path / "latest" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_naming_the_path_and_exit_2(tmp_path, capsys):
    def error(*argv):
        assert main(["export-hf", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    assert error(tmp_path / "nowhere", tmp_path / "o1") == f"selfplay: error: {tmp_path / 'nowhere'}: no such run directory"
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty' / 'config.yaml'} is missing" in error(tmp_path / "empty", tmp_path / "o2")
    run = own_run.make_own_run(tmp_path / "run")
    shutil.rmtree(run / policy.POLICY_DIR)
    assert f"{run} has no policy" in error(run, tmp_path / "o3")
    run = own_run.make_own_run(tmp_path / "run2")
    assert f"no checkpoint directory at {run / CHECKPOINT_DIR}" in error(run, tmp_path / "o4", "--checkpoint", 3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert error(run, tmp_path / "full") == f"selfplay: error: {tmp_path / 'full'} is not empty; export into a new directory"
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    run = own_run.make_own_run(tmp_path / "run")

    def killed(dst, tensors, max_shard_bytes):
        (dst / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf.export, "write_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export_hf(run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "out").mkdir()  # an empty OUT_DIR is fine, and stays empty after a failure
    with pytest.raises(KeyboardInterrupt):
        export.export_hf(run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"] and not any((tmp_path / "out").iterdir())
    monkeypatch.undo()
    assert export.export_hf(run, tmp_path / "out") == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
