"""The top floor: the ``tfrun`` command. :mod:`tfrun.cli.main` dispatches; runs and sweeps
go through Hydra in :mod:`tfrun.cli.app`; each verb is a module of its own
(``tfrun.cli.cmd_<verb>``), listed once in :mod:`tfrun.cli.verbs`; :mod:`tfrun.cli.help`,
:mod:`tfrun.cli.completion`, :mod:`tfrun.cli.render` (plans as text) and :mod:`tfrun.cli.live`
(views on a terminal) serve them. Nothing below imports it."""
