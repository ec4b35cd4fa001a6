"""``report.html``: one self-contained page a pathologist can open anywhere, offline.

Top: the run's warnings (a visible box), the run id, daskpath version and a summary of the
configuration. Then the per-slide summary (slide ratio measured on the real IHC next to every
predictor's, with the number of tiles behind each, linked to the slide's gallery), any failures
and, when a ground truth was measured, one block per predictor (``ratio_<method>`` vs
``ratio_ihc`` over kept tiles): its scores, a scatter plot with the +-0.1 band and the class
bins, and the 3-class confusion matrix.

Then per slide: the H&E and IHC thumbnails with the tile grid drawn over them and a legend
(green = kept, orange = tissue but SSIM below the threshold, magenta = artefact, no box =
background; the gallery tiles numbered), a per-tile SSIM map, maps of the per-tile ratios
(integer tile ticks), and the **tile gallery**: for the tiles :func:`gallery_tiles` picks, one
row of H&E | virtual IHC | real IHC with the StarDist outlines of both IHCs (red = Ki67
positive, cyan = negative) and the tile's ratios, SSIM and position as a caption.

Only the gallery tiles are read, from the slides (daskpath's readers) and the published layers
(``layers/<slide>.virtual.zarr`` and its labels, ``layers/<slide>.ihc-{labels,ki67}.zarr``), so a
full-size cohort reports in seconds per slide. Images are data URIs: gallery tiles and
thumbnails JPEG (the outlines a lossless PNG overlay, which a switch hides, CSS only), plots
256-colour PNG. No scripts, no network: the file can be mailed or opened from a cluster's
shared disk (4 slides x 12 gallery tiles: about 2.4 MB).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from daskpath.config import Config
from daskpath.outputs import atomic_path, format_number
from daskpath.publish import slide_key

__all__ = ["gallery_tiles", "offline_page", "write_report"]

log = logging.getLogger(__name__)

#: Tile box colours on the thumbnails.
_KEPT = "#1a9850"
_DISSIMILAR = "#fdae61"
_ARTEFACT = "#c51b7d"

#: Outline colours of the nuclei (RGB): Ki67 positive (DAB, brown) and negative (blue).
POSITIVE_RGB = (255, 32, 32)
NEGATIVE_RGB = (0, 229, 255)

#: Longest side (px) of a gallery image; JPEG quality of the gallery images.
GALLERY_PX = 240
JPEG_QUALITY = 70

#: Predictors the gallery rule ranks by, in order of preference (then any other ``ratio_*``).
_PREFERRED = ("virtual", "rf", "classifier")

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222}
main{margin:1.5em 2em;max-width:1500px}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.run{color:#555;margin-top:0}
.scroll{overflow-x:auto;max-width:100%;margin:.5em 0}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;white-space:nowrap;text-align:right}
th{background:#eee} td.l,th.l{text-align:left}
.fail{color:#b00}
.warn{border:2px solid #d73027;background:#fff3e0;padding:.6em 1em;margin:1em 0;border-radius:4px}
.warn b{color:#b00}
.note{color:#8a4b00}
img{max-width:100%}
.cfg td:first-child{text-align:left;color:#555}.cfg td{text-align:left}
.n{color:#777;font-size:11px}
.gallery{display:flex;flex-wrap:wrap;column-gap:28px}
.gallery figure{margin:0 0 1.2em 0;max-width:740px}
.row{display:flex;gap:6px;flex-wrap:wrap}
.panel{position:relative;line-height:0}
.panel img{display:block;max-width:none}
.panel img.ol{position:absolute;left:0;top:0;width:100%;height:100%;image-rendering:pixelated}
.panel .lbl{position:absolute;left:4px;top:4px;line-height:1.2;background:rgba(255,255,255,.8);
 font-size:12px;padding:1px 4px;border-radius:2px}
.panel .none{display:flex;align-items:center;justify-content:center;background:#f4f4f4;
 color:#777;font-size:12px;line-height:1.3;text-align:center}
figcaption{font-size:13px;margin-top:3px}
.key{display:inline-block;width:12px;height:12px;border:2px solid;vertical-align:middle;margin:0 3px}
#show-outlines:not(:checked)~main img.ol{display:none}
.toggle{position:fixed;right:1em;top:.6em;background:#fff;border:1px solid #ccc;padding:3px 8px;
 font-size:13px;border-radius:4px;z-index:2}
"""


