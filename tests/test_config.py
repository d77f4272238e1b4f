"""The config loader: strict keys and types, YAML errors with file and line, overrides, round trip."""

import dataclasses

import pytest

from selfplay.cli import main
from selfplay.config import Config, ConfigError, dump_config, load_config, save_config


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None, ["learner.lr=3e-4", "world.seed=7", "critic.model.d_model=64", "actor.prompt_buckets=[32, 96]"])
    assert cfg.learner.lr == pytest.approx(3e-4) and isinstance(cfg.learner.lr, float)
    assert cfg.world.seed == 7
    assert cfg.critic.model.d_model == 64
    # A partially given nested section keeps its parent's defaults, not the class defaults.
    assert cfg.critic.model.n_layers == Config().critic.model.n_layers
    assert cfg.actor.prompt_buckets == (32, 96)
    path = save_config(cfg, tmp_path / "run")
    assert load_config(path) == cfg
    assert dump_config(load_config(path)) == dump_config(cfg)


def test_yaml_file_then_overrides_win(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  lr: 1e-3\n  algorithm: rloo\nworld:\n  seed: 3\n")
    cfg = load_config(p, ["world.seed=4"])
    assert cfg.learner.lr == pytest.approx(1e-3)
    assert cfg.learner.algorithm == "rloo"
    assert cfg.world.seed == 4


@pytest.mark.parametrize(
    "override, expected",
    [
        (["learner.lrr=1e-3"], "unknown config key 'learner.lrr'; did you mean 'learner.lr'?"),
        (["critic.model.d_modle=3"], "unknown config key 'critic.model.d_modle'; did you mean 'critic.model.d_model'?"),
        (["lerner.lr=1e-3"], "unknown config key 'lerner'; did you mean 'learner'?"),
        (["learner.lr=fast"], "learner.lr: expected float, got 'fast' (str)"),
        (["model.n_layers=2.5"], "model.n_layers: expected int, got 2.5 (float)"),
        (["actor.greedy=1"], "actor.greedy: expected bool, got 1 (int)"),
        (["learner.algorithm=ppo2"], "learner.algorithm: expected one of 'grpo', 'rloo', 'reinforce_pp', 'ppo', got 'ppo2'"),
        (["actor.prompt_buckets=[32, x]"], "actor.prompt_buckets[1]: expected int, got 'x'"),
        (["model.n_heads=3"], "model.n_heads (3) must be a multiple of model.n_kv_heads (2)"),
        (["learner"], "override 'learner' must look like section.key=value"),
    ],
)
def test_override_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert expected in str(e.value)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("world:\n  n_entitys: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'world.n_entitys'; did you mean 'world.n_entities'\?"):
        load_config(p)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("world:\n  seed: 1\nlearner:\n  lr: [1e-3\n  algorithm: grpo\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:")
    line = int(msg.split(":")[1])
    assert line in (4, 5, 6), msg
    assert "YAML syntax error" in msg


def test_top_level_must_be_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level of a config must be a mapping"):
        load_config(p)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_without_traceback(capsys):
    rc = main(["world", "sample", "--n", "1", "learner.lrr=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("selfplay: error: unknown config key 'learner.lrr'")
    assert "Traceback" not in err


def test_every_shipped_config_loads_and_documents_itself():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("#"), f"{f.name} must begin with a comment saying how to run it"
        assert "selfplay" in f.read_text().split("\n\n")[0], f"{f.name}'s header comment must give the command"
        assert isinstance(load_config(f), Config)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learner.lr = 1.0  # type: ignore[misc]
