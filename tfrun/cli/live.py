"""Live views on a terminal: the table of runs ``tfrun watch`` draws, the same view while
``tfrun -m`` follows a sweep on Slurm, and a spinner while a verb does a long step.

The data is :class:`tfrun.targets.progress.Snapshot` (one scheduler query per refresh for
all the runs, :func:`tfrun.runner.control.snapshot`); this module only draws it with rich.
rich is imported only when something is drawn: the other verbs and ``--dry-run`` never pay
for it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager, Iterator

from tfrun.states import RunState
from tfrun.targets import progress
from tfrun.targets.progress import RunProgress, Snapshot

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

# By a state's word: a state read from status.json is a plain str, equal to its member.
_STYLES: dict[str, str] = {
    RunState.COMPLETED: "green",
    RunState.RUNNING: "cyan",
    RunState.PENDING: "yellow",
    RunState.PREEMPTED: "yellow",
    RunState.FAILED: "bold red",
    RunState.TIMEOUT: "red",
    RunState.CANCELLED: "magenta",
    RunState.STOPPED: "magenta",
    RunState.PRUNED: "dim",
    RunState.LOST: "red",
}


def _shown(runs: tuple[RunProgress, ...], room: int) -> tuple[list[RunProgress], int]:
    """The rows that fit: every unfinished run first, then the latest finished ones, in the
    sweep's order; and how many were left out."""
    if len(runs) <= room:
        return list(runs), 0
    keep = [r for r in runs if not r.ended][:room]
    ended = [r for r in runs if r.ended]
    keep += ended[len(ended) - (room - len(keep)) :] if room > len(keep) else []
    chosen = {id(r) for r in keep}
    return [r for r in runs if id(r) in chosen], len(runs) - len(keep)


def render(snap: Snapshot, height: int = 40) -> RenderableType:
    """The view of a snapshot: for a sweep, its counts and a progress bar over a table of
    its points; for a run, a one-row table. ``height`` bounds the rows."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (
        ("run", "right"),
        ("params", "left"),
        ("state", "left"),
        ("epoch", "right"),
        ("metrics", "left"),
        ("elapsed", "right"),
        ("left", "right"),
    ):
        if name != "params" or any(r.label for r in snap.runs):
            table.add_column(name, justify=justify, no_wrap=name != "metrics")  # type: ignore[arg-type]
    rows, hidden = _shown(snap.runs, max(3, height - 6))
    for run in rows:
        # Text, not str: rich reads a str as markup, and labels and metric names are the
        # user's ("[/scratch/a]" is a closing tag to it, "[relu,tanh]" a style).
        cells = [
            Text(run.name),
            *([Text(run.label)] if any(r.label for r in snap.runs) else []),
            Text(run.state, style=_STYLES.get(run.state, "")),
            Text(progress.epoch_text(run)),
            Text(progress.metrics_text(run.metrics)),
            Text(progress.clock(run.elapsed_s)),
            Text("~" + progress.clock(run.left_s) if run.left_s is not None else "-"),
        ]
        table.add_row(*cells)
    if hidden:
        table.caption = f"{hidden} more finished run(s) not shown"
    if not snap.sweep:
        return Group(Text(f"run {snap.path}", style="bold"), table)
    counts = Text()
    for state, n in snap.counts.items():
        counts.append(f"{n} {state}  ", style=_STYLES.get(state, ""))
    bar = Table.grid(padding=(0, 2))  # a grid row ends its line, a bare ProgressBar does not
    bar.add_row(
        ProgressBar(total=max(1, len(snap.runs)), completed=snap.finished, width=40),
        Text(f"{snap.finished}/{len(snap.runs)} finished", style="bold"),
        counts,
    )
    return Group(Text(f"sweep {snap.path}", style="bold"), bar, table)


class LiveSweep:
    """The live view of a sweep a launcher follows (tfrun.targets.progress.SweepView), on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console(stderr=True)
        self.live = Live(
            console=self.console, auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False
        )
        self.live.start()

    def show(self, snap: Snapshot) -> None:
        """Draw this snapshot over the previous one."""
        self.live.update(render(snap, self.console.height), refresh=True)

    def close(self) -> None:
        """Stop drawing; the last table stays on the screen."""
        self.live.stop()


@contextlib.contextmanager
def busy(message: str) -> Iterator[None]:
    """A spinner with ``message`` on stderr while a long step runs."""
    from rich.console import Console
    from rich.text import Text

    with Console(stderr=True).status(Text(message)):  # Text: printed as it is, not read as markup
        yield


def install() -> None:
    """Let the launchers this process runs show sweeps and long steps this way (on a terminal)."""
    progress.VIEWS.sweep = LiveSweep
    progress.VIEWS.busy = busy


def step(message: str) -> ContextManager[None]:
    """A long step of a verb: a spinner on a terminal, else one plain line (progress.busy)."""
    install()
    return progress.busy(message)
