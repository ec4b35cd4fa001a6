"""Figures of a translator on held-out slides: phantom seeds, or the test split of a tile export.

:func:`evaluate_pairs` scores a model on the ``test`` split of
:func:`daskpath.translate.tilepairs.export_tile_pairs` (slides the model never saw): each H&E
tile is translated (slide-level norm statistics from that slide's test tiles), nuclei are
measured on the virtual and on the real IHC tile with the same light measure
(:func:`daskpath.translate.score.measure_dab_nuclei`), and the per-tile and per-slide Ki67 area
ratios are compared (:func:`~daskpath.translate.score.ratio_metrics`: accuracy at 0.05/0.1/0.2,
MSE, MAE, 3-class accuracy, balanced accuracy, confusion), with SSIM/PSNR of virtual vs real.
The two sections are consecutive cuts, so the comparison is of ratios, not pixels.

For each held-out seed a phantom pair is written with :func:`daskpath.synthetic.make_pair`, the
H&E is translated with :func:`daskpath.translate.translate` (dask, tiled, seam-free), nuclei are
measured on the virtual IHC with :func:`daskpath.translate.score.measure_dab_nuclei` and the
per-tile Ki67 area ratio is compared with the truth table (H&E frame). The same measure on the
real IHC (IHC frame) is reported as the measure's own error floor. SSIM / PSNR compare the
virtual IHC with the real IHC cropped at the known section offset, over tissue.

``python -m daskpath.translate.evaluate MODEL OUT_JSON [--seeds 100 101] [--size 4096 4096]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["evaluate_phantom", "evaluate_pairs", "main"]


def evaluate_phantom(
    model: str | Path = "phantom",
    seeds: Sequence[int] = (100, 101),
    size: tuple[int, int] = (4096, 4096),
    tile: int = 1024,
    min_tissue: float = 0.5,
    workdir: str | Path | None = None,
    batch_size: int = 8,
    amp: str | bool | None = None,
) -> dict:
    """Per-tile ratio metrics (virtual vs truth, real vs truth) and SSIM/PSNR on held-out slides."""
    import dask

    from daskpath.io import open_pair
    from daskpath.synthetic import make_pair
    from daskpath.translate.inference import translate
    from daskpath.translate.score import (image_similarity, measure_dab_nuclei, ratio_metrics,
                                          tile_ratios_from_nuclei, truth_tile_ratios)

    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    wd = Path(tmp.name if tmp else workdir)
    rows, sims, timing = [], [], {}
    try:
        for s in seeds:
            p = make_pair(wd, slide=f"heldout{s}", size=size, seed=s)
            ds = open_pair(p.he, p.ihc)
            he = ds["he"].data
            t = time.time()
            with dask.config.set(scheduler="threads"):
                virt = translate(he, model, batch_size=batch_size, amp=amp).compute()
            timing[f"seed{s}_translate_s"] = round(time.time() - t, 1)
            real = ds["ihc"].data.compute()
            he_np = he.compute()
            dy, dx = p.offset
            truth = truth_tile_ratios(p.truth_nuclei, size, tile, frame="he")
            truth_ihc = truth_tile_ratios(p.truth_nuclei, size, tile, frame="ihc")
            v = tile_ratios_from_nuclei(measure_dab_nuclei(virt), size, tile)
            r = tile_ratios_from_nuclei(measure_dab_nuclei(real), size, tile)
            tissue = (he_np.min(axis=2) < 215)
            h, w = size
            frac = [tissue[y:y + tile, x:x + tile].mean() for y, x in zip(truth["y0"], truth["x0"])]
            rows.append(pd.DataFrame({"seed": s, "y0": truth["y0"], "x0": truth["x0"], "tissue": frac,
                                      "truth": truth["ratio"], "virtual": v["ratio"],
                                      "truth_ihc": truth_ihc["ratio"], "real": r["ratio"],
                                      "n_truth": truth["n"], "n_virtual": v["n"]}))
            # aligned overlap: virtual[y, x] ~ real[y + dy, x + dx]
            ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
            ysr, xsr = slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx))
            sims.append(image_similarity(virt[ys, xs], real[ysr, xsr], tissue[ys, xs]))
    finally:
        if tmp:
            tmp.cleanup()
    df = pd.concat(rows, ignore_index=True)
    kept = df[df["tissue"] >= min_tissue]
    return {
        "model": str(model), "amp": amp, "seeds": list(seeds), "size": list(size), "tile": tile,
        "min_tissue": min_tissue, "n_tiles": int(len(kept)),
        "virtual_vs_truth": ratio_metrics(kept["virtual"], kept["truth"]),
        "real_vs_truth": ratio_metrics(kept["real"], kept["truth_ihc"]),
        "ssim": float(np.mean([s["ssim"] for s in sims])), "psnr": float(np.mean([s["psnr"] for s in sims])),
        "timing": timing, "tiles": kept.round(4).to_dict(orient="records"),
    }


def _area_ratio(nuclei: pd.DataFrame) -> tuple[float, float, float]:
    """``(ratio, positive area, all area)`` of a nuclei table (NaN ratio without nuclei)."""
    a = nuclei["area"].to_numpy(float)
    pos = float((a * nuclei["positive"].to_numpy(bool)).sum())
    tot = float(a.sum())
    return (pos / tot if tot > 0 else float("nan")), pos, tot


def evaluate_pairs(model: str | Path, root: str | Path, split: str = "test", *, n_stat_tiles: int = 16,
                   min_nuclei: int = 1) -> dict:
    """Score ``model`` on a split of an exported tile-pair folder (see the module docstring).

    Parameters
    ----------
    model : str or Path
        Model folder, checkpoint or shipped name.
    root : path
        An export of :func:`~daskpath.translate.tilepairs.export_tile_pairs` (``pairs.csv``).
    split : str
        Which split to score (``"test"``: slides held out of training).
    n_stat_tiles : int
        256 px windows per slide for the slide-level norm statistics.
    min_nuclei : int
        Tiles with fewer nuclei on the real IHC are left out of the ratio metrics.

    Returns
    -------
    dict
        ``tiles`` and ``slides``: ratio metrics of virtual vs real (same measure both sides);
        ``ssim``, ``psnr``; ``virtual_vs_ratio_ihc`` when the tile table had the nuclei stage's
        ``ratio_ihc``; ``n_tiles``, ``slides_scored`` and per-tile rows.
    """
    from PIL import Image

    from daskpath.errors import InvalidInputError
    from daskpath.translate.checkpoints import load_generator
    from daskpath.translate.inference import (TranslatorRef, auto_tile, get_generator, resolve_translator,
                                              sample_tiles, slide_norm_stats, translate_array)
    from daskpath.translate.score import image_similarity, measure_dab_nuclei, ratio_metrics

    root = Path(root)
    if not (root / "pairs.csv").is_file():
        raise InvalidInputError(f"{root / 'pairs.csv'} not found; export tile pairs first "
                                "(daskpath.translate.tilepairs.export_tile_pairs)")
    pairs = pd.read_csv(root / "pairs.csv")
    pairs = pairs[pairs["split"] == split].reset_index(drop=True)
    if pairs.empty:
        raise InvalidInputError(f"{root / 'pairs.csv'} has no {split!r} tiles; export with a test_fraction > 0")
    ref = resolve_translator(model)
    spec = ref.spec

    def load(rel: str, side: str) -> np.ndarray:
        img = np.asarray(Image.open(root / rel).convert("RGB"))
        if pairs["a"].iloc[0] == pairs["b"].iloc[0]:  # aligned layout: A | B
            w = img.shape[1] // 2
            return img[:, :w] if side == "a" else img[:, w:]
        return img

    rows, sims, per_slide = [], [], []
    t0 = time.time()
    for slide, g in pairs.groupby("slide", sort=False):
        he = [load(r, "a") for r in g["a"]]
        ihc = [load(r, "b") for r in g["b"]]
        if spec.norm == "instance":
            k = max(1, -(-n_stat_tiles // len(he)))
            wins = np.concatenate([sample_tiles(t, k, 256, seed=i, multiple=spec.multiple)
                                   for i, t in enumerate(he)])[:n_stat_tiles]
            net0, _ = load_generator(ref.model, spec)
            tref = TranslatorRef(ref.model, spec, "slide", slide_norm_stats(net0, wins, spec))
        else:
            tref = TranslatorRef(ref.model, spec, "running")
        net = get_generator(tref, "cpu")
        pa = ta = 0.0
        pv = tv = 0.0
        for r, a, b in zip(g.itertuples(index=False), he, ihc):
            tile = auto_tile(a.shape, spec, spec.halo, True) if spec.arch.startswith("resnet") else spec.tile
            virt = translate_array(a, net, spec, tile=tile, halo=spec.halo)
            nv, nr = measure_dab_nuclei(virt), measure_dab_nuclei(b)
            (rv, p1, t1), (rr, p2, t2) = _area_ratio(nv), _area_ratio(nr)
            pv, tv, pa, ta = pv + p1, tv + t1, pa + p2, ta + t2
            sims.append(image_similarity(virt, b, a.min(axis=2) < 215))
            rows.append({"slide": slide, "y0": int(r.y0), "x0": int(r.x0), "virtual": rv, "real": rr,
                         "n_virtual": int(len(nv)), "n_real": int(len(nr)),
                         "ratio_ihc": float(getattr(r, "ratio_ihc", np.nan))})
        per_slide.append({"slide": slide, "virtual": pv / tv if tv else np.nan, "real": pa / ta if ta else np.nan})
    df = pd.DataFrame(rows)
    ok = df["n_real"] >= min_nuclei
    res = {"model": str(model), "root": str(root), "split": split, "n_tiles": int(len(df)),
           "slides_scored": sorted(df["slide"].unique().tolist()),
           "measure": "light DAB measure (score.measure_dab_nuclei) on both the virtual and the real IHC",
           "tiles": ratio_metrics(df.loc[ok, "virtual"], df.loc[ok, "real"]),
           "slides": ratio_metrics([s["virtual"] for s in per_slide], [s["real"] for s in per_slide]),
           "ssim": float(np.nanmean([s["ssim"] for s in sims])),
           "psnr": float(np.nanmean([s["psnr"] for s in sims if np.isfinite(s["psnr"])] or [np.nan])),
           "seconds": round(time.time() - t0, 1)}
    if df["ratio_ihc"].notna().any():
        res["virtual_vs_ratio_ihc"] = ratio_metrics(df["virtual"], df["ratio_ihc"])
    res["per_slide"] = per_slide
    res["per_tile"] = df.round(4).to_dict(orient="records")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daskpath.translate.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="shipped model name, model folder or .pth")
    p.add_argument("out_json")
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--size", type=int, nargs=2, default=[4096, 4096])
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--amp", choices=["fp16", "bf16"], default=None,
                   help="autocast for the translation (default: none on CPU, fp16 on CUDA)")
    a = p.parse_args(argv)
    res = evaluate_phantom(a.model, a.seeds, tuple(a.size), a.tile, amp=a.amp)
    Path(a.out_json).write_text(json.dumps(res, indent=2) + "\n")
    short = {k: v for k, v in res.items() if k != "tiles"}
    print(json.dumps(short, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
