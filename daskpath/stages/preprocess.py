"""Stage ``preprocess``: tissue masks, SSIM map and the tile table of a slide pair.

Per chunk, a read task (:func:`read_chunk`) decodes the chunk of both slides once (exactly the
file tiles under it) and cuts the halo strips its neighbours need; the chunk's kernel task
(:func:`preprocess_halo`, on the worker holding the decoded chunk) assembles its halo'd block
from them and runs :func:`chunk_kernel`: the tissue masks and the SSIM map with the same block
kernels as the public :func:`daskpath.tissue.tissue_mask` / :func:`daskpath.similarity.ssim_map`,
the artefact QC, per-tile partial sums and its region of the downsampled layers. Reading each
chunk with its own halo (:func:`preprocess_chunk`, still used by :func:`daskpath.tile_table`)
gives the same block but decodes a ring of neighbouring JPEG tiles for a 16-px halo: ~3x the
decode of an 8192² slide in 2048-px chunks. A chunk row is read only once the kernels two
rows above are done, so about three chunk rows of pixels are held at a time. Each finished
chunk is recorded in the stage's work folder, so an interrupted run resumes chunk by chunk.

The layers are OME-NGFF 0.5 images (:mod:`daskpath.ome`): ``layers/<slide>.zarr`` holds the
channels ``tissue_he, tissue_ihc, ssim`` (axes ``c, y, x``, 1/``layers.downsample``
resolution, micrometre scale) and ``layers/<slide>.zarr/thumbnails/{he,ihc}`` the RGB
thumbnails. Chunk tasks write level 0; the pyramids are built once level 0 is complete.

The keep rule (``tiles.min_tissue``, ``ssim.threshold``) is applied when the tables are
assembled, so changing a threshold recomputes nothing here.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daskpath.publish import Artefact
from daskpath.stages import SlideContext, Stage

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    import pandas as pd

__all__ = [
    "PreprocessStage",
    "SlidePlan",
    "TILE_COLUMNS",
    "keep_mask",
    "preprocess_chunk",
    "summarize_slide",
    "tiles_from_sums",
]

TILE_COLUMNS = [
    "slide",
    "y0",
    "x0",
    "height",
    "width",
    "tissue_fraction",
    "tissue_fraction_he",
    "tissue_fraction_ihc",
    "ssim",
    "ssim_rigid",
    "dy",
    "dx",
    "registered",
    "qc_pen",
    "qc_bubble",
    "qc_fold",
    "qc_blur",
    "artefact",
    "keep",
]
"""Columns of the tile table after preprocessing. ``ssim`` is the SSIM on the refined
alignment where registration refined it (``registered``), else ``ssim_rigid`` (the two
sections at the same coordinates); ``dy, dx`` are the estimated residual shift (px: the tissue
at H&E ``(y, x)`` lies at IHC ``(y + dy, x + dx)``), NaN where no estimate was made (tissue
below ``registration.min_tissue``, no signal, a sliver at the slide edge); an estimate beyond
``registration.max_shift`` or one that does not raise the SSIM is reported but not used
(``registered`` false). ``qc_<kind>`` is the share of the tile flagged as that artefact
in either section (:mod:`daskpath.qc`; NaN with ``qc.enabled: false``) and ``artefact`` the
kinds above ``qc.max_fraction`` ('' when none); with ``qc.exclude`` those tiles are not kept."""

QC_COLUMNS = ("qc_pen", "qc_bubble", "qc_fold", "qc_blur")
"""Per-tile artefact fractions, in the order of :data:`daskpath.qc.ARTEFACT_KINDS`."""

REGISTER_BATCH = 8
"""Tiles per registration task (each reads 2 x 8 tiles plus margins: ~60 MB at 1024 px)."""

THUMBNAIL_SIDE = 1024
"""Longest side (px) of the RGB thumbnails stored with the layers (for the report)."""

LAYER_CHANNELS = ("tissue_he", "tissue_ihc", "ssim")
"""Channels of the layers image ``layers/<slide>.zarr`` (NGFF ``c`` axis, in this order)."""


def keep_mask(tissue_fraction, ssim, cfg, artefact=None):
    """The keep rule: enough tissue in both sections, SSIM at least ``ssim.threshold`` and, with
    ``qc.exclude``, no artefact (``artefact``: the tiles' artefact labels, '' for none)."""
    keep = (tissue_fraction >= cfg.tiles.min_tissue) & (ssim >= cfg.ssim.threshold)
    if artefact is not None and cfg.qc.exclude:
        keep = keep & (np.asarray(artefact, dtype=object) == "")
    return keep


def artefact_labels(tiles: pd.DataFrame, cfg) -> np.ndarray:
    """Per tile the artefact kinds whose flagged share exceeds ``qc.max_fraction``, comma-joined
    ('' for none; tiles without QC columns or with NaN fractions have none)."""
    n = len(tiles)
    out = np.full(n, "", dtype=object)
    for col in QC_COLUMNS:
        if col not in tiles:
            continue
        hit = np.nan_to_num(tiles[col].to_numpy(np.float64), nan=0.0) > cfg.qc.max_fraction
        kind = col.removeprefix("qc_")
        out[hit] = [f"{a},{kind}" if a else kind for a in out[hit]]
    return out


def tile_keep(tiles: pd.DataFrame, cfg) -> np.ndarray:
    """The keep rule applied to a tile table (its ``tissue_fraction``, ``ssim`` and QC columns)."""
    return np.asarray(keep_mask(tiles["tissue_fraction"], tiles["ssim"], cfg,
                                artefact_labels(tiles, cfg)), dtype=bool)


@dataclass
class SlidePlan:
    """The lazy preprocessing work of one slide pair (see :func:`daskpath.pipeline.plan_preprocess`)."""

    slide: str
    shape: tuple[int, int]
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    mpp: float | None
    tile: int
    work_dir: Path | None = None
    layer_tmp: Path | None = None
    n_done: int = 0  # chunks already recorded by an earlier (interrupted) run
    tasks: list = field(default_factory=list)  # (loc, Delayed) per chunk

    @property
    def n_chunks(self) -> int:
        return len(self.chunks[0]) * len(self.chunks[1])

    @property
    def sums(self) -> Any:
        """Delayed per-tile sums (n_ty, n_tx, 3): H&E tissue, IHC tissue, SSIM."""
        import dask

        return dask.delayed(combine_sums, pure=True)(
            [t for _, t in self.tasks], *_tile_shape(self.shape, self.tile), 3
        )


def preprocess_chunk(
    *,
    loc: tuple[int, int, int, int],
    he_src,
    ihc_src,
    shape: tuple[int, int],
    tile: int,
    tissue_threshold: float,
    tissue_sigma: float,
    ssim_sigma: float,
    ssim_dtype: str,
    layers: str | None,
    factor: int,
    step: int,
    qc: bool = False,
) -> dict[str, np.ndarray]:
    """All preprocessing of one chunk in one task, reading its own halo.

    Reads the chunk of both slides plus a halo of ``max(tissue radius, SSIM radius)`` px (and
    of :func:`daskpath.qc.qc_radius` with ``qc``), computes the tissue masks and the SSIM map
    on the halo'd block with the filters' own border rule at the true slide edge, keeps the
    core (equal to the whole-image computation, since the halo covers every filter radius),
    reduces it to per-tile partial sums, and writes its region of the layers. With ``qc``, the
    artefact masks (:func:`daskpath.qc.artefact_block`, both sections) add their per-tile sums
    (:data:`QC_COLUMNS`).

    The stage itself does not read halos this way (a halo of 16 px decodes a whole ring of
    neighbouring JPEG tiles): its graph reads each chunk once (:func:`read_chunk`) and hands
    the halo strips to the neighbours (:func:`preprocess_halo`); both run :func:`chunk_kernel`
    on the same pixels.
    """
    from daskpath._halo import read_with_halo

    d = _halo_depth(tissue_sigma, ssim_sigma, qc)
    he, core = read_with_halo(he_src, loc, shape, d)
    ihc, _ = read_with_halo(ihc_src, loc, shape, d)
    return chunk_kernel(he, ihc, core, loc=loc, tile=tile, tissue_threshold=tissue_threshold,
                        tissue_sigma=tissue_sigma, ssim_sigma=ssim_sigma, ssim_dtype=ssim_dtype,
                        layers=layers, factor=factor, step=step, qc=qc)


def _halo_depth(tissue_sigma: float, ssim_sigma: float, qc: bool) -> int:
    """Halo (px) a chunk task reads: the widest filter support of its kernels."""
    from daskpath.similarity import ssim_radius
    from daskpath.tissue import tissue_radius

    d = max(ssim_radius(ssim_sigma), tissue_radius(tissue_sigma) if tissue_sigma > 0 else 0)
    if qc:
        from daskpath.qc import qc_radius

        d = max(d, qc_radius())
    return d


def chunk_kernel(
    he: np.ndarray,
    ihc: np.ndarray,
    core: tuple[slice, slice],
    *,
    loc: tuple[int, int, int, int],
    tile: int,
    tissue_threshold: float,
    tissue_sigma: float,
    ssim_sigma: float,
    ssim_dtype: str,
    layers: str | None,
    factor: int,
    step: int,
    qc: bool = False,
) -> dict[str, np.ndarray]:
    """The per-chunk work on halo'd blocks ``he``, ``ihc`` (halo :func:`_halo_depth`, clipped at
    the slide edge; ``block[core]`` is the chunk ``loc``): tissue masks, SSIM map, QC masks,
    per-tile sums and layer writes. Returns ``{"sums", "origin"}`` (see :func:`combine_sums`)."""
    from daskpath.monitor import count
    from daskpath.similarity import gray, ssim_block, ssim_radius
    from daskpath.tiles import chunk_tile_sums
    from daskpath.tissue import tissue_block, tissue_radius

    y0, y1, x0, x1 = loc
    d = max(ssim_radius(ssim_sigma), tissue_radius(tissue_sigma) if tissue_sigma > 0 else 0)
    qc_maps: list[np.ndarray] = []
    if qc:
        from daskpath.qc import ARTEFACT_BITS, ARTEFACT_KINDS, artefact_block

        origin = (y0 - core[0].start, x0 - core[1].start)
        bits = artefact_block(he, origin)[core] | artefact_block(ihc, origin)[core]
        # bool maps: summed as integer counts (the same float64 sums as float32 ones, 2x faster)
        qc_maps = [(bits & ARTEFACT_BITS[k]) > 0 for k in ARTEFACT_KINDS]
    he, core_d = _narrow_halo(he, core, d)
    ihc, _ = _narrow_halo(ihc, core, d)
    t_he = tissue_block(he, tissue_threshold, tissue_sigma)[core_d]
    t_ihc = tissue_block(ihc, tissue_threshold, tissue_sigma)[core_d]
    wdt = np.dtype(ssim_dtype).type
    ssim = ssim_block(gray(he, wdt), gray(ihc, wdt), sigma=ssim_sigma)[core_d]
    he, ihc = he[core_d], ihc[core_d]
    sums, (ty, tx) = chunk_tile_sums([t_he, t_ihc, ssim, *qc_maps], loc, tile)
    count("chunks_processed")
    count("pixels_processed", float(t_he.size))
    # each tile counted once: by the chunk holding its top-left corner
    count("tiles_processed", len(range(-(-y0 // tile) * tile, y1, tile)) * len(range(-(-x0 // tile) * tile, x1, tile)))
    if layers is not None:
        _write_layers(layers, loc, factor, step, t_he, t_ihc, ssim, he, ihc)
    return {"sums": sums, "origin": np.array([ty, tx], dtype=np.int64)}


# --------------------------------------------------------------------------------------------
# the stage's graph: each chunk decoded once, halo strips passed to the neighbours
# --------------------------------------------------------------------------------------------
_SIDES = ("top", "bottom", "left", "right")
"""Halo strips a chunk hands its neighbours: its first / last ``depth`` rows (full width) and
columns (full height). Diagonal neighbours take their corner out of a ``top`` / ``bottom``."""


_READ_AHEAD = 2
"""A chunk row is read once the kernels of the row this many rows above are done: the
decoded chunks held at a time stay about three chunk rows, whatever the slide's height
(the kernels of a row need the rows above and below read, so 1 would deadlock)."""


def _row_done(*_parts: Any) -> None:
    """Token: the chunk kernels given are done (orders the reads of a later row after them)."""


def read_chunk(*, loc: tuple[int, int, int, int], he_src, ihc_src, depth: int,
               sides: tuple[str, ...], after: Any = None) -> dict[str, Any]:
    """Decode chunk ``loc`` of both slides once (no halo: exactly the file tiles under it).

    ``after`` is an ordering token (see :data:`_READ_AHEAD`), not used.

    Returns ``{"he", "ihc"}`` (the chunk) and, per side in ``sides``, a copy of its outer
    ``depth`` rows / columns of both slides, stacked (``(2, h, w, 3)``): the halo its
    neighbours need (:func:`preprocess_halo`). Copies, so a strip held by a neighbour's task
    does not keep the whole chunk in memory.
    """
    y0, y1, x0, x1 = loc
    he = read_region(he_src, y0, y1, x0, x1)
    ihc = read_region(ihc_src, y0, y1, x0, x1)
    out: dict[str, Any] = {"he": he, "ihc": ihc}
    cut = {"top": np.s_[:depth], "bottom": np.s_[max(0, he.shape[0] - depth):],
           "left": np.s_[:, :depth], "right": np.s_[:, max(0, he.shape[1] - depth):]}
    for side in sides:
        out[side] = np.stack([he[cut[side]], ihc[cut[side]]])
    return out


_TIFF_FILES: dict[tuple[str, int, int], Any] = {}
_TIFF_LOCK = threading.Lock()


def _tiff_level(src: Any) -> Any:
    """``(TiffFile, page, lock)`` of a :class:`daskpath.io.TiffLevelReader` whose tiles can be
    decoded one by one (tiled, contiguous RGB(A) uint8, the reader's shape), opened once per
    process; None for anything else (then the reader reads)."""
    from daskpath.io import TiffLevelReader

    if type(src) is not TiffLevelReader or src.axes not in ("YXS", "YXC"):
        return None
    key = (src.path, src.mtime_ns, src.level)
    with _TIFF_LOCK:
        if key in _TIFF_FILES:
            return _TIFF_FILES[key]
        hit = None
        try:
            import tifffile

            if os.stat(src.path).st_mtime_ns == src.mtime_ns:
                tf = tifffile.TiffFile(src.path)
                page = tf.series[0].levels[src.level].keyframe
                ok = (page.is_tiled and page.planarconfig == 1 and page.imagedepth == 1
                      and page.samplesperpixel in (3, 4) and page.dtype == np.uint8
                      and page.shape[:2] == tuple(src.shape[:2])
                      and all(page.databytecounts))
                hit = (tf, page, threading.Lock()) if ok else None
                if hit is None:
                    tf.close()
        except Exception:  # noqa: BLE001 - the reader reads (and reports) instead
            hit = None
        _TIFF_FILES[key] = hit
        return hit


def read_region(src: Any, y0: int, y1: int, x0: int, x1: int,
                tiles: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """``src[y0:y1, x0:x1]`` as ``(h, w, 3)`` uint8.

    For a tiled TIFF level (:class:`daskpath.io.TiffLevelReader`) the tiles are decoded here,
    one ``TiffPage.decode`` per tile straight into the output (the same decoder as the
    reader's zarr store, so the same pixels, without its per-read overhead: ~35 % less CPU
    per decoded pixel). ``tiles``, when given, keeps the decoded tiles by index across calls
    (overlapping reads decode each tile once). Anything else, or any failure, goes through
    ``src[ys, xs]`` (whose errors name the file and the fix). An ingested (zarr) slide read
    with ``tiles`` is assembled from whole zarr chunks, kept in ``tiles`` the same way.
    """
    fast = _tiff_level(src)
    grid = _zarr_level(src) if fast is None and tiles is not None else None
    if (fast is None and grid is None) or y0 >= y1 or x0 >= x1:
        return np.asarray(src[slice(y0, y1), slice(x0, x1)])
    if grid is not None:  # an ingested slide: whole zarr chunks through the reader
        h, w, ch, cw = grid
        return _assemble(y0, y1, x0, x1, (ch, cw), -(-w // cw), tiles, lambda by, bx, _: src[
            slice(by * ch, min(h, (by + 1) * ch)), slice(bx * cw, min(w, (bx + 1) * cw))])
    tf, page, lock = fast
    fh = tf.filehandle

    def decode(_by: int, _bx: int, idx: int) -> np.ndarray:
        with lock:
            fh.seek(page.dataoffsets[idx])
            data = fh.read(page.databytecounts[idx])
        tile = page.decode(data, idx, jpegtables=page.jpegtables)[0]
        return tile.reshape(tile.shape[-3:])

    try:
        return _assemble(y0, y1, x0, x1, (page.tilelength, page.tilewidth),
                         -(-page.imagewidth // page.tilewidth), tiles, decode)
    except Exception:  # noqa: BLE001 - the reader reads again and names the problem
        return np.asarray(src[slice(y0, y1), slice(x0, x1)])


def _assemble(y0: int, y1: int, x0: int, x1: int, block: tuple[int, int], across: int,
              cache: dict[int, np.ndarray] | None,
              read: Callable[[int, int, int], np.ndarray]) -> np.ndarray:
    """``[y0:y1, x0:x1]`` as ``(h, w, 3)`` uint8 from a grid of ``block``-sized blocks
    (``across`` per row): ``read(by, bx, index)`` gives block ``(by, bx)`` (its first 3
    channels are used), kept in ``cache`` by index when given, so overlapping reads read
    each block once."""
    bh, bw = block
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    for by in range(y0 // bh, -(-y1 // bh)):
        for bx in range(x0 // bw, -(-x1 // bw)):
            idx = by * across + bx
            blk = cache.get(idx) if cache is not None else None
            if blk is None:
                blk = read(by, bx, idx)
                if cache is not None:
                    cache[idx] = blk
            ya, yb = max(y0, by * bh), min(y1, (by + 1) * bh)
            xa, xb = max(x0, bx * bw), min(x1, (bx + 1) * bw)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = blk[
                ya - by * bh : yb - by * bh, xa - bx * bw : xb - bx * bw, :3]
    return out


def _zarr_level(src: Any) -> tuple[int, int, int, int] | None:
    """``(height, width, chunk height, chunk width)`` of a :class:`daskpath.io.ZarrLevelReader`
    (an ingested slide); None for anything else or an unreadable array (then it reads)."""
    from daskpath.io import ZarrLevelReader, _cached_zarr_array

    if type(src) is not ZarrLevelReader:
        return None
    try:
        arr = _cached_zarr_array(src.path, src.component)
        if src.axes == "YXS":
            (h, w), (ch, cw) = arr.shape[:2], arr.chunks[:2]
        else:
            (h, w), (ch, cw) = arr.shape[1:3], arr.chunks[1:3]
    except Exception:  # noqa: BLE001 - the reader reads again and names the problem
        return None
    return int(h), int(w), int(ch), int(cw)


def preprocess_halo(
    *,
    loc: tuple[int, int, int, int],
    chunk: dict[str, Any],
    strips: dict[str, np.ndarray],
    shape: tuple[int, int],
    depth: int,
    **kw: Any,
) -> dict[str, np.ndarray]:
    """:func:`chunk_kernel` on chunk ``loc`` with its halo assembled from the neighbours' strips.

    ``chunk`` is :func:`read_chunk`'s result for ``loc``; ``strips`` maps a neighbour's
    position (``"n", "s", "w", "e", "nw", "ne", "sw", "se"``, absent at the slide edge) to the
    strip :func:`read_chunk` made for it (``n``: its ``bottom``; ``nw``: its ``bottom``, whose
    last ``depth`` columns are the corner; ...). The block is the one
    :func:`daskpath._halo.read_with_halo` would read (``depth`` px, clipped to the slide), so
    the result equals :func:`preprocess_chunk`'s bit for bit.
    """
    y0, y1, x0, x1 = loc
    h, w = shape
    ya, yb = max(0, y0 - depth), min(h, y1 + depth)
    xa, xb = max(0, x0 - depth), min(w, x1 + depth)
    top, bot, lef, rig = y0 - ya, yb - y1, x0 - xa, xb - x1
    he = np.empty((yb - ya, xb - xa, 3), np.uint8)
    ihc = np.empty_like(he)
    rows = (("n", 0, top), ("", top, top + y1 - y0), ("s", top + y1 - y0, top + y1 - y0 + bot))
    cols = (("w", 0, lef), ("", lef, lef + x1 - x0), ("e", lef + x1 - x0, lef + x1 - x0 + rig))
    # the part of a neighbour's strip this block needs (rows from a n / s neighbour's bottom /
    # top strip, columns from a w / e neighbour's right / left strip or a corner)
    cut = {"n": np.s_[:, -top:], "s": np.s_[:, :bot], "w": np.s_[:, :, -lef:], "e": np.s_[:, :, :rig]}
    for ry, ra, rb in rows:
        for cx, ca, cb in cols:
            if ra == rb or ca == cb:
                continue
            if not (ry or cx):
                he[ra:rb, ca:cb], ihc[ra:rb, ca:cb] = chunk["he"], chunk["ihc"]
                continue
            part = strips[ry + cx]
            if ry:
                part = part[cut[ry]]
            if cx:
                part = part[cut[cx]]
            if part.shape[1:3] != (rb - ra, cb - ca):  # pragma: no cover - guards the halo rule
                raise RuntimeError(f"preprocess: halo strip {ry + cx} of chunk {loc} is "
                                   f"{part.shape[1:3]}, expected {(rb - ra, cb - ca)}")
            he[ra:rb, ca:cb], ihc[ra:rb, ca:cb] = part[0], part[1]
    core = (slice(top, top + y1 - y0), slice(lef, lef + x1 - x0))
    return chunk_kernel(he, ihc, core, loc=loc, **kw)


def _strips_work(chunks: tuple[tuple[int, ...], tuple[int, ...]], depth: int) -> bool:
    """Whether every halo lies in the direct neighbours: each chunk but the first and the
    last of an axis is at least ``depth`` px (else :func:`preprocess_chunk` reads its own)."""
    return all(min(c[1:-1], default=depth) >= depth for c in chunks)


def _narrow_halo(block: np.ndarray, core: tuple[slice, slice], d: int
                 ) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The part of a halo'd ``block`` that has at most ``d`` px of halo around ``core`` (as
    :func:`daskpath._halo.read_with_halo` with depth ``d`` would have read it)."""
    ya, xa = max(0, core[0].start - d), max(0, core[1].start - d)
    yb, xb = min(block.shape[0], core[0].stop + d), min(block.shape[1], core[1].stop + d)
    return block[ya:yb, xa:xb], (slice(core[0].start - ya, core[0].stop - ya),
                                 slice(core[1].start - xa, core[1].stop - xa))


def _write_layers(layers: str, loc, factor: int, step: int, t_he, t_ihc, ssim, he, ihc) -> None:
    """Write one chunk's region of level 0 of the layers image (the three channels at once)
    and of the two thumbnails: one zarr chunk of each, owned by this chunk task."""
    from daskpath import ome

    y0, y1, x0, x1 = loc
    if factor and y0 % factor == 0 and x0 % factor == 0:
        arr = ome.open_level(layers, 0, mode="r+")  # (3, h, w) float32
        h, w = (y1 - y0) // factor, (x1 - x0) // factor
        hh = min(h, arr.shape[1] - y0 // factor)
        ww = min(w, arr.shape[2] - x0 // factor)
        if hh > 0 and ww > 0:
            small = np.stack([
                m[: hh * factor, : ww * factor].astype(np.float32)
                .reshape(hh, factor, ww, factor).mean(axis=(1, 3))
                for m in (t_he, t_ihc, ssim)])
            arr[:, y0 // factor : y0 // factor + hh, x0 // factor : x0 // factor + ww] = small
    for name, rgb in (("he", he), ("ihc", ihc)):
        oy, ox = (-y0) % step, (-x0) % step
        small = rgb[oy::step, ox::step]
        ty0, tx0 = -(-y0 // step), -(-x0 // step)
        if small.size:
            ome.write_region(f"{layers}/thumbnails/{name}", ty0, tx0, small, channel_last=True)


def layer_images(layers: Path) -> list[Path]:
    """The NGFF images of a layers folder: the layers image and its two thumbnails."""
    return [Path(layers), Path(layers) / "thumbnails" / "he", Path(layers) / "thumbnails" / "ihc"]


def combine_sums(parts: list[dict[str, np.ndarray]], n_ty: int, n_tx: int, k: int) -> np.ndarray:
    """Add the chunks' per-tile partial sums into one (n_ty, n_tx, k) array."""
    if parts:  # what the chunks computed (3 maps, + 4 with QC)
        k = int(parts[0]["sums"].shape[-1])
    total = np.zeros((n_ty, n_tx, k), dtype=np.float64)
    for p in parts:
        ty, tx = (int(v) for v in p["origin"])
        s = p["sums"]
        total[ty : ty + s.shape[0], tx : tx + s.shape[1]] += s
    return total


def _tile_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    return -(-shape[0] // size), -(-shape[1] // size)


def _create_layers(path: Path, shape, chunks, factor: int, step: int, slide: str, mpp) -> None:
    """Create the layers of a slide as OME-NGFF 0.5 images (see :mod:`daskpath.ome`).

    ``path`` (``layers/<slide>.zarr`` once published) is a float32 image with channels
    :data:`LAYER_CHANNELS` (``c, y, x``) at ``1/factor`` resolution (scale ``mpp * factor``
    um), and ``path/thumbnails/he`` / ``path/thumbnails/ihc`` are RGB images subsampled by
    ``step`` (scale ``mpp * step``), each openable on its own. Level-0 zarr chunks are the slide
    chunks divided by ``factor`` / ``step``, so each chunk task owns whole chunks; the pyramid
    levels are filled after level 0 (:func:`daskpath.ome.build_pyramid`). Never-written
    pixels are NaN (layers) and white (thumbnails).
    """
    import zarr

    from daskpath import ome

    tmp = path.with_name(path.name + ".creating")
    if tmp.exists():
        shutil.rmtree(tmp)
    cy, cx = max(chunks[0]), max(chunks[1])
    h, w = shape[0] // factor, shape[1] // factor
    mpp = float(mpp) if mpp else None
    ome.create_image(
        tmp, (h, w), kind="float", channels=LAYER_CHANNELS,
        chunks=(max(1, cy // factor), max(1, cx // factor)),
        mpp=mpp * factor if mpp else None, name=slide, fill_value=np.nan,
        colors=("FF00FF", "FFA500", "00FF00"),
        windows=((0.0, 1.0), (0.0, 1.0), (-1.0, 1.0, 0.0, 1.0)),  # SSIM: range -1..1, shown 0..1
        attrs={"slide": slide, "downsample": factor, "thumbnail_step": step,
               "slide_mpp": mpp, "layers": list(LAYER_CHANNELS),
               "thumbnails": ["thumbnails/he", "thumbnails/ihc"]},
    )
    zarr.open_group(str(tmp / "thumbnails"), mode="w", zarr_format=3)
    th, tw = -(-shape[0] // step), -(-shape[1] // step)
    for name in ("he", "ihc"):
        ome.create_image(
            tmp / "thumbnails" / name, (th, tw), kind="rgb",
            chunks=(max(1, cy // step), max(1, cx // step)),
            mpp=mpp * step if mpp else None, name=f"{slide} {name.upper()} thumbnail",
            fill_value=255, attrs={"slide": slide, "thumbnail_step": step, "slide_mpp": mpp},
        )
    os.replace(tmp, path)


def tiles_from_sums(slide: str, shape: tuple[int, int], sums: np.ndarray, cfg) -> pd.DataFrame:
    """Tile table of one slide from its per-tile sums (tissue H&E, tissue IHC, SSIM)."""
    import pandas as pd

    from daskpath.tiles import tile_grid

    grid = tile_grid(shape, cfg.tiles.size)
    area = (grid["height"] * grid["width"]).to_numpy(dtype=np.float64)
    flat = sums.reshape(-1, sums.shape[-1])
    t_he = flat[:, 0] / area
    t_ihc = flat[:, 1] / area
    ssim = flat[:, 2] / area
    tissue = np.minimum(t_he, t_ihc)
    nan = np.full(len(grid), np.nan)
    qc = {c: (flat[:, 3 + i] / area if flat.shape[1] > 3 else nan)
          for i, c in enumerate(QC_COLUMNS)}
    df = pd.DataFrame(
        {
            "slide": slide,
            "y0": grid["y0"],
            "x0": grid["x0"],
            "height": grid["height"],
            "width": grid["width"],
            "tissue_fraction": tissue,
            "tissue_fraction_he": t_he,
            "tissue_fraction_ihc": t_ihc,
            "ssim": ssim,
            "ssim_rigid": ssim,
            "dy": nan,
            "dx": nan,
            "registered": np.zeros(len(grid), dtype=bool),
            **qc,
        }
    )
    df["artefact"] = artefact_labels(df, cfg)
    df["keep"] = tile_keep(df, cfg)
    return df[TILE_COLUMNS]


def registration_candidates(tiles: pd.DataFrame, cfg) -> np.ndarray:
    """Row positions of the tiles registration refines (``registration.min_tissue``)."""
    if not cfg.registration.enabled:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(tiles["tissue_fraction"].to_numpy() >= cfg.registration.min_tissue)


def registration_tasks(tiles: pd.DataFrame, cfg, he_src, ihc_src, shape) -> list[tuple[np.ndarray, Any]]:
    """Delayed :func:`daskpath.registration.register_tiles` calls, :data:`REGISTER_BATCH`
    candidate tiles each, with the row positions they cover."""
    import dask

    from daskpath.registration import register_tiles

    idx = registration_candidates(tiles, cfg)
    out = []
    for i in range(0, len(idx), REGISTER_BATCH):
        rows = idx[i : i + REGISTER_BATCH]
        sel = tiles.iloc[rows]
        t = dask.delayed(register_tiles, pure=True)(
            he_src=he_src, ihc_src=ihc_src, shape=shape,
            tiles=[tuple(int(v) for v in r) for r in sel[["y0", "x0", "height", "width"]].to_numpy()],
            rigid_ssim=sel["ssim_rigid"].to_numpy(np.float64).tolist(),
            max_shift=cfg.registration.max_shift, ssim_sigma=cfg.ssim.sigma,
            ssim_dtype=cfg.ssim.dtype)
        out.append((rows, t))
    return out


def apply_registration(tiles: pd.DataFrame, results: list[tuple[np.ndarray, np.ndarray]], cfg
                       ) -> pd.DataFrame:
    """The tile table with the registration results merged in and the keep rule re-applied."""
    tiles = tiles.copy()
    for rows, res in results:
        res = np.asarray(res, dtype=np.float64)
        tiles.iloc[rows, tiles.columns.get_loc("dy")] = res[:, 0]
        tiles.iloc[rows, tiles.columns.get_loc("dx")] = res[:, 1]
        tiles.iloc[rows, tiles.columns.get_loc("ssim")] = res[:, 2]
        tiles.iloc[rows, tiles.columns.get_loc("registered")] = res[:, 3] > 0
    tiles["keep"] = tile_keep(tiles, cfg)
    return tiles


def summarize_slide(tiles: pd.DataFrame, cfg, mpp: float | None) -> dict:
    """One row of ``slides.csv`` from a slide's tile table."""
    tissue_tiles = tiles[tiles["tissue_fraction"] >= cfg.tiles.min_tissue]
    kept = tiles[tiles["keep"]]
    area_px = float((tiles["tissue_fraction"] * tiles["height"] * tiles["width"]).sum())
    row = {
        "slide": tiles["slide"].iloc[0] if len(tiles) else "",
        "height": int((tiles["y0"] + tiles["height"]).max()) if len(tiles) else 0,
        "width": int((tiles["x0"] + tiles["width"]).max()) if len(tiles) else 0,
        "mpp": mpp if mpp else np.nan,
        "tiles_total": len(tiles),
        "tiles_tissue": len(tissue_tiles),
        "tiles_kept": len(kept),
        "mean_ssim_tissue": float(tissue_tiles["ssim"].mean()) if len(tissue_tiles) else np.nan,
        "mean_ssim_kept": float(kept["ssim"].mean()) if len(kept) else np.nan,
        "tissue_area_px": int(round(area_px)),
        "tissue_area_mm2": area_px * (mpp / 1000.0) ** 2 if mpp else np.nan,
        "tiles_registered": int(tiles["registered"].sum()) if "registered" in tiles else 0,
        "tiles_artefact": int((tissue_tiles["artefact"] != "").sum()) if "artefact" in tiles else 0,
        "note": "",
    }
    if area_px <= 0:
        row["note"] = "no tissue found (all background at tissue.threshold)"
    elif not len(tissue_tiles):
        row["note"] = (f"tissue found, but no tile has tissue_fraction >= tiles.min_tissue "
                       f"({cfg.tiles.min_tissue}): lower tiles.min_tissue or tiles.size")
    elif not len(kept) and "artefact" in tiles and (
            tissue_tiles["ssim"] >= cfg.ssim.threshold).any():
        row["note"] = ("every tile with enough tissue and SSIM has an artefact (qc_* columns): "
                       "check the slide, or set qc.exclude: false")
    elif not len(kept):
        row["note"] = "no tile passed ssim.threshold: check the pair is registered"
    return row


class PreprocessStage(Stage):
    """Tissue masks, SSIM map, per-tile table, downsampled layers and thumbnails."""

    name = "preprocess"
    # 2: layers written as OME-NGFF 0.5 images (c, y, x + pyramid + thumbnails/)
    # 3: per-tile registration refinement (ssim_rigid, dy, dx, registered); artefact QC
    version = 3
    config_sections = ("chunk_size", "tiles", "tissue", "ssim", "layers", "registration", "qc")

    def keys(self, cfg) -> dict[str, Any]:
        return {
            "chunk_size": cfg.chunk_size,
            "tiles.size": cfg.tiles.size,
            "tissue.threshold": cfg.tissue.threshold,
            "tissue.sigma": cfg.tissue.sigma,
            "ssim.sigma": cfg.ssim.sigma,
            "ssim.dtype": cfg.ssim.dtype,
            "layers.downsample": cfg.layers.downsample,
            "registration": ([cfg.registration.max_shift, cfg.registration.min_tissue]
                             if cfg.registration.enabled else False),
            "qc.enabled": cfg.qc.enabled,
        }

    def artefacts(self, cfg) -> list[Artefact]:
        return [Artefact("layers.zarr", "layers/{slide}.zarr")] if cfg.layers.downsample else []

    def plan(self, ctx: SlideContext) -> SlidePlan:
        """The chunk tasks of one slide (recorded in ``ctx.work``); nothing is computed."""
        import dask

        from daskpath.io import region_source

        cfg = ctx.cfg
        ds = ctx.pair()
        he_a = ds["he"]
        chunks = (he_a.data.chunks[0], he_a.data.chunks[1])
        mpp = he_a.attrs.get("mpp")
        shape = (int(he_a.shape[0]), int(he_a.shape[1]))
        step = 1 << max(0, int(np.ceil(np.log2(max(shape) / THUMBNAIL_SIDE))))
        f = cfg.layers.downsample
        layers = None
        if f:
            layers = ctx.work / "layers.zarr"
            if not layers.exists():
                _create_layers(layers, shape, chunks, f, step, ctx.slide, mpp)
        kw = dict(
            he_src=region_source(ds["he"]),
            ihc_src=region_source(ds["ihc"]),
            shape=shape,
            tile=cfg.tiles.size,
            tissue_threshold=cfg.tissue.threshold,
            tissue_sigma=cfg.tissue.sigma,
            ssim_sigma=cfg.ssim.sigma,
            ssim_dtype=cfg.ssim.dtype,
            layers=str(layers) if layers is not None else None,
            factor=f,
            step=step,
            qc=cfg.qc.enabled,
        )
        from daskpath.resume import chunk_grid

        before = ctx.counts.get(self.name)
        n_done0 = before.done if before else 0
        tasks = []
        import hashlib

        # unique per work folder: two output folders with one fingerprint are two computations
        fp = hashlib.sha256(str(ctx.work.resolve()).encode()).hexdigest()[:16]
        depth = _halo_depth(cfg.tissue.sigma, cfg.ssim.sigma, cfg.qc.enabled)
        grid = list(chunk_grid(chunks))
        if not _strips_work(chunks, depth):  # a chunk thinner than the halo: each reads its own
            for iy, ix, y0, y1, x0, x1 in grid:
                loc = (y0, y1, x0, x1)
                t = dask.delayed(preprocess_chunk, pure=True)(
                    loc=loc, dask_key_name=f"preprocess-{fp}-{iy}_{ix}", **kw)
                tasks.append((loc, ctx.recorded(t, f"{iy}_{ix}")))
        else:
            tasks = self._strip_graph(ctx, grid, kw, depth, fp)
        return SlidePlan(
            slide=ctx.slide, shape=shape, chunks=chunks, mpp=float(mpp) if mpp else None,
            tile=cfg.tiles.size, work_dir=ctx.work, layer_tmp=layers,
            n_done=ctx.counts[self.name].done - n_done0, tasks=tasks,
        )

    @staticmethod
    def _strip_graph(ctx: SlideContext, grid: list, kw: dict, depth: int, fp: str) -> list:
        """One :func:`read_chunk` task per chunk (each JPEG tile decoded once), one getitem per
        halo strip a neighbour needs, and one recorded :func:`preprocess_halo` task per chunk.

        A chunk's decoded pixels stay on the worker that read them (the kernel task depends on
        them most, so the scheduler puts it there); only the strips (``depth`` px wide) move.
        A recorded chunk drops its kernel task; its read stays in the graph only while a
        neighbour still needs its strips.
        """
        import operator

        import dask

        ny = 1 + max(g[0] for g in grid)
        nx = 1 + max(g[1] for g in grid)
        locs = {(iy, ix): (y0, y1, x0, x1) for iy, ix, y0, y1, x0, x1 in grid}
        # which neighbour takes which of a chunk's strips (position seen from the taker)
        gives = {"n": "bottom", "nw": "bottom", "ne": "bottom", "s": "top", "sw": "top",
                 "se": "top", "w": "right", "e": "left"}
        step = {"n": (-1, 0), "s": (1, 0), "w": (0, -1), "e": (0, 1), "nw": (-1, -1),
                "ne": (-1, 1), "sw": (1, -1), "se": (1, 1)}

        def neighbours(iy, ix):
            for pos, (dy, dx) in step.items():
                jy, jx = iy + dy, ix + dx
                if 0 <= jy < ny and 0 <= jx < nx:
                    yield pos, (jy, jx)

        wanted: dict[tuple[int, int], set[str]] = {k: set() for k in locs}
        for key in locs:
            for pos, nb in neighbours(*key):
                wanted[nb].add(gives[pos])
        kernel_kw = {k: v for k, v in kw.items() if k not in ("he_src", "ihc_src")}
        reads: dict[tuple[int, int], Any] = {}
        strips: dict[tuple[tuple[int, int], str], Any] = {}

        rows_done: dict[int, Any] = {}  # per chunk row: a token once its kernels are done

        def read(key):
            if key not in reads:
                iy, ix = key
                reads[key] = dask.delayed(read_chunk, pure=True)(
                    loc=locs[key], he_src=kw["he_src"], ihc_src=kw["ihc_src"], depth=depth,
                    sides=tuple(s for s in _SIDES if s in wanted[key]),
                    after=rows_done.get(iy - _READ_AHEAD),
                    dask_key_name=f"preprocess-read-{fp}-{iy}_{ix}")
            return reads[key]

        def strip(key, side):
            if (key, side) not in strips:
                iy, ix = key
                strips[key, side] = dask.delayed(operator.getitem, pure=True)(
                    read(key), side, dask_key_name=f"preprocess-halo-{fp}-{iy}_{ix}-{side}")
            return strips[key, side]

        tasks = []
        row: list[Any] = []
        for (iy, ix), loc in locs.items():
            path = ctx.work / "chunks" / f"{iy}_{ix}.npz"
            if not path.exists():  # a recorded chunk needs neither its read nor strips
                nb = {pos: strip(k, gives[pos]) for pos, k in neighbours(iy, ix)}
                t = dask.delayed(preprocess_halo, pure=True)(
                    loc=loc, chunk=read((iy, ix)), strips=nb, depth=depth,
                    dask_key_name=f"preprocess-{fp}-{iy}_{ix}", **kernel_kw)
                row.append(t)
            else:
                t = None
            tasks.append((loc, ctx.recorded(t, f"{iy}_{ix}")))
            if ix == nx - 1:
                if row:
                    rows_done[iy] = dask.delayed(_row_done, pure=True)(
                        *row, dask_key_name=f"preprocess-rowdone-{fp}-{iy}")
                row = []
        return tasks

    def run(self, ctx: SlideContext) -> pd.DataFrame:
        from daskpath import ome

        plan = self.plan(ctx)
        parts = ctx.compute([t for _, t in plan.tasks])
        if plan.layer_tmp is not None:  # level 0 complete: the pyramids (not recorded: cheap)
            ctx.compute([ome.build_pyramid(p, compute=False) for p in layer_images(plan.layer_tmp)])
        sums = combine_sums(parts, *_tile_shape(plan.shape, plan.tile), 3)
        part = tiles_from_sums(ctx.slide, plan.shape, sums, ctx.cfg)
        from daskpath.io import region_source

        ds = ctx.pair()
        reg = registration_tasks(part, ctx.cfg, region_source(ds["he"]), region_source(ds["ihc"]),
                                 plan.shape)
        if reg:  # recorded like chunks: a rerun after an interruption resumes here too
            done = ctx.compute([ctx.recorded(t, f"register_{int(rows[0])}_{len(rows)}")
                                for rows, t in reg])
            part = apply_registration(part, [(rows, r) for (rows, _), r in zip(reg, done)], ctx.cfg)
        part["mpp"] = plan.mpp if plan.mpp else np.nan
        return part

    def tile_columns(self, part, keep, cfg) -> dict[str, Any]:
        cols = {c: part[c].to_numpy() for c in TILE_COLUMNS if c not in ("keep", "artefact")}
        cols["artefact"] = artefact_labels(part, cfg)  # under this run's qc.max_fraction
        cols["keep"] = keep
        return cols

    def summarize(self, part, keep, cfg) -> dict[str, Any]:
        tiles = part.drop(columns=["mpp"], errors="ignore").copy()
        tiles["artefact"] = artefact_labels(part, cfg)
        tiles["keep"] = keep
        mpp = float(part["mpp"].iloc[0]) if len(part) and part["mpp"].notna().any() else None
        return summarize_slide(tiles, cfg, mpp)
