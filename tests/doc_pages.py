"""The commands of the documentation's pages, read from the pages and run as written.

A page's commands are its fenced ``bash`` blocks. A block is a list of commands: a line, its
continuation lines (a trailing ``\\``) and a here-document belong to one command; blank lines
and comment lines separate them. Everything a test needs to know about a block is in the page,
in an HTML comment right before it (it does not show on the site), ``<!-- test: D; D; ... -->``,
with these directives:

- ``slurm``: needs a Slurm cluster (the page's Slurm test runs it, against the local one);
- ``both``: setup the page's local and Slurm tests both need (a script, a ``cd``);
- ``checkout``: runs in tfrun's checkout, not in the page's project dir;
- ``serves``: its commands serve until Ctrl-C: each is started and awaited until it says where
  it serves (``http://...``), or until it ends; the page goes on while they serve, and a
  Ctrl-C stops them before the next block that serves, or at the page's end;
- ``skip: REASON`` (or ``skip for `PREFIX`: REASON``): not run here, and why (the reason runs
  to the marker's end: a skip comes last);
- ``exit N`` (or ``exit N for `PREFIX```): the block's last command (or the one that starts
  with PREFIX) exits with N; every other command exits 0;
- ``with KEY=VALUE ...``: small sizes: its ``tfrun`` commands run with these overrides
  (replacing the same key where the command sets it);
- ``let NAME=VALUE``: the placeholder NAME in its commands stands for VALUE.

``RUN`` (also written ``[RUN]``) and ``SWEEP`` in a command stand for the run and the sweep
that the page's commands made last, ``JOBID`` for the last Slurm job of that run.

A ```` ```text ```` block right after a bash block (blank lines between at most) is what the
block's last command prints first (stdout and stderr as a terminal shows them): its lines
match the output's first lines, ``...`` in a line matching any text and a line ``...`` any
number of lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "docs" / "quickstart.md", *sorted((REPO / "docs" / "guides").glob("*.md"))]
QUICKSTART = REPO / "docs" / "quickstart.md"
FLAGS = {"slurm", "both", "checkout", "serves"}
PLACEHOLDERS = ("[RUN]", "RUN", "SWEEP", "JOBID")
# Small sizes for every page: a project's own defaults (conf/project/default.yaml, as
# docs/concepts.md describes them) make its training runs one epoch long, unless a command
# sets trainer.epochs itself.
PROJECT_DEFAULTS = "# @package _global_\ntrainer:\n  epochs: 1\n"

_MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")
_FOR = re.compile(r"^(.*?)\s+for\s+`([^`]+)`\s*(?::\s*(.*))?$")
_HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")
_URL = re.compile(r"https?://[\w.\-\[\]:]+")


@dataclass
class Command:
    """One command of a block, as written, and what is expected of it."""

    text: str
    line: int  # in the page
    exit_code: int = 0
    skip: str | None = None


@dataclass
class Block:
    """A fenced bash block of a page, with its marker's directives and its output block."""

    page: Path
    line: int
    commands: list[Command]
    flags: set[str] = field(default_factory=set)
    skip: str | None = None
    overrides: list[str] = field(default_factory=list)
    lets: dict[str, str] = field(default_factory=dict)
    output: list[str] | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def runs_in(self, kind: str) -> bool:
        """Does the page's ``local`` or ``slurm`` test run it?"""
        if kind == "slurm":
            return bool(self.flags & {"slurm", "both"})
        return "slurm" not in self.flags


