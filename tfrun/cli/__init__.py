"""The top floor: the ``tfrun`` command (:mod:`tfrun.cli.main`), its verbs
(:mod:`tfrun.cli.verbs`: status, logs, cancel, runs, resume, plot, export, serve, env) and
the text of plans (:mod:`tfrun.cli.render`). Nothing below imports it."""
