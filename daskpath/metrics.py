"""Scores of predicted Ki67 ratios against the ground truth measured on the real IHC.

For every predictor column ``ratio_<method>`` of the tile table (and of the slide table):
accuracy at ``|pred - truth| <= 0.05, 0.1, 0.2``, MSE, MAE, the 3-class (0-0.2, 0.2-0.5,
0.5-1) accuracy, balanced accuracy and confusion matrix, and the number of scored items.
Tiles are scored where both values are defined (kept tiles with nuclei).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["BINS", "CLASSES", "ratio_class", "score", "score_table"]

BINS = (0.2, 0.5)
CLASSES = ("0-0.2", "0.2-0.5", "0.5-1")


def ratio_class(r: np.ndarray) -> np.ndarray:
    """Class index 0, 1, 2 of ratios (bins 0-0.2, 0.2-0.5, 0.5-1; right-open except the last)."""
    return np.digitize(np.asarray(r, dtype=np.float64), BINS)


def score(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Agreement of predicted and true ratios (NaN pairs are dropped)."""
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    ok = np.isfinite(pred) & np.isfinite(truth)
    p, t = pred[ok], truth[ok]
    out: dict = {"n": int(ok.sum())}
    if not len(p):
        return out | {"note": "no item with both a prediction and a ground truth"}
    d = np.abs(p - t)
    for a in (0.05, 0.1, 0.2):
        out[f"acc@{a}"] = float((d <= a + 1e-12).mean())
    out["mse"] = float((d**2).mean())
    out["mae"] = float(d.mean())
    cp, ct = ratio_class(p), ratio_class(t)
    conf = np.zeros((3, 3), dtype=int)
    np.add.at(conf, (ct, cp), 1)
    out["class_accuracy"] = float((cp == ct).mean())
    recalls = [conf[i, i] / conf[i].sum() for i in range(3) if conf[i].sum()]
    out["balanced_accuracy"] = float(np.mean(recalls))
    out["confusion"] = {"classes": list(CLASSES), "rows_truth_cols_pred": conf.tolist()}
    return out


def score_table(df: pd.DataFrame, truth: str = "ratio_ihc") -> dict:
    """Score every ``ratio_<method>`` column of ``df`` against ``truth``."""
    res = {}
    for col in df.columns:
        if col.startswith("ratio_") and col != truth and truth in df.columns:
            res[col.removeprefix("ratio_")] = score(df[col].to_numpy(), df[truth].to_numpy())
    return res
