"""Artefact quality control (HistoQC-like): pen marks, air bubbles, tissue folds and blur.

:func:`artefact_block` classifies every pixel of a brightfield RGB image (H&E or Ki67 IHC
alike) and returns a ``uint8`` bitmask with the bits of the phantom's truth
(:data:`ARTEFACT_BITS`: fold 1, pen 2, bubble 4, blur 8). :func:`artefact_mask` is the lazy
dask version; :func:`artefact_fractions` reduces a mask to per-tile fractions, and a tile
carries a kind when its fraction exceeds :data:`DEFAULT_TILE_THRESHOLD` (2 %).

Everything works in optical density (OD, base 10, ``-log10((v + 1) / 256)``) and, for colour,
in the coefficients of skimage's hematoxylin / eosin / DAB vectors
(:data:`daskpath.stain.HED`, rows normalised): ``(h, e, d) = OD @ inv(M)``. Decisions use
local smoothed statistics only, never slide-level ones, so a chunk read with a halo of
:func:`qc_radius` px gives the whole-image result in its core.

Rules, and why
--------------
pen (after HistoQC's PenMarkingModule, which learns ink colours from examples)
    Marker inks are dyes outside the cone of non-negative mixtures of hematoxylin, eosin and
    DAB: green and black inks have a clearly *negative* eosin coefficient, blue ink a negative
    DAB one, while stained tissue keeps ``e >= 0`` (H&E) or slightly below (the IHC's
    counterstain), so hematoxylin-blue nuclei and DAB-brown are never ink. On glass or pale
    tissue the pixel's own colour decides (``e < -0.28 tot``: green; ``d < -0.18 tot`` and
    ``e < -0.05 tot``: blue; least-absorbed channel OD > 0.22 and >= 0.78 of the most
    absorbed one with ``e < -0.06 tot``: black / gray; only where the OD sum ``tot`` > 0.3).
    Over tissue the ink's OD adds to the tissue's, so the same tests run on the OD *in excess*
    of the local background (Gaussian mean at 8 px): green excess (red and blue absorbed,
    green < 0.45 of them), blue excess (green 0.3-0.8 and blue < 0.25 of red, on a bluish
    pixel: hematoxylin's excess has green >= red, a nucleus on eosin has green < 0), black
    excess (min channel > 0.15 and >= 0.75 of the max). The union is smoothed and kept where
    at least half the neighbourhood agrees (drops specks, keeps strokes >= ~4 px).
bubble
    An air bubble shows a thin, light-gray *neutral* rim. Rim pixels: the neutral OD excess
    (min channel) is a thin line (what a 3 x 3 opening at quarter resolution removes, so
    nuclei drop out), between 0.04 and 0.4, with all channels within 0.8 of each other
    (nuclei, DAB and fibres are coloured), that continues into two neighbours (dust specks
    do not), away from pen. Their density over 8-px cells (Gaussian, 16 px) above 0.02 marks
    a bubble, extended by hysteresis (density > 0.008 within 24 px). This is a band around
    the rim: the interior of a large bubble (> ~40 px from its rim) is not covered.
fold (after HistoQC's dark-tissue / saturation-minus-value rules, made relative)
    A fold is tissue lying on itself: its optical density doubles in the stain's own
    direction. An absolute level cannot serve both a dark H&E and a pale IHC counterstain, so
    the rule is relative: the tissue's *lower envelope* (OD sum minus glass, after a 14-px
    min filter that drops nuclei and thin strokes) exceeds 1.35 x the *median* envelope of
    the 200 x 200 px around it (a median ignores a fold band covering less than half the
    window; cells without tissue are filled 0 / 255 in a checkerboard so they do not move
    it). A 12-px opening keeps bands, drops isolated dark cells; pen and bubbles are excluded.
blur (after HistoQC's BlurDetectionModule: low Laplacian energy)
    Out-of-focus tissue loses its finest detail first. The ratio of fine-scale energy
    (Laplacian of the half-resolution OD sum) to coarse-scale energy (difference of Gaussians,
    sigma 2 - 5 px), both averaged over 8-px cells and ~12 px, does not depend on how dark or
    contrasted the tissue is: sharp phantom tissue keeps it above ~4, tissue blurred with
    sigma >= 2 px falls to ~1. Blur is flagged where the ratio is below 3 and there is
    structure to judge (coarse energy > 5e-4), so glass and lumens are never blurred.

Resolution and cost
-------------------
Colour rules run at quarter resolution (4 x 4 means), blur detail at half resolution, local
backgrounds, densities and the fold context on 8-px cells; a coarse decision applies to the
pixels of its cell (masks are blocky at 4-8 px). About 10 ms of CPU per 1024^2 tile and slide
(``benchmarks/bench_qc.py``): both slides together cost ~30 % of the preprocess stage's
existing per-chunk work (tissue masks + SSIM).

Halo and chunking
-----------------
The coarse grids are anchored at slide coordinates that are multiples of 8:
:func:`artefact_block` takes the block's top-left slide coordinate ``origin`` and skips the
rows / columns before the first grid line (halo pixels; copied from the next one). The
filters' supports add up to :func:`qc_radius` px (a multiple of 16, the checkerboard's
period), so a chunk read with that halo (:func:`daskpath._halo.read_with_halo`) and passed
with its ``origin`` gives, in its core, exactly the whole-image result; :func:`artefact_mask`
aligns chunk borders to multiples of 16 instead. At the slide edge the filters replicate the
border, as on the whole image.

Limits
------
The thresholds were chosen on phantom slides (:mod:`daskpath.synthetic`, realistic mode) whose
artefacts were designed alongside these detectors, so precision and recall measured there
(``benchmarks/results/qc.json``) are optimistic for real slides. Not found: inks close to a
stain's colour (purple, brown, red markers), folds under ~1.35x the surrounding tissue's
density (pale counterstains), narrow folds (< ~15 px), bubbles without a visible rim.
Confusions: a strongly blurred pale IHC patch can read as a fold; dense dark clusters of
nuclei next to lumens can read as small folds; clusters of dark dust can read as a bubble.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from daskpath.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da
    import xarray as xr

__all__ = [
    "ARTEFACT_BITS",
    "ARTEFACT_KINDS",
    "DEFAULT_TILE_THRESHOLD",
    "artefact_block",
    "artefact_fractions",
    "artefact_mask",
    "qc_radius",
]

ARTEFACT_KINDS = ("pen", "bubble", "fold", "blur")
"""The artefact kinds the QC flags (dust is left to the tissue mask's smoothing)."""
ARTEFACT_BITS: dict[str, int] = {"fold": 1, "pen": 2, "bubble": 4, "blur": 8}
"""Bit of each kind in :func:`artefact_block`'s mask, as in the phantom truth
(:data:`daskpath.synthetic.ARTEFACT_BITS`)."""

DEFAULT_TILE_THRESHOLD = 0.02
"""A tile carries a kind when more than this fraction of its pixels is flagged with it (chosen
on phantom slides: see ``benchmarks/results/qc.json``)."""

_TRUNC = 3.0  # Gaussian truncation (in sigmas)
_ANCHOR = 8  # the coarse grids start at multiples of this (slide px)
_ALIGN = 16  # qc_radius and artefact_mask's chunk borders: multiples of this (cell parity)

# --- parameters: OD base 10; sizes in px of the grid named ------------------------------------
# colour rules (quarter resolution, "q px" = 4 slide px)
_VISIBLE = 0.3  # OD sum under which chroma is not judged
_GREEN_E = -0.28  # green ink: eosin coefficient < this x OD sum
_BLUE_D, _BLUE_E = -0.18, -0.05  # blue ink: DAB and eosin coefficients
_BLACK_MIN, _BLACK_RATIO, _BLACK_E = 0.22, 0.78, -0.06  # black / gray ink
_S_BG = 1.0  # local background for excess ODs (1/8-resolution cells = 8 slide px)
_XG_MIN, _XG_RATIO = 0.08, 0.45  # green excess: red and blue absorbed, green much less
_XB_MIN, _XB_G, _XB_B, _XB_OD_B = 0.1, (0.3, 0.8), 0.25, 0.4  # blue excess; bluish pixel
_XK_MIN, _XK_RATIO = 0.15, 0.75  # black excess: strong and neutral
_S_PEN = 0.75  # (q px)
_PEN_KEEP = 0.5
_RIM_MIN, _RIM_MAX, _RIM_RATIO = 0.04, 0.4, 0.8  # bubble rim: light, neutral excess
_S_BUBBLE = 2.0  # rim density (1/8-resolution cells)
_BUBBLE_KEEP = 0.02  # rim density of a bubble's cells
_BUBBLE_LOW, _BUBBLE_GROW = 0.008, 3  # and of cells within _BUBBLE_GROW cells of those
# folds (quarter resolution envelope, 1/8-resolution context)
_ENV = 3  # lower envelope: min over a (2 * _ENV + 1)^2 window (half-resolution px)
_S_ENV = 1.5  # (q px)
_GLASS_OD = 0.09  # OD sum of bare glass + mountant, subtracted before OD ratios
_TISSUE_OD = 0.06  # envelope OD (above glass) that counts as tissue for the fold context
_CTX = 12  # fold context: median over (2 * _CTX + 1)^2 cells at 1/8 resolution (200 slide px)
_CTX_SCALE = 200.0  # envelope OD -> uint8 for the median (0.005 OD steps)
_FOLD_REL = 1.35
_FOLD_OPEN = 1  # opening of the fold mask, (2 * _FOLD_OPEN + 1)^2 q px
# blur (half resolution detail, 1/8-resolution energies)
_S_FINE = 1.0
_S_COARSE = 2.5
_S_BLUR = 1.5  # (1/8-resolution cells)
_BLUR_RATIO = 3.0
_BLUR_FLOOR = 5e-4


def _r(sigma: float, trunc: float = _TRUNC) -> int:
    return int(trunc * sigma + 0.5)


# support of every output pixel in slide px: chained filters add their radii, a pixel-wise
# combination takes the largest (half-resolution radii count 2 slide px, quarter resolution 4,
# 1/8 resolution 8, plus one cell per coarse grid)
_R_X = 8 * (_r(_S_BG) + 1) + 4  # excess over the local background
_R_NEAR_PEN = _R_X + 4 * (2 * _r(_S_PEN))
_R_BUBBLE = max(_R_NEAR_PEN, _R_X + 8) + 4 + 8 * (_r(_S_BUBBLE) + 1 + _BUBBLE_GROW)
_R_CTX = 2 * _ENV + 4 * (_r(_S_ENV) + 1 + 2 * _FOLD_OPEN) + 8 * (_CTX + 1)
_R_BLUR = 2 * (_r(_S_COARSE) + 1) + 8 * (_r(_S_BLUR) + 1)
_RADIUS = max(_R_NEAR_PEN, _R_BUBBLE, _R_CTX, _R_BLUR) + _ANCHOR


def qc_radius() -> int:
    """Halo in slide px that :func:`artefact_block` needs on a chunk (a multiple of 16).

    The sum of the supports of the chained filters (the fold context at 1/8 resolution is the
    widest) plus one grid cell: a chunk read with this halo gives, in its core, the
    whole-image :func:`artefact_block` result.
    """
    return -(-_RADIUS // _ALIGN) * _ALIGN


_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def _stain_transform() -> np.ndarray:
    """Rows: OD sum, eosin and DAB coefficients (skimage HED vectors, normalised)."""
    from daskpath.stain import HED

    m = HED.rgb_from_stain / np.linalg.norm(HED.rgb_from_stain, axis=1, keepdims=True)
    inv_t = np.linalg.inv(m).T  # (h, e, d) = inv_t @ od
    return np.ascontiguousarray(np.vstack([np.ones(3), inv_t[1], inv_t[2]]).astype(np.float32))


_TED = _stain_transform()


def _cv():
    from daskpath.similarity import _cv2

    cv2 = _cv2()
    if cv2 is None:  # pragma: no cover - opencv is a dependency
        raise ImportError("daskpath.qc needs OpenCV (opencv-python-headless)")
    return cv2


_KERNELS: dict[tuple[float, float], np.ndarray] = {}


def _kernel(sigma: float, trunc: float = _TRUNC) -> np.ndarray:
    k = _KERNELS.get((sigma, trunc))
    if k is None:
        r = _r(sigma, trunc)
        t = np.arange(-r, r + 1, dtype=np.float64)
        w = np.exp(-0.5 * t * t / (sigma * sigma))
        k = _KERNELS.setdefault((sigma, trunc), (w / w.sum()).astype(np.float32).reshape(-1, 1))
    return k


def _blur(cv2, x: np.ndarray, sigma: float, trunc: float = _TRUNC) -> np.ndarray:
    k = _kernel(sigma, trunc)
    return cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REPLICATE)


def _shrink(cv2, x: np.ndarray, f: int) -> np.ndarray:
    """Means over f x f cells (INTER_AREA); a partial last row / column of cells is
    completed by replicating the border."""
    h, w = x.shape[:2]
    py, px = -h % f, -w % f
    if py or px:
        x = cv2.copyMakeBorder(x, 0, py, 0, px, cv2.BORDER_REPLICATE)
    return cv2.resize(x, ((w + px) // f, (h + py) // f), interpolation=cv2.INTER_AREA)


def _grow(cv2, x: np.ndarray, f: int, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour upsampling by ``f`` (each value fills its f x f cell), cropped to
    ``(h, w)``; bool in, bool out."""
    if x.dtype == np.bool_:
        return _grow(cv2, x.view(np.uint8), f, h, w).view(np.bool_)
    big = cv2.resize(x, (x.shape[1] * f, x.shape[0] * f), interpolation=cv2.INTER_NEAREST)
    return big[:h, :w]


def _f32(mask: np.ndarray) -> np.ndarray:
    return mask.view(np.uint8).astype(np.float32)


def _classify(cv2, half: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    """Bitmask at quarter resolution of a half-resolution RGB image anchored at the grid.

    Grids: half resolution (detail for blur), quarter resolution (colour rules, envelopes)
    and 1/8 resolution (local backgrounds, densities, context); a coarse value applies to the
    finer pixels of its cell. Channels are kept as separate planes.
    """
    f32 = np.float32
    lut = _OD_LUT.reshape(1, 256)
    quarter = _shrink(cv2, half, 2)
    hq, wq = quarter.shape[:2]
    r, g, b = (cv2.LUT(c, lut) for c in cv2.split(quarter))
    tot = r + g + b
    (ce_r, ce_g, ce_b), (cd_r, cd_g, cd_b) = _TED[1], _TED[2]
    e = r * f32(ce_r) + g * f32(ce_g) + b * f32(ce_b)
    d = r * f32(cd_r) + g * f32(cd_g) + b * f32(cd_b)
    mn = cv2.min(cv2.min(r, g), b)
    mx = cv2.max(cv2.max(r, g), b)

    # pen, on glass or pale tissue: ink colours outside the H / E / DAB cone
    ink = e < f32(_GREEN_E) * tot
    ink |= (d < f32(_BLUE_D) * tot) & (e < f32(_BLUE_E) * tot)
    ink |= (mn > f32(_BLACK_MIN)) & (mn > f32(_BLACK_RATIO) * mx) & (e < f32(_BLACK_E) * tot)
    ink &= tot > f32(_VISIBLE)
    # pen over tissue: the OD in excess of the local background (the tissue under the
    # stroke, 1/8 resolution) has the ink's colour
    xr, xg, xb = (c - _grow(cv2, _blur(cv2, _shrink(cv2, c, 2), _S_BG), 2, hq, wq)
                  for c in (r, g, b))
    xmn = cv2.min(cv2.min(xr, xg), xb)
    xmx = cv2.max(cv2.max(xr, xg), xb)
    ink |= (xr > f32(_XG_MIN)) & (xb > f32(_XG_MIN)) & (xg < f32(_XG_RATIO) * cv2.min(xr, xb))
    ink |= ((xr > f32(_XB_MIN)) & (xg > f32(_XB_G[0]) * xr) & (xg < f32(_XB_G[1]) * xr)
            & (xb < f32(_XB_B) * xr) & (b < f32(_XB_OD_B) * r))
    ink |= (xmn > f32(_XK_MIN)) & (xmn > f32(_XK_RATIO) * xmx)
    pen = _blur(cv2, _f32(ink), _S_PEN) >= f32(_PEN_KEEP)
    near_pen = _blur(cv2, _f32(pen), _S_PEN) > 0

    # bubble rims: thin neutral OD excess, not pen; their density over 1/8-resolution cells
    # (white top-hat: what a 3 x 3 opening removes, i.e. thin lines, not nuclei)
    thin = cv2.morphologyEx(np.maximum(xmn, f32(0)), cv2.MORPH_TOPHAT, np.ones((3, 3), np.uint8),
                            borderType=cv2.BORDER_REPLICATE)
    rim = ((thin > f32(_RIM_MIN)) & (thin < f32(_RIM_MAX)) & (xmn > f32(_RIM_RATIO) * xmx)
           & ~near_pen)
    # a rim is a line: it continues into at least two of its 8 neighbours (dust specks do not)
    nb = cv2.boxFilter(rim.view(np.uint8), -1, (3, 3), normalize=False,
                       borderType=cv2.BORDER_REPLICATE)
    rim &= nb >= 3
    dens = _blur(cv2, _shrink(cv2, _f32(rim), 2), _S_BUBBLE)
    # hysteresis: cells dense in rim, extended to the moderately dense cells near them
    seed = cv2.dilate((dens > f32(_BUBBLE_KEEP)).view(np.uint8),
                      np.ones((2 * _BUBBLE_GROW + 1,) * 2, np.uint8), borderType=cv2.BORDER_REPLICATE)
    bubble = _grow(cv2, (dens > f32(_BUBBLE_LOW)) & seed.view(np.bool_), 2, hq, wq)

    # folds: the tissue's lower OD envelope (half resolution min filter: nuclei and strokes
    # narrower than the window drop out) well above that of the tissue around it
    t0 = cv2.transform(cv2.LUT(half, lut), np.ones((1, 3), f32))  # OD sum, half resolution
    low = cv2.erode(t0, np.ones((2 * _ENV + 1,) * 2, np.uint8), borderType=cv2.BORDER_REPLICATE)
    env = _blur(cv2, _shrink(cv2, low, 2), _S_ENV) - f32(_GLASS_OD)
    # the context: the median envelope of a (2 * _CTX + 1)^2-cell window at 1/8 resolution,
    # robust to a fold covering less than half of it; cells without tissue are filled with 0
    # and 255 in a checkerboard (parity from slide coordinates) so they barely move the median
    e8 = _shrink(cv2, env, 2)
    q8 = np.clip(e8 * f32(_CTX_SCALE), 0, 254).astype(np.uint8)
    empty = e8 <= f32(_TISSUE_OD)
    iy = (np.arange(q8.shape[0]) + cell[0]) % 2
    ix = (np.arange(q8.shape[1]) + cell[1]) % 2
    fill = np.where((iy[:, None] ^ ix[None, :]) > 0, np.uint8(255), np.uint8(0))
    q8[empty] = fill[empty]
    ctx = cv2.medianBlur(q8, 2 * _CTX + 1).astype(f32) / f32(_CTX_SCALE)
    ctx = _grow(cv2, np.maximum(ctx, f32(0.03)), 2, hq, wq)
    fold = ((env > f32(_TISSUE_OD)) & (env > f32(_FOLD_REL) * ctx)).view(np.uint8)
    # a fold is a band: an opening drops isolated dark nuclei and specks
    fold = cv2.morphologyEx(fold, cv2.MORPH_OPEN, np.ones((2 * _FOLD_OPEN + 1,) * 2, np.uint8),
                            borderType=cv2.BORDER_REPLICATE).view(np.bool_)

    # blur: fine / coarse detail energy of the half-resolution OD sum, over 1/8-res cells
    fine = cv2.Laplacian(t0, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REPLICATE)
    coarse = _blur(cv2, t0, _S_FINE) - _blur(cv2, t0, _S_COARSE)
    ef = _blur(cv2, _shrink(cv2, fine * fine, 4), _S_BLUR)
    ec = _blur(cv2, _shrink(cv2, coarse * coarse, 4), _S_BLUR)
    blur = _grow(cv2, (ec > f32(_BLUR_FLOOR)) & (ef < f32(_BLUR_RATIO) * ec), 2, hq, wq)

    fold &= ~near_pen & ~bubble

    out = pen.view(np.uint8) * np.uint8(ARTEFACT_BITS["pen"])
    out |= bubble.view(np.uint8) * np.uint8(ARTEFACT_BITS["bubble"])
    out |= fold.view(np.uint8) * np.uint8(ARTEFACT_BITS["fold"])
    out |= blur.view(np.uint8) * np.uint8(ARTEFACT_BITS["blur"])
    return out


def artefact_block(rgb: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Artefact bitmask of one in-memory RGB image (uint8, shape (y, x)).

    Parameters
    ----------
    rgb : ndarray, shape (y, x, 3), uint8
        H&E or IHC pixels.
    origin : (int, int)
        Slide coordinates of ``rgb[0, 0]`` (the start of a halo'd block, as
        :func:`daskpath._halo.read_with_halo` reads it). The coarse grids are anchored at
        multiples of 8 in slide coordinates: a block starting elsewhere (never the slide's own
        edge, which is at 0) computes from the next multiple of 8 and copies that row /
        column into the skipped ones, which lie in its halo.

    Returns
    -------
    ndarray, uint8, shape (y, x)
        Bits :data:`ARTEFACT_BITS` (several may be set on one pixel).
    """
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidInputError(f"artefact_block: expected a (y, x, 3) RGB ndarray, got "
                                f"{getattr(rgb, 'shape', type(rgb).__name__)}")
    if rgb.dtype != np.uint8:
        raise InvalidInputError(f"artefact_block: expected uint8 RGB, got {rgb.dtype}; convert "
                                "to uint8")
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return np.zeros((h, w), np.uint8)
    cv2 = _cv()
    oy, ox = -int(origin[0]) % _ANCHOR, -int(origin[1]) % _ANCHOR
    if oy >= h or ox >= w:  # a sliver before the first grid line: nothing to anchor
        return np.zeros((h, w), np.uint8)
    src = np.ascontiguousarray(rgb[oy:, ox:])
    cell = ((int(origin[0]) + oy) // 8, (int(origin[1]) + ox) // 8)
    small = _classify(cv2, _shrink(cv2, src, 2), cell)
    full = _grow(cv2, small, 4, h - oy, w - ox)
    if oy or ox:
        full = np.pad(full, ((oy, 0), (ox, 0)), mode="edge")
    return full


def artefact_mask(rgb: xr.DataArray | da.Array | np.ndarray) -> xr.DataArray | da.Array:
    """Lazy artefact bitmask of an RGB slide (:func:`artefact_block` over dask chunks).

    Parameters
    ----------
    rgb : xarray.DataArray, dask.array.Array or ndarray, shape (y, x, 3), uint8
        Slide pixels (``ds.he`` or ``ds.ihc`` from :func:`daskpath.open_pair`). A NumPy array
        is wrapped in one dask chunk.

    Returns
    -------
    xarray.DataArray or dask.array.Array of uint8, shape (y, x)
        Bits :data:`ARTEFACT_BITS`; a DataArray named ``"artefacts"`` with ``rgb``'s
        coordinates and attrs when ``rgb`` is one.

    Notes
    -----
    Halo rule (:mod:`daskpath._halo`): each chunk is computed with :func:`qc_radius` px of halo
    (no padding beyond the slide edge) and chunk borders on multiples of 16
    (``multiple=16``), so every block starts at a multiple of 16 (the grid anchor and the
    context's checkerboard period) and the result equals :func:`artefact_block` of the whole
    image, whatever the chunking. A chunk thinner than the halo is merged into its neighbour.
    """
    from daskpath._halo import overlap_2d
    from daskpath._xr import as_dask, like

    arr, template = as_dask(rgb, "artefact_mask: rgb")
    if arr.shape[2] != 3:
        raise InvalidInputError(f"artefact_mask: expected (y, x, 3) RGB, got shape {arr.shape}; "
                                "drop alpha or stack gray into 3 channels")
    if arr.dtype != np.uint8:
        raise InvalidInputError(f"artefact_mask: expected uint8 RGB, got {arr.dtype}; convert "
                                "to uint8")
    out = overlap_2d(artefact_block, arr, depth=qc_radius(), dtype=np.uint8, drop_axis=2,
                     multiple=_ALIGN)
    return like(out, template, "artefacts")


def artefact_fractions(bits: np.ndarray, tile: int) -> dict[str, np.ndarray]:
    """Per-tile flagged fraction of each kind of a whole bitmask (tiles from the top left).

    Parameters
    ----------
    bits : ndarray, uint8, shape (y, x)
        A mask from :func:`artefact_block` (or the phantom's truth).
    tile : int
        Tile side in px (the grid of :func:`daskpath.tiles.tile_grid`).

    Returns
    -------
    dict
        ``{kind: (n_ty, n_tx) float64}``; edge tiles are divided by their own area.
    """
    if not isinstance(bits, np.ndarray) or bits.ndim != 2:
        raise InvalidInputError(f"artefact_fractions: expected a (y, x) mask, got "
                                f"{getattr(bits, 'shape', type(bits).__name__)}")
    if int(tile) < 1:
        raise InvalidInputError(f"artefact_fractions: tile must be >= 1 px, got {tile}")
    h, w = bits.shape
    out = {}
    for kind in ARTEFACT_KINDS:
        m = (bits & ARTEFACT_BITS[kind]) > 0
        s = np.add.reduceat(np.add.reduceat(m.astype(np.int64), np.arange(0, h, tile), axis=0),
                            np.arange(0, w, tile), axis=1)
        area = np.outer(np.diff(np.r_[np.arange(0, h, tile), h]),
                        np.diff(np.r_[np.arange(0, w, tile), w]))
        out[kind] = s / area
    return out
