"""Start a Slurm task's Python with the stop signals held: ``python -u -m tfrun.task.held -u -m MODULE ARGS``
runs MODULE as ``python -u -m MODULE ARGS`` would, and ends as a task ends, past the
interpreter's teardown (:mod:`tfrun.task.ending`).

Slurm may send the time-limit warning (``--signal``) up to a minute early, within the first
second of a short job, and a preemption's SIGTERM can come as early. Between the interpreter's
start and the bootstrap's handlers (:func:`tfrun.task.preempt.install`) lie the imports of
submitit, of the pickled call and of tfrun: SIGUSR1/SIGUSR2 would kill the task there, or
reach submitit's handler instead of tfrun's, and the stop would be lost. Held from here, a
stop signal waits and is delivered to tfrun's handlers. What is left is the interpreter's own
start, before this module's first line: a stop that kills the tasks there is sent again by the
job's batch shell, which runs them once more with it pending (:mod:`tfrun.plan.sbatch`).
"""

from tfrun.task import preempt

preempt.block()
preempt.resend_pending()  # a stop that killed this step's tasks as they started

import runpy  # noqa: E402  (after the signals are held: nothing before that line may take time)
import sys  # noqa: E402
import traceback  # noqa: E402

from tfrun.task import ending  # noqa: E402


def main(argv: list[str]) -> None:
    """Run ``-m MODULE ARGS`` as ``__main__``, in this interpreter and with the signals still held."""
    words = list(argv)
    while words[:1] == ["-u"]:
        words.pop(0)  # submitit's -u: this interpreter was started with it already
    if len(words) < 2 or words[0] != "-m":
        raise SystemExit("usage: python -u -m tfrun.task.held [-u] -m MODULE [ARGS]")
    sys.argv = [words[1], *words[2:]]  # argv[0] becomes the module's path, as with python -m
    try:
        runpy.run_module(words[1], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:  # submitit's, or the task's exit code (tfrun.targets.slurm)
        code = ending.exit_code(exc)
    except BaseException:  # what Python would print before it exits 1
        traceback.print_exc()
        code = 1
    ending.exit_past_teardown(code)


if __name__ == "__main__":
    main(sys.argv[1:])
