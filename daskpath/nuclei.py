"""Nuclei on IHC: StarDist over dask chunks, Ki67 positivity by DAB, per-tile ratios.

Model input
-----------
A StarDist2D model with one input channel (the shipped ``"phantom"`` model, ``2D_versatile_fluo``)
is fed the **hematoxylin + DAB optical density** (:func:`daskpath.stain.hematoxylin_dab`, base-10
OD): every nucleus, brown or blue, is bright on a dark background, like a fluorescence image. A
model with three input channels (``2D_versatile_he``) is fed the RGB image. Either way the input
is normalised to ``(x - lo) / (hi - lo)`` with ``lo, hi`` the slide's 1st / 99.8th percentiles
(:func:`slide_percentiles`), never per chunk: per-chunk normalisation stretches empty background
until it "contains" nuclei.

Chunks, halo and ownership
--------------------------
:func:`segment_nuclei` runs ``predict_instances`` on every chunk plus a halo of ``depth`` pixels
(``boundary="none"``: no halo beyond the slide edge, as in a whole-image run). Default halo rule::

    depth = ceil_to(receptive_field + max_nucleus_diameter, div_by)

``receptive_field`` is the half-width of the network's receptive field (stardist's own
``_axes_tile_overlap``, stored in the model's ``daskpath.json``); ``max_nucleus_diameter`` is the
largest nucleus the model is expected to find (``daskpath.json``, default 32 px). The rule gives
every nucleus whose centroid lies in the chunk core its full extent, its NMS competitors (centres
within one diameter) and full network context for all of them. Chunk sizes and depth are
multiples of ``div_by = grid * 2**unet_n_depth`` so that the network's pooling windows and output
grid line up with the whole-image run (the input is rechunked if needed).

Each nucleus is **owned by exactly one chunk: the one whose core holds its centroid** (the
centroid of the star-convex polygon StarDist predicts, clipped into the slide), the rule of
stardist ``big.py``'s ``Block.is_responsible`` applied to centroids instead of bounding boxes. The
nucleus table lists owned nuclei only, so nothing is counted twice or cut at chunk borders. Label
ids are global: ``id = (py // gy) * ceil(W / gx) + px // gx + 1`` from the polygon's centre pixel
``(py, px)`` on the model's output grid ``(gy, gx)``, so neighbouring chunks paint a shared nucleus
with the same id.

Workers
-------
The task graph holds a :class:`ModelRef` (a name or a folder path), never a model. The task loads
the model through :func:`load_stardist`, a per-process cache built under a lock; TensorFlow is
imported there only. On a machine with GPUs, memory growth is enabled before the first model is
built. ``DASKPATH_TF_THREADS`` (environment) caps TensorFlow's intra-op threads per process.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from daskpath._process_cache import cached
from daskpath.errors import InvalidInputError, ModelError, ModelNotFoundError

if TYPE_CHECKING:  # pandas is imported where used, to keep ``import daskpath.nuclei`` light
    import pandas as pd

__all__ = [
    "ModelRef",
    "PUBLISHED_MODELS",
    "SHIPPED_MODELS",
    "resolve_model",
    "load_stardist",
    "slide_percentiles",
    "default_depth",
    "segment_nuclei",
    "chunks_in_region",
    "measure_nuclei",
    "tile_sums",
    "tile_ratios",
    "write_geojson",
    "write_class_labels",
    "DEFAULT_DAB_THRESHOLD",
    "NUCLEI_COLUMNS",
]

log = logging.getLogger(__name__)

#: Names ``StarDist2D.from_pretrained`` knows (downloaded on first use; needs internet).
PUBLISHED_MODELS = ("2D_versatile_fluo", "2D_versatile_he", "2D_paper_dsb2018", "2D_demo")
#: Models shipped inside the package: name -> folder.
SHIPPED_MODELS = {"phantom": Path(__file__).parent / "models" / "stardist_phantom"}
#: Default Ki67 positivity threshold on a nucleus' mean DAB OD (base-10). QuPath's positive
#: cell detection uses a "Nucleus: DAB OD mean" threshold of the same unit (its default 0.2).
DEFAULT_DAB_THRESHOLD = 0.15
DEFAULT_MAX_NUCLEUS_DIAMETER = 32
DEFAULT_PERCENTILES = (1.0, 99.8)
#: Columns of a nuclei table (``nuclei/<slide>.parquet``).
NUCLEI_COLUMNS = ("id", "y", "x", "area", "prob", "dab_od", "positive", "channel", "polygon")


# --------------------------------------------------------------------------------------------
# model references and loading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A picklable reference to a StarDist2D model plus what chunking needs to know about it.

    This, not the model, goes into task graphs; workers load the model by ``key``.
    """

    key: str  #: folder path (absolute) or published name
    kind: Literal["folder", "published"]
    n_channel_in: int
    grid: tuple[int, int]
    div_by: tuple[int, int]
    receptive_field: int
    max_nucleus_diameter: int = DEFAULT_MAX_NUCLEUS_DIAMETER
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    input: str = "h+dab"
    spec: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return Path(self.key).name if self.kind == "folder" else self.key


_REFS: dict[str, ModelRef] = {}
_TF_READY = False


def _configure_tensorflow() -> None:
    """Import TF once per process: quiet logs, GPU memory growth, optional thread cap."""
    global _TF_READY
    if _TF_READY:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from daskpath._logging import quiet_chatty_loggers, quiet_native_stderr

    try:
        with quiet_native_stderr():  # absl's lines while TF's libraries load
            import tensorflow as tf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelError(
            f"StarDist needs tensorflow ({e}); install the nuclei extra: "
            "pip install 'daskpath[nuclei]'"
        ) from None
    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # already initialised by someone else
        pass
    threads = os.environ.get("DASKPATH_TF_THREADS")
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        except RuntimeError:
            pass
    quiet_chatty_loggers()  # TF's Python warnings (retracing, ...) unless TF_CPP_MIN_LOG_LEVEL=0
    _TF_READY = True


def _folder_of(model: str | Path) -> Path | None:
    s = str(model)
    if s in SHIPPED_MODELS:
        return SHIPPED_MODELS[s]
    if s in PUBLISHED_MODELS:
        return None
    return Path(s).expanduser().resolve()


