"""xarray in, xarray out: the public array functions take what ``open_slide`` / ``open_pair`` give.

:func:`as_dask` turns a ``DataArray`` (or a dask / NumPy array) into the dask array the kernels
work on and remembers the DataArray; :func:`like` wraps a kernel's lazy result back into a
``DataArray`` with the input's spatial coordinates (``y``, ``x``, ``y_um``, ``x_um``) and attrs
(``mpp``, ...). Plain arrays stay plain (a dask array in, a dask array out), so code written
against dask arrays keeps working. xarray is imported only when the caller passed xarray.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from daskpath.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da
    import xarray as xr

__all__ = ["as_dask", "like"]


def _is_xarray(obj: Any, kind: str) -> bool:
    xr = sys.modules.get("xarray")  # not imported: obj cannot be an xarray object
    return xr is not None and isinstance(obj, getattr(xr, kind))


def as_dask(obj: Any, what: str, ndim: int = 3) -> tuple[da.Array, xr.DataArray | None]:
    """The dask array behind ``obj`` and, when ``obj`` is a DataArray, ``obj`` itself.

    Parameters
    ----------
    obj : xarray.DataArray, dask.array.Array or array-like
        A DataArray's spatial dims are its first two (``y, x``), a channel dim last.
    what : str
        Name used in error messages (``"tissue_mask: rgb"``).
    ndim : int
        Expected number of dims (3 for ``(y, x, c)`` RGB).

    Raises
    ------
    InvalidInputError
        A Dataset (pass one variable, e.g. ``ds.he``) or the wrong number of dims.
    """
    import dask.array as da

    if _is_xarray(obj, "Dataset"):
        names = ", ".join(f"ds.{v}" for v in obj.data_vars) or "a variable"
        raise InvalidInputError(f"{what}: got an xarray.Dataset; pass one of its variables "
                                f"({names})")
    template = obj if _is_xarray(obj, "DataArray") else None
    data = obj.data if template is not None else obj
    if not isinstance(data, da.Array):
        data = da.asarray(data)
    if data.ndim != ndim:
        dims = f" with dims {template.dims}" if template is not None else ""
        want = "(y, x, 3) RGB" if ndim == 3 else f"{ndim} dims"
        raise InvalidInputError(f"{what}: expected {want}, got shape {data.shape}{dims}; drop "
                                "alpha or stack gray into 3 channels")
    return data, template


def like(result: da.Array, template: xr.DataArray | None, name: str,
         channels: bool = False) -> da.Array | xr.DataArray:
    """``result`` as a DataArray on ``template``'s grid, or ``result`` when there is none.

    The DataArray has ``template``'s spatial dims and every coordinate that lives on them
    (``y``, ``x``, ``y_um``, ``x_um``), plus its channel dim and coords when ``channels``; its
    attrs are a copy of ``template``'s (``mpp``, ``path``, ...). ``encoding`` (the slide
    reader) is not carried over: the result is not the slide.
    """
    if template is None:
        return result
    import xarray as xr

    dims = tuple(template.dims[: result.ndim]) if channels else tuple(template.dims[:2])
    coords = {k: v for k, v in template.coords.items() if set(v.dims) <= set(dims)}
    return xr.DataArray(result, dims=dims, coords=coords, attrs=dict(template.attrs), name=name)
