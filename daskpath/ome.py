"""OME-NGFF images: the one place that knows the layout daskpath writes (and reads back).

Every image daskpath writes (ingested slides, the layers of a slide, thumbnails, the virtual
IHC, nucleus label images) is an **OME-NGFF 0.5** image on **zarr v3**, the version that
ome-zarr-py (0.18: :class:`ome_zarr.reader.Reader`, hence ``napari-ome-zarr``) reads and
``ome-zarr-models`` validates:

* ``<image>/zarr.json`` holds ``attributes.ome``: ``version: "0.5"``, one ``multiscales``
  entry (axes ``c, y, x`` for images, ``y, x`` for label images; ``space`` axes in
  ``micrometer`` when the pixel size is known) and, for images, ``omero`` rendering metadata
  (channel labels, colours, display windows). daskpath's own facts (source file identity,
  slide id, downsample factors) live beside it under ``attributes.daskpath``.
* ``<image>/0``, ``<image>/1``, ...: the pyramid. Level ``k`` is ``ceil(side / 2**k)`` pixels
  per side with scale ``mpp * 2**k`` um; levels are added until the largest side is at most
  :data:`PYRAMID_TOP` px. Level ``k + 1`` is the 2x2 mean of level ``k`` (rounded half up for
  integer images; an odd last row/column is replicated), or its ``[::2, ::2]`` stride for
  label images (label values are ids, a mean would invent ids).
* Label images of an image sit at ``<image>/labels/<name>`` (``labels`` group listing them,
  ``image-label`` metadata with ``source.image = "../../"``); a label image whose image is not
  a zarr (the user's own slide file) is written standalone, same metadata without ``source``.

Writing is split so that a cluster can fill level 0 region by region: :func:`create_image`
makes every array and writes the metadata, the pipeline's chunk tasks write their level-0
regions (each owning whole zarr chunks: :func:`write_region`), then :func:`build_pyramid`
derives levels 1..n from level 0 as one dask computation. :func:`write_image` does all three
for an array already in memory or in dask. :func:`describe` reports what a store holds
(``daskpath info``).

When the pixel size is unknown (``mpp=None``) the space axes carry no unit and level 0 has
scale 1.0 (pixels); :func:`describe` says so.

Every array is compressed with zstd at level 1 (:data:`ZSTD_LEVEL`), not zarr's default 3:
measured on an 8192² RGB slide in 1024² chunks, 0.9 vs 2.3 CPU-s to compress (reading back
0.41 vs 0.58 CPU-s) for 126 vs 101 MB. Image arrays (with a channel axis) opened for writing
skip zarr's check for chunks equal to the fill value (``write_empty_chunks``): their chunks
are written whole and almost never equal it, and the check cost ~6 ms per 3 MB chunk, more
than compressing it. Label images keep the check (background chunks stay unwritten).

The metadata is written here as plain JSON rather than through ome-zarr-py's
``write_multiscales_metadata`` / ``write_label_metadata``: the latter (0.18) leaves ``version``
out of the ``labels`` group, which NGFF 0.5 requires and ome-zarr-models rejects, and neither
writes the multiscale ``type``. The tests open every image daskpath writes with
ome-zarr-py's ``Reader`` and validate it with ome-zarr-models' 0.5 models instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from daskpath.errors import InvalidInputError, SlideError

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da
    import zarr
    from dask.delayed import Delayed

#: zstd level of every array daskpath writes (zarr's default is 3; see the module docstring)
ZSTD_LEVEL = 1

__all__ = [
    "NGFF_VERSION",
    "PYRAMID_TOP",
    "Kind",
    "add_labels",
    "build_pyramid",
    "create_image",
    "create_labels",
    "describe",
    "format_description",
    "is_ngff",
    "level_shapes",
    "open_level",
    "pyramid_after",
    "read_image",
    "set_mpp",
    "write_image",
    "write_region",
]

NGFF_VERSION = "0.5"
#: The pyramid goes on until the largest side of its last level is at most this many pixels.
PYRAMID_TOP = 1024
UNIT = "micrometer"

Kind = Literal["rgb", "float", "labels"]
PathLike = str | os.PathLike[str]

RGB_CHANNELS = ("R", "G", "B")
_RGB_COLORS = ("FF0000", "00FF00", "0000FF")
_FLOAT_COLORS = ("FF00FF", "FFA500", "00FFFF", "FFFFFF", "FFFF00", "00FF00")
#: Colours of class-valued label images: 1 = Ki67-negative (blue), 2 = Ki67-positive (brown).
CLASS_COLORS = [
    {"label-value": 1, "rgba": [62, 105, 196, 255]},
    {"label-value": 2, "rgba": [153, 76, 0, 255]},
]
CLASS_PROPERTIES = [
    {"label-value": 1, "class": "Negative"},
    {"label-value": 2, "class": "Positive"},
]


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def level_shapes(shape: Sequence[int], top: int = PYRAMID_TOP,
                 levels: int | None = None) -> list[tuple[int, int]]:
    """``(height, width)`` of each pyramid level: halve (rounding up) until ``max <= top``.

    Parameters
    ----------
    shape : (int, int)
        Level-0 ``(height, width)``.
    top : int
        Largest side allowed for the last level (default :data:`PYRAMID_TOP`).
    levels : int, optional
        Exact number of levels instead (at least 1).
    """
    h, w = (int(s) for s in shape)
    if h <= 0 or w <= 0:
        raise InvalidInputError(f"image shape must be positive, got {tuple(shape)}")
    out = [(h, w)]
    while (len(out) < levels) if levels is not None else max(out[-1]) > top:
        ph, pw = out[-1]
        if ph == 1 and pw == 1:
            break
        out.append(((ph + 1) // 2, (pw + 1) // 2))
    return out


def _axes(kind: Kind, mpp: float | None) -> list[dict[str, str]]:
    unit = {"unit": UNIT} if mpp else {}
    space = [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]
    return space if kind == "labels" else [{"name": "c", "type": "channel"}, *space]


def _datasets(kind: Kind, mpp: float | None, n: int) -> list[dict[str, Any]]:
    base = float(mpp) if mpp else 1.0
    lead = [] if kind == "labels" else [1.0]
    return [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [*lead, base * 2**k, base * 2**k]}]} for k in range(n)]


def _omero(kind: Kind, channels: Sequence[str], dtype: np.dtype,
           colors: Sequence[str] | None,
           windows: Sequence[tuple[float, ...]] | None) -> dict[str, Any]:
    if kind == "rgb":
        colors = colors or _RGB_COLORS
        windows = windows or [(0.0, 255.0)] * len(channels)
    else:
        colors = colors or [_FLOAT_COLORS[i % len(_FLOAT_COLORS)] for i in range(len(channels))]
        windows = windows or [(0.0, 1.0)] * len(channels)
    chans = []
    for label, color, win in zip(channels, colors, windows, strict=True):
        lo, hi, start, end = (*win, *win) if len(win) == 2 else win
        chans.append({"label": str(label), "color": str(color), "active": True,
                      "coefficient": 1.0, "family": "linear", "inverted": False,
                      "window": {"min": float(lo), "max": float(hi), "start": float(start),
                                 "end": float(end)}})
    return {"channels": chans, "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0}}


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _open_group(path: PathLike, mode: str = "r") -> zarr.Group:
    import zarr

    try:
        return zarr.open_group(str(path), mode=mode)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - zarr raises several kinds
        raise SlideError(f"{path} is not a readable zarr group ({' '.join(str(exc).split())}): "
                         "pass an OME-Zarr image written by daskpath") from None


def create_image(
    path: PathLike,
    shape: Sequence[int],
    *,
    kind: Kind = "rgb",
    chunks: Sequence[int] = (1024, 1024),
    mpp: float | None = None,
    channels: Sequence[str] | None = None,
    dtype: Any = None,
    name: str | None = None,
    levels: int | None = None,
    fill_value: Any = None,
    colors: Sequence[str] | None = None,
    windows: Sequence[tuple[float, ...]] | None = None,
    label_colors: list[dict[str, Any]] | None = None,
    label_properties: list[dict[str, Any]] | None = None,
    source_image: str | None = None,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Create an empty NGFF 0.5 image: every pyramid array and all metadata.

    Level 0 is then written region by region (:func:`write_region`, each writer owning whole
    chunks) and levels 1.. by :func:`build_pyramid`.

    Parameters
    ----------
    path : str or os.PathLike
        The image group to create (replaced when ``overwrite``).
    shape : (int, int)
        Level-0 ``(height, width)`` in pixels.
    kind : {"rgb", "float", "labels"}
        ``"rgb"``: uint8 ``(3, y, x)`` with ``omero`` RGB rendering; ``"float"``: float32
        ``(len(channels), y, x)``, ``omero`` display windows ``windows`` (default 0..1);
        ``"labels"``: int32 ``(y, x)`` label image (``image-label`` metadata).
    chunks : (int, int)
        Chunk ``(height, width)`` of every level (not capped by a level's size, so readers
        see the same tile size at every level). A chunk always holds every channel.
    mpp : float, optional
        Microns per pixel of level 0. ``None``: no unit, pixel scale 1.0.
    channels : list of str, optional
        Channel labels (default ``R, G, B`` for ``"rgb"``; required for ``"float"``).
    dtype : numpy dtype, optional
        Default uint8 / float32 / int32 by ``kind``.
    name : str, optional
        ``multiscales[0].name`` (default the folder name).
    levels : int, optional
        Number of levels (default: halve until the largest side is <= :data:`PYRAMID_TOP`).
    fill_value : scalar, optional
        Value of never-written pixels (default 0, NaN for floats).
    colors, windows : optional
        ``omero`` channel colours (hex ``RRGGBB``) and windows: ``(lo, hi)`` (data range and
        display range) or ``(min, max, start, end)``.
    label_colors, label_properties : list of dict, optional
        ``image-label`` ``colors`` / ``properties`` (``kind="labels"``), e.g.
        :data:`CLASS_COLORS` for class-valued labels.
    source_image : str, optional
        ``image-label.source.image`` (relative path to the labelled image, ``"../../"`` for a
        label inside ``<image>/labels/``).
    attrs : dict, optional
        Stored as ``attributes.daskpath`` (daskpath's own metadata), with ``kind`` added.
    overwrite : bool
        Replace an existing group at ``path``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import zarr
    from zarr.codecs import ZstdCodec

    if kind not in ("rgb", "float", "labels"):
        raise InvalidInputError(f"NGFF image kind must be 'rgb', 'float' or 'labels', got {kind!r}")
    if mpp is not None:
        try:
            ok = float(mpp) > 0 and np.isfinite(float(mpp))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidInputError(f"mpp must be a positive number of microns per pixel or "
                                    f"None, got {mpp!r}")
        mpp = float(mpp)
    if kind == "rgb":
        channels = list(channels or RGB_CHANNELS)
        dtype = np.dtype(dtype or np.uint8)
    elif kind == "float":
        if not channels:
            raise InvalidInputError("create_image(kind='float') needs channel names")
        channels = list(channels)
        dtype = np.dtype(dtype or np.float32)
    else:
        channels = []
        dtype = np.dtype(dtype or np.int32)
    if fill_value is None:
        fill_value = np.nan if dtype.kind == "f" else 0
    cy, cx = (max(1, int(c)) for c in chunks)
    shapes = level_shapes(shape, levels=levels)
    p = Path(path)
    group = zarr.open_group(str(p), mode="w" if overwrite else "w-", zarr_format=3)
    nc = len(channels)
    codec = ZstdCodec(level=ZSTD_LEVEL)
    for k, (h, w) in enumerate(shapes):
        if kind == "labels":
            group.create_array(str(k), shape=(h, w), chunks=(cy, cx), compressors=codec,
                               dtype=dtype, fill_value=fill_value, dimension_names=("y", "x"))
        else:
            group.create_array(str(k), shape=(nc, h, w), chunks=(nc, cy, cx), compressors=codec,
                               dtype=dtype, fill_value=fill_value,
                               dimension_names=("c", "y", "x"))
    ms: dict[str, Any] = {
        "name": name or p.name,
        "axes": _axes(kind, mpp),
        "datasets": _datasets(kind, mpp, len(shapes)),
        "type": "2x2 stride (nearest)" if kind == "labels" else "2x2 mean",
    }
    ome: dict[str, Any] = {"version": NGFF_VERSION, "multiscales": [ms]}
    if kind == "labels":
        label: dict[str, Any] = {"version": NGFF_VERSION}
        if label_colors:
            label["colors"] = list(label_colors)
        if label_properties:
            label["properties"] = list(label_properties)
        if source_image:
            label["source"] = {"image": source_image}
        ome["image-label"] = label
    else:
        ome["omero"] = _omero(kind, channels, dtype, colors, windows)
    group.attrs.update({"ome": ome, "daskpath": {"kind": kind, "mpp": mpp, **(attrs or {})}})
    return p


def create_labels(path: PathLike, shape: Sequence[int], *, chunks: Sequence[int],
                  mpp: float | None = None, dtype: Any = np.int32,
                  colors: list[dict[str, Any]] | None = None,
                  properties: list[dict[str, Any]] | None = None,
                  attrs: dict[str, Any] | None = None) -> Path:
    """Create a label image at ``path`` (levels as its image, ``image-label`` metadata).

    When ``path`` is ``<image>/labels/<name>`` and ``<image>`` is an NGFF image, the label
    image is registered in ``<image>/labels`` (``source.image = "../../"``) and takes the
    image's pixel size and number of levels (``mpp`` is then ignored). Otherwise it is a
    standalone label image (its image is not a zarr, e.g. the user's slide file): set ``mpp``
    here or later with :func:`set_mpp`.
    """
    p = Path(path)
    parent = p.parent.parent
    if p.parent.name == "labels" and is_ngff(parent):
        return add_labels(parent, p.name, chunks=chunks, dtype=dtype, colors=colors,
                          properties=properties, attrs=attrs)
    return create_image(p, shape, kind="labels", chunks=chunks, mpp=mpp, dtype=dtype,
                        label_colors=colors, label_properties=properties, attrs=attrs)


def add_labels(image: PathLike, name: str, *, chunks: Sequence[int] | None = None,
               dtype: Any = np.int32, colors: list[dict[str, Any]] | None = None,
               properties: list[dict[str, Any]] | None = None,
               attrs: dict[str, Any] | None = None) -> Path:
    """Create the label image ``<image>/labels/<name>`` of an NGFF image and register it.

    Same level shapes and scales as the image (its ``y, x`` axes), chunks as its level 0
    unless given; ``source.image = "../../"``. An existing label of that name is replaced.

    Returns
    -------
    pathlib.Path
        The label image's path.
    """
    import zarr

    img = Path(image)
    g = _open_group(img, "r")
    ome = dict(g.attrs).get("ome", {})
    if "multiscales" not in ome:
        raise SlideError(f"{img} is not an OME-NGFF image (no multiscales): cannot add labels")
    l0 = g[ome["multiscales"][0]["datasets"][0]["path"]]
    shape, ch = l0.shape[-2:], chunks or l0.chunks[-2:]
    mpp = _level0_mpp(ome)
    n = len(ome["multiscales"][0]["datasets"])
    lpath = img / "labels" / name
    create_image(lpath, shape, kind="labels", chunks=ch, mpp=mpp, dtype=dtype, levels=n,
                 name=name, label_colors=colors, label_properties=properties,
                 source_image="../../", attrs=attrs)
    lg = zarr.open_group(str(img / "labels"), mode="a", zarr_format=3)
    lome = dict(lg.attrs).get("ome", {})
    names = [x for x in lome.get("labels", []) if x != name] + [name]
    # ome-zarr-py's write_label_metadata omits the 0.5 "version" here; the spec requires it
    lg.attrs.update({"ome": {"version": NGFF_VERSION, "labels": names}})
    return lpath


def _level0_mpp(ome: dict[str, Any]) -> float | None:
    ms = ome["multiscales"][0]
    axes = ms.get("axes", [])
    names = [a["name"] if isinstance(a, dict) else a for a in axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    if "y" not in names or units[names.index("y")] != UNIT:
        return None
    for tr in ms["datasets"][0].get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            return float(tr["scale"][names.index("y")])
    return None


def set_mpp(path: PathLike, mpp: float | None) -> None:
    """Set the pixel size of an NGFF image (scales of every level and the axis units)."""
    g = _open_group(path, "r+")
    attrs = dict(g.attrs)
    ome = attrs["ome"]
    ms = ome["multiscales"][0]
    kind: Kind = "labels" if "image-label" in ome else attrs.get("daskpath", {}).get("kind", "rgb")
    ms["axes"] = _axes(kind, mpp)
    ms["datasets"] = _datasets(kind, mpp, len(ms["datasets"]))
    own = dict(attrs.get("daskpath", {}))
    own["mpp"] = mpp
    g.attrs.update({"ome": ome, "daskpath": own})


def open_level(path: PathLike, level: int = 0, mode: str = "r") -> zarr.Array:
    """The zarr array of pyramid ``level`` of the NGFF image at ``path``.

    Opened for writing, an image array (with a channel axis) writes chunks equal to the fill
    value too (``write_empty_chunks``; see the module docstring).
    """
    import zarr

    g = _open_group(path, "r")
    ome = dict(g.attrs).get("ome", {})
    try:
        component = ome["multiscales"][0]["datasets"][level]["path"]
    except (KeyError, IndexError):
        raise SlideError(f"{path} has no OME-NGFF level {level}: see `daskpath info {path}`"
                         ) from None
    arr = zarr.open_array(str(Path(path) / component), mode=mode)  # type: ignore[arg-type]
    if mode != "r" and arr.ndim == 3:
        arr = arr.with_config({"write_empty_chunks": True})
    return arr


def write_region(path: PathLike, y0: int, x0: int, block: np.ndarray, *,
                 channel_last: bool = False) -> None:
    """Write ``block`` into level 0 of ``path`` at ``(y0, x0)``.

    ``block`` is ``(c, h, w)`` (``(h, w, c)`` with ``channel_last``) for an image, ``(h, w)``
    for a label image. Write whole chunks from one task each (the caller's chunk grid):
    zarr does not lock chunks shared by two writers.
    """
    arr = open_level(path, 0, mode="r+")
    if arr.ndim == 2:
        arr[y0:y0 + block.shape[0], x0:x0 + block.shape[1]] = block
        return
    if channel_last:  # a contiguous copy: zarr copies a strided view ~10x slower
        block = np.ascontiguousarray(np.moveaxis(block, -1, 0))
    arr[:, y0:y0 + block.shape[1], x0:x0 + block.shape[2]] = block


def mean2x2_u8(block: np.ndarray, *, channel_last: bool = False) -> np.ndarray:
    """2x2 mean, rounded half up (``(a + b + c + d + 2) // 4``), of a uint8 block of even height
    and width: ``(..., y, x)``, or ``(y, x, c)`` with ``channel_last``.

    OpenCV's ``INTER_AREA`` resize by exactly 1/2 computes this sum in integers; ~15x faster
    than the four strided NumPy adds (equality tested in tests/test_ome.py).
    """
    import cv2

    yx = block.shape[:2] if channel_last else block.shape[-2:]
    if 0 in yx:  # OpenCV refuses an empty image
        half = (yx[0] // 2, yx[1] // 2)
        return np.zeros(half + block.shape[2:] if channel_last else block.shape[:-2] + half,
                        np.uint8)
    if channel_last and block.ndim == 3 and block.shape[2] > 4:  # cv2 takes at most 4 channels
        return np.stack([mean2x2_u8(block[..., k]) for k in range(block.shape[2])], axis=-1)
    if channel_last or block.ndim == 2:
        h, w = block.shape[:2]
        out = cv2.resize(np.ascontiguousarray(block), (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        return out.reshape((h // 2, w // 2) + block.shape[2:])
    # (..., y, x): the leading planes stacked as rows; y is even, so no 2x2 cell spans two planes
    h, w = block.shape[-2:]
    flat = np.ascontiguousarray(block).reshape(-1, w)
    out = cv2.resize(flat, (w // 2, flat.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return out.reshape(block.shape[:-2] + (h // 2, w // 2))


def _down(block: np.ndarray, kind: str) -> np.ndarray:
    """One pyramid step of a block whose last two axes are (y, x)."""
    if kind == "labels":
        return block[..., ::2, ::2]
    h, w = block.shape[-2:]
    if h % 2 or w % 2:
        pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
        block = np.pad(block, pad, mode="edge")
    if block.dtype.kind == "f":
        s = block[..., 0::2, 0::2].astype(np.float32)
        s += block[..., 1::2, 0::2]
        s += block[..., 0::2, 1::2]
        s += block[..., 1::2, 1::2]
        s *= 0.25
        return s.astype(block.dtype, copy=False)
    if block.dtype == np.uint8:
        return mean2x2_u8(block)
    wide = np.int64
    s = block[..., 0::2, 0::2].astype(wide)
    s += block[..., 1::2, 0::2]
    s += block[..., 0::2, 1::2]
    s += block[..., 1::2, 1::2]
    s += 2
    s //= 4
    return s.astype(block.dtype)


#: Columns of a pyramid task, in chunks of the level it writes (bounds a task's memory: a
#: 1024-px chunk grid reads 2048 x 16384 px of the level below).
PYRAMID_TASK_CHUNKS = 8


def build_pyramid(path: PathLike, *, compute: bool = True) -> Delayed | None:
    """Fill levels 1..n of the NGFF image at ``path`` from its level 0.

    Level ``k + 1`` is computed from level ``k`` (2x2 mean; stride for label images). One task
    writes one row of chunks of a level, up to :data:`PYRAMID_TASK_CHUNKS` chunks wide (whole
    chunks, so no lock is needed), from the rows of the level below that the tasks of that
    level wrote before it (its dependencies); level 0 is read once. Run it after level 0 is
    complete. The pixels are those of halving the whole level at once (the blocks are
    even-aligned; an odd last row or column is edge-padded, as :func:`_down` does).

    Parameters
    ----------
    path : str or os.PathLike
        An image made by :func:`create_image` (or any NGFF 0.5 image with halving levels).
    compute : bool
        ``False``: return the :class:`dask.delayed.Delayed` that writes the levels (submit it
        to a cluster); ``True``: compute it with the current scheduler and return ``None``.
    """
    import dask

    g = _open_group(path, "r")
    attrs = dict(g.attrs)
    ome = attrs["ome"]
    kind = "labels" if "image-label" in ome else attrs.get("daskpath", {}).get("kind", "rgb")
    comps = [d["path"] for d in ome["multiscales"][0]["datasets"]]
    arrays = [open_level(path, k, mode="r") for k in range(len(comps))]
    if len(arrays) == 1:
        return None if compute else dask.delayed(None)
    fn = dask.delayed(_pyramid_block, pure=False)
    prev: dict[tuple[int, int], Any] = {}  # (row, column) origin -> task, level below
    prev_grid: tuple[int, int] = (0, 0)  # its task grid (rows, columns per task)
    parts = []
    for k in range(1, len(arrays)):
        src, dst = arrays[k - 1], arrays[k]
        (hs, ws), (h, w) = src.shape[-2:], dst.shape[-2:]
        if (h, w) != ((hs + 1) // 2, (ws + 1) // 2):  # pragma: no cover - create_image
            raise SlideError(f"{path}: pyramid level shape {dst.shape} does not halve "
                             f"{src.shape}: recreate the image with daskpath.ome.create_image")
        cy, cx = dst.chunks[-2:]
        gx = cx * PYRAMID_TASK_CHUNKS
        cur = {}
        for y0 in range(0, h, cy):
            for x0 in range(0, w, gx):
                y1, x1 = min(y0 + cy, h), min(x0 + gx, w)
                sy0, sy1, sx0, sx1 = 2 * y0, min(2 * y1, hs), 2 * x0, min(2 * x1, ws)
                deps = [] if k == 1 else [
                    t for (ry, rx), t in prev.items()
                    if ry < sy1 and ry + prev_grid[0] > sy0 and rx < sx1 and rx + prev_grid[1] > sx0]
                cur[(y0, x0)] = fn(str(path), k, (y0, y1, x0, x1), kind, deps)
        parts += list(cur.values())
        prev, prev_grid = cur, (cy, gx)
    out = dask.delayed(_done, pure=False)(parts)
    if compute:
        out.compute()
        return None
    return out


def _pyramid_block(path: str, level: int, region: tuple[int, int, int, int], kind: str,
                   _deps: Any) -> None:
    """Task body of :func:`build_pyramid`: ``region`` (y0, y1, x0, x1) of ``level`` from the
    level below (its 2x larger region, read once)."""
    y0, y1, x0, x1 = region
    src = open_level(path, level - 1)
    hs, ws = src.shape[-2:]
    lead = (slice(None),) * (src.ndim - 2)
    block = np.asarray(src[lead + (slice(2 * y0, min(2 * y1, hs)), slice(2 * x0, min(2 * x1, ws)))])
    out = _down(block, kind)
    if out.shape[-2:] != (y1 - y0, x1 - x0):  # pragma: no cover - shapes halve by construction
        raise SlideError(f"{path}: pyramid block {out.shape} for region {region} of level {level}")
    open_level(path, level, mode="r+")[lead + (slice(y0, y1), slice(x0, x1))] = out


def _stored(arrays: Any) -> Delayed:
    """One Delayed depending on every chunk of ``da.store(..., compute=False)``'s result.

    (``da.store`` returns arrays of ``None`` chunks here, not the documented Delayed.)
    """
    import dask
    import dask.array as da

    if isinstance(arrays, da.Array):
        arrays = [arrays]
    parts = [d for a in arrays for d in a.to_delayed(optimize_graph=False).ravel()]
    return dask.delayed(_done, pure=False)(parts)


def _done(_: Any) -> None:
    return None


def write_image(path: PathLike, data: Any, *, kind: Kind = "rgb", mpp: float | None = None,
                channels: Sequence[str] | None = None, chunks: Sequence[int] | None = None,
                channel_last: bool = False, compute: bool = True,
                **kwargs: Any) -> Delayed | Path:
    """Write an array (NumPy or dask) as a complete NGFF image with its pyramid.

    Parameters
    ----------
    path : str or os.PathLike
        The image group (replaced).
    data : array-like
        ``(c, y, x)`` (or ``(y, x, c)`` with ``channel_last``) for ``"rgb"``/``"float"``,
        ``(y, x)`` for ``"labels"``.
    kind, mpp, channels : see :func:`create_image`
    chunks : (int, int), optional
        Default: the dask chunks of ``data`` when it is a dask array, else 1024.
    compute : bool
        ``False``: create the arrays now and return a Delayed that writes level 0 and then
        the pyramid.
    **kwargs
        Passed to :func:`create_image` (``name``, ``attrs``, ``colors``, ...).
    """
    import dask
    import dask.array as da

    arr = data if isinstance(data, da.Array) else None
    if arr is None:
        data = np.asarray(data)
    if kind != "labels" and channel_last:
        data = data.transpose(2, 0, 1) if arr is None else arr.transpose(2, 0, 1)
        arr = data if isinstance(data, da.Array) else None
    if data.ndim != (2 if kind == "labels" else 3):
        raise InvalidInputError(f"write_image(kind={kind!r}) needs a "
                                f"{'(y, x)' if kind == 'labels' else '(c, y, x)'} array, got "
                                f"shape {data.shape}")
    if chunks is None:
        chunks = (arr.chunks[-2][0], arr.chunks[-1][0]) if arr is not None else (1024, 1024)
    if kind == "float" and channels is None:
        channels = [f"c{i}" for i in range(data.shape[0])]
    p = create_image(path, data.shape[-2:], kind=kind, mpp=mpp, channels=channels,
                     chunks=chunks, dtype=data.dtype, **kwargs)
    z0 = open_level(p, 0, mode="r+")
    if arr is None:
        z0[...] = data
        pyr = build_pyramid(p, compute=compute)
        return p if compute else pyr  # type: ignore[return-value]
    store = _stored(da.store(arr.rechunk(z0.chunks), z0, lock=False, compute=False))
    task = dask.delayed(pyramid_after, pure=False)(store, str(p))
    if compute:
        task.compute()
        return p
    return task


def pyramid_after(_deps: Any, path: str) -> str:
    """Task body: :func:`build_pyramid` of ``path`` once ``_deps`` (level-0 writes) are done.

    The pyramid is computed inside this one task, serially (``scheduler="sync"``: no nested
    cluster client in a worker); use ``build_pyramid(compute=False)`` to spread a large
    pyramid over a cluster instead.
    """
    task = build_pyramid(path, compute=False)
    if task is not None:
        task.compute(scheduler="sync")
    return path


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def is_ngff(path: PathLike) -> bool:
    """Whether ``path`` is a zarr group with OME-NGFF ``multiscales`` metadata (0.4 or 0.5)."""
    p = Path(path)
    if not (p / "zarr.json").is_file() and not (p / ".zattrs").is_file():
        return False
    try:
        return "multiscales" in _ome_attrs(_open_group(p, "r"))
    except SlideError:
        return False


def _ome_attrs(group: zarr.Group) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return dict(attrs["ome"]) if isinstance(attrs.get("ome"), dict) else attrs


def read_image(path: PathLike, level: int = 0, *, channel_last: bool = True) -> np.ndarray:
    """Pixels of one level of an NGFF image as NumPy (``(y, x, c)`` by default)."""
    arr = np.asarray(open_level(path, level)[...])
    return np.moveaxis(arr, 0, -1) if channel_last and arr.ndim == 3 else arr


def describe(path: PathLike, *, _depth: int = 0) -> dict[str, Any]:
    """What an OME-Zarr store holds, from its metadata (no pixels read).

    Returns
    -------
    dict
        ``path``, ``ngff`` (bool), ``version``, ``kind`` (``"image"``, ``"label image"``,
        ``"labels"`` group or ``"group"``), ``name``, ``axes`` (``[(name, type, unit)]``),
        ``unit`` (``"micrometer"`` or ``None``), ``mpp`` (level-0 um/px or ``None``),
        ``levels`` (``[{path, shape, chunks, dtype, scale}]``), ``channels`` (omero labels),
        ``labels`` (names), ``children`` (descriptions of NGFF images in sub-groups, e.g.
        ``thumbnails/he``), ``daskpath`` (daskpath's own attrs) and ``notes`` (problems, e.g.
        unknown pixel size or non-NGFF axis order).
    """
    p = Path(path)
    g = _open_group(p, "r")
    attrs = dict(g.attrs)
    ome = _ome_attrs(g)
    out: dict[str, Any] = {"path": str(p), "ngff": False, "version": None, "kind": "group",
                           "name": None, "axes": [], "unit": None, "mpp": None, "levels": [],
                           "channels": [], "labels": [], "children": [],
                           "daskpath": attrs.get("daskpath", {}), "notes": []}
    if "labels" in ome and "multiscales" not in ome:
        out.update(ngff=True, kind="labels", version=ome.get("version"),
                   labels=list(ome["labels"]))
    if "multiscales" in ome:
        ms = ome["multiscales"][0]
        version = ome.get("version") or ms.get("version")
        axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
        names = [a["name"] for a in axes]
        out.update(ngff=True, version=version, name=ms.get("name"),
                   kind="label image" if "image-label" in ome else "image",
                   axes=[(a["name"], a.get("type"), a.get("unit")) for a in axes])
        units = {a.get("unit") for a in axes if a.get("type") == "space"}
        out["unit"] = units.pop() if len(units) == 1 else None
        for ds in ms["datasets"]:
            scale = None
            for tr in ds.get("coordinateTransformations", []):
                if tr.get("type") == "scale":
                    scale = [float(s) for s in tr["scale"]]
            try:
                a = g[ds["path"]]
                shape, chunks, dtype = tuple(a.shape), tuple(a.chunks), str(a.dtype)
            except Exception:  # noqa: BLE001 - report, do not fail
                shape = chunks = dtype = None
                out["notes"].append(f"level {ds['path']!r} is missing or unreadable")
            out["levels"].append({"path": ds["path"], "shape": shape, "chunks": chunks,
                                  "dtype": dtype, "scale": scale})
        if out["unit"] == UNIT and "y" in names and out["levels"][0]["scale"]:
            out["mpp"] = out["levels"][0]["scale"][names.index("y")]
        elif out["unit"] is None:
            out["notes"].append("pixel size unknown: space axes have no unit, scale is in "
                                "pixels (1.0 at level 0)")
        if names[-2:] != ["y", "x"]:
            out["notes"].append(f"axes {names} are not NGFF order (space axes last): "
                                "re-ingest with `daskpath ingest`")
        chans = ome.get("omero", {}).get("channels", [])
        out["channels"] = [c.get("label") for c in chans]
        if "labels" in ome:
            out["labels"] = list(ome["labels"])
        lg = p / "labels"
        if (lg / "zarr.json").is_file() or (lg / ".zattrs").is_file():
            out["labels"] = list(_ome_attrs(_open_group(lg, "r")).get("labels", []))
    if _depth < 2:
        for key in sorted(g.group_keys()):
            if key == "labels" and out["kind"] == "image":
                for lname in out["labels"]:
                    if (p / "labels" / lname).exists():
                        out["children"].append(describe(p / "labels" / lname, _depth=_depth + 1))
                continue
            if out["kind"] == "labels" and key in out["labels"]:
                out["children"].append(describe(p / key, _depth=_depth + 1))
                continue
            sub = describe(p / key, _depth=_depth + 1)
            if sub["ngff"]:
                out["children"].append(sub)
            else:
                out["children"].extend(sub["children"])
    if not out["ngff"] and _depth == 0 and not out["children"]:
        out["notes"].append("not OME-NGFF: no multiscales metadata (ome-zarr-py's Reader finds "
                            "no image here)")
    return out


def format_description(d: dict[str, Any], indent: str = "") -> list[str]:
    """Human-readable lines of a :func:`describe` result (``daskpath info``)."""
    lines = []
    if d["ngff"] and d["kind"] == "labels":
        lines.append(f"{indent}{d['path']}: OME-NGFF {d['version']} labels group "
                     f"({', '.join(d['labels'])})")
    elif d["ngff"]:
        axes = ", ".join(n for n, _, _ in d["axes"])
        if d["mpp"]:
            size = f"{d['mpp']:.4g} um/px at level 0"
        else:
            size = "pixel size unknown (scale in pixels)"
        lines.append(f"{indent}{d['path']}: OME-NGFF {d['version']} {d['kind']} "
                     f"{d['name']!r}, axes ({axes}), {size}, {len(d['levels'])} level(s)")
        for lv in d["levels"]:
            lines.append(f"{indent}  level {lv['path']}: shape {lv['shape']} chunks "
                         f"{lv['chunks']} {lv['dtype']} scale {lv['scale']}")
        if d["channels"]:
            lines.append(f"{indent}  channels: {', '.join(map(str, d['channels']))}")
        if d["labels"]:
            lines.append(f"{indent}  labels: {', '.join(d['labels'])}")
    else:
        lines.append(f"{indent}{d['path']}: zarr group, not an OME-NGFF image")
    own = d.get("daskpath") or {}
    if own.get("source"):
        ident = own.get("source_identity") or {}
        size = f", {ident['size']} bytes" if ident.get("size") is not None else ""
        lines.append(f"{indent}  ingested from {own['source']}{size}"
                     f"{'' if ident else ' (no source identity: not reused by runs)'}")
    for note in d["notes"]:
        lines.append(f"{indent}  note: {note}")
    for child in d["children"]:
        lines.extend(format_description(child, indent + "  "))
    return lines
