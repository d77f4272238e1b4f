"""The critic: a learned reward model, trained with the Bradley-Terry loss as an ensemble in one compiled program,
on a pool of preference pairs from a label source; saved and loaded as a directory.

  model.py   the reward model, its state and normaliser, the loss, how members combine, the compiled functions
  pairs.py   Pair, encoding and padding, the PairPool (labelled and self-made pairs, by kind), TRL preference files
  tamper.py  self-made negatives: tampering operators on text and the synthetic pairs they make
  labels.py  new pairs in the world: the labeller's pairs of policy samples, or human-vs-policy (discriminator)
  critic.py  the Critic handle: train, score, pair accuracy, calibrate, refresh
  store.py   save / load / metadata (the one place)
"""

from selfplay.critic.critic import (
    Critic,
    accuracy_by_kind,
    add_synthetic,
    attach_judge,
    calibrate_normalizer,
    critic_from_state,
    init_critic,
    pair_accuracy,
    refresh,
    score_essays,
    score_rollout,
    score_texts,
    train,
)
from selfplay.config import initial_label_count
from selfplay.critic.labels import PairSource, SampleFn, collect_pairs, collection_rngs, generator_sample_fn
from selfplay.critic.model import (
    ENSEMBLE_AXIS,
    CriticFns,
    CriticState,
    Normalizer,
    RewardModel,
    TokenLabels,
    abstract_state,
    bradley_terry_loss,
    combine_members,
    init_normalizer,
    init_state,
    make_critic_fns,
    make_optimizer,
    make_train_step,
    normalize,
    raw_rewards,
    reward_graphdef,
    trace_counts,
    update_normalizer,
)
from selfplay.critic.pairs import LABELLED, Pair, PairPool, encode_text, pad_to_bucket, read_preference_file
from selfplay.critic.store import (
    CRITIC_DIR,
    PAIRS_FILE,
    critic_meta,
    has_critic,
    host_meta,
    load_critic,
    restore_host,
    save_critic,
    save_replacing,
)
from selfplay.monitors import rankdata, spearman

__all__ = [
    "CRITIC_DIR", "Critic", "CriticFns", "CriticState", "ENSEMBLE_AXIS", "LABELLED", "Normalizer", "PAIRS_FILE",
    "Pair", "PairPool", "PairSource", "RewardModel", "SampleFn", "TokenLabels", "abstract_state", "accuracy_by_kind",
    "add_synthetic", "attach_judge", "bradley_terry_loss", "calibrate_normalizer", "collect_pairs", "collection_rngs",
    "combine_members", "critic_from_state", "critic_meta", "encode_text", "generator_sample_fn", "has_critic",
    "host_meta", "init_critic", "init_normalizer", "init_state", "initial_label_count", "load_critic",
    "make_critic_fns", "make_optimizer", "make_train_step", "normalize", "pad_to_bucket", "pair_accuracy", "rankdata",
    "raw_rewards", "read_preference_file", "refresh", "restore_host", "reward_graphdef", "save_critic",
    "save_replacing", "score_essays", "score_rollout", "score_texts", "spearman", "trace_counts", "train", "update_normalizer",
]
