"""daskpath fetch: a local imitation of the Zenodo REST API (no network), resume, checksums,
pairing, zip safety."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from daskpath.cli import main
from daskpath.errors import InvalidInputError
from daskpath.fetch import (
    ChecksumError,
    FetchError,
    UnsafePathError,
    extract_zip,
    fetch_record,
    pair_files,
    parse_record,
    parse_source,
)

RECORD = "11218961"


def _bytes(seed: int, n: int) -> bytes:
    return bytes((seed * 31 + i * 7 + (i >> 8)) % 256 for i in range(n))


class _Zenodo(http.server.ThreadingHTTPServer):
    """GET /api/records/<id> (the current shape) and /files/<name> with Range support.

    ``drop_first``: names whose first request closes the socket halfway through the body.
    ``ignore_range``: answer 200 with the whole file to Range requests.
    ``corrupt``: names served with one byte changed (the checksum stays the original's).
    ``legacy``: the record in the legacy deposit shape (filename, filesize, links.download).
    """

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.drop_first: set[str] = set()
        self.ignore_range = False
        self.corrupt: set[str] = set()
        self.legacy = False
        self.busy_first: set[str] = set()  # first request: 503 with Retry-After
        self.missing: set[str] = set()  # listed in the record, 404 on download
        self.algorithm = "md5"
        self.slow = False  # file bodies trickle: 1000 bytes every 0.1 s
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # a client that went away
        pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self) -> dict:
        entries = []
        for name, data in self.files.items():
            digest = hashlib.new(self.algorithm, data).hexdigest()
            url = f"{self.base}/files/{name}"
            if self.legacy:
                entries.append({"id": name, "filename": name, "filesize": len(data),
                                "checksum": digest, "links": {"download": url}})
            else:
                entries.append({"key": name, "size": len(data),
                                "checksum": f"{self.algorithm}:{digest}",
                                "links": {"self": url}})
        return {"id": int(RECORD), "doi": f"10.5281/zenodo.{RECORD}", "files": entries}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Zenodo
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.path, rng))
        if self.path == f"/api/records/{RECORD}" and "record" in srv.busy_first:
            srv.busy_first.discard("record")
            self._send(502, b"bad gateway", {"Retry-After": "0"})
            return
        if self.path == f"/api/records/{RECORD}":
            self._send(200, json.dumps(srv.record()).encode(),
                       {"Content-Type": "application/json"})
            return
        m = re.fullmatch(r"/files/(.+)", self.path)
        if not m or m.group(1) not in srv.files or m.group(1) in srv.missing:
            self._send(404, b"not found")
            return
        name = m.group(1)
        data = srv.files[name]
        with srv.lock:
            busy = name in srv.busy_first
            srv.busy_first.discard(name)
        if busy:
            self._send(503, b"busy", {"Retry-After": "0"})
            return
        if name in srv.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with srv.lock:
            drop = name in srv.drop_first
            srv.drop_first.discard(name)
        if drop:  # half the body, then the connection goes away
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if srv.slow:
            for i in range(0, len(body), 1000):
                self.wfile.write(body[i:i + 1000])
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for k in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


FILES = {
    "1_HE.png": _bytes(1, 70_000),
    "1_IHC.png": _bytes(2, 65_000),
    "2_HE.png": _bytes(3, 3_000),
    "2_IHC.png": _bytes(4, 5_000),
    "README.txt": b"two pairs\n",
}


@pytest.fixture
def zenodo():
    srv = _Zenodo(FILES)
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _fetch(zenodo, dest, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.01)
    return fetch_record(f"zenodo:{RECORD}", dest, api=f"{zenodo.base}/api", **kw)


def _file_requests(zenodo, name):
    return [r for p, r in zenodo.requests if p == f"/files/{name}"]


# ------------------------------------------------------------------------------- fetching
def test_full_fetch_files_checksums_manifest(zenodo, tmp_path):
    manifest = _fetch(zenodo, tmp_path / "cohort", workers=3)
    assert manifest == tmp_path / "cohort" / "manifest.csv"
    for name, data in FILES.items():
        assert (tmp_path / "cohort" / name).read_bytes() == data
    assert manifest.read_text() == ("slide,he,ihc\n"
                                    "1,1_HE.png,1_IHC.png\n"
                                    "2,2_HE.png,2_IHC.png\n")
    assert not list((tmp_path / "cohort").glob(".*.part"))
    # the manifest is one daskpath reads
    from daskpath.io import read_manifest

    df = read_manifest(manifest)
    assert list(df.slide) == ["1", "2"]
    assert Path(df.he[0]) == tmp_path / "cohort" / "1_HE.png"


def test_legacy_record_shape(zenodo, tmp_path):
    zenodo.legacy = True
    manifest = _fetch(zenodo, tmp_path)
    assert manifest.read_text().splitlines()[1] == "1,1_HE.png,1_IHC.png"
    files = parse_record(zenodo.record(), RECORD)
    assert files[0].name == "1_HE.png" and files[0].algorithm == "md5"
    assert files[0].size == len(FILES["1_HE.png"])
    assert files[0].url.endswith("/files/1_HE.png")


def test_invenio_shape_and_content_link():
    data = {"files": {"enabled": True, "entries": {
        "a_HE.svs": {"size": 3, "checksum": "sha256:" + "0" * 64,
                     "links": {"self": "https://x/api/records/1/files/a_HE.svs",
                               "content": "https://x/api/records/1/files/a_HE.svs/content"}}}}}
    (f,) = parse_record(data, "1")
    assert (f.name, f.algorithm, f.url) == ("a_HE.svs", "sha256",
                                            "https://x/api/records/1/files/a_HE.svs/content")


def test_resume_after_dropped_connection_same_call(zenodo, tmp_path):
    zenodo.drop_first = {"1_HE.png"}
    _fetch(zenodo, tmp_path, workers=2)
    assert (tmp_path / "1_HE.png").read_bytes() == FILES["1_HE.png"]
    ranges = _file_requests(zenodo, "1_HE.png")
    assert ranges[0] is None and len(ranges) == 2
    have = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < have < len(FILES["1_HE.png"])


def test_resume_on_next_call_after_failure(zenodo, tmp_path, capsys):
    zenodo.drop_first = {"1_IHC.png"}
    with pytest.raises(FetchError, match=r"1_IHC\.png: download failed.*rerun the same command"):
        _fetch(zenodo, tmp_path, retries=0)
    part = tmp_path / ".1_IHC.png.part"
    assert 0 < part.stat().st_size < len(FILES["1_IHC.png"])
    assert not (tmp_path / "1_IHC.png").exists()  # nothing final-named that is not verified
    assert not (tmp_path / "manifest.csv").exists()
    have = part.stat().st_size
    manifest = _fetch(zenodo, tmp_path, retries=0)
    assert (tmp_path / "1_IHC.png").read_bytes() == FILES["1_IHC.png"]
    assert _file_requests(zenodo, "1_IHC.png")[-1] == f"bytes={have}-"
    assert not part.exists()
    assert manifest.exists()


def test_server_ignoring_range_restarts(zenodo, tmp_path):
    zenodo.drop_first = {"1_HE.png"}
    zenodo.ignore_range = True
    _fetch(zenodo, tmp_path)
    assert (tmp_path / "1_HE.png").read_bytes() == FILES["1_HE.png"]
    assert _file_requests(zenodo, "1_HE.png")[1] is not None  # asked to resume, got 200


def test_sigterm_keeps_part_files_and_exits_143(zenodo, tmp_path):
    zenodo.slow = True
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskpath.cli", "fetch", f"zenodo:{RECORD}", str(tmp_path),
         "--api", f"{zenodo.base}/api", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = tmp_path / ".1_HE.png.part"
    deadline = time.monotonic() + 20
    while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "daskpath: interrupted: rerun the same command to resume"
    assert 0 < part.stat().st_size < len(FILES["1_HE.png"])  # stopped at once, kept
    assert not (tmp_path / "1_HE.png").exists() and not (tmp_path / "manifest.csv").exists()


def test_busy_server_retried_and_progress_lines(zenodo, tmp_path, caplog, monkeypatch):
    zenodo.busy_first = {"2_HE.png", "record"}
    monkeypatch.setenv("DASKPATH_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="daskpath"):
        _fetch(zenodo, tmp_path, progress=True, backoff=5.0)  # Retry-After: 0 wins
    assert (tmp_path / "2_HE.png").read_bytes() == FILES["2_HE.png"]
    assert "2_HE.png: HTTP 503 Service Unavailable; retry 1 of 4 in 0.0 s" in caplog.text
    assert f"Zenodo record {RECORD}: HTTP 502; retry 1 of 4" in caplog.text
    assert re.search(r"fetch: [\d.]+ \w*B of 139\.7 KiB \(\d+%\), [\d.]+ \w*B/s, \d of 5 file",
                     caplog.text)


def test_checksum_failure_cli_one_line(zenodo, tmp_path, capsys):
    zenodo.corrupt = {"2_IHC.png"}
    dest = tmp_path / "c"
    argv = ["fetch", f"10.5281/zenodo.{RECORD}", str(dest), "--api", f"{zenodo.base}/api",
            "--no-progress"]
    assert main(["-q", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("daskpath: error: 2_IHC.png: md5 ") and "rerun" in err
    assert not (dest / "2_IHC.png").exists() and not (dest / ".2_IHC.png.part").exists()
    assert not (dest / "manifest.csv").exists()
    # default verbosity: info lines too, but no traceback and the same one error line
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("daskpath: error: 2_IHC.png") == 1


def test_http_error_stops_cleanly_and_removes_stale_manifest(zenodo, tmp_path, capsys):
    _fetch(zenodo, tmp_path)
    (tmp_path / "2_IHC.png").unlink()
    zenodo.missing = {"2_IHC.png"}
    capsys.readouterr()
    assert main(["-q", "fetch", f"zenodo:{RECORD}", str(tmp_path), "--api",
                 f"{zenodo.base}/api"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2_IHC.png: HTTP 404" in err
    assert not (tmp_path / "manifest.csv").exists()  # the earlier one is gone too
    assert not (tmp_path / "2_IHC.png").exists()


def test_sha256_checksum_and_terminal_bar(zenodo, tmp_path, monkeypatch, capsys):
    from daskpath import fetch

    zenodo.algorithm = "sha256"
    monkeypatch.setattr(fetch, "_interactive", lambda: True)
    _fetch(zenodo, tmp_path, progress=True)
    assert "fetch: 100%" in capsys.readouterr().err  # tqdm's bar
    zenodo.corrupt = {"1_HE.png"}
    (tmp_path / "1_HE.png").unlink()
    with pytest.raises(ChecksumError, match="1_HE.png: sha256 [0-9a-f]{64} does not match"):
        _fetch(zenodo, tmp_path)


def test_already_downloaded_files_skipped(zenodo, tmp_path, caplog):
    _fetch(zenodo, tmp_path)
    n = len(zenodo.requests)
    (tmp_path / "manifest.csv").unlink()
    (tmp_path / ".daskpath-fetch.json").unlink()  # verified again by hashing
    with caplog.at_level(logging.INFO, logger="daskpath"):
        manifest = _fetch(zenodo, tmp_path)
    assert [p for p, _ in zenodo.requests[n:]] == [f"/api/records/{RECORD}"]
    assert "5 file(s) already present with the right size and checksum: skipped" in caplog.text
    assert manifest.exists()
    # a file changed on disk is downloaded again
    (tmp_path / "2_HE.png").write_bytes(b"x" * len(FILES["2_HE.png"]))
    _fetch(zenodo, tmp_path)
    assert (tmp_path / "2_HE.png").read_bytes() == FILES["2_HE.png"]


def test_only_glob(zenodo, tmp_path):
    manifest = _fetch(zenodo, tmp_path, only=["2_*"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "2_HE.png", "2_IHC.png", "manifest.csv"]
    assert manifest.read_text() == "slide,he,ihc\n2,2_HE.png,2_IHC.png\n"
    with pytest.raises(InvalidInputError, match="--only nope matches none"):
        _fetch(zenodo, tmp_path, only="nope")


def test_cli_fetch_success_and_bad_source(zenodo, tmp_path, capsys):
    rc = main(["fetch", f"https://zenodo.org/records/{RECORD}", str(tmp_path), "--api",
               f"{zenodo.base}/api/", "--workers", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 slide pair(s)" in out
    assert main(["fetch", "figshare:12", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a Zenodo record" in err


def test_unknown_record_is_bad_input(zenodo, tmp_path):
    with pytest.raises(InvalidInputError, match="Zenodo record 42 not found"):
        fetch_record("zenodo:42", tmp_path, api=f"{zenodo.base}/api", progress=False)


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("source", [
    "zenodo:11218961", "ZENODO:11218961", "10.5281/zenodo.11218961",
    "doi:10.5281/zenodo.11218961", "https://doi.org/10.5281/zenodo.11218961",
    "http://dx.doi.org/10.5281/zenodo.11218961", "https://zenodo.org/records/11218961",
    "https://zenodo.org/record/11218961", "https://zenodo.org/records/11218961/files/a.png",
    "https://zenodo.org/records/11218961?preview=1", " 11218961 ",
    "https://doi.org/10.5281%2Fzenodo.11218961",
])
def test_parse_source(source):
    assert parse_source(source) == "11218961"


@pytest.mark.parametrize("source", [
    "zenodo:", "zenodo:abc", "10.1234/zenodo.11218961", "https://example.org/records/1",
    "https://zenodo.org/communities/x", "../etc/passwd", "",
])
def test_parse_source_rejects(source):
    with pytest.raises(InvalidInputError, match="not a Zenodo record"):
        parse_source(source)


@pytest.mark.parametrize("name", ["../evil.png", "/etc/passwd", "a/../../b", "C:x", "a\\b"])
def test_record_file_outside_dest_refused(name):
    with pytest.raises(UnsafePathError, match="outside the destination folder"):
        parse_record({"files": [{"key": name, "size": 1, "checksum": "md5:" + "0" * 32}]}, "1")


# ----------------------------------------------------------------------------- pairing
@pytest.mark.parametrize(("names", "rows", "unpaired"), [
    (["1_HE.png", "1_IHC.png"], [("1", "1_HE.png", "1_IHC.png")], []),
    (["HE_11.png", "IHC_11.png", "HE_2.png", "IHC_2.png"],
     [("2", "HE_2.png", "IHC_2.png"), ("11", "HE_11.png", "IHC_11.png")], []),
    (["HE_paired/HE_3.png", "IHC_paired/IHC_3.png"],
     [("3", "HE_paired/HE_3.png", "IHC_paired/IHC_3.png")], []),
    (["H&E/a.tif", "Ki67/a.tif"], [("a", "H&E/a.tif", "Ki67/a.tif")], []),
    (["he/s1.svs", "IHC/S1.svs"], [("s1", "he/s1.svs", "IHC/S1.svs")], []),
    (["x_h&e.png", "x_Ki-67.png"], [("x", "x_h&e.png", "x_Ki-67.png")], []),
    (["case 7/HE.png", "case 7/IHC.png"], [("case_7", "case 7/HE.png", "case 7/IHC.png")], []),
    (["A/HE/1.png", "A/IHC/1.png", "B/HE/1.png", "B/IHC/1.png"],
     [("A_1", "A/HE/1.png", "A/IHC/1.png"), ("B_1", "B/HE/1.png", "B/IHC/1.png")], []),
    (["1_HE.png", "1_IHC.png", "2_HE.png", "3.png", "4_HE_IHC.png", "notes.txt"],
     [("1", "1_HE.png", "1_IHC.png")], ["2_HE.png", "3.png", "4_HE_IHC.png"]),
    (["1_HE.png", "1_HE.tif", "1_IHC.png"], [], ["1_HE.png", "1_HE.tif", "1_IHC.png"]),
    (["heart_HE.png", "heart_IHC.png"], [("heart", "heart_HE.png", "heart_IHC.png")], []),
    (["HE12.png", "IHC12.png", "7HE.tif", "7ki67.tif"],
     [("7", "7HE.tif", "7ki67.tif"), ("12", "HE12.png", "IHC12.png")], []),
    (["shed_1.png", "the_1.png", "ki670_1.png"], [], ["ki670_1.png", "shed_1.png", "the_1.png"]),
    (["sl#1 (x)_HE.png", "sl#1 (x)_IHC.png"],
     [("sl_1_x", "sl#1 (x)_HE.png", "sl#1 (x)_IHC.png")], []),
    (["__MACOSX/._1_HE.png", "1_HE.png", "1_IHC.png"], [("1", "1_HE.png", "1_IHC.png")], []),
])
def test_pairing_table(names, rows, unpaired):
    got_rows, got_unpaired = pair_files(names)
    assert got_rows == rows
    assert got_unpaired == unpaired
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", r[0]) for r in got_rows)


def test_unpaired_listed_in_one_warning(zenodo, tmp_path, caplog):
    zenodo.files["3_HE.png"] = b"lonely"
    with caplog.at_level(logging.WARNING, logger="daskpath"):
        manifest = _fetch(zenodo, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("1 image file(s) not paired") and "3_HE.png" in warnings[0]
    assert len(manifest.read_text().splitlines()) == 3


# -------------------------------------------------------------------------------- zips
def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_zip_extracted_and_paired(tmp_path):
    srv = _Zenodo({"HE.zip": _zip({"HE/5.png": b"he5", "HE/6.png": b"he6"}),
                   "IHC.zip": _zip({"5.png": b"ihc5", "6.png": b"ihc6"})})
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        manifest = _fetch(srv, tmp_path)
        assert manifest.read_text() == ("slide,he,ihc\n5,HE/5.png,IHC/5.png\n"
                                        "6,HE/6.png,IHC/6.png\n")
        assert (tmp_path / "IHC" / "6.png").read_bytes() == b"ihc6"
        _fetch(srv, tmp_path)  # again: archives verified, folders kept
    finally:
        srv.shutdown()
        srv.server_close()


def test_zip_with_path_traversal_refused(tmp_path):
    archive = tmp_path / "d" / "evil.zip"
    archive.parent.mkdir()
    archive.write_bytes(_zip({"ok.png": b"1", "../evil": b"2"}))
    with pytest.raises(UnsafePathError, match=r"evil\.zip.*'\.\./evil'.*outside"):
        extract_zip(archive)
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in archive.parent.iterdir()) == ["evil.zip"]  # nothing written


def test_zip_traversal_via_cli(tmp_path, capsys):
    srv = _Zenodo({"x.zip": _zip({"../../evil_HE.png": b"1"})})
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        rc = main(["-q", "fetch", f"zenodo:{RECORD}", str(tmp_path / "d"), "--api",
                   f"{srv.base}/api"])
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "refusing" in err
    assert not (tmp_path / "evil_HE.png").exists() and not (tmp_path / "d" / "manifest.csv").exists()


def test_checksum_error_is_fetch_error_and_oserror():
    assert issubclass(ChecksumError, FetchError) and issubclass(FetchError, OSError)
    assert str(ChecksumError("a: b")) == "a: b"
