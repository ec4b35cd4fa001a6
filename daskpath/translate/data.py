"""Streaming training data: random crops of tile pairs read on demand from a run's slides.

:class:`TileStream` is a map-style :class:`torch.utils.data.Dataset` over the kept tiles of a
finished run (rows ``slide, y0, x0, height, width`` and, where per-tile registration refined the
alignment, ``dy, dx, registered``). An item is keyed by ``(epoch, index)`` and is a function of
``(seed, epoch, index)`` alone: ``numpy.random.default_rng([seed, epoch, index])`` picks a tile
(uniformly, as :class:`~daskpath.translate.train.PairSampler` does), a crop position inside it,
a 90-degree rotation and a flip (applied to both images alike). Only that crop is read: the H&E
at ``(y0 + cy, x0 + cx)``, the IHC on the tile's refined alignment (moved by ``round(dy),
round(dx)`` when ``registered``, the rule of :mod:`daskpath.translate.tilepairs`; the slide's
edge pixels repeated outside it) -- the same pixels as the same crop of the exported PNG pair.
So a batch does not depend on the number of loader workers, and a resumed run sees what an
uninterrupted one would have.

Slides are opened lazily, once per process, with :func:`daskpath.io.open_pair` and read through
:func:`daskpath.io.region_source` (tiled TIFF through TiffSlide, OME-Zarr through zarr): the
dataset pickles as paths and numbers, never as open files. Memory does not grow with the number
of tiles beyond a few numbers per tile. ``DataLoader`` worker processes start with fresh reader
caches (:func:`worker_init`): a forked worker must not share the parent's open file offsets.

:class:`EpochSampler` yields the ``(epoch, index)`` keys of one epoch; under
``torch.distributed`` rank ``r`` of ``W`` takes indices ``r, r + W, r + 2W, ...`` -- disjoint
samples, whose union is what one process would train on with a ``W`` times larger batch.
:func:`make_loader` puts them together (``persistent_workers``, ``pin_memory`` on CUDA).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from daskpath._halo import read_padded
from daskpath.errors import InvalidInputError

__all__ = ["CropDataset", "TileStream", "EpochSampler", "make_loader", "default_loader_workers",
           "worker_init", "run_tile_stream"]


def default_loader_workers(procs_per_node: int = 1) -> int:
    """``min(4, cores - 1)`` loader worker processes (cores shared by ``procs_per_node`` ranks)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores // max(1, procs_per_node) - 1))


class CropDataset(Dataset):
    """Random crops of image pairs keyed by ``(epoch, index)``; subclasses read the pixels.

    Parameters
    ----------
    sizes : array of shape (n, 2)
        ``(height, width)`` of each pair (A and B alike); every side must be >= ``crop``.
    crop : int
        Side of the square crops.
    seed : int
        Everything random comes from ``default_rng([seed, epoch, index])``.
    paired : bool
        Crop A and B at the same place of the same pair (pix2pix); ``False`` draws B's pair and
        crop apart (CycleGAN).

    An item is ``(a, b, key)``: two ``(crop, crop, 3)`` uint8 arrays and an int64 array
    ``epoch, index, pair_a, y_a, x_a, pair_b, y_b, x_b, k, flip`` (what was drawn).
    """

    def __init__(self, sizes: np.ndarray, crop: int, seed: int = 0, paired: bool = True) -> None:
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        if len(sizes) == 0:
            raise InvalidInputError("training data: no tile pairs to crop from")
        if (sizes < crop).any():
            raise InvalidInputError(f"training data: {int((sizes < crop).any(axis=1).sum())} pair(s) smaller "
                                    f"than crop={crop}; leave them out or lower --crop")
        self.sizes, self.crop, self.seed, self.paired = sizes, int(crop), int(seed), bool(paired)

    def __len__(self) -> int:
        """The number of pairs (items are keyed by ``(epoch, index)``, not by position)."""
        return len(self.sizes)

    def draw(self, epoch: int, index: int) -> np.ndarray:
        """What item ``(epoch, index)`` is: ``pair_a, y_a, x_a, pair_b, y_b, x_b, k, flip``."""
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        c, n = self.crop, len(self.sizes)
        ta = int(rng.integers(n))
        h, w = self.sizes[ta]
        ya, xa = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        if self.paired:
            tb, yb, xb = ta, ya, xa
        else:
            tb = int(rng.integers(n))
            h, w = self.sizes[tb]
            yb, xb = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        k, flip = int(rng.integers(4)), int(rng.integers(2))
        return np.array([ta, ya, xa, tb, yb, xb, k, flip], dtype=np.int64)

    def read(self, pair: int, side: str, y: int, x: int) -> np.ndarray:  # pragma: no cover
        """The ``crop x crop`` window at ``(y, x)`` of pair ``pair``, side ``"a"`` or ``"b"``."""
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epoch, index = key
        d = self.draw(epoch, index)
        a = self.read(int(d[0]), "a", int(d[1]), int(d[2]))
        b = self.read(int(d[3]), "b", int(d[4]), int(d[5]))
        a, b = np.rot90(a, int(d[6])), np.rot90(b, int(d[6]))
        if d[7]:
            a, b = a[:, ::-1], b[:, ::-1]
        return (np.ascontiguousarray(a), np.ascontiguousarray(b),
                np.concatenate([[epoch, index], d]).astype(np.int64))


