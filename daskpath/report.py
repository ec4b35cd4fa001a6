"""``report.html``: a self-contained page a person can look at.

Per slide: the H&E and IHC thumbnails with the tile grid drawn over them (green = kept, orange
= tissue but SSIM below the threshold, no box = background), a per-tile SSIM map, and the
slide's row of ``slides.csv``; then the cohort tables and any failures. Images are embedded as
base64 PNG so the file can be mailed or opened from a cluster's shared disk.
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
from daskpath.outputs import atomic_path

__all__ = ["write_report"]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _slide_figure(slide: str, tiles: pd.DataFrame, layer_dir: Path, cfg: Config) -> str | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import zarr
    from matplotlib.patches import Rectangle

    if not layer_dir.exists():
        return None
    root = zarr.open_group(str(layer_dir), mode="r")
    names = set(root.array_keys())
    if "thumbnail_he" not in names:
        return None
    step = int(root.attrs.get("thumbnail_step", 1))
    thumbs = [("H&E", root["thumbnail_he"][:]), ("IHC", root["thumbnail_ihc"][:])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax, (title, img) in zip(axes[:2], thumbs):
        ax.imshow(img)
        ax.set_title(f"{slide} {title}")
        ax.set_axis_off()
        for r in tiles.itertuples():
            tissue = r.tissue_fraction >= cfg.tiles.min_tissue
            if not tissue:
                continue
            color = "#1a9850" if r.keep else "#fdae61"
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
    im = axes[2].imshow(grid, vmin=0, vmax=1, cmap="viridis")
    axes[2].set_title(f"tile SSIM (tissue tiles; keep >= {cfg.ssim.threshold})")
    axes[2].set_xlabel("tile x")
    axes[2].set_ylabel("tile y")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    out = _png(fig)
    plt.close(fig)
    return out


def write_report(
    output_dir: str | Path,
    tiles: pd.DataFrame,
    slides: pd.DataFrame,
    failures: pd.DataFrame,
    cfg: Config,
) -> Path:
    """Write ``output_dir/report.html`` (atomically) and return its path."""
    out = Path(output_dir)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>daskpath report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#eee}.fail{color:#b00}img{max-width:100%}</style></head><body>",
        "<h1>daskpath report</h1>",
        f"<p>{len(slides)} slide(s) done, {len(failures)} failed; {len(tiles)} tiles, "
        f"{int(tiles['keep'].sum()) if len(tiles) else 0} kept "
        f"(tissue &ge; {cfg.tiles.min_tissue}, SSIM &ge; {cfg.ssim.threshold}, "
        f"tiles of {cfg.tiles.size} px).</p>",
    ]
    if len(slides):
        parts.append("<h2>Slides</h2>")
        parts.append(slides.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—"))
    if len(failures):
        parts.append("<h2 class='fail'>Failures</h2>")
        parts.append(failures.to_html(index=False, classes="fail"))
    for slide in slides.get("slide", []):
        t = tiles[tiles["slide"] == slide]
        img = _slide_figure(slide, t, out / "layers" / f"{slide}.zarr", cfg)
        parts.append(f"<h2>{html.escape(str(slide))}</h2>")
        if img:
            parts.append(f"<img alt='{html.escape(str(slide))}' src='data:image/png;base64,{img}'>")
        else:
            parts.append("<p>(no layers written: layers.downsample is 0)</p>")
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = atomic_path(path)
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path
