"""Atomic output writing: a failed run never leaves a file that looks complete."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["atomic_path", "format_number", "round_floats", "write_table", "read_table",
           "write_json"]

#: Significant digits of the floats in ``slides.csv`` (SSIM, ratios, mpp, areas): more than
#: any of them is measured to (``0.49797074999999996`` is written ``0.497971``).
CSV_DIGITS = 6


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` (same folder, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as parquet or CSV (by suffix) to a temp name, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise ValueError(f"write_table: unsupported suffix {path.suffix!r} for {path}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def round_floats(df: pd.DataFrame, digits: int = CSV_DIGITS) -> pd.DataFrame:
    """A copy of ``df`` with every float column rounded to ``digits`` significant digits
    (for tables people read: ``slides.csv``); other columns and NaN unchanged."""
    import numpy as np

    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            v = out[col].to_numpy(dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                mag = np.floor(np.log10(np.abs(v)))
            mag = np.where(np.isfinite(mag), mag, 0)
            scale = 10.0 ** (digits - 1 - mag)
            out[col] = np.where(np.isfinite(v) & (v != 0), np.round(v * scale) / scale, v)
    return out


def format_number(v: float) -> str:
    """A float as a person reads it in a printed table: whole numbers without decimals, values
    from 0.01 with 3 decimals, smaller ones with 3 significant digits (``0.000412``)."""
    if math.isnan(v):
        return "NaN"
    a = abs(v)
    if float(v).is_integer() or a >= 1000:
        return f"{v:.0f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.3g}"


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`write_table`."""
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically (indent 2, NaN written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        tmp.write_text(json.dumps(_nan_to_none(obj), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
