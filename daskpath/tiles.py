"""Tile grid, the tile table of a slide pair, and per-tile reductions of chunked per-pixel maps.

A slide of shape (H, W) is cut into tiles of ``size`` px from the origin; edge tiles are kept
with their true (smaller) height/width. Per-tile statistics are computed without moving pixels:
every chunk of the per-pixel maps reduces itself to partial sums on the tile grid (one small task
output per chunk, whatever the chunk/tile alignment), and the partial sums are added in a tree.
Means are therefore exact (float64 sums) and independent of ``chunk_size``.

:func:`tile_table` is the pipeline's tile table (``tiles.parquet``) of one pair from Python: it
runs the preprocess stage's own per-chunk kernel (``daskpath.stages.preprocess``), so it equals
the pipeline's table on the same pair and chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daskpath.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da
    import pandas as pd
    import xarray as xr
    from dask.delayed import Delayed

    from daskpath.config import Config

__all__ = ["chunk_tile_sums", "tile_grid", "tile_means", "tile_sums", "tile_table"]


def tile_grid(shape: tuple[int, int], size: int) -> pd.DataFrame:
    """Tiles covering an image of ``shape`` (y, x).

    Returns
    -------
    DataFrame with columns ``ty, tx, y0, x0, height, width`` in row-major order.
    """
    import pandas as pd

    if size <= 0:
        raise InvalidInputError(f"tile_grid: tile size must be > 0 px, got {size}")
    h, w = int(shape[0]), int(shape[1])
    ys = np.arange(0, h, size)
    xs = np.arange(0, w, size)
    ty, tx = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    y0 = ys[ty.ravel()]
    x0 = xs[tx.ravel()]
    return pd.DataFrame(
        {
            "ty": ty.ravel().astype(np.int32),
            "tx": tx.ravel().astype(np.int32),
            "y0": y0.astype(np.int64),
            "x0": x0.astype(np.int64),
            "height": np.minimum(size, h - y0).astype(np.int64),
            "width": np.minimum(size, w - x0).astype(np.int64),
        }
    )


def _edges(start: int, stop: int, size: int) -> tuple[np.ndarray, int]:
    """Offsets (relative to ``start``) where tiles begin inside [start, stop), and first tile."""
    first = start // size
    bounds = np.arange((first + 1) * size, stop, size) - start
    return np.concatenate([[0], bounds]).astype(np.intp), first


def chunk_tile_sums(
    blocks: Sequence[np.ndarray], loc: tuple[int, int, int, int], size: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Sums of each 2-D block over the tiles it intersects.

    Parameters
    ----------
    blocks : sequence of ndarray, shape (y1 - y0, x1 - x0)
        Per-pixel maps of one chunk.
    loc : (y0, y1, x0, x1)
        Where the chunk lies in the slide.
    size : int
        Tile side.

    Returns
    -------
    sums : ndarray, shape (n_ty_chunk, n_tx_chunk, len(blocks)), float64
    origin : (ty, tx)
        Global index of the first tile the chunk touches.
    """
    y0, y1, x0, x1 = loc
    ey, fy = _edges(y0, y1, size)
    ex, fx = _edges(x0, x1, size)
    # each tile band's rows are summed with a plain sum over axis 0 (row additions, vectorised
    # along x; ~10x faster than reduceat): integer counts for masks (exact), float64
    # accumulation for float maps; then the columns are reduced per tile
    h = y1 - y0
    bounds = list(ey) + [h]
    out = np.empty((len(ey), len(ex), len(blocks)), dtype=np.float64)
    for k, b in enumerate(blocks):
        acc = np.int64 if b.dtype == np.bool_ else np.float64
        for i in range(len(ey)):
            rows = b[bounds[i] : bounds[i + 1]].sum(axis=0, dtype=acc)
            out[i, :, k] = np.add.reduceat(rows, ex)
    return out, (fy, fx)


def _partial_sums(*blocks: np.ndarray, size: int, n_ty: int, n_tx: int, block_info=None):
    (y0, y1), (x0, x1) = block_info[0]["array-location"]
    s, (fy, fx) = chunk_tile_sums(blocks, (y0, y1, x0, x1), size)
    out = np.zeros((1, 1, n_ty, n_tx, len(blocks)), dtype=np.float64)
    out[0, 0, fy : fy + s.shape[0], fx : fx + s.shape[1]] = s
    return out