class TileStream(CropDataset):
    """Crops of a run's tile pairs read from the slides on demand (module docstring).

    Parameters
    ----------
    tiles : pandas.DataFrame
        One row per tile: ``slide, y0, x0, height, width`` and optionally ``dy, dx,
        registered`` (the IHC is moved by ``round(dy), round(dx)`` where ``registered``).
    slides : mapping or pandas.DataFrame
        ``{slide: (he_path, ihc_path)}``, or a manifest (:func:`daskpath.io.read_manifest`).
    crop, seed, paired
        As in :class:`CropDataset`. Tiles smaller than ``crop`` are refused: filter them first.
    chunk_size, cache_dir
        Passed to :func:`daskpath.io.open_pair` (the run's, so flat rasters resolve to the
        OME-Zarr the run ingested).
    check : bool
        Open every slide once here (size, readable), so a bad path fails before training, in
        this process, with a one-line message.
    """

    def __init__(self, tiles: pd.DataFrame, slides: Mapping[str, tuple[str, str]] | pd.DataFrame, *,
                 crop: int, seed: int = 0, paired: bool = True, chunk_size: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, check: bool = True) -> None:
        need = [c for c in ("slide", "y0", "x0", "height", "width") if c not in tiles.columns]
        if need:
            raise InvalidInputError(f"TileStream: tile table lacks column(s) {', '.join(need)}")
        if isinstance(slides, pd.DataFrame):
            slides = {str(s): (str(h), str(i)) for s, h, i in zip(slides["slide"], slides["he"], slides["ihc"])}
        names = list(dict.fromkeys(str(s) for s in tiles["slide"]))
        unknown = [s for s in names if s not in slides]
        if unknown:
            raise InvalidInputError(f"TileStream: slide(s) {', '.join(unknown[:3])} of the tile table are not in "
                                    "the manifest; pass the manifest the run used")
        super().__init__(np.stack([tiles["height"].to_numpy(), tiles["width"].to_numpy()], axis=1), crop,
                         seed, paired)
        self.slide_names = names
        self.paths = [(str(slides[s][0]), str(slides[s][1])) for s in names]
        code = {s: i for i, s in enumerate(names)}
        self.code = np.array([code[str(s)] for s in tiles["slide"]], dtype=np.int32)
        self.y0 = tiles["y0"].to_numpy(np.int64)
        self.x0 = tiles["x0"].to_numpy(np.int64)
        # the IHC window: tilepairs._ihc_tile's rule (rounded dy, dx where registration refined it)
        reg = (tiles["registered"].eq(True).to_numpy() if "registered" in tiles.columns
               else np.zeros(len(tiles), bool))
        self.shift = np.zeros((len(tiles), 2), np.int64)
        if reg.any():
            d = tiles.loc[reg, ["dy", "dx"]].to_numpy(np.float64)
            if not np.isfinite(d).all():
                raise InvalidInputError("TileStream: registered tile(s) without a finite dy, dx; rerun the "
                                        "preprocess stage")
            self.shift[reg] = [[int(round(v)) for v in r] for r in d]
        self.chunk_size = chunk_size
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self._open: dict[int, tuple[Any, Any, tuple[int, int]]] = {}
        self._pid = os.getpid()
        if check:
            for i in range(len(names)):
                self._pair(i)
            self._open = {}  # workers open their own

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}  # readers are reopened in each process
        return state

    def _pair(self, i: int) -> tuple[Any, Any, tuple[int, int]]:
        if self._pid != os.getpid():  # a forked copy: open our own readers
            self._open, self._pid = {}, os.getpid()
        hit = self._open.get(i)
        if hit is None:
            from daskpath.io import open_pair, region_source

            he, ihc = self.paths[i]
            ds = open_pair(he, ihc, chunk_size=self.chunk_size,
                           cache_dir=None if self.cache_dir is None else Path(self.cache_dir))
            hit = (region_source(ds["he"]), region_source(ds["ihc"]),
                   (int(ds["he"].shape[0]), int(ds["he"].shape[1])))
            self._open[i] = hit
        return hit

    def read(self, pair: int, side: str, y: int, x: int) -> np.ndarray:
        he, ihc, shape = self._pair(int(self.code[pair]))
        y, x = int(self.y0[pair]) + y, int(self.x0[pair]) + x
        if side == "a":
            return read_padded(he, y, y + self.crop, x, x + self.crop, shape)
        sy, sx = self.shift[pair]
        y, x = y + int(sy), x + int(sx)
        return read_padded(ihc, y, y + self.crop, x, x + self.crop, shape)

    def tile(self, pair: int) -> tuple[str, int, int]:
        """``(slide, y0, x0)`` of pair ``pair``."""
        return self.slide_names[self.code[pair]], int(self.y0[pair]), int(self.x0[pair])