def _check_folder(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise ModelNotFoundError(
            f"StarDist model folder {folder} does not exist: give a folder with config.json and "
            f"weights, a shipped name ({', '.join(SHIPPED_MODELS)}) or a published name "
            f"({', '.join(PUBLISHED_MODELS[:2])})"
        )
    if not folder.is_dir():
        raise ModelError(
            f"StarDist model {folder} is a file: give the folder that holds config.json"
        )
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelError(
            f"{folder} is not a StarDist model folder (no config.json): point at the folder "
            "written by StarDist2D(config, name, basedir) / daskpath.train_stardist.train"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_file} is not valid JSON ({e}): restore the model folder") from None
    if "n_rays" not in cfg or cfg.get("n_dim", 2) != 2:
        raise ModelError(f"{cfg_file} is not a StarDist2D config (needs n_rays, n_dim=2)")
    if not (list(folder.glob("*.h5")) or list(folder.glob("*.hdf5"))):
        raise ModelError(
            f"{folder} has no weights (*.weights.h5 / *.h5): copy weights_best.weights.h5 next "
            "to config.json"
        )
    return cfg


def load_stardist(model: str | Path | ModelRef):
    """The StarDist2D model for ``model``, built once per process (thread-safe cache).

    Parameters
    ----------
    model : str, Path or ModelRef
        - a folder holding ``config.json`` and weights (``weights_best.weights.h5`` or any
          ``*.h5``) -> ``StarDist2D(None, name=folder.name, basedir=folder.parent)``;
        - ``"phantom"`` -> the model shipped in ``daskpath/models/stardist_phantom/``;
        - a published name (``"2D_versatile_fluo"``, ``"2D_versatile_he"``, ...) ->
          ``StarDist2D.from_pretrained`` (downloads once; needs internet).

    Raises
    ------
    ModelError
        Missing folder, folder without config/weights, unreadable weights, or a published name
        that cannot be downloaded (the message says how to use a local folder instead).
    """
    key = model.key if isinstance(model, ModelRef) else str(model)
    folder = None if isinstance(model, ModelRef) and model.kind == "published" else (
        Path(model.key) if isinstance(model, ModelRef) else _folder_of(model)
    )
    cache_key = str(folder) if folder is not None else key
    return cached(("stardist", cache_key), lambda: _build_stardist(folder, key))


def _build_stardist(folder: Path | None, key: str):
    """Load a StarDist2D from ``folder``, or the published model ``key`` (online)."""
    if folder is not None:
        _check_folder(folder)
    _configure_tensorflow()
    from stardist.models import StarDist2D

    sink = io.StringIO()
    if folder is not None:
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                m = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
        except Exception as e:  # noqa: BLE001 - anything from keras/h5py means a bad folder
            raise ModelError(
                f"cannot load StarDist model from {folder}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''} (re-train or re-copy the folder)"
            ) from None
    else:
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                m = StarDist2D.from_pretrained(key)
        except Exception as e:  # noqa: BLE001 - network / keras errors
            raise ModelError(
                f"cannot download published StarDist model {key!r} ({type(e).__name__}); "
                "offline? Download it once elsewhere and set nuclei.model to its local folder "
                "(the one holding config.json and weights_best.h5), or use the shipped "
                "model 'phantom'"
            ) from None
        if m is None:
            raise ModelError(
                f"unknown published StarDist model {key!r}: use one of "
                f"{', '.join(PUBLISHED_MODELS)} or a local model folder"
            )
    _direct_predict(m)
    return m


def _direct_predict(model) -> None:
    """Make StarDist's network call one cached ``tf.function`` instead of ``keras.Model.predict``.

    StarDist evaluates its network through ``keras_model.predict(x[None])``. Keras 3 builds a
    tf.data pipeline for every call, tracing its dataset functions into new TensorFlow graphs,
    which become garbage in reference cycles. Python's cyclic GC then deletes them in
    whatever thread triggers a collection; in a Dask worker that was the event loop thread
    (the worker's profiler), whose TensorFlow graph destructor waited for a lock while holding
    the GIL that the task threads needed: the worker hung with 0 % CPU (seen on a full-size
    slide, py-spy --native: ``gc_collect_main`` -> ``PyGraph`` dealloc ->
    ``PyThread_acquire_lock_timed`` in MainThread, every other thread waiting for the GIL).
    One ``tf.function`` of ``keras_model(x, training=False)`` (what ``predict`` runs per batch)
    is traced once per input shape family (``reduce_retracing``) and makes no per-call graphs;
    the network output is the same computation, and the per-call tracing cost is gone.
    """
    import tensorflow as tf

    km = model.keras_model
    fn = tf.function(lambda x: km(x, training=False), reduce_retracing=True)

    def predict(x, *args: Any, **kwargs: Any):  # keras' signature; batch_size etc. unused
        out = fn(tf.convert_to_tensor(x))
        if isinstance(out, (list, tuple)):
            return [np.asarray(o) for o in out]
        return np.asarray(out)

    km.predict = predict


def _spec_of(folder: Path) -> dict[str, Any]:
    f = folder / "daskpath.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except ValueError as e:
            raise ModelError(f"{f} is not valid JSON ({e}): fix or delete it") from None
    return {}


def resolve_model(model: str | Path | ModelRef) -> ModelRef:
    """Resolve a model name or folder into a :class:`ModelRef` (cached per process).

    For folders with a ``daskpath.json`` (the shipped model) no TensorFlow is needed. Otherwise
    the model is loaded here once to measure its receptive field.
    """
    if isinstance(model, ModelRef):
        return model
    folder = _folder_of(model)
    ck = str(folder) if folder is not None else str(model)
    if ck in _REFS:
        return _REFS[ck]
    if folder is not None:
        cfg = _check_folder(folder)
        spec = _spec_of(folder)
        grid = tuple(int(g) for g in cfg.get("grid", (1, 1)))
        pool = tuple(int(p) for p in cfg.get("unet_pool", (2, 2)))
        nd = int(cfg.get("unet_n_depth", 3))
        div_by = tuple(p**nd * g for p, g in zip(pool, grid))
        rf = spec.get("receptive_field")
        if rf is None:
            rf = max(load_stardist(model)._axes_tile_overlap("YX"))
        n_in = int(cfg.get("n_channel_in", 1))
        ref = ModelRef(
            key=str(folder),
            kind="folder",
            n_channel_in=n_in,
            grid=grid,  # type: ignore[arg-type]
            div_by=div_by,  # type: ignore[arg-type]
            receptive_field=int(rf),
            max_nucleus_diameter=int(
                spec.get("max_nucleus_diameter", DEFAULT_MAX_NUCLEUS_DIAMETER)
            ),
            percentiles=tuple(  # type: ignore[arg-type]
                spec.get("normalize", {}).get("percentiles", DEFAULT_PERCENTILES)
            ),
            input=spec.get("input", {}).get("channel", "h+dab" if n_in == 1 else "rgb"),
            spec=spec,
        )
    else:
        m = load_stardist(model)
        cfg = m.config
        ref = ModelRef(
            key=str(model),
            kind="published",
            n_channel_in=int(cfg.n_channel_in),
            grid=tuple(cfg.grid),  # type: ignore[arg-type]
            div_by=tuple(m._axes_div_by("YX")),  # type: ignore[arg-type]
            receptive_field=int(max(m._axes_tile_overlap("YX"))),
            input="h+dab" if cfg.n_channel_in == 1 else "rgb",
        )
    _REFS[ck] = ref
    return ref


# --------------------------------------------------------------------------------------------
# normalisation and halo
# --------------------------------------------------------------------------------------------
def slide_percentiles(
    image, percentiles: tuple[float, float] = DEFAULT_PERCENTILES, max_pixels: int = 2_000_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Intensity values at ``percentiles`` of a whole slide (all channels pooled).

    For dask input a reproducible random subset of chunks is read (see
    :func:`daskpath.stain.sample_pixels`), so the cost is bounded on large slides.
    """
    from daskpath.stain import sample_pixels

    arr = image
    if arr.ndim == 2:
        arr = arr[..., None]
    sample = sample_pixels(arr, max_pixels=max_pixels, seed=seed).astype(np.float64).ravel()
    lo, hi = np.percentile(sample, percentiles)
    if not hi > lo:
        hi = lo + 1e-6
    return float(lo), float(hi)


def default_depth(ref: ModelRef, max_nucleus_diameter: int | None = None) -> int:
    """Halo rule: ``ceil_to(receptive_field + max_nucleus_diameter, lcm(div_by))``.

    ``receptive_field`` is StarDist's per-side tile overlap; see :func:`daskpath._halo.halo_depth`.
    """
    from daskpath._halo import halo_depth

    d = ref.max_nucleus_diameter if max_nucleus_diameter is None else int(max_nucleus_diameter)
    return halo_depth(ref.receptive_field, max_object=d, multiple=math.lcm(*ref.div_by))


# --------------------------------------------------------------------------------------------
# per-block work (runs on workers)
# --------------------------------------------------------------------------------------------
def _polygon_centroids(coord: np.ndarray) -> np.ndarray:
    """Area centroids (y, x) of polygons ``coord`` of shape (n, 2, n_rays)."""
    if len(coord) == 0:
        return np.zeros((0, 2))
    y, x = coord[:, 0, :].astype(np.float64), coord[:, 1, :].astype(np.float64)
    y1, x1 = np.roll(y, -1, axis=1), np.roll(x, -1, axis=1)
    cross = x * y1 - x1 * y
    a = cross.sum(axis=1) / 2.0
    safe = np.where(np.abs(a) < 1e-9, 1.0, a)
    cx = ((x + x1) * cross).sum(axis=1) / (6.0 * safe)
    cy = ((y + y1) * cross).sum(axis=1) / (6.0 * safe)
    degenerate = np.abs(a) < 1e-9
    cy[degenerate] = y[degenerate].mean(axis=1)
    cx[degenerate] = x[degenerate].mean(axis=1)
    return np.stack([cy, cx], axis=1)


def _paint_polygons(coord: np.ndarray, prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The label image StarDist's ``polygons_to_label`` paints, from ``predict_instances`` output.

    Same pixels, ids and overwrite order as stardist 0.9's ``polygons_to_label`` (which calls
    ``skimage.draw.polygon`` once per polygon): polygons are painted by ascending ``prob``
    (stable sort, so the most probable one wins an overlap), polygon ``k`` of ``coord`` with
    id ``k + 1``. A scanline painter compiled with numba replaces the per-polygon skimage
    calls. Without numba, for malformed input, or for coordinates outside the range where it is
    proven exact (non-zero magnitudes in ``[1e-150, 1e15]``; skimage itself is erratic beyond
    ``2**63``, for inf and NaN), StarDist's own painter runs.

    Parameters
    ----------
    coord : ndarray, shape (n, 2, n_rays)
        Polygon vertices (row, column), ``det["coord"]`` of ``predict_instances``.
    prob : ndarray, shape (n,)
        Object probabilities, ``det["prob"]``.
    shape : tuple of int
        ``(height, width)`` of the label image.

    Returns
    -------
    ndarray of int32, shape ``shape``
    """
    coord = np.asarray(coord)
    prob = np.asarray(prob)
    shape = (int(shape[0]), int(shape[1]))
    keep = prob > -np.inf  # polygons_to_label's ``thr``: drops NaN probabilities, renumbering
    coord, prob = coord[keep], prob[keep]
    order = np.argsort(prob, kind="stable")
    c64 = np.ascontiguousarray(coord[order], dtype=np.float64)
    a = np.abs(c64)
    exact = c64.ndim == 3 and c64.shape[1:2] == (2,) and (c64.shape[2] > 0 or len(c64) == 0)
    exact = exact and bool(np.all((a == 0) | ((a >= 1e-150) & (a <= 1e15))))
    kernel = _paint_kernel() if exact else None
    if kernel is None:
        from stardist.geometry.geom2d import polygons_to_label_coord

        return polygons_to_label_coord(coord[order], shape=shape, labels=order)
    out = np.zeros(shape, np.int32)
    kernel(c64, (order + 1).astype(np.int32), out)
    return out


def _paint_kernel() -> Any:
    """The compiled scanline painter (built once per process), or None without numba."""

    def build() -> Any:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba comes with stardist
            return False
        sig = "void(float64[:, :, ::1], int32[::1], int32[:, ::1])"
        try:
            return numba.njit(sig, cache=True, nogil=True, error_model="numpy")(_paint_scanlines)
        except RuntimeError:  # no writable cache location: compile without caching
            return numba.njit(sig, nogil=True, error_model="numpy")(_paint_scanlines)

    return cached(("numba", "_paint_scanlines"), build) or None


def _paint_scanlines(coord: np.ndarray, values: np.ndarray, out: np.ndarray) -> None:
    """Paint polygon ``k`` of ``coord`` (n, 2, n_rays) with ``values[k]`` into ``out``, in order.

    Pixel for pixel what ``skimage.draw.polygon(coord[k, 0], coord[k, 1], out.shape)`` (0.26)
    returns: the pixels of the bounding box ``[int(max(0, min)), min(ceil(max), size - 1)]``
    for which skimage's ``point_in_polygon`` (O'Rourke's crossing test) is not OUTSIDE, i.e.
    a vertex within 1e-12 in both coordinates, or an odd count of right or of left crossings.

    Per row the straddling edges are those of skimage's test (they do not depend on the
    column). An edge's crossing test at column ``c`` is ``f(c) > 0`` (right) or ``f(c) < 0``
    (left) for ``f(c) = ((x_i - c) * y_j - (x_j - c) * y_i) / (y_j - y_i)``, which is
    ``X - c`` up to rounding, ``X`` the edge's crossing column. Columns farther than ``delta``
    from ``X`` (a bound some 1e9 times the rounding error) take the sign of ``X - c``; the few
    within ``delta`` evaluate ``f`` in float64 exactly as skimage's C code does. Parities are
    accumulated per row with XOR difference arrays, so a row costs O(n_rays + width).

    Plain Python here; :func:`_paint_kernel` compiles it with numba.
    """
    h, w_img = out.shape
    n, _, n_rays = coord.shape
    eps = 1e-12
    d_right = np.zeros(w_img + 2, np.uint8)  # XOR difference arrays: parity on whole runs
    d_left = np.zeros(w_img + 2, np.uint8)
    e_right = np.zeros(w_img + 1, np.uint8)  # parity from exactly evaluated columns
    e_left = np.zeros(w_img + 1, np.uint8)
    for k in range(n):
        yp = coord[k, 0]
        xp = coord[k, 1]
        v = values[k]
        rmin, rmax, cmin, cmax, big = yp[0], yp[0], xp[0], xp[0], 0.0
        for i in range(n_rays):
            rmin = min(rmin, yp[i])
            rmax = max(rmax, yp[i])
            cmin = min(cmin, xp[i])
            cmax = max(cmax, xp[i])
            big = max(big, abs(xp[i]))
        # skimage: int(max(0, min)) truncates; min(ceil(max), size - 1); clamped here as
        # floats first so that far-away polygons do not overflow the int conversion
        rmin, cmin = max(0.0, rmin), max(0.0, cmin)
        rmax, cmax = np.ceil(rmax), np.ceil(cmax)
        if rmin >= h or cmin >= w_img or rmax < 0 or cmax < 0:
            continue
        minr, minc = int(rmin), int(cmin)
        maxr, maxc = int(min(rmax, h - 1.0)), int(min(cmax, w_img - 1.0))
        if minr > maxr or minc > maxc:
            continue
        width = maxc - minc + 1
        delta = 1e-6 * (1.0 + max(big, float(maxc)))
        for r in range(minr, maxr + 1):
            rf = float(r)
            for j in range(width + 1):
                d_right[j] = 0
                d_left[j] = 0
                e_right[j] = 0
                e_left[j] = 0
            j = n_rays - 1  # edge (j, i), as skimage's (x1, y1) -> (x0, y0)
            for i in range(n_rays):
                y0 = yp[i] - rf
                y1 = yp[j] - rf
                right = (y0 > 0) != (y1 > 0)
                left = (y0 < 0) != (y1 < 0)
                if right or left:
                    x_cross = (xp[i] * y1 - xp[j] * y0) / (y1 - y0)
                    lo = int(np.ceil(min(max(x_cross - delta, minc - 1.0), maxc + 1.0)))
                    hi = int(np.floor(min(max(x_cross + delta, minc - 1.0), maxc + 1.0)))
                    lo = min(max(lo, minc), maxc + 1)  # columns < lo: f > 0
                    hi = min(max(hi, minc - 1), maxc)  # columns > hi: f < 0
                    if right:
                        d_right[0] ^= 1
                        d_right[lo - minc] ^= 1
                    if left:
                        d_left[hi + 1 - minc] ^= 1
                        d_left[width] ^= 1
                    for c in range(lo, hi + 1):
                        cf = float(c)
                        x0 = xp[i] - cf
                        x1 = xp[j] - cf
                        f = (x0 * y1 - x1 * y0) / (y1 - y0)
                        if right and f > 0:
                            e_right[c - minc] ^= 1
                        if left and f < 0:
                            e_left[c - minc] ^= 1
                j = i
            p_right = np.uint8(0)
            p_left = np.uint8(0)
            for c in range(width):
                p_right ^= d_right[c]
                p_left ^= d_left[c]
                if (p_right ^ e_right[c]) | (p_left ^ e_left[c]):
                    out[r, minc + c] = v
        for i in range(n_rays):  # skimage returns VERTEX (painted) within eps of a vertex
            rr = np.floor(yp[i] + 0.5)
            cc = np.floor(xp[i] + 0.5)
            if minr <= rr <= maxr and minc <= cc <= maxc:
                y0 = yp[i] - rr
                x0 = xp[i] - cc
                if -eps < x0 < eps and -eps < y0 < eps:
                    out[int(rr), int(cc)] = v


_EMPTY = {
    "id": np.zeros(0, np.int32), "y": np.zeros(0, np.float32), "x": np.zeros(0, np.float32),
    "area": np.zeros(0, np.int32), "prob": np.zeros(0, np.float32),
    "polygon": np.zeros(0, object),
}


def _segment_block(
    img: np.ndarray,
    dab: np.ndarray | None,
    *,
    ref: ModelRef,
    origin: tuple[int, int],
    core: tuple[int, int, int, int],
    shape: tuple[int, int],
    norm: tuple[float, float],
    prob_thresh: float | None,
    nms_thresh: float | None,
    owners: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """StarDist on one chunk + halo; return (core labels with global ids, owned nuclei table).

    ``owners`` (chunk boundaries in y and x, and which chunks are segmented) keeps nuclei owned
    by unsegmented chunks out of the label image.
    """
    model = load_stardist(ref)
    lo, hi = norm
    x = (np.asarray(img, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    axes = "YX" if x.ndim == 2 else "YXC"
    n_tiles = None
    if max(x.shape[:2]) > 4096:
        n_tiles = tuple(int(math.ceil(s / 4096)) for s in x.shape[:2])
        n_tiles += (1,) if x.ndim == 3 else ()
    # no redirect_stdout here: it swaps sys.stdout process-wide and is not thread-safe
    _, det = model.predict_instances(
        x, axes=axes, prob_thresh=prob_thresh, nms_thresh=nms_thresh, n_tiles=n_tiles,
        show_tile_progress=False, verbose=False, return_labels=False,
    )
    # the label image stardist would paint (same pixels and ids), painted faster
    labels = _paint_polygons(det["coord"], det["prob"], x.shape[:2])
    oy, ox = origin
    cy0, cy1, cx0, cx1 = core
    H, W = shape
    gy, gx = ref.grid
    n = len(det["points"])
    core_sl = (slice(cy0 - oy, cy1 - oy), slice(cx0 - ox, cx1 - ox))
    if n == 0:
        return np.zeros((cy1 - cy0, cx1 - cx0), np.int32), _table(_EMPTY, dab is not None)
    pts = np.asarray(det["points"], dtype=np.int64) + np.array([oy, ox])
    pts[:, 0] = np.clip(pts[:, 0], 0, H - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, W - 1)
    ncols = -(-W // gx)
    gid = (pts[:, 0] // gy) * ncols + pts[:, 1] // gx + 1
    if gid.max() > np.iinfo(np.int32).max:
        raise InvalidInputError(f"slide {H}x{W} too large for int32 label ids with grid {ref.grid}")
    lut = np.concatenate([[0], gid]).astype(np.int32)

    cen = _polygon_centroids(np.asarray(det["coord"])) + np.array([oy, ox])
    cen[:, 0] = np.clip(cen[:, 0], 0, H - 1e-3)
    cen[:, 1] = np.clip(cen[:, 1], 0, W - 1e-3)
    fy, fx = np.floor(cen[:, 0]), np.floor(cen[:, 1])
    own = (fy >= cy0) & (fy < cy1) & (fx >= cx0) & (fx < cx1)
    if owners is not None:
        # do not paint nuclei whose owning chunk is not segmented: they have no table row
        ys, xs, wanted = owners
        ci = np.clip(np.searchsorted(ys, fy, side="right") - 1, 0, wanted.shape[0] - 1)
        cj = np.clip(np.searchsorted(xs, fx, side="right") - 1, 0, wanted.shape[1] - 1)
        lut[1:][~wanted[ci, cj]] = 0
    core_labels = lut[labels[core_sl]]

    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    own &= area > 0
    cols = {
        "id": gid[own].astype(np.int32),
        "y": cen[own, 0].astype(np.float32),
        "x": cen[own, 1].astype(np.float32),
        "area": area[own].astype(np.int32),
        "prob": np.asarray(det["prob"], np.float32)[own],
    }
    # star-convex outline in slide pixels, (y, x) per ray, flattened: (y0, x0, y1, x1, ...)
    coord = np.asarray(det["coord"], np.float32)[own] + np.array([oy, ox], np.float32)[None, :, None]
    outline = np.round(coord.transpose(0, 2, 1).reshape(len(coord), 2 * coord.shape[2]), 2)
    poly = np.empty(len(outline), object)
    for k in range(len(outline)):
        poly[k] = outline[k]
    cols["polygon"] = poly
    if dab is not None:
        s = np.bincount(flat, weights=np.asarray(dab, np.float64).ravel(), minlength=n + 1)[1:]
        cols["dab_od"] = (s[own] / np.maximum(area[own], 1)).astype(np.float32)
    return core_labels, _table(cols, dab is not None)


def _table(cols: dict[str, np.ndarray], with_dab: bool) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(cols)
    if with_dab and "dab_od" not in df:
        df["dab_od"] = np.zeros(len(df), np.float32)
    return df


def _concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    import pandas as pd

    parts = [p for p in parts if len(p)] or parts[:1]
    df = pd.concat(parts, ignore_index=True)
    return df.sort_values(["y", "x"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def segment_layout(ref: ModelRef, chunks: tuple[tuple[int, ...], tuple[int, ...]],
                   shape: tuple[int, int], depth: int | None = None
                   ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(row chunks, column chunks, halo)`` :func:`segment_nuclei` uses for an image of
    ``shape`` chunked ``chunks``: chunks aligned to multiples of the network's ``div_by`` and
    none thinner than the halo (:func:`~daskpath._halo.align_chunks`), the halo ``depth``
    (default :func:`default_depth`) rounded up to that multiple."""
    from daskpath._halo import align_chunks, ceil_to

    m = math.lcm(*ref.div_by)
    depth = ceil_to(int(default_depth(ref) if depth is None else depth), m)
    h, w = (int(v) for v in shape)
    return (align_chunks(chunks[0], h, multiple=m, min_size=depth),
            align_chunks(chunks[1], w, multiple=m, min_size=depth), depth)


def segment_nuclei(
    image,
    model: str | Path | ModelRef = "phantom",
    *,
    normalize_percentiles: tuple[float, float] | None = None,
    dab=None,
    depth: int | None = None,
    prob_thresh: float | None = None,
    nms_thresh: float | None = None,
    max_nucleus_diameter: int | None = None,
    resources: dict[str, float] | None = None,
    region: Sequence[tuple[int, int, int, int]] | None = None,
    labels_store: str | os.PathLike[str] | None = None,
    record_dir: str | os.PathLike[str] | None = None,
):
    """Lazy StarDist segmentation of a slide over dask chunks, each nucleus owned by one chunk.

    Parameters
    ----------
    image : dask array (y, x) or (y, x, C)
        Model input: a single-channel float image (hematoxylin + DAB OD for the shipped model) or
        RGB for 3-channel models. Its chunks are the work units (rechunked to multiples of the
        model's ``div_by`` when needed).
    model : str, Path or ModelRef
        See :func:`load_stardist`. Only the reference goes into the graph.
    normalize_percentiles : (lo, hi), optional
        Intensity values mapped to 0 and 1, computed once **per slide** (e.g. with
        :func:`slide_percentiles`). ``None``: computed here from a sample of the slide at the
        model's percentiles (default 1, 99.8).
    dab : dask array (y, x), optional
        DAB OD channel, same shape; when given, the table has ``dab_od`` (mean over the nucleus).
    depth : int, optional
        Halo in pixels (rounded up to a multiple of ``div_by``). Default :func:`default_depth`:
        ``receptive_field + max_nucleus_diameter``.
    prob_thresh, nms_thresh : float, optional
        StarDist thresholds; default the model's ``thresholds.json``.
    max_nucleus_diameter : int, optional
        Overrides the model spec's value in the halo rule.
    resources : dict, optional
        Dask resource annotation for the model tasks, e.g. ``{"GPU": 1}`` on GPU clusters.
    region : sequence of (y0, y1, x0, x1), optional
        Rectangles (pixels, half-open) where nuclei are wanted, e.g. the kept tiles. Only chunks
        whose core intersects one are segmented (with their full halo); the others run nothing
        and give no nuclei and zero labels. A nucleus whose centroid lies in a rectangle is owned
        by a segmented chunk, so it is found exactly as in a whole-slide run. ``None``: all.
    labels_store : path, optional
        Where to write the label image, as an OME-NGFF 0.5 label image (:mod:`daskpath.ome`:
        ``image-label`` metadata, axes ``y, x``, level ``0`` plus pyramid levels filled later by
        :func:`daskpath.ome.build_pyramid`). A path ``<image>/labels/<name>`` inside an NGFF
        image becomes a label of that image (its pixel size); any other path a standalone label
        image (set its pixel size with :func:`daskpath.ome.set_mpp`). Each chunk task writes
        its core labels to level 0 itself (the zarr chunks are the work chunks, so every zarr
        chunk has one writer). An existing label image of the same shape and chunks is reused
        (a resumed run keeps the chunks already written).
    record_dir : path, optional
        Record each chunk's nucleus table as ``record_dir/<i>_<j>.parquet`` (written after its
        labels); on a rerun recorded chunks are loaded, not segmented again (resume).

    Notes
    -----
    Memory: StarDist runs on a whole chunk + halo at once (blocks over 4096 px per side are
    tiled by stardist's ``n_tiles``). With the shipped model a 2048 px chunk (2208 px block)
    peaked at ~2.4 GB per thread on CPU, a 1024 px chunk at well under 1 GB; the halo costs
    ``((c + 2 * depth) / c) ** 2 - 1`` extra pixels per interior chunk (34 % for c=1024, 16 % for
    c=2048, with d=80).

    Returns
    -------
    labels : dask array (y, x) int32
        Label image with globally unique ids, chunked like (the aligned) ``image``.
    table : dask.delayed.Delayed -> pandas.DataFrame
        One row per nucleus: ``id, y, x`` (global polygon centroid), ``area`` (pixels),
        ``prob`` [, ``dab_od``], ``polygon`` (StarDist's star-convex outline in slide pixels,
        ``(y, x)`` per ray flattened to ``2 * n_rays`` float32), sorted by (y, x). Compute both together
        (``dask.compute(labels, table)``) to run StarDist once. With ``labels_store`` the labels
        are level 0 of the label image, complete once ``table`` is computed.
    """
    import dask
    import dask.array as da

    ref = resolve_model(model)
    if max_nucleus_diameter is not None:
        ref = replace(ref, max_nucleus_diameter=int(max_nucleus_diameter))
    if not isinstance(image, da.Array):
        image = da.asarray(image)
    expect_nd = 2 if ref.n_channel_in == 1 else 3
    if image.ndim == 3 and ref.n_channel_in == 1 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != expect_nd or (expect_nd == 3 and image.shape[-1] != ref.n_channel_in):
        raise InvalidInputError(
            f"model {ref.name!r} takes {ref.n_channel_in} channel(s) ({ref.input}); got an image "
            f"of shape {image.shape}"
        )
    if dab is not None:
        if not isinstance(dab, da.Array):
            dab = da.asarray(dab)
        if dab.shape != image.shape[:2]:
            raise InvalidInputError(f"dab channel shape {dab.shape} != image shape {image.shape[:2]}")
    if depth is not None and depth < 0:
        raise InvalidInputError(f"depth must be >= 0 px (or None for the default), got {depth}")
    H, W = image.shape[:2]
    cy, cx, depth = segment_layout(ref, image.chunks[:2], (H, W), depth)
    image = image.rechunk((cy, cx) + ((image.shape[2],) if image.ndim == 3 else ()))
    if dab is not None:
        dab = dab.rechunk((cy, cx))
    if normalize_percentiles is None:
        normalize_percentiles = slide_percentiles(image, ref.percentiles)
    lo, hi = (float(v) for v in normalize_percentiles)
    if not hi > lo:
        raise InvalidInputError(f"normalize_percentiles must satisfy lo < hi, got {(lo, hi)}")

    dep = {0: depth, 1: depth} | ({2: 0} if image.ndim == 3 else {})
    img_o = da.overlap.overlap(image, depth=dep, boundary="none")
    img_blocks = img_o.to_delayed()
    dab_blocks = None
    if dab is not None:
        dab_o = da.overlap.overlap(dab, depth={0: depth, 1: depth}, boundary="none")
        dab_blocks = dab_o.to_delayed()
    ystarts = np.concatenate([[0], np.cumsum(cy)])
    xstarts = np.concatenate([[0], np.cumsum(cx)])
    wanted = chunks_in_region(ystarts, xstarts, region)
    owners = None if wanted.all() else (ystarts, xstarts, wanted)
    fn = dask.delayed(_segment_block, pure=True, nout=2)
    in_task = labels_store is not None or record_dir is not None
    if labels_store is not None:
        labels_store = str(labels_store)
        _labels_array(labels_store, (H, W), (int(cy[0]), int(cx[0])))
    if record_dir is not None:
        from daskpath.resume import recorded

        Path(record_dir).mkdir(parents=True, exist_ok=True)
    rows, parts = [], []
    ctx = dask.annotate(resources=resources) if resources else contextlib.nullcontext()
    with ctx:
        for i in range(len(cy)):
            row = []
            for j in range(len(cx)):
                y0, y1 = int(ystarts[i]), int(ystarts[i + 1])
                x0, x1 = int(xstarts[j]), int(xstarts[j + 1])
                if not wanted[i, j]:
                    row.append(da.zeros((y1 - y0, x1 - x0), dtype=np.int32, chunks=-1))
                    continue
                origin = (max(0, y0 - depth), max(0, x0 - depth))
                blk = img_blocks[(i, j, 0)] if image.ndim == 3 else img_blocks[i, j]
                dblk = dab_blocks[i, j] if dab_blocks is not None else None
                if in_task:
                    tab = dask.delayed(_segment_chunk, pure=True)(
                        blk, dblk, labels_store=labels_store, ref=ref, origin=origin,
                        core=(y0, y1, x0, x1), shape=(H, W), norm=(lo, hi),
                        prob_thresh=prob_thresh, nms_thresh=nms_thresh, owners=owners,
                    )
                    if record_dir is not None:
                        tab, _ = recorded(tab, Path(record_dir) / f"{i}_{j}.parquet", "parquet")
                    parts.append(tab)
                    continue
                lab, tab = fn(
                    blk, dblk, ref=ref, origin=origin, core=(y0, y1, x0, x1), shape=(H, W),
                    norm=(lo, hi), prob_thresh=prob_thresh, nms_thresh=nms_thresh,
                    owners=owners,
                )
                row.append(da.from_delayed(lab, shape=(y1 - y0, x1 - x0), dtype=np.int32,
                                           meta=np.empty((0, 0), np.int32)))
                parts.append(tab)
            rows.append(row)
    if labels_store is not None:
        from daskpath import ome

        labels = da.from_zarr(ome.open_level(labels_store, 0))
    else:
        labels = None if in_task else da.block(rows)
    if parts:
        table = dask.delayed(_concat, pure=True)(parts)
    else:
        table = dask.delayed(_table, pure=True)(_EMPTY, dab is not None)
    return labels, table


def _labels_array(path: str, shape: tuple[int, int], chunks: tuple[int, int]) -> None:
    """Create the int32 NGFF label image at ``path`` unless one of this shape and chunking
    exists (see ``labels_store`` in :func:`segment_nuclei`)."""
    from daskpath import ome

    try:
        z = ome.open_level(path, 0)
        if z.shape == tuple(shape) and z.chunks == tuple(chunks) and z.dtype == np.int32:
            return
    except Exception:  # noqa: BLE001 - missing, unreadable or an older layout: (re)create
        pass
    ome.create_labels(path, shape, chunks=chunks, dtype=np.int32,
                      attrs={"content": "nucleus ids (the id column of the nuclei table)"})


def write_class_labels(labels_store: str | os.PathLike[str], classes_store: str | os.PathLike[str],
                       table: pd.DataFrame, *, compute: bool = True, from_pyramid: bool = False):
    """The Ki67 class label image of a nucleus label image: 1 = negative, 2 = positive.

    Parameters
    ----------
    labels_store : path
        An NGFF label image of nucleus ids (``labels_store`` of :func:`segment_nuclei`).
    classes_store : path
        Where to write the class label image: uint8, same shape, chunks and pixel size, 0 =
        background (and nuclei absent from ``table``), ``image-label`` colours (negative blue,
        positive brown) and properties (``class``: ``Negative`` / ``Positive``) that napari
        shows. ``<image>/labels/<name>`` makes it a label of that image (see
        :func:`daskpath.ome.create_labels`).
    table : pandas.DataFrame
        The nuclei table (columns ``id``, ``positive``), e.g. from :func:`measure_nuclei`.
    compute : bool
        ``False``: return a Delayed that writes the class image (submit it to a cluster).
    from_pyramid : bool
        ``True``: the pyramid of ``labels_store`` is complete (:func:`daskpath.ome.build_pyramid`),
        so every level of the class image is mapped from the same level of the nucleus ids, all
        levels in parallel. ``False`` (default): level 0 is mapped, then the class pyramid is
        built from it in one task. Both give the same pixels: a label pyramid level is level 0
        taken every ``2**k`` pixels, and so is the class of its ids.

    Returns
    -------
    None or dask.delayed.Delayed
    """
    import dask

    from daskpath import ome

    ids = ome.open_level(labels_store, 0)
    mpp = ome.describe(labels_store)["mpp"]
    ome.create_labels(classes_store, ids.shape, chunks=ids.chunks, mpp=mpp, dtype=np.uint8,
                      colors=ome.CLASS_COLORS, properties=ome.CLASS_PROPERTIES,
                      attrs={"content": "Ki67 class of each nucleus: 1 negative, 2 positive"})
    pos = table["positive"].to_numpy(bool)
    idv = table["id"].to_numpy(np.int64)
    order = np.argsort(idv, kind="stable")
    lut = dask.delayed((idv[order], np.where(pos[order], 2, 1).astype(np.uint8)), pure=True)
    levels = [0]
    if from_pyramid:
        n_src, n_dst = (len(ome.describe(p)["levels"]) for p in (labels_store, classes_store))
        shapes = [ome.open_level(labels_store, k).shape for k in range(n_src)]
        if n_src == n_dst and all(ome.open_level(classes_store, k).shape == shapes[k]
                                  for k in range(n_dst)):
            levels = list(range(n_dst))
    fn = dask.delayed(_class_band, pure=True)
    parts = []
    for k in levels:  # one task per row of chunks: whole chunks, one writer each
        z = ome.open_level(labels_store, k)
        cy, h = z.chunks[0], z.shape[0]
        parts += [fn(str(labels_store), str(classes_store), (y0, min(y0 + cy, h)), lut, k)
                  for y0 in range(0, h, cy)]
    if len(levels) > 1:
        task = dask.delayed(_first, pure=False)(str(classes_store), parts)
    else:
        task = dask.delayed(ome.pyramid_after, pure=False)(parts, str(classes_store))
    if compute:
        task.compute()
        return None
    return task


def _class_band(labels_store: str, classes_store: str, rows: tuple[int, int],
                lut: tuple[np.ndarray, np.ndarray], level: int = 0) -> None:
    """Rows ``rows`` (one row of zarr chunks, whole chunks, one writer each) of
    :func:`write_class_labels` at ``level``. A band without nuclei writes nothing, and zarr
    does not store the all-background chunks of the others (they read as fill, 0)."""
    from daskpath import ome

    y0, y1 = rows
    ids = np.asarray(ome.open_level(labels_store, level)[y0:y1])
    nz = np.flatnonzero(ids)
    if not len(nz):
        return
    out = np.zeros(ids.size, np.uint8)
    out[nz] = _classes_of(ids.ravel()[nz], *lut)
    ome.open_level(classes_store, level, mode="r+")[y0:y1] = out.reshape(ids.shape)


def _classes_of(v: np.ndarray, sorted_ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The class of each nucleus id in ``v`` (0 for ids absent from ``sorted_ids``).

    The ids of a band of rows lie in a narrow range (an id is its centroid's grid cell,
    row-major), so the table's ids in that range become a dense lookup table indexed by
    ``id - min``; a range too wide for that (over 64 M ids) falls back to a binary search per
    pixel.
    """
    if not len(sorted_ids) or not len(v):
        return np.zeros(len(v), np.uint8)
    lo, hi = int(v.min()), int(v.max())
    a, b = np.searchsorted(sorted_ids, lo, "left"), np.searchsorted(sorted_ids, hi, "right")
    if hi - lo < (1 << 26):
        dense = np.zeros(hi - lo + 1, np.uint8)
        # reversed: with repeated ids the first row wins, as with searchsorted below
        dense[sorted_ids[a:b][::-1] - lo] = classes[a:b][::-1]
        return dense[v - lo]
    i = np.minimum(np.searchsorted(sorted_ids, v), len(sorted_ids) - 1)
    hit = sorted_ids[i] == v  # ids absent from the table stay 0
    out = np.zeros(len(v), np.uint8)
    out[hit] = classes[i[hit]]
    return out


def _segment_chunk(img, dab, *, labels_store: str | None, core: tuple[int, int, int, int],
                   **kw: Any) -> pd.DataFrame:
    """:func:`_segment_block`, writing the core labels to ``labels_store``; returns the table."""
    lab, tab = _segment_block(img, dab, core=core, **kw)
    if labels_store is not None:
        from daskpath import ome

        ome.write_region(labels_store, core[0], core[2], lab)
    return tab


def chunks_in_region(
    ystarts: np.ndarray, xstarts: np.ndarray, region: Sequence[tuple[int, int, int, int]] | None
) -> np.ndarray:
    """Boolean (n_chunk_rows, n_chunk_cols): which chunk cores intersect a region rectangle.

    ``ystarts``/``xstarts`` are the chunk boundaries (0, ..., H); ``region`` rectangles are
    ``(y0, y1, x0, x1)`` half-open pixel ranges; ``None`` selects every chunk.
    """
    ny, nx = len(ystarts) - 1, len(xstarts) - 1
    if region is None:
        return np.ones((ny, nx), bool)
    r = np.asarray(list(region), dtype=np.int64).reshape(-1, 4)
    out = np.zeros((ny, nx), bool)
    for y0, y1, x0, x1 in r:
        if y1 <= y0 or x1 <= x0:
            continue
        # chunk i covers [ystarts[i], ystarts[i+1]): it meets [y0, y1) when start < y1 and end > y0
        i0 = np.searchsorted(ystarts, y0, side="right") - 1
        i1 = np.searchsorted(ystarts, y1, side="left")
        j0 = np.searchsorted(xstarts, x0, side="right") - 1
        j1 = np.searchsorted(xstarts, x1, side="left")
        out[max(i0, 0):min(i1, ny), max(j0, 0):min(j1, nx)] = True
    return out


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or np.ptp(v) == 0:
        return DEFAULT_DAB_THRESHOLD
    t = float(threshold_otsu(v))
    # Otsu's criterion is flat across an empty gap between two classes and skimage returns the
    # gap's lower edge; take the middle of the gap instead (same split, robust to new slides).
    below, above = v[v <= t], v[v > t]
    if below.size and above.size:
        t = float((below.max() + above.min()) / 2.0)
    return t


def measure_nuclei(
    ihc_rgb,
    model: str | Path | ModelRef = "phantom",
    *,
    method: Literal["nucleus", "two-channel"] = "nucleus",
    dab_threshold: float | Literal["auto"] = DEFAULT_DAB_THRESHOLD,
    stain_matrix=None,
    depth: int | None = None,
    prob_thresh: float | None = None,
    nms_thresh: float | None = None,
    labels_store=None,
    resources: dict[str, float] | None = None,
    region: pd.DataFrame | Sequence[tuple[int, int, int, int]] | None = None,
    record_dir: str | os.PathLike[str] | None = None,
    compute: bool = True,
) -> pd.DataFrame:
    """Segment and classify the nuclei of one IHC slide; one row per nucleus.

    Parameters
    ----------
    ihc_rgb : xarray.DataArray, dask array or ndarray, (y, x, 3) uint8
        The Ki67 IHC slide, e.g. ``ds.ihc`` from :func:`daskpath.open_pair`.
    model : str, Path or ModelRef
        StarDist model (see :func:`load_stardist`).
    method : {"nucleus", "two-channel"}
        ``"nucleus"`` (default): segment every nucleus once on hematoxylin + DAB (or RGB for
        3-channel models) and call it Ki67-positive when its mean DAB OD > ``dab_threshold``
        (QuPath's positive cell detection). ``"two-channel"``: the original study's method,
        StarDist separately on the DAB channel (rows ``channel="dab"``, ``positive=True``) and on
        the hematoxylin channel (``channel="hematoxylin"``, ``positive=False``); its tile ratio
        is DAB nuclei area / hematoxylin nuclei area (:func:`tile_ratios`). Needs a 1-channel model.
    dab_threshold : float or "auto"
        Mean-DAB-OD threshold (base-10 OD, default 0.15), or ``"auto"``: Otsu's threshold on this
        slide's nucleus ``dab_od`` values, moved to the middle of the empty gap around it.
    stain_matrix : None, "macenko", StainMatrix or array
        Colour deconvolution vectors: skimage HED (default), estimated on this slide with Macenko,
        or given.
    labels_store : zarr array / path / mapping, optional
        Where to write the label image (globally unique ids; ``method="nucleus"`` only); written in
        the same pass as the table. A path is written by the chunk tasks themselves (see
        :func:`segment_nuclei`), which a resumed run needs.
    record_dir : path, optional
        Record each chunk's nuclei there; a rerun loads recorded chunks instead of segmenting
        them again (see :func:`segment_nuclei`).
    compute : bool
        ``False``: return a :class:`dask.delayed.Delayed` of the table (slide-level statistics,
        normalisation and stain vectors, are still computed here); submit it to a cluster.
    region : DataFrame or sequence of (y0, x0, height, width), optional
        Tiles where nuclei are wanted, in the tile table's convention: a tile table (columns
        ``y0, x0, height, width``; with a ``keep`` column only its kept rows count), e.g.
        ``tiles[tiles.keep]`` from :func:`daskpath.tile_table`, or ``(y0, x0, height, width)``
        tuples. Only the chunks meeting a tile are segmented (with their full halo), so every
        nucleus whose centroid lies in a tile is found exactly as in a whole-slide run; see
        :func:`segment_nuclei`. Normalisation and stain vectors still come from the whole
        slide. ``None``: the whole slide; no rows: no nuclei. *Changed*: before, tuples were
        ``(y0, y1, x0, x1)``.

    Raises
    ------
    InvalidInputError
        (a ``ValueError``) A region tile that is empty (height or width <= 0), outside the
        slide, or not integer pixels; a bad ``method`` / ``dab_threshold``.

    Returns
    -------
    pandas.DataFrame
        Columns ``id, y, x, area, prob, dab_od, positive, channel, polygon``. ``df.attrs`` records the
        method, stain matrix, DAB threshold, normalisation and halo used.
    """
    import dask
    import dask.array as da

    from daskpath import stain

    if method not in ("nucleus", "two-channel"):
        raise InvalidInputError(f"nuclei method must be 'nucleus' or 'two-channel', got {method!r}")
    if not (dab_threshold == "auto" or isinstance(dab_threshold, (int, float))):
        raise InvalidInputError(f"dab_threshold must be a number or 'auto', got {dab_threshold!r}")
    if not isinstance(ihc_rgb, da.Array):
        ihc_rgb = da.asarray(ihc_rgb)  # a DataArray gives its dask array
    region = _region_rectangles(region, ihc_rgb.shape[:2])
    ref = resolve_model(model)
    if isinstance(stain_matrix, str):
        if stain_matrix != "macenko":
            raise InvalidInputError(
                f"stain_matrix must be None, 'macenko' or a matrix, got {stain_matrix!r}"
            )
        sm = stain.estimate_stain_vectors_macenko(stain.sample_pixels(ihc_rgb))
    else:
        sm = stain.as_stain_matrix(stain_matrix)
    h, dab = stain.hematoxylin_dab(ihc_rgb, sm)
    if depth is None:
        depth = default_depth(ref)
    kw = dict(depth=depth, prob_thresh=prob_thresh, nms_thresh=nms_thresh, resources=resources,
              region=region)
    attrs: dict[str, Any] = {
        "method": method, "model": ref.name, "stain_matrix": sm.to_dict(), "depth": int(depth),
    }
    if method == "nucleus":
        if ref.n_channel_in == 1:
            image = h + dab
        else:
            image = ihc_rgb.astype(np.float32)
        norm = slide_percentiles(image, ref.percentiles)
        in_task = labels_store is None or isinstance(labels_store, (str, os.PathLike))
        labels, table = segment_nuclei(image, ref, normalize_percentiles=norm, dab=dab,
                                       labels_store=labels_store if in_task else None,
                                       record_dir=record_dir, **kw)
        if not in_task:  # a zarr array or mapping: written by dask alongside the table
            store = da.to_zarr(labels, labels_store, compute=False, overwrite=True)
            table = dask.delayed(_first, pure=True)(table, store)
        attrs |= {"dab_threshold_mode": "auto" if dab_threshold == "auto" else "fixed",
                  "normalize": list(norm)}
        result = dask.delayed(_classify_nucleus, pure=True)(
            table, dab_threshold, "h+dab" if ref.n_channel_in == 1 else "rgb", attrs)
    else:
        if ref.n_channel_in != 1:
            raise InvalidInputError(
                f"method 'two-channel' needs a 1-channel StarDist model; {ref.name!r} takes "
                f"{ref.n_channel_in}"
            )
        nh = slide_percentiles(h, ref.percentiles)
        nd = slide_percentiles(dab, ref.percentiles)
        rec = (lambda sub: None) if record_dir is None else (lambda sub: Path(record_dir) / sub)
        _, th = segment_nuclei(h, ref, normalize_percentiles=nh, dab=dab, record_dir=rec("h"), **kw)
        _, td = segment_nuclei(dab, ref, normalize_percentiles=nd, dab=dab, record_dir=rec("dab"), **kw)
        attrs |= {"normalize_h": list(nh), "normalize_dab": list(nd)}
        result = dask.delayed(_classify_two_channel, pure=True)(th, td, attrs)
    return result.compute() if compute else result


def _region_rectangles(region: Any, shape: tuple[int, int]) -> list[tuple[int, int, int, int]] | None:
    """Tiles ``(y0, x0, height, width)`` (a tile table or tuples) as checked ``(y0, y1, x0, x1)``.

    A DataFrame needs the columns ``y0, x0, height, width``; with a boolean ``keep`` column
    only its kept rows are used. ``None`` stays ``None`` (the whole slide).

    Raises
    ------
    InvalidInputError
        A tile with height or width <= 0, one outside the ``shape`` (height, width) slide, a
        non-integer or missing value, or rows that are not 4 numbers.
    """
    if region is None:
        return None
    import pandas as pd

    fix = ("pass a tile table (daskpath.tile_table(ds), e.g. tiles[tiles.keep]) or "
           "(y0, x0, height, width) tuples in slide pixels")
    if isinstance(region, pd.DataFrame):
        missing = [c for c in ("y0", "x0", "height", "width") if c not in region.columns]
        if missing:
            raise InvalidInputError(f"measure_nuclei: region table lacks column(s) "
                                    f"{', '.join(missing)}: {fix}")
        if "keep" in region.columns:
            region = region[region["keep"].astype(bool)]
        raw = region[["y0", "x0", "height", "width"]].to_numpy()
    else:
        try:
            raw = np.asarray(list(region), dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError(f"measure_nuclei: region {region!r:.80} is not a list of "
                                    f"(y0, x0, height, width): {fix}") from None
        if raw.size == 0:
            raw = raw.reshape(0, 4)
        if raw.ndim != 2 or raw.shape[1] != 4:
            raise InvalidInputError(f"measure_nuclei: region rows must be (y0, x0, height, width), "
                                    f"got an array of shape {raw.shape}: {fix}")
    try:
        vals = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"measure_nuclei: region values must be integer pixels: {fix}") from None
    bad = ~np.isfinite(vals).all(axis=1) | (vals != np.round(vals)).any(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        raise InvalidInputError(f"measure_nuclei: region row {k} {tuple(raw[k])} is not integer "
                                f"pixels: {fix}")
    r = vals.astype(np.int64)
    h, w = int(shape[0]), int(shape[1])
    for k, (y0, x0, th, tw) in enumerate(r):
        if th <= 0 or tw <= 0:
            raise InvalidInputError(
                f"measure_nuclei: region row {k} (y0={y0}, x0={x0}, height={th}, width={tw}) is "
                "empty and would select no nuclei: give tiles with height and width > 0 "
                "(region rows are (y0, x0, height, width), as in a tile table, not (y0, y1, x0, x1))")
        if y0 < 0 or x0 < 0 or y0 + th > h or x0 + tw > w:
            raise InvalidInputError(
                f"measure_nuclei: region row {k} (y0={y0}, x0={x0}, height={th}, width={tw}) "
                f"reaches outside the {h}x{w} px slide: use tiles of this slide ({fix})")
    return [(int(y0), int(y0 + th), int(x0), int(x0 + tw)) for y0, x0, th, tw in r]


def _first(a: Any, *_: Any) -> Any:
    return a


def _finish_table(df: pd.DataFrame, attrs: dict[str, Any]) -> pd.DataFrame:
    df["positive"] = df["positive"].astype(bool)
    df = df[[c for c in NUCLEI_COLUMNS if c in df.columns]]
    df.attrs.update(attrs)
    return df


def _classify_nucleus(df: pd.DataFrame, dab_threshold: float | str, channel: str,
                      attrs: dict[str, Any]) -> pd.DataFrame:
    """Positive = mean DAB OD above the threshold (``"auto"``: Otsu over this slide's nuclei)."""
    df = df.copy()
    thr = _otsu(df["dab_od"].to_numpy()) if dab_threshold == "auto" else float(dab_threshold)
    df["positive"] = df["dab_od"] > thr
    df["channel"] = channel
    return _finish_table(df, attrs | {"dab_threshold": thr})


def _classify_two_channel(dfh: pd.DataFrame, dfd: pd.DataFrame, attrs: dict[str, Any]) -> pd.DataFrame:
    import pandas as pd

    dfh, dfd = dfh.copy(), dfd.copy()
    dfh["positive"], dfh["channel"] = False, "hematoxylin"
    dfd["positive"], dfd["channel"] = True, "dab"
    df = pd.concat([dfd, dfh], ignore_index=True)
    return _finish_table(df, attrs | {"n_dab": int(len(dfd)), "n_hematoxylin": int(len(dfh))})


def tile_sums(nuclei_df: pd.DataFrame, tiles_df: pd.DataFrame) -> pd.DataFrame:
    """Per tile: positive and total nucleus area and count (nuclei assigned by centroid).

    Parameters
    ----------
    nuclei_df : DataFrame
        ``y, x, area, positive`` per nucleus (plus ``slide`` when ``tiles_df`` has several
        slides). For a ``method="two-channel"`` table (``channel`` in {"dab", "hematoxylin"})
        "positive" means the DAB nuclei and "all" the hematoxylin nuclei, as the original study
        defines its ratio.
    tiles_df : DataFrame
        ``slide, y0, x0, height, width`` per tile (non-overlapping rectangles).

    Returns
    -------
    DataFrame
        ``pos_area, all_area, pos_n, all_n`` (float), one row per tile, in ``tiles_df``'s order.
    """
    need = {"y0", "x0", "height", "width"}
    if missing := need - set(tiles_df.columns):
        raise InvalidInputError(f"tile table lacks column(s) {sorted(missing)}")
    if missing := {"y", "x", "area", "positive"} - set(nuclei_df.columns):
        raise InvalidInputError(f"nuclei table lacks column(s) {sorted(missing)}")
    import pandas as pd

    sums = np.zeros((len(tiles_df), 4))
    two = (
        "channel" in nuclei_df.columns
        and len(nuclei_df) > 0
        and set(nuclei_df["channel"].unique()) <= {"dab", "hematoxylin"}
    )
    slides = tiles_df["slide"].unique() if "slide" in tiles_df.columns else [None]
    if len(slides) > 1 and "slide" not in nuclei_df.columns:
        raise InvalidInputError(
            "tile table has several slides but the nuclei table has no 'slide' column"
        )
    for slide in slides:
        if slide is None:
            tsel = np.arange(len(tiles_df))
        else:
            tsel = np.flatnonzero(tiles_df["slide"].to_numpy() == slide)
        nd = nuclei_df if (slide is None or "slide" not in nuclei_df.columns) else \
            nuclei_df[nuclei_df["slide"] == slide]
        t = tiles_df.iloc[tsel]
        y0, x0 = t["y0"].to_numpy(np.int64), t["x0"].to_numpy(np.int64)
        y1, x1 = y0 + t["height"].to_numpy(np.int64), x0 + t["width"].to_numpy(np.int64)
        ys, xs = np.unique(y0), np.unique(x0)
        ny, nx = np.floor(nd["y"].to_numpy(np.float64)), np.floor(nd["x"].to_numpy(np.float64))
        iy = np.searchsorted(ys, ny, side="right") - 1
        ix = np.searchsorted(xs, nx, side="right") - 1
        lookup = {(a, b): k for k, (a, b) in enumerate(zip(y0, x0))}
        tile_of = np.full(len(nd), -1)
        for k, (a, b) in enumerate(zip(iy, ix)):
            if a < 0 or b < 0:
                continue
            ti = lookup.get((ys[a], xs[b]))
            if ti is not None and ny[k] < y1[ti] and nx[k] < x1[ti]:
                tile_of[k] = ti
        ok = tile_of >= 0
        tk = tile_of[ok]
        area = nd["area"].to_numpy(np.float64)[ok]
        if two:
            pos = nd["channel"].to_numpy()[ok] == "dab"
            counted = ~pos
        else:
            pos = nd["positive"].to_numpy(bool)[ok]
            counted = np.ones(len(tk), bool)
        n = len(t)
        sums[tsel, 0] = np.bincount(tk, weights=area * pos, minlength=n)
        sums[tsel, 1] = np.bincount(tk, weights=area * counted, minlength=n)
        sums[tsel, 2] = np.bincount(tk, weights=pos.astype(float), minlength=n)
        sums[tsel, 3] = np.bincount(tk, weights=counted.astype(float), minlength=n)
    return pd.DataFrame(sums, columns=["pos_area", "all_area", "pos_n", "all_n"],
                        index=tiles_df.index)


def tile_ratios(
    nuclei_df: pd.DataFrame, tiles_df: pd.DataFrame, *, suffix: str = "ihc"
) -> pd.DataFrame:
    """Add per-tile Ki67 ratios to a tile table; nuclei are assigned to tiles by centroid.

    Parameters
    ----------
    nuclei_df : DataFrame
        ``y, x, area, positive`` per nucleus (plus ``slide`` when ``tiles_df`` has several
        slides). A table from ``method="two-channel"`` (``channel`` in {"dab", "hematoxylin"})
        gets the original study's definitions: area ratio = DAB nuclei area / hematoxylin nuclei
        area, count index = DAB count / hematoxylin count (these can exceed 1).
    tiles_df : DataFrame
        ``slide, y0, x0, height, width`` per tile (non-overlapping rectangles).
    suffix : str
        Output columns are ``ratio_<suffix>`` (positive nuclei area / all nuclei area) and
        ``ki67_index_<suffix>`` (positive count / count); NaN where a tile has no nuclei.

    Returns
    -------
    DataFrame
        A copy of ``tiles_df`` with the two columns added (same row order).
    """
    s = tile_sums(nuclei_df, tiles_df)
    out = tiles_df.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        out[f"ratio_{suffix}"] = np.where(s["all_area"] > 0, s["pos_area"] / s["all_area"], np.nan)
        out[f"ki67_index_{suffix}"] = np.where(s["all_n"] > 0, s["pos_n"] / s["all_n"], np.nan)
    return out


_GEOJSON_BATCH = 16384  # features formatted and written at a time: bounds memory on huge tables
_GEOJSON_SEP = (",", ":")
_JSON_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_GEOJSON_CLASS = {
    True: '{"objectType":"detection","classification":{"name":"Positive","color":[140,80,20]},'
          '"measurements":{',
    False: '{"objectType":"detection","classification":{"name":"Negative","color":[70,70,200]},'
           '"measurements":{',
}
_EXACT_LIMIT = 1e6  # |value| below which the bulk formatters below are exact (and tables small)


def _json_float(v: float) -> str:
    """``json.dumps(v)`` for a Python float: its repr, or ``NaN`` / ``Infinity`` / ``-Infinity``."""
    s = float.__repr__(v)
    return _JSON_NONFINITE.get(s, s)


def _py_values(a: np.ndarray) -> list[Any]:
    """``a``'s elements, as Python scalars when that is exact (bool, int, float dtypes)."""
    return a.tolist() if a.dtype.kind in "biuf" else list(a)


def _polygon_json_reference(p: Any) -> str:
    """GeoJSON ``Polygon`` text of one flat ``(y0, x0, y1, x1, ...)`` outline, row by row."""
    ring = np.asarray(p, np.float64).reshape(-1, 2)[:, ::-1]  # (y, x) -> (x, y)
    ring = np.vstack([ring, ring[:1]])
    return json.dumps({"type": "Polygon", "coordinates": [np.round(ring, 2).tolist()]},
                      separators=_GEOJSON_SEP)


def _decimal_words(ndigits: int, seps: Sequence[str] = ("",)) -> np.ndarray:
    """``w[10**ndigits * s + f]``: 8 bytes, ``"."`` and the ``ndigits`` decimals of ``f``
    (``0 <= f < 10**ndigits``; trailing zeros dropped, one kept), then ``seps[s]``; left-aligned,
    unused bytes 0."""
    size = 10**ndigits
    f = np.arange(size)
    b = np.zeros((len(seps), size, 8), np.uint8)
    b[:, :, 0] = ord(".")
    keep = np.full(size, ndigits)
    for i in range(1, ndigits):
        keep -= f % 10**i == 0
    for i in range(ndigits):
        b[:, :, 1 + i] = np.where(i < keep, (f // 10 ** (ndigits - 1 - i)) % 10 + ord("0"), 0)
    for s, sep in enumerate(seps):
        for i, c in enumerate(sep.encode()):
            b[s, np.arange(size), 1 + keep + i] = c
    return b.view(np.uint64).reshape(-1)


_POLYGON_DECIMALS = _decimal_words(2, (",", "],[", ""))  # after x, after y, after the last y
_MEASUREMENT_DECIMALS: dict[int, np.ndarray] = {}


class _GeojsonCache:
    """What :func:`write_geojson` reuses across rows and batches."""

    def __init__(self, mpp: Any) -> None:
        self.area = _AreaText(mpp)
        self._digits = np.zeros(0, np.uint64)

    def digit_words(self, qmax: int) -> np.ndarray:
        """``w[2 q + s]`` for ``0 <= q <= qmax < 10**7``: 8 bytes, ``q``'s decimal digits
        right-aligned, ``"-"`` before them if ``s``; unused bytes 0."""
        if len(self._digits) < 2 * (qmax + 1):
            qmax = max(qmax, 2 * (len(self._digits) // 2), 1023)  # grow geometrically
            qs = np.arange(qmax + 1)
            b = np.zeros((qmax + 1, 2, 8), np.uint8)
            b[:, :, 7] = (qs % 10 + ord("0"))[:, None]
            width = np.ones(qmax + 1, np.intp)
            j, p10 = 1, 10
            while p10 <= qmax:
                has = qs >= p10
                b[:, :, 7 - j] = np.where(has, (qs // p10) % 10 + ord("0"), 0)[:, None]
                width += has
                j, p10 = j + 1, p10 * 10
            b[qs, 1, 7 - width] = ord("-")
            self._digits = b.view(np.uint64).reshape(-1)
        return self._digits


class _AreaText(dict):
    """Integer area -> ``"area_px":...[,"area_um2":...]`` JSON text, computed once per value."""

    def __init__(self, mpp: Any) -> None:
        super().__init__()
        self.mpp = mpp

    def __missing__(self, a: Any) -> str:
        s = self[a] = self.text(a)
        return s

    def text(self, a: Any) -> str:
        """The text for area ``a``, uncached."""
        v = float(a)
        s = '"area_px":' + _json_float(v)
        if self.mpp:
            # json.dumps, not _json_float: an mpp of any type behaves as in the dict json.dumps got
            s += ',"area_um2":' + json.dumps(v * self.mpp * self.mpp)
        return s


def _split_words(words: np.ndarray) -> list[str]:
    """The text of each row of ``words`` (uint64 of ASCII bytes; 0 bytes dropped; the last column
    is overwritten with a row separator)."""
    words[:, -1] = ord("\n")
    return words.tobytes().translate(None, b"\0").decode("ascii").split("\n")[:-1]


def _polygon_json_batch(a: np.ndarray, cache: _GeojsonCache) -> list[str | None]:
    """GeoJSON ``Polygon`` texts of ``n`` flat outlines of one length, formatted in bulk.

    Same text as :func:`_polygon_json_reference`. Each coordinate is ``r = np.round(v, 2)``; its
    ``repr`` is spelled from the integer ``k = rint(100 r)`` as ``k / 100`` with trailing zeros
    dropped (one decimal kept). That is exact when ``r`` is the double nearest ``k / 100``
    (checked) and ``|r| < 1e6``: there doubles lie far closer together than 0.01, so no shorter
    decimal rounds to ``r``, and repr uses no exponent.

    Parameters
    ----------
    a : ndarray
        ``(n, 2 m)`` float64, row ``(y0, x0, ..., y_m-1, x_m-1)``.
    cache : _GeojsonCache
        Digit tables.

    Returns
    -------
    list of str or None
        Per row, the geometry text, or None where a coordinate is not in the exact case (NaN,
        infinite, ``|r| >= 1e6``): format those rows with :func:`_polygon_json_reference`.
    """
    n, size = a.shape
    width = size + 2
    r = np.round(a, 2).reshape(n, size // 2, 2)[:, :, ::-1]
    r = np.concatenate([r, r[:, :1]], axis=1).reshape(n, width)  # closed ring of (x, y)
    with np.errstate(invalid="ignore", over="ignore"):
        k = np.rint(r * 100.0)
        ok = (np.abs(r) < _EXACT_LIMIT) & (k / 100.0 == r)  # False for NaN and inf
        k = np.abs(k, out=k)
        q = np.floor(k / 100.0)
        qmax = int(np.max(q, where=ok, initial=0.0))
        # table indices; garbage where not ok (clipped by take), those rows are dropped
        ia = (q * 2.0 + np.signbit(r)).astype(np.intp)  # signbit: -0.0 is written "-0.0"
        sep = np.full(width, 100.0)
        sep[0::2] = 0.0
        sep[-1] = 200.0
        ib = (k - q * 100.0 + sep).astype(np.intp)
    # per number: its integer part and its decimals + separator; then room for a row separator
    words = np.empty((n, 2 * width + 1), np.uint64)
    words[:, 0:-1:2] = cache.digit_words(qmax).take(ia, mode="clip")
    words[:, 1:-1:2] = _POLYGON_DECIMALS.take(ib, mode="clip")
    return ['{"type":"Polygon","coordinates":[[[' + t + "]]]}" if good else None
            for t, good in zip(_split_words(words), ok.all(axis=1).tolist())]


def _rounded_json(v: np.ndarray, ndigits: int, cache: _GeojsonCache) -> list[str]:
    """``json.dumps(round(float(x), ndigits))`` for each ``x`` of ``v``.

    float32 columns go in bulk: ``x`` has a 24-bit significand and ``5**ndigits < 2**12``, so
    ``x * 10**ndigits`` is exact in float64 and ``k = rint`` of it is the correctly rounded (half to
    even) decimal that Python's ``round`` picks; ``k / 10**ndigits`` is then the float ``round``
    returns, and its repr is ``k`` spelled with ``ndigits`` decimals (see
    :func:`_polygon_json_batch`). Values Python writes in exponent form (below ``1e-4``), NaN,
    infinite or ``>= 1e6`` values and other dtypes are formatted one by one.

    Parameters
    ----------
    v : ndarray
        A measurement column.
    ndigits : int
        Decimals, as for ``round``.
    cache : _GeojsonCache
        Digit tables.

    Returns
    -------
    list of str
        One JSON number per element.
    """
    if v.dtype != np.float32 or not 0 <= ndigits <= 5 or not len(v):
        return [_json_float(round(float(x), ndigits)) for x in _py_values(v)]
    scale = 10.0**ndigits
    x = v.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        k = np.rint(x * scale)
        ok = (np.abs(x) < _EXACT_LIMIT) & ((k == 0) | (np.abs(k) >= 10.0 ** (ndigits - 4)))
        neg = np.signbit(k)
        k = np.abs(k, out=k)
        q = np.floor(k / scale)
        qmax = int(np.max(q, where=ok, initial=0.0))
        ia = (q * 2.0 + neg).astype(np.intp)
        ib = (k - q * scale).astype(np.intp)
    table = _MEASUREMENT_DECIMALS.get(ndigits)
    if table is None:
        table = _MEASUREMENT_DECIMALS[ndigits] = _decimal_words(ndigits)
    words = np.empty((len(v), 3), np.uint64)
    words[:, 0] = cache.digit_words(qmax).take(ia, mode="clip")
    words[:, 1] = table.take(ib, mode="clip")
    texts = _split_words(words)
    for j in np.flatnonzero(~ok).tolist():
        texts[j] = _json_float(round(float(v[j]), ndigits))
    return texts


def _stack_outlines(rows: list[Any], size: int) -> np.ndarray | None:
    """``(len(rows), size)`` float64 of 1-D outlines of ``size`` values, None unless all are that.

    The values are ``np.asarray(p, np.float64)``'s; rows that need more than a same-kind cast
    (object, str) or are not 1-D give None, and are left to :func:`_polygon_json_reference`.
    """
    try:
        a = np.concatenate(rows, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a.reshape(len(rows), size) if a.ndim == 1 and size % 2 == 0 else None


def _geojson_geometries(polys: np.ndarray | None, cols: dict[str, np.ndarray], start: int,
                        stop: int, cache: _GeojsonCache) -> list[str]:
    """GeoJSON geometry texts of rows ``start:stop`` (see :func:`write_geojson`)."""
    nb = stop - start
    out: list[str] = [""] * nb
    ps = list(polys[start:stop]) if polys is not None else [None] * nb
    groups: dict[int, list[int]] = {}
    points = []
    try:
        sizes = set(map(len, ps))
    except TypeError:  # None (or worse) among them
        sizes = set()
    if len(sizes) == 1 and min(sizes) >= 6:
        groups[min(sizes)] = list(range(nb))
    else:
        for j, p in enumerate(ps):
            if p is None or len(p) < 6:
                points.append(j)
            else:
                groups.setdefault(len(p), []).append(j)
    for size, idx in groups.items():
        rows = ps if len(idx) == nb else [ps[j] for j in idx]
        a = _stack_outlines(rows, size)
        texts = _polygon_json_batch(a, cache) if a is not None else [None] * len(idx)
        for j, t in zip(idx, texts):
            # rows outside the bulk formatter's exact case (and odd sizes, which raise)
            out[j] = t if t is not None else _polygon_json_reference(ps[j])
    if points:
        xs, ys = cols["x"], cols["y"]
        for j in points:
            x, y = round(float(xs[start + j]), 2), round(float(ys[start + j]), 2)
            out[j] = '{"type":"Point","coordinates":[' + _json_float(x) + "," + _json_float(y) + "]}"
    return out


def _geojson_features(polys: np.ndarray | None, cols: dict[str, np.ndarray], start: int, stop: int,
                      cache: _GeojsonCache) -> list[str]:
    """One line of JSON (``"\\n"``-terminated) per feature of rows ``start:stop``."""
    nb = stop - start
    geoms = _geojson_geometries(polys, cols, start, stop, cache)
    area = cache.area
    areas = cols["area"][start:stop]
    if areas.dtype.kind in "biu":
        meas = [area[a] for a in areas.tolist()]
    else:  # not cached: 0.0 == -0.0, and NaN != NaN
        meas = [area.text(a) for a in _py_values(areas)]
    if "dab_od" in cols:
        dab = [',"dab_od":' + t for t in _rounded_json(cols["dab_od"][start:stop], 5, cache)]
    else:
        dab = [""] * nb
    if "prob" in cols:
        prob = [',"prob":' + t for t in _rounded_json(cols["prob"][start:stop], 4, cache)]
    else:
        prob = [""] * nb
    cls = [_GEOJSON_CLASS[bool(v)] for v in _py_values(cols["positive"][start:stop])]
    if "channel" in cols:
        names: dict[str, str] = {}
        chan = []
        for v in _py_values(cols["channel"][start:stop]):
            s = str(v)
            t = names.get(s)
            if t is None:
                t = names[s] = ',"channel":' + json.dumps(s)
            chan.append(t)
    else:
        chan = [""] * nb
    if "id" in cols:
        ids = [',"id":"' + str(int(v)) + '"' for v in _py_values(cols["id"][start:stop])]
    else:
        ids = [""] * nb
    return [f'{{"type":"Feature","geometry":{g},"properties":{c}{a}{d}{p}}}{ch}}}{i}}}\n'
            for g, c, a, d, p, ch, i in zip(geoms, cls, meas, dab, prob, chan, ids)]


def write_geojson(df: pd.DataFrame, path: str | os.PathLike[str], *, mpp: float | None = None) -> Path:
    """Write nuclei as a GeoJSON FeatureCollection that QuPath imports as detections.

    One ``Feature`` per nucleus: its StarDist outline as a ``Polygon`` in slide pixel
    coordinates (``[x, y]``, closed ring; a ``Point`` at the centroid for rows without
    ``polygon``), ``properties.objectType = "detection"``, ``classification`` ``Positive``
    (brown) / ``Negative`` (blue) and ``measurements`` (area in px and, with ``mpp``, in um^2;
    mean DAB OD; StarDist probability; channel). Written to a temp name and renamed, one line
    per feature, without building the whole document in memory.

    Each line is ``json.dumps(feature, separators=(",", ":"))`` of the feature as a dict
    (vertices ``np.round(., 2)``, centroid and measurements Python ``round``), but formatted in
    batches of rows: outlines of one length are rounded and spelled together.

    Parameters
    ----------
    df : DataFrame
        A nuclei table from :func:`measure_nuclei` (``y, x, area, positive`` at least).
    path : path
        Output file (``.geojson``).
    mpp : float, optional
        Microns per pixel, for ``area_um2``.

    Returns
    -------
    Path
        ``path``.
    """
    from daskpath.outputs import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    polys = df["polygon"].to_numpy() if "polygon" in df.columns else None
    cols = {c: df[c].to_numpy() for c in ("id", "y", "x", "area", "dab_od", "prob", "channel", "positive")
            if c in df.columns}
    cache = _GeojsonCache(mpp)
    try:
        with open(tmp, "w") as f:
            f.write('{"type": "FeatureCollection", "features": [\n')
            for start in range(0, len(df), _GEOJSON_BATCH):
                stop = min(len(df), start + _GEOJSON_BATCH)
                lines = _geojson_features(polys, cols, start, stop, cache)
                f.write(("," if start else "") + ",".join(lines))
            f.write("]}\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
