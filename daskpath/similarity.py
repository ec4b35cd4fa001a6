"""Structural similarity (SSIM) between the H&E and IHC of a pair, lazily over dask chunks.

Definition (``design.md``): grayscale by :func:`skimage.color.rgb2gray` (float in [0, 1]),
Gaussian window with ``sigma = 1.5`` truncated at ``3.5 sigma`` (radius 5 px), population
covariance (``use_sample_covariance=False``), ``data_range = 1``, ``K1 = 0.01``, ``K2 = 0.03``,
``mode='reflect'`` at the image border. This is exactly what
``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, full=True)`` returns as its map.

Halo rule (:mod:`daskpath._halo`): each output pixel depends on inputs within the Gaussian
radius ``r = int(3.5 * sigma + 0.5)``, so :func:`ssim_map` runs :func:`ssim_block` on every chunk
plus ``r`` px of halo (:func:`~daskpath._halo.overlap_2d`, no padding beyond the slide edge,
where the filter's own ``'reflect'`` applies as on the whole image) and keeps the core: the same
kernel, halo and core as the pipeline's fused per-chunk task. With ``dtype=float64`` the chunked
map equals skimage's whole-image map bit for bit; the default ``float32`` path matches it within
1e-4 (float32 arithmetic with centred variances; ~5e-5 on near-white glass) and is about 15x
faster on one core (OpenCV's SIMD Gaussian, float32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from daskpath._halo import gaussian_radius, overlap_2d
from daskpath.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da
    import xarray as xr

__all__ = ["gray", "ssim_block", "ssim_map", "ssim_radius"]

_GRAY = np.array([0.2125, 0.7154, 0.0721])  # skimage.color.rgb2gray weights
_TRUNCATE = 3.5
_STRIP = 64
"""Rows per strip of the element-wise float32 work (a few arrays of 64 rows stay in the CPU's
cache: the same operations, in the same order, at about twice the speed of whole-array passes)."""


def ssim_radius(sigma: float = 1.5) -> int:
    """Radius in pixels of the SSIM Gaussian window (the halo depth): ``int(3.5 * sigma + 0.5)``."""
    return gaussian_radius(sigma, _TRUNCATE)


def gray(rgb: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Luminance in [0, 1] as :func:`skimage.color.rgb2gray` computes it.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3), uint8
        RGB image.
    dtype : numpy float type
        Output precision. ``float64`` reproduces ``rgb2gray`` exactly.
    """
    if np.dtype(dtype) == np.float64:
        from skimage.color import rgb2gray

        return rgb2gray(rgb)
    cv2 = _cv2()
    if cv2 is not None and rgb.dtype == np.uint8 and np.dtype(dtype) == np.float32 and rgb.ndim == 3:
        m = (_GRAY / 255.0).astype(np.float32).reshape(1, 3)
        h, w = rgb.shape[:2]
        out = np.empty((h, w), np.float32)
        for a in range(0, h, _STRIP):  # in cache-sized strips: half the time of one pass
            b = min(h, a + _STRIP)
            out[a:b] = cv2.transform(rgb[a:b].astype(np.float32), m).reshape(b - a, w)
        return out
    if rgb.dtype == np.uint8:
        x = rgb.astype(dtype) / dtype(255)
    else:
        x = rgb.astype(dtype, copy=False)
    w = _GRAY.astype(dtype)
    return x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2]


