"""Ilastik-style random-forest pixel classifier: Ki67 ratio from H&E alone.

Every pixel gets the features ilastik's pixel classification uses, at several scales
(:func:`skimage.feature.multiscale_basic_features`: Gaussian-smoothed intensity, Sobel edge
magnitude of the smoothed image and the two Hessian eigenvalues, "texture"), computed on the
hematoxylin and eosin optical-density channels of the H&E (colour deconvolution with
skimage's ``hed_from_rgb``; OD = ``-log10(max(rgb, 1) / 255)``). A scikit-learn
``RandomForestClassifier`` labels each pixel **background (0)**, **Ki67-negative nucleus (1)**
or **Ki67-positive nucleus (2)**. It is trained on sparse labelled pixels (a few thousand per
class and window, as a user's brush strokes would give) of phantom slides, whose truth says
which pixels belong to which nucleus and which nuclei are Ki67-positive.

Tile ratio = positive-nucleus pixels / nucleus pixels (classes 2 / (1 + 2)) of the tile, NaN
without nucleus pixels. Pixels, not nuclei, are counted: a nucleus crossing a tile border
counts in both tiles by the pixels that fall in each (the area definition with pixel ownership).

Chunks and halo
---------------
:func:`predict_pixels_rf` runs :func:`~daskpath._halo.overlap_2d` (the halo rule of
:mod:`daskpath._halo`: no padding beyond the slide edge) with
``depth = int(4 * sigma_max + 0.5) + 2`` px (Gaussian radius at truncate 4, plus one pixel for
each of the two ``np.gradient`` passes of the Hessian; Sobel needs one): every kept pixel sees
its whole support, and at the slide edges the filters see the same edge as in a whole-image run.
So the class map does not depend on the chunking (tested on odd chunk sizes against
:func:`classify_image` on the whole image). Inside a chunk the features are computed in row
strips of ``strip`` rows (with the same halo), so memory stays at about
``(strip + 2 * depth) * chunk_width * n_features * 4`` bytes whatever the chunk height.

Model folder and trust
----------------------
``model.skops`` (:mod:`skops.io`: no pickle, no code runs on load) + ``daskpath.json``. skops
reports ``sklearn.tree._tree.Tree`` as not trusted by default because a crafted tree with
out-of-range node indices can make ``predict`` read out of bounds; :func:`load_rf` trusts that
one type and then checks every tree's node arrays (children, features, thresholds) before use,
which removes that risk. The model is loaded once per worker process (a locked cache); the task
graph only carries the folder path.

Reproduce the shipped model (``daskpath/models/rf_phantom/README.md``)::

    python -m daskpath.baselines.rf OUT_DIR --workdir /tmp/phantoms
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from daskpath._halo import gaussian_radius, overlap_2d
from daskpath.baselines._common import (
    BINS,
    as_rgb_dask,
    cached,
    check_tiles,
    read_spec,
    resolve_model,
    write_spec,
)
from daskpath.errors import ConfigError, DaskpathError, InvalidInputError, ModelError, ModelNotFoundError

__all__ = [
    "RFSpec",
    "CLASSES",
    "pixel_features",
    "classify_image",
    "load_rf",
    "save_rf",
    "predict_pixels_rf",
    "predict_tiles_rf",
    "train_rf",
    "main",
]

log = logging.getLogger(__name__)

#: Pixel classes, in label order.
CLASSES = ("background", "negative", "positive")
_WEIGHTS = "model.skops"
_STAINS = {"H": 0, "E": 1, "D": 2}
#: The one skops type beyond its defaults that a random forest needs (checked after loading).
_TRUSTED = ["sklearn.tree._tree.Tree"]


@dataclass(frozen=True)
class RFSpec:
    """Features and file layout of a random-forest pixel classifier (the JSON spec).

    Attributes
    ----------
    channels : tuple of str
        Deconvolved OD channels the features are computed on (``"H"``, ``"E"``, ``"D"``).
    sigma_min, sigma_max : float
        Smallest and largest Gaussian sigma (px).
    num_sigma : int
        Number of sigmas, log-spaced from ``sigma_min`` to ``sigma_max``.
    intensity, edges, texture : bool
        Feature groups of :func:`skimage.feature.multiscale_basic_features`.
    strip : int
        Rows per feature strip inside a chunk (memory bound; results do not depend on it).
    weights : str
        File name of the skops model inside the folder.
    extra : dict
        Provenance: training options, command, figures.
    """

    channels: tuple[str, ...] = ("H", "E")
    sigma_min: float = 0.7
    sigma_max: float = 5.6
    num_sigma: int = 4
    intensity: bool = True
    edges: bool = True
    texture: bool = True
    strip: int = 256
    weights: str = _WEIGHTS
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        bad = [c for c in self.channels if c not in _STAINS]
        if bad or not self.channels:
            raise ModelError(f"rf spec: channels={list(self.channels)!r}; use a subset of H, E, D")
        if not (0 < self.sigma_min <= self.sigma_max <= 64):
            raise ModelError(f"rf spec: sigmas {self.sigma_min}-{self.sigma_max} must satisfy "
                             "0 < sigma_min <= sigma_max <= 64")
        if not (isinstance(self.num_sigma, int) and self.num_sigma >= 1):
            raise ModelError(f"rf spec: num_sigma={self.num_sigma!r} must be a positive integer")
        if not (self.intensity or self.edges or self.texture):
            raise ModelError("rf spec: enable at least one of intensity, edges, texture")
        if not (isinstance(self.strip, int) and self.strip >= 16):
            raise ModelError(f"rf spec: strip={self.strip!r} must be an integer >= 16")

    @property
    def sigmas(self) -> np.ndarray:
        """The Gaussian sigmas, as skimage spaces them."""
        return np.logspace(np.log2(self.sigma_min), np.log2(self.sigma_max), num=self.num_sigma,
                           base=2, endpoint=True)

    @property
    def depth(self) -> int:
        """Halo (px) that makes chunked features equal whole-image features."""
        radius = gaussian_radius(float(self.sigma_max), truncate=4.0)  # skimage gaussian's rule
        return radius + 2  # + two np.gradient passes (texture); Sobel needs only one

    @property
    def n_features(self) -> int:
        per_sigma = int(self.intensity) + int(self.edges) + 2 * int(self.texture)
        return len(self.channels) * self.num_sigma * per_sigma

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d = {"kind": "rf", "format": "skops", "classes": list(CLASSES), **d}
        d["depth"], d["n_features"] = self.depth, self.n_features
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "spec") -> RFSpec:
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names - {"kind", "format", "classes", "depth", "n_features"})
        if unknown:
            raise ModelError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ModelError) as e:
            raise ModelError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------
# features and classification of numpy images
# --------------------------------------------------------------------------------------------
def _stain_channels(rgb: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """Deconvolved OD channels of an RGB uint8 image, float32 ``(h, w, len(channels))``."""
    from skimage.color import hed_from_rgb

    od = -np.log10(np.maximum(rgb, 1).astype(np.float32) * np.float32(1 / 255.0))
    m = hed_from_rgb.astype(np.float32)[:, [_STAINS[c] for c in channels]]
    return np.ascontiguousarray(od @ m)


def pixel_features(rgb: np.ndarray, spec: RFSpec | None = None, *, reference: bool = False
                   ) -> np.ndarray:
    """Per-pixel features of an RGB uint8 image: float32 ``(h, w, spec.n_features)``.

    Border pixels use the filters' own edge handling (as for a whole slide); see the module
    docstring for the halo that makes a window's inner pixels equal to the slide's.

    The features are those of :func:`skimage.feature.multiscale_basic_features` (same order,
    same kernels, truncation and border modes). By default they are computed by
    :func:`_fast_features` (OpenCV's separable filters for the Gaussian and Sobel passes, the
    feature planes transposed once instead of ``np.stack``): ~4x less CPU, equal to skimage's
    within float32 rounding (the Gaussian and Sobel sums are accumulated in float32 instead of
    float64; the gradients and Hessian eigenvalues are computed as skimage does). ``reference``
    calls skimage itself.
    """
    spec = spec or RFSpec()
    ch = _stain_channels(np.asarray(rgb), spec.channels)
    if not reference:
        return _fast_features(ch, spec)
    from skimage.feature import multiscale_basic_features

    f = multiscale_basic_features(ch, intensity=spec.intensity, edges=spec.edges,
                                  texture=spec.texture, sigma_min=spec.sigma_min,
                                  sigma_max=spec.sigma_max, num_sigma=spec.num_sigma, workers=1,
                                  channel_axis=-1)
    return f.astype(np.float32, copy=False)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian (radius ``int(truncate * sigma + 0.5)``, sum 1)."""
    r = gaussian_radius(float(sigma), truncate=truncate)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 / (sigma * sigma) * x * x)
    return k / k.sum()


