"""Tasks shipped with the package besides the essay world: their data and reward functions."""
