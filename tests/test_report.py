"""report.html and the Dask performance report: what they show, and that they work offline.

One small run (the session's two 2048 px phantom pairs, 512 px tiles, stages preprocess +
nuclei + translate) feeds every test that needs outputs; the gallery rule is also tested on
hand-made tables. The browser tests drive Debian's ``chromium`` (``make install`` installs it
where apt is available) headless over the DevTools protocol with networking blocked, and fail
on any console error, uncaught exception or request that leaves the file.
"""

from __future__ import annotations

import base64
import contextlib
import html.parser
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daskpath.report import GALLERY_PX, gallery_tiles

# --------------------------------------------------------------------------- the gallery rule


def _table(n=30, seed=0, **cols):
    rng = np.random.default_rng(seed)
    t = pd.DataFrame({
        "slide": "s", "y0": (np.arange(n) // 6) * 512, "x0": (np.arange(n) % 6) * 512,
        "height": 512, "width": 512, "tissue_fraction": 0.9, "ssim": rng.uniform(0.4, 0.9, n),
        "keep": True, "ratio_ihc": rng.uniform(0, 1, n),
    })
    for k, v in cols.items():
        t[k] = v
    return t


def test_gallery_worst_then_spread_over_kept_tiles():
    t = _table()
    t["ratio_virtual"] = t["ratio_ihc"] + np.linspace(-0.3, 0.29, len(t))
    t.loc[[0, 29], "keep"] = False  # the two largest errors are not kept: not shown
    t.loc[3, "ratio_virtual"] = np.nan  # no prediction: never "worst"
    g = gallery_tiles(t)
    kept = t[t.keep]
    err = (kept.ratio_virtual - kept.ratio_ihc).abs().dropna().sort_values(ascending=False)
    worst = g[g.gallery == "worst"]
    assert list(worst.index) == list(err.index[:6])
    assert (worst.predictor == "virtual").all()
    np.testing.assert_allclose(worst.abs_error, err.iloc[:6])
    spread = g[g.gallery == "spread"]
    assert len(spread) == 6 and not set(spread.index) & set(worst.index)
    assert spread.keep.all() and spread.ratio_ihc.is_monotonic_increasing
    rest = kept.drop(index=worst.index)
    # the ends of the range are shown, and the picks are each the nearest to an even target
    assert spread.ratio_ihc.iloc[0] == rest.ratio_ihc.min()
    assert spread.ratio_ihc.iloc[-1] == rest.ratio_ihc.max()
    targets = np.linspace(rest.ratio_ihc.min(), rest.ratio_ihc.max(), 6)
    assert np.abs(spread.ratio_ihc.to_numpy() - targets).max() <= np.diff(targets)[0] / 2
    assert list(g.gallery) == ["worst"] * 6 + ["spread"] * 6


def test_gallery_fallbacks():
    t = _table(ratio_rf=0.5)
    t["ratio_classifier"] = t["ratio_ihc"]  # rf comes first in the preference order
    g = gallery_tiles(t)
    assert (g.predictor == "rf").all() and (g.gallery == "worst").sum() == 6
    t["ratio_virtual"] = np.nan  # virtual stage ran, but no value on a kept tile: next one
    assert (gallery_tiles(t).predictor == "rf").all()
    g = gallery_tiles(_table(), n_worst=4, n_spread=3)  # no predictor: all spread over the truth
    assert len(g) == 7 and (g.gallery == "spread").all() and (g.predictor == "").all()
    assert g.ratio_ihc.is_monotonic_increasing
    g = gallery_tiles(_table().drop(columns="ratio_ihc"))  # preprocess only: over SSIM
    assert len(g) == 12 and g.ssim.is_monotonic_increasing
    few = _table(n=5, ratio_virtual=0.2)
    assert sorted(gallery_tiles(few).index) == list(range(5))  # fewer kept tiles than asked
    assert gallery_tiles(_table(keep=False)).empty
    tie = _table(n=12, ratio_virtual=0.0)
    tie["ratio_ihc"] = 0.5  # equal errors: the first tiles by position
    assert list(gallery_tiles(tie, n_worst=3, n_spread=0).index) == [0, 1, 2]
    with pytest.raises(ValueError, match="n_worst"):
        gallery_tiles(t, n_worst=-1)


# ------------------------------------------------------------------------------ one run
@pytest.fixture(scope="module")
def reported(synth_cohort, dask_client, tmp_path_factory):
    pytest.importorskip("stardist")
    pytest.importorskip("torch")
    from daskpath.config import load_config
    from daskpath.pipeline import run

    out = tmp_path_factory.mktemp("report")
    cfg = load_config(None, [f"slides={synth_cohort}", f"output_dir={out / 'run'}",
                             "tiles.size=512", "chunk_size=512",
                             "stages=[preprocess, nuclei, translate]"])
    perf = out / "perf.html"
    res = run(cfg, client=dask_client, performance_report=perf)
    assert res.ok, res.failures
    return res, perf


class _Imgs(html.parser.HTMLParser):
    """The report's gallery: per figure id, its <img> attributes in order."""

    def __init__(self):
        super().__init__()
        self.figures: dict[str, list[dict]] = {}
        self._fig = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and a.get("id", "").startswith("tile-"):
            self._fig = a["id"]
            self.figures[self._fig] = []
        elif tag == "img" and self._fig is not None:
            self.figures[self._fig].append(a)

    def handle_endtag(self, tag):
        if tag == "figure":
            self._fig = None


def _gallery_of(report: Path) -> dict[str, list[dict]]:
    p = _Imgs()
    p.feed(report.read_text())
    return p.figures


@pytest.mark.slow  # the module's pipeline run: ~1-2 min on 2 cores
def test_gallery_shows_the_tiles_the_rule_picks(reported):
    res, _ = reported
    out = res.output_dir
    tiles = pd.read_parquet(out / "tiles.parquet")  # the published table, not the result object
    figures = _gallery_of(out / "report.html")
    expected = []
    for slide in pd.read_csv(out / "slides.csv").slide:
        g = gallery_tiles(tiles[tiles.slide == slide])
        assert len(g) == min(12, int(tiles[tiles.slide == slide].keep.sum())) > 0
        expected += [f"tile-{slide}-{r.y0}-{r.x0}" for r in g.itertuples()]
    assert list(figures) == expected
    for imgs in figures.values():  # H&E | virtual | real, outlines over both IHCs
        gal = [i for i in imgs if i.get("class") == "gal"]
        assert [i["alt"] for i in gal] == ["H&E", "virtual IHC", "real IHC"]
        assert all(i["src"].startswith("data:image/jpeg;base64,") for i in gal)
        assert all(max(int(i["width"]), int(i["height"])) == GALLERY_PX for i in gal)
        assert sum(i.get("class") == "ol" for i in imgs) == 2
    text = (out / "report.html").read_text()
    assert "ratio: ihc" in text and "SSIM virtual–IHC" in text  # captions
    for slide in res.slides.slide:  # summary row links to the gallery
        assert f"href='#slide-{slide}'" in text and f"id='slide-{slide}'" in text


def _decode_png(src: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["real IHC", "virtual IHC"])
def test_outlines_are_drawn_where_the_nuclei_table_says(reported, which):
    """The outline overlay of every gallery tile against nuclei/<slide>[.virtual].parquet:
    each nucleus of the tile is outlined in its class's colour around its centroid, and every
    outline pixel of a colour lies on a nucleus of that class."""
    from scipy.spatial import cKDTree

    res, _ = reported
    out = res.output_dir
    tiles = pd.read_parquet(out / "tiles.parquet")
    checked = 0
    for fid, imgs in _gallery_of(out / "report.html").items():
        slide, y0, x0 = fid.removeprefix("tile-").rsplit("-", 2)
        y0, x0 = int(y0), int(x0)
        row = tiles[(tiles.slide == slide) & (tiles.y0 == y0) & (tiles.x0 == x0)].iloc[0]
        i = next(k for k, im in enumerate(imgs) if im.get("alt") == which)
        ol = _decode_png(imgs[i + 1]["src"])  # palette indices: 1 positive, 2 negative
        scale = row.height / ol.shape[0]
        suffix = "" if which == "real IHC" else ".virtual"
        nuc = pd.read_parquet(out / "nuclei" / f"{slide}{suffix}.parquet")
        ny, nx = (nuc.y.to_numpy() - y0) / scale, (nuc.x.to_numpy() - x0) / scale
        radius = np.sqrt(nuc.area.to_numpy() / np.pi) / scale
        for cls, positive in ((1, True), (2, False)):
            sel = nuc.positive.to_numpy() == positive
            pix = np.argwhere(ol == cls) + 0.5
            if not sel.any():
                assert not len(pix)
                continue
            tree = cKDTree(np.c_[ny[sel], nx[sel]])
            if len(pix):  # every outline pixel on a nucleus of its class
                d, j = tree.query(pix)
                assert (d <= radius[sel][j] * 1.6 + 1.5).mean() >= 0.99, (fid, which, cls)
            inside = sel & (ny > 3) & (nx > 3) & (ny < ol.shape[0] - 3) & (nx < ol.shape[1] - 3)
            if inside.any():  # every nucleus of the tile outlined in its colour
                found = cKDTree(pix).query(np.c_[ny[inside], nx[inside]])[0] if len(pix) else \
                    np.full(int(inside.sum()), np.inf)
                assert (found <= radius[inside] + 1.5).mean() >= 0.97, (fid, which, cls)
                checked += int(inside.sum())
    assert checked > 50


@pytest.mark.slow  # the module's pipeline run: ~1-2 min on 2 cores
def test_report_is_self_contained_and_small(reported):
    res, _ = reported
    report = res.output_dir / "report.html"
    text = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<script" not in text and "<link" not in text
    # a budget of 50 kB per gallery tile (3 JPEGs, 2 outline overlays, caption), 100 kB per
    # slide (thumbnails, maps) and 200 kB for the rest: 3 MB for 4 slides x 12 tiles
    n_tiles = text.count("<figure id='tile-")
    assert n_tiles >= 10
    budget = 50e3 * n_tiles + 100e3 * len(res.slides) + 200e3
    assert report.stat().st_size < budget, (report.stat().st_size, budget)
    assert "run " + json.loads((res.output_dir / "run.json").read_text())["run_id"] in text
    assert "tiles.size" in text and "translate.model" in text and "nuclei.model" in text


@pytest.mark.slow  # the module's pipeline run: ~1-2 min on 2 cores
def test_report_warnings_notes_artefacts_and_missing_layers(reported, tmp_path):
    """The lead's inputs: run warnings in a box, slide notes, an ``artefact`` column and the
    registration residual ``dy``/``dx`` in captions; a folder without label images or virtual
    layer still gives a gallery, saying what is missing."""
    from daskpath.report import _tile_legend, write_report

    res, _ = reported
    out = res.output_dir
    tiles = pd.read_parquet(out / "tiles.parquet")
    slides = pd.read_csv(out / "slides.csv", keep_default_na=False)
    slide = slides.slide[0]
    g = gallery_tiles(tiles[tiles.slide == slide])
    tiles["artefact"] = ""
    tiles.loc[g.index[0], "artefact"] = "pen,fold"
    tiles["dy"], tiles["dx"] = 1.25, -0.5
    slides.loc[0, "note"] = "two sections of different blocks?"
    folder = tmp_path / "o"
    (folder / "layers").mkdir(parents=True)
    for p in (out / "layers").glob("*.zarr"):
        if p.name.endswith(".virtual.zarr"):
            continue  # no virtual layer: gallery panel says so
        if "ihc-" not in p.name:
            os.symlink(p.resolve(), folder / "layers" / p.name)  # no label images either
    warn = "phantom-trained model stardist_phantom used on slides that are not phantoms (s1, s2)"
    path = write_report(folder, tiles, slides, pd.DataFrame(), res_cfg(out), warnings=[warn])
    text = path.read_text()
    assert text.index("class='warn'") < text.index("<h2>Slides</h2>") and warn in text
    assert "two sections of different blocks?" in text
    assert "artefact: pen,fold" in text and "dy=1.2, dx=-0.5 px" in text
    assert "no virtual IHC" in text and "no outlines" in text
    figures = _gallery_of(path)
    assert len(figures) == len(g) + len(gallery_tiles(tiles[tiles.slide == slides.slide[1]]))
    assert all(not any(i.get("class") == "ol" for i in imgs) for imgs in figures.values())
    labels = [h.get_label() for h in _tile_legend(res_cfg(out), artefacts=True, gallery=True)]
    assert any(lab.startswith("kept") for lab in labels) and "artefact" in labels
    assert any("SSIM <" in lab for lab in labels)


def res_cfg(out: Path):
    from daskpath.config import load_config

    return load_config(out / "config.yaml")


# ------------------------------------------------------------------------- headless browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("no chromium on PATH: `make install` installs Debian's chromium (apt-get "
                "install chromium) where it runs as root")


