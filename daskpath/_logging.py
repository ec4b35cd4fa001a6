"""Logging of the ``daskpath`` command and its worker processes: daskpath's messages, not the
chatter of the libraries under it.

Verbosity (``-q`` = -1, default 0, ``-v`` = 1, ``-vv`` = 2):

======== ======================== ======================================= =====================
level    daskpath messages        TensorFlow / absl / oneDNN / libvips    other libraries
======== ======================== ======================================= =====================
-q       warnings and errors      errors                                  warnings and errors
default  info (one line a slide)  errors                                  warnings and errors
-v       debug                    info and warnings                       warnings and errors
-vv      debug                    debug                                   debug (and
                                                                          distributed's info)
======== ======================== ======================================= =====================

Native chatter is silenced through the environment, which the worker processes a cluster spawns
inherit (:func:`chatter_env`): ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's C++ info and warnings),
``GRPC_VERBOSITY``, ``GLOG_minloglevel``. TensorFlow also logs through absl while its shared
libraries load ("WARNING: All log messages before absl::InitializeLog() ...", "oneDNN custom
operations are on ..."), before any setting is read: :func:`quiet_native_stderr` drops those
lines (and only those) around ``import tensorflow``. libvips' messages ("VIPS: threadpool
completed") reach the ``pyvips`` Python logger, which is kept at ERROR. Variables the user set
before the command started are left as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping

__all__ = [
    "CHATTY_LOGGERS",
    "chatter_env",
    "native_chatter_shown",
    "quiet_chatty_loggers",
    "quiet_native_stderr",
    "setup_logging",
]

#: Python loggers of the libraries whose info/warnings are chatter (shown from ``-v``).
CHATTY_LOGGERS = ("pyvips", "tensorflow", "absl", "keras", "h5py")

#: Environment that silences native (C++) chatter; inherited by spawned worker processes.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR", "GLOG_minloglevel": "2"}
#: Environment with ``-v``: TensorFlow's C++ info shown.
VERBOSE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "0"}

#: Set by the user before this process imported daskpath: never overridden.
_USER_ENV = {k: os.environ[k] for k in QUIET_ENV if k in os.environ}

#: Level of the ``daskpath`` logger at ``-vv`` (below DEBUG: distributed's own info shown too,
#: see :func:`daskpath.cluster.quiet_distributed`).
TRACE = logging.DEBUG - 5


class _Formatter(logging.Formatter):
    """daskpath's messages as they are; other libraries' prefixed with their logger name."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.name == "daskpath" or record.name.startswith("daskpath."):
            return msg
        return f"{record.name}: {record.levelname.lower()}: {msg}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream of the
    moment it was made: a test's capture, a redirect made later)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbosity: int) -> None:
    """Configure logging for the CLI (see the module docstring for the levels).

    One handler on the root logger writes to ``sys.stderr`` (a previous one of ours is replaced;
    handlers installed by others, e.g. pytest's, are left alone). The root logger stays at
    WARNING up to ``-v``, so ``-v`` shows daskpath's debug messages without the debug output of
    matplotlib, numcodecs, fsspec and the like.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_daskpath_cli", False):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    handler._daskpath_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    own = (logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0
           else logging.DEBUG if verbosity == 1 else TRACE)
    logging.getLogger("daskpath").setLevel(own)
    quiet_chatty_loggers(verbosity)
    logging.captureWarnings(False)


def quiet_chatty_loggers(verbosity: int | None = None) -> None:
    """Set the level of :data:`CHATTY_LOGGERS`: ERROR by default, INFO with ``-v``, unset with
    ``-vv``. ``None``: decide from the environment (what a worker process inherits)."""
    if verbosity is None:
        verbosity = 0 if not native_chatter_shown() else 1
    level = logging.ERROR if verbosity < 1 else logging.INFO if verbosity == 1 else logging.NOTSET
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if verbosity < 1:
        with contextlib.suppress(Exception):  # absl-py's own verbosity, only if already imported
            absl_logging = sys.modules.get("absl.logging")
            if absl_logging is not None:
                absl_logging.set_verbosity(absl_logging.ERROR)


@contextlib.contextmanager
def chatter_env(verbosity: int) -> Iterator[Mapping[str, str]]:
    """Set the native-chatter environment for ``verbosity`` while the block runs; restore after.

    Worker processes started inside the block inherit it. Variables the user had set when
    daskpath was imported win. Yields the variables set.
    """
    want = dict(QUIET_ENV) if verbosity < 1 else dict(VERBOSE_ENV)
    want = {k: v for k, v in want.items() if k not in _USER_ENV}
    old = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield want
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def native_chatter_shown() -> bool:
    """Whether TensorFlow's native info lines are wanted (``TF_CPP_MIN_LOG_LEVEL`` is 0)."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2").strip() in ("0", "")


# absl's log line: severity, MMDD, time, thread id, file:line], e.g.
# "I0000 00:00:1796025368.027790   19257 port.cc:153] oneDNN custom operations are on ..."
_ABSL_LINE = re.compile(r"^[IW]\d{4} \d\d:\d\d:[\d.]+\s+\d+ [\w./-]+:\d+\] ")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"
_FD_LOCK = threading.Lock()


def is_native_chatter(line: str) -> bool:
    """True for absl's info/warning lines and its "before absl::InitializeLog()" preamble."""
    return line.startswith(_ABSL_PREAMBLE) or bool(_ABSL_LINE.match(line))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Drop absl's info/warning lines written to file descriptor 2 while the block runs.

    For ``import tensorflow``: its shared libraries log while they load, before
    ``TF_CPP_MIN_LOG_LEVEL`` is read. Everything else written to stderr meanwhile (by any
    thread) is written out unchanged when the block ends. Does nothing when
    :func:`native_chatter_shown` or when file descriptor 2 cannot be duplicated.
    """
    if native_chatter_shown():
        yield
        return
    with _FD_LOCK:
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        try:
            with tempfile.TemporaryFile() as buf:
                os.dup2(buf.fileno(), 2)
                try:
                    yield
                finally:
                    with contextlib.suppress(Exception):
                        sys.stderr.flush()
                    os.dup2(saved, 2)
                    buf.seek(0)
                    text = buf.read().decode("utf-8", errors="replace")
                    kept = "".join(ln for ln in text.splitlines(keepends=True)
                                   if not is_native_chatter(ln))
                    if kept:
                        os.write(2, kept.encode("utf-8"))
        finally:
            os.close(saved)
