"""Shared plumbing of the baselines: model folders, input checks, per-process model cache.

Nothing here imports torch or scikit-learn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daskpath._process_cache import cached  # noqa: F401 - re-exported for the baselines
from daskpath.errors import InvalidInputError, ModelError, ModelNotFoundError
from daskpath.metrics import BINS, ratio_class  # the 3-class bins of metrics.json

__all__ = [
    "SPEC_NAME",
    "MODELS_DIR",
    "SHIPPED",
    "TILE_COLUMNS",
    "BINS",
    "ratio_class",
    "resolve_model",
    "read_spec",
    "write_spec",
    "as_rgb_dask",
    "check_tiles",
    "cached",
    "task_threads",
]

#: JSON spec beside the weights in every model folder.
SPEC_NAME = "daskpath.json"
#: Folder of the models shipped inside the package.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
#: Shipped models: kind -> name -> folder.
SHIPPED: dict[str, dict[str, Path]] = {
    "rf": {"phantom": MODELS_DIR / "rf_phantom"},
    "classifier": {"phantom": MODELS_DIR / "classifier_phantom"},
}
#: Columns a tile table must have.
TILE_COLUMNS = ("y0", "x0", "height", "width")

_TRAIN_CMD = {
    "rf": "python -m daskpath.baselines.rf OUT_DIR",
    "classifier": "python -m daskpath.baselines.classifier OUT_DIR",
}


def resolve_model(kind: str, model: str | os.PathLike[str]) -> Path:
    """The model folder for ``model``: a shipped name (``"phantom"``) or a folder path.

    Raises
    ------
    ModelNotFoundError
        The name is not shipped and no such folder exists.
    ModelError
        The folder has no spec.
    """
    shipped = SHIPPED[kind]
    if isinstance(model, str) and model in shipped:
        folder = shipped[model]
    else:
        folder = Path(model).expanduser()
    if not folder.is_dir():
        names = ", ".join(repr(n) for n in shipped)
        raise ModelNotFoundError(
            f"{kind} model {str(model)!r}: no such folder; use a shipped name ({names}) or a "
            f"folder written by `{_TRAIN_CMD[kind]}`"
        )
    if not (folder / SPEC_NAME).is_file():
        raise ModelError(
            f"{folder}: no {SPEC_NAME} in the {kind} model folder; point to a folder written by "
            f"`{_TRAIN_CMD[kind]}`"
        )
    return folder.resolve()


def read_spec(folder: Path, kind: str) -> dict[str, Any]:
    """The JSON spec of a model folder, checked to be of ``kind``."""
    path = folder / SPEC_NAME
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable spec ({e}); restore the file or retrain") from None
    if not isinstance(spec, dict) or spec.get("kind") != kind:
        got = spec.get("kind") if isinstance(spec, dict) else None
        raise ModelError(
            f"{path}: kind={got!r} but a {kind!r} model is needed; point to a folder written by "
            f"`{_TRAIN_CMD[kind]}`"
        )
    w = spec.get("weights")
    if isinstance(w, str):
        try:
            (folder / w).resolve().relative_to(folder.resolve())
        except ValueError:
            raise ModelError(f"{path}: weights {w!r} points outside the model folder; name a "
                             f"file inside {folder}") from None
    return spec


def write_spec(folder: Path, spec: dict[str, Any]) -> Path:
    """Write ``spec`` as ``folder/daskpath.json`` atomically."""
    path = folder / SPEC_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def as_rgb_dask(he: Any, name: str = "he"):
    """A ``(y, x, 3)`` uint8 dask array from a dask / numpy array or an xarray DataArray.

    Raises
    ------
    InvalidInputError
        Wrong dtype or shape (one line naming the value and the fix).
    """
    import dask.array as da

    data = getattr(he, "data", he) if type(he).__module__.startswith("xarray") else he
    if not hasattr(data, "dtype") or not hasattr(data, "shape"):
        raise InvalidInputError(f"{name}: got {type(he).__name__}; pass a (y, x, 3) uint8 dask or numpy array")
    if data.dtype != np.uint8:
        raise InvalidInputError(
            f"{name}: dtype {data.dtype} is not supported; pass RGB uint8 (0-255), e.g. "
            f"daskpath.open_slide(path).data or (img * 255).astype('uint8')"
        )
    if data.ndim != 3 or data.shape[2] != 3:
        raise InvalidInputError(f"{name}: shape {tuple(data.shape)} is not (y, x, 3) RGB; drop alpha or "
                                "pass a colour image")
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(2048, 2048, 3))
    if data.chunks[2] != (3,):
        data = data.rechunk({2: 3})
    return data


def check_tiles(tiles: Any, shape: Sequence[int]):
    """A copy of ``tiles`` (a DataFrame with ``y0, x0, height, width``) checked against ``shape``.

    Raises
    ------
    InvalidInputError
        Missing columns, non-integer or empty tiles, or tiles outside the image.
    """
    import pandas as pd

    if not isinstance(tiles, pd.DataFrame):
        raise InvalidInputError(f"tiles: got {type(tiles).__name__}; pass a DataFrame with columns "
                                f"{', '.join(TILE_COLUMNS)} (e.g. daskpath.tiles.tile_grid(shape, 1024))")
    missing = [c for c in TILE_COLUMNS if c not in tiles.columns]
    if missing:
        raise InvalidInputError(f"tiles: column {missing[0]!r} is missing; a tile table needs "
                                f"{', '.join(TILE_COLUMNS)} (see daskpath.tiles.tile_grid)")
    out = tiles.copy()
    for c in TILE_COLUMNS:
        v = out[c].to_numpy()
        if not np.issubdtype(v.dtype, np.integer):
            if not (np.issubdtype(v.dtype, np.floating) and np.all(np.isfinite(v)) and np.all(v == np.round(v))):
                raise InvalidInputError(f"tiles: column {c!r} must hold integers (pixels), got {v.dtype}")
        out[c] = v.astype(np.int64)
    h, w = int(shape[0]), int(shape[1])
    y0, x0 = out["y0"].to_numpy(), out["x0"].to_numpy()
    th, tw = out["height"].to_numpy(), out["width"].to_numpy()
    bad = (th <= 0) | (tw <= 0) | (y0 < 0) | (x0 < 0) | (y0 + th > h) | (x0 + tw > w)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidInputError(
            f"tiles: row {i} (y0={y0[i]}, x0={x0[i]}, height={th[i]}, width={tw[i]}) is empty or "
            f"outside the {h} x {w} image; build tiles with daskpath.tiles.tile_grid(image shape, size)"
        )
    return out


def task_threads(requested: int | None = None) -> int | None:
    """Intra-op torch threads for a model task, so that dask threads x torch threads <= cores.

    The translation stage's rule (:func:`daskpath.translate.inference._task_threads`): the
    request, then ``DASKPATH_TORCH_THREADS``, then the host's cores shared among the dask
    threads of every worker process on the host; ``None`` in the main thread.
    """
    from daskpath.translate.inference import _task_threads

    return _task_threads(requested)
