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

import dataclasses
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    tile: int
    work_dir: Path | None = None
    layer_tmp: Path | None = None
    layer_dir: Path | None = None
    n_done: int = 0  # chunks already recorded by an earlier (interrupted) run
    tasks: list = field(default_factory=list)  # (loc, Delayed) per chunk

    @property
    def n_chunks(self) -> int:
        return len(self.chunks[0]) * len(self.chunks[1])

    @property
    def sums(self) -> Any:
        """Delayed per-tile sums (n_ty, n_tx, 3): H&E tissue, IHC tissue, SSIM."""
        import dask

        return dask.delayed(_combine, pure=True)(
            [t for _, t in self.tasks], *_tile_shape(self.shape, self.tile), 3
        )


@dataclass
class RunResult:
    """What :func:`run` produced."""

    output_dir: Path
    tiles: pd.DataFrame
    slides: pd.DataFrame
    failures: pd.DataFrame
    seconds: float
    chunks_computed: int = 0
    chunks_total: int = 0

    @property
    def ok(self) -> bool:
        return self.failures.empty


THUMBNAIL_SIDE = 1024
"""Longest side (px) of the RGB thumbnails stored with the layers (for the report)."""


def keep_mask(tissue_fraction, ssim, cfg: Config):
    """The keep rule: enough tissue in both sections and SSIM at least ``ssim.threshold``."""
    return (tissue_fraction >= cfg.tiles.min_tissue) & (ssim >= cfg.ssim.threshold)


def _preprocess_key(cfg: Config) -> dict:
    """The config keys a preprocessing result depends on (for the resume fingerprint)."""
    return {
        "chunk_size": cfg.chunk_size,
        "tiles": cfg.tiles.size,
        "tissue": dataclasses.asdict(cfg.tissue),
        "ssim": {"sigma": cfg.ssim.sigma, "dtype": cfg.ssim.dtype},
        "layers": cfg.layers.downsample,
        "version": 1,
    }


def _read_halo(src, loc: tuple[int, int, int, int], shape: tuple[int, int], d: int):
    """Read a chunk plus ``d`` px of halo (clipped to the slide); return block and core slices."""
    y0, y1, x0, x1 = loc
    ya, yb = max(0, y0 - d), min(shape[0], y1 + d)
    xa, xb = max(0, x0 - d), min(shape[1], x1 + d)
    block = src[slice(ya, yb), slice(xa, xb)]
    core = (slice(y0 - ya, y0 - ya + (y1 - y0)), slice(x0 - xa, x0 - xa + (x1 - x0)))
    return block, core