def tile_sums(maps: Sequence[da.Array], size: int) -> da.Array:
    """Per-tile sums of 2-D maps with identical shape and chunks.

    Parameters
    ----------
    maps : sequence of dask.array.Array, shape (y, x)
        Per-pixel maps (bool maps sum to pixel counts).
    size : int
        Tile side in pixels.

    Returns
    -------
    dask.array.Array, shape (n_ty, n_tx, len(maps)), float64
    """
    import dask.array as da

    if not maps:
        raise InvalidInputError("tile_sums: no maps given; pass at least one 2-D map")
    first = maps[0]
    for m in maps[1:]:
        if m.shape != first.shape:
            raise InvalidInputError(f"tile_sums: shapes differ {m.shape} vs {first.shape}; "
                                    "pass maps of one image")
    maps = [m if m.chunks == first.chunks else m.rechunk(first.chunks) for m in maps]
    n_ty = -(-first.shape[0] // size)
    n_tx = -(-first.shape[1] // size)
    nby, nbx = first.numblocks
    parts = da.map_blocks(
        _partial_sums,
        *maps,
        size=size,
        n_ty=n_ty,
        n_tx=n_tx,
        new_axis=[2, 3, 4],
        chunks=((1,) * nby, (1,) * nbx, (n_ty,), (n_tx,), (len(maps),)),
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0, 0), dtype=np.float64),
        token="tile-partial-sums",
    )
    return parts.sum(axis=(0, 1), split_every=8)


def tile_means(maps: Sequence[da.Array], size: int) -> da.Array:
    """Per-tile means of 2-D maps (sums divided by tile pixel counts), shape (n_ty, n_tx, k)."""
    sums = tile_sums(maps, size)
    h, w = maps[0].shape
    hh = np.minimum(size, h - np.arange(0, h, size))
    ww = np.minimum(size, w - np.arange(0, w, size))
    area = (hh[:, None] * ww[None, :]).astype(np.float64)
    return sums / area[:, :, None]


