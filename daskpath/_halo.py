"""One place for halos and chunk alignment over (y, x) slides.

Every chunked computation whose output pixels depend on a neighbourhood (a Gaussian filter, a
network's receptive field, an object that crosses a chunk border) reads each chunk with a
*halo* of ``depth`` pixels on every side, computes on the halo'd block and keeps the *core*.
The halo rule used throughout daskpath:

* ``depth`` covers the whole support of every kept pixel: a filter's radius
  (:func:`gaussian_radius`), half a network's receptive field, plus the largest object whose
  pixels must all be seen (:func:`halo_depth`). Chained operations add their radii.
* No halo beyond the slide edge (dask's ``boundary="none"``): the block is clipped to the
  slide, so at the true edge a filter applies its *own* border rule (scipy's ``'reflect'``,
  ``'nearest'``, a network's reflection padding), exactly as on the whole image. The core of a
  block is therefore the same computation as the whole image, whatever the chunking.
* Every chunk but the last is a multiple of the kernel's stride (``multiple``) and at least
  ``depth`` px, so a halo comes from one neighbour and windows fall on the whole image's grid
  (:func:`align_chunks`).

Two ways to use it, one code path: :func:`read_with_halo` reads one chunk plus halo from a
picklable region reader (the pipeline's fused per-chunk kernel), :func:`overlap_2d` wraps
:func:`dask.array.map_overlap`-style computations over dask arrays. Both hand the kernel the
halo'd block and keep ``block[core]``.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from daskpath.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da
    from numpy.typing import DTypeLike

__all__ = [
    "RegionReader",
    "align_chunks",
    "ceil_to",
    "gaussian_radius",
    "halo_depth",
    "overlap_2d",
    "read_padded",
    "read_with_halo",
]

Core = tuple[slice, slice]
"""The core of a halo'd block: ``(rows, cols)`` slices into the block's first two axes."""


class RegionReader(Protocol):
    """Anything that returns the pixels of a region as ``reader[ys, xs]`` (slices), e.g. a
    numpy / zarr array or the pipeline's picklable slide reader."""

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# depth
# --------------------------------------------------------------------------------------------
def _int(value: Any, what: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum`` (bools and floats with a fraction refused)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{what} must be an integer, got {value!r}") from None
    if v < minimum:
        raise InvalidInputError(f"{what} must be >= {minimum}, got {v}")
    return int(v)


def ceil_to(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``.

    Examples
    --------
    >>> ceil_to(88, 4), ceil_to(90, 16), ceil_to(0, 8)
    (88, 96, 0)
    """
    m = _int(multiple, "multiple", 1)
    return -(-_int(value, "value") // m) * m


def gaussian_radius(sigma: float, truncate: float = 4.0) -> int:
    """Radius in px of a Gaussian kernel truncated at ``truncate * sigma``.

    The rule of :func:`scipy.ndimage.gaussian_filter` and :func:`skimage.filters.gaussian`:
    ``int(truncate * sigma + 0.5)``. A halo of this depth makes a chunked Gaussian filter equal
    to the whole-image one.

    Parameters
    ----------
    sigma : float
        Standard deviation in px (0: no smoothing, radius 0).
    truncate : float
        Kernel half-width in sigmas (scipy's default 4.0; skimage's SSIM uses 3.5).

    Examples
    --------
    >>> gaussian_radius(1.5, truncate=3.5), gaussian_radius(4.0)
    (5, 16)
    """
    s, t = float(sigma), float(truncate)
    if not (np.isfinite(s) and s >= 0):
        raise InvalidInputError(f"gaussian sigma must be a finite number >= 0, got {sigma!r}")
    if not (np.isfinite(t) and t > 0):
        raise InvalidInputError(f"gaussian truncate must be a finite number > 0, got {truncate!r}")
    return int(t * s + 0.5)


def halo_depth(radius: int = 0, *, receptive_field: int = 0, max_object: int = 0,
               multiple: int = 1) -> int:
    """Halo in px that gives every kept pixel (and every owned object) its whole context.

    ``depth = ceil_to(radius + ceil(receptive_field / 2) + max_object, multiple)``

    Parameters
    ----------
    radius : int
        Per-side context of the operations (a filter's radius, :func:`gaussian_radius`; a
        network's per-side tile overlap). Chained operations add their radii.
    receptive_field : int
        Full width of a network's receptive field (px); half of it (rounded up) is added.
    max_object : int
        Largest object diameter (px) that must lie wholly inside the block when the object is
        owned by the chunk that holds its centroid.
    multiple : int
        Round up to this multiple (a network's stride, so windows stay on its grid).

    Examples
    --------
    >>> halo_depth(receptive_field=175, multiple=4)
    88
    >>> halo_depth(96, max_object=40, multiple=16)
    144
    """
    r = _int(radius, "radius")
    rf = _int(receptive_field, "receptive_field")
    obj = _int(max_object, "max_object")
    return ceil_to(r + -(-rf // 2) + obj, _int(multiple, "multiple", 1))


# --------------------------------------------------------------------------------------------
# chunks
# --------------------------------------------------------------------------------------------
def align_chunks(chunks: Sequence[int] | int, size: int | None = None, *, multiple: int = 1,
                 min_size: int = 0) -> tuple[int, ...]:
    """Chunk sizes along one axis that suit a halo of ``min_size`` px and a stride ``multiple``.

    Rule: every chunk but the last is a multiple of ``multiple`` and at least ``min_size`` px;
    the last is at least ``min_size`` px too unless it is the only one.

    * Chunks that already satisfy it for all but the last are kept (so are their borders).
    * Otherwise the axis is re-gridded into equal chunks of ``max(multiple, ceil_to(min_size,
      multiple), round(median / multiple) * multiple)`` px (the median chunk, rounded to the
      nearest multiple) and a remainder.
    * Then a last chunk thinner than ``min_size`` is merged into its neighbour.

    Parameters
    ----------
    chunks : sequence of int, or int
        The current chunk sizes of the axis, or one nominal chunk size (then ``size`` is
        required and the axis is first cut into ``chunks``-px pieces).
    size : int, optional
        Axis length; must equal ``sum(chunks)`` when ``chunks`` is a sequence.
    multiple : int
        Stride that chunk borders must fall on (``1``: any).
    min_size : int
        Smallest chunk, usually the halo depth: ``map_overlap`` takes a chunk's halo from its
        direct neighbour only, so every neighbour must be at least ``depth`` px.

    Returns
    -------
    tuple of int
        Sums to the axis length.

    Examples
    --------
    >>> align_chunks((100, 100, 100, 5), min_size=16)
    (100, 100, 105)
    >>> align_chunks((97, 97, 97, 97, 15), multiple=4)
    (96, 96, 96, 96, 19)
    >>> align_chunks(1030, 2500, multiple=16, min_size=64)
    (1024, 1024, 452)
    """
    m = _int(multiple, "align_chunks: multiple", 1)
    d = _int(min_size, "align_chunks: min_size")
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        c = _int(chunks, "align_chunks: chunk size", 1)
        if size is None:
            raise InvalidInputError("align_chunks: give the axis length `size` with a nominal chunk size")
        total = _int(size, "align_chunks: size")
        n, r = divmod(total, c)
        cs = (c,) * n + ((r,) if r or not n else ())
    else:
        try:
            cs = tuple(_int(c, "align_chunks: chunk size") for c in chunks)
        except TypeError:
            raise InvalidInputError(f"align_chunks: chunks must be a sequence of int, got {chunks!r}") from None
        if not cs:
            raise InvalidInputError("align_chunks: chunks is empty; an axis has at least one chunk")
        total = sum(cs)
        if size is not None and _int(size, "align_chunks: size") != total:
            raise InvalidInputError(f"align_chunks: chunks {cs} sum to {total}, not to size={size}")
    if any(c % m or c < d for c in cs[:-1]):
        target = max(m, ceil_to(d, m), int(round(np.median(cs) / m)) * m)
        n, r = divmod(total, target)
        cs = (target,) * n + ((r,) if r or not n else ())
    if len(cs) > 1 and cs[-1] < d:  # a thin last chunk joins its neighbour
        cs = cs[:-2] + (cs[-2] + cs[-1],)
    return cs


# --------------------------------------------------------------------------------------------
# one chunk from a reader
# --------------------------------------------------------------------------------------------
def read_with_halo(src: RegionReader, loc: tuple[int, int, int, int], shape: tuple[int, int],
                   depth: int) -> tuple[np.ndarray, Core]:
    """Read chunk ``loc`` plus ``depth`` px of halo, clipped to the slide.

    Parameters
    ----------
    src : RegionReader
        Indexable as ``src[ys, xs]`` with two slices (numpy / zarr array, a picklable reader).
    loc : (y0, y1, x0, x1)
        The chunk (the core) in slide coordinates, half-open.
    shape : (height, width)
        Slide size; the halo stops at its edges (no padding: the kernel applies its own border
        rule there, as on the whole slide).
    depth : int
        Halo in px on each side (>= 0).

    Returns
    -------
    block : ndarray
        ``src[max(0, y0 - depth):min(h, y1 + depth), max(0, x0 - depth):min(w, x1 + depth)]``.
    core : (slice, slice)
        Where the chunk lies inside ``block``: ``block[core]`` is ``src[y0:y1, x0:x1]``, and
        ``kernel(block)[core]`` equals ``kernel(whole slide)[y0:y1, x0:x1]`` when ``depth``
        covers the kernel's support.
    """
    try:
        y0, y1, x0, x1 = (_int(v, "read_with_halo: loc") for v in loc)
        h, w = (_int(v, "read_with_halo: shape") for v in shape)
    except ValueError:
        raise InvalidInputError(f"read_with_halo: loc={loc!r} must be (y0, y1, x0, x1) and "
                                f"shape={shape!r} (height, width), non-negative integers") from None
    d = _int(depth, "read_with_halo: depth")
    if not (y0 <= y1 <= h and x0 <= x1 <= w):
        raise InvalidInputError(f"read_with_halo: chunk {(y0, y1, x0, x1)} is not inside the slide {(h, w)}")
    ya, yb = max(0, y0 - d), min(h, y1 + d)
    xa, xb = max(0, x0 - d), min(w, x1 + d)
    block = src[slice(ya, yb), slice(xa, xb)]
    return block, (slice(y0 - ya, y1 - ya), slice(x0 - xa, x1 - xa))


def read_padded(src: RegionReader, ya: int, yb: int, xa: int, xb: int,
                shape: tuple[int, int]) -> np.ndarray:
    """``src[ya:yb, xa:xb]`` with the slide's edge pixels repeated outside it (NumPy's
    ``"edge"`` padding, also for a window wholly outside the slide): a window moved by a
    registration shift, read at any position."""
    h, w = shape
    ca, cb, cxa, cxb = max(ya, 0), min(yb, h), max(xa, 0), min(xb, w)
    if ca < cb and cxa < cxb:  # overlaps the slide: read the overlap, pad the rest
        block = np.asarray(src[slice(ca, cb), slice(cxa, cxb)])
        pad = [(ca - ya, yb - cb), (cxa - xa, xb - cxb)] + [(0, 0)] * (block.ndim - 2)
        return np.pad(block, pad, mode="edge") if any(map(sum, pad)) else block
    ys = np.clip(np.arange(ya, yb), 0, h - 1)  # wholly outside: the nearest edge pixels
    xs = np.clip(np.arange(xa, xb), 0, w - 1)
    ca, cb, cxa, cxb = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    block = np.asarray(src[slice(ca, cb), slice(cxa, cxb)])
    return block[(ys - ca)[:, None], (xs - cxa)[None, :]]


# --------------------------------------------------------------------------------------------
# dask arrays
# --------------------------------------------------------------------------------------------
class _OnCore:
    """Picklable per-chunk function: run ``func`` on the halo'd blocks, keep the core."""

    def __init__(self, func: Callable[..., np.ndarray], depth: tuple[int, int], shape: tuple[int, int],
                 trim: bool, lifted: tuple[int, ...], out_tail: tuple[int, ...], kwargs: dict[str, Any]
                 ) -> None:
        self.func, self.depth, self.shape, self.trim = func, depth, shape, trim
        self.lifted, self.out_tail, self.kwargs = lifted, out_tail, kwargs

    def __dask_tokenize__(self) -> Any:
        from dask.base import normalize_token

        return normalize_token((type(self).__qualname__, self.func, self.depth, self.shape,
                                self.trim, self.lifted, self.out_tail, self.kwargs))

    def __call__(self, *blocks: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[None]["array-location"][:2]
        (dy, dx), (h, w) = self.depth, self.shape
        top, left = min(dy, y0), min(dx, x0)
        core = (slice(top, top + y1 - y0), slice(left, left + x1 - x0))
        want = (top + y1 - y0 + min(dy, h - y1), left + x1 - x0 + min(dx, w - x1))
        if blocks[0].shape[:2] != want:  # pragma: no cover - guards against a dask change
            raise RuntimeError(f"overlap_2d: halo'd block {blocks[0].shape[:2]} of chunk "
                               f"{(y0, y1, x0, x1)} is not the expected {want}")
        blocks = tuple(b[..., 0] if k in self.lifted else b for k, b in enumerate(blocks))
        if self.trim:
            res = self.func(*blocks, **self.kwargs)
            expect = want
        else:
            res = self.func(*blocks, core=core, **self.kwargs)
            expect = (y1 - y0, x1 - x0)
        expect += self.out_tail
        if getattr(res, "shape", None) != expect:
            name = getattr(self.func, "__name__", type(self.func).__name__)
            what = "the halo'd block, trim=True" if self.trim else "the core only, trim=False"
            raise ValueError(f"overlap_2d: {name} returned shape {getattr(res, 'shape', type(res))} "
                             f"for chunk {(y0, y1, x0, x1)}; expected {expect} ({what})")
        return res[core] if self.trim else res


def overlap_2d(
    func: Callable[..., np.ndarray],
    *arrays: da.Array,
    depth: int,
    dtype: DTypeLike,
    meta: np.ndarray | None = None,
    trim: bool = True,
    name: str | None = None,
    drop_axis: int | None = None,
    channels: int | None = None,
    multiple: int = 1,
    resources: dict[str, float] | None = None,
    **kwargs: Any,
) -> da.Array:
    """Map ``func`` over (y, x) chunks of slides, each chunk with a ``depth``-px halo.

    Halo rule (module docstring): each chunk is handed to ``func`` with ``depth`` px of its
    neighbours on every side, and *no* padding beyond the slide edge (``boundary="none"``), so
    at the edge ``func`` applies its own border rule as on the whole slide. With ``depth`` at
    least the support of ``func`` (:func:`gaussian_radius`, :func:`halo_depth`) the result
    equals ``func`` on the whole slide, whatever the chunking. Chunks are first aligned with
    :func:`align_chunks` (multiples of ``multiple``, at least ``depth`` px), so the output is
    chunked like the first array unless its chunks needed that.

    Parameters
    ----------
    func : callable
        ``trim=True``: ``func(*blocks, **kwargs)`` returns an array whose first two axes are the
        halo'd block's; its core is kept (``func(block)[core]``, as in the pipeline's kernel).
        ``trim=False``: ``func(*blocks, core=core, **kwargs)`` computes and returns the core
        only; ``core`` is ``(rows, cols)`` slices of the core inside the blocks (see
        :func:`read_with_halo`).
    *arrays : dask.array.Array
        ``(y, x)`` or ``(y, x, c)`` arrays of one (y, x) shape; they are rechunked to the first
        one's (aligned) spatial chunks, and the channel axis to one chunk. 2-D and 3-D arrays
        may be mixed (each block keeps its array's axes).
    depth : int
        Halo in px on each side (0: plain ``map_blocks``). Axes with a single chunk get none.
    dtype : dtype
        Output dtype (passed to dask, never guessed by running ``func``).
    meta : ndarray, optional
        Output meta; default an empty numpy array of ``dtype`` and the output's axes.
    trim : bool
        See ``func``.
    name : str, optional
        Output key name (as in :func:`dask.array.map_blocks`, it must be unique to the inputs);
        default ``<func name>-<token of func, inputs, depth and kwargs>``.
    drop_axis : {None, 2, -1}
        Drop the channel axis of 3-D inputs: the output is ``(y, x)``.
    channels : int, optional
        Length of the output's channel axis when the output is 3-D and it differs from the
        first 3-D input's (or when all inputs are 2-D). Default: the output has the first 3-D
        input's channel axis, or is 2-D for 2-D inputs.
    multiple : int
        Stride that chunk borders must fall on (a network's downsampling factor).
    resources : dict, optional
        Dask resource annotation of the per-chunk tasks only (e.g. ``{"GPU": 1}``); the
        rechunk and halo-exchange tasks can run on any worker.
    **kwargs
        Passed to ``func``.

    Returns
    -------
    dask.array.Array
        ``(y, x)`` or ``(y, x, c)``, spatial chunks ``align_chunks(first array's chunks,
        multiple=multiple, min_size=depth)``; one task per chunk.

    Raises
    ------
    InvalidInputError
        (a ``ValueError``) on a bad argument: no arrays, non-dask inputs, wrong number of axes,
        different (y, x) shapes, negative depth, an invalid ``drop_axis`` / ``channels``.
    """
    import dask
    import dask.array as da

    if not callable(func):
        raise InvalidInputError(f"overlap_2d: func must be callable, got {type(func).__name__}")
    if not arrays:
        raise InvalidInputError("overlap_2d: give at least one array")
    for k, a in enumerate(arrays):
        if not isinstance(a, da.Array):
            raise InvalidInputError(f"overlap_2d: array {k} is a {type(a).__name__}, not a dask array; "
                                    "wrap it with dask.array.from_array")
        if a.ndim not in (2, 3):
            raise InvalidInputError(f"overlap_2d: array {k} has shape {a.shape}; expected (y, x) or "
                                    "(y, x, c)")
        if a.shape[:2] != arrays[0].shape[:2]:
            raise InvalidInputError(f"overlap_2d: array {k} is {a.shape[:2]} in (y, x), array 0 is "
                                    f"{arrays[0].shape[:2]}; crop them to a common size")
    d = _int(depth, "overlap_2d: depth")
    m = _int(multiple, "overlap_2d: multiple", 1)
    if not isinstance(trim, bool):
        raise InvalidInputError(f"overlap_2d: trim must be True or False, got {trim!r}")
    if not trim and "core" in kwargs:
        raise InvalidInputError("overlap_2d: 'core' is passed to func by trim=False; rename that keyword")
    has3d = [a.ndim == 3 for a in arrays]
    if drop_axis is not None:
        if drop_axis not in (2, -1) or not any(has3d):
            raise InvalidInputError(f"overlap_2d: drop_axis={drop_axis!r}; only the channel axis "
                                    "(2 or -1) of 3-D inputs can be dropped")
        if channels is not None:
            raise InvalidInputError("overlap_2d: give drop_axis or channels, not both")
    if channels is not None:
        channels = _int(channels, "overlap_2d: channels", 1)
    out3 = channels is not None or (any(has3d) and drop_axis is None)
    out_ndim = 3 if out3 else 2
    if out3:
        first3 = next((a for a in arrays if a.ndim == 3), None)
        nc = channels if channels is not None else first3.shape[2]
    dt = np.dtype(dtype)

    shape = tuple(int(s) for s in arrays[0].shape[:2])
    cy = align_chunks(arrays[0].chunks[0], multiple=m, min_size=d)
    cx = align_chunks(arrays[0].chunks[1], multiple=m, min_size=d)
    dy, dx = (d if len(cy) > 1 else 0), (d if len(cx) > 1 else 0)
    lifted = tuple(k for k, a in enumerate(arrays) if a.ndim == 2) if any(has3d) else ()
    ins = []
    for k, a in enumerate(arrays):
        if k in lifted:
            a = a[..., None]
        a = a.rechunk((cy, cx) + ((-1,) if a.ndim == 3 else ()))
        if dy or dx:
            dep = {0: dy, 1: dx} | ({2: 0} if a.ndim == 3 else {})
            a = da.overlap.overlap(a, depth=dep, boundary="none", allow_rechunk=False)
        ins.append(a)

    if out3:
        out_chunks: tuple = (cy, cx, (nc,))
    else:
        out_chunks = (cy, cx)
    extra: dict[str, Any] = {}
    if any(has3d) and not out3:
        extra["drop_axis"] = 2
    elif not any(has3d) and out3:
        extra["new_axis"] = 2
    if name is not None:
        extra["name"] = name
    else:
        extra["token"] = getattr(func, "__name__", type(func).__name__).strip("_") or "overlap"
    fn = _OnCore(func, (dy, dx), shape, trim, lifted, (nc,) if out3 else (), dict(kwargs))
    with dask.annotate(resources=resources) if resources else contextlib.nullcontext():
        return da.map_blocks(fn, *ins, chunks=out_chunks, dtype=dt,
                             meta=np.empty((0,) * out_ndim, dt) if meta is None else meta, **extra)
