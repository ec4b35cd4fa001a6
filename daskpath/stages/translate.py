"""Stage ``translate``: virtual IHC from the H&E (GAN generator), then the nuclei stage on it.

Only what the nuclei step on the virtual IHC reads is translated: its chunks that meet a kept
tile, each grown by its halo (:func:`nuclei_reads`; with the default ``nuclei.chunk_size`` these
are the kept tiles grown by :func:`~daskpath.nuclei.default_depth`), plus, inside the zarr
chunks that meet such a grown tile (those the whole-chunk translation translated), the blocks
that its slide-level normalisation samples (:func:`percentile_blocks`). So the nuclei of kept
tiles see the same pixels as before (up to float rounding); the rest of the layer stays white
(the zarr fill value) and holds no nuclei. Each zarr chunk of ``virtual.zarr`` that holds translated pixels is written
whole by one task, which translates only a few boxes of it (:func:`chunk_boxes`, each read with
the generator's halo from the H&E: :meth:`RegionTranslator.region`), and recorded, and the
nuclei chunks are recorded as in the nuclei stage, so an interrupted stage resumes chunk by
chunk. Generators whose output depends on the window layout (U-Nets, ``norm_stats: tile``,
``blend: feather``) translate whole chunks instead (:attr:`RegionTranslator.exact_boxes`).

Part table: ``ratio_virtual`` / ``ki67_index_virtual`` and their sums, plus ``ssim_virtual`` and
``psnr_virtual`` (how IHC-like the virtual stain is on each kept tile). Published:
``layers/<slide>.virtual.zarr``, an OME-NGFF 0.5 RGB image (axes ``c, y, x`` in micrometres,
level 0 written chunk by chunk, then its pyramid) holding the nucleus label images of the
virtual IHC as NGFF labels ``labels/nuclei`` (ids) and ``labels/ki67`` (1 negative,
2 positive), and ``nuclei/<slide>.virtual.{parquet,geojson,json}``.
"""

from __future__ import annotations

import itertools
import logging
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

log = logging.getLogger(__name__)

__all__ = ["TranslateStage", "chunk_boxes", "nuclei_reads", "percentile_blocks", "translation_plan"]

Box = tuple[int, int, int, int]
"""A half-open pixel rectangle ``(y0, y1, x0, x1)``."""


def _translate_chunk(tr, src, shape: tuple[int, int], chunk: Box, boxes: list[Box], path: str) -> np.ndarray:
    """Translate ``boxes`` of one zarr chunk of the virtual image (white elsewhere), write the
    whole chunk into level 0 (NGFF ``c, y, x``) and return a tiny done-record
    ``[y0, y1, x0, x1, translated pixels]``."""
    from daskpath import ome

    y0, y1, x0, x1 = chunk
    out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
    for b in boxes:
        out[b[0] - y0:b[1] - y0, b[2] - x0:b[3] - x0] = tr.region(src, b, shape)
    ome.write_region(path, y0, x0, out, channel_last=True)
    return np.array([y0, y1, x0, x1, sum((b[1] - b[0]) * (b[3] - b[2]) for b in boxes)], np.int64)


def _clip(boxes, chunk: Box) -> list[Box]:
    y0, y1, x0, x1 = chunk
    out = [(max(a, y0), min(b, y1), max(c, x0), min(d, x1)) for a, b, c, d in boxes]
    return [r for r in out if r[0] < r[1] and r[2] < r[3]]


