"""selfplay: reinforcement-learning self-play for language models, in JAX."""

__version__ = "0.1.0"