def _preprocess_chunk(
    *,
    loc: tuple[int, int, int, int],
    he_src,
    ihc_src,
    shape: tuple[int, int],
    tile: int,
    tissue_threshold: float,
    tissue_sigma: float,
    ssim_sigma: float,
    ssim_dtype: str,
    layers: str | None,
    factor: int,
    step: int,
) -> dict[str, np.ndarray]:
    """All preprocessing of one chunk in one task.

    Reads the chunk of both slides plus a halo of ``max(tissue radius, SSIM radius)`` px (one
    read per slide, no neighbour exchange), computes the tissue masks and the SSIM map on the
    halo'd block with the filters' own border rule at the true slide edge, keeps the core (equal
    to the whole-image computation, since the halo covers every filter radius), reduces it to
    per-tile partial sums, and writes its region of the layers.
    """
    from daskpath.monitor import count
    from daskpath.similarity import gray, ssim_block, ssim_radius
    from daskpath.tiles import chunk_tile_sums
    from daskpath.tissue import tissue_block, tissue_radius

    y0, y1, x0, x1 = loc
    d = max(ssim_radius(ssim_sigma), tissue_radius(tissue_sigma) if tissue_sigma > 0 else 0)
    he, core = _read_halo(he_src, loc, shape, d)
    ihc, _ = _read_halo(ihc_src, loc, shape, d)
    t_he = tissue_block(he, tissue_threshold, tissue_sigma)[core]
    t_ihc = tissue_block(ihc, tissue_threshold, tissue_sigma)[core]
    wdt = np.dtype(ssim_dtype).type
    ssim = ssim_block(gray(he, wdt), gray(ihc, wdt), sigma=ssim_sigma)[core]
    he, ihc = he[core], ihc[core]
    sums, (ty, tx) = chunk_tile_sums([t_he, t_ihc, ssim], loc, tile)
    count("chunks_processed")
    count("pixels_processed", float(t_he.size))
    # each tile counted once: by the chunk holding its top-left corner
    count("tiles_processed", len(range(-(-y0 // tile) * tile, y1, tile)) * len(range(-(-x0 // tile) * tile, x1, tile)))
    if layers is not None:
        _write_layers(layers, loc, factor, step, t_he, t_ihc, ssim, he, ihc)
    return {"sums": sums, "origin": np.array([ty, tx], dtype=np.int64)}


def _write_layers(layers: str, loc, factor: int, step: int, t_he, t_ihc, ssim, he, ihc) -> None:
    """Write one chunk's region of the downsampled layers and thumbnails (one zarr chunk each)."""
    import zarr

    y0, y1, x0, x1 = loc
    root = zarr.open_group(layers, mode="r+")
    if factor and y0 % factor == 0 and x0 % factor == 0:
        h, w = (y1 - y0) // factor, (x1 - x0) // factor
        for name, m in (("tissue_he", t_he), ("tissue_ihc", t_ihc), ("ssim", ssim)):
            arr = root[name]
            hh = min(h, arr.shape[0] - y0 // factor)
            ww = min(w, arr.shape[1] - x0 // factor)
            if hh <= 0 or ww <= 0:
                continue
            m = m[: hh * factor, : ww * factor].astype(np.float32)
            small = m.reshape(hh, factor, ww, factor).mean(axis=(1, 3))
            arr[y0 // factor : y0 // factor + hh, x0 // factor : x0 // factor + ww] = small
    for name, rgb in (("thumbnail_he", he), ("thumbnail_ihc", ihc)):
        oy, ox = (-y0) % step, (-x0) % step
        small = rgb[oy::step, ox::step]
        ty0, tx0 = -(-y0 // step), -(-x0 // step)
        if small.size:
            root[name][ty0 : ty0 + small.shape[0], tx0 : tx0 + small.shape[1]] = small


def _combine(parts: list[dict[str, np.ndarray]], n_ty: int, n_tx: int, k: int) -> np.ndarray:
    total = np.zeros((n_ty, n_tx, k), dtype=np.float64)
    for p in parts:
        ty, tx = (int(v) for v in p["origin"])
        s = p["sums"]
        total[ty : ty + s.shape[0], tx : tx + s.shape[1]] += s
    return total


def plan_preprocess(
    slide: str,
    he: str | Path,
    ihc: str | Path,
    cfg: Config,
    output_dir: Path | None = None,
) -> SlidePlan:
    """Build the lazy preprocessing graph of one pair (nothing is computed).

    One task per chunk (:func:`_preprocess_chunk`): it reads the chunk of both slides with its
    halo, computes the tissue masks and the SSIM map, reduces them to per-tile partial sums and
    writes the chunk's region of the layers. With ``output_dir``, each finished chunk is recorded under
    ``output_dir/work/<slide>/<fingerprint>/`` so an interrupted run resumes (see
    :mod:`daskpath.resume`). ``plan.sums`` is a Delayed giving (n_ty, n_tx, 3): per-tile sums of
    the H&E tissue mask, the IHC tissue mask and the SSIM map.
    """
    from daskpath.io import region_source
    from daskpath.resume import chunk_tasks, fingerprint

    out = output_dir
    ds = _open_pair(he, ihc, cfg, out or Path(cfg.output_dir))
    he_a = ds["he"]
    chunks = (he_a.data.chunks[0], he_a.data.chunks[1])
    mpp = he_a.attrs.get("mpp")
    shape = (int(he_a.shape[0]), int(he_a.shape[1]))
    size = cfg.tiles.size

    work = layers = None
    step = 1 << max(0, int(np.ceil(np.log2(max(shape) / THUMBNAIL_SIDE))))
    f = cfg.layers.downsample
    if out is not None:
        key = fingerprint(_preprocess_key(cfg), [he, ihc])
        work = out / "work" / slide / f"preprocess-{key}"
        if cfg.overwrite and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if f:
            layers = work / "layers.zarr"
            if not layers.exists():
                _create_layers(layers, shape, chunks, f, step, slide, mpp)
    tasks = chunk_tasks(
        _preprocess_chunk,
        chunks,
        work / "chunks" if work is not None else None,
        name=f"preprocess-{slide}",
        he_src=region_source(ds["he"]),
        ihc_src=region_source(ds["ihc"]),
        shape=shape,
        tile=size,
        tissue_threshold=cfg.tissue.threshold,
        tissue_sigma=cfg.tissue.sigma,
        ssim_sigma=cfg.ssim.sigma,
        ssim_dtype=cfg.ssim.dtype,
        layers=str(layers) if layers is not None else None,
        factor=f,
        step=step,
    )
    n_done = 0
    if work is not None:
        n_done = sum(1 for _ in (work / "chunks").glob("*.npz"))
    return SlidePlan(
        slide=slide,
        shape=shape,
        chunks=chunks,
        mpp=float(mpp) if mpp else None,
        tile=size,
        work_dir=work,
        layer_tmp=layers,
        layer_dir=(out / "layers" / f"{slide}.zarr") if (out is not None and layers is not None) else None,
        n_done=n_done,
        tasks=tasks,
    )


def _create_layers(path: Path, shape, chunks, factor: int, step: int, slide: str, mpp) -> None:
    """Empty layer arrays whose zarr chunks are the slide chunks / factor (one writer each)."""
    import zarr

    tmp = path.with_name(path.name + ".creating")
    if tmp.exists():
        shutil.rmtree(tmp)
    root = zarr.open_group(str(tmp), mode="w")
    cy, cx = max(chunks[0]), max(chunks[1])
    h, w = shape[0] // factor, shape[1] // factor
    for name in ("tissue_he", "tissue_ihc", "ssim"):
        root.create_array(
            name,
            shape=(h, w),
            chunks=(max(1, cy // factor), max(1, cx // factor)),
            dtype=np.float32,
            fill_value=np.nan,
        )
    th, tw = -(-shape[0] // step), -(-shape[1] // step)
    for name in ("thumbnail_he", "thumbnail_ihc"):
        root.create_array(
            name,
            shape=(th, tw, 3),
            chunks=(max(1, cy // step), max(1, cx // step), 3),
            dtype=np.uint8,
            fill_value=255,
        )
    root.attrs.update(
        {
            "slide": slide,
            "downsample": factor,
            "thumbnail_step": step,
            "mpp": mpp,
            "layers": ["tissue_he", "tissue_ihc", "ssim"],
        }
    )
    os.replace(tmp, path)


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
            "keep": keep_mask(tissue, ssim, cfg),
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
    performance_report: str | Path | None = None,
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
        ``True`` shows progress bars (slides, chunks); a callable gets ``(slide, done, total)``.
    performance_report : path, optional
        Write Dask's performance report (task stream, profiles, bandwidth) to this HTML file.

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
    _write_run_config(cfg, out)
    t0 = time.perf_counter()
    if client is None:
        with connect(cfg.cluster, scheduler) as c:
            return _run_reported(cfg, manifest, out, c, progress, t0, performance_report)
    return _run_reported(cfg, manifest, out, client, progress, t0, performance_report)


def _write_run_config(cfg: Config, out: Path) -> Path:
    """``output_dir/config.yaml``: the validated config of this run, paths made absolute, so
    the folder says what produced it (``daskpath run`` can rerun it; ``daskpath train
    translator --from-run`` finds the slides)."""
    import yaml

    from daskpath.outputs import atomic_path

    d = cfg.to_dict()
    d["slides"] = str(Path(cfg.slides).expanduser().resolve())
    d["output_dir"] = str(out.resolve())
    if cfg.cache_dir:
        d["cache_dir"] = str(Path(cfg.cache_dir).expanduser().resolve())
    path = out / "config.yaml"
    tmp = atomic_path(path)
    tmp.write_text("# written by daskpath run: the configuration of the run in this folder\n"
                   + yaml.safe_dump(d, sort_keys=False))
    os.replace(tmp, path)
    return path


def _run_reported(cfg, manifest, out, client, progress, t0, report) -> RunResult:
    if report is None:
        return _run(cfg, manifest, out, client, progress, t0)
    from distributed import performance_report

    Path(report).parent.mkdir(parents=True, exist_ok=True)
    with performance_report(filename=str(report)):
        return _run(cfg, manifest, out, client, progress, t0)


def _run(cfg: Config, manifest: pd.DataFrame, out: Path, client, progress, t0: float) -> RunResult:
    """Plan slides a few at a time, compute their chunk tasks, finish each slide as it completes."""
    from distributed import as_completed, span

    failures: list[dict] = []
    todo: list[tuple[str, str, str]] = []
    for row in manifest.itertuples(index=False):
        if not cfg.overwrite and _part_path(out, row.slide).exists():
            log.info("slide %s already done (rerun with overwrite: true to recompute)", row.slide)
            continue
        todo.append((row.slide, row.he, row.ihc))

    bars = _bars(progress, total=len(manifest), initial=len(manifest) - len(todo))
    done = [len(manifest) - len(todo)]
    n_workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
    window = max(2, n_workers)  # slides in flight: enough chunks to keep every worker busy
    pending = list(todo)
    inflight: dict[str, dict] = {}  # slide -> {"plan", "futures", "left"}
    counts = [0, 0]  # chunks computed, chunks total
    ac = as_completed()

    def fail(slide: str, stage: str, e: BaseException) -> None:
        msg = str(e) if isinstance(e, DaskpathError) else f"{type(e).__name__}: {e}"
        log.debug("slide %s failed in %s:\n%s", slide, stage, traceback.format_exc())
        failures.append({"slide": slide, "stage": stage, "error": msg})
        _tick(bars, progress, slide, done, len(manifest))

    def submit_next() -> None:
        while pending and len(inflight) < window:
            slide, he, ihc = pending.pop(0)
            try:
                with span(f"daskpath-{slide}"):
                    plan = plan_preprocess(slide, he, ihc, cfg, output_dir=out)
            except Exception as e:  # noqa: BLE001 - one bad slide must not sink the cohort
                fail(slide, "open", e)
                continue
            counts[0] += plan.n_chunks - plan.n_done
            counts[1] += plan.n_chunks
            if plan.n_done:
                log.info("slide %s: resuming, %d of %d chunks already done", slide, plan.n_done, plan.n_chunks)
            futs = client.compute([t for _, t in plan.tasks], retries=cfg.retries)
            if bars is not None:
                bars[1].total += len(futs)
                bars[1].update(0)
            inflight[slide] = {"plan": plan, "futures": futs, "left": len(futs)}
            for fu in futs:
                ac.add(fu)
                fu.slide = slide  # type: ignore[attr-defined]
            if not futs:  # nothing to compute (empty selection)
                finish(slide)

    def finish(slide: str) -> None:
        item = inflight.pop(slide)
        plan: SlidePlan = item["plan"]
        try:
            parts = [f.result() for f in item["futures"]]
            sums = _combine(parts, *_tile_shape(plan.shape, plan.tile), 3)
            tiles = tiles_from_sums(plan.slide, plan.shape, sums, cfg)
            if plan.layer_tmp is not None and plan.layer_dir is not None:
                replace_dir(plan.layer_tmp, plan.layer_dir)
            part = tiles.copy()
            part["mpp"] = plan.mpp if plan.mpp else np.nan
            write_table(part, _part_path(out, plan.slide))
            if plan.work_dir is not None:
                shutil.rmtree(plan.work_dir, ignore_errors=True)
                for d in (plan.work_dir.parent, plan.work_dir.parent.parent):
                    try:
                        d.rmdir()  # only if empty
                    except OSError:
                        pass
            _tick(bars, progress, slide, done, len(manifest))
        except Exception as e:  # noqa: BLE001
            fail(slide, "preprocess", e)
        finally:
            for f in item["futures"]:
                f.release()

    submit_next()
    for fu in ac:
        slide = fu.slide  # type: ignore[attr-defined]
        item = inflight.get(slide)
        if item is None:  # slide already failed
            continue
        if bars is not None:
            bars[1].update(1)
        if fu.status == "error":
            inflight.pop(slide)
            try:
                fu.result()
            except Exception as e:  # noqa: BLE001
                fail(slide, "preprocess", e)
            for f in item["futures"]:
                f.cancel()
            submit_next()
            continue
        item["left"] -= 1
        if item["left"] == 0:
            finish(slide)
            submit_next()
    if bars is not None:
        for b in bars:
            b.close()
    failed = {f["slide"] for f in failures}
    model_slides = [r for r in manifest.itertuples(index=False)
                    if r.slide not in failed and _part_path(out, r.slide).exists()]
    for stage in ("nuclei", "translate", "baselines"):
        if stage not in cfg.stages:
            continue
        for r in _progress_iter(model_slides, progress, stage):
            if r.slide in failed:
                continue
            try:
                if stage == "baselines":
                    _baselines_stage(r.slide, r.he, r.ihc, cfg, out, client)
                else:
                    _model_stage(stage, r.slide, r.he, r.ihc, cfg, out, client)
            except Exception as e:  # noqa: BLE001 - one bad slide must not sink the cohort
                msg = str(e) if isinstance(e, DaskpathError) else f"{type(e).__name__}: {e}"
                log.debug("slide %s failed in %s:\n%s", r.slide, stage, traceback.format_exc())
                failures.append({"slide": r.slide, "stage": stage, "error": msg})
                failed.add(r.slide)
    res = _assemble(cfg, manifest, out, failures, t0)
    res.chunks_computed, res.chunks_total = counts
    return res


def _progress_iter(items, progress, stage: str):
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(items, unit="slide", desc=stage)
    return items


def _stage_path(out: Path, slide: str, stage: str) -> Path:
    return out / "parts" / f"{slide}.{stage}.parquet"


def _open_pair(he: str, ihc: str, cfg: Config, out: Path):
    """The slide pair, flat rasters ingested under ``cache_dir`` (default ``<output_dir>/cache``)."""
    from daskpath.io import open_pair

    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    return open_pair(he, ihc, chunk_size=cfg.chunk_size, cache_dir=cache)


def _kept_tiles(out: Path, slide: str, cfg: Config) -> tuple[pd.DataFrame, np.ndarray]:
    """A slide's tile table from preprocessing and its keep mask under the current thresholds."""
    tiles = read_table(_part_path(out, slide)).drop(columns=["mpp"], errors="ignore")
    return tiles, keep_mask(tiles["tissue_fraction"], tiles["ssim"], cfg).to_numpy()


def _done_table(part: Path, keep: np.ndarray) -> pd.DataFrame | None:
    """A model stage's finished table when it measured every tile kept now (else ``None``)."""
    done = read_table(part)
    if "measured" in done.columns and done["measured"].to_numpy(bool)[keep].all():
        return done
    return None


def _model_stage(stage: str, slide: str, he: str, ihc: str, cfg: Config, out: Path, client) -> None:
    """Run a model stage (nuclei on the real IHC, or translate + nuclei on the virtual IHC).

    Writes ``parts/<slide>.<stage>.parquet`` (per-tile ratio columns, NaN outside kept tiles)
    and the nuclei table, atomically; a finished stage is skipped on a rerun.
    """
    from daskpath.cluster import check_runnable, model_annotations
    from daskpath.nuclei import (
        chunks_in_region,
        default_depth,
        measure_nuclei,
        resolve_model,
        tile_ratios,
        tile_sums,
        write_geojson,
    )

    part = _stage_path(out, slide, stage)
    tiles, keep = _kept_tiles(out, slide, cfg)
    if part.exists() and not cfg.overwrite:
        if _done_table(part, keep) is not None:
            log.info("slide %s: stage %s already done", slide, stage)
            return
        log.info("slide %s: stage %s: kept tiles changed since it ran, measuring again", slide, stage)
    # nuclei are needed on kept tiles only: StarDist runs on the chunks that meet one, chunks of
    # nuclei.chunk_size (default the tile size, so no more than the kept tiles + halo)
    nchunk = cfg.nuclei.chunk_size or cfg.tiles.size
    kept = tiles[keep]
    region = list(zip(kept["y0"], kept["y0"] + kept["height"], kept["x0"], kept["x0"] + kept["width"]))
    ds = _open_pair(he, ihc, cfg, out)
    ann = model_annotations(client)
    check_runnable(client, ann)
    resources = ann.get("resources")
    kw = dict(
        model=cfg.nuclei.model,
        method=cfg.nuclei.method,
        dab_threshold=cfg.nuclei.dab_threshold,
        stain_matrix=None if cfg.nuclei.stain_matrix == "hed" else cfg.nuclei.stain_matrix,
        prob_thresh=cfg.nuclei.prob_thresh,
        nms_thresh=cfg.nuclei.nms_thresh,
        resources=resources,
        region=region,
    )
    if stage == "nuclei":
        image, suffix, source = ds["ihc"].data, "ihc", "ihc"
        image = image.rechunk((nchunk, nchunk, 3))
    else:
        import dask.array as da
        import zarr

        from daskpath.translate import translate

        virtual = translate(
            ds["he"].data,
            cfg.translate.model,
            batch_size=cfg.translate.batch_size,
            blend=cfg.translate.blend,
            norm_stats=cfg.translate.norm_stats,
            resources=resources,
        )
        # the virtual IHC is a layer of its own: written once, chunk by chunk, then measured.
        # Only chunks near kept tiles are translated: within the nuclei halo of one, so the
        # nuclei of kept tiles see the same pixels as on a fully translated slide; the rest of
        # the layer stays white (the zarr fill value) and holds no nuclei.
        vdir = out / "layers" / f"{slide}.virtual.zarr"
        tmp = vdir.with_name(f".{vdir.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        cy, cx = virtual.chunks[0][0], virtual.chunks[1][0]
        target = zarr.open_array(str(tmp), mode="w", shape=virtual.shape, chunks=(cy, cx, 3),
                                 dtype="uint8", fill_value=255)
        margin = default_depth(resolve_model(cfg.nuclei.model))
        grown = [(max(0, y0 - margin), y1 + margin, max(0, x0 - margin), x1 + margin)
                 for y0, y1, x0, x1 in region]
        ys = np.concatenate([[0], np.cumsum(virtual.chunks[0])])
        xs = np.concatenate([[0], np.cumsum(virtual.chunks[1])])
        wanted = chunks_in_region(ys, xs, grown)
        blocks = [(int(i), int(j)) for i, j in zip(*np.nonzero(wanted))]
        if blocks:
            store = da.store(
                [virtual.blocks[i, j] for i, j in blocks], [target] * len(blocks),
                regions=[(slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]), slice(0, 3)) for i, j in blocks],
                lock=False, compute=False,
            )
            client.gather(client.compute(store, retries=cfg.retries))  # one result per source
        replace_dir(tmp, vdir)
        image = da.from_zarr(str(vdir)).rechunk((nchunk, nchunk, 3))
        suffix, source = "virtual", "virtual"
        similarity = _tile_similarity(client, image, ds["ihc"].data, tiles, keep)
    labels_dir = None
    if cfg.nuclei.method == "nucleus":
        # label image with globally unique ids (= nucleus table ids), written in the same pass
        labels_dir = out / "layers" / f"{slide}.{suffix}-labels.zarr"
        labels_tmp = labels_dir.with_name(f".{labels_dir.name}.partial")
        if labels_tmp.exists():
            shutil.rmtree(labels_tmp)
        kw["labels_store"] = str(labels_tmp)
    df = measure_nuclei(image, **kw)
    if labels_dir is not None:
        replace_dir(labels_tmp, labels_dir)
    df.insert(0, "source", source)
    df.insert(0, "slide", slide)
    from daskpath.monitor import count

    count("nuclei_found", len(df))
    ratios = tile_ratios(df, tiles, suffix=suffix)
    cols = [f"ratio_{suffix}", f"ki67_index_{suffix}"]
    # per-tile ratios are reported on kept tiles only (the others are not comparable)
    ratios.loc[~keep, cols] = np.nan
    # area and counts per tile, for slide-level area-weighted aggregation
    agg = tile_sums(df, tiles)
    stage_tab = pd.concat([ratios[["slide", "y0", "x0"] + cols], agg.add_suffix(f"_{suffix}")], axis=1)
    stage_tab["measured"] = keep  # tiles whose nuclei are complete in this table
    if stage == "translate":
        stage_tab["ssim_virtual"] = similarity[:, 0]
        stage_tab["psnr_virtual"] = similarity[:, 1]
    name = f"{slide}{'' if suffix == 'ihc' else '.' + suffix}"
    # what was used (method, model, stain vectors, DAB threshold, normalisation, halo)
    from daskpath.outputs import write_json

    write_json(dict(df.attrs) | {"slide": slide, "source": source, "nuclei": int(len(df))},
               out / "nuclei" / f"{name}.json")
    write_table(df, out / "nuclei" / f"{name}.parquet")
    write_geojson(df, out / "nuclei" / f"{name}.geojson", mpp=ds.attrs.get("mpp"))
    write_table(stage_tab, part)


def _baselines_stage(slide: str, he: str, ihc: str, cfg: Config, out: Path, client) -> None:
    """Predict the Ki67 ratio of every kept tile from the H&E alone (random forest, ResNet18).

    Writes ``parts/<slide>.baselines.parquet``: ``ratio_rf`` with the pixel counts behind it
    (``positive_px_rf``, ``nucleus_px_rf``, for the slide's area-weighted ratio) and
    ``ratio_classifier`` / ``class_classifier``, NaN (class -1) outside kept tiles.
    """
    from daskpath.baselines import predict_tiles_classifier, predict_tiles_rf
    from daskpath.cluster import check_runnable, model_annotations

    part = _stage_path(out, slide, "baselines")
    tiles, keep = _kept_tiles(out, slide, cfg)
    if part.exists() and not cfg.overwrite:
        done = _done_table(part, keep)
        methods_done = {c.removeprefix("ratio_") for c in done.columns if c.startswith("ratio_")} \
            if done is not None else set()
        if set(cfg.baselines.methods) <= methods_done:
            log.info("slide %s: stage baselines already done", slide)
            return
    ds = _open_pair(he, ihc, cfg, out)
    kept = tiles.loc[keep, ["y0", "x0", "height", "width"]].reset_index(drop=True)
    tab = tiles[["slide", "y0", "x0"]].copy()
    idx = np.flatnonzero(keep)
    if "rf" in cfg.baselines.methods:
        for c in ("ratio_rf", "positive_px_rf", "nucleus_px_rf"):
            tab[c] = np.nan
        if len(kept):
            rf = client.compute(predict_tiles_rf(ds["he"].data, kept, cfg.baselines.rf_model,
                                                 compute=False), retries=cfg.retries).result()
            for c in ("ratio_rf", "positive_px_rf", "nucleus_px_rf"):
                tab.loc[idx, c] = rf[c].to_numpy(np.float64)
    if "classifier" in cfg.baselines.methods:
        tab["ratio_classifier"] = np.nan
        tab["class_classifier"] = -1
        if len(kept):
            ann = model_annotations(client)
            check_runnable(client, ann)
            cl = client.compute(predict_tiles_classifier(
                ds["he"].data, kept, cfg.baselines.classifier_model,
                batch_size=cfg.baselines.batch_size, resources=ann.get("resources"), compute=False,
            ), retries=cfg.retries).result()
            tab.loc[idx, "ratio_classifier"] = cl["ratio_classifier"].to_numpy(np.float64)
            tab.loc[idx, "class_classifier"] = cl["class_classifier"].to_numpy(np.int64)
    tab["measured"] = keep
    write_table(tab, part)


def _similarity_block(virtual: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Mean SSIM (design definition, float32 path) and PSNR (dB, RGB) of two RGB tiles."""
    from daskpath.similarity import gray, ssim_block

    s = float(ssim_block(gray(virtual), gray(real)).mean(dtype=np.float64))
    mse = float(np.mean((virtual.astype(np.float64) - real.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
    return np.array([s, psnr])


def _tile_similarity(client, virtual, real, tiles: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
    """Per kept tile: SSIM and PSNR of the virtual vs the real IHC (NaN for other tiles).

    The two sections are consecutive cuts, not the same cells, so these measure how IHC-like the
    virtual stain is (colour, texture, layout) rather than a pixel-exact match.
    """
    import dask

    out = np.full((len(tiles), 2), np.nan)
    idx = np.flatnonzero(keep)
    tasks = []
    for i in idx:
        r = tiles.iloc[i]
        sl = (slice(int(r.y0), int(r.y0 + r.height)), slice(int(r.x0), int(r.x0 + r.width)))
        tasks.append(dask.delayed(_similarity_block, pure=True)(virtual[sl], real[sl]))
    if tasks:
        res = client.gather(client.compute(tasks))
        out[idx] = np.array(res)
    return out


def _tile_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    return -(-shape[0] // size), -(-shape[1] // size)


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
        part["keep"] = keep_mask(part["tissue_fraction"], part["ssim"], cfg)
        row = summarize_slide(part, cfg, mpp)
        for stage, suffix in (("nuclei", "ihc"), ("translate", "virtual")):
            sp = _stage_path(out, slide, stage)
            if stage not in cfg.stages or not sp.exists():
                continue
            st = read_table(sp)
            part[f"ratio_{suffix}"] = st[f"ratio_{suffix}"].to_numpy()
            part[f"ki67_index_{suffix}"] = st[f"ki67_index_{suffix}"].to_numpy()
            for extra in ("ssim_virtual", "psnr_virtual"):
                if extra in st.columns:
                    part[extra] = st[extra].to_numpy()
            k = part["keep"].to_numpy()
            pa, aa = st[f"pos_area_{suffix}"].to_numpy()[k].sum(), st[f"all_area_{suffix}"].to_numpy()[k].sum()
            pn, an = st[f"pos_n_{suffix}"].to_numpy()[k].sum(), st[f"all_n_{suffix}"].to_numpy()[k].sum()
            row[f"ratio_{suffix}"] = pa / aa if aa > 0 else np.nan
            row[f"ki67_index_{suffix}"] = pn / an if an > 0 else np.nan
            row[f"nuclei_{suffix}"] = int(an)
        bp = _stage_path(out, slide, "baselines")
        if "baselines" in cfg.stages and bp.exists():
            st = read_table(bp)
            k = part["keep"].to_numpy()
            if "ratio_rf" in st.columns and "rf" in cfg.baselines.methods:
                part["ratio_rf"] = st["ratio_rf"].to_numpy()
                pos, nuc = st["positive_px_rf"].to_numpy()[k], st["nucleus_px_rf"].to_numpy()[k]
                row["ratio_rf"] = np.nansum(pos) / np.nansum(nuc) if np.nansum(nuc) > 0 else np.nan
            if "ratio_classifier" in st.columns and "classifier" in cfg.baselines.methods:
                part["ratio_classifier"] = st["ratio_classifier"].to_numpy()
                part["class_classifier"] = st["class_classifier"].to_numpy()
                # a tile-level class estimate: the slide value is the mean over kept tiles
                v = st["ratio_classifier"].to_numpy()[k]
                row["ratio_classifier"] = float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
        parts.append(part)
        rows.append(row)
    tiles = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TILE_COLUMNS)
    slides = pd.DataFrame(rows)
    write_table(tiles, out / "tiles.parquet")
    write_table(slides, out / "slides.csv")
    if "ratio_ihc" in tiles.columns:
        from daskpath.metrics import score_table
        from daskpath.outputs import write_json

        kept = tiles[tiles["keep"]] if len(tiles) else tiles
        metrics = {
            "truth": "ratio_ihc (area ratio on the real IHC, nuclei stage)",
            "tiles": score_table(kept),
            "slides": score_table(slides) if len(slides) else {},
            "n_tiles_kept": int(len(kept)),
            **(
                {
                    "image_similarity_virtual_vs_real": {
                        "ssim_mean": float(kept["ssim_virtual"].mean()),
                        "psnr_mean_db": float(kept["psnr_virtual"].replace(np.inf, np.nan).mean()),
                        "n": int(kept["ssim_virtual"].notna().sum()),
                        "note": "consecutive sections: how IHC-like the virtual stain is, "
                        "not a pixel-exact match",
                    }
                }
                if "ssim_virtual" in kept.columns
                else {}
            ),
            "n_slides": int(len(slides)),
        }
        write_json(metrics, out / "metrics.json")
    else:
        metrics = None
    fail_df = pd.DataFrame(failures, columns=["slide", "stage", "error"])
    fpath = out / "failures.csv"
    if failures:
        write_table(fail_df, fpath)
    elif fpath.exists():
        fpath.unlink()
    try:
        from daskpath.report import write_report

        write_report(out, tiles, slides, fail_df, cfg, metrics)
    except ImportError as e:  # matplotlib is optional (extra "report")
        log.warning("report.html not written: %s (pip install 'daskpath[report]')", e)
    return RunResult(out, tiles, slides, fail_df, time.perf_counter() - t0)


def _bars(progress, total: int, initial: int):
    """Two progress bars: slides (overall) and chunks (all stages)."""
    if progress is True:
        from tqdm.auto import tqdm

        return (
            tqdm(total=total, initial=initial, unit="slide", desc="slides", position=0),
            tqdm(total=0, unit="chunk", desc="chunks", position=1, leave=False),
        )
    return None


def _tick(bars, progress, slide: str, done: list[int], total: int) -> None:
    done[0] += 1
    if bars is not None:
        bars[0].update(1)
        bars[0].set_postfix_str(slide)
    elif callable(progress):
        progress(slide, done[0], total)
