"""selfplay.sharding on 8 fake CPU devices: sharded steps equal single-device steps, params are born sharded,
checkpoints move between meshes, mesh config errors name the key.

Tolerances (float32): 1e-5 absolute on params, optimiser moments and losses after one update (reductions split
over devices add in another order); sampled tokens under greedy decoding must be identical.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from selfplay import checkpoint, learner, sharding
from selfplay.actor import make_sampler
from selfplay.config import ActorConfig, ConfigError, CriticConfig, LearnerConfig, MeshConfig, ModelConfig, load_config
from selfplay.models import transformer
from selfplay.types import Rollout

TOL = 1e-5
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
RULES = sharding.logical_rules(MeshConfig())
N_PROMPTS, G, PW, T = 8, 2, 4, 4  # batch rows B = 16: divisible by every mesh's data x fsdp
B, L = N_PROMPTS * G, PW + T
EOS, PAD = 1, 0
LEARNER = LearnerConfig(lr=1e-3, minibatches=2, kl_coef=0.05)


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    d, f, t = shape
    return sharding.make_mesh(MeshConfig(data=d, fsdp=f, tensor=t))


def close(a, b, tol=TOL):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0), a, b)


@functools.lru_cache(maxsize=None)
def policy():
    """Params perturbed away from init so that logits are far apart (greedy choices are not near-ties)."""
    graphdef, params = transformer.split(transformer.create_model(CFG, 0))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return graphdef, jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def learner_batch() -> learner.Batch:
    graphdef, params = policy()
    rng = np.random.default_rng(0)
    prompt_len_b = np.repeat(rng.integers(1, PW + 1, N_PROMPTS), G).astype(np.int32)
    tokens_bl = rng.integers(2, CFG.vocab_size, (B, L)).astype(np.int32)
    tokens_bl[:, :PW][np.arange(PW)[None, :] < PW - prompt_len_b[:, None]] = PAD
    done_b = rng.integers(1, T + 1, B)  # completion lengths 1..T
    mask_bl = np.zeros((B, L), np.float32)
    mask_bl[:, PW:] = np.arange(T)[None, :] < done_b[:, None]
    tokens_bl[:, PW:][mask_bl[:, PW:] == 0] = PAD
    rollout = Rollout(tokens_bl, prompt_len_b, mask_bl, np.zeros((B, L), np.float32), np.zeros(B, bool))
    logprob_fn = functools.partial(transformer.token_logprobs, graphdef)
    lp_bl, _ = jax.jit(logprob_fn)(params, tokens_bl, rollout.positions_bl(PW), rollout.valid_mask_bl(PW))
    ref_bl = np.asarray(lp_bl) * mask_bl
    rollout = rollout._replace(logprobs_bl=ref_bl + 0.01 * rng.standard_normal((B, L)).astype(np.float32) * mask_bl)
    return jax.tree.map(np.asarray, learner.Batch(rollout, rng.standard_normal(B).astype(np.float32), ref_bl))


def update_step():
    graphdef, _ = policy()
    logprob_fn = functools.partial(transformer.token_logprobs, graphdef)
    return learner.make_update_step(LEARNER, group_size=G, prompt_width=PW, logprob_fn=logprob_fn)


@functools.lru_cache(maxsize=None)
def single_device_update():
    _, params = policy()
    state, metrics = update_step()(learner.init_train_state(LEARNER, params), learner_batch(), jax.random.key(3))
    return jax.device_get((state, metrics))


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_learner_update_equals_single_device(shape):
    mesh = mesh_of(shape)
    _, params = policy()
    init = functools.partial(learner.init_train_state, LEARNER)
    state = sharding.init_sharded(init, sharding.shard_state(params, mesh, RULES), mesh=mesh, rules=RULES)
    state_sh = sharding.param_shardings(state, mesh, RULES)
    batch = sharding.shard_batch(learner_batch(), mesh, RULES)
    step = sharding.shard_update_step(update_step(), state_sh, sharding.batch_shardings(batch, mesh, RULES), mesh)

    new_state, metrics = step(state, batch, jax.random.key(3))
    want_state, want_metrics = single_device_update()
    close(new_state.params, want_state.params)
    close(new_state.opt_state, want_state.opt_state)
    close(metrics, want_metrics)
    # The state keeps its shardings, so the next step reuses the donated buffers without recompiling.
    jax.tree.map(lambda x, s: assert_sharded_as(x, s), new_state, state_sh)
    assert batch.rollout.tokens_bl.sharding.spec == P(("data", "fsdp") if shape[1] > 1 else "data")


def assert_sharded_as(x: jax.Array, s: jax.sharding.NamedSharding) -> None:
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


@functools.lru_cache(maxsize=None)
def sampler_case():
    actor = ActorConfig(greedy=True, max_new_tokens=6, prompt_buckets=(PW,), samples_per_prompt=G)
    rng = np.random.default_rng(1)
    len_n = rng.integers(1, PW + 1, N_PROMPTS).astype(np.int32)
    prompts_np = rng.integers(2, CFG.vocab_size, (N_PROMPTS, PW)).astype(np.int32)
    prompts_np[np.arange(PW)[None, :] < PW - len_n[:, None]] = PAD
    graphdef, params = policy()
    want, _ = make_sampler(CFG, actor, eos_ids=(EOS,), pad_id=PAD)(graphdef, params, prompts_np, len_n, jax.random.key(0))
    return actor, prompts_np, len_n, jax.device_get(want)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_greedy_sampler_writes_the_same_tokens(shape):
    mesh = mesh_of(shape)
    actor, prompts_np, len_n, want = sampler_case()
    graphdef, params = policy()
    sampler = make_sampler(CFG, actor, eos_ids=(EOS,), pad_id=PAD, constrain_cache=sharding.kv_cache_constraint(mesh, RULES))
    sample = sharding.shard_sampler(sampler, mesh, RULES)
    prompts, lens = sharding.shard_batch((prompts_np, len_n), mesh, RULES)
    got, _ = sample(graphdef, sharding.shard_state(params, mesh, RULES), prompts, lens, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got.tokens_bl), want.tokens_bl)
    np.testing.assert_array_equal(np.asarray(got.completion_mask_bl), want.completion_mask_bl)
    close(got.logprobs_bl, want.logprobs_bl)
    assert got.tokens_bl.sharding.spec == P(("data", "fsdp") if shape[1] > 1 else "data")


def critic_module():
    from selfplay.critic import model

    return model


# centering_coef > 0: without it the Bradley-Terry gradient of the head's bias is exactly zero, and Adam would blow
# its rounding noise (which differs between meshes) up to a full step of either sign.
CRITIC = CriticConfig(model=CFG, ensemble_size=2, batch_size=4, seq_buckets=(16,), lr=1e-3, centering_coef=0.1)


@functools.lru_cache(maxsize=None)
def critic_case():
    critic = critic_module()
    rng = np.random.default_rng(2)
    k, n, l = CRITIC.ensemble_size, 2 * CRITIC.batch_size, CRITIC.seq_buckets[0]
    len_kn = rng.integers(3, l + 1, (k, n)).astype(np.int32)
    tokens_knl = rng.integers(2, CFG.vocab_size, (k, n, l)).astype(np.int32)
    tokens_knl[np.arange(l)[None, None, :] >= len_kn[..., None]] = PAD
    graphdef = critic.reward_graphdef(CRITIC.model)
    state, metrics = critic.make_train_step(graphdef, CRITIC)(critic.init_state(CRITIC, 0), tokens_knl, len_kn)
    return graphdef, tokens_knl, len_kn, jax.device_get((state, metrics))


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_critic_train_step_equals_single_device(shape):
    critic = critic_module()
    mesh = mesh_of(shape)
    graphdef, tokens_knl, len_kn, (want_state, want_metrics) = critic_case()
    state = sharding.init_sharded(lambda: critic.init_state(CRITIC, 0), mesh=mesh, rules=RULES)
    state_sh = sharding.param_shardings(state, mesh, RULES)
    k, n, _ = tokens_knl.shape
    step = sharding.shard_critic_step(critic.make_train_step(graphdef, CRITIC), state_sh, mesh, RULES, members=k, rows=n)
    new_state, metrics = step(state, tokens_knl, len_kn)
    close(new_state.params, want_state.params)
    close(new_state.opt_state, want_state.opt_state)
    close(metrics, want_metrics)
    jax.tree.map(lambda x, s: assert_sharded_as(x, s), new_state, state_sh)


def test_sharded_critic_with_token_heads_trains_like_single_device():
    """critic.token_heads: the token labels travel with the rows (split like them) and the step matches one device."""
    critic = critic_module()
    cfg = dataclasses.replace(CRITIC, token_heads=True)
    _, tokens_knl, len_kn, _ = critic_case()
    sep = 5
    tokens_knl = tokens_knl.copy()
    tokens_knl[..., 3] = sep  # the essay starts at column 4
    rng = np.random.default_rng(3)
    labels = critic.TokenLabels(*(rng.integers(0, 2, tokens_knl.shape).astype(np.float32) for _ in range(4)))
    graphdef = critic.reward_graphdef(cfg.model, token_heads=True)
    want_state, want_metrics = jax.device_get(critic.make_train_step(graphdef, cfg, sep)(critic.init_state(cfg, 0), tokens_knl, len_kn, labels))
    assert want_metrics["flag_loss"].shape == (cfg.ensemble_size,) and np.all(want_metrics["flag_loss"] > 0)
    mesh = mesh_of((2, 2, 2))
    state = sharding.init_sharded(lambda: critic.init_state(cfg, 0), mesh=mesh, rules=RULES)
    state_sh = sharding.param_shardings(state, mesh, RULES)
    k, n, _ = tokens_knl.shape
    step = sharding.shard_critic_step(critic.make_train_step(graphdef, cfg, sep), state_sh, mesh, RULES, members=k, rows=n, labels=True)
    new_state, metrics = step(state, tokens_knl, len_kn, labels)
    close(new_state.params, want_state.params)
    close(metrics, want_metrics)


def test_params_and_optimizer_moments_are_born_sharded_by_their_logical_axes():
    mesh = mesh_of((2, 2, 2))
    graphdef, params = sharding.init_params(CFG, 0, mesh, RULES)
    specs = {
        "embed": (params["embed"], P("tensor", "fsdp")),  # [vocab, embed]
        "q_proj": (params["layers"]["q_proj"], P(None, "fsdp", "tensor")),  # [layers, embed, heads, head_dim]
        "o_proj": (params["layers"]["o_proj"], P(None, "tensor", None, "fsdp")),  # [layers, heads, head_dim, embed]
        "down_proj": (params["layers"]["down_proj"], P(None, "tensor", "fsdp")),  # [layers, mlp, embed]
        "final_norm": (params["final_norm"], P()),
    }
    for name, (var, spec) in specs.items():
        assert var.get_value().sharding.spec == spec, name
    q = params["layers"]["q_proj"].get_value()
    assert q.addressable_shards[0].data.shape == (CFG.n_layers, CFG.d_model // 2, CFG.n_heads // 2, CFG.resolved_head_dim)
    # Born sharded with the same values as the eager single-device init.
    _, eager = transformer.split(transformer.create_model(CFG, 0))
    close(params, eager, tol=1e-7)
    assert transformer.merge(graphdef, params).cfg == CFG

    # Adam's moments follow their params; counts and hyperparameters are replicated.
    state = sharding.init_sharded(functools.partial(learner.init_train_state, LEARNER), params, mesh=mesh, rules=RULES)
    mu = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state) if "mu" in jax.tree_util.keystr(path)]
    assert [m.sharding.spec for m in mu] == [x.sharding.spec for x in jax.tree.leaves(params)]
    assert state.step.sharding.spec == P() and state.kl.kl_coef.sharding.spec == P()


def test_indivisible_dimensions_fall_back_to_fewer_mesh_axes_then_replicated():
    mesh = mesh_of((1, 2, 4))
    _, abstract = transformer.split(transformer.abstract_model(CFG))
    sh = sharding.param_shardings(abstract, mesh, RULES)
    assert sh["layers"]["q_proj"].get_value().spec == P(None, "fsdp", "tensor")  # 4 heads over tensor=4
    assert sh["layers"]["k_proj"].get_value().spec == P(None, "fsdp")  # 2 kv heads cannot split 4 ways
    mesh = mesh_of((2, 4, 1))
    assert sharding.logical_spec((6, 3), ("batch", None), mesh, RULES) == P("data")  # 6 rows: data only
    assert sharding.logical_spec((3, 3), ("batch", None), mesh, RULES) == P()
    with pytest.raises(ValueError, match="logical axis 'seq'"):
        sharding.logical_spec((4,), ("seq",), mesh, RULES)


def test_kv_cache_is_pinned_to_batch_and_kv_heads():
    mesh = mesh_of((2, 2, 2))
    constrain = jax.jit(sharding.kv_cache_constraint(mesh, RULES))
    cache = constrain(transformer.init_cache(CFG, 8, 12))
    assert all(k.sharding.spec == P(("data", "fsdp"), "tensor") for k in cache.k_bgsd + cache.v_bgsd)
    assert cache.valid_bs.sharding.spec == P(("data", "fsdp"))


def flat(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_checkpoint_saved_on_one_mesh_restores_onto_another_with_the_targets_shardings(tmp_path):
    _, params = policy()
    init = functools.partial(learner.init_train_state, LEARNER)
    mesh_a, mesh_b = mesh_of((2, 4, 1)), mesh_of((2, 2, 2))
    state = sharding.init_sharded(init, sharding.shard_state(params, mesh_a, RULES), mesh=mesh_a, rules=RULES)
    with checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(1, flat(state))
    abstract = jax.eval_shape(init, params)
    target = flat(sharding.with_shardings(abstract, sharding.param_shardings(abstract, mesh_b, RULES)))
    restored, _, step = checkpoint.restore_latest(tmp_path / "ckpt", target)
    assert step == 1 and restored.keys() == target.keys()
    for key, want in flat(state).items():
        assert restored[key].sharding.is_equivalent_to(target[key].sharding, want.ndim), key
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(want), err_msg=key)
    assert restored["params/layers/q_proj/value"].sharding.spec == P(None, "fsdp", "tensor")


@pytest.mark.parametrize(
    "mesh_cfg, message",
    [
        (MeshConfig(data=3), r"mesh.data \(3\) x mesh.fsdp \(1\) x mesh.tensor \(1\) = 3 devices, but there are 8"),
        (MeshConfig(data=-1, fsdp=3), r"mesh.data=-1 .* 8 devices do not divide by mesh.fsdp x mesh.tensor = 3"),
        (MeshConfig(data=-1, tensor=-1), r"mesh.data and mesh.tensor"),
        (MeshConfig(fsdp=0), r"mesh.fsdp must be a positive device count or -1"),
    ],
)
def test_mesh_config_errors_name_the_key(mesh_cfg, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(mesh_cfg)


def test_rules_from_config_override_the_defaults_and_unknown_names_are_errors():
    cfg = load_config(None, ["mesh.rules=[[embed, null], [ensemble, data], [batch, [data]]]"])
    rules = sharding.logical_rules(cfg.mesh)
    assert rules["embed"] == () and rules["ensemble"] == ("data",) and rules["batch"] == ("data",)
    assert rules["mlp"] == ("tensor",)  # not listed: keeps its default
    assert set(transformer.LOGICAL_AXES) <= set(rules)
    with pytest.raises(ConfigError, match=r"mesh.rules\[1\]: unknown logical axis 'mpl'; did you mean 'mlp'\?"):
        load_config(None, ["mesh.rules=[[embed, null], [mpl, tensor]]"])
    with pytest.raises(ConfigError, match=r"mesh.rules\[0\]: 'embed' maps to unknown mesh axis 'model'"):
        load_config(None, ["mesh.rules=[[embed, model]]"])


def test_single_process_helpers(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.initialize_distributed(MeshConfig()) is False
    assert sharding.initialize_distributed(dataclasses.replace(MeshConfig(), multihost=True, num_processes=1)) is False
    assert sharding.is_logging_process()
    assert sharding.process_share(list(range(6))) == list(range(6))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
        sharding.initialize_distributed(MeshConfig())
