"""``report.html``: a self-contained page a person can look at.

First the cohort: the slide table, any failures and, when a ground truth was measured, one
block per predictor (``ratio_<method>`` vs ``ratio_ihc`` over kept tiles): its scores, a
scatter plot with the +-0.1 band and the class bins, and the 3-class confusion matrix. Then per
slide: the H&E and IHC thumbnails with the tile grid drawn over them and a legend (green = kept,
orange = tissue but SSIM below the threshold, no box = background), a per-tile SSIM map, and
maps of the per-tile ratios (ground truth and each predictor), tiles numbered on integer ticks.
Images are embedded as base64 PNG so the file can be mailed or opened from a cluster's shared disk.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from daskpath.config import Config
from daskpath.outputs import atomic_path, format_number
from daskpath.publish import slide_key

__all__ = ["write_report"]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


#: Tile box colours on the thumbnails.
_KEPT = "#1a9850"
_DISSIMILAR = "#fdae61"


def _tile_legend(cfg: Config) -> list:
    """Legend entries of the tile boxes: kept, tissue but dissimilar, background (no box)."""
    from matplotlib.patches import Patch

    return [
        Patch(facecolor="none", edgecolor=_KEPT, linewidth=1.2,
              label=f"kept (tissue >= {cfg.tiles.min_tissue}, SSIM >= {cfg.ssim.threshold})"),
        Patch(facecolor="none", edgecolor=_DISSIMILAR, linewidth=1.2,
              label=f"tissue, SSIM < {cfg.ssim.threshold}"),
        Patch(facecolor="none", edgecolor="none", label="no box: background"),
    ]


def _tile_axes(ax) -> None:
    """Axes of a per-tile map: tile indices, integer ticks only."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("tile x")
    ax.set_ylabel("tile y")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _slide_figure(slide: str, tiles: pd.DataFrame, layer_dir: Path, cfg: Config) -> str | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import zarr
    from matplotlib.patches import Rectangle

    if not layer_dir.exists():
        return None
    from daskpath import ome

    thumb_dir = layer_dir / "thumbnails"
    if not (ome.is_ngff(thumb_dir / "he") and ome.is_ngff(thumb_dir / "ihc")):
        return None
    step = int(dict(zarr.open_group(str(layer_dir), mode="r").attrs)
               .get("daskpath", {}).get("thumbnail_step", 1))
    thumbs = [("H&E", ome.read_image(thumb_dir / "he")),
              ("IHC", ome.read_image(thumb_dir / "ihc"))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax, (title, img) in zip(axes[:2], thumbs):
        ax.imshow(img)
        ax.set_title(f"{slide} {title}")
        ax.set_axis_off()
        for r in tiles.itertuples():
            tissue = r.tissue_fraction >= cfg.tiles.min_tissue
            if not tissue:
                continue
            color = _KEPT if r.keep else _DISSIMILAR
            ax.add_patch(
                Rectangle(
                    (r.x0 / step, r.y0 / step), r.width / step, r.height / step,
                    fill=False, edgecolor=color, linewidth=1.2,
                )
            )
    ny = int(np.ceil((tiles["y0"] + tiles["height"]).max() / cfg.tiles.size))
    nx = int(np.ceil((tiles["x0"] + tiles["width"]).max() / cfg.tiles.size))
    grid = np.full((ny, nx), np.nan)
    for r in tiles.itertuples():
        if r.tissue_fraction >= cfg.tiles.min_tissue:
            grid[r.y0 // cfg.tiles.size, r.x0 // cfg.tiles.size] = r.ssim
    axes[0].legend(handles=_tile_legend(cfg), loc="upper left", bbox_to_anchor=(0, -0.02),
                   ncol=3, fontsize=8, frameon=False, handlelength=1.2)
    im = axes[2].imshow(grid, vmin=0, vmax=1, cmap="viridis")
    axes[2].set_title(f"tile SSIM (tissue tiles; keep >= {cfg.ssim.threshold})")
    _tile_axes(axes[2])
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    out = _png(fig)
    plt.close(fig)
    return out


def _ratio_maps(slide: str, tiles: pd.DataFrame, cfg: Config) -> str | None:
    """One tile map per ratio column (kept tiles; blank elsewhere), on a shared 0-1 scale."""
    cols = [c for c in tiles.columns if c.startswith("ratio_") and tiles[c].notna().any()]
    if not cols:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
        fig.colorbar(im, ax=ax, fraction=0.046)
    out = _png(fig)
    plt.close(fig)
    return out


def _predictor_figure(name: str, pred: np.ndarray, truth: np.ndarray, conf: list[list[int]]) -> str:
    """Scatter of predicted vs ground-truth tile ratios and the 3-class confusion matrix."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from daskpath.metrics import BINS, CLASSES

    fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 4.6))
    ok = np.isfinite(pred) & np.isfinite(truth)
    xs = np.linspace(0, 1, 2)
    a.fill_between(xs, xs - 0.1, xs + 0.1, color="#ddd", label="|diff| <= 0.1")
    a.plot(xs, xs, color="#888", lw=1)
    for edge in BINS:
        a.axvline(edge, color="#bbb", lw=0.8, ls="--")
        a.axhline(edge, color="#bbb", lw=0.8, ls="--")
    a.scatter(truth[ok], pred[ok], s=10, alpha=0.7)
    a.set_xlim(0, 1)
    a.set_ylim(0, 1)
    a.set_xlabel("ratio_ihc (ground truth, real IHC)")
    a.set_ylabel(f"ratio_{name}")
    a.set_title(f"{name}: {int(ok.sum())} kept tiles")
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


def _predictors(tiles: pd.DataFrame, metrics: dict | None) -> list[str]:
    if not metrics or not metrics.get("tiles"):
        return []
    parts = ["<h2>Predictors vs the ground truth</h2>",
             f"<p>Truth: {html.escape(str(metrics.get('truth', 'ratio_ihc')))}; scored on kept "
             "tiles with nuclei in both.</p>"]
    keys = ("n", "acc@0.05", "acc@0.1", "acc@0.2", "mse", "mae", "class_accuracy", "balanced_accuracy")
    rows = []
    for level in ("tiles", "slides"):
        for name, sc in (metrics.get(level) or {}).items():
            rows.append({"level": level, "predictor": name} | {k: sc.get(k, np.nan) for k in keys})
    if rows:
        parts.append(pd.DataFrame(rows).to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—"))
    kept = tiles[tiles["keep"]] if "keep" in tiles else tiles
    for name, sc in metrics["tiles"].items():
        conf = (sc.get("confusion") or {}).get("rows_truth_cols_pred")
        if conf is None or f"ratio_{name}" not in kept:
            continue
        img = _predictor_figure(name, kept[f"ratio_{name}"].to_numpy(np.float64),
                                kept["ratio_ihc"].to_numpy(np.float64), conf)
        parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{img}'>")
    return parts


def write_report(
    output_dir: str | Path,
    tiles: pd.DataFrame,
    slides: pd.DataFrame,
    failures: pd.DataFrame,
    cfg: Config,
    metrics: dict | None = None,
    run_id: str | None = None,
) -> Path:
    """Write ``output_dir/report.html`` (atomically) and return its path.

    ``metrics`` is the content of ``metrics.json`` (predictor scores), when there is one;
    ``run_id`` names the run the report belongs to (as ``run.json`` does).
    """
    from daskpath import __version__

    out = Path(output_dir)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>daskpath report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#eee}.fail{color:#b00}img{max-width:100%}</style></head><body>",
        "<h1>daskpath report</h1>",
        f"<p class='run'>run {html.escape(run_id or 'unknown')} &middot; daskpath "
        f"{html.escape(__version__)}</p>",
        f"<p>{len(slides)} slide(s) done, {len(failures)} failed; {len(tiles)} tiles, "
        f"{int(tiles['keep'].sum()) if len(tiles) else 0} kept "
        f"(tissue &ge; {cfg.tiles.min_tissue}, SSIM &ge; {cfg.ssim.threshold}, "
        f"tiles of {cfg.tiles.size} px).</p>",
    ]
    if len(slides):
        parts.append("<h2>Slides</h2>")
        parts.append(slides.to_html(index=False, float_format=format_number, na_rep="—"))
    if len(failures):
        parts.append("<h2 class='fail'>Failures</h2>")
        parts.append(failures.to_html(index=False, classes="fail"))
    parts += _predictors(tiles, metrics)
    for slide in slides.get("slide", []):
        t = tiles[tiles["slide"] == slide]
        img = _slide_figure(slide, t, out / "layers" / f"{slide_key(slide)}.zarr", cfg)
        parts.append(f"<h2>{html.escape(str(slide))}</h2>")
        if img:
            parts.append(f"<img alt='{html.escape(str(slide))}' src='data:image/png;base64,{img}'>")
        else:
            parts.append("<p>(no layers written: layers.downsample is 0)</p>")
        maps = _ratio_maps(slide, t, cfg) if len(t) else None
        if maps:
            parts.append(f"<img alt='{html.escape(str(slide))} ratios' src='data:image/png;base64,{maps}'>")
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = atomic_path(path)
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path
