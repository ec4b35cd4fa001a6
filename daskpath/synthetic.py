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

Realistic mode (``realism="realistic"``)
----------------------------------------
``easy`` (the default) is the phantom above, pixel for pixel. ``realistic`` makes the job harder
while keeping exact truth; its knobs are :class:`RealismParams` (``realism_params``), all recorded
in ``<slide>_truth.json`` with the per-slide draws:

* **Consecutive sections.** On top of the rigid ``offset`` the IHC is deformed by a smooth field
  defined in IHC coordinates: IHC pixel ``q`` shows the H&E tissue at ``q - offset - v(q)``, with
  ``v_a(q) = sum_k amp_k sin(ky_k q_y + kx_k q_x + phase_k)`` (three plane waves per axis, drawn
  from the seed; ``sum amp_k = warp_amplitude``, 30 px; wavelengths from ``warp_scale``, 19000 px,
  to twice that). Its gradient is at most ``2 pi warp_amplitude / warp_scale`` (0.0099; 0.002-0.007
  measured), so a 1024 px tile has a well-defined mean shift; over a 4096^2 slide ``|d|`` ranges
  from a few px to 12-34 px (seeds 0-11). :func:`displacement` inverts the field by fixed-point
  iteration (to 1e-7 px). The IHC's tissue background is pulled back through the field (nearest
  H&E-frame pixel); its nuclei are drawn rigidly at their mapped centres (plus the ~1 px jitter).
  ``turnover`` (0.3) of the nuclei are in one section only (half H&E-only, half IHC-only).
* **Stain variation** per slide and section: each stain vector rotated by up to ``stain_angle``
  (4 degrees), concentrations scaled by ``1 +- stain_scale`` (0.15), a glass tint of up to
  ``tint`` OD per channel (0.005), scanner brightness ``1 +- brightness`` (0.02): glass stays
  at a max-channel OD of ~0.02-0.03 (RGB ~238-245), as on a white-balanced scanner. Darker
  glass (``tint`` 0.02, ``brightness`` 0.05) reads as tissue at the default
  ``tissue.threshold`` of 0.035 OD: raise the threshold for such slides.
* **A weak H&E cue.** ``cue`` (0.25; 0 none, 1 like ``easy``) scales how much larger (up to +50 %),
  darker (hematoxylin 0.6 -> 1.0), more lobulated and coarser Ki67-positive nuclei are in the H&E;
  sizes and stain strengths of all nuclei are widely spread and a regional size field (+-15 %,
  ~700 px) is independent of positivity, so size and darkness overlap between the classes (AUC of
  H&E nucleus area for positivity 0.65 at the default, 4096^2 seed 3). ``context`` (0.3) couples
  positivity to architecture: higher in dense epithelium and on lumen rims (not applied when a
  ``positive_field`` override sets the probability).
* **Artefacts**, drawn per section independently on a global 1024 px lattice (``fold``, ``pen``,
  ``bubble``, ``blur``, ``dust``: expected instances per 1024^2 px, defaults 0.012, 0.015, 0.012,
  0.008, 0.025): tissue folds (a band of doubled tissue optical density with a darker crease), pen
  strokes (green / blue / black ink arcs, placed at the candidate point nearest the tissue edge),
  air bubbles (washed-out disc, dark rim), out-of-focus patches (Gaussian blur, sigma 2-3.5 px,
  soft edge; windows near one are rendered with a halo of the kernel radius), dust (clusters of
  dark specks). With the defaults about 12 % of a section's 1024 px tissue tiles (4.7 % of 512 px
  tiles; 23 % / 9 % for either section of a pair) hold an artefact (mean of 32 seeds, 4096^2,
  tissue fraction >= 0.5). Masks: ``artefacts_he`` / ``artefacts_ihc`` in the truth Zarr, uint8
  bitmasks of :data:`ARTEFACT_BITS`. Artefacts change pixels only: labels, the truth table and
  the tissue mask are those of the section without them (nuclei under a fold or pen keep their
  id, area and status).
* **Scanner JPEG**: ``tiled`` files use ``jpeg_quality`` (80); the flat layouts store the scene
  after a JPEG round trip of every 256 px tile (on the global grid, so files stay independent of
  ``chunk``). :func:`render_region` returns the scene before JPEG.
* **Truth table**: one row per nucleus of *either* section; ``y, x`` NaN and ``area`` 0 for
  H&E-only nuclei, ``y_he, x_he`` NaN and ``area_he`` 0 for IHC-only ones (``easy``: IHC nuclei
  only, as before); ``cut`` marks nuclei touching the border in either section.

Every slide file is tagged as a phantom (both modes): TIFF level-0 ImageDescription
``"daskpath-phantom realism=<mode> seed=<seed>"`` (:data:`PHANTOM_TOKEN`), PNG ``tEXt`` chunk
``daskpath`` = ``"phantom realism=<mode> seed=<seed>"``, OME-Zarr root attributes
``{"daskpath": {"phantom": true, "realism": <mode>, ...}}``.

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
    ``he_labels`` (int32, same ids), ``tissue`` (bool, IHC frame) and ``artefacts_he`` /
    ``artefacts_ihc`` (uint8 :data:`ARTEFACT_BITS`, each in its own section's frame; all zero in
    ``easy``).
``<slide>_truth.json``
    ``slide, size, seed, offset, mpp, tile_size, layout, n_nuclei, n_positive, realism,
    phantom_tag, ...``; ``realistic`` adds ``realism_params``, ``deformation`` (what
    :func:`displacement` reads), ``stain`` (the drawn vectors, scales, tint, brightness per
    section), ``artefact_pixels``, ``turnover_measured``, ``quality``.

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
* ``realism="realistic"`` (defaults), 4096^2 ``tiled`` pair, seed 3, measured back to back under
  load ~7-11: 20.7 / 20.5 s CPU against 14.7 / 16.9 s for ``easy`` (about 1.2-1.4x). The extra
  work: the deformation field and pull-back of the IHC, artefact layers, and, near an
  out-of-focus patch, a 14 px halo and the blur itself.