def split_commands(lines: list[str], first_line: int) -> list[Command]:
    """A bash block's commands: continuation lines and here-documents belong to theirs."""
    commands, i = [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            i += 1
            continue
        start, text = i, [line]
        heredoc = _HEREDOC.search(line)
        while text[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text.append(lines[i])
        if heredoc:
            while i + 1 < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
                text.append(lines[i])
        commands.append(Command("\n".join(text), first_line + start))
        i += 1
    return commands


def _directives(marker: str, block: Block) -> None:
    """Apply a marker's directives to its block."""
    parts = [p.strip() for p in marker.split(";")]
    for at, part in enumerate(parts):  # a reason runs to the marker's end (";" in it too)
        if part.startswith("skip"):
            parts[at:] = ["; ".join(parts[at:])]
            break
    for part in filter(None, parts):
        qualified = _FOR.match(part)
        head, prefix, rest = (
            (qualified.group(1), qualified.group(2), qualified.group(3)) if qualified else (part, None, None)
        )
        if head.startswith("skip"):
            reason = rest if prefix else head.partition(":")[2].strip()
            assert reason, f"{block.where}: a skip needs its reason: {part!r}"
            if prefix:  # every command that starts so
                for command in _commands(block, prefix):
                    command.skip = reason
            else:
                block.skip = reason
        elif head.startswith("exit "):
            code = int(head.split()[1])
            (_command(block, prefix) if prefix else block.commands[-1]).exit_code = code
        elif head.startswith("with "):
            block.overrides += head.split()[1:]
        elif head.startswith("let "):
            name, _, value = head[4:].strip().partition("=")
            block.lets[name] = value
        else:
            words = set(head.split())
            assert words <= FLAGS, f"{block.where}: unknown test directive(s) {words - FLAGS} in {marker!r}"
            block.flags |= words


def _commands(block: Block, prefix: str) -> list[Command]:
    found = [c for c in block.commands if c.text.startswith(prefix)]
    assert found, f"{block.where}: `{prefix}` names no command of the block"
    return found


def _command(block: Block, prefix: str) -> Command:
    found = _commands(block, prefix)
    assert len(found) == 1, f"{block.where}: `{prefix}` names {len(found)} commands of the block"
    return found[0]


def blocks(page: Path) -> list[Block]:
    """Every bash block of a page, in page order, with its directives and its output."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    previous, i = "", 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            language = stripped[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            body = [line[len(lines[i]) - len(lines[i].lstrip()) :] for line in lines[i + 1 : end]]  # its indent
            if language == "bash":
                block = Block(page, i + 1, split_commands(body, i + 2))
                marker = _MARKER.match(previous)
                if marker:
                    _directives(marker.group(1), block)
                found.append(block)
            elif language == "text" and found and found[-1].output is None and _follows(lines, found[-1], i):
                found[-1].output = body
            i, previous = end + 1, ""
            continue
        if stripped:
            previous = stripped
        i += 1
    return found


def _follows(lines: list[str], block: Block, at: int) -> bool:
    """Is the fence at line index ``at`` the next thing after the block (blank lines aside)?"""
    end = next(j for j in range(block.line, len(lines)) if lines[j].strip() == "```")
    return all(not line.strip() for line in lines[end + 1 : at])


def page_parts() -> list[tuple[Path, str]]:
    """(page, "local" or "slurm") for every page with commands of that kind to run."""
    parts = []
    for page in PAGES:
        found = blocks(page)
        for kind in ("local", "slurm"):
            wanted = [b for b in found if b.runs_in(kind) and not (kind == "slurm" and b.flags == {"both"})]
            if any(c.skip is None for b in wanted if b.skip is None for c in b.commands):
                parts.append((page, kind))
    return parts


def matches(pattern: list[str], output: list[str]) -> bool:
    """Do the output's first lines match the pattern (``...`` is any text; a ``...`` line, any lines)?"""
    if not pattern:
        return True
    if pattern[0].strip() == "...":
        return any(matches(pattern[1:], output[i:]) for i in range(len(output) + 1))
    if not output:
        return False
    regex = ".*?".join(re.escape(piece) for piece in pattern[0].rstrip().split("..."))
    return re.fullmatch(regex, output[0].rstrip()) is not None and matches(pattern[1:], output[1:])


# --- running a page --------------------------------------------------------------------------


def quickstart_script() -> str:
    """The Quickstart's training script (its ``cat > train.py`` block): "your script" of every page."""
    for block in blocks(QUICKSTART):
        for command in block.commands:
            if command.text.startswith("cat > train.py <<'EOF'"):
                return "\n".join(command.text.splitlines()[1:-1]) + "\n"
    raise AssertionError("the Quickstart writes no train.py")


def make_project(where: Path) -> Path:
    """A project dir as a page's reader has one: their script (train.py), tfrun's examples (the
    pages run them "from tfrun's checkout"), and small sizes as the project's defaults."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "train.py").write_text(quickstart_script())
    (where / "examples").symlink_to(REPO / "examples")
    (where / "conf" / "project").mkdir(parents=True)
    (where / "conf" / "project" / "default.yaml").write_text(PROJECT_DEFAULTS)
    return where


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """A machine-wide lock (pages that serve on fixed ports, that install into the checkout's
    environment), so that two tests never do it at once, under pytest-xdist too."""
    path = Path(tempfile.gettempdir()) / f"tfrun-docs-{name}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def with_overrides(text: str, overrides: list[str]) -> str:
    """A ``tfrun`` command with ``overrides`` set (small sizes); any other command as it is."""
    if not overrides or not text.startswith("tfrun "):
        return text
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    for override in overrides:
        key = override.split("=", 1)[0] + "="
        at = [i for i, w in enumerate(words) if w.startswith(key)]
        if at:
            words[at[0]] = override
        else:
            words.append(override)
    return shlex.join(words)


@dataclass
class Served:
    """A command that serves in the background until Ctrl-C."""

    proc: subprocess.Popen
    log: Path
    command: str


@dataclass
class Session:
    """A page's commands run one after another, as a reader runs them in one shell."""

    project: Path
    kind: str
    cwd: Path = field(init=False)
    made_runs: list[Path] = field(default_factory=list)
    made_sweeps: list[Path] = field(default_factory=list)
    served: list[Served] = field(default_factory=list)
    serving_lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    ran: list[str] = field(default_factory=list)
    venv_bin: Path | None = None  # the page's own environment, for what it installs from the checkout

    def __post_init__(self) -> None:
        self.cwd = self.project

    # -- where runs are
    def _runs_roots(self) -> list[Path]:
        return [r for r in {self.project / "tfrun-runs", *self.project.glob("*/tfrun-runs")} if r.is_dir()]

    def _all_runs(self) -> tuple[set[Path], set[Path]]:
        runs, sweeps = set(), set()
        for root in self._runs_roots():
            for entry in root.iterdir():
                if (entry / "plan.json").is_file():
                    runs.add(entry)
                elif any(entry.glob("*/plan.json")):
                    sweeps.add(entry)
        return runs, sweeps

    def env(self, checkout: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
        # `tfrun`, `pip` and `python` are those of the interpreter running the tests, except in
        # the checkout: there `pip install -e .` goes into an environment of the page's own over
        # it. Reinstalled in the tests' own, tfrun is missing for a moment under every other test
        # running meanwhile.
        bins = [str(Path(sys.executable).parent)]
        if checkout:
            if self.venv_bin is None:
                from tests.helpers import private_venv

                self.venv_bin = private_venv(self.project / ".venv")
            bins.insert(0, str(self.venv_bin))
        env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])
        env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", TFRUN_ENV_CACHE=str(self.project / ".envs"))
        if checkout:  # runs made in the checkout land in the page's own runs dir
            env["TFRUN_RUNS_DIR"] = str(self.project / "tfrun-runs")
        return env

    def substitute(self, text: str, block: Block) -> str:
        for name, value in block.lets.items():
            text = re.sub(rf"\b{re.escape(name)}\b", value, text)
        if not any(p in text for p in PLACEHOLDERS):
            return text
        values = {
            "[RUN]": self.made_runs[-1] if self.made_runs else None,
            "RUN": self.made_runs[-1] if self.made_runs else None,
            "SWEEP": self.made_sweeps[-1] if self.made_sweeps else None,
        }
        job = _last_job(self.made_runs[-1]) if self.made_runs else None
        values["JOBID"] = job
        for name in PLACEHOLDERS:
            if re.search(rf"(?<![\w\-]){re.escape(name)}(?![\w\-])", text):
                assert values[name] is not None, f"{block.where}: {name} before the page made one: {text}"
                text = re.sub(rf"(?<![\w\-]){re.escape(name)}(?![\w\-])", str(values[name]), text)
        return text

    def run_block(self, block: Block) -> None:
        if "serves" in block.flags:
            self.stop_serving()
            self.serving_lock.enter_context(_locked("serving"))
        for command in block.commands:
            if command.skip:
                continue
            text = self.substitute(with_overrides(command.text, block.overrides), block)
            output = [block.output] if block.output is not None and command is block.commands[-1] else []
            with (
                _locked(f"checkout-{hashlib.sha1(str(REPO).encode()).hexdigest()[:8]}")
                if "checkout" in block.flags
                else contextlib.nullcontext()
            ):
                self.run(text, command, block, output[0] if output else None)

    def run(self, text: str, command: Command, block: Block, output: list[str] | None) -> None:
        before = self._all_runs()
        checkout = "checkout" in block.flags
        where = REPO if checkout else self.cwd
        pwd = self.project / ".pwd"
        script = f"{text}\n__code=$?\npwd > {shlex.quote(str(pwd))}\nexit $__code\n"
        log = self.project / f".out-{len(self.ran)}"
        self.ran.append(f"{block.page.relative_to(REPO)}:{command.line}: {text}")
        with open(log, "w") as out:
            # SIGINT as in a terminal (a test runner started in the background has it ignored, and
            # its children would inherit that): a command that serves is stopped with Ctrl-C.
            proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=where,
                env=self.env(checkout),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        what = f"{block.where} (line {command.line}): {text}"
        if "serves" in block.flags:
            _await(proc, log, lambda: bool(_URL.search(log.read_text(errors="replace"))), 600, what)
            if proc.poll() is None:
                self.served.append(Served(proc, log, what))
                self._check_output(log, output, what)
                return
        else:
            try:
                proc.wait(timeout=1800 if self.kind == "slurm" else 900)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"{what}: did not end\n{_tail(log)}")
        assert proc.returncode == command.exit_code, (
            f"{what}: exit {proc.returncode}, the page says {command.exit_code}\n{_tail(log)}"
        )
        if command.exit_code in (0, 2):
            assert "Traceback (most recent call last)" not in log.read_text(errors="replace"), f"{what}\n{_tail(log)}"
        self._check_output(log, output, what)
        if not checkout and pwd.is_file():
            self.cwd = Path(pwd.read_text().strip())
        runs, sweeps = self._all_runs()
        self.made_runs += sorted(runs - before[0], key=lambda p: p.stat().st_mtime)
        self.made_sweeps += sorted(sweeps - before[1], key=lambda p: p.stat().st_mtime)
        if proc.returncode == 0:
            for run in runs - before[0]:
                cooperated(run, what)

    @staticmethod
    def _check_output(log: Path, output: list[str] | None, what: str) -> None:
        if output is None:
            return
        shown = log.read_text(errors="replace").splitlines()
        assert matches(output, shown), (
            f"{what}: its output does not begin as the page shows\n--- the page\n"
            + "\n".join(output)
            + "\n--- the output\n"
            + "\n".join(shown[:40])
        )

    def stop_serving(self) -> None:
        """Ctrl-C to every command still serving: each ends (0 or 130) without a traceback."""
        for served in self.served:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(served.proc.pid, signal.SIGINT)
            try:
                served.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(served.proc.pid, signal.SIGKILL)
                raise AssertionError(f"{served.command}: Ctrl-C did not stop it\n{_tail(served.log)}")
            text = served.log.read_text(errors="replace")
            assert served.proc.returncode in (0, 130), (
                f"{served.command}: exit {served.proc.returncode}\n{text[-3000:]}"
            )
            assert "Traceback (most recent call last)" not in text, f"{served.command}:\n{text[-3000:]}"
        self.served = []
        self.serving_lock.close()

    def clean_up(self) -> None:
        """Nothing of the page's may be left serving, queued or running."""
        for served in self.served:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(served.proc.pid, signal.SIGKILL)
        self.serving_lock.close()
        runs, sweeps = self._all_runs()
        for path in [*runs, *sweeps]:
            subprocess.run(
                ["tfrun", "cancel", str(path)], env=self.env(False), cwd=self.project, capture_output=True, timeout=120
            )