def _bbox(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _disjoint(rects: list[Box]) -> list[Box]:
    """The union of ``rects`` as disjoint rectangles: horizontal bands between their y edges,
    each cut into its merged x intervals; equal neighbouring bands joined."""
    edges = sorted({v for r in rects for v in (r[0], r[1])})
    bands: list[list] = []
    for a, b in itertools.pairwise(edges):
        ivs: list[list[int]] = []
        for x0, x1 in sorted((r[2], r[3]) for r in rects if r[0] < b and r[1] > a):
            if ivs and x0 <= ivs[-1][1]:
                ivs[-1][1] = max(ivs[-1][1], x1)
            else:
                ivs.append([x0, x1])
        key = tuple(map(tuple, ivs))
        if bands and bands[-1][1] == a and bands[-1][2] == key:
            bands[-1][1] = b
        elif key:
            bands.append([a, b, key])
    return [(a, b, x0, x1) for a, b, key in bands for x0, x1 in key]


def chunk_boxes(rects: list[Box], chunk: Box, snap, halo: int) -> list[Box]:
    """A few boxes that cover ``rects`` inside ``chunk``, cheap to translate with a ``halo``.

    The rectangles are clipped to the chunk and snapped outward to the generator's stride grid
    (``snap``, :meth:`RegionTranslator.snap`), their union is cut into disjoint rectangles,
    then two boxes are merged into their bounding box while that costs no more pixels, halo
    included (``(h + 2 halo) (w + 2 halo)`` each). The boxes cover every rectangle.
    """
    boxes = sorted(_disjoint([snap(r) for r in _clip(rects, chunk)]))

    def cost(b: Box) -> int:
        return (b[1] - b[0] + 2 * halo) * (b[3] - b[2] + 2 * halo)

    merged = True
    while merged and len(boxes) > 1:
        merged = False
        best = None
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                gain = cost(boxes[i]) + cost(boxes[j]) - cost(_bbox(boxes[i], boxes[j]))
                if gain >= 0 and (best is None or gain > best[0]):
                    best = (gain, i, j)
        if best is not None:
            _, i, j = best
            boxes = [*boxes[:i], *boxes[i + 1:j], *boxes[j + 1:], _bbox(boxes[i], boxes[j])]
            merged = True
    return boxes


def _grid(cfg, shape: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The chunks ``measure_on`` gives the nuclei step's image (``nuclei.chunk_size or
    tiles.size`` squares), as ``dask`` lays them out."""
    from dask.array.core import normalize_chunks

    n = int(cfg.nuclei.chunk_size or cfg.tiles.size)
    return normalize_chunks((n, n), tuple(int(v) for v in shape))


def nuclei_reads(cfg, shape: tuple[int, int], kept: list[Box]) -> list[Box]:
    """The pixels the nuclei step reads on the virtual IHC: its chunks that meet a kept tile,
    each grown by its halo and clipped to the slide (as :func:`daskpath.nuclei.segment_nuclei`
    lays them out for :func:`~daskpath.stages.nuclei.measure_on`: chunks of
    ``nuclei.chunk_size or tiles.size`` aligned to the model's ``div_by``, halo
    :func:`~daskpath.nuclei.default_depth`)."""
    from daskpath.nuclei import chunks_in_region, resolve_model, segment_layout

    h, w = (int(v) for v in shape)
    cy, cx, depth = segment_layout(resolve_model(cfg.nuclei.model), _grid(cfg, shape), (h, w))
    ys = np.concatenate([[0], np.cumsum(cy)])
    xs = np.concatenate([[0], np.cumsum(cx)])
    wanted = chunks_in_region(ys, xs, kept)
    return [(max(0, int(ys[i]) - depth), min(h, int(ys[i + 1]) + depth),
             max(0, int(xs[j]) - depth), min(w, int(xs[j + 1]) + depth))
            for i, j in zip(*np.nonzero(wanted))]


def percentile_blocks(cfg, shape: tuple[int, int]) -> list[Box]:
    """The blocks of the virtual IHC that the nuclei step samples for its slide-level
    normalisation (:func:`daskpath.nuclei.slide_percentiles`, and the Macenko stain vectors
    when ``nuclei.stain_matrix: macenko``): :func:`daskpath.stain.sample_blocks`, the pick of
    :func:`daskpath.stain.sample_pixels` (same seed), over the chunks ``measure_on`` gives
    the image.

    Their pixels set the normalisation of every nucleus, so where the whole-chunk translation
    translated them they are translated here too.
    """
    cy, cx = _grid(cfg, shape)
    ys = np.concatenate([[0], np.cumsum(cy)])
    xs = np.concatenate([[0], np.cumsum(cx)])
    from daskpath.stain import sample_blocks

    sizes = [2_000_000]  # slide_percentiles' max_pixels
    if cfg.nuclei.stain_matrix == "macenko":
        sizes.append(200_000)  # sample_pixels' default
    out: set[Box] = set()
    for max_pixels in sizes:
        for i, j in sample_blocks((len(cy), len(cx)), cy[0] * cx[0], max_pixels,
                                  np.random.default_rng(0)):
            out.add((int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1])))
    return sorted(out)


def translation_plan(cfg, shape: tuple[int, int], chunks: tuple[tuple[int, ...], tuple[int, ...]],
                     kept: list[Box], tr) -> dict[tuple[int, int], tuple[Box, list[Box]]]:
    """What the stage translates: ``{(i, j): (zarr chunk, boxes to translate in it)}``.

    The boxes cover, inside each chunk, the pixels the nuclei step reads (:func:`nuclei_reads`
    of the ``kept`` tiles ``(y0, y1, x0, x1)``) and, in the chunks that meet a kept tile grown
    by the nuclei halo (those the whole-chunk translation translated), the blocks its
    normalisation samples (:func:`percentile_blocks`). When the translator ``tr`` cannot
    translate boxes exactly (:attr:`RegionTranslator.exact_boxes`) a box is a whole chunk.
    Chunks without pixels to translate are left out (white).
    """
    from daskpath.nuclei import chunks_in_region, default_depth, resolve_model

    margin = default_depth(resolve_model(cfg.nuclei.model))
    grown = [(max(0, y0 - margin), y1 + margin, max(0, x0 - margin), x1 + margin)
             for y0, y1, x0, x1 in kept]
    ys = np.concatenate([[0], np.cumsum(chunks[0])])
    xs = np.concatenate([[0], np.cumsum(chunks[1])])
    reads = nuclei_reads(cfg, shape, kept)
    near = chunks_in_region(ys, xs, grown)
    sampled = percentile_blocks(cfg, shape)
    wanted = chunks_in_region(ys, xs, reads)
    plan = {}
    for i, j in zip(*np.nonzero(wanted | near)):
        chunk = (int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1]))
        rects = reads + (sampled if near[i, j] else [])
        if tr.exact_boxes:
            boxes = chunk_boxes(rects, chunk, lambda b: tr.snap(b, shape), tr.depth)
        else:  # the output depends on the window layout: whole chunks, as translate() does
            boxes = [chunk] if _clip(rects, chunk) else []
        if boxes:
            plan[int(i), int(j)] = (chunk, boxes)
    return plan


class _DaskRegion:
    """``src[ys, xs]`` over a dask array (a reader for slides not opened by daskpath.io)."""

    def __init__(self, arr) -> None:
        self.arr = arr

    def __getitem__(self, key):
        return np.asarray(self.arr[key].compute(scheduler="sync"))


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
    # 2: virtual.zarr is an OME-NGFF image with its labels inside
    # 3: only what the nuclei step reads is translated (boxes, not whole chunks): the other
    #    pixels of once-translated chunks are now white
    version = 3
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
        from daskpath.errors import InvalidInputError
        from daskpath.io import interleaved, region_source
        from daskpath.translate.inference import translator

        cfg = ctx.cfg
        ds = ctx.pair()
        tiles, keep = ctx.tiles()
        kept = tiles[keep]
        region = list(zip(kept["y0"], kept["y0"] + kept["height"], kept["x0"], kept["x0"] + kept["width"]))
        ann = model_annotations(ctx.client)
        check_runnable(ctx.client, ann)
        he = ds["he"].data
        tr = translator(he, cfg.translate.model, batch_size=cfg.translate.batch_size,
                        blend=cfg.translate.blend, norm_stats=cfg.translate.norm_stats)
        shape = (int(he.shape[0]), int(he.shape[1]))
        cy, cx = tr.chunks(he.chunks)
        vpath = ctx.work / "virtual.zarr"
        try:
            target = ome.open_level(vpath, 0)
            fresh = target.shape != (3, *shape) or target.chunks != (3, cy[0], cx[0])
        except Exception:  # noqa: BLE001 - missing or an older layout: create
            fresh = True
        if fresh:  # white where not translated
            mpp = ds["he"].attrs.get("mpp")
            ome.create_image(vpath, shape, kind="rgb", chunks=(cy[0], cx[0]), mpp=mpp,
                             fill_value=255, name=f"{ctx.slide} virtual IHC",
                             attrs={"slide": ctx.slide, "model": str(cfg.translate.model)})
        plan = translation_plan(cfg, shape, (cy, cx), region, tr)
        try:
            src = region_source(ds["he"])
        except InvalidInputError:  # not opened by daskpath.io: read through the dask array
            src = _DaskRegion(he)
        task = dask.delayed(_translate_chunk, pure=True)
        token = dask.base.tokenize(he, plan, str(vpath))
        tasks = []
        for (i, j), (chunk, boxes) in plan.items():
            with dask.annotate(**({"resources": ann["resources"]} if ann.get("resources") else {})):
                t = task(tr, src, shape, chunk, boxes, str(vpath),
                         dask_key_name=f"{tr.name}-box-{token}-{i}_{j}")
            tasks.append(ctx.recorded(t, f"virtual-{i}_{j}"))
        pixels = sum((b[1] - b[0]) * (b[3] - b[2]) for _, boxes in plan.values() for b in boxes)
        log.info("%s: translating %.1f MP in %d chunks (%s boxes)", ctx.slide, pixels / 1e6, len(tasks),
                 "exact" if tr.exact_boxes else "whole-chunk")
        ctx.compute(tasks)
        ctx.compute([ome.build_pyramid(vpath, compute=False)])  # level 0 complete
        image = interleaved(da.from_zarr(ome.open_level(vpath, 0)))  # (y, x, 3), contiguous
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
