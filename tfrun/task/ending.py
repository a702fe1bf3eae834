"""How a task's process ends: as Python's own exit does, up to the interpreter's teardown.

Once the script has returned and the task's records are written, what is left is Python's
exit: it waits for the script's (non-daemon) threads, runs the exit handlers (the script's
and its libraries': loggers, tracking clients, TensorFlow's own), flushes the standard
streams. Then comes the interpreter's teardown, and that is where a task that did its work
could still die:

- Python 3.11 ends a daemon thread that wants the GIL back during the teardown with a forced
  unwind (``pthread_exit``); C++ code that catches it without letting it through aborts the
  process ("terminate called after throwing an instance of ... FATAL: exception not
  rethrown"), as a task that had run a Keras script was seen to end;
- a ``tf.distribute.Server``, which cannot be stopped, aborts it the same way when ``exit()``
  destroys its gRPC threads.

The task was then reported killed by SIGABRT and its run FAILED; on Slurm the step's
``--kill-on-bad-exit`` also ends the ranks still writing their records. The teardown also
costs CPU with TensorFlow loaded, while the task's slot is still held. So every
task ends here instead (the bootstrap's local process, a Slurm task's
:mod:`tfrun.task.held`, a pool's item), as multiprocessing's children end: everything
Python's exit runs, then ``os._exit``.

What the teardown alone would have done is not done: an object still held by a module at
exit is not finalized (a file a module left open loses what it had not yet flushed).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_code(exc: SystemExit) -> int:
    """The exit code Python gives an uncaught SystemExit: None is 0, a number is itself,
    anything else is printed and is 1."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def exit_past_teardown(code: int) -> NoReturn:
    """End this process with ``code`` after what Python's exit runs before its teardown.
    Called on the main thread, as the process's last act."""
    try:
        # Python's exit waits for the threads first (threading's own exit hooks included:
        # concurrent.futures' workers are told to finish): multiprocessing calls the same.
        threading._shutdown()  # type: ignore[attr-defined]
    except KeyboardInterrupt:  # Ctrl-C while waiting for them: Python's exit goes on too
        pass
    atexit._run_exitfuncs()  # a handler's exception is printed, and the others still run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed already: nothing left to write
            pass
    os._exit(code)
