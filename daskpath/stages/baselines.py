"""Stage ``baselines``: the Ki67 ratio of every kept tile predicted from the H&E alone.

Two predictors, as in the study this project serves: an ilastik-style random-forest pixel
classifier (``ratio_rf``: positive / nucleus pixels, with the pixel counts for the slide's
area-weighted ratio) and a 3-class ResNet18 (``class_classifier`` and ``ratio_classifier``, the
softmax-expected class midpoint). Chunks (random forest) and batches (ResNet18) are recorded,
so an interrupted stage resumes where it stopped. NaN (class -1) outside kept tiles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from daskpath.stages import SlideContext, Stage

__all__ = ["BaselinesStage"]

RF_COLUMNS = ("ratio_rf", "positive_px_rf", "nucleus_px_rf")


class BaselinesStage(Stage):
    """Random-forest pixel classifier and 3-class ResNet18 on the H&E."""

    name = "baselines"
    requires = ("preprocess",)
    version = 2  # 2: RF features by the OpenCV path (equal to skimage's within float32 rounding)
    config_sections = ("baselines",)

    def keys(self, cfg) -> dict[str, Any]:
        b = cfg.baselines
        keys: dict[str, Any] = {"baselines.methods": sorted(b.methods)}
        if "rf" in b.methods:
            keys["baselines.rf_model"] = b.rf_model
        if "classifier" in b.methods:
            keys["baselines.classifier_model"] = b.classifier_model
        return keys

    def models(self, cfg):
        from daskpath.baselines._common import resolve_model

        out = {}
        if "rf" in cfg.baselines.methods:
            out["baselines.rf_model"] = (resolve_model("rf", cfg.baselines.rf_model), str(cfg.baselines.rf_model))
        if "classifier" in cfg.baselines.methods:
            out["baselines.classifier_model"] = (resolve_model("classifier", cfg.baselines.classifier_model),
                                                 str(cfg.baselines.classifier_model))
        return out

    def upstream(self, ctx: SlideContext) -> dict[str, Any]:
        return ctx.kept_digest()

    def run(self, ctx: SlideContext) -> pd.DataFrame:
        from daskpath.baselines import predict_tiles_classifier, predict_tiles_rf
        from daskpath.cluster import check_runnable, model_annotations
        from daskpath.resume import count_records

        cfg = ctx.cfg
        tiles, keep = ctx.tiles()
        he = ctx.pair()["he"].data
        kept = tiles.loc[keep, ["y0", "x0", "height", "width"]].reset_index(drop=True)
        tab = tiles[["y0", "x0"]].copy().reset_index(drop=True)
        idx = np.flatnonzero(keep)
        graphs: dict[str, Any] = {}
        if "rf" in cfg.baselines.methods and len(kept):
            graphs["rf"] = predict_tiles_rf(he, kept, cfg.baselines.rf_model, compute=False,
                                            record_dir=ctx.record_dir("rf"))
        if "classifier" in cfg.baselines.methods and len(kept):
            ann = model_annotations(ctx.client)
            check_runnable(ctx.client, ann)
            graphs["classifier"] = predict_tiles_classifier(
                he, kept, cfg.baselines.classifier_model, batch_size=cfg.baselines.batch_size,
                resources=ann.get("resources"), compute=False, record_dir=ctx.record_dir("classifier"))
        for g in graphs.values():
            ctx.note_chunks(*count_records(g))
        results = dict(zip(graphs, ctx.compute(list(graphs.values()))))
        if "rf" in cfg.baselines.methods:
            for c in RF_COLUMNS:
                tab[c] = np.nan
            if "rf" in results:
                for c in RF_COLUMNS:
                    tab.loc[idx, c] = results["rf"][c].to_numpy(np.float64)
        if "classifier" in cfg.baselines.methods:
            tab["ratio_classifier"] = np.nan
            tab["class_classifier"] = -1
            if "classifier" in results:
                cl = results["classifier"]
                tab.loc[idx, "ratio_classifier"] = cl["ratio_classifier"].to_numpy(np.float64)
                tab.loc[idx, "class_classifier"] = cl["class_classifier"].to_numpy(np.int64)
        return tab

    def tile_columns(self, part, keep, cfg) -> dict[str, Any]:
        cols = {}
        if "ratio_rf" in part.columns:
            cols["ratio_rf"] = part["ratio_rf"].to_numpy()
        if "ratio_classifier" in part.columns:
            cols["ratio_classifier"] = part["ratio_classifier"].to_numpy()
            cols["class_classifier"] = part["class_classifier"].to_numpy()
        return cols

    def summarize(self, part, keep, cfg) -> dict[str, Any]:
        k = np.asarray(keep, bool)
        row: dict[str, Any] = {}
        if "ratio_rf" in part.columns:
            pos, nuc = part["positive_px_rf"].to_numpy()[k], part["nucleus_px_rf"].to_numpy()[k]
            row["ratio_rf"] = np.nansum(pos) / np.nansum(nuc) if np.nansum(nuc) > 0 else np.nan
        if "ratio_classifier" in part.columns:
            # a tile-level class estimate: the slide value is the mean over kept tiles
            v = part["ratio_classifier"].to_numpy()[k]
            row["ratio_classifier"] = float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
        return row