def _fast_features(ch: np.ndarray, spec: RFSpec) -> np.ndarray:
    """skimage's ``multiscale_basic_features`` of float32 ``(h, w, c)`` channels, with OpenCV.

    Per channel, per sigma (skimage's order): the Gaussian (``mode="nearest"``, truncate 4:
    ``BORDER_REPLICATE``), its Sobel magnitude (``ndi.convolve`` with ``[1, 0, -1] x [1, 2,
    1] / 4``, ``mode="reflect"``: ``BORDER_REFLECT``; ``sqrt(gy² + gx²) / sqrt(2)``), and the
    two Hessian eigenvalues from ``np.gradient`` of the Gaussian (larger first, the gradients
    by :func:`_gradient`, bit-identical), exactly as :func:`skimage.feature.hessian_matrix_eigvals`
    computes them.
    """
    import cv2

    h, w, nc = ch.shape
    buf = np.empty((spec.n_features, h, w), np.float32)
    smooth = np.array([0.25, 0.5, 0.25], np.float32)
    edge = np.array([1.0, 0.0, -1.0], np.float32)
    inv_sqrt2 = np.float32(1.0) / np.sqrt(np.float32(2.0))
    k = 0
    for c in range(nc):
        img = np.ascontiguousarray(ch[..., c], dtype=np.float32)
        for sigma in spec.sigmas:
            kern = _gaussian_kernel(float(sigma))
            g = cv2.sepFilter2D(img, cv2.CV_32F, kern, kern, borderType=cv2.BORDER_REPLICATE)
            if spec.intensity:
                buf[k] = g
                k += 1
            if spec.edges:
                gy = cv2.sepFilter2D(g, cv2.CV_32F, smooth, edge, borderType=cv2.BORDER_REFLECT)
                gx = cv2.sepFilter2D(g, cv2.CV_32F, edge, smooth, borderType=cv2.BORDER_REFLECT)
                np.multiply(cv2.magnitude(gx, gy), inv_sqrt2, out=buf[k])
                k += 1
            if spec.texture:
                dy, dx = _gradient(g, 0), _gradient(g, 1)
                m00 = _gradient(dy, 0)
                m01 = _gradient(dy, 1)
                m11 = _gradient(dx, 1)
                half = (m00 + m11) / 2
                hsqrtdet = np.sqrt(m01**2 + ((m00 - m11) / 2) ** 2)
                np.add(half, hsqrtdet, out=buf[k])
                np.subtract(half, hsqrtdet, out=buf[k + 1])
                k += 2
    return np.ascontiguousarray(buf.transpose(1, 2, 0))