def run_tile_stream(table: pd.DataFrame, manifest: str | os.PathLike[str], *, crop: int, seed: int = 0,
                    paired: bool = True, split: str | None = "train", chunk_size: int | None = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> TileStream:
    """A :class:`TileStream` over the rows of an export table (``pairs.csv``) of ``split``.

    Tiles smaller than ``crop`` are left out (the caller warns); raises when none is left.
    """
    from daskpath.io import read_manifest

    rows = table if split is None else table[table["split"] == split]
    rows = rows[(rows["height"] >= crop) & (rows["width"] >= crop)].reset_index(drop=True)
    if rows.empty:
        raise InvalidInputError(f"every {split or ''} tile is smaller than --crop {crop}; lower --crop")
    return TileStream(rows, read_manifest(manifest), crop=crop, seed=seed, paired=paired,
                      chunk_size=chunk_size, cache_dir=cache_dir)


class EpochSampler(Sampler):
    """The ``(epoch, index)`` keys of one epoch, this rank's share.

    Rank ``rank`` of ``world_size`` yields indices ``rank + k * world_size`` for ``k`` in
    ``range(samples)``: ranks never share a sample. Call :meth:`set_epoch` before each epoch
    (the sampler runs in the training process, so this works with ``persistent_workers``).
    """

    def __init__(self, samples: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank {rank} outside world size {world_size}")
        self.samples, self.rank, self.world_size, self.epoch = int(samples), int(rank), int(world_size), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        e, r, w = self.epoch, self.rank, self.world_size
        return iter([(e, r + k * w) for k in range(self.samples)])

    def __len__(self) -> int:
        return self.samples


def worker_init(worker_id: int) -> None:
    """``DataLoader`` ``worker_init_fn``: forget slide readers inherited from a forked parent.

    A forked worker inherits the parent's per-process reader caches (:mod:`daskpath.io`) and
    with them open files whose offset it would share with its siblings: two workers seeking one
    shared descriptor read each other's bytes. The caches are replaced by empty ones (the
    inherited objects are only dropped, which closes this process's copies).
    """
    from daskpath import io

    missing = [n for n in ("_READER_CACHE", "_ZARR_CACHE") if not hasattr(io, n)]
    if missing:  # pragma: no cover - guards a rename in daskpath.io
        raise RuntimeError(f"daskpath.io has no {', '.join(missing)}: update worker_init")
    io._READER_CACHE = collections.OrderedDict()
    io._READER_CACHE_LOCK = threading.Lock()
    io._ZARR_CACHE = {}
    io._ZARR_LOCK = threading.Lock()


def make_loader(dataset: Dataset, batch_size: int, steps_per_epoch: int, *, workers: int = 0,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                seed: int = 0) -> tuple[DataLoader, EpochSampler]:
    """A ``DataLoader`` over ``dataset`` with ``steps_per_epoch`` batches per epoch for this rank.

    Returns the loader and its :class:`EpochSampler` (call ``set_epoch`` before ``iter``).
    Workers are persistent; ``pin_memory`` for a CUDA device. A private generator seeds the
    workers, so creating the loader's iterator does not move torch's global random state.
    """
    if workers < 0:
        raise InvalidInputError(f"loader workers={workers} must be >= 0 (0: read in the training process)")
    sampler = EpochSampler(steps_per_epoch * batch_size, rank, world_size)
    gen = torch.Generator()
    gen.manual_seed(int(seed) * 7919 + int(rank))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=pin_memory,
                        worker_init_fn=worker_init if workers > 0 else None, generator=gen,
                        prefetch_factor=2 if workers > 0 else None)
    return loader, sampler
