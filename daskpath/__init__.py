"""daskpath: Ki67 tumor ratios in whole-slide H&E / IHC pairs, at cluster scale with Dask.

The public names below are imported on first use, so ``import daskpath`` stays light (no
dask, TensorFlow or torch until something needs them). xarray is the currency: what
:func:`open_pair` returns, the functions take::

    import daskpath
    ds = daskpath.open_pair("a_HE.tif", "a_IHC.tif")      # xarray.Dataset: he, ihc (y, x, c)
    mask = daskpath.tissue_mask(ds.he)                     # DataArray (y, x), same coords / mpp
    ssim = daskpath.ssim_map(ds.he, ds.ihc)                # DataArray (y, x)
    tiles = daskpath.tile_table(ds, slide="a")             # the pipeline's tiles.parquet rows
    nuclei = daskpath.measure_nuclei(ds.ihc, region=tiles[tiles.keep])
    virtual = daskpath.translate.translate(ds.he)          # DataArray (y, x, c): virtual IHC
    result = daskpath.run(daskpath.load_config("my.yaml")) # the whole pipeline

Submodules (``daskpath.tiles``, ``daskpath.io``, ``daskpath.translate``, ``daskpath.baselines``,
...) are imported on first attribute access too, so ``daskpath.tiles.tile_grid`` works after a
plain ``import daskpath``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "load_config": "daskpath.config",
    "Config": "daskpath.config",
    "run": "daskpath.pipeline",
    "RunResult": "daskpath.pipeline",
    "open_slide": "daskpath.io",
    "open_pair": "daskpath.io",
    "ingest": "daskpath.io",
    "read_manifest": "daskpath.io",
    "tissue_mask": "daskpath.tissue",
    "ssim_map": "daskpath.similarity",
    "tile_table": "daskpath.tiles",
    "measure_nuclei": "daskpath.nuclei",
    "make_cohort": "daskpath.synthetic",
    "DaskpathError": "daskpath.errors",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. daskpath.tiles
    raise AttributeError(f"module 'daskpath' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
