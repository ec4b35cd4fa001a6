"""The pipeline: manifest -> per-slide lazy graphs -> tables, slide by slide.

Each slide is planned as one lazy graph (read both slides, tissue masks, SSIM map, per-tile
partial sums, downsampled layers written to zarr by the workers) and submitted to the cluster;
a bounded number of slides is in flight at a time. A slide's results are written atomically to
``output_dir/parts/<slide>.tiles.parquet`` as soon as it finishes, so a rerun skips finished
slides; the cohort tables (``tiles.parquet``, ``slides.csv``) are assembled from the parts at the
end. A slide that fails (unreadable file, mismatched pair, ...) is recorded in ``failures.csv``
and does not stop the others.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd

from daskpath.config import Config
from daskpath.errors import DaskpathError
from daskpath.outputs import read_table, replace_dir, write_table

__all__ = ["RunResult", "SlidePlan", "plan_preprocess", "run", "tiles_from_sums"]

log = logging.getLogger(__name__)

TILE_COLUMNS = [
    "slide",
    "y0",
    "x0",
    "height",
    "width",
    "tissue_fraction",
    "tissue_fraction_he",
    "tissue_fraction_ihc",
    "ssim",
    "keep",
]


@dataclass
class SlidePlan:
    """The lazy work of one slide pair."""

    slide: str
    shape: tuple[int, int]
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    mpp: float | None
    sums: da.Array
    layers: list = field(default_factory=list)  # (dask array, zarr array) pairs to store
    layer_dir: Path | None = None
    layer_tmp: Path | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.chunks[0]) * len(self.chunks[1])


@dataclass
class RunResult:
    """What :func:`run` produced."""

    output_dir: Path
    tiles: pd.DataFrame
    slides: pd.DataFrame
    failures: pd.DataFrame
    seconds: float

    @property
    def ok(self) -> bool:
        return self.failures.empty


def plan_preprocess(slide: str, he: str | Path, ihc: str | Path, cfg: Config, output_dir: Path | None = None) -> SlidePlan:
    """Build the lazy preprocessing graph of one pair (nothing is computed).

    Returns a plan whose ``sums`` has shape (n_ty, n_tx, 3): per-tile sums of the H&E tissue
    mask, the IHC tissue mask and the SSIM map.
    """
    from daskpath.io import open_pair
    from daskpath.similarity import ssim_map
    from daskpath.tiles import tile_sums
    from daskpath.tissue import tissue_mask

    cache = Path(cfg.cache_dir) if cfg.cache_dir else (output_dir or Path(cfg.output_dir)) / "cache"
    ds = open_pair(he, ihc, chunk_size=cfg.chunk_size, cache_dir=cache)
    he_a = ds["he"].data
    ihc_a = ds["ihc"].data
    t_he = tissue_mask(he_a, threshold=cfg.tissue.threshold, sigma=cfg.tissue.sigma)
    t_ihc = tissue_mask(ihc_a, threshold=cfg.tissue.threshold, sigma=cfg.tissue.sigma)
    ssim = ssim_map(he_a, ihc_a, sigma=cfg.ssim.sigma, dtype=cfg.ssim.dtype)
    sums = tile_sums([t_he, t_ihc, ssim], cfg.tiles.size)
    mpp = ds["he"].attrs.get("mpp")
    plan = SlidePlan(
        slide=slide,
        shape=(int(he_a.shape[0]), int(he_a.shape[1])),
        chunks=(he_a.chunks[0], he_a.chunks[1]),
        mpp=float(mpp) if mpp else None,
        sums=sums,
    )
    f = cfg.layers.downsample
    if f and output_dir is not None:
        plan.layer_dir = output_dir / "layers" / f"{slide}.zarr"
        plan.layer_tmp = output_dir / "layers" / f".{slide}.zarr.partial"
        plan.layers = _plan_layers(
            plan.layer_tmp,
            f,
            {"tissue_he": t_he, "tissue_ihc": t_ihc, "ssim": ssim},
            slide,
            mpp,
            thumbnails={"thumbnail_he": he_a, "thumbnail_ihc": ihc_a},
        )
    return plan


THUMBNAIL_SIDE = 1024
"""Longest side (px) of the RGB thumbnails stored with the layers (for the report)."""


def _plan_layers(
    path: Path,
    factor: int,
    maps: dict[str, da.Array],
    slide: str,
    mpp,
    thumbnails: dict[str, da.Array] | None = None,
) -> list:
    """Downsample per-pixel maps by ``factor`` (block mean) and prepare zarr targets.

    RGB ``thumbnails`` are strided (every k-th pixel, k a power of two so the longest side is at
    most :data:`THUMBNAIL_SIDE`); they reuse the chunks the maps read, so they cost no extra I/O.
    """
    import zarr

    if path.exists():
        shutil.rmtree(path)
    root = zarr.open_group(str(path), mode="w")
    out = []
    step = 1
    for name, rgb in (thumbnails or {}).items():
        step = 1 << max(0, int(np.ceil(np.log2(max(rgb.shape[:2]) / THUMBNAIL_SIDE))))
        small = rgb[::step, ::step]
        target = root.create_array(
            name, shape=small.shape, chunks=small.shape, dtype=np.uint8, fill_value=255
        )
        out.append((small.rechunk(small.shape), target))
    root.attrs.update(
        {
            "slide": slide,
            "downsample": factor,
            "thumbnail_step": step,
            "mpp": mpp,
            "layers": list(maps),
        }
    )
    for name, m in maps.items():
        m = m.astype(np.float32)
        h = (m.shape[0] // factor) * factor
        w = (m.shape[1] // factor) * factor
        m = m[:h, :w]
        if any(c % factor for c in m.chunks[0][:-1] + m.chunks[1][:-1]):
            m = m.rechunk(factor * max(1, 2048 // factor))
        small = da.coarsen(np.mean, m, {0: factor, 1: factor}, trim_excess=True)
        target = root.create_array(
            name, shape=small.shape, chunks=(1024, 1024), dtype=np.float32, fill_value=np.nan
        )
        out.append((small.rechunk(1024), target))
    return out


def tiles_from_sums(slide: str, shape: tuple[int, int], sums: np.ndarray, cfg: Config) -> pd.DataFrame:
    """Tile table of one slide from its per-tile sums (tissue H&E, tissue IHC, SSIM)."""
    from daskpath.tiles import tile_grid

    grid = tile_grid(shape, cfg.tiles.size)
    area = (grid["height"] * grid["width"]).to_numpy(dtype=np.float64)
    flat = sums.reshape(-1, sums.shape[-1])
    t_he = flat[:, 0] / area
    t_ihc = flat[:, 1] / area
    ssim = flat[:, 2] / area
    tissue = np.minimum(t_he, t_ihc)
    df = pd.DataFrame(
        {
            "slide": slide,
            "y0": grid["y0"],
            "x0": grid["x0"],
            "height": grid["height"],
            "width": grid["width"],
            "tissue_fraction": tissue,
            "tissue_fraction_he": t_he,
            "tissue_fraction_ihc": t_ihc,
            "ssim": ssim,
            "keep": (tissue >= cfg.tiles.min_tissue) & (ssim >= cfg.ssim.threshold),
        }
    )
    return df[TILE_COLUMNS]


def summarize_slide(tiles: pd.DataFrame, cfg: Config, mpp: float | None) -> dict:
    """One row of ``slides.csv`` from a slide's tile table."""
    tissue_tiles = tiles[tiles["tissue_fraction"] >= cfg.tiles.min_tissue]
    kept = tiles[tiles["keep"]]
    area_px = float((tiles["tissue_fraction"] * tiles["height"] * tiles["width"]).sum())
    row = {
        "slide": tiles["slide"].iloc[0] if len(tiles) else "",
        "height": int((tiles["y0"] + tiles["height"]).max()) if len(tiles) else 0,
        "width": int((tiles["x0"] + tiles["width"]).max()) if len(tiles) else 0,
        "mpp": mpp if mpp else np.nan,
        "tiles_total": len(tiles),
        "tiles_tissue": len(tissue_tiles),
        "tiles_kept": len(kept),
        "mean_ssim_tissue": float(tissue_tiles["ssim"].mean()) if len(tissue_tiles) else np.nan,
        "mean_ssim_kept": float(kept["ssim"].mean()) if len(kept) else np.nan,
        "tissue_area_px": area_px,
        "tissue_area_mm2": area_px * (mpp / 1000.0) ** 2 if mpp else np.nan,
        "note": "",
    }
    if not len(tissue_tiles):
        row["note"] = "no tissue found (all background at tissue.threshold)"
    elif not len(kept):
        row["note"] = "no tile passed ssim.threshold: check the pair is registered"
    return row


