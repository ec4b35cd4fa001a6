"""Download a published cohort (a Zenodo record) and write its ``manifest.csv``.

``daskpath fetch zenodo:11218961 DIR`` (or :func:`fetch_record`) does, in order:

1. **List** the record's files through the Zenodo REST API, ``GET {api}/records/{id}``. Both
   shapes Zenodo has served are read: the current one (``files: [{key, size, checksum:
   "md5:<hex>", links: {self: ".../content"}}]``), InvenioRDM's (``files: {entries: ...}``,
   ``links.content``, or only ``links.files`` to follow) and the legacy deposit one
   (``filename``, ``filesize``, a bare md5 ``checksum``, ``links.download``).
2. **Download** them in parallel (a thread pool of ``workers``) into ``DIR/.<name>.part``.
   A part file left by a dropped connection is resumed (``Range: bytes=<have>-``) by the next
   retry of the same call (up to ``retries``, with exponential backoff) or by the next call; a
   server that answers ``200`` instead of ``206`` is read from the start again.
3. **Verify** each file against the published checksum (md5, or whatever algorithm the
   ``<alg>:`` prefix names) and size, then rename the part file to its final name (atomic).
   A mismatch deletes the part file and stops with a one-line :class:`ChecksumError`. A file
   already present with the right size and checksum is skipped (verified once; the result is
   remembered in ``DIR/.daskpath-fetch.json`` by size and mtime, so a rerun does not hash a
   cohort again).
4. **Extract** zip archives into ``DIR/<archive name without .zip>/``, refusing any entry that
   would land outside that folder (absolute paths, ``..``, symbolic links). The archive is kept
   (a rerun checks it instead of downloading it again).
5. **Pair** H&E and IHC files by name (:func:`pair_files`) and write ``DIR/manifest.csv``
   (``slide,he,ihc``, paths relative to DIR) last, atomically. Image files that do not pair are
   listed in one warning line.

A failed call leaves nothing that looks complete: no ``manifest.csv`` (an earlier one is
removed before the first download), no final-named file that is not verified; rerunning the
same command resumes. Progress: a bar on a terminal, otherwise a log line every 30 s
(``DASKPATH_PROGRESS_INTERVAL``) with bytes done / total and the rate.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import fnmatch
import hashlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from daskpath.errors import DaskpathError, InvalidInputError

__all__ = [
    "ZENODO_API",
    "ChecksumError",
    "FetchError",
    "RemoteFile",
    "UnsafePathError",
    "extract_zip",
    "fetch_record",
    "list_record",
    "pair_files",
    "parse_record",
    "parse_source",
    "sanitise_slide_id",
]

log = logging.getLogger("daskpath.fetch")

#: The REST API base of zenodo.org (``--api`` points elsewhere: a mirror, a test server).
ZENODO_API = "https://zenodo.org/api"
#: Name of the manifest written into the destination folder.
MANIFEST = "manifest.csv"
#: Sizes and mtimes of files already verified against their checksum (skips re-hashing).
VERIFIED = ".daskpath-fetch.json"
#: Bytes read per ``read`` call of a download.
CHUNK = 1 << 20
#: HTTP statuses worth retrying (the server is busy or briefly broken).
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Longest wait between two retries, in seconds.
MAX_BACKOFF = 60.0
#: Seconds between two progress lines when stderr is not a terminal.
PROGRESS_LOG_INTERVAL = 30.0
#: File name endings read as slides when pairing (lower case, longest first).
IMAGE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".png", ".svs", ".ndpi",
                  ".jpeg", ".jpg", ".scn", ".bif", ".mrxs", ".vms", ".zarr")
#: Slide ids written into the manifest match this (others are sanitised).
SLIDE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_USER_AGENT = "daskpath-fetch (+https://github.com/daskpath)"


class FetchError(DaskpathError, OSError):
    """A download failed: network, HTTP status, checksum, disk (an :class:`OSError` too)."""

    # the OSError layout wins: unpickling must use OSError.__new__ (as in daskpath.errors)
    __new__ = OSError.__new__


class ChecksumError(FetchError):
    """A downloaded file does not match the checksum (or size) the record publishes."""


class UnsafePathError(FetchError):
    """A record or archive names a file outside the destination folder (``..``, absolute...)."""


class _Retryable(Exception):
    """A connection error or busy server: worth another try (internal)."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


class _Stopped(Exception):
    """Another download failed or the user interrupted: stop this one, keep its part file."""


# ------------------------------------------------------------------------------------ sources
_ID = r"(\d{1,12})"
_SOURCE_FORMS = (
    re.compile(rf"zenodo:{_ID}", re.IGNORECASE),
    re.compile(rf"(?:doi:)?10\.5281/zenodo\.{_ID}", re.IGNORECASE),
    re.compile(rf"https?://(?:dx\.)?doi\.org/10\.5281/zenodo\.{_ID}/?", re.IGNORECASE),
    re.compile(rf"https?://(?:www\.)?zenodo\.org/(?:records?|api/records)/{_ID}(?:[/?#].*)?",
               re.IGNORECASE),
    re.compile(_ID),
)


