"""The self-play run: `setup` (config, mesh, the pieces), `state` (RunState: one save, one restore), `round` (the
round, stage by stage), `evaluate` (the SFT-vs-trained table), `train` (prepare -> rounds -> report)."""