def _gradient(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.gradient(a, axis=axis)`` of a float32 image, bit for bit, with OpenCV.

    Inside, ``(a[i+1] - a[i-1]) / 2`` as a 3-tap filter ``[-0.5, 0, 0.5]`` (each product is a
    power-of-two scaling, so the one rounding of the sum is NumPy's); at the two borders
    NumPy's one-sided differences ``a[1] - a[0]`` and ``a[-1] - a[-2]``. 2-3x faster than
    ``np.gradient`` on a strip.
    """
    import cv2

    if a.dtype != np.float32 or a.ndim != 2 or min(a.shape) < 2:
        return np.gradient(a, axis=axis)
    a = np.ascontiguousarray(a)
    k = np.array([-0.5, 0.0, 0.5], np.float32)
    one = np.ones(1, np.float32)
    if axis == 0:
        out = cv2.sepFilter2D(a, cv2.CV_32F, one, k, borderType=cv2.BORDER_REPLICATE)
        np.subtract(a[1], a[0], out=out[0])
        np.subtract(a[-1], a[-2], out=out[-1])
    else:
        out = cv2.sepFilter2D(a, cv2.CV_32F, k, one, borderType=cv2.BORDER_REPLICATE)
        np.subtract(a[:, 1], a[:, 0], out=out[:, 0])
        np.subtract(a[:, -1], a[:, -2], out=out[:, -1])
    return out


def classify_image(rgb: np.ndarray, clf: Any, spec: RFSpec, *, core: tuple[int, int, int, int] | None = None
                   ) -> np.ndarray:
    """Pixel classes (uint8: 0 background, 1 negative, 2 positive nucleus) of an RGB image.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(h, w, 3)`` uint8.
    clf : sklearn.ensemble.RandomForestClassifier
        Trained on :func:`pixel_features` of ``spec``.
    spec : RFSpec
    core : tuple of int, optional
        ``(y0, y1, x0, x1)``: classify only this window of ``rgb`` (the rest is context, used by
        the filters). Default: the whole image.

    Notes
    -----
    Features are computed in row strips of ``spec.strip`` rows with ``spec.depth`` rows of
    context, so the result equals a single whole-image computation.
    """
    h, w = rgb.shape[:2]
    y0, y1, x0, x1 = core if core is not None else (0, h, 0, w)
    d = spec.depth
    cx0, cx1 = max(0, x0 - d), min(w, x1 + d)
    out = np.empty((y1 - y0, x1 - x0), np.uint8)
    for s0 in range(y0, y1, spec.strip):
        s1 = min(s0 + spec.strip, y1)
        a0, a1 = max(0, s0 - d), min(h, s1 + d)
        f = pixel_features(rgb[a0:a1, cx0:cx1], spec)[s0 - a0:s1 - a0, x0 - cx0:x1 - cx0]
        pred = clf.predict(f.reshape(-1, f.shape[-1]))
        out[s0 - y0:s1 - y0] = pred.reshape(s1 - s0, x1 - x0)
    return out


# --------------------------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------------------------
def _check_forest(clf: Any, n_features: int, source: str) -> None:
    """Refuse a forest whose trees would index out of bounds (a corrupt or crafted file)."""
    from sklearn.ensemble import RandomForestClassifier

    if not isinstance(clf, RandomForestClassifier):
        raise ModelError(f"{source}: holds a {type(clf).__name__}, not a RandomForestClassifier; "
                         "retrain with python -m daskpath.baselines.rf")
    if getattr(clf, "n_features_in_", None) != n_features:
        raise ModelError(f"{source}: forest expects {getattr(clf, 'n_features_in_', None)} features "
                         f"but the spec gives {n_features}; the spec and model do not belong together")
    if list(getattr(clf, "classes_", [])) != [0, 1, 2]:
        raise ModelError(f"{source}: classes {list(getattr(clf, 'classes_', []))} are not [0, 1, 2]")
    for k, est in enumerate(clf.estimators_):
        t = est.tree_
        n = int(t.node_count)
        left, right, feat = t.children_left, t.children_right, t.feature
        leaf = left == -1
        ok = (len(left) == n and len(right) == n and len(feat) == n and n >= 1
              and np.all((right == -1) == leaf)
              and np.all((left[~leaf] > 0) & (left[~leaf] < n) & (right[~leaf] > 0) & (right[~leaf] < n))
              and np.all((feat[~leaf] >= 0) & (feat[~leaf] < n_features))
              and t.value.shape[0] == n and t.value.shape[-1] == 3
              and np.all(np.isfinite(t.threshold[~leaf])))
        if not ok:
            raise ModelError(f"{source}: tree {k} is corrupt (node indices out of range); "
                             "restore the file or retrain")


def _load(folder: str) -> tuple[Any, RFSpec]:
    try:
        import skops.io as sio
    except ImportError:  # pragma: no cover - depends on the environment
        raise ModelError("the rf baseline needs scikit-learn and skops: pip install "
                         "'scikit-learn>=1.4' 'skops>=0.10'") from None
    path = Path(folder)
    spec = RFSpec.from_json(read_spec(path, "rf"), source=str(path / "daskpath.json"))
    wpath = path / spec.weights
    if not wpath.is_file():
        raise ModelNotFoundError(f"{wpath}: model file missing; restore it or retrain with "
                                 "python -m daskpath.baselines.rf")
    try:
        clf = sio.load(wpath, trusted=_TRUSTED)
    except Exception as e:  # noqa: BLE001 - skops raises many kinds on bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{wpath}: cannot load ({msg}); restore the file or retrain") from None
    _check_forest(clf, spec.n_features, str(wpath))
    clf.n_jobs = 1  # dask provides the parallelism
    clf.verbose = 0
    return clf, spec


def load_rf(model: str | os.PathLike[str] = "phantom") -> tuple[Any, RFSpec]:
    """The forest and spec of a model folder (or shipped name), loaded once per process.

    Parameters
    ----------
    model : str or path-like
        ``"phantom"`` (shipped) or a folder with ``daskpath.json`` and ``model.skops``.

    Returns
    -------
    (RandomForestClassifier, RFSpec)

    Raises
    ------
    ModelError
        Missing folder / files, wrong kind, or a corrupt forest.
    """
    folder = resolve_model("rf", model)
    mtime = (folder / "daskpath.json").stat().st_mtime_ns
    return cached(("rf", str(folder), mtime), lambda: _load(str(folder)))


def save_rf(folder: str | os.PathLike[str], clf: Any, spec: RFSpec) -> Path:
    """Write ``model.skops`` (zip-deflated) and ``daskpath.json`` into ``folder``."""
    import zipfile

    import skops.io as sio

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (spec.weights + ".tmp")
    clf.n_jobs = None
    sio.dump(clf, tmp, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(tmp, out / spec.weights)
    write_spec(out, spec.to_json())
    return out


# --------------------------------------------------------------------------------------------
# dask
# --------------------------------------------------------------------------------------------
class _ClassifyBlock:
    """Picklable per-chunk function: load the forest from the process cache, classify the core."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, block: np.ndarray, core: tuple[slice, slice]) -> np.ndarray:
        clf, spec = load_rf(self.folder)
        rows, cols = core
        return classify_image(block, clf, spec, core=(rows.start, rows.stop, cols.start, cols.stop))


def predict_pixels_rf(he: Any, model: str | os.PathLike[str] = "phantom"):
    """Lazy pixel classes of an H&E slide: ``(y, x)`` uint8 dask array (0/1/2, see :data:`CLASSES`).

    Parameters
    ----------
    he : dask.array.Array or numpy.ndarray
        ``(y, x, 3)`` uint8 RGB (e.g. ``daskpath.open_slide(path).data``).
    model : str or path-like
        Shipped model name (``"phantom"``) or model folder.

    Returns
    -------
    dask.array.Array
        Same spatial chunks as ``he`` (chunks thinner than the halo are merged first, see
        :func:`~daskpath._halo.align_chunks`).

    Notes
    -----
    :func:`~daskpath._halo.overlap_2d` with ``depth = spec.depth`` (``int(4 sigma_max + 0.5) +
    2``), no padding at the slide edge: the result equals a whole-image classification whatever
    the chunks.
    """
    from dask.base import tokenize

    he = as_rgb_dask(he)
    folder = resolve_model("rf", model)
    _, spec = load_rf(folder)  # fail early on a bad model; cached for the local process
    # the forest classifies the core only (features see the halo as context): trim=False
    return overlap_2d(_ClassifyBlock(str(folder)), he, depth=spec.depth, dtype=np.uint8, trim=False,
                      drop_axis=2, name=f"rf-classes-{tokenize(he, str(folder), spec.to_json())}")


def _count_rects(block: np.ndarray, folder: str, rects: np.ndarray) -> np.ndarray:
    """``(k, 2)`` int64 nucleus and positive pixels of each rect ``y0, y1, x0, x1`` (in
    ``block``'s pixels), classifying only the rects: ``block`` is a chunk with its halo, so each
    rect's features see their whole support (or the slide edge) and the classes equal a
    whole-slide classification's (:func:`classify_image` with ``core``)."""
    clf, spec = load_rf(folder)
    out = np.zeros((len(rects), 2), np.int64)
    for i, (y0, y1, x0, x1) in enumerate(rects):
        c = classify_image(block, clf, spec, core=(int(y0), int(y1), int(x0), int(x1)))
        out[i, 1] = np.count_nonzero(c == 2)
        out[i, 0] = out[i, 1] + np.count_nonzero(c == 1)
    return out


def _assemble(tiles: pd.DataFrame, parts: list[np.ndarray], index: list[np.ndarray], model: str
              ) -> pd.DataFrame:
    counts = np.zeros((len(tiles), 2), np.int64)
    for p, idx in zip(parts, index):
        np.add.at(counts, idx, p)
    out = tiles.copy()
    out["nucleus_px_rf"] = counts[:, 0]
    out["positive_px_rf"] = counts[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["ratio_rf"] = np.where(counts[:, 0] > 0, counts[:, 1] / np.maximum(counts[:, 0], 1), np.nan)
    out["class_rf"] = np.where(np.isfinite(out["ratio_rf"]), np.digitize(out["ratio_rf"].fillna(0), BINS), -1)
    out.attrs["rf_model"] = model
    return out


def predict_tiles_rf(he: Any, tiles: pd.DataFrame, model: str | os.PathLike[str] = "phantom", *,
                     compute: bool = True, record_dir: str | os.PathLike[str] | None = None):
    """Ki67 area ratio per tile from H&E alone, by the random-forest pixel classifier.

    Parameters
    ----------
    he : dask.array.Array or numpy.ndarray
        ``(y, x, 3)`` uint8 RGB H&E.
    tiles : pandas.DataFrame
        One row per tile, columns ``y0, x0, height, width`` (px); other columns are kept.
    model : str or path-like
        Shipped model name (``"phantom"``) or model folder.
    compute : bool
        ``False``: return a :class:`dask.delayed.Delayed` of the DataFrame (nothing runs).
    record_dir : path, optional
        Record each chunk's pixel counts as ``record_dir/<i>_<j>.npz``; a rerun loads them
        instead of classifying the chunk again (resume after an interrupt).

    Returns
    -------
    pandas.DataFrame
        ``tiles`` plus ``nucleus_px_rf`` and ``positive_px_rf`` (pixel counts, for area-weighted
        aggregation), ``ratio_rf`` (positive / nucleus pixels, NaN without nucleus pixels) and
        ``class_rf`` (0: < 0.2, 1: 0.2-0.5, 2: >= 0.5, -1 where the ratio is NaN).

    Notes
    -----
    Only the tiles' pixels are classified (the parts of a chunk outside every tile are not):
    each chunk that meets a tile is read with its halo and each tile's part in it classified
    with its own context, which gives the pixel classes of :func:`predict_pixels_rf` (tested).

    Raises
    ------
    InvalidInputError, ModelError
        Wrong dtype / shape of ``he``, a bad tile table, a missing or corrupt model.
    """
    import dask

    import dask.array as da

    from daskpath._halo import align_chunks

    he = as_rgb_dask(he)
    tiles = check_tiles(tiles, he.shape[:2])
    folder = resolve_model("rf", model)
    _, spec = load_rf(folder)  # fail early on a bad model
    d = spec.depth
    cy = align_chunks(he.chunks[0], min_size=d)
    cx = align_chunks(he.chunks[1], min_size=d)
    dy, dx = (d if len(cy) > 1 else 0), (d if len(cx) > 1 else 0)
    he = he.rechunk((cy, cx, 3))
    if dy or dx:  # the halo rule of overlap_2d: no padding beyond the slide edge
        he = da.overlap.overlap(he, depth={0: dy, 1: dx, 2: 0}, boundary="none",
                                allow_rechunk=False)
    blocks = he.to_delayed(optimize_graph=False)
    oy = np.cumsum((0,) + cy)
    ox = np.cumsum((0,) + cx)
    ty0, tx0 = tiles["y0"].to_numpy(), tiles["x0"].to_numpy()
    ty1, tx1 = ty0 + tiles["height"].to_numpy(), tx0 + tiles["width"].to_numpy()
    parts, index = [], []
    for i in range(len(oy) - 1):
        rows = np.flatnonzero((ty0 < oy[i + 1]) & (ty1 > oy[i]))
        if not len(rows):
            continue
        for j in range(len(ox) - 1):
            sel = rows[(tx0[rows] < ox[j + 1]) & (tx1[rows] > ox[j])]
            if not len(sel):
                continue
            rects = np.stack([np.maximum(ty0[sel], oy[i]) - oy[i], np.minimum(ty1[sel], oy[i + 1]) - oy[i],
                              np.maximum(tx0[sel], ox[j]) - ox[j], np.minimum(tx1[sel], ox[j + 1]) - ox[j]],
                             axis=1)
            top, left = (dy if i else 0), (dx if j else 0)  # the core inside the halo'd block
            rects = rects + np.array([top, top, left, left])
            part = dask.delayed(_count_rects, pure=True)(blocks[i, j, 0], str(folder), rects)
            if record_dir is not None:
                from daskpath.resume import recorded

                part, _ = recorded(part, Path(record_dir) / f"{i}_{j}.npz", "npz")
            parts.append(part)
            index.append(sel)
    result = dask.delayed(_assemble, pure=True)(tiles, parts, index, str(model))
    return result.compute() if compute else result


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _windows(slide, n: int, size: int, rng: np.random.Generator, min_tissue: float = 0.5
             ) -> list[tuple[int, int]]:
    from daskpath.baselines.data import tissue_fraction

    h, w = slide.size
    out: list[tuple[int, int]] = []
    for _ in range(200 * n):
        if len(out) >= n:
            break
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if tissue_fraction(slide.he[y0:y0 + size, x0:x0 + size]) >= min_tissue:
            out.append((y0, x0))
    return out


def _window_features(slide, y0: int, x0: int, size: int, spec: RFSpec) -> tuple[np.ndarray, np.ndarray]:
    """Features and pixel classes of a window (features see ``depth`` px of context)."""
    h, w = slide.size
    d = spec.depth
    a0, a1, b0, b1 = max(0, y0 - d), min(h, y0 + size + d), max(0, x0 - d), min(w, x0 + size + d)
    f = pixel_features(slide.he[a0:a1, b0:b1], spec)[y0 - a0:y0 - a0 + size, x0 - b0:x0 - b0 + size]
    return f, slide.pixel_classes(y0, y0 + size, x0, x0 + size)


def train_rf(
    out_dir: str | os.PathLike[str],
    seeds: Sequence[int] = tuple(range(20, 32)),
    heldout_seeds: Sequence[int] = (100, 101, 102),
    size: tuple[int, int] = (4096, 4096),
    *,
    windows: int = 3,
    window: int = 512,
    samples_per_class: int = 1500,
    n_estimators: int = 16,
    max_depth: int = 12,
    min_samples_leaf: int = 5,
    tile: int = 1024,
    min_tissue: float = 0.5,
    seed: int = 0,
    threads: int = 2,
    workdir: str | os.PathLike[str] | None = None,
    spec: RFSpec | None = None,
    realism: str = "easy",
    command: str | None = None,
) -> dict[str, Any]:
    """Train the pixel classifier on phantom slides; write a model folder; return its figures.

    Parameters
    ----------
    out_dir : path-like
        Model folder to write (``model.skops``, ``daskpath.json``, ``evaluation.json``).
    seeds : sequence of int
        Phantom slides to train on.
    heldout_seeds : sequence of int
        Other phantom slides (slide-level split) for the validation figures; may be empty.
    size : tuple of int
        Phantom slide size.
    windows, window : int
        Random windows per training slide (tissue >= ``min_tissue``) and their side (px).
    samples_per_class : int
        Labelled pixels drawn per class and window (sparse labels, class-balanced).
    n_estimators, max_depth, min_samples_leaf : int
        Forest size (kept small: the file stays well under a few MB).
    tile, min_tissue : int, float
        Held-out tiles (grid of ``tile`` px, tissue >= ``min_tissue``) for the ratio figures.
    seed : int
        Seeds the window/pixel draws and the forest.
    threads : int
        Threads for fitting.
    workdir : path-like, optional
        Where phantom slides are written (and reused); default: a temporary folder.
    realism : {"easy", "realistic"}
        Kind of phantom slides (:func:`daskpath.synthetic.make_pair`).
    spec : RFSpec, optional
        Feature settings (default :class:`RFSpec`).
    command : str, optional
        The command line, recorded in the spec.

    Returns
    -------
    dict
        ``val_pixel_accuracy``, ``val_pixel_confusion``, ``heldout`` (ratio metrics of
        :func:`daskpath.translate.score.ratio_metrics`), timings, sizes.
    """
    import json
    import tempfile

    import dask
    import dask.array as da
    from sklearn.ensemble import RandomForestClassifier

    from daskpath.baselines.data import heldout_tiles, phantom_slides
    from daskpath.translate.score import ratio_metrics

    spec = spec or RFSpec()
    if not seeds:
        raise InvalidInputError("train rf: seeds is empty; give at least one training phantom seed")
    overlap = sorted(set(seeds) & set(heldout_seeds))
    if overlap:
        raise InvalidInputError(f"train rf: seed {overlap[0]} is both a training and a held-out slide; "
                                "keep the split slide-level")
    rng = np.random.default_rng(seed)
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    wd = Path(tmp.name if tmp else workdir)
    t0 = time.time()
    try:
        train = phantom_slides(seeds, size, wd, realism)
        held = phantom_slides(heldout_seeds, size, wd, realism) if heldout_seeds else []
        t_data = time.time() - t0
        xs, ys = [], []
        for s in train:
            for (y0, x0) in _windows(s, windows, window, rng, min_tissue):
                f, cls = _window_features(s, y0, x0, window, spec)
                flat, cf = f.reshape(-1, f.shape[-1]), cls.ravel()
                for k in range(3):
                    idx = np.flatnonzero(cf == k)
                    idx = rng.choice(idx, min(samples_per_class, len(idx)), replace=False)
                    xs.append(flat[idx])
                    ys.append(np.full(len(idx), k, np.int64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        t_feat = time.time() - t0 - t_data
        clf = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                     min_samples_leaf=min_samples_leaf, n_jobs=threads,
                                     random_state=seed)
        clf.fit(x, y)
        t_fit = time.time() - t0 - t_data - t_feat
        training = {
            "seeds": list(seeds), "heldout_seeds": list(heldout_seeds), "size": list(size),
            "windows": windows, "window": window, "samples_per_class": samples_per_class,
            "n_samples": int(len(y)), "class_counts": np.bincount(y, minlength=3).tolist(),
            "n_estimators": n_estimators, "max_depth": max_depth,
            "min_samples_leaf": min_samples_leaf, "seed": seed,
            "command": command or "", "data": f"phantom (daskpath.synthetic.make_pair, realism={realism}, JPEG TIFF)",
        }
        spec = RFSpec(**{**asdict(spec), "extra": {"training": training}})
        out = Path(out_dir)
        save_rf(out, clf, spec)

        # validation: every labelled pixel of one held-out window per slide; ratio per tile
        conf = np.zeros((3, 3), np.int64)
        rows = []
        clf.n_jobs = 1
        vrng = np.random.default_rng(seed + 1)
        for s in held:
            for (y0, x0) in _windows(s, 1, window, vrng, min_tissue):
                h, w = s.size
                d = spec.depth
                a0, a1, b0, b1 = max(0, y0 - d), min(h, y0 + window + d), max(0, x0 - d), min(w, x0 + window + d)
                pred = classify_image(s.he[a0:a1, b0:b1], clf, spec,
                                      core=(y0 - a0, y0 - a0 + window, x0 - b0, x0 - b0 + window))
                truth = s.pixel_classes(y0, y0 + window, x0, x0 + window)
                m = truth >= 0
                np.add.at(conf, (truth[m].astype(np.int64), pred[m].astype(np.int64)), 1)
            tl = heldout_tiles(s, tile, min_tissue)
            with dask.config.set(scheduler="threads", num_workers=threads):
                p = predict_tiles_rf(da.from_array(s.he, chunks=(2048, 2048, 3)), tl, out)
            rows.append(p.assign(seed=s.seed))
        t_eval = time.time() - t0 - t_data - t_feat - t_fit
    finally:
        if tmp:
            tmp.cleanup()
    report: dict[str, Any] = {
        "model": str(out), "n_features": spec.n_features, "depth": spec.depth,
        "n_train_pixels": int(len(y)),
        "model_bytes": int((out / spec.weights).stat().st_size),
        "timing_s": {"phantoms": round(t_data, 1), "features": round(t_feat, 1),
                     "fit": round(t_fit, 1), "evaluation": round(t_eval, 1)},
    }
    if held:
        report["val_pixel_accuracy"] = float(np.trace(conf) / max(conf.sum(), 1))
        report["val_pixel_confusion"] = conf.tolist()
        df = pd.concat(rows, ignore_index=True)
        report["heldout"] = ratio_metrics(df["ratio_rf"], df["truth"])
        report["heldout_per_seed"] = {int(k): ratio_metrics(g["ratio_rf"], g["truth"])
                                      for k, g in df.groupby("seed")}
        report["tiles"] = df[["seed", "y0", "x0", "tissue", "n", "truth", "ratio_rf"]].round(4).to_dict("records")
    spec = RFSpec(**{**asdict(spec), "extra": {**spec.extra, "evaluation": {
        k: v for k, v in report.items() if k not in ("tiles", "model")}}})
    write_spec(out, spec.to_json())
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m daskpath.baselines.rf OUT_DIR [options]`` (see ``--help``)."""
    import json
    import shlex

    p = argparse.ArgumentParser(
        prog="daskpath train rf",
        description="Train the ilastik-style random-forest pixel classifier (background / "
                    "Ki67-negative / Ki67-positive nucleus) on phantom H&E slides and write a model "
                    "folder (model.skops, daskpath.json, evaluation.json).")
    p.add_argument("out_dir", help="model folder to write")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(20, 32)), help="training phantom seeds")
    p.add_argument("--heldout-seeds", type=int, nargs="*", default=[100, 101, 102],
                   help="held-out phantom seeds (slide-level split) for the figures")
    p.add_argument("--size", type=int, nargs=2, default=[4096, 4096], metavar=("H", "W"))
    p.add_argument("--windows", type=int, default=3, help="windows per training slide")
    p.add_argument("--window", type=int, default=512, help="window side (px)")
    p.add_argument("--samples-per-class", type=int, default=1500)
    p.add_argument("--trees", type=int, default=16)
    p.add_argument("--max-depth", type=int, default=12)
    p.add_argument("--min-samples-leaf", type=int, default=5)
    p.add_argument("--sigma-min", type=float, default=RFSpec.sigma_min)
    p.add_argument("--sigma-max", type=float, default=RFSpec.sigma_max)
    p.add_argument("--num-sigma", type=int, default=RFSpec.num_sigma)
    p.add_argument("--channels", nargs="+", default=list(RFSpec.channels), choices=list(_STAINS))
    p.add_argument("--tile", type=int, default=1024, help="held-out tile side (px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where phantom slides are written and reused")
    p.add_argument("--realism", choices=("easy", "realistic"), default="easy",
                   help="phantom kind (daskpath synth --realism)")
    a = p.parse_args(argv)
    for k in ("windows", "window", "samples_per_class", "trees", "max_depth", "min_samples_leaf", "tile", "threads"):
        if getattr(a, k) < 1:
            raise ConfigError(f"train rf: --{k.replace('_', '-')}={getattr(a, k)} must be >= 1")
    spec = RFSpec(channels=tuple(a.channels), sigma_min=a.sigma_min, sigma_max=a.sigma_max,
                  num_sigma=a.num_sigma)
    cmd = "python -m daskpath.baselines.rf " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    res = train_rf(a.out_dir, a.seeds, a.heldout_seeds, tuple(a.size), windows=a.windows,
                   window=a.window, samples_per_class=a.samples_per_class, n_estimators=a.trees,
                   max_depth=a.max_depth, min_samples_leaf=a.min_samples_leaf, tile=a.tile,
                   seed=a.seed, threads=a.threads, workdir=a.workdir, realism=a.realism, spec=spec, command=cmd)
    print(json.dumps({k: v for k, v in res.items() if k != "tiles"}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except DaskpathError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