def parse_source(source: str) -> str:
    """The Zenodo record id a source names.

    Parameters
    ----------
    source : str
        ``zenodo:<id>``, a DOI ``10.5281/zenodo.<id>`` (``doi:`` prefix allowed),
        ``https://doi.org/10.5281/zenodo.<id>``, ``https://zenodo.org/records/<id>`` (or the
        older ``/record/<id>``, with anything after it), or the bare number.

    Returns
    -------
    str
        The record id (digits).

    Raises
    ------
    InvalidInputError
        Anything else.
    """
    text = urllib.parse.unquote(str(source).strip())
    for form in _SOURCE_FORMS:
        m = form.fullmatch(text)
        if m:
            return m.group(1)
    raise InvalidInputError(
        f"source {source!r} is not a Zenodo record: give zenodo:<id>, 10.5281/zenodo.<id>, "
        "https://doi.org/10.5281/zenodo.<id> or https://zenodo.org/records/<id>")


def _check_api(api: str | None) -> str:
    api = (api or ZENODO_API).rstrip("/")
    if urllib.parse.urlsplit(api).scheme not in ("http", "https"):
        raise InvalidInputError(f"--api {api!r} is not an http(s) URL: give the REST API base, "
                                f"e.g. {ZENODO_API}")
    return api


# ------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class RemoteFile:
    """One file of a record.

    Attributes
    ----------
    name : str
        Its key in the record: the path under the destination folder (POSIX, relative).
    size : int or None
        Bytes, when the record says.
    algorithm, digest : str or None
        Published checksum (``md5`` and hex digest), when the record has one.
    url : str
        Where its bytes are.
    """

    name: str
    size: int | None
    algorithm: str | None
    digest: str | None
    url: str

    @property
    def checksum(self) -> str | None:
        """``<algorithm>:<digest>`` as the record publishes it (``None`` without one)."""
        return f"{self.algorithm}:{self.digest}" if self.digest else None


def _safe_relpath(name: str, what: str) -> PurePosixPath:
    """``name`` as a relative POSIX path that stays inside its folder, else UnsafePathError."""
    p = PurePosixPath(name)
    if (not name or "\\" in name or "\x00" in name or p.is_absolute()
            or re.match(r"[A-Za-z]:", name) or ".." in p.parts or not p.parts):
        raise UnsafePathError(f"{what} names a file {name!r} outside the destination folder: "
                              "refusing to write it; report it to the record's owners")
    return p


def _parse_checksum(value: Any, name: str) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    text = str(value).strip()
    alg, sep, digest = text.partition(":")
    if not sep:  # legacy deposit files: a bare md5
        alg, digest = "md5", text
    alg = alg.strip().lower().replace("-", "")
    digest = digest.strip().lower()
    try:
        hashlib.new(alg)
    except (ValueError, TypeError):
        raise FetchError(f"file {name}: the record's checksum {text!r} uses an algorithm "
                         f"({alg!r}) this Python cannot compute: download it by hand and check "
                         "it, or use a Python whose hashlib has it") from None
    return alg, digest


def _entries(data: Any) -> list[dict[str, Any]] | None:
    files = data.get("files") if isinstance(data, dict) else None
    if files is None and isinstance(data, dict) and "entries" in data:
        files = data  # the answer of links.files: {"entries": [...]}
    if isinstance(files, dict):  # InvenioRDM: {"enabled": ..., "entries": {key: {...}} or [...]}
        files = files.get("entries")
    if isinstance(files, dict):
        files = [dict(v, key=v.get("key", k)) for k, v in files.items()]
    return files if isinstance(files, list) else None


def parse_record(data: Any, record_id: str, api: str = ZENODO_API) -> list[RemoteFile]:
    """The files of a record from its REST API JSON (current, InvenioRDM or legacy shape).

    Parameters
    ----------
    data : dict
        The JSON of ``GET {api}/records/{id}`` (or of its ``links.files``).
    record_id : str
        The record id (for messages, and for download URLs a file does not give).
    api : str
        The REST API base (download URLs a file does not give are built on it).

    Returns
    -------
    list of RemoteFile
        In the record's order. Empty when the record lists no files.

    Raises
    ------
    FetchError
        A file without a name, with a non-http URL, or named twice.
    UnsafePathError
        A file named outside the destination folder.
    """
    out: list[RemoteFile] = []
    seen: set[str] = set()
    for e in _entries(data) or []:
        if not isinstance(e, dict):
            continue
        name = e.get("key") or e.get("filename")
        if not name:
            raise FetchError(f"record {record_id}: a file without a name (no 'key'/'filename'): "
                             "the API answer is not a Zenodo record; check --api")
        name = str(_safe_relpath(str(name), f"record {record_id}"))
        if name in seen:
            raise FetchError(f"record {record_id}: file {name} is listed twice: report it to "
                             "the record's owners")
        seen.add(name)
        size = e.get("size", e.get("filesize"))
        links = e.get("links") or {}
        url = links.get("content") or links.get("download") or links.get("self")
        if not url:
            url = f"{api}/records/{record_id}/files/{urllib.parse.quote(name)}/content"
        if urllib.parse.urlsplit(str(url)).scheme not in ("http", "https"):
            raise FetchError(f"record {record_id}: file {name} has a non-http URL {url!r}: "
                             "the API answer is not trustworthy; check --api")
        alg, digest = _parse_checksum(e.get("checksum"), name)
        out.append(RemoteFile(name, int(size) if size is not None else None, alg, digest,
                              str(url)))
    return out