# ---------------------------------------------------------------------------------- the rule
def gallery_tiles(tiles: pd.DataFrame, n_worst: int = 6, n_spread: int = 6) -> pd.DataFrame:
    """The tiles a slide's gallery shows, worst errors first.

    Among kept tiles: the ``n_worst`` with the largest ``|ratio_<p> - ratio_ihc|`` (``p`` the
    virtual IHC when it was measured, else the first other predictor with values: ``rf``,
    ``classifier``, then any ``ratio_*`` column), then ``n_spread`` of the remaining kept tiles
    spread over the range of ``ratio_ihc``: for ``n_spread`` evenly spaced values from its
    minimum to its maximum, the nearest tile not yet chosen. Without a predictor, the
    ``n_worst + n_spread`` tiles are all spread over ``ratio_ihc``; without a ground truth
    either (preprocess only), over ``ssim``. Ties go to the lower ``(slide, y0, x0)``.

    Parameters
    ----------
    tiles : pandas.DataFrame
        Rows of ``tiles.parquet`` (usually one slide's), with ``keep``, ``y0``, ``x0``.
    n_worst, n_spread : int
        How many tiles of each kind.

    Returns
    -------
    pandas.DataFrame
        The chosen rows (original index kept), worst first (by decreasing error), then the
        spread ones by increasing ``ratio_ihc``; added columns ``gallery`` (``"worst"`` or
        ``"spread"``), ``predictor`` (the ``p`` ranked by, or ``""``) and ``abs_error``.
    """
    if n_worst < 0 or n_spread < 0:
        raise ValueError(f"gallery_tiles: n_worst ({n_worst}) and n_spread ({n_spread}) must be >= 0")
    keep = tiles["keep"].astype(bool) if "keep" in tiles else pd.Series(True, index=tiles.index)
    sort_cols = [c for c in ("slide", "y0", "x0") if c in tiles.columns]
    kept = tiles[keep.to_numpy()].sort_values(sort_cols, kind="stable") if sort_cols else tiles[keep]
    truth = "ratio_ihc" if "ratio_ihc" in kept and kept["ratio_ihc"].notna().any() else None
    pred = _predictor(kept) if truth else None
    empty = kept.iloc[:0].assign(gallery=pd.Series(dtype=str), predictor=pd.Series(dtype=str),
                                 abs_error=pd.Series(dtype=float))
    if not len(kept):
        return empty
    worst = kept.iloc[:0]
    err = pd.Series(np.nan, index=kept.index)
    if pred is not None:
        err = (kept[f"ratio_{pred}"] - kept[truth]).abs()
        ok = err.notna()
        # stable sort of the position-ordered rows: equal errors keep the position order
        order = np.argsort(-err[ok].to_numpy(), kind="stable")
        worst = kept[ok.to_numpy()].iloc[order[:n_worst]]
    else:
        n_spread += n_worst
    key = truth or "ssim"
    rest = kept.drop(index=worst.index)
    rest = rest[rest[key].notna().to_numpy()] if key in rest else rest.iloc[:0]
    spread = _spread(rest, key, n_spread)
    out = pd.concat([worst.assign(gallery="worst"), spread.assign(gallery="spread")])
    out["predictor"] = pred or ""
    out["abs_error"] = err.reindex(out.index).to_numpy(np.float64)
    return out


def _predictor(kept: pd.DataFrame) -> str | None:
    """The predictor the gallery ranks by: the first of :data:`_PREFERRED` (then any other
    ``ratio_*`` column) with a value on a kept tile that also has ``ratio_ihc``."""
    names = [c.removeprefix("ratio_") for c in kept.columns
             if c.startswith("ratio_") and c != "ratio_ihc"]
    names = [n for n in _PREFERRED if n in names] + [n for n in names if n not in _PREFERRED]
    for n in names:
        if (kept[f"ratio_{n}"].notna() & kept["ratio_ihc"].notna()).any():
            return n
    return None


def _spread(rows: pd.DataFrame, key: str, n: int) -> pd.DataFrame:
    """``n`` rows whose ``key`` values are nearest to ``n`` evenly spaced targets over their
    range (each row once), sorted by ``key``."""
    if n <= 0 or not len(rows):
        return rows.iloc[:0]
    v = rows[key].to_numpy(np.float64)
    if len(rows) <= n:
        chosen = list(range(len(rows)))
    else:
        targets = np.linspace(v.min(), v.max(), n)
        free = np.ones(len(v), bool)
        chosen = []
        for t in targets:
            d = np.where(free, np.abs(v - t), np.inf)
            i = int(np.argmin(d))  # first of equals: the position order of ``rows``
            free[i] = False
            chosen.append(i)
    sub = rows.iloc[sorted(chosen)]
    return sub.iloc[np.argsort(sub[key].to_numpy(np.float64), kind="stable")]


# ------------------------------------------------------------------- pages without network
#: ``<script src=...>`` / ``<link href=...>`` that fetch from the network (http(s) or ``//``).
EXTERNAL = re.compile(r"""<(script|link)\b[^>]*\s(src|href)\s*=\s*["']?(https?:)?//""", re.IGNORECASE)
_ICON = re.compile(r"""<link\b[^>]*\brel\s*=\s*["']?(shortcut )?icon["']?[^>]*>""", re.IGNORECASE)