def _await(proc: subprocess.Popen, log: Path, ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready():
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{what}: never said where it serves\n{_tail(log)}")
        time.sleep(0.2)


def _last_job(run: Path) -> str | None:
    import json

    try:
        jobs = json.loads((run / "status.json").read_text()).get("job_ids") or []
    except FileNotFoundError:
        return None
    return jobs[-1] if jobs else None


def _tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


def run_page(page: Path, kind: str, where: Path) -> Session:
    """Run a page's commands of that kind (``local`` or ``slurm``) in a project dir of their own."""
    session = Session(make_project(where), kind)
    try:
        for block in blocks(page):
            if block.runs_in(kind) and block.skip is None:
                session.run_block(block)
        session.stop_serving()
    finally:
        session.clean_up()
    return session


def cooperated(run: Path, what: str) -> None:
    """A completed run of an example written for a distributed backend shows that the backend
    worked: Horovod's ranks all saw the group's size and ended with the same weights (each
    started from its own); MultiWorkerMirroredStrategy kept a replica on every task in sync;
    a parameter-server chief trained (it cannot without its workers and parameter servers)."""
    import json

    plan = json.loads((run / "plan.json").read_text())
    script, backend, tasks = Path(plan["script"]), plan["backend"], len(plan["tasks"])
    if script == REPO / "examples" / "horovod_keras" / "train.py" and backend == "horovod":
        records = [json.loads((run / "outputs" / f"history-rank{r}.json").read_text()) for r in range(tasks)]
        assert {r["size"] for r in records} == {tasks}, f"{what}: Horovod's size is not {tasks}: {records}"
        assert len({r["weights_sha"] for r in records}) == 1, f"{what}: the ranks trained apart: {records}"
    if script == REPO / "examples" / "digits_distributed" / "train.py" and backend == "mwms":
        records = [json.loads((run / "outputs" / f"history-rank{r}.json").read_text()) for r in range(tasks)]
        assert {r["replicas_in_sync"] for r in records} == {tasks}, f"{what}: not {tasks} replicas in sync: {records}"
        assert len({r["weights_sha"] for r in records}) == 1, f"{what}: the workers ended apart: {records}"
    if script == REPO / "examples" / "ps_keras" / "train.py" and backend == "ps":
        assert json.loads((run / "outputs" / "history-rank0.json").read_text())["loss"], (
            f"{what}: the chief trained nothing"
        )
