"""Phantom H&E / Ki67 IHC slide pairs with known ground truth.

A synthetic pair is two consecutive "sections" of the same phantom tissue:

* **H&E**: white glass background, irregular tissue with lumens, pink fibrous stroma (eosin) and
  hematoxylin nuclei. Ki67-positive nuclei are recognisable by morphology only: larger, darker,
  with a lobulated outline; negatives are small, round and lighter.
* **Ki67 IHC**: the same nuclei, shifted by a known rigid ``offset`` and slightly perturbed (centre
  jitter of about 1 px, size +-5 %, about 2 % dropped and 1-2 % added), on a pale hematoxylin
  counterstain. Positive nuclei are brown (DAB), negatives blue (hematoxylin).

Colours are built with the Beer-Lambert law from the HED stain vectors that
:func:`skimage.color.rgb2hed` uses (``OD = c_H v_H + c_E v_E + c_D v_D``,
``rgb = 255 * 10**-OD``), so colour deconvolution recovers the DAB and hematoxylin channels.

The share of Ki67-positive nuclei follows a smooth field (a left-to-right gradient plus
low-frequency noise), so 1024 px tiles cover the ratio bins 0-0.2, 0.2-0.5 and 0.5-1.

Determinism and chunk independence
----------------------------------
Every pixel is a function of ``(seed, global coordinates)`` only: random numbers come from a
counter-based hash (splitmix64) of the seed, a stream number and integer lattice or cell
coordinates, never from a sequential generator, and all per-pixel arithmetic is elementwise
(no reductions, no BLAS). Nuclei live on a jittered grid of cells of ``~25 px`` (at 0.5 mpp); a
block is rendered with a halo of whole cells, so nuclei straddling block borders are drawn
identically from every block that sees them. Consequently :func:`render_region` of any window
equals the same window of the full slide, bit for bit, and the written files do not depend on
``chunk``. Overlaps between neighbouring nuclei (a few pixels at most) are resolved by a fixed
global order (cells of the four parity classes of ``(cell_y % 2, cell_x % 2)`` drawn in turn; two
nuclei of one class can never touch).

Files written by :func:`make_pair` (``layout="tiled"``)
-------------------------------------------------------
``<slide>_HE.tif``, ``<slide>_IHC.tif``
    Pyramidal tiled TIFF (levels /2, /4, ... as SubIFDs until the smallest is under 1024 px),
    JPEG (quality 90, RGB photometric, no chroma subsampling), resolution tags in pixels per
    centimetre (``1e4 / mpp``) so ``tiffslide`` reports ``tiffslide.mpp-x``.
``<slide>_truth.parquet``
    One row per nucleus of the IHC: ``id, y, x, area, positive, cut, y_he, x_he, area_he``
    (centroids and areas from the label images, IHC pixel coordinates for ``y, x``; ``cut`` marks
    nuclei touching the image border; ``*_he`` are NaN / 0 for nuclei absent from the H&E).
``<slide>_truth.zarr``
    Zarr v3 group with chunked arrays ``ihc_labels`` (int32, ids = parquet ``id``),
    ``he_labels`` (int32, same ids) and ``tissue`` (bool, IHC frame).
``<slide>_truth.json``
    ``slide, size, seed, offset, mpp, tile_size, layout, n_nuclei, n_positive, ...``.

``layout="png"`` writes flat RGB PNGs (``<slide>_HE.png``), streamed row band by row band with
our own minimal PNG writer (zlib level 1, "Sub" filter), so memory stays bounded at any size.
``layout="stripped"`` writes flat stripped TIFFs (64 rows per strip, deflate), also streamed.
``layout="zarr"`` writes OME-NGFF 0.5 images (``<slide>_HE.ome.zarr``, :mod:`daskpath.ome`:
axes ``c, y, x`` in micrometres, chunks of ``tile_size``, pyramid until the largest side is at
most 1024 px), the layout :func:`daskpath.io.ingest` produces.

Memory and speed (2-core CI machine, Python 3.11, numpy 2.4)
------------------------------------------------------------
Rows of ``chunk`` pixels are rendered in 1024 px blocks on a small thread pool (at most
``2 * workers`` blocks in flight), written and dropped; pyramid levels are downsampled from each
band and spooled to a temporary raw file, so peak memory is about ``chunk * width * 3`` bytes plus
working arrays, independent of the slide height. Measured with ``make_pair(size=(n, n))``
(``tiled``, ``chunk=2048``, ``workers=2``) on a machine shared with other jobs (load ~8), so wall
times are pessimistic; CPU time (user + sys) is the load-independent figure:

* 4096^2 pair with truth: ~7.6 s CPU.
* 8192^2 pair with truth and pyramid: 31.6 s CPU (77 s wall under load; ~16-20 s expected on
  an idle 2-core machine), peak RSS 459 MB.
* 16384^2 pair: 109 s CPU, peak RSS 688 MB (including ~250 MB of imported libraries), while a
  single decoded RGB image is 805 MB and a label array 1074 MB.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from daskpath.errors import InvalidInputError

__all__ = [
    "SyntheticPair",
    "make_pair",
    "make_cohort",
    "render_region",
    "RGB_FROM_HED",
    "DEFAULT_OFFSET",
]

#: Stain vectors (rows: hematoxylin, eosin, DAB), as in ``skimage.color.rgb_from_hed``.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
#: Default rigid offset ``(dy, dx)`` of the IHC section relative to the H&E, in pixels.
DEFAULT_OFFSET: tuple[int, int] = (1, -1)
# The reference cohort is registered, so the residual rigid offset is small. With the per-nucleus
# jitter (~1 px) and independent textures this puts fully-tissue 1024-px tiles at SSIM ~0.38-0.45,
# around the default ssim.threshold of 0.4, so the keep rule is exercised on both sides; an offset
# of 2 px already drops them to ~0.3 (fine structure decorrelates fast), 6 px to ~0.24.

Stain = Literal["he", "ihc"]
Layout = Literal["tiled", "png", "stripped", "zarr"]
PositiveField = float | Callable[[np.ndarray, np.ndarray], np.ndarray] | None

#: Eosin vector used to render the H&E: pinker than skimage's (which renders magenta); the
#: hematoxylin and DAB vectors are exactly skimage's, so ``rgb2hed`` unmixes the IHC cleanly.
_EOSIN_HE = np.array([0.08, 0.85, 0.45]) / np.linalg.norm([0.08, 0.85, 0.45])
_PERIODS = (509, 521)

_BLOCK = 1024  # render block edge (pixels); zarr truth chunks use the same edge
_NODE = 8  # smooth fields live on a global node grid of this spacing, bilinear in between
_MIN_LEVEL = 1024  # pyramid: keep halving while the smallest level is at least this big

# ---------------------------------------------------------------------------------------------
# counter-based random numbers
# ---------------------------------------------------------------------------------------------
_U64 = np.uint64
_K1 = _U64(0x9E3779B97F4A7C15)
_K2 = _U64(0xD1B54A32D192ED03)
_K3 = _U64(0xABC98388FB8FAC03)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)


def _key(seed: int, stream: int) -> np.uint64:
    """Return a 64-bit key for ``(seed, stream)`` (splitmix64 of the pair)."""
    z = (int(seed) * 0x100000001B3 + int(stream) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (
        1 << 64
    )
    for _ in range(2):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % (1 << 64)
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % (1 << 64)
        z ^= z >> 31
    return _U64(z)


def _hash01(key: np.uint64, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Uniform floats in ``[0, 1)`` from integer coordinates ``a, b`` (broadcast), float64."""
    z = (np.asarray(a, dtype=np.int64).astype(_U64) * _K2) ^ (
        np.asarray(b, dtype=np.int64).astype(_U64) * _K3
    )
    z = z ^ key
    z = z + _K1
    z = (z ^ (z >> _U64(30))) * _M1
    z = (z ^ (z >> _U64(27))) * _M2
    z = z ^ (z >> _U64(31))
    return (z >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _vnoise(
    key: np.uint64,
    ys: np.ndarray,
    xs: np.ndarray,
    sy: float,
    sx: float,
    dtype: type = np.float64,
) -> np.ndarray:
    """Value noise in ``[-1, 1]`` on the grid ``ys x xs`` (global pixel coordinates).

    Lattice spacing ``(sy, sx)``; smoothstep weights; separable evaluation. Each output value
    depends only on its own coordinates (elementwise arithmetic), so any sub-grid gives the
    same values as the full grid.
    """
    qy = np.asarray(ys, dtype=np.float64) / sy
    qx = np.asarray(xs, dtype=np.float64) / sx
    iy = np.floor(qy).astype(np.int64)
    ix = np.floor(qx).astype(np.int64)
    fy = _smoothstep(qy - iy).astype(dtype)
    fx = _smoothstep(qx - ix).astype(dtype)
    ly0, lx0 = int(iy.min()), int(ix.min())
    ly = np.arange(ly0, int(iy.max()) + 2)
    lx = np.arange(lx0, int(ix.max()) + 2)
    lat = (_hash01(key, ly[:, None], lx[None, :]) * 2.0 - 1.0).astype(dtype)
    ry = iy - ly0
    t = (1 - fy)[:, None] * lat[ry] + fy[:, None] * lat[ry + 1]
    rx = ix - lx0
    return (1 - fx)[None, :] * t[:, rx] + fx[None, :] * t[:, rx + 1]


# streams of the hash (one per independent random quantity)
_S_TISSUE = (1, 2, 3)
_S_LUMEN = (4, 5)
_S_DENS = (6, 7)
_S_POS = (8, 9)
_S_VAR = 10
_S_ORI = 11
_S_WARP = (12, 13)
_S_CELL = 100  # + k: per-cell variates
_S_TEX = {"he": (200, 201, 202, 203), "ihc": (300, 301, 302, 303)}


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    height: int
    width: int
    seed: int
    offset: tuple[int, int]
    mpp: float
    cell: int
    jitter: float  # max |centre - cell centre| per axis (H&E)
    rmax: float  # hard cap on any nucleus extent from its centre
    pad: int  # cells of padding around the slide in id space
    ncols: int

    @classmethod
    def build(
        cls, size: tuple[int, int], seed: int, offset: tuple[int, int] | None, mpp: float
    ) -> _Geometry:
        h, w = _check_size(size)
        if not (isinstance(mpp, (int, float)) and 0.05 <= float(mpp) <= 10.0):
            raise InvalidInputError(
                f"synthetic: mpp={mpp!r} is out of range; use 0.05-10 (0.5 = 20x)")
        off = DEFAULT_OFFSET if offset is None else (int(offset[0]), int(offset[1]))
        if max(abs(off[0]), abs(off[1])) > 256:
            raise InvalidInputError(
                f"synthetic: offset={offset!r} is too large; use |dy|, |dx| <= 256")
        s = 0.5 / float(mpp)
        cell = max(8, int(round(25 * s)))
        jitter = 6.0 * cell / 25.0
        rmax = 12.5 * cell / 25.0
        pad = int(math.ceil((max(abs(off[0]), abs(off[1])) + rmax + jitter) / cell)) + 2
        ncols = int(math.ceil(w / cell)) + 2 * pad
        nrows = int(math.ceil(h / cell)) + 2 * pad
        if nrows * ncols >= 2**31 - 1:
            raise InvalidInputError(f"synthetic: size={size!r} is too large for int32 nucleus ids")
        return cls(h, w, int(seed), off, float(mpp), cell, jitter, rmax, pad, ncols)

    @property
    def n_ids(self) -> int:
        nrows = int(math.ceil(self.height / self.cell)) + 2 * self.pad
        return nrows * self.ncols + 1


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(size[0]), int(size[1]))
    except (TypeError, ValueError, IndexError):
        raise InvalidInputError(
            f"synthetic: size={size!r} must be (height, width) integers") from None
    if h < 64 or w < 64:
        raise InvalidInputError(f"synthetic: size={size!r} is too small; use at least (64, 64)")
    return h, w


