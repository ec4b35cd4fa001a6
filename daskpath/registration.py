"""Per-tile registration refinement between consecutive sections.

The H&E and the Ki67 IHC of a pair are two distinct sections: after the slide-level
registration of the cohort (or none) a tile of the H&E still sits a few to a few tens of
pixels away from the same tissue in the IHC, and the offset varies smoothly over the slide
(the sections stretch and fold differently). Comparing the two tiles at the same coordinates
then lowers their SSIM and mixes different cells into the training pairs.

This module estimates that residual translation tile by tile and measures the SSIM on the
refined alignment:

* **Signal**: a "nuclear" optical-density channel present in both stains, the sum of the
  hematoxylin and DAB concentrations of colour deconvolution (skimage's HED vectors). In the
  H&E it is the hematoxylin of the nuclei, in the IHC the nuclei of either class; eosin and
  background drop out, so the two sections look alike to the correlation.
* **Estimate**: phase correlation (:func:`skimage.registration.phase_cross_correlation`,
  ``normalization="phase"``) of the two tiles at the same coordinates after a 2x box
  downsample and a Hann window, refined to 1/``upsample`` px of the downsampled grid (0.2 px
  of the slide by default) by its matrix-multiply DFT. The result ``(dy, dx)`` means: the
  tissue at H&E pixel ``(y, x)`` lies at IHC pixel ``(y + dy, x + dx)``, the convention of
  :func:`daskpath.synthetic.displacement`.
* **Refined SSIM**: the mean over the tile of the SSIM map of the H&E against the IHC moved
  by the rounded shift (whole pixels: no resampling blur), computed on the tile plus the SSIM
  halo, as the whole-slide map would be. IHC pixels outside the slide repeat its edge.
* **Acceptance**: the refined alignment is used only when the estimate is within
  ``max_shift`` px on both axes and raises the SSIM; otherwise the tile keeps the rigid SSIM
  (``registered`` false) and still reports its estimate (NaN when none was made).

Everything here is per tile and reads only that tile's pixels plus a margin, so the result
does not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "REGISTRATION_COLUMNS",
    "estimate_shift",
    "nuclear_density",
    "register_tiles",
]

#: Columns :func:`register_tiles` returns, in order (also the tile-table columns it adds).
REGISTRATION_COLUMNS = ("dy", "dx", "ssim_refined", "registered")


def nuclear_density(rgb: np.ndarray, downsample: int = 1) -> np.ndarray:
    """Hematoxylin + DAB optical density (float32) of an RGB tile: nuclei in H&E and IHC alike.

    ``downsample`` > 1 averages ``f x f`` pixels (OpenCV's area interpolation) before the
    optical density: a quarter of the work at 2, still resolving nuclei.
    """
    from daskpath.similarity import _cv2
    from daskpath.stain import HED

    x = np.asarray(rgb).astype(np.float32)
    f = max(1, int(downsample))
    if f > 1:
        h, w = x.shape[0] // f, x.shape[1] // f
        x = x[: h * f, : w * f]
        cv2 = _cv2()
        if cv2 is not None:
            x = cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA)
        else:  # pragma: no cover - opencv is a dependency
            x = x.reshape(h, f, w, f, 3).mean(axis=(1, 3))
    np.maximum(x, 1.0, out=x)
    od = np.log10(x)
    od -= np.float32(np.log10(255.0))  # -OD: log10(I / 255)
    m = HED.stain_from_rgb.astype(np.float32)
    out = od @ -(m[:, 0] + m[:, 2])  # one projection: H + DAB concentration
    np.maximum(out, 0, out=out)
    return out


def estimate_shift(he: np.ndarray, ihc: np.ndarray, *, downsample: int = 2,
                   upsample: int = 10) -> tuple[float, float]:
    """Residual translation between an H&E tile and the IHC tile at the same coordinates.

    Parameters
    ----------
    he, ihc : ndarray, shape (h, w, 3), uint8
        The two tiles (same shape, same slide coordinates).
    downsample : int
        Area downsample before the correlation (2: 4x less work, nuclei still resolved).
    upsample : int
        Sub-pixel refinement factor of the correlation peak (on the downsampled grid).

    Returns
    -------
    (dy, dx) : float
        The tissue at H&E pixel ``(y, x)`` lies at IHC pixel ``(y + dy, x + dx)``.
    """
    from skimage.registration import phase_cross_correlation

    if he.shape != ihc.shape:
        raise ValueError(f"estimate_shift: tiles differ in shape: {he.shape} vs {ihc.shape}")
    f = max(1, int(downsample))
    a, b = nuclear_density(he, f), nuclear_density(ihc, f)
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1])).astype(np.float32)
    a = (a - a.mean()) * win
    b = (b - b.mean()) * win
    if not (np.any(a) and np.any(b)):
        return float("nan"), float("nan")
    shift, _, _ = phase_cross_correlation(a, b, upsample_factor=int(upsample),
                                          normalization="phase")
    # skimage returns the shift that moves `b` onto `a`: the content of a at p sits in b at p - shift
    return float(-shift[0] * f), float(-shift[1] * f)


def register_tiles(
    *,
    he_src: Any,
    ihc_src: Any,
    shape: tuple[int, int],
    tiles: Sequence[tuple[int, int, int, int]],
    rigid_ssim: Sequence[float],
    max_shift: int,
    ssim_sigma: float,
    ssim_dtype: str,
    downsample: int = 2,
) -> np.ndarray:
    """Refine the alignment of some tiles of a pair: one task's worth of tiles.

    Parameters
    ----------
    he_src, ihc_src : RegionReader
        Indexable as ``src[ys, xs]`` (a picklable slide reader, a zarr or NumPy array).
    shape : (height, width)
        Slide size.
    tiles : sequence of (y0, x0, height, width)
        The tiles (slide pixels).
    rigid_ssim : sequence of float
        Each tile's SSIM at the same coordinates (the rigid alignment).
    max_shift : int
        Largest accepted residual (px, per axis).
    ssim_sigma, ssim_dtype : float, str
        The SSIM settings (``ssim.sigma``, ``ssim.dtype``).
    downsample : int
        See :func:`estimate_shift`.

    Returns
    -------
    ndarray, shape (n, 4), float64
        Per tile :data:`REGISTRATION_COLUMNS`: ``dy, dx`` (the estimate; NaN when the tile has
        no signal), ``ssim_refined`` (SSIM on the refined alignment; the rigid SSIM when it was
        not used) and ``registered`` (1.0 when the refined alignment was used).
    """
    from daskpath._halo import read_padded
    from daskpath.similarity import gray, ssim_block, ssim_radius

    r = ssim_radius(ssim_sigma)
    wdt = np.dtype(ssim_dtype).type
    h, w = shape
    out = np.empty((len(tiles), 4), dtype=np.float64)
    # a tiled TIFF or an ingested slide is read through one cache of its decoded tiles / zarr
    # chunks: a tile plus its halo and its shifted window overlap up to 9 of them, shared with
    # the neighbouring tiles of this batch, each decoded once per task (other sources are read
    # as they are)
    he_src, ihc_src = _BlockCache.wrap(he_src), _BlockCache.wrap(ihc_src)
    for i, ((y0, x0, th, tw), rigid) in enumerate(zip(tiles, rigid_ssim)):
        y0, x0, th, tw = int(y0), int(x0), int(th), int(tw)
        if min(th, tw) < 2 * max_shift + 2:  # a sliver at the slide edge: nothing to correlate
            out[i] = (np.nan, np.nan, rigid, 0.0)
            continue
        # the H&E tile plus the SSIM halo (clipped at the slide edge, as the rigid map is)
        ya, yb = max(0, y0 - r), min(h, y0 + th + r)
        xa, xb = max(0, x0 - r), min(w, x0 + tw + r)
        he = np.asarray(he_src[slice(ya, yb), slice(xa, xb)])
        core = (slice(y0 - ya, y0 - ya + th), slice(x0 - xa, x0 - xa + tw))
        ihc0 = np.asarray(ihc_src[slice(y0, y0 + th), slice(x0, x0 + tw)])
        dy, dx = estimate_shift(he[core], ihc0, downsample=downsample)
        out[i] = (dy, dx, rigid, 0.0)
        if not (np.isfinite(dy) and np.isfinite(dx)) or max(abs(dy), abs(dx)) > max_shift:
            continue
        sy, sx = int(round(dy)), int(round(dx))
        if sy == 0 and sx == 0:
            continue  # the rigid alignment is the refined one
        ihc = read_padded(ihc_src, ya + sy, yb + sy, xa + sx, xb + sx, shape)
        refined = float(ssim_block(gray(he, wdt), gray(ihc, wdt), sigma=ssim_sigma)[core]
                        .mean(dtype=np.float64))
        if refined > rigid:
            out[i, 2:] = (refined, 1.0)
    return out


class _BlockCache:
    """``src[ys, xs]`` of a tiled TIFF level or an ingested (zarr) slide, each file tile or zarr
    chunk decoded once per instance (:func:`daskpath.stages.preprocess.read_region` with a
    tile cache); pixel-identical to ``src[ys, xs]``."""

    def __init__(self, src: Any) -> None:
        self.src = src
        self.tiles: dict[int, np.ndarray] = {}

    @classmethod
    def wrap(cls, src: Any) -> Any:
        """A cache over the tiles of a tiled TIFF level or the chunks of an ingested (zarr)
        slide; any other source unchanged."""
        from daskpath.stages.preprocess import _tiff_level, _zarr_level

        return cls(src) if _tiff_level(src) is not None or _zarr_level(src) is not None else src

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        from daskpath.stages.preprocess import read_region

        ys, xs = key
        return read_region(self.src, int(ys.start), int(ys.stop), int(xs.start), int(xs.stop),
                           tiles=self.tiles)
