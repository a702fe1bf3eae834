"""Tuning: a study's life (:mod:`tfrun.tune.study`, ask and tell with Optuna, trials followed
as they run), its settings, files and summary (:mod:`tfrun.tune.tuning`), and the
early-termination policies (:mod:`tfrun.tune.policies`). A floor of its own above the targets,
whose runs its trials are: the sweeper plugin and the CLI call it; no target does."""
