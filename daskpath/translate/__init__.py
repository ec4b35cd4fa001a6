"""Virtual IHC from H&E: GAN generators, checkpoints, seam-free tiled translation, training.

Public API (torch is imported on first use of a name that needs it, never by ``import daskpath``)::

    from daskpath.translate import translate, load_generator
    virtual = translate(he_dask, "phantom")          # lazy (y, x, 3) uint8 on the H&E grid

* :mod:`~daskpath.translate.networks` -- ResnetGenerator / UnetGenerator / PatchGAN, key-for-key
  compatible with pytorch-CycleGAN-and-pix2pix.
* :mod:`~daskpath.translate.checkpoints` -- :func:`load_generator`, :func:`save_generator`,
  :class:`GeneratorSpec` (the ``daskpath.json`` beside the weights).
* :mod:`~daskpath.translate.inference` -- :func:`translate` (dask), :func:`translate_array`
  (numpy), slide-level norm statistics, :func:`seam_energy`.
* :mod:`~daskpath.translate.fast` -- :class:`FastResnet`, the exact CPU fast path of
  :func:`translate` (NNPACK 7x7 convolutions, channels_last blocks).
* :mod:`~daskpath.translate.train` -- pix2pix, pyramid pix2pix, CycleGAN
  (``daskpath train translator OUT_DIR ...``).
* :mod:`~daskpath.translate.tilepairs` -- :func:`export_tile_pairs` (a run's kept tiles as
  training pairs, in the reference's folder layouts) and :func:`split_slides` (slide-level
  train/test split).
* :mod:`~daskpath.translate.score` -- DAB ratios per tile, truth ratios, ratio metrics, SSIM/PSNR.
* :mod:`~daskpath.translate.evaluate` -- figures of a model on held-out phantom slides or on the
  test split of a tile export.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GeneratorSpec",
    "load_generator",
    "save_generator",
    "define_G",
    "translate",
    "translate_array",
    "resolve_translator",
    "slide_norm_stats",
    "seam_energy",
    "TrainConfig",
    "SHIPPED_MODELS",
    "export_tile_pairs",
    "split_slides",
]

_WHERE = {
    "GeneratorSpec": "checkpoints",
    "load_generator": "checkpoints",
    "save_generator": "checkpoints",
    "SHIPPED_MODELS": "checkpoints",
    "define_G": "networks",
    "translate": "inference",
    "translate_array": "inference",
    "resolve_translator": "inference",
    "slide_norm_stats": "inference",
    "seam_energy": "inference",
    "TrainConfig": "train",
    "export_tile_pairs": "tilepairs",
    "split_slides": "tilepairs",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'daskpath.translate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"daskpath.translate.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
