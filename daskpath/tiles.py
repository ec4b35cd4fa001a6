"""Tile grid and per-tile reductions of chunked per-pixel maps.

A slide of shape (H, W) is cut into tiles of ``size`` px from the origin; edge tiles are kept
with their true (smaller) height/width. Per-tile statistics are computed without moving pixels:
every chunk of the per-pixel maps reduces itself to partial sums on the tile grid (one small task
output per chunk, whatever the chunk/tile alignment), and the partial sums are added in a tree.
Means are therefore exact (float64 sums) and independent of ``chunk_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import pandas as pd

from daskpath.errors import InvalidInputError

__all__ = ["chunk_tile_sums", "tile_grid", "tile_sums", "tile_means"]


def tile_grid(shape: tuple[int, int], size: int) -> pd.DataFrame:
    """Tiles covering an image of ``shape`` (y, x).

    Returns
    -------
    DataFrame with columns ``ty, tx, y0, x0, height, width`` in row-major order.
    """
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
