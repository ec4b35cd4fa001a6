"""Scoring a virtual IHC: Ki67 ratios by colour deconvolution, truth ratios, image similarity.

The pipeline measures ratios on the virtual IHC with the same nuclei stage as on the real IHC
(:mod:`daskpath.nuclei`). This module holds a light, model-free measure used for the translator's
own figures and tests (no TensorFlow): nuclei are connected components of the smoothed
hematoxylin + DAB optical density above ``mask_od`` = 0.26 (unsmoothed: smoothing biases brown nuclei larger; base-10 OD, :func:`daskpath.stain.deconvolve`
with skimage's HED vectors) of at least ``min_area`` px; a nucleus is Ki67-positive when its mean
DAB OD exceeds ``dab_od`` (0.15, the nuclei stage's default). Each nucleus belongs to the tile
holding its centroid. Tile area ratio = positive nucleus area / nucleus area; count index =
positive nuclei / nuclei; NaN without nuclei.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from daskpath.metrics import BINS, score  # one definition of the 3-class bins and the scores

__all__ = [
    "BINS",
    "measure_dab_nuclei",
    "tile_ratios_from_nuclei",
    "truth_tile_ratios",
    "ratio_metrics",
    "image_similarity",
]



def measure_dab_nuclei(rgb: np.ndarray, *, mask_od: float = 0.26, dab_od: float = 0.15,
                       min_area: int = 20, sigma: float = 0.0) -> pd.DataFrame:
    """Nuclei of an IHC (real or virtual) image: ``y, x, area, dab_od, positive`` per nucleus."""
    from daskpath.stain import deconvolve

    od = deconvolve(np.asarray(rgb))
    hd = ndi.gaussian_filter(od[..., 0] + od[..., 2], sigma) if sigma else od[..., 0] + od[..., 2]
    lab, n = ndi.label(hd > mask_od)
    if n == 0:
        return pd.DataFrame({c: np.array([], dtype=float) for c in ("y", "x", "area", "dab_od")}
                            ).assign(positive=np.array([], bool))
    idx = np.arange(1, n + 1)
    area = ndi.sum_labels(np.ones_like(hd), lab, idx)
    dab = ndi.mean(od[..., 2], lab, idx)
    cy, cx = np.array(ndi.center_of_mass(np.ones_like(hd), lab, idx)).reshape(-1, 2).T
    df = pd.DataFrame({"y": cy, "x": cx, "area": area, "dab_od": dab})
    df = df[df["area"] >= min_area].reset_index(drop=True)
    df["positive"] = df["dab_od"] > dab_od
    return df


def tile_ratios_from_nuclei(nuclei: pd.DataFrame, shape: tuple[int, int], tile: int,
                            *, area: str = "area") -> pd.DataFrame:
    """Per-tile ``ratio`` (area) and ``index`` (count) from nuclei assigned by centroid."""
    h, w = shape
    ny, nx = -(-h // tile), -(-w // tile)
    ty = np.clip((nuclei["y"].to_numpy() // tile).astype(int), 0, ny - 1)
    tx = np.clip((nuclei["x"].to_numpy() // tile).astype(int), 0, nx - 1)
    k = ty * nx + tx
    a = nuclei[area].to_numpy(float)
    pos = nuclei["positive"].to_numpy(bool)
    tot_a = np.bincount(k, a, ny * nx)
    pos_a = np.bincount(k, a * pos, ny * nx)
    tot_n = np.bincount(k, None, ny * nx)
    pos_n = np.bincount(k, pos.astype(float), ny * nx)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(tot_a > 0, pos_a / tot_a, np.nan)
        index = np.where(tot_n > 0, pos_n / tot_n, np.nan)
    yy, xx = np.divmod(np.arange(ny * nx), nx)
    return pd.DataFrame({"y0": yy * tile, "x0": xx * tile, "n": tot_n.astype(int),
                         "ratio": ratio, "index": index})


def truth_tile_ratios(truth: pd.DataFrame | str, shape: tuple[int, int], tile: int,
                      frame: str = "he") -> pd.DataFrame:
    """Per-tile truth ratios from a phantom truth table (``<slide>_truth.parquet``).

    ``frame="he"`` uses the H&E-frame centroids and areas (``y_he, x_he, area_he``; nuclei absent
    from the H&E are dropped), the grid on which a virtual IHC lives; ``"ihc"`` the IHC frame
    (nuclei absent from the IHC section dropped).
    """
    df = pd.read_parquet(truth) if isinstance(truth, str) or hasattr(truth, "__fspath__") else truth
    if frame == "he":
        df = df[np.isfinite(df["y_he"]) & (df["area_he"] > 0)]
        df = pd.DataFrame({"y": df["y_he"], "x": df["x_he"], "area": df["area_he"],
                           "positive": df["positive"].astype(bool)})
    else:  # realistic phantoms list nuclei of the H&E section only with y, x = NaN, area 0
        df = df[np.isfinite(df["y"]) & (df["area"] > 0)]
    return tile_ratios_from_nuclei(df, shape, tile)


def ratio_metrics(pred: Sequence[float], true: Sequence[float]) -> dict:
    """Accuracy at |diff| <= 0.05/0.1/0.2, MSE, MAE, 3-class accuracy, balanced accuracy, confusion.

    :func:`daskpath.metrics.score` under the short keys of ``evaluation.json`` (``acc_0.05``,
    ``acc3``, ``balanced_acc3``, ``confusion`` as a list, rows truth). Pairs where either value
    is NaN are dropped (``n`` counts the rest).
    """
    m = score(np.asarray(pred, float), np.asarray(true, float))
    if not m["n"]:
        return {"n": 0}
    return {"n": m["n"], "acc_0.05": m["acc@0.05"], "acc_0.1": m["acc@0.1"], "acc_0.2": m["acc@0.2"],
            "mse": m["mse"], "mae": m["mae"], "acc3": m["class_accuracy"],
            "balanced_acc3": m["balanced_accuracy"], "confusion": m["confusion"]["rows_truth_cols_pred"]}


def image_similarity(virtual: np.ndarray, real: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """SSIM (design definition: grayscale, Gaussian sigma 1.5, data range 1) and PSNR (RGB, dB).

    ``virtual`` and ``real`` must be aligned (crop the real IHC at the section offset first);
    ``mask`` restricts both means (e.g. to tissue).
    """
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    a, b = rgb2gray(virtual), rgb2gray(real)
    _, smap = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, full=True)
    m = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    mse = ((virtual.astype(np.float64) - real.astype(np.float64)) ** 2).mean(axis=-1)[m].mean()
    psnr = float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf")
    return {"ssim": float(smap[m].mean()), "psnr": psnr}
