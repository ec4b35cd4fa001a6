"""Phantom slides with known truth, for training and evaluating the baselines.

A :class:`PhantomSlide` is one H&E section written by :func:`daskpath.synthetic.make_pair`
(pyramidal JPEG TIFF, so the baselines learn from the pixels the pipeline reads) with its truth:

* ``truth``: one row per nucleus (``id, positive, y_he, x_he, area_he``, ...);
* ``he_labels``: nucleus ids on the H&E grid (``<slide>_truth.zarr/he_labels``).

The truth table lists the nuclei of the IHC section; the ~2 % of H&E nuclei that the IHC
section lost have no ``positive`` flag: their pixels are *unlabelled* (class ``-1``) and never
used for training or pixel accuracy, and they count in no truth ratio.

Truth ratio of a tile (H&E frame, the grid the baselines predict on): area of Ki67-positive
nuclei / area of all nuclei, each nucleus owned by the tile holding its H&E centroid
(:func:`daskpath.translate.score.truth_tile_ratios`, the translator's definition).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["PhantomSlide", "phantom_slide", "phantom_slides", "tissue_fraction", "heldout_tiles"]

#: Grey level under which the darkest channel counts as tissue (as in the translator's figures).
TISSUE_LEVEL = 215


@dataclass
class PhantomSlide:
    """One phantom H&E section and its truth (arrays in memory, labels read on demand)."""

    seed: int
    size: tuple[int, int]
    he: np.ndarray
    truth: pd.DataFrame
    labels_path: Path
    he_path: Path
    _positive: np.ndarray | None = field(default=None, repr=False)

    def he_labels(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Nucleus ids (int32, 0 = none) of the H&E window ``[y0, y1) x [x0, x1)``."""
        import zarr

        return np.asarray(zarr.open_group(str(self.labels_path), mode="r")["he_labels"][y0:y1, x0:x1])

    def pixel_classes(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixel classes of a window: 0 background, 1 Ki67-negative, 2 Ki67-positive nucleus,
        -1 unlabelled (a nucleus absent from the truth table), int8."""
        if self._positive is None:
            ids = self.truth["id"].to_numpy(np.int64)
            lut = np.full(int(ids.max()) + 2 if len(ids) else 1, -1, np.int8)
            lut[ids] = np.where(self.truth["positive"].to_numpy(bool), 2, 1)
            self._positive = lut
        lab = self.he_labels(y0, y1, x0, x1).astype(np.int64)
        lut = self._positive
        out = np.full(lab.shape, -1, np.int8)
        inside = lab < len(lut)
        out[inside] = lut[lab[inside]]
        out[lab == 0] = 0
        return out

    def truth_tiles(self, tile: int) -> pd.DataFrame:
        """Truth ratio per tile of a ``tile``-px grid: ``y0, x0, height, width, n, ratio, index``."""
        from daskpath.translate.score import truth_tile_ratios

        t = truth_tile_ratios(self.truth, self.size, tile, frame="he")
        h, w = self.size
        t["height"] = np.minimum(tile, h - t["y0"])
        t["width"] = np.minimum(tile, w - t["x0"])
        return t


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels whose darkest channel is below :data:`TISSUE_LEVEL`."""
    return float((np.asarray(rgb).min(axis=-1) < TISSUE_LEVEL).mean())


def phantom_slide(seed: int, size: tuple[int, int] = (4096, 4096),
                  workdir: str | os.PathLike[str] = ".", realism: str = "easy") -> PhantomSlide:
    """The phantom slide of ``seed``: written into ``workdir`` once, reused when present.

    ``realism`` is :func:`daskpath.synthetic.make_pair`'s (``"realistic"``: the same pixels as
    ``daskpath synth --realism realistic`` with that seed)."""
    import tifffile

    from daskpath.synthetic import make_pair

    wd = Path(workdir)
    slide = f"phantom_s{int(seed)}_{int(size[0])}x{int(size[1])}"
    if realism != "easy":
        slide += f"_{realism}"
    meta = wd / f"{slide}_truth.json"
    ok = False
    if meta.is_file():
        try:
            m = json.loads(meta.read_text())
            ok = m.get("seed") == int(seed) and list(m.get("size", [])) == [int(size[0]), int(size[1])]
        except ValueError:
            ok = False
    if not ok:
        make_pair(wd, slide=slide, size=(int(size[0]), int(size[1])), seed=int(seed), realism=realism)
    he_path = wd / f"{slide}_HE.tif"
    he = tifffile.imread(he_path)
    truth = pd.read_parquet(wd / f"{slide}_truth.parquet")
    return PhantomSlide(int(seed), (int(size[0]), int(size[1])), he, truth, wd / f"{slide}_truth.zarr",
                        he_path)


def phantom_slides(seeds: Sequence[int], size: tuple[int, int] = (4096, 4096),
                   workdir: str | os.PathLike[str] = ".", realism: str = "easy") -> list[PhantomSlide]:
    """:func:`phantom_slide` for each seed."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return [phantom_slide(s, size, workdir, realism) for s in seeds]


def heldout_tiles(slide: PhantomSlide, tile: int = 1024, min_tissue: float = 0.5) -> pd.DataFrame:
    """Grid tiles of a slide with tissue fraction >= ``min_tissue`` and their truth ratio.

    Columns ``y0, x0, height, width, tissue, n, truth`` (``truth``: area ratio, NaN without nuclei).
    """
    t = slide.truth_tiles(tile)
    t["tissue"] = [tissue_fraction(slide.he[y:y + h, x:x + w])
                   for y, x, h, w in zip(t["y0"], t["x0"], t["height"], t["width"])]
    t = t.rename(columns={"ratio": "truth"})
    keep = (t["tissue"] >= min_tissue) & np.isfinite(t["truth"])
    return t.loc[keep, ["y0", "x0", "height", "width", "tissue", "n", "truth"]].reset_index(drop=True)
