"""Fingerprints, work folders and publication of a run's outputs as one set.

Every (slide, stage) result is computed under ``output_dir/.daskpath/work/<slide>/<stage>-<fp>/``
where ``fp`` is the stage's fingerprint (:func:`stage_fingerprint`): the config keys the stage
depends on, the identity of its input files, the identity of its models, what it reads from its
upstream stages, and a stage version. The work folder holds the chunk records (resume), the
stage's artefacts, its per-tile table (``part.parquet``) and, once complete, ``done.json``;
a finished work folder is never changed again.

A run's outputs form one set (:class:`RunSet`): its tables and report are written into
``.daskpath/runs/<run_id>/`` beside links to the finished artefacts, and ``.daskpath/current``
is switched to it with one rename; the names users see in ``output_dir`` are links through
``current``, so they all change at that instant. A run killed at any moment leaves the previous
complete set or the new complete set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Artefact",
    "RunSet",
    "file_identity",
    "model_identity",
    "stage_fingerprint",
    "describe_changes",
    "internal_dir",
    "slide_key",
]

MIB = 1 << 20
INTERNAL = ".daskpath"


def internal_dir(out: Path) -> Path:
    """``output_dir/.daskpath``: work folders, publication state (daskpath's own)."""
    return Path(out) / INTERNAL


def slide_key(slide: str) -> str:
    """The file-name form of a slide id: the id itself when it is a plain name, otherwise a
    sanitised name plus a hash of the id.

    Slide ids are data, not paths: ``../../x`` or ``/abs/x`` never leave ``output_dir``, and
    two ids that sanitise alike (``a/b``, ``a_b``) still get distinct files.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", slide).strip("._") or "slide"
    if safe == slide:
        return slide
    return f"{safe[:80]}-{hashlib.sha256(slide.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Artefact:
    """A file or folder a stage writes in its work folder and publishes under ``output_dir``.

    ``published`` is a path relative to ``output_dir`` with ``{slide}`` in it, filled with
    :func:`slide_key` of the slide id.
    """

    name: str
    published: str

    def relative(self, slide: str) -> str:
        return self.published.format(slide=slide_key(slide))

    def target(self, out: Path, slide: str) -> Path:
        return Path(out) / self.relative(slide)


# --------------------------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------------------------
_ID_CACHE: dict[tuple, Any] = {}
_ID_LOCK = threading.Lock()


def _hash_ends(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        if size > 2 * MIB:
            f.seek(size - MIB)
            h.update(f.read(MIB))
        elif size > MIB:
            h.update(f.read())
    return h.hexdigest()[:16]


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identity of an input file: path, size, mtime and a hash of its first and last MiB.

    For a folder (an OME-Zarr slide) the same over the metadata files plus the number, total
    size and latest mtime of all files. A missing path has ``size: None`` (the stage that opens
    it reports the error).
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "size": None}
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)  # ctime: any rewrite
    with _ID_LOCK:
        if key in _ID_CACHE:
            return _ID_CACHE[key]
    ident: dict[str, Any] = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not p.is_dir() and not stat.S_ISREG(st.st_mode):
        return ident  # a FIFO or device: reading it could block forever; the slide check refuses it
    if p.is_dir():
        n = total = latest = 0
        meta = hashlib.sha256()
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                fp = Path(root) / name
                try:
                    s = fp.stat()
                except OSError:
                    continue
                n, total, latest = n + 1, total + s.st_size, max(latest, s.st_mtime_ns)
                if name in ("zarr.json", ".zattrs", ".zarray", ".zgroup") and s.st_size < 4 * MIB:
                    meta.update(str(fp.relative_to(p)).encode())
                    meta.update(fp.read_bytes())
        ident |= {"files": n, "bytes": total, "latest_mtime_ns": latest, "meta": meta.hexdigest()[:16]}
    else:
        try:
            ident["ends"] = _hash_ends(p, st.st_size)
        except OSError:
            ident["ends"] = None
    with _ID_LOCK:
        _ID_CACHE[key] = ident
    return ident


_NOT_WEIGHTS = ("README", "evaluation.json", "loss_log")


def model_identity(path: str | os.PathLike[str] | None, name: str = "") -> dict[str, Any]:
    """Identity of a model: a SHA-256 over its weight and spec files (a folder) or the file.

    ``path=None`` (a published model fetched by name, e.g. StarDist's ``2D_versatile_he``) is
    identified by its name.
    """
    if path is None:
        return {"name": name}
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    if not p.is_dir() and (p.parent / "daskpath.json").is_file():
        files.append(p.parent / "daskpath.json")
    files = [f for f in files if not f.name.startswith(_NOT_WEIGHTS) and not f.name.startswith(".")]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = ("model", str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        with _ID_LOCK:
            digest = _ID_CACHE.get(key)
        if digest is None:
            fh = hashlib.sha256()
            with open(f, "rb") as fd:
                for block in iter(lambda: fd.read(8 * MIB), b""):
                    fh.update(block)
            digest = fh.hexdigest()
            with _ID_LOCK:
                _ID_CACHE[key] = digest
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(digest.encode())
    return {"name": name or p.name, "sha256": h.hexdigest()[:16]}


def stage_fingerprint(
    stage: str,
    version: int,
    keys: Mapping[str, Any],
    inputs: Mapping[str, Any],
    models: Mapping[str, Any],
    upstream: Mapping[str, Any],
) -> tuple[str, dict[str, Any]]:
    """The fingerprint of one (slide, stage) and the record it was made from.

    Returns ``(fp, record)``: ``fp`` is 16 hex digits of SHA-256 over the JSON of ``record``
    (``stage, version, keys, inputs, models, upstream``).
    """
    record = {
        "stage": stage,
        "version": int(version),
        "keys": dict(keys),
        "inputs": dict(inputs),
        "models": dict(models),
        "upstream": dict(upstream),
    }
    blob = json.dumps(record, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16], json.loads(json.dumps(record, default=str))


def describe_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprint records, in words a user reads.

    Config keys by dotted name (``tiles.size``), inputs as ``input he``, models as
    ``model nuclei.model``, upstream as its own name (``kept tiles``), ``version`` for a new
    stage version. An empty list when ``old`` is None (never run) or nothing differs.
    """
    if not old:
        return []
    out: list[str] = []
    if old.get("version") != new.get("version"):
        out.append(f"{new.get('stage')} version")
    for section, fmt in (("keys", "{}"), ("inputs", "input {}"), ("models", "model {}"),
                         ("upstream", "{}")):
        a, b = old.get(section, {}) or {}, new.get(section, {}) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(fmt.format(k))
    return out


# --------------------------------------------------------------------------------------------
# state of a slide's published results
# --------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def read_done(work: Path) -> dict[str, Any] | None:
    """The ``done.json`` of a finished work folder (``None`` while unfinished)."""
    return _read_json(Path(work) / "done.json")


def write_done(work: Path, record: dict[str, Any]) -> None:
    _write_json(Path(work) / "done.json", record)


# --------------------------------------------------------------------------------------------
# a run's outputs as one set
# --------------------------------------------------------------------------------------------
def _link(link: Path, target: Path) -> None:
    """Make ``link`` a relative symlink to ``target``, atomically (replacing a link or file)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}-{threading.get_ident()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(rel, tmp)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)  # a folder of daskpath's older layout, under one of daskpath's names
    os.replace(tmp, link)


def _points_into(link: Path, base: Path) -> bool:
    """``link`` is a symlink whose target lies under ``base``."""
    if not link.is_symlink():
        return False
    target = Path(os.path.normpath(link.parent / os.readlink(link)))
    try:
        target.relative_to(Path(os.path.normpath(base)))
    except ValueError:
        return False
    return True


class RunSet:
    """The outputs of one run, built aside and switched in as one set.

    A run writes its tables and report into ``.daskpath/runs/<run_id>/`` and links each
    published artefact there to its finished (immutable) work folder. :meth:`commit` then
    points ``.daskpath/current`` at the run (one atomic ``rename`` of a symlink). Every
    user-facing name (``tiles.parquet``, ``layers/<slide>.zarr``, ...) is a relative symlink
    to ``.daskpath/current/<name>``, so all of them change at that one rename: a folder
    killed at any moment shows the previous complete set or the new complete set, never a mix.
    Nothing in a run folder or a finished work folder is modified after it is referenced.

    Parameters
    ----------
    out : path-like
        The run's ``output_dir`` (already claimed, see :mod:`daskpath.ownership`).
    run_id : str
        This run's id (the folder name under ``.daskpath/runs``).
    """

    def __init__(self, out: str | os.PathLike[str], run_id: str) -> None:
        self.out = Path(out)
        self.run_id = run_id
        self.root = internal_dir(self.out) / "runs" / run_id
        self.root.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        self.work_dirs: set[Path] = set()

    # the previous set --------------------------------------------------------------------
    @staticmethod
    def current_dir(out: str | os.PathLike[str]) -> Path | None:
        """The run folder ``.daskpath/current`` points at, or None before the first run."""
        link = internal_dir(Path(out)) / "current"
        if not link.is_symlink():
            return None
        d = Path(os.path.normpath(link.parent / os.readlink(link)))
        return d if d.is_dir() else None

    @classmethod
    def previous(cls, out: str | os.PathLike[str]) -> dict[str, Any]:
        """``run.json`` of the current set (``{}`` before the first run; a folder of the older
        layout, with a plain ``run.json``, gives that one)."""
        d = cls.current_dir(out)
        if d is not None:
            return _read_json(d / "run.json") or {}
        legacy = Path(out) / "run.json"
        if legacy.is_file() and not legacy.is_symlink():
            return _read_json(legacy) or {}
        return {}

    @classmethod
    def previous_state(cls, out: str | os.PathLike[str]) -> dict[str, Any]:
        """Per slide and stage, the fingerprint record and keep thresholds of the current set
        (``{slide: {stage: {fp, record, info, ...}}}``), for the "what changed" line."""
        d = cls.current_dir(out)
        if d is not None:
            return _read_json(d / "state.json") or {}
        legacy = internal_dir(Path(out)) / "state"  # older layout: keyed by slide_key
        if legacy.is_dir():
            return {f.stem: _read_json(f) or {} for f in legacy.glob("*.json")}
        return {}

    # building ----------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Where this run writes the output ``name`` (relative to ``output_dir``)."""
        p = self.root / name
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise ValueError(f"output name {name!r} would leave output_dir")
        if name not in self.names:
            self.names.append(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_artefact(self, name: str, work_item: Path) -> None:
        """Publish ``work_item`` (in a finished work folder) as ``name`` in this set."""
        if not work_item.exists():
            raise FileNotFoundError(f"{work_item}: a finished stage's artefact is missing")
        _link(self.path(name), work_item)
        self.work_dirs.add(work_item.parent)

    # switching ---------------------------------------------------------------------------
    def commit(self, previous_names: Iterable[str] = ()) -> None:
        """Switch ``output_dir`` to this set (see the class docstring for the order)."""
        internal = internal_dir(self.out)
        current = internal / "current"
        legacy_layout = not current.is_symlink()  # files of an older daskpath, not links
        _crash_point("before-links")
        # 1. user-facing links for every name (new names dangle until the switch: nothing
        #    shows up before it); a file of daskpath's older layout is replaced after it
        later = []
        for name in self.names:
            user = self.out / name
            if user.is_symlink() or not user.exists():
                if not _points_into(user, current):
                    _link(user, current / name)
            else:
                later.append(name)
        _crash_point("before-switch")
        # 2. the switch
        tmp = internal / f".current.{self.run_id}"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(os.path.relpath(self.root, internal), tmp)
        os.replace(tmp, current)
        _crash_point("after-switch")
        # 3. tidy: older-layout files under our names, names the new set no longer has
        for name in later:
            _link(self.out / name, current / name)
        keep = set(self.names)
        for name in previous_names:
            user = self.out / name
            if name in keep:
                continue
            if _points_into(user, current):
                user.unlink()
                _remove_empty_parents(user.parent, self.out)
            elif legacy_layout and (user.exists() and not user.is_symlink()):
                _remove(user)  # listed in the older layout's run.json: daskpath wrote it
        legacy = internal / "state"
        if legacy.is_dir():  # the per-slide publication journal of the older layout
            for f in legacy.glob("*.json"):
                for st in (_read_json(f) or {}).values():
                    for rel in (st or {}).get("artefacts", []) if isinstance(st, dict) else []:
                        p = self.out / rel
                        if rel not in keep and p.exists() and not p.is_symlink():
                            _remove(p)  # published by daskpath under its own name
            shutil.rmtree(legacy, ignore_errors=True)
        for d in (internal / "runs").iterdir():
            if d.name != self.run_id:
                _crash_point("mid-tidy")
                shutil.rmtree(d, ignore_errors=True)
        _crash_point("after-commit")


def _crash_point(name: str) -> None:
    """Fault injection for the kill-anywhere tests: ``DASKPATH_CRASH_AT=<name>`` kills this
    process (SIGKILL, as a lost node would) when the publication reaches ``name``."""
    if os.environ.get("DASKPATH_CRASH_AT") == name:
        import signal

        if os.getpgrp() == os.getpid():  # a process group of its own: its workers die too
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _remove_empty_parents(d: Path, stop: Path) -> None:
    while d != stop and d.is_dir() and not any(d.iterdir()):
        d.rmdir()
        d = d.parent