# --------------------------------------------------------------------------------------------
# the tile table of a pair (the pipeline's preprocess kernel, from Python)
# --------------------------------------------------------------------------------------------
def tile_table(
    pair: xr.Dataset | tuple[Any, Any],
    size: int | None = None,
    min_tissue: float | None = None,
    ssim_threshold: float | None = None,
    *,
    slide: str | None = None,
    config: Config | None = None,
    compute: bool = True,
) -> pd.DataFrame | Delayed:
    """The tile table of an H&E / IHC pair: the pipeline's ``tiles.parquet`` rows for it.

    Runs the preprocess stage's own per-chunk kernel
    (:func:`daskpath.stages.preprocess.preprocess_chunk`: tissue masks and SSIM map on the chunk
    plus its halo, reduced to per-tile sums; then ``tiles_from_sums`` and its keep rule), one
    task per chunk of ``pair``. On a pair opened with :func:`daskpath.open_pair` at the run's
    ``chunk_size`` the table equals the pipeline's, value for value; other chunkings agree to
    float rounding (~1e-7). Nothing is written.

    Parameters
    ----------
    pair : xarray.Dataset or (he, ihc)
        What :func:`daskpath.open_pair` returns (variables ``he``, ``ihc``), or two ``(y, x, 3)``
        uint8 arrays (DataArray, dask or NumPy) of one shape. Slides opened by daskpath are read
        through their picklable readers (one read per chunk, halo included, as in the pipeline);
        other arrays through dask, their chunks aligned so each is at least the halo.
    size : int, optional
        Tile side in px (``tiles.size``; default 1024).
    min_tissue : float, optional
        Minimum tissue fraction of a kept tile, in both sections (``tiles.min_tissue``; 0.5).
    ssim_threshold : float, optional
        Minimum mean SSIM of a kept tile (``ssim.threshold``; 0.4).
    slide : str, optional
        The ``slide`` column. Default: the H&E file's stem (the pipeline uses the manifest id).
    config : Config, optional
        Takes every other setting from it (``tissue.threshold``, ``tissue.sigma``,
        ``ssim.sigma``, ``ssim.dtype``, and the three above unless given); default
        :func:`daskpath.load_config`'s defaults. Values are validated as a run's are.
    compute : bool
        ``False``: return a :class:`dask.delayed.Delayed` of the table (compute it, or submit it
        to a ``distributed.Client``).

    Returns
    -------
    pandas.DataFrame
        One row per tile, row-major: ``slide, y0, x0, height, width, tissue_fraction,
        tissue_fraction_he, tissue_fraction_ihc, ssim, ssim_rigid, dy, dx, registered, qc_pen,
        qc_bubble, qc_fold, qc_blur, artefact, keep`` (artefact QC with ``qc.enabled``)
        (with ``registration.enabled``, the candidate tiles' alignment is refined in one
        extra task, as :mod:`daskpath.registration` describes) (the columns of ``tiles.parquet``
        before the model stages add theirs). ``tiles[tiles.keep]`` is what the model stages
        segment, and what :func:`daskpath.measure_nuclei` takes as ``region``.

    Raises
    ------
    InvalidInputError
        Not a pair of equal-shape ``(y, x, 3)`` uint8 images.
    ConfigError
        A setting out of range (a ``ValueError`` too), named by its config key.

    Examples
    --------
    >>> ds = daskpath.open_pair("a_HE.tif", "a_IHC.tif")           # doctest: +SKIP
    >>> tiles = daskpath.tile_table(ds, size=1024, slide="a")       # doctest: +SKIP
    >>> tiles[tiles.keep]                                           # doctest: +SKIP
    """
    import dask
    import dask.array as da

    from daskpath._halo import align_chunks
    from daskpath.resume import chunk_grid
    from daskpath.similarity import ssim_radius
    from daskpath.stages.preprocess import combine_sums, preprocess_chunk
    from daskpath.tissue import tissue_radius

    cfg = _table_config(config, size, min_tissue, ssim_threshold)
    he, ihc = _pair_arrays(pair)
    shape = (int(he.shape[0]), int(he.shape[1]))
    if slide is None:
        path = he.attrs.get("path") if hasattr(he, "attrs") else None
        slide = Path(str(path)).stem if path else "slide"
    kw = {"shape": shape, "tile": cfg.tiles.size, "tissue_threshold": cfg.tissue.threshold,
          "tissue_sigma": cfg.tissue.sigma, "ssim_sigma": cfg.ssim.sigma,
          "ssim_dtype": cfg.ssim.dtype, "layers": None, "factor": 0, "step": 1,
          "qc": cfg.qc.enabled}
    srcs = _readers(he, ihc)
    parts = []
    if srcs is not None:  # the pipeline's way: each task reads its chunk + halo itself
        for _, _, y0, y1, x0, x1 in chunk_grid(he.data.chunks[:2]):
            parts.append(dask.delayed(preprocess_chunk, pure=True)(
                loc=(y0, y1, x0, x1), he_src=srcs[0], ihc_src=srcs[1], **kw))
    else:  # any arrays: dask brings each chunk its halo (every chunk at least the halo)
        a = he.data if hasattr(he, "attrs") else he
        b = ihc.data if hasattr(ihc, "attrs") else ihc
        d = max(ssim_radius(cfg.ssim.sigma),
                tissue_radius(cfg.tissue.sigma) if cfg.tissue.sigma > 0 else 0)
        if cfg.qc.enabled:
            from daskpath.qc import qc_radius

            d = max(d, qc_radius())
        cy = align_chunks(a.chunks[0], min_size=d)
        cx = align_chunks(a.chunks[1], min_size=d)
        dy, dx = (d if len(cy) > 1 else 0), (d if len(cx) > 1 else 0)
        blocks = []
        for arr in (a, b):
            arr = arr.rechunk((cy, cx, -1))
            if dy or dx:
                arr = da.overlap.overlap(arr, depth={0: dy, 1: dx, 2: 0}, boundary="none",
                                         allow_rechunk=False)
            blocks.append(arr.to_delayed())
        for iy, ix, y0, y1, x0, x1 in chunk_grid((cy, cx)):
            origin = (max(0, y0 - dy), max(0, x0 - dx))
            parts.append(dask.delayed(_chunk_of_blocks, pure=True)(
                blocks[0][iy, ix, 0], blocks[1][iy, ix, 0], origin=origin,
                loc=(y0, y1, x0, x1), **kw))
    n_ty, n_tx = -(-shape[0] // cfg.tiles.size), -(-shape[1] // cfg.tiles.size)
    sums = dask.delayed(combine_sums, pure=True)(parts, n_ty, n_tx, 3)
    table = dask.delayed(partial(_table_from_sums, cfg=cfg), pure=True)(str(slide), shape, sums)
    if cfg.registration.enabled:
        if srcs is None:
            srcs = (_ArrayRegions(he), _ArrayRegions(ihc))
        table = dask.delayed(partial(_registered, cfg=cfg), pure=True)(table, srcs[0], srcs[1], shape)
    return table.compute() if compute else table


class _ArrayRegions:
    """Picklable ``src[ys, xs]`` over a NumPy / dask / xarray image (dask computes only the region)."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr.data if hasattr(arr, "attrs") else arr

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        region = self.arr[key]
        return np.asarray(region.compute(scheduler="sync") if hasattr(region, "compute") else region)


def _registered(table: pd.DataFrame, he_src: Any, ihc_src: Any, shape: tuple[int, int], *,
                cfg: Config) -> pd.DataFrame:
    """The table with registration refinement applied (all candidate tiles in this one task)."""
    from daskpath.stages.preprocess import apply_registration, registration_tasks

    tasks = registration_tasks(table, cfg, he_src, ihc_src, shape)
    return apply_registration(table, [(rows, t.compute(scheduler="sync")) for rows, t in tasks], cfg)


def _table_from_sums(slide: str, shape: tuple[int, int], sums: np.ndarray, *, cfg: Config
                     ) -> pd.DataFrame:
    from daskpath.stages.preprocess import tiles_from_sums

    return tiles_from_sums(slide, shape, sums, cfg)


def _table_config(config: Config | None, size: Any, min_tissue: Any, ssim_threshold: Any) -> Config:
    """``config`` (or the defaults) with the given keys replaced, validated like a run's."""
    from daskpath.config import Config, load_config

    if config is not None and not isinstance(config, Config):
        raise InvalidInputError(f"tile_table: config must be a daskpath Config (from "
                                f"daskpath.load_config), got {type(config).__name__}")
    over: dict[str, Any] = config.to_dict() if config is not None else {}
    tiles = dict(over.get("tiles", {}))
    ssim = dict(over.get("ssim", {}))
    if size is not None:
        tiles["size"] = size
    if min_tissue is not None:
        tiles["min_tissue"] = min_tissue
    if ssim_threshold is not None:
        ssim["threshold"] = ssim_threshold
    if tiles:
        over["tiles"] = tiles
    if ssim:
        over["ssim"] = ssim
    return load_config(None, over)


def _pair_arrays(pair: Any) -> tuple[Any, Any]:
    """``(he, ihc)`` of a Dataset or a 2-tuple, checked: equal (y, x, 3) uint8 shapes."""
    import sys

    import dask.array as da

    xr = sys.modules.get("xarray")
    if xr is not None and isinstance(pair, xr.Dataset):
        missing = [v for v in ("he", "ihc") if v not in pair.data_vars]
        if missing:
            raise InvalidInputError(f"tile_table: the Dataset has no variable(s) "
                                    f"{', '.join(missing)} (has {', '.join(map(str, pair.data_vars))}); "
                                    "open it with daskpath.open_pair")
        he, ihc = pair["he"], pair["ihc"]
    elif isinstance(pair, tuple | list) and len(pair) == 2:
        he, ihc = pair
    else:
        raise InvalidInputError(f"tile_table: expected the Dataset of daskpath.open_pair or an "
                                f"(he, ihc) pair of arrays, got {type(pair).__name__}")
    out = []
    for name, a in (("he", he), ("ihc", ihc)):
        if xr is not None and isinstance(a, xr.DataArray):
            if not isinstance(a.data, da.Array):
                a = a.copy(data=da.asarray(a.data))
        elif not isinstance(a, da.Array):
            a = da.asarray(a)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise InvalidInputError(f"tile_table: {name} must be (y, x, 3) uint8 RGB, got "
                                    f"{tuple(a.shape)} {a.dtype}")
        out.append(a)
    if out[0].shape != out[1].shape:
        raise InvalidInputError(f"tile_table: he is {tuple(out[0].shape)} but ihc is "
                                f"{tuple(out[1].shape)}: register and crop the pair to a common size")
    return out[0], out[1]


def _readers(he: Any, ihc: Any) -> tuple[Any, Any] | None:
    """The slides' picklable region readers, or None when either is not an opened slide."""
    from daskpath.io import region_source

    if not (hasattr(he, "encoding") and hasattr(ihc, "encoding")):
        return None
    try:
        return region_source(he), region_source(ihc)
    except InvalidInputError:
        return None


class _Block:
    """A region reader over one halo'd block held in memory: ``src[ys, xs]`` in slide pixels."""

    def __init__(self, block: np.ndarray, origin: tuple[int, int]) -> None:
        self.block, self.origin = block, origin

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        oy, ox = self.origin
        h, w = self.block.shape[:2]
        y0, y1, x0, x1 = ys.start - oy, ys.stop - oy, xs.start - ox, xs.stop - ox
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:  # pragma: no cover - guards the halo rule
            raise RuntimeError(f"tile_table: region {key} is outside the block at {self.origin} "
                               f"of shape {(h, w)}")
        return self.block[y0:y1, x0:x1]


def _chunk_of_blocks(he: np.ndarray, ihc: np.ndarray, *, origin: tuple[int, int],
                     **kw: Any) -> dict[str, np.ndarray]:
    """The preprocess kernel on blocks that dask brought with their halo."""
    from daskpath.stages.preprocess import preprocess_chunk

    return preprocess_chunk(he_src=_Block(np.asarray(he), origin),
                            ihc_src=_Block(np.asarray(ihc), origin), **kw)