def _get_json(opener: urllib.request.OpenerDirector, url: str, timeout: float, what: str,
              retries: int = 4, backoff: float = 1.0) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/json",
                                               "User-Agent": _USER_AGENT})
    for attempt in range(retries + 1):
        wait = min(backoff * 2 ** attempt, MAX_BACKOFF)
        try:
            with opener.open(req, timeout=timeout) as resp:
                body = resp.read()
            break
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                raise InvalidInputError(f"{what} not found ({url}: HTTP {e.code}): check the "
                                        "record id (and --api)") from None
            if e.code not in RETRY_STATUS or attempt == retries:
                raise FetchError(f"{what}: HTTP {e.code} {e.reason} from {url}: try again "
                                 "later, or check --api") from None
            with contextlib.suppress(TypeError, ValueError):
                wait = min(float(e.headers.get("Retry-After")), MAX_BACKOFF)
            reason: Any = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if attempt == retries:
                raise FetchError(f"{what}: cannot reach {url} ({reason}): check the network "
                                 "(proxy: https_proxy) or --api, then rerun") from None
        log.info("%s: %s; retry %d of %d in %.1f s", what, reason, attempt + 1, retries, wait)
        time.sleep(wait)
    try:
        return json.loads(body)
    except ValueError:
        raise FetchError(f"{what}: {url} did not answer JSON: check --api (the REST API base, "
                         f"e.g. {ZENODO_API})") from None


def list_record(record_id: str, api: str = ZENODO_API, *, timeout: float = 60.0,
                retries: int = 4, backoff: float = 1.0,
                opener: urllib.request.OpenerDirector | None = None) -> list[RemoteFile]:
    """List the files of a Zenodo record through the REST API.

    Parameters
    ----------
    record_id : str
        The record id (see :func:`parse_source`).
    api : str
        REST API base, default :data:`ZENODO_API`.
    timeout : float
        Seconds to wait for the server.
    retries, backoff : int, float
        Retries after a connection error or HTTP 429/5xx, the first after ``backoff`` seconds.
    opener : urllib.request.OpenerDirector, optional
        Made with ``urllib.request.build_opener()`` (proxies from the environment) when omitted.

    Returns
    -------
    list of RemoteFile

    Raises
    ------
    InvalidInputError
        No such record.
    FetchError
        Network or server error, or the record lists no files (restricted, or empty).
    """
    api = _check_api(api)
    opener = opener or urllib.request.build_opener()
    what = f"Zenodo record {record_id}"
    data = _get_json(opener, f"{api}/records/{record_id}", timeout, what, retries, backoff)
    files = parse_record(data, record_id, api)
    follow = (data.get("links") or {}).get("files") if isinstance(data, dict) else None
    if not files and follow:  # InvenioRDM without the entries inline
        files = parse_record(_get_json(opener, follow, timeout, what, retries, backoff),
                             record_id, api)
    if not files:
        raise FetchError(f"{what} lists no files (restricted or empty record): open "
                         f"https://zenodo.org/records/{record_id} and request access, or check "
                         "the id")
    return files


# --------------------------------------------------------------------------------- progress
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _interactive() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_interval() -> float:
    try:
        return float(os.environ.get("DASKPATH_PROGRESS_INTERVAL", PROGRESS_LOG_INTERVAL))
    except ValueError:
        return PROGRESS_LOG_INTERVAL


class _Progress:
    """Bytes done of the whole record: a tqdm bar on a terminal, else a log line every 30 s."""

    def __init__(self, total: int, files: int, enabled: bool) -> None:
        self.total, self.files = total, files
        self.done = self.downloaded = self.files_done = 0
        self.lock = threading.Lock()
        self.t0 = self._last = time.monotonic()
        self.interval = _progress_interval()
        self.bar = None
        self.lines = False
        if enabled and _interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="fetch", dynamic_ncols=True)
        elif enabled:
            self.lines = True

    def add(self, n: int, downloaded: bool = True) -> None:
        with self.lock:
            self.done += n
            if downloaded:
                self.downloaded += n
            if self.bar is not None:
                self.bar.update(n)
            self._maybe_log()

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1
            self._maybe_log()

    def _maybe_log(self) -> None:
        if not self.lines:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        rate = self.downloaded / max(now - self.t0, 1e-9)
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        log.info("fetch: %s of %s%s, %s/s, %d of %d file(s) done", _fmt_bytes(self.done),
                 _fmt_bytes(self.total), share, _fmt_bytes(rate), self.files_done, self.files)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------- downloads