def gaussian_blur(x: np.ndarray, sigma: float, truncate: float, mode: str = "reflect") -> np.ndarray:
    """Separable Gaussian filter equal to :func:`scipy.ndimage.gaussian_filter` (``truncate``).

    float32 input goes through OpenCV's SIMD ``sepFilter2D`` (same normalised kernel, same
    border rule: scipy ``'reflect'`` = OpenCV ``BORDER_REFLECT``, ``'nearest'`` =
    ``BORDER_REPLICATE``), about 9x faster than scipy on one core and equal to it within float32
    rounding (~2e-7). float64 input goes through scipy, so the float64 path is bit-identical to
    skimage.
    """
    if x.dtype == np.float32:
        cv2 = _cv2()
        if cv2 is not None:
            r = int(truncate * float(sigma) + 0.5)
            k = _kernel(float(sigma), r)
            border = {"reflect": cv2.BORDER_REFLECT, "nearest": cv2.BORDER_REPLICATE}[mode]
            return cv2.sepFilter2D(x, -1, k, k, borderType=border)
    from scipy import ndimage as ndi  # here: a chunk task never imports what it does not use

    return ndi.gaussian_filter(x, sigma, mode=mode, truncate=truncate)


def _kernel(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * t * t / (sigma * sigma))
    return (w / w.sum()).reshape(-1, 1)


_CV2: list = []


def _cv2():
    """OpenCV, single-threaded (dask owns the parallelism), or None if it is not installed."""
    if not _CV2:
        try:
            import cv2

            cv2.setNumThreads(1)
            _CV2.append(cv2)
        except ImportError:  # pragma: no cover - opencv is a dependency
            _CV2.append(None)
    return _CV2[0]


