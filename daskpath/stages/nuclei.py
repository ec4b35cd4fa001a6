"""Stage ``nuclei``: the ground-truth Ki67 ratio, measured on the real IHC.

Colour deconvolution (H / DAB) and StarDist over chunks of ``nuclei.chunk_size`` (default the
tile size, so only the kept tiles and their halo are segmented), each nucleus owned by the
chunk holding its centroid. Each chunk task writes its region of the label image and its
nucleus table is recorded, so an interrupted stage resumes chunk by chunk.

Part table: per tile ``ratio_ihc`` / ``ki67_index_ihc`` (NaN outside kept tiles) and the sums
behind them (``pos_area_ihc, all_area_ihc, pos_n_ihc, all_n_ihc``) for the slide-level
area-weighted ratio. Published: ``nuclei/<slide>.{parquet,geojson,json}`` and the OME-NGFF
label images ``layers/<slide>.ihc-labels.zarr`` (nucleus ids) and ``layers/<slide>.ihc-ki67.zarr``
(1 negative, 2 positive). The parquet table is GeoParquet 1.1
(:func:`write_nuclei_parquet`): ``geopandas.read_parquet`` gives a GeoDataFrame of the nuclei
outlines in slide pixels.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from daskpath.publish import Artefact
from daskpath.stages import SlideContext, Stage

__all__ = ["NucleiStage", "measure_on", "nuclei_artefacts", "nuclei_keys", "write_nuclei_parquet"]


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
    """The nuclei table, GeoJSON, settings JSON and (method nucleus, real IHC) the label images.

    The label images of the real IHC are standalone OME-NGFF label images (their image is the
    user's slide file, not a zarr): ``layers/<slide>.ihc-labels.zarr`` (nucleus ids) and
    ``layers/<slide>.ihc-ki67.zarr`` (1 negative, 2 positive). Those of the virtual IHC live
    inside its image, ``layers/<slide>.virtual.zarr/labels/{nuclei,ki67}`` (published with it).
    """
    name = "{slide}" if suffix == "ihc" else "{slide}." + suffix
    arts = [
        Artefact("nuclei.parquet", f"nuclei/{name}.parquet"),
        Artefact("nuclei.geojson", f"nuclei/{name}.geojson"),
        Artefact("nuclei.json", f"nuclei/{name}.json"),
    ]
    if cfg.nuclei.method == "nucleus" and suffix == "ihc":
        arts.append(Artefact("labels.zarr", f"layers/{{slide}}.{suffix}-labels.zarr"))
        arts.append(Artefact("ki67.zarr", f"layers/{{slide}}.{suffix}-ki67.zarr"))
    return arts


def label_stores(work: Path, suffix: str) -> tuple[Path, Path]:
    """Where :func:`measure_on` writes the nucleus-id and Ki67-class label images.

    Real IHC: standalone label images ``labels.zarr`` / ``ki67.zarr`` in the work folder;
    virtual IHC: labels ``nuclei`` / ``ki67`` of the ``virtual.zarr`` image.
    """
    if suffix == "ihc":
        return work / "labels.zarr", work / "ki67.zarr"
    image = work / f"{suffix}.zarr"
    return image / "labels" / "nuclei", image / "labels" / "ki67"


def finish_labels(ctx: SlideContext, labels: Path, table: pd.DataFrame, suffix: str) -> None:
    """After the nuclei table: pixel size of a standalone label image, the Ki67 class label
    image, and the pyramids of both (computed on the cluster)."""
    from daskpath import ome
    from daskpath.nuclei import write_class_labels

    if labels.parent.name != "labels":  # standalone: its image is the slide file
        mpp = ctx.pair()[suffix].attrs.get("mpp") if suffix in ("he", "ihc") else None
        ome.set_mpp(labels, mpp)
    classes = label_stores(ctx.work, suffix)[1]
    ctx.compute([ome.build_pyramid(labels, compute=False)])
    # every level of the classes from the same level of the ids, in parallel
    ctx.compute([write_class_labels(labels, classes, table, compute=False, from_pyramid=True)])


def measure_on(ctx: SlideContext, image, suffix: str, source: str) -> pd.DataFrame:
    """Nuclei on ``image`` (an RGB IHC dask array) over the kept tiles of ``ctx``'s slide.

    Writes ``nuclei.parquet/.geojson/.json`` and the label images (:func:`label_stores`) into
    ``ctx.work`` and returns the stage's part table (per-tile ratio columns with suffix
    ``suffix`` and their sums).
    """
    from daskpath.cluster import check_runnable, model_annotations
    from daskpath.monitor import count
    from daskpath.nuclei import measure_nuclei, tile_ratios, tile_sums
    from daskpath.outputs import write_json
    from daskpath.resume import count_records

    cfg = ctx.cfg
    tiles, keep = ctx.tiles()
    region = tiles.loc[keep, ["y0", "x0", "height", "width"]]  # the kept tiles
    nchunk = cfg.nuclei.chunk_size or cfg.tiles.size
    ann = model_annotations(ctx.client)
    check_runnable(ctx.client, ann)
    image = image.rechunk((nchunk, nchunk, 3))
    labels = label_stores(ctx.work, suffix)[0] if cfg.nuclei.method == "nucleus" else None
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
    # progress: the nuclei on a virtual IHC on their own line (translate.nuclei)
    (df,) = ctx.compute([table], label=None if suffix == "ihc" else f"{ctx.stage}.nuclei")
    df = df.copy()
    attrs = dict(df.attrs)
    df.insert(0, "source", source)
    df.insert(0, "slide", ctx.slide)
    mpp = ctx.pair().attrs.get("mpp")
    # the client writes the GeoParquet and GeoJSON tables (~30 s for 330k nuclei) while the
    # cluster builds the label images from the same table
    with ThreadPoolExecutor(1, thread_name_prefix="daskpath-nuclei-files") as pool:
        files = pool.submit(_write_tables, df, ctx.work, mpp)
        try:
            if labels is not None:  # OME-NGFF: pixel size, Ki67 classes, pyramids
                finish_labels(ctx, labels, df, suffix)
        except BaseException:
            files.exception()  # wait for the writer; the cluster's error is the one to report
            raise
        files.result()  # re-raises a failed write
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
    return part


def _write_tables(df: pd.DataFrame, work: Path, mpp: float | None) -> None:
    """The nuclei table as GeoParquet and GeoJSON in the stage's work folder."""
    from daskpath.nuclei import write_geojson

    write_nuclei_parquet(df, work / "nuclei.parquet")
    write_geojson(df, work / "nuclei.geojson", mpp=mpp)


