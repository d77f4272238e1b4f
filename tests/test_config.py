"""The config loader: strict keys and types, YAML errors with file and line, overrides, round trip."""

import dataclasses
import re
from pathlib import Path

import pytest

from selfplay.cli import main
from selfplay.config import (
    ActorConfig,
    BenchConfig,
    Config,
    ConfigError,
    CriticConfig,
    LearnerConfig,
    ModelConfig,
    RunConfig,
    check_actor_fits_model,
    check_batch_minibatches,
    check_critic_init,
    check_label_reserve,
    check_ptx_source,
    check_reward_source,
    critic_refreshes,
    dump_config,
    initial_label_count,
    label_reserve,
    load_bench_config,
    load_config,
    save_config,
    to_dict,
    uses_critic,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
        (["learner.algorithm=ppo2"], "learner.algorithm: expected one of 'grpo', 'rloo', 'reinforce_pp', 'ppo', 'expert_iteration', got 'ppo2'"),
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


# ----------------------------------------------------------------------------------------------
# base: a config file extending another
# ----------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_child_keys_win_and_sections_merge_key_by_key(tmp_path):
    _write(tmp_path / "base.yaml", "learner:\n  lr: 1e-3\n  algorithm: rloo\ncritic:\n  label_budget: 900\n  model:\n    n_layers: 3\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\nlearner:\n  lr: 2e-3\ncritic:\n  model:\n    d_model: 32\n")
    cfg = load_config(child)
    assert cfg.learner.lr == pytest.approx(2e-3)  # the child's key wins
    assert cfg.learner.algorithm == "rloo"  # the base's other keys of that section stay
    assert cfg.critic.label_budget == 900
    assert (cfg.critic.model.n_layers, cfg.critic.model.d_model) == (3, 32)  # nested sections merge too
    assert "base" not in to_dict(cfg)
    # Overrides win over both files.
    assert load_config(child, ["learner.lr=5e-3", "learner.algorithm=grpo"]).learner.lr == pytest.approx(5e-3)
    assert load_config(child, ["learner.algorithm=grpo"]).learner.algorithm == "grpo"


def test_base_chain_of_two_resolves_each_path_from_the_file_that_names_it(tmp_path, monkeypatch):
    _write(tmp_path / "root.yaml", "world:\n  seed: 5\n  n_entities: 50\nrun:\n  rounds: 7\n")
    _write(tmp_path / "a" / "sub" / "mid.yaml", "base: ../../root.yaml\nworld:\n  n_entities: 60\n")
    child = _write(tmp_path / "a" / "child.yaml", "base: sub/mid.yaml\nrun:\n  rounds: 9\n")
    monkeypatch.chdir(tmp_path / "a" / "sub")  # relative to the referencing file, never the working directory
    cfg = load_config(child)
    assert (cfg.world.seed, cfg.world.n_entities, cfg.run.rounds) == (5, 60, 9)
    absolute = _write(tmp_path / "elsewhere" / "abs.yaml", f"base: {tmp_path / 'root.yaml'}\n")
    assert load_config(absolute).run.rounds == 7


def test_missing_base_names_the_file_that_references_it(tmp_path):
    child = _write(tmp_path / "child.yaml", "base: nowhere/missing.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    msg = str(e.value)
    assert msg.startswith(f"{child}: cannot read its base config ") and str(tmp_path / "nowhere" / "missing.yaml") in msg


def test_base_cycle_lists_the_chain(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    b = _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="config base cycle") as e:
        load_config(a)
    assert str(e.value).endswith(f"{a} -> {b} -> {a}")
    self_ref = _write(tmp_path / "self.yaml", "base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="config base cycle"):
        load_config(self_ref)


@pytest.mark.parametrize("value", ["3", "null", "[a.yaml]", "''"])
def test_base_must_be_a_path_string(tmp_path, value):
    child = _write(tmp_path / "child.yaml", f"base: {value}\n")
    with pytest.raises(ConfigError, match=rf"{child}: base must be a string"):
        load_config(child)


def test_base_is_a_file_key_not_a_config_key():
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(None, ["base=default.yaml"])


def test_no_safeguards_is_default_with_its_safeguards_off():
    default = load_config(CONFIGS / "default.yaml")
    expected = dataclasses.replace(
        default,
        critic=dataclasses.replace(default.critic, refresh_every=0),
        learner=dataclasses.replace(default.learner, lr=5e-4, kl_coef=0.0, ptx_coef=0.0),
        run=dataclasses.replace(default.run, rounds=80),
    )
    assert load_config(CONFIGS / "no_safeguards.yaml") == expected
    assert "base: default.yaml" in (CONFIGS / "no_safeguards.yaml").read_text()


# ----------------------------------------------------------------------------------------------
# bench: its own section, read by load_bench_config
# ----------------------------------------------------------------------------------------------

BENCH_YAML = "learner:\n  lr: 1e-3\nbench:\n  iterations: 7\n  batches: [1, 8]\n"


def test_load_bench_config_splits_the_bench_section(tmp_path):
    p = _write(tmp_path / "b.yaml", BENCH_YAML)
    cfg, bench = load_bench_config(p, ["bench.warmup=3", "learner.algorithm=rloo"])
    assert bench == BenchConfig(iterations=7, batches=(1, 8), warmup=3)
    assert (cfg.learner.lr, cfg.learner.algorithm) == (pytest.approx(1e-3), "rloo")
    assert not hasattr(cfg, "bench") and "bench" not in to_dict(cfg)
    assert load_bench_config(None) == (Config(), BenchConfig())
    base = _write(tmp_path / "child.yaml", "base: b.yaml\nbench:\n  warmup: 2\n")  # bench merges over a base like a section
    assert load_bench_config(base)[1] == BenchConfig(iterations=7, batches=(1, 8), warmup=2)


def test_load_config_checks_then_ignores_the_bench_section(tmp_path):
    p = _write(tmp_path / "b.yaml", BENCH_YAML)
    cfg = load_config(p, ["bench.iterations=9"])
    assert cfg == load_config(None, ["learner.lr=1e-3"])
    saved = save_config(cfg, tmp_path / "run")
    assert "bench" not in saved.read_text() and load_config(saved) == cfg
    for bad, expected in [(["bench.iterations=0"], "bench.iterations"), (["bench.iteratons=2"], "unknown config key 'bench.iteratons'")]:
        for load in (load_config, load_bench_config):
            with pytest.raises(ConfigError, match=expected):
                load(p, bad)
    with pytest.raises(ConfigError, match="bench: expected a mapping"):
        load_config(_write(tmp_path / "flat.yaml", "bench: 3\n"))


# ----------------------------------------------------------------------------------------------
# Checks across sections, and the learner's
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, good, expected",
    [
        (["actor.max_new_tokens=300"], ["actor.max_new_tokens=256"],
         "actor.prompt_buckets max (128) + actor.max_new_tokens (300) exceeds model.max_seq_len (384)"),
        (["critic.init_from_policy=true"],
         ["critic.init_from_policy=true", "critic.model.d_model=128", "critic.model.d_ff=384"],
         "critic.init_from_policy=true needs critic.model shaped like the policy's model: "
         "critic.model.d_model=64 vs model.d_model=128; critic.model.resolved_head_dim=16 vs model.resolved_head_dim=32; "
         "critic.model.d_ff=192 vs model.d_ff=384"),
        (["critic.refresh_every=4", "critic.refresh_budget=200", "run.rounds=40"],
         ["critic.refresh_every=4", "critic.refresh_budget=199", "run.rounds=40"],
         "critic.label_budget (2000) leaves nothing for the initial training after the refreshes' reserve "
         "(critic.refresh_budget 200 x run.rounds 40 // critic.refresh_every 4 = 2000)"),
        (["learner.std_ddof=1", "actor.samples_per_prompt=1"], ["learner.std_ddof=1", "actor.samples_per_prompt=2"],
         "learner.std_ddof=1 (sample std) needs actor.samples_per_prompt >= 2, got 1"),
        (["learner.minibatches=3"], ["learner.minibatches=4"],
         "actor.prompts_per_round x actor.samples_per_prompt (64) must be divisible by learner.minibatches (3)"),
        (["run.reward_source=gold", "run.prompts_file=p.jsonl"], ["run.reward_source=gold"],
         "run.reward_source=gold needs the essay world (no run.prompts_file)"),
        (["run.token_credit=gold_value"], ["run.token_credit=gold_value", "run.reward_source=gold"],
         "run.token_credit=gold_value reads the gold grader: it needs run.reward_source=gold, got critic"),
        (["learner.ptx_coef=0.5", "run.prompts_file=p.jsonl"], ["learner.ptx_coef=0.5", "run.prompts_file=p.jsonl", "run.ptx_file=h.jsonl"],
         "learner.ptx_coef > 0 with run.prompts_file needs human examples: set run.ptx_file"),
    ],
)  # fmt: skip
def test_cross_section_checks_refuse_to_load(bad, good, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, bad)
    assert expected in str(e.value)
    assert isinstance(load_config(None, good), Config)  # the nearest consistent config loads


def test_label_reserve_is_checked_whatever_the_label_source():
    cfg = load_config(None, ["critic.refresh_every=10", "critic.refresh_budget=64", "run.rounds=60"])
    assert label_reserve(cfg) == 64 * 6
    assert label_reserve(dataclasses.replace(cfg, critic=dataclasses.replace(cfg.critic, refresh_every=0))) == 0
    over = ["critic.refresh_every=1", "critic.refresh_budget=100", "run.rounds=20", "critic.label_budget=2000"]
    for source in ("world", "discriminator", "file"):
        with pytest.raises(ConfigError, match="leaves nothing for the initial training"):
            load_config(None, [*over, f"critic.label_source={source}"])


def test_a_run_has_a_critic_when_its_score_is_rewarded_or_refreshes_train_it():
    fns_only = ["reward.critic_weight=0", "reward.fns=[m:f]"]
    assert uses_critic(load_config(None)) and not critic_refreshes(load_config(None))
    assert not uses_critic(load_config(None, fns_only))
    assert uses_critic(load_config(None, [*fns_only, "critic.refresh_every=5"]))  # logged, never rewarded
    for no_labels in ("run.prompts_file=p.jsonl", "critic.label_source=file", "run.task=arithmetic"):
        cfg = load_config(None, [*fns_only, "critic.refresh_every=5", no_labels])
        assert not critic_refreshes(cfg) and not uses_critic(cfg), no_labels  # nothing could label a refresh's pairs


def test_stated_initial_labels_fix_the_initial_critic_whatever_run_rounds():
    base = ["critic.refresh_every=10", "critic.refresh_budget=64", "critic.label_budget=1600"]
    assert initial_label_count(load_config(None, [*base, "run.rounds=60"])) == 1600 - 64 * 6  # derived from run.rounds
    assert initial_label_count(load_config(None, [*base, "run.rounds=30"])) == 1600 - 64 * 3
    stated = [*base, "critic.initial_labels=1216"]
    assert {initial_label_count(load_config(None, [*stated, f"run.rounds={n}"])) for n in (10, 30, 60)} == {1216}
    with pytest.raises(ConfigError, match=r"critic.label_budget \(1600\) is smaller than critic.initial_labels \(1216\) plus"):
        load_config(None, [*stated, "run.rounds=70"])


def test_cross_section_checks_take_sections_directly():
    model = ModelConfig(max_seq_len=100)
    check_actor_fits_model(ActorConfig(prompt_buckets=(36,), max_new_tokens=64), model)
    with pytest.raises(ConfigError, match=r"actor.max_new_tokens \(65\) exceeds model.max_seq_len \(100\)"):
        check_actor_fits_model(ActorConfig(prompt_buckets=(36,), max_new_tokens=65), model)
    check_critic_init(CriticConfig(init_from_policy=False), model)  # off: shapes may differ
    check_critic_init(CriticConfig(init_from_policy=True, model=dataclasses.replace(model, max_seq_len=50)), model)
    with pytest.raises(ConfigError, match="critic.model.attention_bias=True vs model.attention_bias=False"):
        check_critic_init(CriticConfig(init_from_policy=True, model=dataclasses.replace(model, attention_bias=True)), model)
    with pytest.raises(ConfigError, match="critic.model.resolved_head_dim=16 vs model.resolved_head_dim=32"):
        check_critic_init(CriticConfig(init_from_policy=True, model=dataclasses.replace(model, head_dim=16)), model)
    check_batch_minibatches(ActorConfig(prompts_per_round=3, samples_per_prompt=4), LearnerConfig(minibatches=6))
    with pytest.raises(ConfigError, match=r"\(12\) must be divisible by learner.minibatches \(8\)"):
        check_batch_minibatches(ActorConfig(prompts_per_round=3, samples_per_prompt=4), LearnerConfig(minibatches=8))
    check_reward_source(RunConfig(reward_source="critic", prompts_file="p.jsonl"))
    with pytest.raises(ConfigError, match="run.reward_source=gold"):
        check_reward_source(RunConfig(reward_source="gold", prompts_file="p.jsonl"))
    check_ptx_source(LearnerConfig(ptx_coef=0.0), RunConfig(prompts_file="p.jsonl"))
    with pytest.raises(ConfigError, match="set run.ptx_file"):
        check_ptx_source(LearnerConfig(ptx_coef=0.1), RunConfig(prompts_file="p.jsonl"))
    cfg = Config()
    check_label_reserve(cfg)
    with pytest.raises(ConfigError, match="leaves nothing"):
        check_label_reserve(dataclasses.replace(cfg, critic=dataclasses.replace(cfg.critic, refresh_every=1, label_budget=64 * 40)))


def test_validate_after_dataclasses_replace():
    cfg = Config()
    assert cfg.validate() is cfg
    bad = dataclasses.replace(cfg, actor=dataclasses.replace(cfg.actor, max_new_tokens=1000))  # replace does not validate
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        bad.validate()
    bigger = dataclasses.replace(bad, model=dataclasses.replace(cfg.model, max_seq_len=2048))
    assert bigger.validate() is bigger


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(epochs=0), "sec.epochs must be >= 1, got 0"),
        (dict(minibatches=0), "sec.minibatches must be >= 1, got 0"),
        (dict(grad_accum=0), "sec.grad_accum must be >= 1, got 0"),
        (dict(max_grad_norm=0.0), "sec.max_grad_norm must be > 0, got 0.0"),
        (dict(adaptive_kl=True, kl_target=0.0), "sec.kl_target and sec.kl_horizon must be > 0 with sec.adaptive_kl"),
        (dict(adaptive_kl=True, kl_horizon=0), "sec.kl_target and sec.kl_horizon must be > 0 with sec.adaptive_kl"),
        (dict(ptx_coef=-0.1), "sec.ptx_coef must be >= 0, got -0.1"),
        (dict(ptx_coef=1.0, ptx_batch=3, minibatches=2), "sec.ptx_batch (3) must be a positive multiple of sec.minibatches (2)"),
        (dict(ptx_coef=1.0, ptx_batch=0), "sec.ptx_batch (0) must be a positive multiple of sec.minibatches (1)"),
        (dict(std_ddof=2), "sec.std_ddof must be 0 (population std) or 1 (sample std, as TRL and Tunix), got 2"),
    ],
)
def test_learner_config_validate(fields, expected):
    with pytest.raises(ConfigError) as e:
        LearnerConfig(**fields).validate("sec")
    assert str(e.value) == expected
    LearnerConfig(**{**fields, **dict(epochs=1, minibatches=1, grad_accum=1, max_grad_norm=1.0, adaptive_kl=False,
                                      ptx_coef=0.0, std_ddof=1)}).validate("sec")  # fmt: skip


