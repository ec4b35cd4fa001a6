"""Virtual IHC from H&E: GAN generators, checkpoints, seam-free tiled translation, training.

Public API (torch is imported on first use of a name that needs it, never by ``import daskpath``)::

    from daskpath.translate import translate, load_generator
    virtual = translate(ds.he, "phantom")   # lazy (y, x, 3) uint8 DataArray on the H&E grid

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
    "translate_array": "inference",
    "resolve_translator": "inference",
    "slide_norm_stats": "inference",
    "seam_energy": "inference",
    "TrainConfig": "train",
    "export_tile_pairs": "tilepairs",
    "split_slides": "tilepairs",
}


def translate(he: Any, model: Any = "phantom", **kwargs: Any) -> Any:
    """Lazy virtual IHC of an H&E slide, on the H&E's pixel grid.

    Takes what :func:`daskpath.open_pair` gives: ``translate(ds.he)`` returns an
    ``xarray.DataArray`` named ``"virtual_ihc"`` with ``ds.he``'s coordinates (``y``, ``x``,
    ``c``, ``y_um``, ``x_um``) and attrs (``mpp``, ...); a dask or NumPy array gives a dask
    array. The work is :func:`daskpath.translate.inference.translate`'s (GAN generator over
    chunks with an overlap of at least the receptive-field margin, slide-level normalisation
    statistics, seam-free).

    Parameters
    ----------
    he : xarray.DataArray, dask.array.Array or ndarray, shape (y, x, 3), uint8
        The H&E slide.
    model : str, Path or TranslatorRef
        Shipped model name (``"phantom"``), model folder, or checkpoint ``.pth``.
    **kwargs
        ``tile``, ``halo``, ``batch_size``, ``blend``, ``norm_stats``, ``device``, ``amp``,
        ``resources``, ... as in :func:`daskpath.translate.inference.translate`.

    Returns
    -------
    xarray.DataArray or dask.array.Array, shape (y, x, 3), uint8
    """
    from daskpath._xr import as_dask, like
    from daskpath.translate.inference import translate as _translate

    arr, template = as_dask(he, "translate: he")
    return like(_translate(arr, model, **kwargs), template, "virtual_ihc", channels=True)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'daskpath.translate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"daskpath.translate.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