def ssim_block(
    a: np.ndarray,
    b: np.ndarray,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """SSIM map of two grayscale arrays, as skimage computes it (Gaussian window).

    Works in the arrays' float precision (float32 through OpenCV's Gaussian, float64 through
    scipy's, bit-identical to skimage). Border handling is scipy's ``'reflect'``; on a halo'd
    block only the core (the radius away from every block edge that is not the slide edge) is kept.
    """
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    a = a.astype(dtype, copy=False)
    b = b.astype(dtype, copy=False)

    def filt(x: np.ndarray) -> np.ndarray:
        return gaussian_blur(x, sigma, _TRUNCATE, "reflect")

    c1 = dtype.type((k1 * data_range) ** 2)
    c2 = dtype.type((k2 * data_range) ** 2)
    if dtype == np.float64:  # the exact operation order of skimage
        ux = filt(a)
        uy = filt(b)
        uxx = filt(a * a)
        uyy = filt(b * b)
        uxy = filt(a * b)
        vx = uxx - ux * ux
        vy = uyy - uy * uy
        vxy = uxy - ux * uy
        a1 = 2 * ux * uy + c1
        a2 = 2 * vxy + c2
        b1 = ux**2 + uy**2 + c1
        b2 = vx + vy + c2
        return (a1 * a2) / (b1 * b2)
    # float32: every filter runs on inputs centred by their block means (exact in real
    # arithmetic: var(a) = E[(a-c)^2] - (E[a]-c)^2 for a constant c), so the rounding of the
    # float32 filters scales with |a - c| instead of |a| ~ 1 on near-white glass, where
    # vx + vy ~ 1e-5 << C2 would otherwise amplify it; then the same formula, in place.
    # Element-wise steps run strip by strip (_STRIP rows, in cache); each pixel sees the same
    # float32 operations in the same order as whole-array numpy would do them.
    ca = dtype.type(a.mean(dtype=np.float64))
    cb = dtype.type(b.mean(dtype=np.float64))
    h = a.shape[0]
    ac, bc = np.empty_like(a), np.empty_like(b)
    aa, bb, ab = np.empty_like(a), np.empty_like(a), np.empty_like(a)
    for r0 in range(0, h, _STRIP):
        r = slice(r0, min(h, r0 + _STRIP))
        np.subtract(a[r], ca, out=ac[r])
        np.subtract(b[r], cb, out=bc[r])
        np.multiply(ac[r], ac[r], out=aa[r])
        np.multiply(bc[r], bc[r], out=bb[r])
        np.multiply(ac[r], bc[r], out=ab[r])
    uxc = filt(ac)
    uyc = filt(bc)
    del ac, bc
    uxx = filt(aa)
    uyy = filt(bb)
    uxy = filt(ab)
    del aa, bb, ab
    num = np.empty_like(uxc)
    t = np.empty((min(h, _STRIP),) + uxc.shape[1:], dtype)
    for r0 in range(0, h, _STRIP):
        r = slice(r0, min(h, r0 + _STRIP))
        tr = t[: r.stop - r.start]
        vx, vy, vxy, xc, yc = uxx[r], uyy[r], uxy[r], uxc[r], uyc[r]
        np.multiply(xc, xc, out=tr)
        vx -= tr  # vx
        np.multiply(yc, yc, out=tr)
        vy -= tr  # vy
        np.multiply(xc, yc, out=tr)
        vxy -= tr  # vxy
        xc += ca  # ux
        yc += cb  # uy
        n = num[r]
        np.multiply(xc, yc, out=n)  # ux * uy
        xc *= xc
        yc *= yc
        n *= 2
        n += c1  # a1
        vxy *= 2
        vxy += c2  # a2
        n *= vxy
        xc += yc
        xc += c1  # b1
        vx += vy
        vx += c2  # b2
        xc *= vx
        n /= xc
    return num


def _ssim_rgb_block(he: np.ndarray, ihc: np.ndarray, sigma: float, work_dtype: type) -> np.ndarray:
    return ssim_block(gray(he, work_dtype), gray(ihc, work_dtype), sigma=sigma)


def ssim_map(
    he: xr.DataArray | da.Array | np.ndarray,
    ihc: xr.DataArray | da.Array | np.ndarray,
    sigma: float = 1.5,
    dtype: Literal["float32", "float64"] | type = "float32",
) -> xr.DataArray | da.Array:
    """Lazy SSIM map between two RGB slides of the same shape.

    Parameters
    ----------
    he, ihc : xarray.DataArray, dask.array.Array or ndarray, shape (y, x, 3), uint8
        The two images, e.g. ``ds.he, ds.ihc`` from :func:`daskpath.open_pair`; ``ihc`` is
        read on ``he``'s chunks (``open_pair`` gives both the same). NumPy arrays are wrapped in
        one dask chunk.
    sigma : float
        Gaussian window sigma (design default 1.5).
    dtype : {"float32", "float64"}
        Working precision; ``float64`` is bit-identical to skimage's whole-image map.

    Returns
    -------
    xarray.DataArray or dask.array.Array, shape (y, x), float
        A DataArray named ``"ssim"`` when ``he`` is one, with its ``y``/``x`` (and
        ``y_um``/``x_um``) coordinates and attrs (``mpp``, ...); otherwise a dask array.
        One task per chunk (read + gray + SSIM fused), halo ``depth = ssim_radius(sigma)``;
        chunked like ``he`` (a chunk thinner than the halo is merged into its neighbour).

    Examples
    --------
    >>> ds = daskpath.open_pair("a_HE.tif", "a_IHC.tif")    # doctest: +SKIP
    >>> s = ssim_map(ds.he, ds.ihc)                            # doctest: +SKIP
    >>> s.sel(y=slice(0, 1023), x=slice(0, 1023)).mean()       # doctest: +SKIP
    """
    from daskpath._xr import as_dask, like

    a, template = as_dask(he, "ssim_map: he")
    b, _ = as_dask(ihc, "ssim_map: ihc")
    if a.shape != b.shape:
        raise InvalidInputError(f"ssim_map: shapes differ {a.shape} vs {b.shape}; register "
                                "and crop the pair to a common size")
    if a.shape[2] != 3:
        raise InvalidInputError(f"ssim_map: expected (y, x, 3) RGB arrays, got shape {a.shape}")
    if sigma <= 0:
        raise InvalidInputError(f"ssim_map: sigma must be > 0, got {sigma} (design: 1.5)")
    np_dtype = np.dtype(dtype).type
    # ihc takes he's chunks; the channel axis is one chunk, the halo runs over (y, x) only
    out = overlap_2d(_ssim_rgb_block, a, b, depth=ssim_radius(sigma), dtype=np_dtype,
                     drop_axis=2, sigma=sigma, work_dtype=np_dtype)
    return like(out, template, "ssim")