class _Verified:
    """Files verified against their checksum, by name -> (checksum, size, mtime_ns)."""

    def __init__(self, dest: Path) -> None:
        self.path = dest / VERIFIED
        self.lock = threading.Lock()
        try:
            data = json.loads(self.path.read_text())
            self.files: dict[str, dict[str, Any]] = dict(data.get("files", {}))
        except (OSError, ValueError, AttributeError):
            self.files = {}

    def ok(self, f: RemoteFile, path: Path) -> bool:
        entry = self.files.get(f.name)
        try:
            st = path.stat()
        except OSError:
            return False
        return (isinstance(entry, dict) and f.checksum is not None
                and entry.get("checksum") == f.checksum and entry.get("size") == st.st_size
                and entry.get("mtime_ns") == st.st_mtime_ns)

    def add(self, f: RemoteFile, path: Path) -> None:
        if f.checksum is None:
            return
        st = path.stat()
        with self.lock:
            self.files[f.name] = {"checksum": f.checksum, "size": st.st_size,
                                  "mtime_ns": st.st_mtime_ns}

    def save(self) -> None:
        with self.lock:
            data = json.dumps({"files": self.files}, indent=1, sort_keys=True)
        with contextlib.suppress(OSError):
            _atomic_write(self.path, data)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path`` (mode as umask allows), then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "x", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _hash_file(path: Path, algorithm: str) -> Any:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h


def _part_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.part")


