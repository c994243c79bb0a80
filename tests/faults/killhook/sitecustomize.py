"""Kill points in every Python process of a fault run: the driver and each of its Ray workers.

Python imports `sitecustomize` at start-up from sys.path, so a run started with this folder on
PYTHONPATH and LITPIPE_KILL_PLAN set (a JSON file, see tests/faults/harness.py) gets the hook in
every process it spawns, Ray's workers included. The hook wraps the calls that change files
(`open` for writing, each `write` of such a file, os.link/replace/rename/unlink/remove) under the
plan's root; each call is an event labelled by the (up to three) innermost litpipe functions on
the stack, the operation and the path with its variable parts starred:

    write_temp<write_exclusive<commit_part open store/*/commits/train-*-*.json.tmp-*

A plan either traces (every label goes to a file) or names a label, its n-th
occurrence across all processes and when to strike: `before` the call, `after` it, or `torn`
(a write: part of its bytes reach the file, then the kill). Then it SIGKILLs the job's driver,
or with target `process` only the process where the event happened (a Ray worker lost).
"""

import os

PLAN = os.environ.get("LITPIPE_KILL_PLAN")

if PLAN:
    import builtins
    import fcntl
    import io
    import json
    import re
    import signal
    import sys

    with open(PLAN) as _f:
        _plan = json.load(_f)
    os.environ.setdefault("LITPIPE_KILL_DRIVER", str(os.getpid()))  # the first process is the driver
    _ROOT = os.path.abspath(_plan["root"]) + os.sep
    _open = builtins.open
    _VARIABLE = re.compile(r"[0-9a-f]{5,}|\d+")

    def _label(op: str, path: str) -> str:
        frame, sites = sys._getframe(1), []
        while frame is not None and len(sites) < 3:
            if frame.f_globals.get("__name__", "").startswith("litpipe."):
                sites.append(frame.f_code.co_qualname)
            frame = frame.f_back
        return f"{'<'.join(sites) or '?'} {op} {_VARIABLE.sub('*', path[len(_ROOT):])}"

    def _count(label: str) -> int | None:
        """The number of this event among the plan's matching ones, counted across processes; None
        when it does not match."""
        if _plan.get("label") != label:
            return None
        with _open(_plan["counter"], "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            n = len(f.read()) + 1
            f.write(".")
        return n

    def _strike(label: str) -> None:
        with _open(_plan["hit"], "w") as f:
            json.dump({"label": label, "pid": os.getpid(), "driver": int(os.environ["LITPIPE_KILL_DRIVER"])}, f)
        if _plan.get("target", "job") == "job":
            os.kill(int(os.environ["LITPIPE_KILL_DRIVER"]), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def _event(op: str, path, call, when_torn=None):
        """Run `call` as event (op, path), striking before, after, or torn when it is the planned one."""
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return call()
        if not path.startswith(_ROOT):
            return call()
        label = _label(op, path)
        if _plan.get("trace"):
            with _open(_plan["trace"], "a") as f:
                f.write(label + "\n")
        n = _count(label)
        hit = n is not None and n == _plan["nth"]
        when = _plan.get("when", "before")
        if hit and when == "before":
            _strike(label)
        if hit and when == "torn" and when_torn is not None:
            when_torn()
            _strike(label)
        result = call()
        if hit:
            _strike(label)  # `after`, or `torn` on an operation that has no bytes to tear
        return result

    class _Watched:
        """A file opened for writing under the root: each write is an event; all else is the file's."""

        def __init__(self, f, path):
            self._f, self._path = f, path

        def write(self, data):
            def torn():
                self._f.write(data[: max(1, len(data) // 2)])
                self._f.flush()
            return _event("write", self._path, lambda: self._f.write(data), torn)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __iter__(self):
            return iter(self._f)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def _watched_open(file, mode="r", *args, **kwargs):
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return _open(file, mode, *args, **kwargs)
        f = _event("open", file, lambda: _open(file, mode, *args, **kwargs))
        try:
            path = os.path.abspath(os.fsdecode(file))
        except TypeError:
            return f
        return _Watched(f, path) if path.startswith(_ROOT) else f

    builtins.open = io.open = _watched_open

    def _wrap_path_op(name: str, position: int):
        original = getattr(os, name)

        def wrapped(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
                return original(*args, **kwargs)
            return _event(name, args[position], lambda: original(*args, **kwargs))

        setattr(os, name, wrapped)

    for _name, _position in (("link", 1), ("replace", 1), ("rename", 1), ("unlink", 0), ("remove", 0)):
        _wrap_path_op(_name, _position)