def _part_path(out: Path, slide: str) -> Path:
    return out / "parts" / f"{slide}.tiles.parquet"


def run(
    cfg: Config,
    client=None,
    scheduler: str | None = None,
    progress: bool | Callable[[str, int, int], None] = False,
) -> RunResult:
    """Run the configured stages on every slide of the manifest.

    Parameters
    ----------
    cfg : Config
        Validated configuration; ``cfg.slides`` must point at a manifest.
    client : distributed.Client, optional
        Use this client; otherwise one is started from ``cfg.cluster`` (or ``scheduler``).
    scheduler : str, optional
        Address of an existing scheduler (ignored when ``client`` is given).
    progress : bool or callable
        ``True`` shows a progress bar over slides; a callable gets ``(slide, done, total)``.

    Returns
    -------
    RunResult
        The cohort tables (also written under ``cfg.output_dir``) and the failures.
    """
    from daskpath.cluster import connect
    from daskpath.io import read_manifest

    from daskpath.errors import ConfigError

    if not cfg.slides:
        raise ConfigError("config key 'slides' is empty; set it to a manifest CSV (slide,he,ihc)")
    manifest = read_manifest(cfg.slides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if client is None:
        with connect(cfg.cluster, scheduler) as c:
            return _run(cfg, manifest, out, c, progress, t0)
    return _run(cfg, manifest, out, client, progress, t0)


def _run(cfg: Config, manifest: pd.DataFrame, out: Path, client, progress, t0: float) -> RunResult:
    from distributed import as_completed

    failures: list[dict] = []
    todo: list[tuple[str, str, str]] = []
    for row in manifest.itertuples(index=False):
        if not cfg.overwrite and _part_path(out, row.slide).exists():
            log.info("slide %s already done (rerun with overwrite: true to recompute)", row.slide)
            continue
        todo.append((row.slide, row.he, row.ihc))

    bar = _bar(progress, total=len(manifest), initial=len(manifest) - len(todo))
    done = [len(manifest) - len(todo)]
    window = max(2, len(client.scheduler_info().get("workers", {})))
    pending = list(todo)
    futures: dict = {}
    ac = as_completed()

    def submit_next() -> None:
        while pending and len(futures) < window:
            slide, he, ihc = pending.pop(0)
            try:
                plan = plan_preprocess(slide, he, ihc, cfg, output_dir=out)
            except DaskpathError as e:
                failures.append({"slide": slide, "stage": "open", "error": str(e)})
                _tick(bar, progress, slide, done, len(manifest))
                continue
            except Exception as e:  # noqa: BLE001 - one bad slide must not sink the cohort
                failures.append({"slide": slide, "stage": "open", "error": f"{type(e).__name__}: {e}"})
                _tick(bar, progress, slide, done, len(manifest))
                continue
            work = [plan.sums]
            if plan.layers:
                srcs, targets = zip(*plan.layers)
                work.append(da.store(list(srcs), list(targets), lock=False, compute=False))
            fut = client.compute(work)
            f_sums = fut[0]
            futures[f_sums] = (plan, fut)
            ac.add(f_sums)

    submit_next()
    while futures:
        f = next(ac)
        plan, fut = futures.pop(f)
        try:
            results = [x.result() for x in fut]
            sums = results[0]
            tiles = tiles_from_sums(plan.slide, plan.shape, np.asarray(sums), cfg)
            tiles.attrs["mpp"] = plan.mpp
            if plan.layer_tmp is not None and plan.layer_dir is not None:
                replace_dir(plan.layer_tmp, plan.layer_dir)
            part = tiles.copy()
            part["mpp"] = plan.mpp if plan.mpp else np.nan
            write_table(part, _part_path(out, plan.slide))
        except Exception as e:  # noqa: BLE001
            msg = str(e) if isinstance(e, DaskpathError) else f"{type(e).__name__}: {e}"
            log.debug("slide %s failed:\n%s", plan.slide, traceback.format_exc())
            failures.append({"slide": plan.slide, "stage": "preprocess", "error": msg})
            if plan.layer_tmp is not None and plan.layer_tmp.exists():
                shutil.rmtree(plan.layer_tmp, ignore_errors=True)
        _tick(bar, progress, plan.slide, done, len(manifest))
        submit_next()
    if bar is not None:
        bar.close()
    return _assemble(cfg, manifest, out, failures, t0)


def _assemble(cfg: Config, manifest: pd.DataFrame, out: Path, failures: list[dict], t0: float) -> RunResult:
    parts, rows = [], []
    failed = {f["slide"] for f in failures}
    for slide in manifest["slide"]:
        p = _part_path(out, slide)
        if slide in failed or not p.exists():
            continue
        part = read_table(p)
        mpp = float(part["mpp"].iloc[0]) if len(part) and part["mpp"].notna().any() else None
        part = part.drop(columns=["mpp"])
        # re-derive keep from the current thresholds (a rerun may change them)
        part["keep"] = (part["tissue_fraction"] >= cfg.tiles.min_tissue) & (part["ssim"] >= cfg.ssim.threshold)
        parts.append(part)
        rows.append(summarize_slide(part, cfg, mpp))
    tiles = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TILE_COLUMNS)
    slides = pd.DataFrame(rows)
    write_table(tiles, out / "tiles.parquet")
    write_table(slides, out / "slides.csv")
    fail_df = pd.DataFrame(failures, columns=["slide", "stage", "error"])
    fpath = out / "failures.csv"
    if failures:
        write_table(fail_df, fpath)
    elif fpath.exists():
        fpath.unlink()
    try:
        from daskpath.report import write_report

        write_report(out, tiles, slides, fail_df, cfg)
    except ImportError as e:  # matplotlib is optional (extra "report")
        log.warning("report.html not written: %s (pip install 'daskpath[report]')", e)
    return RunResult(out, tiles, slides, fail_df, time.perf_counter() - t0)


def _bar(progress, total: int, initial: int):
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit="slide", desc="slides")
    return None


def _tick(bar, progress, slide: str, done: list[int], total: int) -> None:
    done[0] += 1
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(slide)
    elif callable(progress):
        progress(slide, done[0], total)