"""

from __future__ import annotations

import csv
import dataclasses
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
    "RealismParams",
    "displacement",
    "PHANTOM_TOKEN",
    "ARTEFACT_BITS",
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

#: Token in every phantom slide file's metadata (TIFF ImageDescription, PNG tEXt, OME-Zarr
#: attrs): the readers' constant (:data:`daskpath.io.PHANTOM_TOKEN`).
from daskpath.io import PHANTOM_TOKEN  # noqa: E402
#: Bits of the ``artefacts_he`` / ``artefacts_ihc`` truth masks (uint8).
ARTEFACT_BITS: dict[str, int] = {"fold": 1, "pen": 2, "bubble": 4, "blur": 8, "dust": 16}

Stain = Literal["he", "ihc"]
Realism = Literal["easy", "realistic"]
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
        cls, size: tuple[int, int], seed: int, offset: tuple[int, int] | None, mpp: float,
        warp: float = 0.0,
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
        pad = int(math.ceil((max(abs(off[0]), abs(off[1])) + warp + rmax + jitter) / cell)) + 2
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
    hfac: np.ndarray | None = None  # realistic: H&E hematoxylin factor (the cue)
    coarse: np.ndarray | None = None  # realistic: chromatin coarseness (the cue)


def _cell_grid(g: _Geometry, fy0, fy1, fx0, fx1):
    """The cells whose nuclei may reach ``[fy0, fy1) x [fx0, fx1)``: their lattice indices, the
    per-cell variate ``u(k)`` and the jittered H&E-frame centres."""
    c = g.cell
    reach = g.rmax + g.jitter + 2.0
    cy = np.arange(int(math.floor((fy0 - reach - c) / c)), int(math.floor((fy1 + reach) / c)) + 1)
    cx = np.arange(int(math.floor((fx0 - reach - c) / c)), int(math.floor((fx1 + reach) / c)) + 1)
    cyy, cxx = (a.ravel() for a in np.meshgrid(cy, cx, indexing="ij"))

    def u(k: int) -> np.ndarray:
        return _hash01(_key(g.seed, _S_CELL + k), cyy, cxx)

    ycen = (cyy + 0.5) * c + (u(0) * 2 - 1) * g.jitter
    xcen = (cxx + 0.5) * c + (u(1) * 2 - 1) * g.jitter
    return cyy, cxx, u, ycen, xcen


def _cells(g: _Geometry, fields: _Fields, fy0, fy1, fx0, fx1, stain: Stain) -> _Nuclei:
    """Nuclei whose pixels may fall in the frame region ``[fy0, fy1) x [fx0, fx1)``."""
    c = g.cell
    cyy, cxx, u, ycen, xcen = _cell_grid(g, fy0, fy1, fx0, fx1)  # H&E frame, both stains
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
    realism: Realism = "easy",
    realism_params: RealismParams | dict | None = None,
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
    realism : {"easy", "realistic"}
        ``easy``: the original phantom. ``realistic``: non-rigid deformation, cell turnover,
        stain variation, a weak H&E cue and artefacts (see the module docstring).
    realism_params : RealismParams or dict, optional
        Knobs of ``realistic`` (:class:`RealismParams`; a dict may give some of them).

    Returns
    -------
    rgb : numpy.ndarray
        ``(h, w, 3)`` uint8.
    labels : numpy.ndarray
        ``(h, w)`` int32 nucleus ids (0 = background); ids are shared by both stains.

    Notes
    -----
    The result depends only on ``(seed, size, offset, mpp, positive_field, realism,
    realism_params)`` and the window's global coordinates: any window equals the same crop of a
    larger window, bit for bit. ``realistic`` windows are the pixels before the scanner's JPEG
    compression (which the files then apply).
    """
    if stain not in ("he", "ihc"):
        raise InvalidInputError(f"synthetic: stain={stain!r} must be 'he' or 'ihc'")
    if int(h) <= 0 or int(w) <= 0:
        raise InvalidInputError(f"synthetic: window {h}x{w} must have a positive size")
    rp_ = _realism(realism, realism_params)
    g = _Geometry.build(size, seed, offset, mpp, 0.0 if rp_ is None else rp_.warp_amplitude)
    pf = _positive_field(positive_field)
    if rp_ is None:
        rgb, labels, _, _ = _render(g, int(y0), int(x0), int(h), int(w), stain, pf)
    else:
        rgb, labels, _, _, _ = _render_real(g, _Real.build(g, rp_), int(y0), int(x0), int(h),
                                            int(w), stain, pf)
    return rgb, labels


# ---------------------------------------------------------------------------------------------
# realistic mode: parameters and per-slide draws
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealismParams:
    """Knobs of ``realism="realistic"`` (defaults give a plausible, harder phantom).

    Attributes
    ----------
    warp_amplitude : float
        Bound (px) of each axis of the smooth non-rigid displacement between the sections, on
        top of the rigid ``offset``.
    warp_scale : float
        Shortest wavelength (px) of the displacement field (a sum of three plane waves per
        axis); its gradient is bounded by ``2 * pi * warp_amplitude / warp_scale``.
    turnover : float
        Share of nuclei present in one section only (half H&E-only, half IHC-only).
    cue : float
        Strength of the H&E cue of Ki67 positivity, 0 (none) to 1 (like ``easy``): size,
        hematoxylin density, lobulation and coarse chromatin of positive nuclei.
    context : float
        Coupling of positivity to tissue architecture (denser epithelium and lumen rims are
        more often positive); 0 disables it. Ignored when ``positive_field`` is given.
    stain_angle : float
        Largest rotation (degrees) of each stain vector, per section.
    stain_scale : float
        Stain concentrations are scaled by a factor in ``[1 - s, 1 + s]``, per stain and section.
    tint : float
        Largest extra optical density per RGB channel of the glass (background tint).
    brightness : float
        Scanner brightness factor in ``[1 - b, 1 + b]``, per section.
    fold, pen, bubble, blur, dust : float
        Expected number of artefacts of each kind per 1024 x 1024 px of a section (0-4).
    jpeg_quality : int
        JPEG quality of the scanner: the tiled TIFF's compression, and a JPEG round trip of
        every 256 px tile of the flat layouts (``png``, ``stripped``, ``zarr``).
    """

    warp_amplitude: float = 30.0
    warp_scale: float = 19000.0
    turnover: float = 0.3
    cue: float = 0.25
    context: float = 0.3
    stain_angle: float = 4.0
    stain_scale: float = 0.15
    tint: float = 0.005
    brightness: float = 0.02
    fold: float = 0.012
    pen: float = 0.015
    bubble: float = 0.012
    blur: float = 0.008
    dust: float = 0.025
    jpeg_quality: int = 80


_REAL_RANGES = {
    "warp_amplitude": (0.0, 200.0), "warp_scale": (500.0, 1e7), "turnover": (0.0, 1.0),
    "cue": (0.0, 1.0), "context": (0.0, 1.0), "stain_angle": (0.0, 20.0),
    "stain_scale": (0.0, 0.5), "tint": (0.0, 0.2), "brightness": (0.0, 0.3),
    "fold": (0.0, 4.0), "pen": (0.0, 4.0), "bubble": (0.0, 4.0), "blur": (0.0, 4.0),
    "dust": (0.0, 4.0), "jpeg_quality": (1, 100),
}


def _realism(realism: str, params) -> RealismParams | None:
    """Validate ``realism`` / ``realism_params``; ``None`` for ``easy``."""
    if realism not in ("easy", "realistic"):
        raise InvalidInputError(f"synthetic: realism={realism!r} is unknown; use 'easy' or "
                                "'realistic'")
    if params is None:
        p = RealismParams()
    elif isinstance(params, RealismParams):
        p = params
    elif isinstance(params, dict):
        unknown = sorted(set(params) - set(_REAL_RANGES))
        if unknown:
            raise InvalidInputError(
                f"synthetic: realism_params key {unknown[0]!r} is unknown; use one of "
                f"{', '.join(_REAL_RANGES)}")
        p = RealismParams(**params)
    else:
        raise InvalidInputError(f"synthetic: realism_params={params!r} must be a dict or "
                                "RealismParams")
    for name, (lo, hi) in _REAL_RANGES.items():
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise InvalidInputError(
                f"synthetic: realism_params {name}={v!r} is out of range; use {lo}-{hi}")
    if realism == "easy":
        if params is not None:
            raise InvalidInputError("synthetic: realism_params needs realism='realistic'; drop "
                                    "it or set realism='realistic'")
        return None
    return p