def _fbm(seed: int, streams: tuple[int, ...], spacings: tuple[float, ...], ys, xs) -> np.ndarray:
    out = np.zeros((len(ys), len(xs)))
    amp, total = 1.0, 0.0
    for st, sp in zip(streams, spacings, strict=True):
        out += amp * _vnoise(_key(seed, st), ys, xs, sp, sp)
        total += amp
        amp *= 0.5
    return out / total


class _Fields:
    """Smooth fields on the global node grid covering a frame region (with margin).

    Fields: ``tissue`` score (> 0 is tissue), ``lumen`` (> 0 is a hole), ``dens`` in [0, 1],
    ``pos`` (Ki67 positive probability), ``var`` (stain intensity variation), ``ori`` (fibre
    orientation blend in [0, 1]).
    """

    def __init__(self, g: _Geometry, fy0: int, fy1: int, fx0: int, fx1: int, pf: PositiveField):
        self.ny0 = fy0 // _NODE
        self.nx0 = fx0 // _NODE
        ny = np.arange(self.ny0, (fy1 - 1) // _NODE + 2) * _NODE
        nx = np.arange(self.nx0, (fx1 - 1) // _NODE + 2) * _NODE
        h, w, seed = g.height, g.width, g.seed
        yn = (ny / h)[:, None]
        xn = (nx / w)[None, :]
        envelope = 1.0 - (((yn - 0.5) / 0.46) ** 2 + ((xn - 0.5) / 0.48) ** 2)
        tissue = envelope + 0.9 * _fbm(seed, _S_TISSUE, (900.0, 450.0, 225.0), ny, nx) - 0.3
        lumen = _fbm(seed, _S_LUMEN, (150.0, 75.0), ny, nx) - 0.5
        dens = np.clip(0.5 + 1.1 * _fbm(seed, _S_DENS, (420.0, 210.0), ny, nx), 0.0, 1.0)
        if pf is None:
            pos = (
                1.3 * (0.8 * xn + 0.2 * yn)
                - 0.4
                + 0.45 * _fbm(seed, _S_POS, (700.0, 350.0), ny, nx)
            )
        elif callable(pf):
            yy, xx = np.broadcast_arrays(yn, xn)
            pos = np.asarray(pf(yy, xx), dtype=np.float64) * np.ones_like(yy)
        else:
            pos = np.full((len(ny), len(nx)), float(pf))
        pos = np.clip(pos, 0.0, 1.0)
        var = _vnoise(_key(seed, _S_VAR), ny, nx, 200.0, 200.0)
        ori = np.clip(0.5 + 1.5 * _vnoise(_key(seed, _S_ORI), ny, nx, 160.0, 160.0), 0.0, 1.0)
        warp_y = _vnoise(_key(seed, _S_WARP[0]), ny, nx, 48.0, 48.0)
        warp_x = _vnoise(_key(seed, _S_WARP[1]), ny, nx, 48.0, 48.0)
        self.nodes = {
            "warp_y": warp_y,
            "warp_x": warp_x,
            "tissue": tissue,
            "lumen": lumen,
            "dens": dens,
            "pos": pos,
            "var": var,
            "ori": ori,
        }

    def pixels(self, name: str, fy0: int, fy1: int, fx0: int, fx1: int) -> np.ndarray:
        """Bilinear upsampling of a node field to pixels ``[fy0, fy1) x [fx0, fx1)``, float32."""
        n = self.nodes[name].astype(np.float32)
        ys = np.arange(fy0, fy1)
        xs = np.arange(fx0, fx1)
        iy = ys // _NODE - self.ny0
        ix = xs // _NODE - self.nx0
        wy = ((ys % _NODE) / _NODE).astype(np.float32)[:, None]
        wx = ((xs % _NODE) / _NODE).astype(np.float32)[None, :]
        t = (1 - wy) * n[iy] + wy * n[iy + 1]
        return (1 - wx) * t[:, ix] + wx * t[:, ix + 1]

    def points(self, name: str, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Bilinear value of a node field at points (float64)."""
        n = self.nodes[name]
        fy = np.floor(ys / _NODE)
        fx = np.floor(xs / _NODE)
        iy = fy.astype(np.int64) - self.ny0
        ix = fx.astype(np.int64) - self.nx0
        wy = ys / _NODE - fy
        wx = xs / _NODE - fx
        t0 = (1 - wy) * n[iy, ix] + wy * n[iy + 1, ix]
        t1 = (1 - wy) * n[iy, ix + 1] + wy * n[iy + 1, ix + 1]
        return (1 - wx) * t0 + wx * t1


# ---------------------------------------------------------------------------------------------
# nuclei
# ---------------------------------------------------------------------------------------------
@dataclass
class _Nuclei:
    ids: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    parity: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    amp: np.ndarray
    lobes: np.ndarray
    phase: np.ndarray
    positive: np.ndarray
    conc: np.ndarray  # stain strength factor


def _cells(g: _Geometry, fields: _Fields, fy0, fy1, fx0, fx1, stain: Stain) -> _Nuclei:
    """Nuclei whose pixels may fall in the frame region ``[fy0, fy1) x [fx0, fx1)``."""
    c = g.cell
    reach = g.rmax + g.jitter + 2.0
    cy = np.arange(int(math.floor((fy0 - reach - c) / c)), int(math.floor((fy1 + reach) / c)) + 1)
    cx = np.arange(int(math.floor((fx0 - reach - c) / c)), int(math.floor((fx1 + reach) / c)) + 1)
    cyy, cxx = (a.ravel() for a in np.meshgrid(cy, cx, indexing="ij"))

    def u(k: int) -> np.ndarray:
        return _hash01(_key(g.seed, _S_CELL + k), cyy, cxx)

    # H&E frame geometry (shared by both stains)
    ycen = (cyy + 0.5) * c + (u(0) * 2 - 1) * g.jitter
    xcen = (cxx + 0.5) * c + (u(1) * 2 - 1) * g.jitter
    tissue = fields.points("tissue", ycen, xcen)
    lumen = fields.points("lumen", ycen, xcen)
    dens = fields.points("dens", ycen, xcen)
    pos_p = fields.points("pos", ycen, xcen)
    inside = (tissue > 0.08) & (lumen < -0.04)  # centre well inside tissue, off lumens
    p_present = 0.3 + 0.68 * dens
    present_he = inside & (u(2) < p_present)
    positive = u(3) < pos_p
    s = c / 25.0
    # stroma (low density): elongated fibroblast-like nuclei
    stromal = dens < 0.3
    a_neg = (5.0 + 3.0 * u(4)) * s
    a_pos = (8.0 + 3.5 * u(4)) * s
    a = np.where(positive, a_pos, np.where(stromal, a_neg * 1.25, a_neg))
    ratio = np.where(
        positive, 0.72 + 0.23 * u(5), np.where(stromal, 0.35 + 0.25 * u(5), 0.75 + 0.25 * u(5))
    )
    amp = np.where(positive, 0.07 + 0.1 * u(6), 0.0)
    lobes = np.where(u(7) < 0.5, 3.0, np.where(u(7) < 0.8, 4.0, 5.0))
    phase = u(8) * 2 * np.pi
    theta = u(9) * np.pi
    # keep nuclei mostly inside their cell (barely overlapping neighbours)
    room = np.minimum(
        np.minimum(ycen - cyy * c, (cyy + 1) * c - ycen),
        np.minimum(xcen - cxx * c, (cxx + 1) * c - xcen),
    )
    a = np.minimum(a, room + 4.0 * s)
    conc = 0.85 + 0.3 * u(10)
    if stain == "ihc":
        dropped = u(11) < 0.02
        added = inside & ~present_he & (u(12) < 0.02)
        present = (present_he & ~dropped) | added
        jy = np.clip((u(13) + u(14) - 1.0) * 1.2, -1.5, 1.5)
        jx = np.clip((u(15) + u(16) - 1.0) * 1.2, -1.5, 1.5)
        ycen = ycen + jy
        xcen = xcen + jx
        size = 0.95 + 0.1 * u(17)
        a = a * size
        theta = theta + (u(18) - 0.5) * 0.3
        conc = 0.85 + 0.3 * u(19)
    else:
        present = present_he
    # hard cap of the extent (guarantees that one parity class never touches)
    a = np.minimum(a, g.rmax / (1.0 + amp) - 0.5)
    b = a * ratio
    ids = (cyy + g.pad) * g.ncols + (cxx + g.pad) + 1
    parity = (cyy % 2) * 2 + (cxx % 2)
    m = present
    return _Nuclei(
        ids=ids[m].astype(np.int32),
        cy=ycen[m],
        cx=xcen[m],
        parity=parity[m],
        a=a[m],
        b=b[m],
        theta=theta[m],
        amp=amp[m],
        lobes=lobes[m],
        phase=phase[m],
        positive=positive[m],
        conc=conc[m],
    )


def _rasterise(
    nuc: _Nuclei, g: _Geometry, fy0: int, fy1: int, fx0: int, fx1: int
) -> tuple[np.ndarray, np.ndarray]:
    """Index image (``-1`` = no nucleus, else index into ``nuc``) and normalised radius."""
    h, w = fy1 - fy0, fx1 - fx0
    index = np.full((h, w), -1, dtype=np.int32)
    rho = np.zeros((h, w), dtype=np.float32)
    r = int(math.ceil(g.rmax)) + 1
    off = np.arange(-r, r + 1)
    for par in range(4):
        sel = np.flatnonzero(nuc.parity == par)
        if sel.size == 0:
            continue
        ry = np.round(nuc.cy[sel]).astype(np.int64)
        rx = np.round(nuc.cx[sel]).astype(np.int64)
        py = ry[:, None, None] + off[None, :, None]  # (n, B, 1)
        px = rx[:, None, None] + off[None, None, :]  # (n, 1, B)
        dy = (py - nuc.cy[sel, None, None]).astype(np.float32)
        dx = (px - nuc.cx[sel, None, None]).astype(np.float32)
        ct = np.cos(nuc.theta[sel]).astype(np.float32)[:, None, None]
        st = np.sin(nuc.theta[sel]).astype(np.float32)[:, None, None]
        uu = (dx * ct + dy * st) / nuc.a[sel, None, None].astype(np.float32)
        vv = (dy * ct - dx * st) / nuc.b[sel, None, None].astype(np.float32)
        rr = np.sqrt(uu * uu + vv * vv)
        lob = nuc.amp[sel] > 0
        if lob.any():
            li = np.flatnonzero(lob)
            ang = np.arctan2(vv[li], uu[li])
            bound = 1.0 + nuc.amp[sel][li, None, None].astype(np.float32) * np.cos(
                nuc.lobes[sel][li, None, None].astype(np.float32) * ang
                + nuc.phase[sel][li, None, None].astype(np.float32)
            )
            rr[li] = rr[li] / bound
        inside = (rr <= 1.0) & (py >= fy0) & (py < fy1) & (px >= fx0) & (px < fx1)
        k, iy, ix = np.nonzero(inside)
        yy = (py[k, iy, 0] - fy0).astype(np.intp)
        xx = (px[k, 0, ix] - fx0).astype(np.intp)
        index[yy, xx] = sel[k]
        rho[yy, xx] = rr[k, iy, ix]
    return index, rho


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _od_to_rgb(
    c_h: np.ndarray,
    c_e: np.ndarray | None,
    c_d: np.ndarray | None,
    bg: np.ndarray,
    eosin: np.ndarray = RGB_FROM_HED[1],
) -> np.ndarray:
    """Beer-Lambert: ``rgb = 255 * 10**-(bg + c_H v_H + c_E v_E + c_D v_D)``, uint8."""
    out = np.empty((*c_h.shape, 3), dtype=np.uint8)
    for ch in range(3):
        od = bg + c_h * np.float32(RGB_FROM_HED[0, ch])
        if c_e is not None:
            od = od + c_e * np.float32(eosin[ch])
        if c_d is not None:
            od = od + c_d * np.float32(RGB_FROM_HED[2, ch])
        val = np.float32(255.0) * np.power(np.float32(10.0), -od)
        out[..., ch] = np.clip(np.floor(val + np.float32(0.5)), 0, 255).astype(np.uint8)
    return out


@functools.lru_cache(maxsize=16)
def _texture_tables(seed: int, stain: Stain) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Periodic noise tables (periods 509 and 521 px, coprime), per seed and stain.

    A texture at pixel ``(y, x)`` is ``(T1[y % 509, x % 509] + T2[y % 521, x % 521]) / 2``:
    cheap lookups whose combined period (265,189 px) is far beyond any slide.
    """
    from scipy import ndimage as ndi

    base = _S_TEX[stain][0]
    out: dict[str, list[np.ndarray]] = {"speck": [], "fine": [], "fib_h": [], "fib_v": []}
    for k, per in enumerate(_PERIODS):
        i = np.arange(per)
        white = _hash01(_key(seed, base + k), i[:, None], i[None, :]) * 2.0 - 1.0
        for name, sigma in (("fine", 1.0), ("fib_h", (0.6, 7.0)), ("fib_v", (7.0, 0.6))):
            t = ndi.gaussian_filter(white, sigma, mode="wrap")
            out[name].append((t / (2.0 * t.std())).astype(np.float32))
        out["speck"].append((white * 0.5).astype(np.float32))
    return {k: (v[0], v[1]) for k, v in out.items()}


def _lookup(tables: tuple[np.ndarray, np.ndarray], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Texture at the grid ``ys x xs`` (1-D) or at pixel index arrays of equal shape (2-D)."""
    a, b = tables
    if ys.ndim == 1:
        ta = a[ys % _PERIODS[0]][:, xs % _PERIODS[0]]
        tb = b[ys % _PERIODS[1]][:, xs % _PERIODS[1]]
    else:
        ta = a[ys % _PERIODS[0], xs % _PERIODS[0]]
        tb = b[ys % _PERIODS[1], xs % _PERIODS[1]]
    return (ta + tb) * np.float32(0.5)


def _render(
    g: _Geometry, y0: int, x0: int, h: int, w: int, stain: Stain, pf: PositiveField
) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Nuclei]:
    """Render image pixels ``[y0, y0+h) x [x0, x0+w)`` of one stain.

    Returns ``rgb`` (uint8), ``labels`` (int32 nucleus ids, 0 = none), ``tissue`` (bool) and the
    nuclei considered (a superset of those visible).
    """
    dy, dx = g.offset if stain == "ihc" else (0, 0)
    fy0, fx0 = y0 - dy, x0 - dx  # frame (H&E) coordinates
    fy1, fx1 = fy0 + h, fx0 + w
    margin = int(math.ceil(g.rmax + g.jitter)) + 3 * g.cell
    fields = _Fields(g, fy0 - margin, fy1 + margin, fx0 - margin, fx1 + margin, pf)
    nuc = _cells(g, fields, fy0, fy1, fx0, fx1, stain)
    index, rho = _rasterise(nuc, g, fy0, fy1, fx0, fx1)

    ys = np.arange(fy0, fy1)
    xs = np.arange(fx0, fx1)
    tables = _texture_tables(g.seed, stain)
    f32 = np.float32
    tissue_s = fields.pixels("tissue", fy0, fy1, fx0, fx1)
    lumen_s = fields.pixels("lumen", fy0, fy1, fx0, fx1)
    tissue = (tissue_s > 0) & (lumen_s < 0)
    alpha = np.clip(tissue_s * f32(25.0), 0, 1) * np.clip(-lumen_s * f32(25.0), 0, 1)
    del lumen_s, tissue_s
    var = fields.pixels("var", fy0, fy1, fx0, fx1)
    fine = _lookup(tables["fine"], ys, xs)  # ~[-1, 1], smooth over ~2 px
    speck = _lookup(tables["speck"], ys, xs)  # white, [-0.5, 0.5]
    bg = f32(0.018) + f32(0.010) * speck + f32(0.004) * fine

    nmask = index >= 0
    idx = np.where(nmask, index, 0)
    if nuc.ids.size:
        labels = np.where(nmask, nuc.ids[idx], 0).astype(np.int32)
        conc = nuc.conc.astype(f32)[idx]
        posm = nuc.positive[idx] & nmask
    else:
        labels = np.zeros((h, w), np.int32)
        conc = np.ones((h, w), f32)
        posm = np.zeros((h, w), bool)
    del idx, index
    chrom = f32(0.85) + f32(0.18) * fine + f32(0.2) * speck + f32(0.2) * rho**4
    del rho

    # tissue architecture (collagen fibres, epithelial areas) is shared by both sections, in
    # frame coordinates: the IHC's hematoxylin counterstain shows it too, paler
    ori = fields.pixels("ori", fy0, fy1, fx0, fx1)
    dens = fields.pixels("dens", fy0, fy1, fx0, fx1)
    wy = ys[:, None] + np.round(f32(9.0) * fields.pixels("warp_y", fy0, fy1, fx0, fx1))
    wx = xs[None, :] + np.round(f32(9.0) * fields.pixels("warp_x", fy0, fy1, fx0, fx1))
    wy = wy.astype(np.int64)
    wx = wx.astype(np.int64)
    he_tables = _texture_tables(g.seed, "he")
    fa = _lookup(he_tables["fib_h"], wy, wx)
    fb = _lookup(he_tables["fib_v"], wy, wx)
    del wy, wx
    fib = np.clip(f32(0.55) + f32(0.6) * (ori * fa + (f32(1) - ori) * fb), 0, 1)
    fib = fib * fib
    epi = np.clip((dens - f32(0.45)) * f32(4.0), 0, 1)
    if stain == "he":
        # epithelial (dense) areas: smooth lilac cytoplasm; stroma: fibrous pink collagen
        stroma_e = f32(0.10) + f32(0.45) * fib
        cyto_e = f32(0.30) + f32(0.06) * fine
        c_e = alpha * (epi * cyto_e + (f32(1) - epi) * stroma_e) * (f32(1) + f32(0.2) * var)
        c_h = alpha * (f32(0.03) + f32(0.07) * epi + f32(0.015) * fine)
        nuc_h = np.where(posm, f32(1.0), f32(0.6)) * conc * chrom
        c_h = np.where(nmask, nuc_h, c_h)
        c_e = np.where(nmask, f32(0.12) * conc, c_e)
        rgb = _od_to_rgb(c_h, c_e, None, bg, eosin=_EOSIN_HE)
    else:
        c_h = alpha * (
            f32(0.03) + f32(0.16) * fib * (f32(1) - epi) + f32(0.05) * epi + f32(0.015) * fine
            + f32(0.01) * var
        )
        c_d = alpha * (f32(0.010) + f32(0.006) * speck)
        nuc_h = np.where(posm, f32(0.2), f32(0.55)) * conc * chrom
        nuc_d = np.where(posm, f32(0.85) * conc * chrom, f32(0.0))
        c_h = np.where(nmask, nuc_h, c_h)
        c_d = np.where(nmask, nuc_d + c_d, c_d)
        rgb = _od_to_rgb(c_h, None, c_d, bg)
    return rgb, labels, tissue, nuc


def _positive_field(positive_field: PositiveField) -> PositiveField:
    if positive_field is None or callable(positive_field):
        return positive_field
    try:
        v = float(positive_field)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"synthetic: positive_field={positive_field!r} must be None, a float in [0, 1] or a "
            "callable f(y_norm, x_norm) -> probability"
        ) from None
    if not 0.0 <= v <= 1.0:
        raise InvalidInputError(f"synthetic: positive_field={v} must lie in [0, 1]")
    return v


def render_region(
    y0: int,
    x0: int,
    h: int,
    w: int,
    *,
    size: tuple[int, int],
    seed: int,
    stain: Stain,
    offset: tuple[int, int] | None = None,
    mpp: float = 0.5,
    positive_field: PositiveField = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a window of a phantom slide.

    Parameters
    ----------
    y0, x0 : int
        Top-left pixel of the window (may lie partly outside the slide; the phantom is defined
        everywhere, but only ``[0, size)`` is written to files).
    h, w : int
        Window height and width in pixels.
    size : tuple of int
        ``(height, width)`` of the whole slide (the tissue layout and Ki67 gradient scale with it).
    seed : int
        Random seed.
    stain : {"he", "ihc"}
        Which section to render.
    offset : tuple of int, optional
        ``(dy, dx)`` of the IHC relative to the H&E; default :data:`DEFAULT_OFFSET`.
    mpp : float
        Microns per pixel; nucleus sizes scale with ``0.5 / mpp``.
    positive_field : float or callable, optional
        Ki67-positive probability: a constant, or ``f(y_norm, x_norm)`` of normalised H&E-frame
        coordinates in ``[0, 1]``. Default: a left-to-right gradient with low-frequency noise.

    Returns
    -------
    rgb : numpy.ndarray
        ``(h, w, 3)`` uint8.
    labels : numpy.ndarray
        ``(h, w)`` int32 nucleus ids (0 = background); ids are shared by both stains.

    Notes
    -----
    The result depends only on ``(seed, size, offset, mpp, positive_field)`` and the window's
    global coordinates: any window equals the same crop of a larger window, bit for bit.
    """
    if stain not in ("he", "ihc"):
        raise InvalidInputError(f"synthetic: stain={stain!r} must be 'he' or 'ihc'")
    if int(h) <= 0 or int(w) <= 0:
        raise InvalidInputError(f"synthetic: window {h}x{w} must have a positive size")
    g = _Geometry.build(size, seed, offset, mpp)
    rgb, labels, _, _ = _render(
        g, int(y0), int(x0), int(h), int(w), stain, _positive_field(positive_field)
    )
    return rgb, labels


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticPair:
    """Paths of one phantom pair and its ground truth.

    Attributes
    ----------
    slide : str
        Slide id.
    he, ihc : pathlib.Path
        The H&E and IHC images.
    truth_nuclei : pathlib.Path
        ``<slide>_truth.parquet`` (one row per IHC nucleus).
    truth_labels : pathlib.Path
        ``<slide>_truth.zarr`` (``ihc_labels``, ``he_labels``, ``tissue``).
    offset : tuple of int
        ``(dy, dx)``: IHC coordinates = H&E coordinates + offset.
    """

    slide: str
    he: Path
    ihc: Path
    truth_nuclei: Path
    truth_labels: Path
    offset: tuple[int, int]


class _Stats:
    """Per-id pixel counts and coordinate sums, accumulated over blocks (exact integers)."""

    def __init__(self, n: int):
        self.n = n
        self.count = np.zeros(n, np.int64)
        self.sy = np.zeros(n, np.float64)
        self.sx = np.zeros(n, np.float64)
        self.border = np.zeros(n, bool)
        self.positive = np.zeros(n, bool)

    def add(self, labels: np.ndarray, y0: int, x0: int, g: _Geometry, nuc: _Nuclei) -> None:
        flat = labels.ravel()
        m = flat > 0
        if not m.any():
            return
        lab = flat[m]
        ids, inv, cnt = np.unique(lab, return_inverse=True, return_counts=True)
        h, w = labels.shape
        yy, xx = np.divmod(np.flatnonzero(m), w)
        self.count[ids] += cnt
        self.sy[ids] += np.bincount(inv, weights=yy + y0)
        self.sx[ids] += np.bincount(inv, weights=xx + x0)
        edge = np.zeros_like(labels, dtype=bool)
        if y0 == 0:
            edge[0] = True
        if x0 == 0:
            edge[:, 0] = True
        if y0 + h == g.height:
            edge[-1] = True
        if x0 + w == g.width:
            edge[:, -1] = True
        if edge.any():
            self.border[np.unique(labels[edge & (labels > 0)])] = True
        self.positive[nuc.ids[nuc.positive]] = True


def _blocks(g: _Geometry, y0: int, y1: int) -> list[tuple[int, int, int, int]]:
    return [
        (by, bx, min(_BLOCK, y1 - by), min(_BLOCK, g.width - bx))
        for by in range(y0, y1, _BLOCK)
        for bx in range(0, g.width, _BLOCK)
    ]


def _bands(
    g: _Geometry,
    stain: Stain,
    pf: PositiveField,
    chunk: int,
    pool: ThreadPoolExecutor,
    stats: _Stats | None,
    zlabels=None,
    ztissue=None,
    ahead: int = 4,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(y0, rgb band)`` of ``chunk`` rows, rendering 1024 px blocks on ``pool``.

    At most ``ahead`` blocks are in flight, so memory stays flat whatever the slide width.
    """
    for y0 in range(0, g.height, chunk):
        y1 = min(y0 + chunk, g.height)
        band = np.empty((y1 - y0, g.width, 3), np.uint8)
        blocks = _blocks(g, y0, y1)
        futures = {}
        for i, (by, bx, bh, bw) in enumerate(blocks):
            for j in range(i, min(i + ahead, len(blocks))):
                if j not in futures:
                    futures[j] = pool.submit(_render, g, *blocks[j], stain, pf)
            rgb, labels, tissue, nuc = futures.pop(i).result()
            band[by - y0 : by - y0 + bh, bx : bx + bw] = rgb
            if stats is not None:
                stats.add(labels, by, bx, g, nuc)
            if zlabels is not None:
                zlabels[by : by + bh, bx : bx + bw] = labels
            if ztissue is not None:
                ztissue[by : by + bh, bx : bx + bw] = tissue
            del rgb, labels, tissue, nuc
        yield y0, band


def _downsample2(a: np.ndarray) -> np.ndarray:
    """2x2 mean (rounded) of an RGB uint8 array, odd trailing row/column dropped."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    s = a[:h:2, :w:2].astype(np.uint16)
    s += a[1:h:2, :w:2]
    s += a[:h:2, 1:w:2]
    s += a[1:h:2, 1:w:2]
    s += 2
    return (s >> 2).astype(np.uint8)


def _level_shapes(h: int, w: int) -> list[tuple[int, int]]:
    shapes = [(h, w)]
    while max(shapes[-1]) >= _MIN_LEVEL and min(shapes[-1]) >= 2 * 64:
        ph, pw = shapes[-1]
        shapes.append((ph // 2, pw // 2))
    return shapes


def _tiles(band: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Tiles of a band in row-major order; edge tiles padded by edge replication."""
    h, w = band.shape[:2]
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            t = band[ty : ty + tile, tx : tx + tile]
            if t.shape[0] != tile or t.shape[1] != tile:
                t = np.pad(
                    t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge"
                )
            yield t


def _write_tiled(
    path: Path, bands: Iterator[tuple[int, np.ndarray]], g: _Geometry, tile: int, quality: int
) -> None:
    import tifffile

    shapes = _level_shapes(g.height, g.width)
    nlev = len(shapes)
    tmp = path.with_name(path.name + ".tmp")
    spool = Path(tempfile.mkdtemp(prefix=".synth-", dir=path.parent))
    try:
        files = [open(spool / f"level{k}.raw", "w+b") for k in range(1, nlev)]
        kw = dict(
            dtype=np.uint8,
            tile=(tile, tile),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": int(quality), "outcolorspace": "RGB"},
            subsampling=(1, 1),
            resolution=(1e4 / g.mpp, 1e4 / g.mpp),
            resolutionunit="CENTIMETER",
            metadata=None,
            software="daskpath.synthetic",
            maxworkers=2,
            # tifffile buffers up to `buffersize` bytes of tiles (views that pin whole bands)
            buffersize=16 * tile * tile * 3,
        )

        def level0() -> Iterator[np.ndarray]:
            for _, band in bands:
                cur = band
                for k in range(1, nlev):
                    cur = _downsample2(cur)
                    cur = cur[:, : shapes[k][1]]
                    files[k - 1].write(np.ascontiguousarray(cur).tobytes())
                yield from _tiles(band, tile)

        def level(k: int) -> Iterator[np.ndarray]:
            hk, wk = shapes[k]
            f = files[k - 1]
            f.flush()
            f.seek(0)
            rows = tile * 8
            for y in range(0, hk, rows):
                n = min(rows, hk - y)
                band = np.frombuffer(f.read(n * wk * 3), np.uint8).reshape(n, wk, 3)
                yield from _tiles(band, tile)

        big = g.height * g.width * 3 > 2**31
        with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
            tif.write(level0(), shape=(g.height, g.width, 3), subifds=nlev - 1, **kw)
            for k in range(1, nlev):
                tif.write(level(k), shape=(*shapes[k], 3), subfiletype=1, **kw)
        for f in files:
            f.close()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()


def _write_stripped(path: Path, bands: Iterator[tuple[int, np.ndarray]], g: _Geometry) -> None:
    import tifffile

    rps = 64

    def strips() -> Iterator[bytes]:
        for _, band in bands:
            for y in range(0, band.shape[0], rps):
                yield zlib.compress(np.ascontiguousarray(band[y : y + rps]).tobytes(), 6)

    tmp = path.with_name(path.name + ".tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=g.height * g.width * 3 > 2**31) as tif:
            tif.write(
                strips(),
                shape=(g.height, g.width, 3),
                dtype=np.uint8,
                photometric="rgb",
                compression="zlib",
                rowsperstrip=rps,
                resolution=(1e4 / g.mpp, 1e4 / g.mpp),
                resolutionunit="CENTIMETER",
                metadata=None,
                software="daskpath.synthetic",
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _write_zarr(path: Path, bands: Iterator[tuple[int, np.ndarray]], g: _Geometry, tile: int,
                name: str) -> None:
    """OME-NGFF 0.5 RGB image (:mod:`daskpath.ome`): bands into level 0, then the pyramid."""
    from daskpath import ome

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        ome.create_image(tmp, (g.height, g.width), kind="rgb", chunks=(tile, tile), mpp=g.mpp,
                         fill_value=255, name=name, attrs={"software": "daskpath.synthetic"})
        for y0, band in bands:
            ome.write_region(tmp, y0, 0, band, channel_last=True)
        ome.build_pyramid(tmp, compute=False).compute(scheduler="threads")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_png(path: Path, bands: Iterator[tuple[int, np.ndarray]], g: _Geometry) -> None:
    """Streamed RGB PNG: filter "Sub" on every row, zlib level 1, one IDAT per band."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
            f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", g.width, g.height, 8, 2, 0, 0, 0)))
            ppm = int(round(1e6 / g.mpp))  # pixels per metre
            f.write(_png_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1)))
            comp = zlib.compressobj(1)
            for _, band in bands:
                rows = band.reshape(band.shape[0], -1)
                filt = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
                filt[:, 0] = 1  # Sub
                filt[:, 1:4] = rows[:, :3]
                np.subtract(rows[:, 3:], rows[:, :-3], out=filt[:, 4:], dtype=np.uint8)
                data = comp.compress(filt.tobytes())
                if data:
                    f.write(_png_chunk(b"IDAT", data))
            f.write(_png_chunk(b"IDAT", comp.flush()))
            f.write(_png_chunk(b"IEND", b""))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _truth_table(he: _Stats, ihc: _Stats, g: _Geometry):
    import pandas as pd

    ids = np.flatnonzero(ihc.count > 0)
    cnt = ihc.count[ids]
    he_cnt = he.count[ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        y_he = np.where(he_cnt > 0, he.sy[ids] / np.maximum(he_cnt, 1), np.nan)
        x_he = np.where(he_cnt > 0, he.sx[ids] / np.maximum(he_cnt, 1), np.nan)
    return pd.DataFrame(
        {
            "id": ids.astype(np.int32),
            "y": ihc.sy[ids] / cnt,
            "x": ihc.sx[ids] / cnt,
            "area": cnt.astype(np.int64),
            "positive": ihc.positive[ids],
            "cut": ihc.border[ids],
            "y_he": y_he,
            "x_he": x_he,
            "area_he": he_cnt.astype(np.int64),
        }
    )


def _check_slide_id(slide: str) -> str:
    if not isinstance(slide, str) or not slide or any(c in slide for c in "/\\,\n\r"):
        raise InvalidInputError(
            f"synthetic: slide id {slide!r} must be a non-empty string without '/', '\\' or ','"
        )
    return slide


def make_pair(
    out_dir: str | os.PathLike[str],
    slide: str = "synth000",
    size: tuple[int, int] = (4096, 4096),
    seed: int = 0,
    layout: Layout = "tiled",
    tile_size: int = 512,
    mpp: float = 0.5,
    offset: tuple[int, int] | None = None,
    chunk: int = 2048,
    positive_field: PositiveField = None,
    *,
    quality: int = 90,
    workers: int = 2,
) -> SyntheticPair:
    """Write one phantom H&E / Ki67 IHC pair and its ground truth.

    Parameters
    ----------
    out_dir : path-like
        Output folder (created).
    slide : str
        Slide id; files are ``<slide>_HE.<ext>``, ``<slide>_IHC.<ext>``, ``<slide>_truth.*``.
    size : tuple of int
        ``(height, width)`` in pixels (both sections have the same size).
    seed : int
        Random seed; the same seed gives identical pixels and truth.
    layout : {"tiled", "png", "stripped", "zarr"}
        ``tiled``: pyramidal tiled JPEG TIFF (``.tif``); ``png``: flat RGB PNG (``.png``, the
        reference cohort's layout); ``stripped``: flat untiled deflate TIFF (``.tif``);
        ``zarr``: OME-NGFF 0.5 image (``.ome.zarr``, lossless, chunks of ``tile_size``).
    tile_size : int
        TIFF tile edge for ``tiled`` (multiple of 16).
    mpp : float
        Microns per pixel, written to the resolution tags (and PNG ``pHYs``).
    offset : tuple of int, optional
        ``(dy, dx)``: IHC = H&E shifted by this many pixels. Default :data:`DEFAULT_OFFSET`.
    chunk : int
        Rows rendered and written at a time (a multiple of 1024 and of ``tile_size``); memory
        is about ``chunk * width * 3`` bytes plus working arrays. Output does not depend on it.
    positive_field : float or callable, optional
        Override of the Ki67-positive probability (see :func:`render_region`).
    quality : int
        JPEG quality (``tiled`` only).
    workers : int
        Threads rendering blocks.

    Returns
    -------
    SyntheticPair
    """
    import zarr

    slide = _check_slide_id(slide)
    if layout not in ("tiled", "png", "stripped", "zarr"):
        raise InvalidInputError(
            f"synthetic: layout={layout!r} is unknown; use 'tiled', 'png', 'stripped' or 'zarr'"
        )
    if not isinstance(tile_size, int) or tile_size < 16 or tile_size % 16:
        raise InvalidInputError(f"synthetic: tile_size={tile_size!r} must be a multiple of 16")
    if not isinstance(chunk, int) or chunk < _BLOCK or chunk % _BLOCK or chunk % tile_size:
        raise InvalidInputError(
            f"synthetic: chunk={chunk!r} must be a multiple of {_BLOCK} and of "
            f"tile_size={tile_size}"
        )
    if not 1 <= int(quality) <= 100:
        raise InvalidInputError(f"synthetic: quality={quality!r} must be in 1-100")
    g = _Geometry.build(size, seed, offset, mpp)
    nlev = len(_level_shapes(g.height, g.width))
    if chunk % (1 << (nlev - 1)):
        raise InvalidInputError(f"synthetic: chunk={chunk} must be a multiple of {1 << (nlev - 1)}")
    pf = _positive_field(positive_field)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = {"png": ".png", "zarr": ".ome.zarr"}.get(layout, ".tif")
    he_path = out / f"{slide}_HE{ext}"
    ihc_path = out / f"{slide}_IHC{ext}"
    pq_path = out / f"{slide}_truth.parquet"
    zarr_path = out / f"{slide}_truth.zarr"
    json_path = out / f"{slide}_truth.json"

    zchunks = (_BLOCK, _BLOCK)
    ztmp = out / f".{slide}_truth.zarr.tmp"
    if ztmp.exists():
        shutil.rmtree(ztmp)
    root = zarr.open_group(str(ztmp), mode="w", zarr_format=3)
    shape = (g.height, g.width)
    zkw = dict(shape=shape, chunks=zchunks)
    z_ihc = root.create_array("ihc_labels", dtype="int32", fill_value=0, **zkw)
    z_he = root.create_array("he_labels", dtype="int32", fill_value=0, **zkw)
    z_tis = root.create_array("tissue", dtype="bool", fill_value=False, **zkw)
    root.attrs.update(
        {"slide": slide, "offset": list(g.offset), "mpp": g.mpp, "seed": g.seed,
         "description": "ihc_labels/tissue in IHC pixels; he_labels in H&E pixels; same ids"}
    )

    he_stats, ihc_stats = _Stats(g.n_ids), _Stats(g.n_ids)
    n_workers = max(1, int(workers))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for stain, path, stats, zl, zt in (
            ("he", he_path, he_stats, z_he, None),
            ("ihc", ihc_path, ihc_stats, z_ihc, z_tis),
        ):
            bands = _bands(g, stain, pf, chunk, pool, stats, zl, zt, ahead=2 * n_workers)
            if layout == "tiled":
                _write_tiled(path, bands, g, tile_size, quality)
            elif layout == "png":
                _write_png(path, bands, g)
            elif layout == "zarr":
                _write_zarr(path, bands, g, tile_size, f"{slide} {stain.upper()}")
            else:
                _write_stripped(path, bands, g)

    table = _truth_table(he_stats, ihc_stats, g)
    tmp_pq = pq_path.with_name(pq_path.name + ".tmp")
    table.to_parquet(tmp_pq, index=False)
    os.replace(tmp_pq, pq_path)
    if zarr_path.exists():
        shutil.rmtree(zarr_path)
    os.replace(ztmp, zarr_path)
    meta = {
        "slide": slide,
        "size": [g.height, g.width],
        "seed": g.seed,
        "offset": list(g.offset),
        "mpp": g.mpp,
        "tile_size": tile_size,
        "layout": layout,
        "chunk": chunk,
        "he": he_path.name,
        "ihc": ihc_path.name,
        "n_nuclei": int(len(table)),
        "n_positive": int(table["positive"].sum()),
        "positive_field": "default" if pf is None else ("callable" if callable(pf) else pf),
        "coordinates": "y, x in IHC pixels; y_he, x_he in H&E pixels; ihc = he + offset",
    }
    tmp_json = json_path.with_name(json_path.name + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_json, json_path)
    return SyntheticPair(slide, he_path, ihc_path, pq_path, zarr_path, g.offset)


def make_cohort(
    out_dir: str | os.PathLike[str],
    pairs: int = 1,
    size: tuple[int, int] = (4096, 4096),
    seed: int = 0,
    layout: Layout = "tiled",
    **kw,
) -> Path:
    """Write ``pairs`` phantom pairs ``synth000, synth001, ...`` and ``manifest.csv``.

    Pair ``i`` uses seed ``seed + i``. The manifest has the header ``slide,he,ihc`` with paths
    relative to ``out_dir``. Extra keyword arguments go to :func:`make_pair`.

    Returns
    -------
    pathlib.Path
        Path of ``out_dir/manifest.csv``.
    """
    if not isinstance(pairs, int) or pairs < 1:
        raise InvalidInputError(f"synthetic: pairs={pairs!r} must be a positive integer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(pairs):
        p = make_pair(out, slide=f"synth{i:03d}", size=size, seed=seed + i, layout=layout, **kw)
        rows.append((p.slide, p.he.name, p.ihc.name))
    manifest = out / "manifest.csv"
    tmp = out / "manifest.csv.tmp"
    with open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["slide", "he", "ihc"])
        wr.writerows(rows)
    os.replace(tmp, manifest)
    return manifest