def offline_page(path: str | os.PathLike[str]) -> list[str]:
    """Make an HTML page (Dask's performance report) load nothing from the network.

    Its scripts must already be inline (``performance_report(mode="inline")``); a favicon
    fetched from the web (distributed's template links docs.dask.org's) is replaced by an empty
    ``data:`` one, since offline its failed request is a console error. The file is rewritten
    atomically, only when something changed.

    Returns
    -------
    list of str
        The external ``<script>`` / ``<link>`` tags still in the page (empty: offline-safe).
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8", errors="surrogateescape")
    fixed = _ICON.sub(lambda m: m.group(0) if not EXTERNAL.search(m.group(0))
                      else '<link rel="icon" href="data:,">', text)
    if fixed != text:
        tmp = atomic_path(p)
        tmp.write_text(fixed, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, p)
    return [m.group(0) for m in EXTERNAL.finditer(fixed)]


# ------------------------------------------------------------------------------- encoding
def _png(fig) -> str:
    """A figure of plots as a 256-colour PNG (flat colours and text: a third of RGBA)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_jpeg(fig) -> str:
    """A figure of photographs (the thumbnails) as JPEG: a fifth of its PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=90, bbox_inches="tight",
                pil_kwargs={"quality": JPEG_QUALITY, "optimize": True})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _jpeg(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8), "RGB").save(
        buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _outline_png(classes: np.ndarray) -> str:
    """A palette PNG of an outline image (0 transparent, 1 positive, 2 negative)."""
    from PIL import Image

    im = Image.fromarray(classes.astype(np.uint8), "P")
    im.putpalette([0, 0, 0, *POSITIVE_RGB, *NEGATIVE_RGB])
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0, optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------- gallery pixels
def _shrink(shape: tuple[int, int], px: int) -> tuple[int, int]:
    """The size ``(h, w)`` of a gallery image of a tile of ``shape``: longest side ``px``
    (never enlarged)."""
    h, w = shape
    s = max(1.0, max(h, w) / px)
    return max(1, round(h / s)), max(1, round(w / s))


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if rgb.shape[:2] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BOX))


def tile_outlines(ids: np.ndarray, classes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The nucleus outlines of a tile crop at the gallery size ``size``.

    The label crops are downsampled by nearest neighbour (each output pixel takes the label
    under its centre), then each nucleus's inner boundary is drawn there: a one-pixel ring
    inside the nucleus, its stain visible within.

    Parameters
    ----------
    ids : numpy.ndarray
        ``(h, w)`` nucleus label crop (0 background, one id per nucleus).
    classes : numpy.ndarray
        ``(h, w)`` Ki67 class crop (0 none, 1 negative, 2 positive), as the ``ki67`` labels.
    size : (int, int)
        Output size (at most the crop's).

    Returns
    -------
    numpy.ndarray
        ``size`` uint8: 0 nothing, 1 outline of a positive nucleus, 2 of a negative one.
    """
    from skimage.segmentation import find_boundaries

    h, w = ids.shape
    rows = ((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.intp)
    cols = ((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.intp)
    small = ids[np.ix_(rows, cols)]
    cls = classes[np.ix_(rows, cols)]
    edge = find_boundaries(small, mode="inner", background=0) & (small > 0)
    out = np.zeros(size, np.uint8)
    out[edge & (cls == 1)] = 2
    out[edge & (cls == 2)] = 1
    return out


class _SlidePixels:
    """Lazy access to one slide's tiles: the pair through daskpath's readers (opened once, read
    only where asked) and the published layers (zarr, read per tile)."""

    def __init__(self, out: Path, slide: str, he: str | None, ihc: str | None, cfg: Config) -> None:
        self.key = slide_key(slide)
        self.out = out
        self.cfg = cfg
        self.he_path, self.ihc_path = he, ihc
        self._src: dict[str, Any] | None = None
        self.error: str | None = None
        layers = out / "layers"
        self.virtual = layers / f"{self.key}.virtual.zarr"
        self.labels = {
            "ihc": (layers / f"{self.key}.ihc-labels.zarr", layers / f"{self.key}.ihc-ki67.zarr"),
            "virtual": (self.virtual / "labels" / "nuclei", self.virtual / "labels" / "ki67"),
        }

    def open(self) -> None:
        """Open the slide pair now (not lazily from several threads at once)."""
        self._sources()

    def _sources(self) -> dict[str, Any]:
        if self._src is None:
            self._src = {}
            if self.he_path is None or self.ihc_path is None:
                self.error = "the slide is not in the manifest"
                return self._src
            from daskpath.io import open_pair, region_source

            cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else Path(self.cfg.output_dir) / "cache"
            try:
                ds = open_pair(self.he_path, self.ihc_path, chunk_size=self.cfg.chunk_size,
                               cache_dir=cache)
                self._src = {"he": region_source(ds["he"]), "ihc": region_source(ds["ihc"])}
            except Exception as e:  # noqa: BLE001 - the report shows why, the run goes on
                self.error = f"slide files not readable ({type(e).__name__}: {e})"
        return self._src

    def rgb(self, name: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray | None:
        """RGB ``(h, w, 3)`` of ``he`` / ``ihc`` (slide files) or ``virtual`` (layer)."""
        if name == "virtual":
            from daskpath import ome

            if not ome.is_ngff(self.virtual):
                return None
            return np.moveaxis(np.asarray(ome.open_level(self.virtual, 0)[:3, y0:y1, x0:x1]), 0, -1)
        src = self._sources().get(name)
        return None if src is None else src[slice(y0, y1), slice(x0, x1)]

    def has_labels(self, name: str) -> bool:
        from daskpath import ome

        return all(ome.is_ngff(p) for p in self.labels[name])

    def label_crops(self, name: str, y0: int, y1: int, x0: int, x1: int):
        from daskpath import ome

        ids, classes = self.labels[name]
        return (np.asarray(ome.open_level(ids, 0)[y0:y1, x0:x1]),
                np.asarray(ome.open_level(classes, 0)[y0:y1, x0:x1]))


def gallery_images(pix: _SlidePixels, row: Any, px: int = GALLERY_PX) -> dict[str, Any]:
    """The three gallery images of one tile: ``{he, virtual, ihc}`` -> ``(rgb, outlines)``,
    ``rgb`` downsampled to longest side ``px`` (None when the image is absent) and
    ``outlines`` as :func:`tile_outlines` (None when the label image is absent)."""
    y0, x0 = int(row.y0), int(row.x0)
    y1, x1 = y0 + int(row.height), x0 + int(row.width)
    size = _shrink((y1 - y0, x1 - x0), px)
    out: dict[str, Any] = {}
    for name in ("he", "virtual", "ihc"):
        rgb = pix.rgb(name, y0, y1, x0, x1)
        ol = None
        if rgb is not None and name != "he" and pix.has_labels(name):
            ol = tile_outlines(*pix.label_crops(name, y0, y1, x0, x1), size)
        out[name] = (None if rgb is None else _resize_rgb(rgb, size), ol)
    return out


# ------------------------------------------------------------------------------ figures
def _tile_legend(cfg: Config, artefacts: bool, gallery: bool) -> list:
    """Legend entries of the tile boxes: kept, tissue but dissimilar, artefact, background."""
    from matplotlib.patches import Patch

    items = [
        Patch(facecolor="none", edgecolor=_KEPT, linewidth=1.2,
              label=f"kept (tissue >= {cfg.tiles.min_tissue}, SSIM >= {cfg.ssim.threshold})"),
        Patch(facecolor="none", edgecolor=_DISSIMILAR, linewidth=1.2,
              label=f"tissue, SSIM < {cfg.ssim.threshold}"),
    ]
    if artefacts:
        items.append(Patch(facecolor="none", edgecolor=_ARTEFACT, linewidth=1.6, linestyle="--",
                           label="artefact"))
    items.append(Patch(facecolor="none", edgecolor="none", label="no box: background"))
    if gallery:
        items.append(Patch(facecolor="none", edgecolor="none", label="1, 2, ...: gallery tiles"))
    return items


def _tile_axes(ax) -> None:
    """Axes of a per-tile map: tile indices, integer ticks only."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("tile x")
    ax.set_ylabel("tile y")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _has_artefact(tiles: pd.DataFrame) -> np.ndarray:
    if "artefact" not in tiles:
        return np.zeros(len(tiles), bool)
    a = tiles["artefact"].fillna("").astype(str).str.strip()
    return (a != "").to_numpy()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _slide_figure(slide: str, tiles: pd.DataFrame, layer_dir: Path, cfg: Config,
                  chosen: pd.DataFrame) -> str | None:
    import zarr
    from matplotlib.patches import Rectangle

    from daskpath import ome

    if not layer_dir.exists():
        return None
    thumb_dir = layer_dir / "thumbnails"
    if not (ome.is_ngff(thumb_dir / "he") and ome.is_ngff(thumb_dir / "ihc")):
        return None
    plt = _plt()
    step = int(dict(zarr.open_group(str(layer_dir), mode="r").attrs)
               .get("daskpath", {}).get("thumbnail_step", 1))
    thumbs = [("H&E", ome.read_image(thumb_dir / "he")),
              ("IHC", ome.read_image(thumb_dir / "ihc"))]
    art = _has_artefact(tiles)
    numbers = {(int(r.y0), int(r.x0)): i for i, r in enumerate(chosen.itertuples(), 1)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax, (title, img) in zip(axes[:2], thumbs):
        ax.imshow(img)
        ax.set_title(f"{slide} {title}")
        ax.set_axis_off()
        for r, a in zip(tiles.itertuples(), art):
            box: dict[str, Any] = {"fill": False, "linewidth": 1.2}
            if a:
                box |= {"edgecolor": _ARTEFACT, "linewidth": 1.6, "linestyle": "--"}
            elif r.tissue_fraction >= cfg.tiles.min_tissue:
                box["edgecolor"] = _KEPT if r.keep else _DISSIMILAR
            else:
                continue
            ax.add_patch(Rectangle((r.x0 / step, r.y0 / step), r.width / step, r.height / step, **box))
            n = numbers.get((int(r.y0), int(r.x0)))
            if n is not None:
                ax.text((r.x0 + r.width / 2) / step, (r.y0 + r.height / 2) / step, str(n),
                        ha="center", va="center", fontsize=8, color="black",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    size = cfg.tiles.size
    ny = int(np.ceil((tiles["y0"] + tiles["height"]).max() / size))
    nx = int(np.ceil((tiles["x0"] + tiles["width"]).max() / size))
    grid = np.full((ny, nx), np.nan)
    for r in tiles.itertuples():
        if r.tissue_fraction >= cfg.tiles.min_tissue:
            grid[r.y0 // size, r.x0 // size] = r.ssim
    axes[0].legend(handles=_tile_legend(cfg, bool(art.any()), bool(numbers)), loc="upper left",
                   bbox_to_anchor=(0, -0.02), ncol=3, fontsize=8, frameon=False, handlelength=1.2)
    im = axes[2].imshow(grid, vmin=0, vmax=1, cmap="viridis")
    axes[2].set_title(f"tile SSIM (tissue tiles; keep >= {cfg.ssim.threshold})")
    _tile_axes(axes[2])
    fig.colorbar(im, ax=axes[2], fraction=0.046, label="SSIM H&E vs IHC")
    out = _fig_jpeg(fig)
    plt.close(fig)
    return out


def _ratio_maps(slide: str, tiles: pd.DataFrame, cfg: Config) -> str | None:
    """One tile map per ratio column (kept tiles; blank elsewhere), on a shared 0-1 scale."""
    cols = [c for c in tiles.columns if c.startswith("ratio_") and tiles[c].notna().any()]
    if not cols:
        return None
    plt = _plt()
    size = cfg.tiles.size
    ny = int(np.ceil((tiles["y0"] + tiles["height"]).max() / size))
    nx = int(np.ceil((tiles["x0"] + tiles["width"]).max() / size))
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 4.6), squeeze=False)
    for ax, col in zip(axes[0], cols):
        grid = np.full((ny, nx), np.nan)
        iy = (tiles["y0"].to_numpy() // size).astype(int)
        ix = (tiles["x0"].to_numpy() // size).astype(int)
        grid[iy, ix] = tiles[col].to_numpy(np.float64)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma")
        ax.set_title(f"{slide}: {col} (kept tiles)")
        _tile_axes(ax)
        fig.colorbar(im, ax=ax, fraction=0.046, label="Ki67 area ratio" if col == cols[-1] else None)
    out = _png(fig)
    plt.close(fig)
    return out


def _predictor_figure(name: str, pred: np.ndarray, truth: np.ndarray, conf: list[list[int]]) -> str:
    """Scatter of predicted vs ground-truth tile ratios and the 3-class confusion matrix."""
    from daskpath.metrics import BINS, CLASSES

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 4.6))
    ok = np.isfinite(pred) & np.isfinite(truth)
    xs = np.linspace(0, 1, 2)
    a.fill_between(xs, xs - 0.1, xs + 0.1, color="#ddd", label="|diff| <= 0.1")
    a.plot(xs, xs, color="#888", lw=1, label="prediction = truth")
    for edge in BINS:
        a.axvline(edge, color="#bbb", lw=0.8, ls="--")
        a.axhline(edge, color="#bbb", lw=0.8, ls="--")
    a.scatter(truth[ok], pred[ok], s=10, alpha=0.7, label="kept tile")
    a.set_xlim(0, 1)
    a.set_ylim(0, 1)
    a.set_xlabel("ratio_ihc (ground truth, real IHC)")
    a.set_ylabel(f"ratio_{name}")
    a.set_title(f"{name}: {int(ok.sum())} kept tiles (dashed: class bins)")
    a.legend(loc="upper left", fontsize=8)
    m = np.asarray(conf)
    b.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            b.text(j, i, str(m[i, j]), ha="center", va="center",
                   color="white" if m[i, j] > m.max() / 2 else "black")
    b.set_xticks(range(3), CLASSES)
    b.set_yticks(range(3), CLASSES)
    b.set_xlabel("predicted class")
    b.set_ylabel("true class")
    b.set_title("3-class confusion (tiles)")
    out = _png(fig)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------- HTML
def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _scroll(table_html: str) -> str:
    """A table in a box that scrolls sideways instead of widening the page."""
    return f"<div class='scroll'>{table_html}</div>"


def _fmt(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "—" if not np.isfinite(f) else f"{f:.{digits}f}"


def _predictors(tiles: pd.DataFrame, metrics: dict | None) -> list[str]:
    if not metrics or not metrics.get("tiles"):
        return []
    parts = ["<h2 id='predictors'>Predictors vs the ground truth</h2>",
             (f"<p>Truth: {_e(metrics.get('truth', 'ratio_ihc'))}; scored on kept "
              "tiles with nuclei in both.</p>")]
    keys = ("n", "acc@0.05", "acc@0.1", "acc@0.2", "mse", "mae", "class_accuracy", "balanced_accuracy")
    rows = []
    for level in ("tiles", "slides"):
        for name, sc in (metrics.get(level) or {}).items():
            rows.append({"level": level, "predictor": name} | {k: sc.get(k, np.nan) for k in keys})
    if rows:
        parts.append(_scroll(pd.DataFrame(rows).to_html(
            index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")))
    kept = tiles[tiles["keep"]] if "keep" in tiles else tiles
    for name, sc in metrics["tiles"].items():
        conf = (sc.get("confusion") or {}).get("rows_truth_cols_pred")
        if conf is None or f"ratio_{name}" not in kept or "ratio_ihc" not in kept:
            continue
        img = _predictor_figure(name, kept[f"ratio_{name}"].to_numpy(np.float64),
                                kept["ratio_ihc"].to_numpy(np.float64), conf)
        parts.append(f"<img alt='{_e(name)}' src='data:image/png;base64,{img}'>")
    return parts


def _config_summary(cfg: Config, run_id: str | None) -> str:
    from daskpath import __version__

    stages = list(cfg.stages)
    rows = [("run id", run_id or "unknown"), ("daskpath", __version__),
            ("written", time.strftime("%Y-%m-%d %H:%M:%S")),
            ("stages", ", ".join(stages)),
            ("tiles.size", f"{cfg.tiles.size} px"), ("tiles.min_tissue", cfg.tiles.min_tissue),
            ("ssim.threshold", cfg.ssim.threshold), ("tissue.threshold", cfg.tissue.threshold),
            ("chunk_size", cfg.chunk_size or "aligned to the files' tiles")]
    reg = getattr(cfg, "registration", None)
    if reg is not None and hasattr(reg, "enabled"):
        rows.append(("registration", f"on (max_shift {reg.max_shift} px)" if reg.enabled else "off"))
    if "nuclei" in stages or "translate" in stages:
        n = cfg.nuclei
        rows.append(("nuclei.model", n.model))
        rows.append(("nuclei", (f"method {n.method}, dab_threshold {n.dab_threshold}, "
                                f"stain_matrix {n.stain_matrix}")))
    if "translate" in stages:
        rows.append(("translate.model", cfg.translate.model))
    if "baselines" in stages:
        b = cfg.baselines
        models = {"rf": b.rf_model, "classifier": b.classifier_model}
        rows.append(("baselines", ", ".join(f"{m} ({models.get(m, '?')})" for m in b.methods)))
    rows.append(("cluster.kind", cfg.cluster.kind))
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<div class='scroll'><table class='cfg'>{body}</table></div>"


def _count_cell(row: Any, kept: pd.DataFrame, col: str) -> str:
    """A slide value and the number of kept tiles with a value behind it."""
    n = int(kept[col].notna().sum()) if col in kept else 0
    return f"<td>{_fmt(getattr(row, col, np.nan))} <span class='n'>n={n}</span></td>"


def _summary_table(tiles: pd.DataFrame, slides: pd.DataFrame, galleries: set[str]) -> str:
    """Per slide: the slide ratio on the real IHC and each predictor's, with the kept tiles
    behind each value, the slide's note and a link to its gallery."""
    preds = [c.removeprefix("ratio_") for c in slides.columns
             if c.startswith("ratio_") and c != "ratio_ihc"]
    head = ["<th class='l'>slide</th>", "<th>tiles kept / total</th>"]
    if "ratio_ihc" in slides:
        head.append("<th>ratio_ihc (truth)</th>")
    for p in preds:
        head.append(f"<th>ratio_{_e(p)}</th>")
        if "ratio_ihc" in slides:
            head.append(f"<th>|{_e(p)} − ihc|</th>")
    head += ["<th class='l'>note</th>", "<th class='l'>gallery</th>"]
    rows = []
    for s in slides.itertuples(index=False):
        slide = str(s.slide)
        t = tiles[(tiles["slide"] == slide) & tiles["keep"].astype(bool)] if len(tiles) else tiles

        cells = [f"<td class='l'>{_e(slide)}</td>",
                 f"<td>{_e(getattr(s, 'tiles_kept', len(t)))} / {_e(getattr(s, 'tiles_total', '?'))}</td>"]
        truth = getattr(s, "ratio_ihc", np.nan) if "ratio_ihc" in slides else None
        if truth is not None:
            cells.append(_count_cell(s, t, "ratio_ihc"))
        for p in preds:
            cells.append(_count_cell(s, t, f"ratio_{p}"))
            if truth is not None:
                cells.append(f"<td>{_fmt(abs(float(getattr(s, f'ratio_{p}')) - float(truth)))}</td>")
        note = getattr(s, "note", "")
        note = "" if not isinstance(note, str) else note
        cells.append(f"<td class='l note'>{_e(note)}</td>")
        anchor = f"slide-{slide_key(slide)}"
        link = (f"<a href='#{anchor}'>gallery</a>" if slide in galleries
                else f"<a href='#{anchor}'>slide</a>")
        cells.append(f"<td class='l'>{link}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _scroll("<table class='summary'><thead><tr>" + "".join(head) + "</tr></thead><tbody>"
                   + "".join(rows) + "</tbody></table>")


def _panel(rgb: np.ndarray | None, outlines: np.ndarray | None, label: str, why: str,
           size: tuple[int, int]) -> str:
    if rgb is None:
        return (f"<div class='panel'><div class='none' style='width:{size[1]}px;height:{size[0]}px'>"
                f"{_e(label)}<br>{_e(why)}</div></div>")
    h, w = rgb.shape[:2]
    parts = [(f"<div class='panel'><img class='gal' width='{w}' height='{h}' alt='{_e(label)}' "
              f"src='data:image/jpeg;base64,{_jpeg(rgb)}'>")]
    if outlines is not None:
        parts.append(f"<img class='ol' alt='' src='data:image/png;base64,{_outline_png(outlines)}'>")
    parts.append(f"<span class='lbl'>{_e(label)}</span></div>")
    return "".join(parts)


def _caption(i: int, r: Any, tiles_cols: Sequence[str], size: int) -> str:
    bits = [f"<b>{i}</b> ({_e(r.gallery)}"
            + (f", by |{_e(r.predictor)} − ihc| = {_fmt(r.abs_error)}" if r.gallery == "worst" else "")
            + ")",
            (f"tile ({int(r.y0) // size}, {int(r.x0) // size}) at y={int(r.y0)}, x={int(r.x0)} px, "
             f"{int(r.height)}×{int(r.width)} px")]
    ratios = [f"{c.removeprefix('ratio_')} {_fmt(getattr(r, c))}" for c in tiles_cols
              if c.startswith("ratio_")]
    if ratios:
        bits.append("ratio: " + ", ".join(ratios))
    if "ki67_index_ihc" in tiles_cols:
        bits.append(f"Ki67 index ihc {_fmt(r.ki67_index_ihc)}")
    bits.append(f"SSIM H&amp;E–IHC {_fmt(r.ssim)}")
    if "ssim_virtual" in tiles_cols:
        bits.append(f"SSIM virtual–IHC {_fmt(r.ssim_virtual)}")
    if "dy" in tiles_cols and "dx" in tiles_cols:
        bits.append(f"registration residual dy={_fmt(r.dy, 1)}, dx={_fmt(r.dx, 1)} px")
    if "artefact" in tiles_cols and isinstance(r.artefact, str) and r.artefact.strip():
        bits.append(f"<span class='note'>artefact: {_e(r.artefact)}</span>")
    return "<figcaption>" + " · ".join(bits) + "</figcaption>"


def _gallery(slide: str, chosen: pd.DataFrame, pix: _SlidePixels, cfg: Config, px: int) -> list[str]:
    parts = ["<h3>Tile gallery</h3>"]
    if not len(chosen):
        return parts + ["<p>No kept tile: nothing to show.</p>"]
    pred = chosen["predictor"].iloc[0]
    rule = (f"the {int((chosen['gallery'] == 'worst').sum())} kept tiles with the largest "
            f"|ratio_{_e(pred)} − ratio_ihc|, then tiles spread over the ratio_ihc range"
            if pred else "kept tiles spread over the "
            + ("ratio_ihc" if "ratio_ihc" in chosen and chosen["ratio_ihc"].notna().any() else "SSIM")
            + " range (no predictor measured)")
    parts.append(f"<p>Shown: {rule}. H&amp;E | virtual IHC | real IHC, "
                 f"downsampled to {px} px; outlines "
                 f"<span class='key' style='border-color:rgb{POSITIVE_RGB}'></span>Ki67 positive "
                 f"<span class='key' style='border-color:rgb{NEGATIVE_RGB}'></span>negative "
                 f"(StarDist label images).</p>")
    missing = []
    if "translate" not in cfg.stages or not pix.virtual.exists():
        missing.append("no virtual IHC (stage translate not run)")
    elif not pix.has_labels("virtual"):
        missing.append("virtual IHC without nucleus labels: no outlines")
    if not pix.has_labels("ihc"):
        missing.append("real IHC without nucleus labels (stage nuclei not run, or nuclei.method "
                       "two-channel): no outlines")
    if missing:
        parts.append("<p class='note'>" + "; ".join(_e(m) for m in missing) + ".</p>")
    cols = list(chosen.columns)
    parts.append("<div class='gallery'>")
    rows = list(chosen.itertuples())
    pix.open()  # once, before the threads
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # reads and codecs drop the GIL
        futures = [pool.submit(gallery_images, pix, r, px) for r in rows]
    for i, (r, fut) in enumerate(zip(rows, futures), 1):
        size = _shrink((int(r.height), int(r.width)), px)
        try:
            imgs = fut.result()
        except Exception as e:  # noqa: BLE001 - one unreadable tile does not lose the report
            log.warning("report: %s tile y=%s x=%s not shown: %s", slide, r.y0, r.x0, e)
            parts.append(f"<figure><p class='note'>tile not readable: {_e(e)}</p>"
                         f"{_caption(i, r, cols, cfg.tiles.size)}</figure>")
            continue
        why = {"he": pix.error or "not readable", "ihc": pix.error or "not readable",
               "virtual": "not computed"}
        row = "".join(_panel(imgs[k][0], imgs[k][1], lab, why[k], size)
                      for k, lab in (("he", "H&E"), ("virtual", "virtual IHC"), ("ihc", "real IHC")))
        parts.append(f"<figure id='tile-{_e(pix.key)}-{int(r.y0)}-{int(r.x0)}'>"
                     f"<div class='row'>{row}</div>{_caption(i, r, cols, cfg.tiles.size)}</figure>")
    parts.append("</div>")
    return parts


def _manifest(cfg: Config, manifest: pd.DataFrame | None) -> dict[str, tuple[str, str]]:
    """slide -> (he, ihc) paths: the ``manifest`` given, else the config's manifest file."""
    if manifest is None:
        if not cfg.slides:
            return {}
        try:
            from daskpath.io import read_manifest

            manifest = read_manifest(cfg.slides)
        except Exception as e:  # noqa: BLE001 - a gallery without slide pixels, said so
            log.warning("report: manifest %s not readable (%s): gallery without slide pixels",
                        cfg.slides, e)
            return {}
    return {str(r.slide): (str(r.he), str(r.ihc)) for r in manifest.itertuples(index=False)}


def write_report(
    output_dir: str | Path,
    tiles: pd.DataFrame,
    slides: pd.DataFrame,
    failures: pd.DataFrame,
    cfg: Config,
    metrics: dict | None = None,
    run_id: str | None = None,
    warnings: Sequence[str] = (),
    *,
    manifest: pd.DataFrame | None = None,
    gallery: tuple[int, int] = (6, 6),
    gallery_px: int = GALLERY_PX,
) -> Path:
    """Write ``output_dir/report.html`` (atomically) and return its path.

    Parameters
    ----------
    output_dir : path
        The folder holding (or linking) the run's ``layers/``; the report is written there.
    tiles, slides, failures : pandas.DataFrame
        The run's ``tiles.parquet``, ``slides.csv`` and failures tables.
    cfg : Config
        The run's configuration (header summary, thresholds, manifest, cache folder).
    metrics : dict, optional
        The content of ``metrics.json`` (predictor scores), when there is one.
    run_id : str, optional
        The run the report belongs to (as ``run.json`` names it).
    warnings : sequence of str
        Run-level warnings, shown in a box at the top (e.g. a phantom-trained model used on
        slides that are not phantoms).
    manifest : pandas.DataFrame, optional
        ``slide, he, ihc`` of the run (default: read from ``cfg.slides``): where the gallery
        reads the H&E and IHC pixels of its tiles.
    gallery : (int, int)
        ``(n_worst, n_spread)`` of :func:`gallery_tiles`, per slide.
    gallery_px : int
        Longest side of a gallery image, px.
    """
    out = Path(output_dir)
    t_start = time.perf_counter()
    n_kept = int(tiles["keep"].sum()) if len(tiles) and "keep" in tiles else 0
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>daskpath report {_e(run_id or '')}</title><style>{_CSS}</style></head><body>",
        "<input type='checkbox' id='show-outlines' checked hidden>",
        "<label class='toggle' for='show-outlines'>nuclei outlines on/off</label>",
        "<main>",
        "<h1>daskpath report</h1>",
        f"<p class='run'>run {_e(run_id or 'unknown')} &middot; daskpath {_e(_version())}</p>",
    ]
    if warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
        parts.append(f"<div class='warn' role='alert'><b>Warning</b><ul>{items}</ul></div>")
    parts.append(_config_summary(cfg, run_id))
    parts.append(
        f"<p>{len(slides)} slide(s) done, {len(failures)} failed; {len(tiles)} tiles, "
        f"{n_kept} kept (tissue &ge; {cfg.tiles.min_tissue}, SSIM &ge; {cfg.ssim.threshold}, "
        f"tiles of {cfg.tiles.size} px).</p>")
    paths = _manifest(cfg, manifest) if len(slides) else {}
    chosen: dict[str, pd.DataFrame] = {}
    for slide in slides.get("slide", []):
        t = tiles[tiles["slide"] == slide] if len(tiles) else tiles
        chosen[slide] = gallery_tiles(t, *gallery) if len(t) else pd.DataFrame()
    if len(slides):
        parts.append("<h2>Slides</h2>")
        parts.append("<p>Slide ratios are area-weighted over kept tiles; <span class='n'>n</span> "
                     "= kept tiles with a value.</p>")
        parts.append(_summary_table(tiles, slides, {s for s, c in chosen.items() if len(c)}))
        parts.append("<details><summary>all columns of slides.csv</summary>")
        parts.append(_scroll(slides.to_html(index=False, float_format=format_number, na_rep="—")))
        parts.append("</details>")
    if len(failures):
        parts.append("<h2 class='fail'>Failures</h2>")
        parts.append(_scroll(failures.to_html(index=False, classes="fail")))
    parts += _predictors(tiles, metrics)
    for slide in slides.get("slide", []):
        t = tiles[tiles["slide"] == slide] if len(tiles) else tiles
        key = slide_key(str(slide))
        parts.append(f"<h2 id='slide-{_e(key)}'>{_e(slide)}</h2>")
        note = slides.loc[slides["slide"] == slide, "note"].iloc[0] if "note" in slides else ""
        if isinstance(note, str) and note:
            parts.append(f"<p class='note'>Note: {_e(note)}</p>")
        img = _slide_figure(str(slide), t, out / "layers" / f"{key}.zarr", cfg, chosen[slide]) \
            if len(t) else None
        if img:
            parts.append(f"<img alt='{_e(slide)}' src='data:image/jpeg;base64,{img}'>")
        else:
            parts.append("<p>(no layers written: layers.downsample is 0)</p>")
        maps = _ratio_maps(str(slide), t, cfg) if len(t) else None
        if maps:
            parts.append(f"<img alt='{_e(slide)} ratios' src='data:image/png;base64,{maps}'>")
        he, ihc = paths.get(str(slide), (None, None))
        pix = _SlidePixels(out, str(slide), he, ihc, cfg)
        parts += _gallery(str(slide), chosen[slide], pix, cfg, gallery_px)
    parts.append(f"<p class='run'>report written in {time.perf_counter() - t_start:.1f} s</p>")
    parts.append("</main></body></html>")
    path = out / "report.html"
    tmp = atomic_path(path)
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _version() -> str:
    from daskpath import __version__

    return __version__
