"""Stage ``translate``: virtual IHC from the H&E (GAN generator), then the nuclei stage on it.

Only chunks near kept tiles are translated (within the nuclei halo of one), so the nuclei of
kept tiles see the same pixels as on a fully translated slide; the rest of the layer stays white
(the zarr fill value) and holds no nuclei. Each translated chunk is written to the stage's
``virtual.zarr`` by its own task and recorded, and the nuclei chunks are recorded as in the
nuclei stage, so an interrupted stage resumes chunk by chunk.

Part table: ``ratio_virtual`` / ``ki67_index_virtual`` and their sums, plus ``ssim_virtual`` and
``psnr_virtual`` (how IHC-like the virtual stain is on each kept tile). Published:
``layers/<slide>.virtual.zarr``, an OME-NGFF 0.5 RGB image (axes ``c, y, x`` in micrometres,
level 0 written chunk by chunk, then its pyramid) holding the nucleus label images of the
virtual IHC as NGFF labels ``labels/nuclei`` (ids) and ``labels/ki67`` (1 negative,
2 positive), and ``nuclei/<slide>.virtual.{parquet,geojson,json}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from daskpath.publish import Artefact
from daskpath.stages import SlideContext, Stage
from daskpath.stages.nuclei import (
    measure_on,
    nuclei_artefacts,
    nuclei_keys,
    nuclei_model,
    ratio_columns,
    ratio_summary,
)

__all__ = ["TranslateStage"]


def _store_block(block: np.ndarray, path: str, region: tuple[int, int, int, int]) -> np.ndarray:
    """Write one translated ``(y, x, 3)`` chunk into level 0 of the virtual image (NGFF
    ``c, y, x``; the chunk is one zarr chunk); return a tiny done-record."""
    from daskpath import ome

    y0, y1, x0, x1 = region
    ome.write_region(path, y0, x0, block, channel_last=True)
    return np.array([y0, y1, x0, x1], np.int64)


def _similarity_block(virtual: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Mean SSIM (design definition, float32 path) and PSNR (dB, RGB) of two RGB tiles."""
    from daskpath.similarity import gray, ssim_block

    s = float(ssim_block(gray(virtual), gray(real)).mean(dtype=np.float64))
    mse = float(np.mean((virtual.astype(np.float64) - real.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
    return np.array([s, psnr])


class TranslateStage(Stage):
    """H&E -> virtual IHC (pix2pix / pyramid pix2pix / CycleGAN generator), then nuclei on it."""

    name = "translate"
    requires = ("preprocess",)  # scored against the nuclei stage's ratio_ihc (config checks it runs)
    version = 2  # 2: virtual.zarr is an OME-NGFF image with its labels inside
    config_sections = ("translate", "nuclei")

    def keys(self, cfg) -> dict[str, Any]:
        return {
            # the H&E chunking sets the translation windows (results equal up to float rounding)
            "chunk_size": cfg.chunk_size,
            "translate.model": cfg.translate.model,
            "translate.blend": cfg.translate.blend,
            "translate.norm_stats": cfg.translate.norm_stats,
            **nuclei_keys(cfg),
        }

    def models(self, cfg):
        from daskpath.translate.inference import resolve_translator

        ref = resolve_translator(cfg.translate.model)
        return {"translate.model": (ref.model, str(cfg.translate.model)), **nuclei_model(cfg)}

    def upstream(self, ctx: SlideContext) -> dict[str, Any]:
        return ctx.kept_digest()

    def artefacts(self, cfg) -> list[Artefact]:
        return [Artefact("virtual.zarr", "layers/{slide}.virtual.zarr"), *nuclei_artefacts(cfg, "virtual")]

    def run(self, ctx: SlideContext) -> pd.DataFrame:
        import dask
        import dask.array as da

        from daskpath import ome
        from daskpath.cluster import check_runnable, model_annotations
        from daskpath.nuclei import chunks_in_region, default_depth, resolve_model
        from daskpath.translate import translate

        cfg = ctx.cfg
        ds = ctx.pair()
        tiles, keep = ctx.tiles()
        kept = tiles[keep]
        region = list(zip(kept["y0"], kept["y0"] + kept["height"], kept["x0"], kept["x0"] + kept["width"]))
        ann = model_annotations(ctx.client)
        check_runnable(ctx.client, ann)
        virtual = translate(
            ds["he"].data,
            cfg.translate.model,
            batch_size=cfg.translate.batch_size,
            blend=cfg.translate.blend,
            norm_stats=cfg.translate.norm_stats,
            resources=ann.get("resources"),
        )
        vpath = ctx.work / "virtual.zarr"
        cy, cx = virtual.chunks[0][0], virtual.chunks[1][0]
        try:
            target = ome.open_level(vpath, 0)
            fresh = target.shape != (3, *virtual.shape[:2]) or target.chunks != (3, cy, cx)
        except Exception:  # noqa: BLE001 - missing or an older layout: create
            fresh = True
        if fresh:  # white where not translated
            mpp = ds["he"].attrs.get("mpp")
            ome.create_image(vpath, virtual.shape[:2], kind="rgb", chunks=(cy, cx), mpp=mpp,
                             fill_value=255, name=f"{ctx.slide} virtual IHC",
                             attrs={"slide": ctx.slide, "model": str(cfg.translate.model)})
        margin = default_depth(resolve_model(cfg.nuclei.model))
        grown = [(max(0, y0 - margin), y1 + margin, max(0, x0 - margin), x1 + margin)
                 for y0, y1, x0, x1 in region]
        ys = np.concatenate([[0], np.cumsum(virtual.chunks[0])])
        xs = np.concatenate([[0], np.cumsum(virtual.chunks[1])])
        wanted = chunks_in_region(ys, xs, grown)
        blocks = virtual.to_delayed(optimize_graph=False)
        store = dask.delayed(_store_block, pure=True)
        tasks = []
        for i, j in zip(*np.nonzero(wanted)):
            reg = (int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1]))
            tasks.append(ctx.recorded(store(blocks[i, j, 0], str(vpath), reg), f"virtual-{i}_{j}"))
        ctx.compute(tasks)
        ctx.compute([ome.build_pyramid(vpath, compute=False)])  # level 0 complete
        image = da.from_zarr(ome.open_level(vpath, 0)).transpose(1, 2, 0)  # (y, x, 3)
        part = measure_on(ctx, image, "virtual", "virtual")
        sim = self._similarity(ctx, image, ds["ihc"].data, tiles, keep)
        part["ssim_virtual"] = sim[:, 0]
        part["psnr_virtual"] = sim[:, 1]
        return part

    def _similarity(self, ctx: SlideContext, virtual, real, tiles: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
        """Per kept tile: SSIM and PSNR of the virtual vs the real IHC (NaN for other tiles).

        The two sections are consecutive cuts, not the same cells, so these measure how IHC-like
        the virtual stain is (colour, texture, layout) rather than a pixel-exact match.
        """
        import dask

        out = np.full((len(tiles), 2), np.nan)
        idx = np.flatnonzero(keep)
        fn = dask.delayed(_similarity_block, pure=True)
        tasks = []
        for i in idx:
            r = tiles.iloc[i]
            sl = (slice(int(r.y0), int(r.y0 + r.height)), slice(int(r.x0), int(r.x0 + r.width)))
            tasks.append(ctx.recorded(fn(virtual[sl], real[sl]), f"similarity-{int(r.y0)}_{int(r.x0)}"))
        if tasks:
            out[idx] = np.array(ctx.compute(tasks))
        return out

    def tile_columns(self, part, keep, cfg) -> dict[str, Any]:
        cols = ratio_columns(part, keep, "virtual")
        cols["ssim_virtual"] = part["ssim_virtual"].to_numpy()
        cols["psnr_virtual"] = part["psnr_virtual"].to_numpy()
        return cols

    def summarize(self, part, keep, cfg) -> dict[str, Any]:
        return ratio_summary(part, keep, "virtual")