_S_REAL = 700  # + k: per-slide draws of realistic mode
_S_SIZEF = 720  # regional nucleus size field (a confounder of the H&E cue)
_S_ART = {"he": 800, "ihc": 900}  # + kind * 10 + k: artefacts, per section
_ART_CELL = 1024  # artefacts live on a global lattice of this spacing (image coordinates)
_ART_KINDS = ("fold", "pen", "bubble", "blur", "dust")
_ART_REACH = {"fold": 720, "pen": 720, "bubble": 200, "blur": 420, "dust": 80}
_ART_SLOTS = 4  # instances per kind and artefact cell at most
_INKS = {"green": (0.80, 0.22, 0.62), "blue": (0.85, 0.50, 0.08), "black": (0.80, 0.80, 0.78)}
_BLUR_TRUNCATE = 4.0
_BLUR_SIGMA_MAX = 3.5
_BLUR_HALO = int(_BLUR_TRUNCATE * _BLUR_SIGMA_MAX + 0.5)


def _u1(seed: int, stream: int, a: int = 0, b: int = 0) -> float:
    return float(_hash01(_key(seed, stream), np.array([a]), np.array([b]))[0])


def _perturb(v: np.ndarray, angle: float, u_dir: float) -> np.ndarray:
    """Rotate ``v`` by ``angle`` (radians) towards a direction orthogonal to it."""
    n = np.linalg.norm(v)
    e0 = v / n
    e1 = np.cross(e0, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e0, e1)
    d = math.cos(2 * math.pi * u_dir) * e1 + math.sin(2 * math.pi * u_dir) * e2
    w = math.cos(angle) * e0 + math.sin(angle) * d
    w = np.clip(w, 0.02, None)
    return w / np.linalg.norm(w) * n


@dataclass(frozen=True, eq=False)
class _Real:
    """Realistic-mode parameters and the per-slide draws (from the seed only)."""

    p: RealismParams
    offset: tuple[int, int]
    waves: np.ndarray  # (2 axes, 3 waves, [ky, kx, phase, amp]); ky, kx in radians / px
    stains: dict  # section -> {"vectors": (3, 3) rows H, E, DAB; "scale": (3,); "tint": (3,);
    #                          "brightness": float}

    @classmethod
    def build(cls, g: _Geometry, p: RealismParams) -> _Real:
        s = g.seed
        waves = np.zeros((2, 3, 4))
        for a in range(2):
            w = np.array([0.5 + _u1(s, _S_REAL, a, 10 + k) for k in range(3)])
            w /= w.sum()
            for k in range(3):
                th = 2 * math.pi * _u1(s, _S_REAL, a, 20 + k)
                lam = p.warp_scale * (1.0 + _u1(s, _S_REAL, a, 30 + k))
                waves[a, k] = (2 * math.pi * math.cos(th) / lam, 2 * math.pi * math.sin(th) / lam,
                               2 * math.pi * _u1(s, _S_REAL, a, 40 + k), p.warp_amplitude * w[k])
        stains = {}
        for j, sec in enumerate(("he", "ihc")):
            base = [RGB_FROM_HED[0], _EOSIN_HE if sec == "he" else RGB_FROM_HED[1], RGB_FROM_HED[2]]
            vec = np.array([
                _perturb(np.asarray(v, float), math.radians(p.stain_angle)
                         * _u1(s, _S_REAL + 1, j, 10 + k), _u1(s, _S_REAL + 1, j, 20 + k))
                for k, v in enumerate(base)])
            scale = np.array([1.0 + p.stain_scale * (2 * _u1(s, _S_REAL + 1, j, 30 + k) - 1)
                              for k in range(3)])
            tint = np.array([p.tint * _u1(s, _S_REAL + 1, j, 40 + k) for k in range(3)])
            bright = 1.0 + p.brightness * (2 * _u1(s, _S_REAL + 1, j, 50) - 1)
            stains[sec] = {"vectors": vec, "scale": scale, "tint": tint, "brightness": bright}
        return cls(p, g.offset, waves, stains)

    def meta(self) -> dict:
        """JSON-ready record of the draws (enough for :func:`displacement`)."""
        return {
            "deformation": {
                "offset": list(self.offset),
                "amplitude": self.p.warp_amplitude,
                "scale": self.p.warp_scale,
                "definition": "IHC pixel q shows the H&E tissue at q - offset - v(q); "
                              "v_a(q) = sum_k amp * sin(ky * q_y + kx * q_x + phase)",
                "waves_y": self.waves[0].tolist(),
                "waves_x": self.waves[1].tolist(),
            },
            "stain": {sec: {"vectors_rgb_from_hed": d["vectors"].tolist(),
                            "concentration_scale": d["scale"].tolist(),
                            "background_tint_od": d["tint"].tolist(),
                            "brightness": d["brightness"]}
                      for sec, d in self.stains.items()},
        }