class _Download:
    """One file: resume its part file, verify it, rename it (in a worker thread)."""

    def __init__(self, f: RemoteFile, dest: Path, opener: urllib.request.OpenerDirector,
                 progress: _Progress, stop: threading.Event, cache: _Verified, *, retries: int,
                 backoff: float, timeout: float) -> None:
        self.f, self.opener, self.progress, self.stop = f, opener, progress, stop
        self.cache = cache
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.final = dest.joinpath(*PurePosixPath(f.name).parts)
        self.part = _part_path(self.final)
        self.hasher: Any = None
        self.hashed = 0  # bytes of the part file fed to the hasher

    def _reset(self) -> None:
        self.hasher = hashlib.new(self.f.algorithm) if self.f.algorithm else None
        self.hashed = 0

    def run(self) -> bool:
        """Download and verify; True when it was downloaded, False when already present."""
        f = self.f
        if self.final.is_file():
            if self._present_ok():
                self.progress.add(self.final.stat().st_size, downloaded=False)
                self.progress.file_done()
                return False
            log.warning("%s: present but its size or checksum differs from the record's: "
                        "downloading it again", f.name)
            self.final.unlink()  # not the record's file: it must not look complete
        self.part.parent.mkdir(parents=True, exist_ok=True)
        have = self.part.stat().st_size if self.part.exists() else 0
        if f.size is not None and have > f.size:  # longer than the file: not ours to resume
            self.part.unlink()
            have = 0
        if have:
            log.info("%s: resuming after the %s already downloaded", f.name, _fmt_bytes(have))
            self.progress.add(have, downloaded=False)
        self._reset()
        attempt = 0
        while True:
            if self.stop.is_set():
                raise _Stopped
            have = self.part.stat().st_size if self.part.exists() else 0
            if self.hasher is not None and self.hashed != have:  # hash what is on disk
                self._reset()
                if have:
                    self.hasher = _hash_file(self.part, self.f.algorithm)
                self.hashed = have
            if f.size is not None and have >= f.size:
                break
            try:
                if self._get(have):
                    break
            except _Retryable as e:
                attempt += 1
                if attempt > self.retries:
                    have = self.part.stat().st_size if self.part.exists() else 0
                    raise FetchError(
                        f"{f.name}: download failed after {attempt} attempt(s) ({e}): check the "
                        f"network (or --api) and rerun the same command; it resumes from the "
                        f"{_fmt_bytes(have)} already in {self.part}") from None
                wait = e.wait if e.wait is not None else self.backoff * 2 ** (attempt - 1)
                wait = min(wait, MAX_BACKOFF)
                log.info("%s: %s; retry %d of %d in %.1f s", f.name, e, attempt, self.retries,
                         wait)
                if self.stop.wait(wait):
                    raise _Stopped from None
        self._verify()
        os.replace(self.part, self.final)
        self.progress.file_done()
        return True

    def _present_ok(self) -> bool:
        f = self.f
        size = self.final.stat().st_size
        if f.size is not None and size != f.size:
            return False
        if f.algorithm is None:
            if f.size is None:
                return False  # nothing to check it against: download it again
            log.warning("%s: the record publishes no checksum: kept the file present, checked "
                        "by size only", f.name)
            return True
        if self.cache.ok(f, self.final):
            return True
        ok = _hash_file(self.final, f.algorithm).hexdigest() == f.digest
        if ok:
            self.cache.add(f, self.final)
        return ok

    def _get(self, have: int) -> bool:
        """One request from byte ``have``; True when the body ended where the file does."""
        f = self.f
        headers = {"User-Agent": _USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        req = urllib.request.Request(f.url, headers=headers)
        try:
            resp = self.opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and have:  # nothing after `have`: start again from 0
                self.progress.add(-have, downloaded=False)
                self._truncate()
                raise _Retryable(f"server refused to resume at byte {have}") from None
            if e.code in RETRY_STATUS:
                wait = None
                with contextlib.suppress(TypeError, ValueError):
                    wait = float(e.headers.get("Retry-After"))
                raise _Retryable(f"HTTP {e.code} {e.reason}", wait) from None
            raise FetchError(f"{f.name}: HTTP {e.code} {e.reason} from {f.url}: the file may "
                             "be restricted or the record changed; check the record page (or "
                             "--api)") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Retryable(str(getattr(e, "reason", e)) or type(e).__name__) from None
        with resp:
            mode = "ab"
            if have and resp.status == 200:  # the server ignored Range: read it all again
                log.debug("%s: server answered 200 to a Range request: restarting", f.name)
                self.progress.add(-have, downloaded=False)
                mode, have = "wb", 0
                self._reset()
            elif resp.status == 206:
                m = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:
                    self.progress.add(-have, downloaded=False)
                    self._truncate()
                    raise _Retryable(f"server answered a range other than bytes={have}-")
            elif resp.status != 200:
                raise FetchError(f"{f.name}: unexpected HTTP {resp.status} from {f.url}: check "
                                 "--api") from None
            with self._open_part(mode) as out:
                while True:
                    if self.stop.is_set():
                        raise _Stopped
                    try:  # what has arrived (read() would wait for a whole CHUNK)
                        chunk = resp.read1(CHUNK)
                    except (OSError, http.client.HTTPException, ValueError) as e:
                        raise _Retryable(f"connection dropped after byte {have} "
                                         f"({type(e).__name__})") from None
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as e:
                        raise FetchError(f"{self.part}: cannot write ({e.strerror}): free disk "
                                         "space in the destination folder and rerun") from None
                    if self.hasher is not None:
                        self.hasher.update(chunk)
                    have += len(chunk)
                    self.hashed = have
                    self.progress.add(len(chunk))
                    if f.size is not None and have > f.size:
                        break
                out.flush()
                os.fsync(out.fileno())
        if f.size is None:
            return True
        if have < f.size:
            raise _Retryable(f"connection closed after byte {have} of {f.size}")
        return True

    def _open_part(self, mode: str) -> io.BufferedWriter:
        try:
            return open(self.part, mode)  # the caller's `with` closes it
        except OSError as e:
            raise FetchError(f"{self.part}: cannot write ({e.strerror}): check the destination "
                             "folder's permissions") from None

    def _truncate(self) -> None:
        with open(self.part, "wb"):
            pass
        self._reset()

    def _verify(self) -> None:
        f = self.f
        have = self.part.stat().st_size
        if f.size is not None and have != f.size:
            self.part.unlink(missing_ok=True)
            raise ChecksumError(f"{f.name}: downloaded {have} bytes, the record says {f.size}: "
                                "the partial file was deleted; rerun the same command to "
                                "download it again")
        if f.algorithm is None:
            log.warning("%s: the record publishes no checksum: checked by size only", f.name)
            return
        got = self.hasher.hexdigest()
        if got != f.digest:
            self.part.unlink(missing_ok=True)
            raise ChecksumError(f"{f.name}: {f.algorithm} {got} does not match the record's "
                                f"{f.digest}: the download was corrupted and deleted; rerun the "
                                "same command to download it again (if it fails again, the "
                                "server's copy is bad: tell the record's owners or use another "
                                "--api mirror)")
        # the stat of the final name is the part's: os.replace keeps size and mtime
        self.cache.add(f, self.part)


# ----------------------------------------------------------------------------------- zips
def _zip_members(archive: Path) -> tuple[list[tuple[zipfile.ZipInfo, PurePosixPath]], int]:
    """The archive's files and their paths in the extraction folder; refuses unsafe entries."""
    try:
        z = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{archive}: not a readable zip archive ({e}): delete it and rerun "
                         "the same command to download it again") from None
    with z:
        infos = z.infolist()
    members = []
    for info in infos:
        name = info.filename
        p = _safe_relpath(name, f"archive {archive.name}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafePathError(f"archive {archive.name} holds a symbolic link {name!r}: "
                                  "refusing to extract it; extract it by hand if you trust it")
        if info.is_dir():
            continue
        members.append((info, p))
    stem = archive.name[:-4] if archive.name.lower().endswith(".zip") else archive.name
    # an archive whose files all sit in one folder named like it: do not nest that folder
    if members and all(len(p.parts) > 1 and p.parts[0] == stem for _, p in members):
        members = [(i, PurePosixPath(*p.parts[1:])) for i, p in members]
    members = [(i, p) for i, p in members
               if p.parts[0] != "__MACOSX" and not p.name.startswith("._")]
    return members, sum(i.file_size for i, _ in members)


