"""Baselines: the Ki67 ratio predicted from H&E alone, without a virtual IHC.

Public API (scikit-learn and torch are imported on first use, never by ``import daskpath``)::

    from daskpath.baselines import predict_tiles_rf, predict_tiles_classifier
    tiles = daskpath.tiles.tile_grid(he.shape[:2], 1024)
    rf = predict_tiles_rf(he, tiles, "phantom")            # + ratio_rf, class_rf, pixel counts
    cl = predict_tiles_classifier(he, tiles, "phantom")    # + class_classifier, ratio_classifier

* :mod:`~daskpath.baselines.rf` -- ilastik-style random-forest pixel classifier (background /
  Ki67-negative / Ki67-positive nucleus) on multiscale features; ratio = positive / nucleus pixels.
  ``python -m daskpath.baselines.rf OUT_DIR`` trains it.
* :mod:`~daskpath.baselines.classifier` -- 3-class ResNet18 (ratio bins 0-0.2, 0.2-0.5, 0.5-1) on
  downsampled tiles; torchvision-compatible state-dict keys (:mod:`~daskpath.baselines.resnet`).
  ``python -m daskpath.baselines.classifier OUT_DIR`` trains it.
* :mod:`~daskpath.baselines.data` -- phantom slides with truth for training and figures.

Both take a ``(y, x, 3)`` uint8 dask (or numpy) H&E array and a tile table (``y0, x0, height,
width``), load their model once per worker process, and return the table with their columns.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BINS",
    "ratio_class",
    "predict_pixels_rf",
    "predict_tiles_rf",
    "load_rf",
    "train_rf",
    "RFSpec",
    "predict_tiles_classifier",
    "load_classifier",
    "train_classifier",
    "ClassifierSpec",
    "resnet18",
    "load_torchvision_weights",
    "SHIPPED",
]

_WHERE = {
    "BINS": "_common",
    "ratio_class": "_common",
    "SHIPPED": "_common",
    "predict_pixels_rf": "rf",
    "predict_tiles_rf": "rf",
    "load_rf": "rf",
    "train_rf": "rf",
    "RFSpec": "rf",
    "predict_tiles_classifier": "classifier",
    "load_classifier": "classifier",
    "train_classifier": "classifier",
    "ClassifierSpec": "classifier",
    "resnet18": "resnet",
    "load_torchvision_weights": "resnet",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'daskpath.baselines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"daskpath.baselines.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