def _field(waves: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sum of plane waves at points ``(ys, xs)`` (float64, broadcast)."""
    out = np.zeros(np.broadcast_shapes(np.shape(ys), np.shape(xs)))
    for ky, kx, ph, amp in waves:
        out += amp * np.sin(ky * ys + kx * xs + ph)
    return out


def _field_grid(waves: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """:func:`_field` on the grid ``ys x xs`` (separable; each value depends on (y, x) only)."""
    out = np.zeros((len(ys), len(xs)))
    for ky, kx, ph, amp in waves:
        a = ky * ys.astype(np.float64)
        b = kx * xs.astype(np.float64) + ph
        out += amp * (np.sin(a)[:, None] * np.cos(b)[None, :]
                      + np.cos(a)[:, None] * np.sin(b)[None, :])
    return out


def _forward(waves_y, waves_x, offset, ys, xs, tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """IHC position ``q`` of H&E points ``p``: solve ``q = p + offset + v(q)`` (fixed point)."""
    ys = np.asarray(ys, np.float64)
    xs = np.asarray(xs, np.float64)
    qy, qx = ys + offset[0], xs + offset[1]
    for _ in range(60):
        ny = ys + offset[0] + _field(waves_y, qy, qx)
        nx = xs + offset[1] + _field(waves_x, qy, qx)
        err = max(float(np.max(np.abs(ny - qy), initial=0.0)),
                  float(np.max(np.abs(nx - qx), initial=0.0)))
        qy, qx = ny, nx
        if err < tol:
            break
    return qy, qx


def displacement(meta: dict, ys, xs) -> tuple[np.ndarray, np.ndarray]:
    """Where H&E tissue appears in the IHC: ``(dy, dx)`` at H&E pixels ``(ys, xs)``.

    Parameters
    ----------
    meta : dict
        The contents of ``<slide>_truth.json``.
    ys, xs : array-like
        H&E pixel coordinates (broadcast together).

    Returns
    -------
    dy, dx : numpy.ndarray
        float64: the tissue at H&E ``(ys, xs)`` lies at IHC ``(ys + dy, xs + dx)``, rigid offset
        included. ``easy`` slides: the constant ``offset``. ``realistic`` slides: the field is
        defined in IHC coordinates (IHC pixel ``q`` shows H&E ``q - offset - v(q)``) and
        inverted here by fixed-point iteration to 1e-7 px (the field's gradient is below
        ``2 pi amplitude / scale``, about 0.009 by default, so it converges in a few steps).
    """
    ys, xs = np.broadcast_arrays(np.asarray(ys, np.float64), np.asarray(xs, np.float64))
    d = meta.get("deformation")
    if d is None:
        off = meta.get("offset")
        if off is None:
            raise InvalidInputError("synthetic: meta has neither 'deformation' nor 'offset'; "
                                    "pass the dict read from <slide>_truth.json")
        return np.full(ys.shape, float(off[0])), np.full(xs.shape, float(off[1]))
    off = (float(d["offset"][0]), float(d["offset"][1]))
    qy, qx = _forward(np.asarray(d["waves_y"], float).reshape(-1, 4),
                      np.asarray(d["waves_x"], float).reshape(-1, 4), off, ys, xs)
    return qy - ys, qx - xs


# ---------------------------------------------------------------------------------------------
# realistic mode: nuclei
# ---------------------------------------------------------------------------------------------
def _vnoise_points(key: np.uint64, ys: np.ndarray, xs: np.ndarray, sp: float) -> np.ndarray:
    """Value noise (as :func:`_vnoise`) at points (float64)."""
    qy = np.asarray(ys, np.float64) / sp
    qx = np.asarray(xs, np.float64) / sp
    iy, ix = np.floor(qy), np.floor(qx)
    fy, fx = _smoothstep(qy - iy), _smoothstep(qx - ix)
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)

    def lat(a, b):
        return _hash01(key, a, b) * 2.0 - 1.0

    t0 = (1 - fy) * lat(iy, ix) + fy * lat(iy + 1, ix)
    t1 = (1 - fy) * lat(iy, ix + 1) + fy * lat(iy + 1, ix + 1)
    return (1 - fx) * t0 + fx * t1


def _tissue_points(g: _Geometry, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Tissue score (> 0 is tissue) at H&E points, without the node grid (for placement)."""
    ys, xs = np.asarray(ys, float), np.asarray(xs, float)
    envelope = 1.0 - (((ys / g.height - 0.5) / 0.46) ** 2 + ((xs / g.width - 0.5) / 0.48) ** 2)
    fbm, amp, tot = 0.0, 1.0, 0.0
    for st, sp in zip(_S_TISSUE, (900.0, 450.0, 225.0), strict=True):
        fbm = fbm + amp * _vnoise_points(_key(g.seed, st), ys, xs, sp)
        tot += amp
        amp *= 0.5
    return envelope + 0.9 * fbm / tot - 0.3


def _cells_real(g: _Geometry, rp: _Real, fields: _Fields, fy0, fy1, fx0, fx1, stain: Stain,
                pf: PositiveField) -> _Nuclei:
    """Realistic nuclei (H&E-frame centres) that may touch ``[fy0, fy1) x [fx0, fx1)``."""
    p = rp.p
    c = g.cell
    cyy, cxx, u, ycen, xcen = _cell_grid(g, fy0, fy1, fx0, fx1)
    tissue = fields.points("tissue", ycen, xcen)
    lumen = fields.points("lumen", ycen, xcen)
    dens = fields.points("dens", ycen, xcen)
    var = fields.points("var", ycen, xcen)
    pos_p = fields.points("pos", ycen, xcen)
    if pf is None and p.context > 0:
        rim = np.clip((lumen + 0.25) / 0.21, 0.0, 1.0)  # 1 at a lumen's edge
        pos_p = np.clip(pos_p + p.context * (0.8 * (dens - 0.5) + 0.6 * (rim - 0.3)), 0.0, 1.0)
    inside = (tissue > 0.08) & (lumen < -0.04)
    base = inside & (u(2) < 0.3 + 0.68 * dens)
    turn = u(20) < p.turnover
    he_only = turn & (u(21) < 0.5)
    ihc_only = turn & ~he_only
    positive = u(3) < pos_p
    s = c / 25.0
    # a regional size field, independent of positivity, blurs what size says at tile level
    sizef = 1.0 + 0.15 * _vnoise_points(_key(g.seed, _S_SIZEF), ycen, xcen, 700.0)
    stromal = dens < 0.3
    a = (4.8 + 3.4 * u(4)) * s * sizef * (1.0 + 0.5 * p.cue * positive)
    a = np.where(stromal, a * 1.25, a)
    ratio = np.where(stromal, 0.35 + 0.25 * u(5), 0.72 + 0.26 * u(5))
    amp = 0.04 * u(22) + np.where(positive, p.cue * (0.07 + 0.1 * u(6)), 0.0)
    lobes = np.where(u(7) < 0.5, 3.0, np.where(u(7) < 0.8, 4.0, 5.0))
    phase = u(8) * 2 * np.pi
    theta = u(9) * np.pi
    room = np.minimum(
        np.minimum(ycen - cyy * c, (cyy + 1) * c - ycen),
        np.minimum(xcen - cxx * c, (cxx + 1) * c - xcen),
    )
    a = np.minimum(a, room + 4.0 * s)
    conc = (0.75 + 0.5 * u(10)) * (1.0 + 0.1 * var)
    hfac = 0.6 + 0.4 * p.cue * positive
    coarse = 0.2 + 0.3 * p.cue * positive
    if stain == "ihc":
        present = base & ~he_only
        jy = np.clip((u(13) + u(14) - 1.0) * 1.2, -1.5, 1.5)
        jx = np.clip((u(15) + u(16) - 1.0) * 1.2, -1.5, 1.5)
        ycen = ycen + jy
        xcen = xcen + jx
        a = a * (0.9 + 0.2 * u(17))
        theta = theta + (u(18) - 0.5) * 0.3
        conc = 0.8 + 0.4 * u(19)
    else:
        present = base & ~ihc_only
    a = np.minimum(a, g.rmax / (1.0 + amp) - 0.5)
    b = a * ratio
    ids = (cyy + g.pad) * g.ncols + (cxx + g.pad) + 1
    parity = (cyy % 2) * 2 + (cxx % 2)
    m = present
    return _Nuclei(
        ids=ids[m].astype(np.int32), cy=ycen[m], cx=xcen[m], parity=parity[m], a=a[m], b=b[m],
        theta=theta[m], amp=amp[m], lobes=lobes[m], phase=phase[m], positive=positive[m],
        conc=conc[m], hfac=hfac[m], coarse=coarse[m],
    )


# ---------------------------------------------------------------------------------------------
# realistic mode: artefacts
# ---------------------------------------------------------------------------------------------
@dataclass
class _Art:
    """Artefact layers of a window (image coordinates of one section)."""

    bits: np.ndarray  # uint8, ARTEFACT_BITS
    tissue_gain: np.ndarray | None = None  # multiplies the tissue optical density
    glass_gain: np.ndarray | None = None  # multiplies the glass optical density
    od: np.ndarray | None = None  # (h, w, 3) optical density added on top (ink, dust, rims)
    blur: list | None = None  # [(cy, cx, radius, sigma)]


def _instances(g: _Geometry, stain: Stain, kind: str, freq: float, y0, y1, x0, x1):
    """Present artefact instances of ``kind`` that may reach the window: ``(ay, ax, slot, u)``.

    ``u(k)`` gives the instance's k-th uniform variate (a function of the seed, section, kind,
    artefact cell and slot only).
    """
    if freq <= 0:
        return []
    k_i = _ART_KINDS.index(kind)
    stream = _S_ART[stain] + 10 * k_i
    r = _ART_REACH[kind]
    ay = np.arange((y0 - r) // _ART_CELL, (y1 - 1 + r) // _ART_CELL + 1)
    ax = np.arange((x0 - r) // _ART_CELL, (x1 - 1 + r) // _ART_CELL + 1)
    out = []
    for slot in range(_ART_SLOTS):
        pres = _hash01(_key(g.seed, stream + slot), ay[:, None], ax[None, :]) < freq / _ART_SLOTS
        for i, j in zip(*np.nonzero(pres), strict=True):
            cy_, cx_ = int(ay[i]), int(ax[j])

            def u(k: int, cy_=cy_, cx_=cx_, slot=slot) -> float:
                return _u1(g.seed, 100_000 + stream * 1000 + slot * 128 + k, cy_, cx_)

            out.append((cy_, cx_, slot, u))
    return out


def _box(cy: float, cx: float, r: float, y0: int, x0: int, h: int, w: int):
    """Window-relative slices of the square ``(cy, cx) +- r`` clipped to the window, or None."""
    a0 = max(int(math.floor(cy - r)) - y0, 0)
    a1 = min(int(math.ceil(cy + r)) + 1 - y0, h)
    b0 = max(int(math.floor(cx - r)) - x0, 0)
    b1 = min(int(math.ceil(cx + r)) + 1 - x0, w)
    if a0 >= a1 or b0 >= b1:
        return None
    return slice(a0, a1), slice(b0, b1)


def _artefacts(g: _Geometry, rp: _Real, stain: Stain, y0: int, x0: int, h: int, w: int,
               tissue: np.ndarray, fine: np.ndarray) -> _Art:
    """Folds, pen marks, bubbles, out-of-focus patches and dust on a window of one section."""
    p = rp.p
    y1, x1 = y0 + h, x0 + w
    bits = np.zeros((h, w), np.uint8)
    art = _Art(bits)
    f32 = np.float32

    def grid(sl):
        yy = np.arange(y0 + sl[0].start, y0 + sl[0].stop, dtype=np.float64)[:, None]
        xx = np.arange(x0 + sl[1].start, x0 + sl[1].stop, dtype=np.float64)[None, :]
        return yy, xx

    def gain(name):
        if getattr(art, name) is None:
            setattr(art, name, np.ones((h, w), f32))
        return getattr(art, name)

    def add_od():
        if art.od is None:
            art.od = np.zeros((h, w, 3), f32)
        return art.od

    for ay, ax, _, u in _instances(g, stain, "fold", p.fold, y0, y1, x0, x1):
        cy = (ay + u(0)) * _ART_CELL
        cx = (ax + u(1)) * _ART_CELL
        half = 150.0 + 450.0 * u(2)
        th = math.pi * u(3)
        hw = 12.0 + 33.0 * u(4)
        ey, ex = math.sin(th), math.cos(th)
        sl = _box(cy, cx, half + hw + 2, y0, x0, h, w)
        if sl is None:
            continue
        yy, xx = grid(sl)
        t = np.clip((yy - cy) * ey + (xx - cx) * ex, -half, half)
        d = np.hypot(yy - cy - t * ey, xx - cx - t * ex)
        m = (d < hw) & tissue[sl]
        tg = gain("tissue_gain")
        tg[sl] = np.where(m, f32(1.7 + 0.3 * u(5)) + f32(0.4) * (d < 2.5), tg[sl])
        bits[sl] |= np.where(m, np.uint8(ARTEFACT_BITS["fold"]), np.uint8(0))

    for ay, ax, _, u in _instances(g, stain, "pen", p.pen, y0, y1, x0, x1):
        # the arc's midpoint: of six candidates in the cell, the one nearest the tissue edge
        cand_y = (ay + np.array([u(10 + k) for k in range(6)])) * _ART_CELL
        cand_x = (ax + np.array([u(20 + k) for k in range(6)])) * _ART_CELL
        if stain == "ihc":
            fy = cand_y - rp.offset[0] - _field(rp.waves[0], cand_y, cand_x)
            fx = cand_x - rp.offset[1] - _field(rp.waves[1], cand_y, cand_x)
        else:
            fy, fx = cand_y, cand_x
        k = int(np.argmin(np.abs(_tissue_points(g, fy, fx))))
        my, mx = float(cand_y[k]), float(cand_x[k])
        rr = 250.0 + 450.0 * u(0)
        beta = 2 * math.pi * u(1)
        span = 0.6 + 1.4 * u(2)
        width = 6.0 + 10.0 * u(3)
        ccy, ccx = my - rr * math.sin(beta), mx - rr * math.cos(beta)
        reach = 2 * rr * math.sin(span / 4) + width
        sl = _box(my, mx, reach, y0, x0, h, w)
        if sl is None:
            continue
        yy, xx = grid(sl)
        d = np.hypot(yy - ccy, xx - ccx)
        ang = np.angle(np.exp(1j * (np.arctan2(yy - ccy, xx - ccx) - beta)))
        inside_ang = np.clip((span / 2 - np.abs(ang)) * rr / 3.0, 0, 1)  # rounded-ish ends
        prof = np.clip(width / 2 - np.abs(d - rr) + 0.5, 0, 1) * inside_ang
        ink = np.array(list(_INKS.values())[min(int(3 * u(4)), 2)], f32) * f32(0.55 + 0.5 * u(5))
        dens = (prof * (0.85 + 0.15 * fine[sl])).astype(f32)
        add_od()[sl] += dens[..., None] * ink
        bits[sl] |= np.where(prof >= 0.5, np.uint8(ARTEFACT_BITS["pen"]), np.uint8(0))

    for ay, ax, _, u in _instances(g, stain, "bubble", p.bubble, y0, y1, x0, x1):
        cy = (ay + u(0)) * _ART_CELL
        cx = (ax + u(1)) * _ART_CELL
        r = 40.0 + 140.0 * u(2)
        rim = 3.0 + 3.0 * u(3)
        sl = _box(cy, cx, r + rim + 2, y0, x0, h, w)
        if sl is None:
            continue
        yy, xx = grid(sl)
        d = np.hypot(yy - cy, xx - cx)
        interior = d < r
        ring = np.clip(1.0 - np.abs(d - r - rim / 2) / (rim / 2 + 0.5), 0, 1).astype(f32)
        gain("tissue_gain")[sl] *= np.where(interior, f32(0.4), f32(1))
        gain("glass_gain")[sl] *= np.where(interior, f32(0.5), f32(1))
        add_od()[sl] += ring[..., None] * np.array([0.45, 0.45, 0.42], f32)
        bits[sl] |= np.where(d <= r + rim, np.uint8(ARTEFACT_BITS["bubble"]), np.uint8(0))

    for ay, ax, _, u in _instances(g, stain, "blur", p.blur, y0, y1, x0, x1):
        cy = (ay + u(0)) * _ART_CELL
        cx = (ax + u(1)) * _ART_CELL
        r = 150.0 + 230.0 * u(2)
        sigma = 2.0 + (_BLUR_SIGMA_MAX - 2.0) * u(3)
        sl = _box(cy, cx, r + 20, y0, x0, h, w)
        if art.blur is None:
            art.blur = []
        art.blur.append((cy, cx, r, sigma))
        if sl is None:
            continue
        yy, xx = grid(sl)
        bits[sl] |= np.where(np.hypot(yy - cy, xx - cx) <= r, np.uint8(ARTEFACT_BITS["blur"]),
                             np.uint8(0))

    for ay, ax, _, u in _instances(g, stain, "dust", p.dust, y0, y1, x0, x1):
        cy = (ay + u(0)) * _ART_CELL
        cx = (ax + u(1)) * _ART_CELL
        for k in range(3 + int(10 * u(2))):
            sy = cy + 60.0 * (2 * u(10 + k) - 1)
            sx = cx + 60.0 * (2 * u(30 + k) - 1)
            rs = 1.2 + 2.3 * u(50 + k)
            sl = _box(sy, sx, rs + 1, y0, x0, h, w)
            if sl is None:
                continue
            yy, xx = grid(sl)
            prof = np.clip(rs - np.hypot(yy - sy, xx - sx) + 0.5, 0, 1).astype(f32)
            add_od()[sl] += prof[..., None] * np.array([0.9, 1.0, 1.05], f32) * f32(
                0.7 + 0.7 * u(70 + k))
            bits[sl] |= np.where(prof >= 0.5, np.uint8(ARTEFACT_BITS["dust"]), np.uint8(0))
    return art


# ---------------------------------------------------------------------------------------------
# realistic mode: rendering
# ---------------------------------------------------------------------------------------------
def _scene(g: _Geometry, rp: _Real, y0: int, x0: int, h: int, w: int, stain: Stain,
           pf: PositiveField):
    """Realistic window before out-of-focus blur: float32 RGB, labels, tissue, nuclei, artefacts.

    The IHC is pulled back through the deformation: IHC pixel ``q`` takes the tissue
    background (stroma, cytoplasm, fibres: a function of integer H&E-frame pixels) at
    ``round(q - offset - v(q))``; nuclei are drawn rigidly at their mapped centres.
    """
    f32 = np.float32
    sec = rp.stains[stain]
    ys = np.arange(y0, y0 + h)
    xs = np.arange(x0, x0 + w)
    if stain == "ihc":
        fyf = ys[:, None] - rp.offset[0] - _field_grid(rp.waves[0], ys, xs)
        fxf = xs[None, :] - rp.offset[1] - _field_grid(rp.waves[1], ys, xs)
        iy = np.floor(fyf + 0.5).astype(np.int64)
        ix = np.floor(fxf + 0.5).astype(np.int64)
        del fyf, fxf
        fy0, fy1 = int(iy.min()), int(iy.max()) + 1
        fx0, fx1 = int(ix.min()), int(ix.max()) + 1
        flat = (iy - fy0) * (fx1 - fx0) + (ix - fx0)
        del iy, ix
    else:
        fy0, fy1, fx0, fx1 = y0, y0 + h, x0, x0 + w
        flat = None
    rn = int(math.ceil(g.rmax)) + 4  # nuclei of the IHC are found around the pulled-back box
    margin = int(math.ceil(g.rmax + g.jitter)) + 3 * g.cell + rn
    fields = _Fields(g, fy0 - margin, fy1 + margin, fx0 - margin, fx1 + margin, pf)

    # tissue background in the H&E frame (as easy), pulled back for the IHC
    fys = np.arange(fy0, fy1)
    fxs = np.arange(fx0, fx1)
    tissue_s = fields.pixels("tissue", fy0, fy1, fx0, fx1)
    lumen_s = fields.pixels("lumen", fy0, fy1, fx0, fx1)
    tissue = (tissue_s > 0) & (lumen_s < 0)
    alpha = np.clip(tissue_s * f32(25.0), 0, 1) * np.clip(-lumen_s * f32(25.0), 0, 1)
    del lumen_s, tissue_s
    var = fields.pixels("var", fy0, fy1, fx0, fx1)
    ftab = _texture_tables(g.seed, stain)
    ffine = _lookup(ftab["fine"], fys, fxs)
    ori = fields.pixels("ori", fy0, fy1, fx0, fx1)
    dens = fields.pixels("dens", fy0, fy1, fx0, fx1)
    wy = fys[:, None] + np.round(f32(9.0) * fields.pixels("warp_y", fy0, fy1, fx0, fx1))
    wx = fxs[None, :] + np.round(f32(9.0) * fields.pixels("warp_x", fy0, fy1, fx0, fx1))
    he_tables = _texture_tables(g.seed, "he")
    fa = _lookup(he_tables["fib_h"], wy.astype(np.int64), wx.astype(np.int64))
    fb = _lookup(he_tables["fib_v"], wy.astype(np.int64), wx.astype(np.int64))
    del wy, wx
    fib = np.clip(f32(0.55) + f32(0.6) * (ori * fa + (f32(1) - ori) * fb), 0, 1)
    fib = fib * fib
    del fa, fb, ori
    epi = np.clip((dens - f32(0.45)) * f32(4.0), 0, 1)
    del dens
    if stain == "he":
        stroma_e = f32(0.10) + f32(0.45) * fib
        cyto_e = f32(0.30) + f32(0.06) * ffine
        c_2 = alpha * (epi * cyto_e + (f32(1) - epi) * stroma_e) * (f32(1) + f32(0.2) * var)
        c_h = alpha * (f32(0.03) + f32(0.07) * epi + f32(0.015) * ffine)
        del stroma_e, cyto_e
    else:
        fspeck = _lookup(ftab["speck"], fys, fxs)
        c_h = alpha * (f32(0.03) + f32(0.16) * fib * (f32(1) - epi) + f32(0.05) * epi
                       + f32(0.015) * ffine + f32(0.01) * var)
        c_2 = alpha * (f32(0.010) + f32(0.006) * fspeck)  # DAB background
        del fspeck
    del fib, epi, var, ffine, alpha
    if flat is not None:
        c_h = np.take(c_h, flat)
        c_2 = np.take(c_2, flat)
        tissue = np.take(tissue, flat)
        del flat

    # nuclei
    if stain == "he":
        nuc = _cells_real(g, rp, fields, fy0, fy1, fx0, fx1, "he", pf)
    else:
        nuc = _cells_real(g, rp, fields, fy0 - rn, fy1 + rn, fx0 - rn, fx1 + rn, "ihc", pf)
        nuc.cy, nuc.cx = _forward(rp.waves[0], rp.waves[1], rp.offset, nuc.cy, nuc.cx)
    index, rho = _rasterise(nuc, g, y0, y0 + h, x0, x0 + w)
    tab = _texture_tables(g.seed, stain)
    fine = _lookup(tab["fine"], ys, xs)
    speck = _lookup(tab["speck"], ys, xs)
    nmask = index >= 0
    idx = np.where(nmask, index, 0)
    if nuc.ids.size:
        labels = np.where(nmask, nuc.ids[idx], 0).astype(np.int32)
        conc = nuc.conc.astype(f32)[idx]
        posm = nuc.positive[idx] & nmask
        hfac = nuc.hfac.astype(f32)[idx]
        coarse = nuc.coarse.astype(f32)[idx]
    else:
        labels = np.zeros((h, w), np.int32)
        conc = hfac = np.ones((h, w), f32)
        coarse = np.zeros((h, w), f32)
        posm = np.zeros((h, w), bool)
    del idx, index
    chrom = f32(0.85) + f32(0.18) * fine + coarse * speck + f32(0.2) * rho**4
    del rho, coarse
    if stain == "he":
        c_h = np.where(nmask, hfac * conc * chrom, c_h)
        c_2 = np.where(nmask, f32(0.12) * conc, c_2)
    else:
        nuc_h = np.where(posm, f32(0.2), f32(0.55)) * conc * chrom
        nuc_d = np.where(posm, f32(0.85) * conc * chrom, f32(0.0))
        c_h = np.where(nmask, nuc_h, c_h)
        c_2 = np.where(nmask, nuc_d + c_2, c_2)
        del nuc_h, nuc_d
    del conc, chrom, hfac, posm, nmask

    art = _artefacts(g, rp, stain, y0, x0, h, w, tissue, fine)
    vec = sec["vectors"].astype(f32)
    sc = sec["scale"].astype(f32)
    second = 1 if stain == "he" else 2
    c_h = c_h * sc[0]
    c_2 = c_2 * sc[second]
    glass = f32(0.018) + f32(0.010) * speck + f32(0.004) * fine
    if art.glass_gain is not None:
        glass = glass * art.glass_gain
    bright = f32(-math.log10(sec["brightness"]))
    rgb = np.empty((h, w, 3), f32)
    for ch in range(3):
        od = c_h * vec[0, ch] + c_2 * vec[second, ch]
        if art.tissue_gain is not None:
            od = od * art.tissue_gain
        od = od + glass + f32(sec["tint"][ch]) + bright
        if art.od is not None:
            od = od + art.od[..., ch]
        rgb[..., ch] = np.float32(255.0) * np.power(np.float32(10.0), -od)
    return rgb, labels, tissue, nuc, art


def _render_real(g: _Geometry, rp: _Real, y0: int, x0: int, h: int, w: int, stain: Stain,
                 pf: PositiveField):
    """Realistic window: ``rgb`` (uint8), ``labels``, ``tissue``, nuclei, artefact bits.

    Out-of-focus patches blur the scene with a Gaussian (``truncate=4``); a window touching
    one is rendered with a halo of the largest kernel radius, so it equals the same window of
    the whole slide.
    """
    probe = _instances(g, stain, "blur", rp.p.blur, y0, y0 + h, x0, x0 + w)
    if not probe:
        rgb, labels, tissue, nuc, art = _scene(g, rp, y0, x0, h, w, stain, pf)
        return _quantise(rgb), labels, tissue, nuc, art.bits
    from scipy import ndimage as ndi

    r = _BLUR_HALO
    rgb, labels, tissue, nuc, art = _scene(g, rp, y0 - r, x0 - r, h + 2 * r, w + 2 * r,
                                           stain, pf)
    hh, ww = labels.shape
    total = np.zeros((hh, ww), np.float32)
    acc = np.zeros_like(rgb)
    for cy, cx, rad, sigma in art.blur:
        sl = _box(cy, cx, rad + 21, y0 - r, x0 - r, hh, ww)
        if sl is None:
            continue
        # blur a sub-box with a halo of the kernel radius: every pixel that the crop keeps
        # sees its whole kernel, so the values equal those of the whole slide
        a0, a1 = max(sl[0].start - r, 0), min(sl[0].stop + r, hh)
        b0, b1 = max(sl[1].start - r, 0), min(sl[1].stop + r, ww)
        inner = np.s_[sl[0].start - a0 : sl[0].stop - a0, sl[1].start - b0 : sl[1].stop - b0]
        yy = np.arange(y0 - r + sl[0].start, y0 - r + sl[0].stop, dtype=np.float64)[:, None]
        xx = np.arange(x0 - r + sl[1].start, x0 - r + sl[1].stop, dtype=np.float64)[None, :]
        wgt = np.clip((rad - np.hypot(yy - cy, xx - cx)) / 40.0 + 0.5, 0, 1).astype(np.float32)
        if not wgt.any():
            continue
        sub = rgb[a0:a1, b0:b1]
        blurred = np.stack([ndi.gaussian_filter(sub[..., ch], sigma, truncate=_BLUR_TRUNCATE)
                            for ch in range(3)], axis=-1)[inner]
        acc[sl] += wgt[..., None] * (blurred - rgb[sl])
        total[sl] += wgt
    rgb = rgb + acc / np.maximum(total, np.float32(1.0))[..., None]
    crop = np.s_[r : r + h, r : r + w]
    return (_quantise(rgb[crop]), labels[crop], tissue[crop], nuc, art.bits[crop])


def _quantise(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(rgb + np.float32(0.5)), 0, 255).astype(np.uint8)


def _jpeg_roundtrip(band: np.ndarray, quality: int, tile: int = 256) -> np.ndarray:
    """JPEG round trip of every ``tile`` px tile of a band (tiles on the global grid)."""
    import imagecodecs

    out = np.empty_like(band)
    for ty in range(0, band.shape[0], tile):
        for tx in range(0, band.shape[1], tile):
            t = np.ascontiguousarray(band[ty : ty + tile, tx : tx + tile])
            out[ty : ty + tile, tx : tx + tile] = imagecodecs.jpeg8_decode(
                imagecodecs.jpeg8_encode(t, level=int(quality)))
    return out


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
    rp: _Real | None = None,
    zart=None,
    jpeg: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(y0, rgb band)`` of ``chunk`` rows, rendering 1024 px blocks on ``pool``.

    At most ``ahead`` blocks are in flight, so memory stays flat whatever the slide width.
    ``rp``: realistic mode (artefact bits go to ``zart``); ``jpeg``: JPEG round trip of every
    256 px tile of each band at this quality (bands start on multiples of 1024 rows).
    """
    for y0 in range(0, g.height, chunk):
        y1 = min(y0 + chunk, g.height)
        band = np.empty((y1 - y0, g.width, 3), np.uint8)
        blocks = _blocks(g, y0, y1)
        futures = {}
        for i, (by, bx, bh, bw) in enumerate(blocks):
            for j in range(i, min(i + ahead, len(blocks))):
                if j not in futures:
                    if rp is None:
                        futures[j] = pool.submit(_render, g, *blocks[j], stain, pf)
                    else:
                        futures[j] = pool.submit(_render_real, g, rp, *blocks[j], stain, pf)
            res = futures.pop(i).result()
            rgb, labels, tissue, nuc = res[:4]
            if zart is not None:
                zart[by : by + bh, bx : bx + bw] = res[4]
            del res
            band[by - y0 : by - y0 + bh, bx : bx + bw] = rgb
            if stats is not None:
                stats.add(labels, by, bx, g, nuc)
            if zlabels is not None:
                zlabels[by : by + bh, bx : bx + bw] = labels
            if ztissue is not None:
                ztissue[by : by + bh, bx : bx + bw] = tissue
            del rgb, labels, tissue, nuc
        if jpeg is not None:
            band = _jpeg_roundtrip(band, jpeg)
        yield y0, band


def _downsample2(a: np.ndarray) -> np.ndarray:
    """2x2 mean (rounded) of an RGB uint8 array, odd trailing row/column dropped."""
    from daskpath import ome

    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return ome.mean2x2_u8(a[:h, :w], channel_last=True)


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
    path: Path, bands: Iterator[tuple[int, np.ndarray]], g: _Geometry, tile: int, quality: int,
    tag: str = PHANTOM_TOKEN,
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
            tif.write(level0(), shape=(g.height, g.width, 3), subifds=nlev - 1,
                      description=tag, **kw)
            for k in range(1, nlev):
                tif.write(level(k), shape=(*shapes[k], 3), subfiletype=1, **kw)
        for f in files:
            f.close()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()


def _write_stripped(path: Path, bands: Iterator[tuple[int, np.ndarray]], g: _Geometry,
                    tag: str = PHANTOM_TOKEN) -> None:
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
                description=tag,
                software="daskpath.synthetic",
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _write_zarr(path: Path, bands: Iterator[tuple[int, np.ndarray]], g: _Geometry, tile: int,
                name: str, realism: str = "easy") -> None:
    """OME-NGFF 0.5 RGB image (:mod:`daskpath.ome`): bands into level 0, then the pyramid."""
    from daskpath import ome

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        ome.create_image(tmp, (g.height, g.width), kind="rgb", chunks=(tile, tile), mpp=g.mpp,
                         fill_value=255, name=name,
                         attrs={"software": "daskpath.synthetic", "phantom": True,
                                "realism": realism, "seed": g.seed})
        for y0, band in bands:
            ome.write_region(tmp, y0, 0, band, channel_last=True)
        ome.build_pyramid(tmp, compute=False).compute(scheduler="threads")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_png(path: Path, bands: Iterator[tuple[int, np.ndarray]], g: _Geometry,
               tag: str = PHANTOM_TOKEN) -> None:
    """Streamed RGB PNG: filter "Sub" on every row, zlib level 1, one IDAT per band.

    ``tag`` (``"daskpath-phantom realism=... seed=..."``) becomes a ``tEXt`` chunk with keyword
    ``daskpath`` and text ``phantom realism=... seed=...``.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
            f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", g.width, g.height, 8, 2, 0, 0, 0)))
            ppm = int(round(1e6 / g.mpp))  # pixels per metre
            f.write(_png_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1)))
            text = tag.replace(PHANTOM_TOKEN, "phantom", 1)
            f.write(_png_chunk(b"tEXt", b"daskpath\0" + text.encode("latin-1")))
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


def _truth_table(he: _Stats, ihc: _Stats, g: _Geometry, union: bool = False):
    """One row per IHC nucleus (``union``: per nucleus of either section; NaN / 0 where absent)."""
    import pandas as pd

    ids = np.flatnonzero((ihc.count > 0) | (he.count > 0)) if union else np.flatnonzero(
        ihc.count > 0)
    cnt = ihc.count[ids]
    he_cnt = he.count[ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        y_he = np.where(he_cnt > 0, he.sy[ids] / np.maximum(he_cnt, 1), np.nan)
        x_he = np.where(he_cnt > 0, he.sx[ids] / np.maximum(he_cnt, 1), np.nan)
        if union:
            y = np.where(cnt > 0, ihc.sy[ids] / np.maximum(cnt, 1), np.nan)
            x = np.where(cnt > 0, ihc.sx[ids] / np.maximum(cnt, 1), np.nan)
        else:
            y = ihc.sy[ids] / cnt
            x = ihc.sx[ids] / cnt
    return pd.DataFrame(
        {
            "id": ids.astype(np.int32),
            "y": y,
            "x": x,
            "area": cnt.astype(np.int64),
            "positive": (ihc.positive | he.positive)[ids] if union else ihc.positive[ids],
            "cut": (ihc.border | he.border)[ids] if union else ihc.border[ids],
            "y_he": y_he,
            "x_he": x_he,
            "area_he": he_cnt.astype(np.int64),
        }
    )


def _bit_counts(z) -> dict[str, int]:
    """Pixels per artefact kind of a uint8 bitmask array (chunk by chunk)."""
    out = dict.fromkeys(ARTEFACT_BITS, 0)
    h, w = z.shape
    for y in range(0, h, _BLOCK):
        for x in range(0, w, _BLOCK):
            a = z[y : y + _BLOCK, x : x + _BLOCK]
            if a.any():
                for k, b in ARTEFACT_BITS.items():
                    out[k] += int(np.count_nonzero(a & b))
    return out


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
    quality: int | None = None,
    workers: int = 2,
    realism: Realism = "easy",
    realism_params: RealismParams | dict | None = None,
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
    quality : int, optional
        JPEG quality of ``tiled`` (default 90; ``realistic``: ``realism_params.jpeg_quality``).
    workers : int
        Threads rendering blocks.
    realism : {"easy", "realistic"}
        ``easy`` (default): the original phantom, pixels unchanged. ``realistic``: see the module
        docstring (deformation, turnover, stain variation, weak H&E cue, artefacts, JPEG).
    realism_params : RealismParams or dict, optional
        Knobs of ``realistic``; recorded in ``<slide>_truth.json``.

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
    rparams = _realism(realism, realism_params)
    if quality is None:
        quality = 90 if rparams is None else rparams.jpeg_quality
    if not 1 <= int(quality) <= 100:
        raise InvalidInputError(f"synthetic: quality={quality!r} must be in 1-100")
    g = _Geometry.build(size, seed, offset, mpp,
                        0.0 if rparams is None else rparams.warp_amplitude)
    rp = None if rparams is None else _Real.build(g, rparams)
    tag = f"{PHANTOM_TOKEN} realism={realism} seed={g.seed}"
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
    z_art = {s: root.create_array(f"artefacts_{s}", dtype="uint8", fill_value=0, **zkw)
             for s in ("he", "ihc")}
    root.attrs.update(
        {"slide": slide, "offset": list(g.offset), "mpp": g.mpp, "seed": g.seed,
         "realism": realism, "artefact_bits": ARTEFACT_BITS,
         "description": "ihc_labels/tissue/artefacts_ihc in IHC pixels; he_labels/artefacts_he "
                        "in H&E pixels; same ids"}
    )

    he_stats, ihc_stats = _Stats(g.n_ids), _Stats(g.n_ids)
    n_workers = max(1, int(workers))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for stain, path, stats, zl, zt in (
            ("he", he_path, he_stats, z_he, None),
            ("ihc", ihc_path, ihc_stats, z_ihc, z_tis),
        ):
            jpeg = None if rp is None or layout == "tiled" else rparams.jpeg_quality
            bands = _bands(g, stain, pf, chunk, pool, stats, zl, zt, ahead=2 * n_workers, rp=rp,
                           zart=None if rp is None else z_art[stain], jpeg=jpeg)
            if layout == "tiled":
                _write_tiled(path, bands, g, tile_size, quality, tag)
            elif layout == "png":
                _write_png(path, bands, g, tag)
            elif layout == "zarr":
                _write_zarr(path, bands, g, tile_size, f"{slide} {stain.upper()}", realism)
            else:
                _write_stripped(path, bands, g, tag)

    art_counts = {s: _bit_counts(z_art[s]) for s in ("he", "ihc")} if rp is not None else None
    table = _truth_table(he_stats, ihc_stats, g, union=rp is not None)
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
        "realism": realism,
        "phantom_tag": tag,
    }
    if rp is not None:
        both = (table["area"] > 0) & (table["area_he"] > 0)
        meta.update(rp.meta())
        meta.update({
            "coordinates": "y, x in IHC pixels; y_he, x_he in H&E pixels; ihc = he + "
                           "displacement(meta, y_he, x_he) (daskpath.synthetic.displacement)",
            "quality": int(quality),
            "realism_params": dataclasses.asdict(rparams),
            "artefact_bits": ARTEFACT_BITS,
            "n_nuclei_he": int((table["area_he"] > 0).sum()),
            "n_nuclei_ihc": int((table["area"] > 0).sum()),
            "turnover_measured": float(1.0 - both.mean()) if len(table) else 0.0,
            "artefact_pixels": art_counts,
            "truth_under_artefacts": "artefacts change pixels only: labels, table and tissue "
                                     "are those of the section without artefacts",
        })
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
    realism: Realism = "easy",
    **kw,
) -> Path:
    """Write ``pairs`` phantom pairs ``synth000, synth001, ...`` and ``manifest.csv``.

    Pair ``i`` uses seed ``seed + i``. The manifest has the header ``slide,he,ihc`` with paths
    relative to ``out_dir``. ``realism`` and extra keyword arguments (``realism_params``, ...)
    go to :func:`make_pair`.

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
        p = make_pair(out, slide=f"synth{i:03d}", size=size, seed=seed + i, layout=layout,
                      realism=realism, **kw)
        rows.append((p.slide, p.he.name, p.ihc.name))
    manifest = out / "manifest.csv"
    tmp = out / "manifest.csv.tmp"
    with open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["slide", "he", "ihc"])
        wr.writerows(rows)
    os.replace(tmp, manifest)
    return manifest
