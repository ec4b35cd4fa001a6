"""Figures of a translator on held-out phantom slides (slide-level split: unseen seeds).

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

__all__ = ["evaluate_phantom", "main"]


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