_EXEC_WITH_PIPE = (
    "import fcntl, os, sys\n"
    "r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1:3])\n"
    "os.dup2(r, 3)\n"
    "os.dup2(w, 4)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


class _Browser:
    """Headless chromium driven over the DevTools protocol on a pipe (no ports, no
    websockets), networking blocked: every console message, exception, log entry and request."""

    def __init__(self, tmp: Path):
        r_cmd, self._w = os.pipe()
        self._r, w_ev = os.pipe()
        args = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                "--remote-debugging-pipe", "--proxy-server=127.0.0.1:9",
                "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp / 'profile'}",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                "about:blank"]
        # the pipe's ends become fds 3 (commands) and 4 (events) of chromium: set by a small
        # exec wrapper (no preexec_fn: this process has threads), moved high first so that
        # neither end is overwritten by the other's dup2
        with open(tmp / "chromium.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _EXEC_WITH_PIPE, str(r_cmd),
                                          str(w_ev), *args], pass_fds=(r_cmd, w_ev),
                                         stdout=subprocess.DEVNULL, stderr=log)
        os.close(r_cmd)
        os.close(w_ev)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session = None
        target = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=target["targetId"],
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def _read(self, timeout: float) -> dict | None:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                return None
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe (see chromium.log)")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self._read(end - time.monotonic())
            if m is None:
                break
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)
        raise TimeoutError(f"chromium: no answer to {method} in {timeout} s")

    def wait_event(self, method: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            m = self._read(end - time.monotonic())
            if m is None:
                raise TimeoutError(f"chromium: no {method} in {timeout} s")
            self.events.append(m)

    def eval(self, js: str):
        r = self.call("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{js[:60]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, path: Path, ready: str = "true", timeout: float = 60) -> None:
        """Load ``path``, wait for the load event and for the JS condition ``ready``."""
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_event("Page.loadEventFired", timeout)
        end = time.monotonic() + timeout
        while not self.eval(f"Boolean({ready})"):
            if time.monotonic() > end:
                raise TimeoutError(f"page not ready ({ready}) in {timeout} s")
            time.sleep(0.2)
        time.sleep(0.5)  # late errors (timers, image decoding) still reach the event list

    def errors(self) -> list[str]:
        """Console errors and assertions, uncaught exceptions, error log entries, failed loads."""
        self.call("Runtime.evaluate", expression="1")  # drain what arrived meanwhile
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')} "
                           f"{p['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> np.ndarray:
        from PIL import Image

        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return np.asarray(Image.open(path).convert("RGB"))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing anyway
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture
def browser(tmp_path):
    b = _Browser(tmp_path)
    yield b
    b.close()


def _offline(urls: list[str], page: Path) -> list[str]:
    """Requests that are neither the page itself nor a data: URI."""
    return [u for u in urls if not u.startswith("data:") and u != page.resolve().as_uri()]


@pytest.mark.slow  # the module's pipeline run: ~1-2 min on 2 cores
def test_report_renders_offline_in_headless_chromium(reported, browser, tmp_path):
    res, _ = reported
    report = res.output_dir / "report.html"
    browser.open(report, ready="Array.from(document.images).every(i => i.complete)")
    assert browser.errors() == []
    assert _offline(browser.requests(), report) == []
    gal = browser.eval("Array.from(document.querySelectorAll('figure img.gal'))"
                       ".map(i => [i.alt, i.naturalWidth, i.naturalHeight])")
    n = sum(len(gallery_tiles(res.tiles[res.tiles.slide == s])) for s in res.slides.slide)
    assert len(gal) == 3 * n and all(w > 0 and h > 0 for _, w, h in gal)  # decoded
    assert browser.eval("document.querySelectorAll('figure img.ol').length") == 2 * n
    shot = browser.screenshot(tmp_path / "report.png")
    assert shot.shape[0] >= 600 and shot.std() > 10  # not a blank page
    # the gallery on screen: scroll to the first figure and check it is drawn
    browser.eval("document.querySelector('figure').scrollIntoView()")
    shot = browser.screenshot(tmp_path / "gallery.png")
    assert shot[:300].std() > 10


@pytest.mark.slow  # the module's pipeline run: ~1-2 min on 2 cores
def test_performance_report_renders_offline(reported, browser):
    _, perf = reported
    text = perf.read_text()
    assert "Dask Performance Report" in text
    assert not re.search(r"""<script[^>]*\ssrc\s*=\s*["']?(https?:)?//""", text)
    assert "cdn.bokeh.org" not in text
    # Bokeh renders its plots into shadow roots: canvases there mean the root was drawn
    canvases = ("(() => {let n = 0; const walk = r => r.querySelectorAll('*').forEach(e => "
                "{if (e.shadowRoot) {n += e.shadowRoot.querySelectorAll('canvas').length; "
                "walk(e.shadowRoot);}}); walk(document); return n;})()")
    browser.open(perf, ready=f"window.Bokeh && Bokeh.documents.length > 0 && {canvases} > 0")
    assert browser.errors() == []
    assert _offline(browser.requests(), perf) == []
    assert browser.eval("Bokeh.documents[0].roots().length") >= 1