def write_nuclei_parquet(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a nuclei table as GeoParquet 1.1: the table's columns plus a WKB ``geometry``.

    ``geometry`` is each nucleus' StarDist outline (the ``polygon`` column, ``(y, x)`` per ray)
    as a WKB ``Polygon`` with ``x`` = column and ``y`` = row in slide pixels of level 0 (the
    image convention, y down, as in the GeoJSON QuPath imports); a row without an outline gets
    a null geometry. The file's ``geo`` metadata is GeoParquet 1.1: ``primary_column
    "geometry"``, ``encoding "WKB"``, ``geometry_types ["Polygon"]``, the ``bbox`` and
    ``"crs": null`` (slide pixels have no coordinate reference system; an absent ``crs``
    would mean OGC:CRS84, longitude/latitude). Every other column (``slide, source, id, y, x,
    area, prob, dab_od, positive, channel, polygon``) and ``df.attrs`` are kept as
    ``DataFrame.to_parquet`` writes them, so ``pandas.read_parquet`` reads it as before and
    ``geopandas.read_parquet`` gives a GeoDataFrame. Written to a temp name and renamed.

    Needs ``shapely >= 2`` (for the WKB encoding).
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from daskpath.outputs import atomic_path

    try:
        import shapely
    except ImportError:  # pragma: no cover - a dependency
        raise ImportError("writing the nuclei GeoParquet needs shapely >= 2: pip install "
                          "'shapely>=2'") from None
    if "geometry" in df.columns:
        raise ValueError("write_nuclei_parquet: the table already has a 'geometry' column; "
                         "drop it, the outline comes from 'polygon'")
    n = len(df)
    geoms = np.full(n, None, dtype=object)
    if "polygon" in df.columns and n:
        polys = df["polygon"].to_numpy()
        lens = np.array([0 if p is None else len(p) for p in polys])
        for m in np.unique(lens[(lens >= 6) & (lens % 2 == 0)]):
            idx = np.nonzero(lens == m)[0]
            yx = np.stack([np.asarray(polys[i], np.float64) for i in idx]).reshape(len(idx), -1, 2)
            geoms[idx] = shapely.polygons(np.ascontiguousarray(yx[..., ::-1]))  # rings closed
    wkb = shapely.to_wkb(geoms, flavor="iso")
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}
    present = geoms[np.array([g is not None for g in geoms], dtype=bool)]
    if len(present):
        column["bbox"] = [float(v) for v in shapely.total_bounds(present)]
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.append_column("geometry", pa.array(list(wkb), type=pa.binary()))
    meta = dict(table.schema.metadata or {})
    meta[b"geo"] = json.dumps(geo).encode()
    if df.attrs:  # as pandas' to_parquet keeps them
        meta[b"PANDAS_ATTRS"] = json.dumps(df.attrs).encode()
    table = table.replace_schema_metadata(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
    version = 2  # 2: labels as OME-NGFF label images (+ Ki67 class labels), GeoParquet table
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
