"""Stage ``nuclei``: the ground-truth Ki67 ratio, measured on the real IHC.

Colour deconvolution (H / DAB) and StarDist over chunks of ``nuclei.chunk_size`` (default the
tile size, so only the kept tiles and their halo are segmented), each nucleus owned by the
chunk holding its centroid. Each chunk task writes its region of the label image and its
nucleus table is recorded, so an interrupted stage resumes chunk by chunk.

Part table: per tile ``ratio_ihc`` / ``ki67_index_ihc`` (NaN outside kept tiles) and the sums
behind them (``pos_area_ihc, all_area_ihc, pos_n_ihc, all_n_ihc``) for the slide-level
area-weighted ratio. Published: ``nuclei/<slide>.{parquet,geojson,json}`` and
``layers/<slide>.ihc-labels.zarr``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from daskpath.publish import Artefact
from daskpath.stages import SlideContext, Stage

__all__ = ["NucleiStage", "measure_on", "nuclei_keys", "nuclei_artefacts"]


def nuclei_keys(cfg) -> dict[str, Any]:
    """The ``nuclei.*`` config values the nucleus tables depend on."""
    n = cfg.nuclei
    return {
        "nuclei.model": n.model,
        "nuclei.method": n.method,
        "nuclei.dab_threshold": n.dab_threshold,
        "nuclei.stain_matrix": n.stain_matrix,
        "nuclei.prob_thresh": n.prob_thresh,
        "nuclei.nms_thresh": n.nms_thresh,
        "nuclei.chunk_size": n.chunk_size or cfg.tiles.size,
    }


def nuclei_model(cfg) -> dict[str, tuple[Any, str]]:
    """``{"nuclei.model": (folder or None, name)}``; raises ModelError for a bad model."""
    from daskpath.nuclei import _folder_of, resolve_model

    folder = _folder_of(cfg.nuclei.model)
    if folder is not None:
        resolve_model(cfg.nuclei.model)  # checks the folder (ModelError) without TensorFlow
    return {"nuclei.model": (folder, str(cfg.nuclei.model))}


def nuclei_artefacts(cfg, suffix: str) -> list[Artefact]:
    """The nuclei table, GeoJSON, settings JSON and (method nucleus) the label image."""
    name = "{slide}" if suffix == "ihc" else "{slide}." + suffix
    arts = [
        Artefact("nuclei.parquet", f"nuclei/{name}.parquet"),
        Artefact("nuclei.geojson", f"nuclei/{name}.geojson"),
        Artefact("nuclei.json", f"nuclei/{name}.json"),
    ]
    if cfg.nuclei.method == "nucleus":
        arts.append(Artefact("labels.zarr", f"layers/{{slide}}.{suffix}-labels.zarr"))
    return arts


def measure_on(ctx: SlideContext, image, suffix: str, source: str) -> pd.DataFrame:
    """Nuclei on ``image`` (an RGB IHC dask array) over the kept tiles of ``ctx``'s slide.

    Writes ``nuclei.parquet/.geojson/.json`` and ``labels.zarr`` into ``ctx.work`` and returns
    the stage's part table (per-tile ratio columns with suffix ``suffix`` and their sums).
    """
    from daskpath.cluster import check_runnable, model_annotations
    from daskpath.monitor import count
    from daskpath.nuclei import measure_nuclei, tile_ratios, tile_sums, write_geojson
    from daskpath.outputs import write_json, write_table
    from daskpath.resume import count_records

    cfg = ctx.cfg
    tiles, keep = ctx.tiles()
    kept = tiles[keep]
    region = list(zip(kept["y0"], kept["y0"] + kept["height"], kept["x0"], kept["x0"] + kept["width"]))
    nchunk = cfg.nuclei.chunk_size or cfg.tiles.size
    ann = model_annotations(ctx.client)
    check_runnable(ctx.client, ann)
    image = image.rechunk((nchunk, nchunk, 3))
    labels = str(ctx.work / "labels.zarr") if cfg.nuclei.method == "nucleus" else None
    table = measure_nuclei(
        image,
        model=cfg.nuclei.model,
        method=cfg.nuclei.method,
        dab_threshold=cfg.nuclei.dab_threshold,
        stain_matrix=None if cfg.nuclei.stain_matrix == "hed" else cfg.nuclei.stain_matrix,
        prob_thresh=cfg.nuclei.prob_thresh,
        nms_thresh=cfg.nuclei.nms_thresh,
        resources=ann.get("resources"),
        region=region,
        labels_store=labels,
        record_dir=ctx.record_dir("nuclei"),
        compute=False,
    )
    ctx.note_chunks(*count_records(table))
    (df,) = ctx.compute([table])
    df = df.copy()
    attrs = dict(df.attrs)
    df.insert(0, "source", source)
    df.insert(0, "slide", ctx.slide)
    count("nuclei_found", len(df))
    ratios = tile_ratios(df, tiles, suffix=suffix)
    cols = [f"ratio_{suffix}", f"ki67_index_{suffix}"]
    # per-tile ratios are reported on kept tiles only (the others are not comparable)
    ratios.loc[~keep, cols] = np.nan
    agg = tile_sums(df, tiles)
    part = pd.concat([ratios[["y0", "x0"] + cols].reset_index(drop=True),
                      agg.add_suffix(f"_{suffix}").reset_index(drop=True)], axis=1)
    # what was used (method, model, stain vectors, DAB threshold, normalisation, halo)
    write_json(attrs | {"slide": ctx.slide, "source": source, "nuclei": int(len(df))},
               ctx.work / "nuclei.json")
    write_table(df, ctx.work / "nuclei.parquet")
    write_geojson(df, ctx.work / "nuclei.geojson", mpp=ctx.pair().attrs.get("mpp"))
    return part


def ratio_columns(part: pd.DataFrame, keep: np.ndarray, suffix: str) -> dict[str, Any]:
    return {f"ratio_{suffix}": part[f"ratio_{suffix}"].to_numpy(),
            f"ki67_index_{suffix}": part[f"ki67_index_{suffix}"].to_numpy()}


def ratio_summary(part: pd.DataFrame, keep: np.ndarray, suffix: str) -> dict[str, Any]:
    """Area-weighted slide ratio and count index over the kept tiles."""
    k = np.asarray(keep, bool)
    pa, aa = part[f"pos_area_{suffix}"].to_numpy()[k].sum(), part[f"all_area_{suffix}"].to_numpy()[k].sum()
    pn, an = part[f"pos_n_{suffix}"].to_numpy()[k].sum(), part[f"all_n_{suffix}"].to_numpy()[k].sum()
    return {
        f"ratio_{suffix}": pa / aa if aa > 0 else np.nan,
        f"ki67_index_{suffix}": pn / an if an > 0 else np.nan,
        f"nuclei_{suffix}": int(an),
    }


class NucleiStage(Stage):
    """StarDist + DAB on the real IHC: the ground truth the predictors are scored against."""

    name = "nuclei"
    requires = ("preprocess",)
    version = 1
    config_sections = ("nuclei",)

    def keys(self, cfg) -> dict[str, Any]:
        return nuclei_keys(cfg)

    def models(self, cfg):
        return nuclei_model(cfg)

    def upstream(self, ctx: SlideContext) -> dict[str, Any]:
        return ctx.kept_digest()

    def artefacts(self, cfg) -> list[Artefact]:
        return nuclei_artefacts(cfg, "ihc")

    def run(self, ctx: SlideContext) -> pd.DataFrame:
        return measure_on(ctx, ctx.pair()["ihc"].data, "ihc", "ihc")

    def tile_columns(self, part, keep, cfg) -> dict[str, Any]:
        return ratio_columns(part, keep, "ihc")

    def summarize(self, part, keep, cfg) -> dict[str, Any]:
        return ratio_summary(part, keep, "ihc")