def test_learner_checks_run_when_the_config_loads_and_in_the_learner():
    from selfplay import learner

    with pytest.raises(ConfigError, match="learner.max_grad_norm must be > 0, got 0.0"):
        load_config(None, ["learner.max_grad_norm=0"])
    with pytest.raises(ConfigError, match="learner.epochs must be >= 1, got 0"):
        learner._check(LearnerConfig(epochs=0))
    learner._check(LearnerConfig())


def test_a_key_given_twice_names_both_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("learner:\n  lr: 1e-3\nrun:\n  rounds: 3\nlearner:\n  kl_coef: 0.1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:5: key 'learner' is given twice \(first at line 1\)"):
        load_config(p)
    p.write_text("learner:\n  lr: 1e-3\n  lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3: key 'lr' is given twice \(first at line 2\)"):
        load_config(p)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("run:\n  prompts_file: caf\xe9.jsonl\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text"):
        load_config(p)


@pytest.mark.parametrize("override, message", [
    ("learner.lr=.nan", "learner.lr: expected a finite number"),
    ("learner.kl_coef=.inf", "learner.kl_coef: expected a finite number"),
    ("learner.lr=-1", "learner.lr must be > 0"),
    ("learner.kl_coef=-1", "learner.kl_coef must be >= 0"),
    ("learner.gamma=1.5", "learner.gamma must be in [0, 1]"),
    ("pretrain.steps=0", "pretrain.steps must be > 0"),
    ("pretrain.batch_size=0", "pretrain.batch_size must be > 0"),
    ("pretrain.heldout_fraction=0", "pretrain.heldout_fraction must be in (0, 1)"),
    ("run.seed=-1", "run.seed must be >= 0"),
    ("critic.lr=0", "critic.lr must be > 0"),
])
def test_out_of_range_and_non_finite_numbers_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_omission_credit_needs_the_token_credit_it_adds_to():
    with pytest.raises(ConfigError, match="run.omission_credit"):
        load_config(None, ["run.reward_source=gold", "run.omission_credit=1"])
    with pytest.raises(ConfigError, match="run.omission_credit"):
        load_config(None, ["run.reward_source=gold", "run.token_credit=gold_sentence", "run.omission_credit=-1"])
    cfg = load_config(None, ["run.reward_source=gold", "run.token_credit=gold_sentence", "run.omission_credit=0.5"])
    assert cfg.run.omission_credit == 0.5
