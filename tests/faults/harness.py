"""Runs a litpipe command in a subprocess and SIGKILLs it at a chosen file operation.

`trace` runs a command to the end and returns every file event it made under a root, labelled
as killhook/sitecustomize.py labels them; `draw_points` picks seeded kill points from such a
trace, covering the sites a test names; `run_killed` runs the command again and kills it at one
point. A killed run's left-over processes (Ray's, of the local cluster its driver started) are
found by session and reported; `kill_session` removes them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

KILLHOOK = Path(__file__).parent / "killhook"
WHENS = ("before", "after", "torn")


@dataclass(frozen=True)
class KillPoint:
    """Kill at the `nth` event labelled `label`: `before` it, `after` it, or `torn` (part of a
    write's bytes land first); `target` job = the driver and the event's process, process = only
    the process where it happened."""

    label: str
    nth: int
    when: str
    target: str = "job"

    def __str__(self) -> str:
        return f"{self.when} #{self.nth} {self.label} ({self.target})"


@dataclass
class Killed:
    point: KillPoint
    hit: dict | None  # {"label", "pid", "driver"} of the event struck; None: the run never reached it
    returncode: int
    leftovers: list[int]  # processes of the run's session still alive after its driver ended
    stderr: str


def _run(command: list[str], root: Path, plan: dict, env: dict | None, timeout: float, workdir: Path):
    workdir.mkdir(parents=True, exist_ok=True)
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps({"root": str(root), **plan}))
    environment = {**os.environ, **(env or {}), "LITPIPE_KILL_PLAN": str(plan_path),
                   "PYTHONPATH": os.pathsep.join([str(KILLHOOK), *filter(None, [os.environ.get("PYTHONPATH")])])}
    environment.pop("LITPIPE_KILL_DRIVER", None)
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own session: what it leaves behind can be found
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(process.pid)
        raise
    return process, stderr


def trace(command: list[str], root: Path, workdir: Path, env: dict | None = None, timeout: float = 300) -> list[str]:
    """Every labelled file event of an uninterrupted run, in order (across its processes)."""
    trace_file = workdir / "trace.txt"
    process, stderr = _run(command, root, {"trace": str(trace_file)}, env, timeout, workdir)
    kill_session(process.pid)
    assert process.returncode == 0, stderr[-4000:]
    return trace_file.read_text().splitlines()


def run_killed(command: list[str], root: Path, point: KillPoint, workdir: Path, env: dict | None = None,
               timeout: float = 300) -> Killed:
    """Run `command` and strike at `point`; what happened."""
    for name in ("counter", "hit"):
        (workdir / name).unlink(missing_ok=True)
    plan = {**asdict(point), "counter": str(workdir / "counter"), "hit": str(workdir / "hit")}
    process, stderr = _run(command, root, plan, env, timeout, workdir)
    hit = json.loads((workdir / "hit").read_text()) if (workdir / "hit").exists() else None
    time.sleep(0.5)  # the processes that die with the driver are gone by now: `leftovers` are what outlives it
    return Killed(point, hit, process.returncode, session_processes(process.pid), stderr)


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def kill_session(sid: int) -> None:
    assert sid > 0, sid  # session 0 holds processes whose session began outside this PID namespace
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def draw_points(events: list[str], count: int, seed: int, cover: dict[str, int], target: str = "job") -> list[KillPoint]:
    """`count` kill points from a trace, seeded: `cover[s]` of them on events whose label holds
    `s`, the rest from all events; distinct points, each with a `when` its operation allows."""
    rng = random.Random(seed)
    occurrences, seen = [], Counter()
    for label in events:
        seen[label] += 1
        occurrences.append((label, seen[label]))
    points: list[KillPoint] = []

    def take(pool):
        pool = [o for o in pool if all((p.label, p.nth) != o for p in points)]
        label, nth = rng.choice(pool)
        when = rng.choice(WHENS if " write " in label else WHENS[:2])
        points.append(KillPoint(label, nth, when, target))

    for substring, n in cover.items():
        pool = [o for o in occurrences if substring in o[0]]
        assert pool, f"no event in the trace matches {substring!r}"
        for _ in range(n):
            take(pool)
    while len(points) < count:
        take(occurrences)
    return points


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]
