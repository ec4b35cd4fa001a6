"""Resumable per-chunk work: each chunk's result is recorded on disk as it finishes.

A stage wraps each chunk task with :func:`recorded`: the task writes its result to a record
file under a temporary name and renames it when complete, so a record that exists is finished
work (the explicit done-record: zarr's "chunk exists" is not, since zarr 3 skips all-fill
chunks). On a rerun, finished chunks are loaded instead of recomputed and their inputs are not
even read (the graph is culled), so an interrupted run recomputes no more than the chunks that
were in flight. :func:`count_records` tells how many chunk tasks a graph has and how many of
them load a record.

The record folder should name everything the result depends on: the run loop puts it in the
stage's fingerprinted work folder (see :mod:`daskpath.publish`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import dask
import numpy as np

__all__ = ["chunk_grid", "count_records", "load_record", "recorded"]

#: key prefixes of the tasks :func:`recorded` makes (loading a record / computing and recording)
LOAD_PREFIX = "load-"
RECORD_PREFIX = "record-"


def chunk_grid(chunks: tuple[tuple[int, ...], ...]) -> list[tuple[int, int, int, int, int, int]]:
    """``(iy, ix, y0, y1, x0, x1)`` of every chunk of a 2-D (or 2-D + channel) chunking."""
    ys = np.concatenate([[0], np.cumsum(chunks[0])]).astype(int)
    xs = np.concatenate([[0], np.cumsum(chunks[1])]).astype(int)
    return [
        (iy, ix, int(ys[iy]), int(ys[iy + 1]), int(xs[ix]), int(xs[ix + 1]))
        for iy in range(len(chunks[0]))
        for ix in range(len(chunks[1]))
    ]


_ARRAY = "__array__"


def load_record(path: str | Path) -> Any:
    """Load a chunk record: ``.npz`` -> dict of arrays or one array (no pickle), ``.parquet`` ->
    DataFrame."""
    path = str(path)
    if path.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path)
    with np.load(path, allow_pickle=False) as z:
        if z.files == [_ARRAY]:
            return z[_ARRAY]
        return {k: z[k] for k in z.files}


def _save(result: Any, tmp: str, kind: str) -> None:
    if kind == "parquet":
        result.to_parquet(tmp, index=False)
    elif isinstance(result, np.ndarray):
        with open(tmp, "wb") as f:
            np.savez(f, **{_ARRAY: result})
    else:
        with open(tmp, "wb") as f:
            np.savez(f, **result)


def _record(result: Any, path: str, kind: str) -> Any:
    """Save ``result`` to ``path`` atomically (temp name + rename) and return it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}-{threading.get_ident()}"
    try:
        _save(result, tmp, kind)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


def recorded(task: Any, path: str | Path, kind: str = "npz") -> tuple[Any, bool]:
    """Wrap a Delayed so its result is recorded at ``path``; load the record if it exists.

    Returns ``(delayed, done)``: ``done`` is True when the record existed (the returned
    Delayed loads it and ``task``'s graph is dropped, inputs included). ``kind`` is ``"npz"``
    (a dict of arrays or one array) or ``"parquet"`` (a DataFrame).
    """
    path = Path(path)
    if path.exists():
        return dask.delayed(load_record, pure=True)(str(path), dask_key_name=f"{LOAD_PREFIX}{_tok(path)}"), True
    key = f"{RECORD_PREFIX}{_tok(path)}-{dask.base.tokenize(task)}"
    return dask.delayed(_record, pure=True)(task, str(path), kind, dask_key_name=key), False


def count_records(collection: Any) -> tuple[int, int]:
    """``(total, done)``: chunk tasks made by :func:`recorded` in ``collection``'s graph, and
    how many of them load a record of an earlier run."""
    keys = [k[0] if isinstance(k, tuple) else k for k in collection.__dask_graph__()]
    keys = [k for k in keys if isinstance(k, str)]
    done = sum(k.startswith(LOAD_PREFIX) for k in keys)
    return done + sum(k.startswith(RECORD_PREFIX) for k in keys), done


def _tok(path: Path) -> str:
    return hashlib.md5(str(path).encode()).hexdigest()[:12]