def extract_zip(archive: str | os.PathLike[str], into: str | os.PathLike[str] | None = None
                ) -> list[str]:
    """Extract a zip archive safely, all or nothing.

    Every entry is checked before anything is written: absolute paths, drive letters, ``..``
    components and symbolic links are refused (:class:`UnsafePathError`). The files go into a
    hidden temporary folder beside ``into`` that is renamed to ``into`` when complete; an
    ``into`` that already holds every file with the right size is kept as it is.

    Parameters
    ----------
    archive : path-like
        The ``.zip`` file.
    into : path-like, optional
        Folder to extract into; default: beside the archive, its name without ``.zip``. When
        every file of the archive sits in one folder of that name, that level is not repeated.

    Returns
    -------
    list of str
        The extracted files, as POSIX paths relative to ``into``.

    Raises
    ------
    UnsafePathError
        An entry would land outside ``into``, or is a symbolic link.
    FetchError
        Corrupt archive (CRC), not enough disk space, or ``into`` holds other files.
    """
    archive = Path(archive)
    stem = archive.name[:-4] if archive.name.lower().endswith(".zip") else archive.name + ".d"
    into = Path(into) if into is not None else archive.with_name(stem)
    members, total = _zip_members(archive)
    names = [str(p) for _, p in members]
    if into.is_dir():
        sizes = [(into.joinpath(*p.parts), i.file_size) for i, p in members]
        if all(t.is_file() and t.stat().st_size == s for t, s in sizes):
            log.debug("%s: already extracted into %s", archive.name, into)
            return names
        raise FetchError(f"{into} exists but does not hold the files of {archive.name}: move "
                         "it away and rerun the same command")
    free = shutil.disk_usage(into.parent).free
    if total > free:
        raise FetchError(f"{archive.name}: extracting needs {_fmt_bytes(total)}, "
                         f"{_fmt_bytes(free)} free in {into.parent}: free some space and rerun")
    tmp = into.with_name(f".{into.name}.extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as z:
            for info, p in members:
                target = tmp.joinpath(*p.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
        os.replace(tmp, into)
    except zipfile.BadZipFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"{archive}: corrupt zip archive ({e}): delete it and rerun the same "
                         "command to download it again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


# ---------------------------------------------------------------------------------- pairing
# a stain token is not part of a word: no letter right before or after it (digits may touch it:
# HE12, 12HE); "Ki67" is not followed by a digit either
_STAIN_TOKEN = re.compile(r"(?<![A-Za-z])(h&e|h\+e|hne|he|ihc|ki[-_]?67(?!\d))(?![A-Za-z])",
                          re.IGNORECASE)
_SEP = "_-. "


def _stains(text: str) -> tuple[set[str], str]:
    """The stains named in ``text`` ('he', 'ihc') and the text without their tokens."""
    found: set[str] = set()
    keep: list[str] = []
    pos = 0
    for m in _STAIN_TOKEN.finditer(text):
        token = m.group(1).lower()
        found.add("ihc" if token == "ihc" or token.startswith("ki") else "he")
        keep.append(text[pos:m.start()])
        pos = m.end()
    keep.append(text[pos:])
    rest = "".join(keep)
    rest = re.sub(r"[_\-. ]{2,}", lambda m: m.group(0)[0], rest).strip(_SEP)
    return found, rest


def _image_stem(name: str) -> str | None:
    low = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def sanitise_slide_id(text: str) -> str:
    """``text`` as a slide id matching :data:`SLIDE_ID` ('' when nothing is left)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    s = re.sub(r"^[^A-Za-z0-9]+", "", s)[:128]
    return s.rstrip("_-.") if len(s) > 1 else s


def _natural(s: str) -> list[Any]:
    return [(0, int(t), t) if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", s)]


def pair_files(paths: Iterable[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Pair H&E and IHC images by name.

    A file's stain comes from a token in its name, else from the nearest folder whose name has
    one; tokens are case-insensitive and not part of a word (no letter right before or after:
    ``_ - . space``, a digit or the ends): ``HE``, ``H&E``, ``H+E``, ``HnE`` for H&E; ``IHC``,
    ``Ki67``, ``Ki-67``, ``Ki_67`` for the IHC. The slide id is the name without the stain token
    (``12_HE.png``, ``HE_12.png``, ``HE12.png``, ``he/12.png`` -> ``12``); two files pair when
    their ids and their folders
    (stain folders read without the stain: ``HE_paired/`` and ``IHC_paired/`` match) agree.
    A name with an H&E and an IHC token, or a key with two files of one stain, is ambiguous
    and left unpaired.

    Parameters
    ----------
    paths : iterable of str
        POSIX paths relative to the destination folder. Files that are not images
        (:data:`IMAGE_SUFFIXES`) are ignored.

    Returns
    -------
    rows : list of (slide, he, ihc)
        Sorted by slide id (numbers in natural order); ids match :data:`SLIDE_ID`, made unique
        (with the folder, then ``-2``, ``-3``...) when two pairs would share one.
    unpaired : list of str
        Image files left out, sorted.
    """
    groups: dict[tuple[tuple[str, ...], str], dict[str, list[tuple[str, tuple[str, ...], str]]]]
    groups = {}
    unpaired: list[str] = []
    for path in paths:
        p = PurePosixPath(path)
        if any(part.startswith(".") or part == "__MACOSX" for part in p.parts):
            continue
        stem = _image_stem(p.name)
        if stem is None:
            continue
        own, slide = _stains(stem)
        context: list[str] = []
        folder_stain: str | None = None
        for part in p.parts[:-1]:
            found, rest = _stains(part)
            if len(found) == 1:
                folder_stain = next(iter(found))  # the nearest folder wins
            if rest:
                context.append(rest)
        if len(own) > 1 or (not own and folder_stain is None):
            unpaired.append(path)
            continue
        stain = next(iter(own)) if own else folder_stain
        assert stain is not None
        key = (tuple(c.lower() for c in context), slide.lower())
        groups.setdefault(key, {"he": [], "ihc": []})[stain].append((path, tuple(context), slide))
    rows: list[tuple[tuple[str, ...], str, str, str]] = []
    for g in groups.values():
        if len(g["he"]) == 1 and len(g["ihc"]) == 1:
            he, ihc = g["he"][0], g["ihc"][0]
            rows.append((he[1], he[2], he[0], ihc[0]))
        else:
            unpaired.extend(x[0] for x in g["he"] + g["ihc"])
    # slide ids: the name, else the folder; with the folder when two pairs would share one
    base = [sanitise_slide_id(slide) or sanitise_slide_id(ctx[-1] if ctx else "") or "slide"
            for ctx, slide, _, _ in rows]
    ids = list(base)
    for i, (ctx, slide, _, _) in enumerate(rows):
        if base.count(base[i]) > 1 and ctx:
            ids[i] = sanitise_slide_id("_".join([*ctx, slide])) or base[i]
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        n = seen.get(sid.lower(), 0) + 1
        seen[sid.lower()] = n
        if n > 1:
            ids[i] = f"{sid[:124]}-{n}"
    out = sorted(((sid, he, ihc) for sid, (_, _, he, ihc) in zip(ids, rows, strict=True)),
                 key=lambda r: _natural(r[0]))
    return out, sorted(unpaired, key=_natural)


def _write_manifest(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide", "he", "ihc"])
    w.writerows(rows)
    _atomic_write(path, buf.getvalue())


# ------------------------------------------------------------------------------------ fetch
def fetch_record(source: str, dest: str | os.PathLike[str], api: str | None = ZENODO_API,
                 workers: int = 4, progress: bool = True, *,
                 only: str | Sequence[str] | None = None, retries: int = 4,
                 backoff: float = 1.0, timeout: float = 60.0) -> Path:
    """Download a Zenodo record into ``dest``, verify it and write ``dest/manifest.csv``.

    See the module docstring for the steps. Rerunning the same call resumes an interrupted
    download and skips files already present and verified.

    Parameters
    ----------
    source : str
        The record: ``zenodo:<id>``, ``10.5281/zenodo.<id>``,
        ``https://doi.org/10.5281/zenodo.<id>`` or ``https://zenodo.org/records/<id>``.
    dest : path-like
        Destination folder (created when missing).
    api : str, optional
        REST API base (``GET {api}/records/{id}``); default :data:`ZENODO_API`.
    workers : int
        Files downloaded at once (threads).
    progress : bool
        A progress bar on a terminal, a log line every 30 s otherwise; False: neither.
    only : str or sequence of str, optional
        Download only the files whose name matches one of these globs (case-insensitive,
        ``fnmatch``); default all.
    retries : int
        Retries of a file after a connection error or a busy server (HTTP 429/5xx), with
        exponential backoff starting at ``backoff`` seconds (``Retry-After`` honoured).
    backoff : float
        First wait between retries, in seconds.
    timeout : float
        Seconds without an answer before a connection counts as dropped.

    Returns
    -------
    pathlib.Path
        The manifest (``slide,he,ihc``, paths relative to ``dest``).

    Raises
    ------
    InvalidInputError
        Bad source, ``--api``, ``workers``, ``dest``; no such record; ``only`` matches nothing;
        no H&E/IHC pair among the files.
    FetchError
        Network or server failure after the retries (the part files stay, to resume).
    ChecksumError
        A file does not match its published checksum (its part file is deleted).
    UnsafePathError
        The record or one of its zip archives names a file outside ``dest``.
    """
    record_id = parse_source(source)
    api = _check_api(api)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidInputError(f"workers={workers!r}: give a whole number >= 1 (--workers)")
    if retries < 0:
        raise InvalidInputError(f"retries={retries!r}: give a whole number >= 0")
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise InvalidInputError(f"{dest} is a file, not a folder: give a folder for the "
                                "record's files")
    opener = urllib.request.build_opener()  # proxies from the environment, read now
    files = list_record(record_id, api, timeout=timeout, retries=retries, backoff=backoff,
                        opener=opener)
    if only:
        globs = [only] if isinstance(only, str) else list(only)
        files = [f for f in files if any(fnmatch.fnmatchcase(f.name.lower(), g.lower())
                                         for g in globs)]
        if not files:
            raise InvalidInputError(f"--only {' '.join(globs)} matches none of the files of "
                                    f"record {record_id}: check the pattern (names are "
                                    "matched whole, e.g. '*_HE.png')")
    total = sum(f.size or 0 for f in files)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"cannot create {dest} ({e.strerror}): give a folder you can "
                                "write") from None
    manifest = dest / MANIFEST
    manifest.unlink(missing_ok=True)  # nothing looks complete until everything is
    log.info("record %s: %d file(s), %s; downloading into %s with %d worker(s)", record_id,
             len(files), _fmt_bytes(total), dest, min(workers, len(files)))
    cache = _Verified(dest)
    bar = _Progress(total, len(files), progress)
    stop = threading.Event()
    downloaded: list[RemoteFile] = []
    skipped: list[RemoteFile] = []
    errors: list[BaseException] = []
    try:
        with cf.ThreadPoolExecutor(max_workers=min(workers, len(files)),
                                   thread_name_prefix="daskpath-fetch") as pool:
            jobs = {pool.submit(_Download(f, dest, opener, bar, stop, cache, retries=retries,
                                          backoff=backoff, timeout=timeout).run): f
                    for f in files}
            try:
                for fut in cf.as_completed(jobs):
                    try:
                        (downloaded if fut.result() else skipped).append(jobs[fut])
                    except _Stopped:
                        pass
                    except Exception as e:  # noqa: BLE001 - the first failure stops the others
                        errors.append(e)
                        stop.set()
            except BaseException:  # Ctrl-C / SIGTERM in the main thread: stop the workers
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
        cache.save()
    if errors:
        first = errors[0]
        if len(errors) > 1 and isinstance(first, DaskpathError):
            log.debug("%d other file(s) failed too", len(errors) - 1)
        raise first
    skipped = [f for f in files if f in skipped]  # the record's order
    if skipped:
        log.info("%d file(s) already present with the right size and checksum: skipped%s",
                 len(skipped), f" ({', '.join(f.name for f in skipped)})"
                 if len(skipped) <= 5 else "")
    if downloaded:
        log.info("%d file(s) downloaded and verified (%s)", len(downloaded),
                 _fmt_bytes(sum(f.size or 0 for f in downloaded)))

    # zip archives: extract, and pair what they hold
    candidates: list[str] = []
    for f in files:
        if f.name.lower().endswith(".zip"):
            archive = dest.joinpath(*PurePosixPath(f.name).parts)
            into = archive.with_name(archive.name[:-4])
            names = extract_zip(archive, into)
            rel = PurePosixPath(f.name).parent / into.name
            candidates.extend(str(rel / n) for n in names)
            log.info("%s: %d file(s) in %s/", f.name, len(names), rel)
        else:
            candidates.append(f.name)
    rows, unpaired = pair_files(candidates)
    if unpaired:
        log.warning("%d image file(s) not paired, left out of %s (no H&E/IHC partner, or no "
                    "stain in the name; add them by hand): %s", len(unpaired), MANIFEST,
                    ", ".join(unpaired))
    if not rows:
        raise InvalidInputError(
            f"record {record_id}: no H&E/IHC pair among its {len(candidates)} file(s) in {dest} "
            "(names like <id>_HE.png / <id>_IHC.png, or HE/ and IHC/ folders, are paired): "
            f"write {manifest} by hand (slide,he,ihc)")
    _write_manifest(manifest, rows)
    log.info("wrote %s: %d slide pair(s)", manifest, len(rows))
    return manifest
