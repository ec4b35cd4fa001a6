"""daskpath: Ki67 tumor ratios in whole-slide H&E / IHC pairs, at cluster scale with Dask.

The public names below are imported on first use, so ``import daskpath`` stays light (no
dask, TensorFlow or torch until something needs them)::

    import daskpath
    cfg = daskpath.load_config("my.yaml", ["tiles.size=2048"])
    result = daskpath.run(cfg)                 # local Dask cluster by default
    ds = daskpath.open_pair("a_HE.tif", "a_IHC.tif")
"""

from __future__ import annotations

import importlib
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
    "measure_nuclei": "daskpath.nuclei",
    "make_cohort": "daskpath.synthetic",
    "DaskpathError": "daskpath.errors",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'daskpath' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
