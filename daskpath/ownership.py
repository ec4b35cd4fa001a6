"""Which folders are daskpath's, and one run at a time in each.

A folder daskpath writes into (a run's ``output_dir``, a training or export folder) carries a
marker, ``.daskpath/owner.json`` (the daskpath version, what made it, when, and the last run
id). daskpath writes into:

* a folder that does not exist yet, or is empty (it creates the marker);
* a folder with the marker;
* a non-empty folder without the marker only when the user says so (``--force`` on the
  command line, ``overwrite: true`` in the config); even then only daskpath's own file names
  are written or removed, never anything else in it.

A run also holds ``.daskpath/lock`` (an ``fcntl`` lock, plus the owner's pid, host and start
time in the file) for as long as it writes: a second run into the same folder stops with a
one-line error naming the first. The kernel drops an ``fcntl`` lock when its process dies, so
a killed run never leaves a stale lock on a local disk; on file systems where locks do not
reach across hosts, the pid/host/heartbeat in the file is the fallback (a lock whose process
is gone on this host, or whose heartbeat, refreshed every minute, is older than
:data:`STALE_S`, is taken over).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daskpath.errors import InvalidInputError

__all__ = ["MARKER", "OutputFolderError", "FolderInUseError", "check_folder", "claim_folder",
           "is_daskpaths", "FolderLock"]

#: Marker file, relative to a folder daskpath owns.
MARKER = Path(".daskpath") / "owner.json"
#: Lock file, relative to a folder daskpath owns.
LOCK = Path(".daskpath") / "lock"
#: A lock whose heartbeat is older than this (seconds) and whose owner cannot be checked is stale.
STALE_S = 600
#: How often a holder refreshes its heartbeat (seconds).
HEARTBEAT_S = 60


class OutputFolderError(InvalidInputError):
    """A folder holds files daskpath did not create, and the user did not allow taking it over."""


class FolderInUseError(InvalidInputError):
    """Another daskpath process is writing into the same folder."""


def _version() -> str:
    from daskpath import __version__

    return __version__


def is_daskpaths(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` carries daskpath's marker (or, made before the marker existed, a
    run's ``.daskpath/state`` or a model spec ``daskpath.json`` with a ``training`` record)."""
    f = Path(folder)
    if (f / MARKER).is_file() or (f / ".daskpath" / "state").is_dir():
        return True
    try:  # a model folder that daskpath's own training wrote (before the marker existed)
        spec = json.loads((f / "daskpath.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(spec, dict) and isinstance(spec.get("training"), dict)


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except FileNotFoundError:
        return []


def check_folder(folder: str | os.PathLike[str], *, force: bool = False,
                 option: str = "--force") -> None:
    """Raise :class:`OutputFolderError` when :func:`claim_folder` would; change nothing."""
    f = Path(folder)
    if f.exists() and not f.is_dir():
        raise OutputFolderError(f"{f} is a file, not a folder: choose another output folder")
    if is_daskpaths(f) or force:
        return
    foreign = [n for n in _entries(f) if n != ".daskpath"]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputFolderError(
            f"{f} already holds files daskpath did not create ({shown}): choose an empty "
            f"or new folder, or pass {option} to let daskpath write its own files there")


def claim_folder(folder: str | os.PathLike[str], *, force: bool = False, made_by: str = "run",
                 run_id: str | None = None, option: str = "--force") -> Path:
    """Make ``folder`` daskpath's, or refuse with a one-line error.

    Parameters
    ----------
    folder : path-like
        The folder to write into (created when missing).
    force : bool
        Take over a non-empty folder that has no marker (the user asked for it).
    made_by : str
        What writes here (``"run"``, ``"train stardist"``, ...), recorded in the marker.
    run_id : str, optional
        Recorded in the marker as the last run.
    option : str
        How the user allows a takeover, named in the error (``--force``, ``overwrite: true``).

    Returns
    -------
    Path
        ``folder``, resolved.

    Raises
    ------
    OutputFolderError
        ``folder`` is a file, or a non-empty folder without the marker and ``force`` is false.
    """
    f = Path(folder)
    check_folder(f, force=force, option=option)
    owned = is_daskpaths(f)
    try:
        (f / MARKER).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(f"cannot create {f} ({e.strerror}): choose a writable folder") from e
    old: dict[str, Any] = {}
    if (f / MARKER).is_file():
        try:
            old = json.loads((f / MARKER).read_text())
        except (OSError, ValueError):
            old = {}
    record = {
        "tool": "daskpath",
        "version": _version(),
        "made_by": old.get("made_by", made_by),
        "created": old.get("created", _now()),
        "taken_over": old.get("taken_over", bool(not owned and force and _entries(f) != [".daskpath"])),
        "last_run": run_id or old.get("last_run"),
    }
    from daskpath.outputs import write_json

    write_json(record, f / MARKER)
    return f.resolve()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """One writer per folder: ``with FolderLock(out): ...``.

    Parameters
    ----------
    folder : path-like
        A folder daskpath owns (see :func:`claim_folder`).
    what : str
        Shown to a second process that finds the folder locked.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str = "daskpath run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.what = what
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock or raise :class:`FolderInUseError` naming the holder."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self._holder()
            raise FolderInUseError(
                f"{self.folder} is in use by {h.get('what', 'another daskpath run')} (pid "
                f"{h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')}): "
                "wait for it to finish or choose another output folder") from None
        h = self._holder()
        if h and not self._stale(h):
            os.close(fd)
            raise FolderInUseError(
                f"{self.folder} is in use by {h.get('what', 'another daskpath run')} (pid "
                f"{h.get('pid')} on {h.get('host')}, since {h.get('since')}; its lock is not "
                f"shared across hosts here): wait for it, or delete {self.path} if it is gone")
        self._fd = fd
        self._info = {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                      "since": _now(), "heartbeat": time.time()}
        self._write_info()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="daskpath-lock", daemon=True)
        self._beat.start()

    def _write_info(self) -> None:
        fd = self._fd
        if fd is None:
            return
        self._info["heartbeat"] = time.time()
        data = (json.dumps(self._info) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:  # the folder went away: nothing left to protect
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write_info()

    @staticmethod
    def _stale(h: dict[str, Any]) -> bool:
        """A holder recorded in the file that no longer holds the kernel lock: stale when its
        process is gone on this host, or (another host) its heartbeat is older than STALE_S."""
        if h.get("host") == socket.gethostname():
            return not _pid_alive(int(h.get("pid", 0) or 0)) or int(h.get("pid", 0)) == os.getpid()
        return time.time() - float(h.get("heartbeat", 0)) > STALE_S

    def release(self) -> None:
        """Drop the lock (the file is emptied, so a later reader sees no holder)."""
        import fcntl

        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
