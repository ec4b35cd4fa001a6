"""Fingerprints, work folders and publication of a run's outputs.

Every (slide, stage) result is computed under ``output_dir/.daskpath/work/<slide>/<stage>-<fp>/``
where ``fp`` is the stage's fingerprint (:func:`stage_fingerprint`): the config keys the stage
depends on, the identity of its input files, the identity of its models, what it reads from its
upstream stages, and a stage version. The work folder holds the chunk records (resume), the
stage's artefacts while they are being written, its per-tile table (``part.parquet``) and, once
complete, ``done.json``. Publishing moves the artefacts to their user-facing names (``layers/``,
``nuclei/``) and records the published fingerprint in ``.daskpath/state/<slide>.json``; the cohort
tables, metrics and report are assembled only from the fingerprints of the current run, and
``run.json`` says which slides and stages are current.

Publication of one (slide, stage) is journaled: ``state`` is written with ``status: publishing``
before the first move and ``published`` after the last, so a run killed in between completes
the moves on the next run instead of recomputing or mixing results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Artefact",
    "SlideState",
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


class SlideState:
    """Published fingerprints of one slide: ``{stage: {fp, status, record, artefacts}}``.

    Kept in ``output_dir/.daskpath/state/<slide-key>.json``; one writer per slide (the run
    loop's slide thread).
    """

    def __init__(self, out: Path, slide: str, key: str):
        self.out = Path(out)
        self.slide = slide
        self.path = internal_dir(out) / "state" / f"{key}.json"
        self.data: dict[str, Any] = _read_json(self.path) or {}

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.data.get(stage)

    def save(self) -> None:
        _write_json(self.path, self.data)

    def is_current(self, stage: str, fp: str, artefacts: Iterable[Artefact]) -> bool:
        """True when ``stage`` is published under ``fp`` and its artefacts are in place."""
        st = self.data.get(stage)
        if not st or st.get("fp") != fp or st.get("status") != "published":
            return False
        return all(a.target(self.out, self.slide).exists() for a in artefacts)

    def publish(self, stage: str, fp: str, record: dict, work: Path,
                artefacts: Iterable[Artefact], info: dict | None = None) -> None:
        """Move the stage's finished artefacts from ``work`` to their published names.

        Journaled (see module docstring); idempotent, so an interrupted publication is finished
        by calling it again. Published artefacts of an older fingerprint are replaced. ``info``
        is kept beside the record (not fingerprinted), e.g. the keep thresholds.

        Raises
        ------
        FileNotFoundError
            An artefact is neither in ``work`` nor published (the stage must run again).
        """
        arts = list(artefacts)
        prev = self.data.get(stage) or {}
        ours = prev.get("fp") == fp  # published files may already be this result's
        self.data[stage] = {"fp": fp, "status": "publishing", "record": record, "info": info or {},
                            "artefacts": [a.relative(self.slide) for a in arts]}
        self.save()
        for a in arts:
            src = work / a.name
            dst = a.target(self.out, self.slide)
            if not src.exists():
                if ours and dst.exists():
                    continue  # moved by an earlier, interrupted publication
                self.data[stage] = {**self.data[stage], "fp": None, "status": "incomplete"}  # never current
                self.save()
                raise FileNotFoundError(f"{src}: stage {stage} did not write its artefact {a.name}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            _remove(dst)
            os.replace(src, dst)
        self.data[stage]["status"] = "published"
        self.save()

    def unpublish(self, stage: str) -> list[str]:
        """Remove a stage's published artefacts (daskpath's own files) and forget the stage."""
        st = self.data.pop(stage, None)
        removed = []
        if st:
            for rel in st.get("artefacts", []):
                p = self.out / rel
                if p.exists() or p.is_symlink():
                    _remove(p)
                    removed.append(rel)
            self.save()
        return removed


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


def prune_work(slide_dir: Path, keep: Iterable[str]) -> None:
    """Remove a slide's work folders other than ``keep`` (names like ``nuclei-<fp>``)."""
    keep = set(keep)
    if not slide_dir.is_dir():
        return
    for d in slide_dir.iterdir():
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
