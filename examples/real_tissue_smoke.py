"""What daskpath does on real tissue without a trained model: a smoke run on two real images.

Two real brightfield images ship with packages daskpath already depends on, so this runs offline:

* ``skimage.data.immunohistochemistry()``: 512 x 512 RGB, colonic glands, DAB IHC with
  hematoxylin counterstain. skimage's docstring: "colonic glands where the IHC expression of
  FHL2 protein is revealed with DAB", acquired at the Center for Microscopy And Molecular
  Imaging (CMMI). **FHL2, not Ki67**: its DAB is cytoplasmic and membranous, so the brown is
  around the nuclei, not in them.
* ``stardist.data.test_image_he_2d()``: 300 x 500 RGB H&E (JPEG), "from the Cancer Imaging
  Archive" (stardist's docstring); a densely cellular tumour.

Neither source gives a pixel size. Both are taken as **0.5 um/px (20x)**, derived from the
nuclei: hematoxylin blobs (Otsu on the H channel) have a median minor axis of 10.5 px in the IHC
(colonocyte and fibroblast nuclei are ~5 um wide) and 11 px in the H&E, whose confident StarDist
detections have a median area of ~175 px (44 um^2, an ~7.5 um nucleus). At 0.25 um/px (40x)
those nuclei would be 2-4 um across, too small for epithelial or tumour nuclei.

Stages run, all through the public API (NumPy in, or dask with any chunking):
tissue mask (fraction), SSIM of the image against itself, a 4-px shifted and a 2-degree rotated
copy, the tile table of the image paired with those copies (256-px tiles: per-tile
registration and the keep rule), HED colour deconvolution (H and DAB optical density), and
nuclei with the shipped phantom-trained StarDist model: ``method="nucleus"`` (fixed DAB threshold 0.15 and the classical
per-slide Otsu threshold, ``dab_threshold="auto"``) and ``method="two-channel"`` on both images.

Last, the H&E upsampled 2x (as if scanned at 0.25 um/px, 40x) shows whether the model follows
the nucleus size (``--rescale 0`` skips it).

Run ``python examples/real_tissue_smoke.py`` (about a minute on 2 cores): prints a table and
writes ``benchmarks/results/real_tissue.json``. ``tests/test_real_images.py`` imports the
functions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Assumed microns per pixel of both images (not documented by either source; see above).
ASSUMED_MPP = 0.5
#: DAB optical density above which a pixel counts as DAB-positive (the nuclei default too).
DAB_POSITIVE_OD = 0.15
#: DAB-rich compartment of the IHC: DAB OD smoothed with this Gaussian sigma (px) above
#: ``DAB_RICH_OD``. In the FHL2 image it is the glandular epithelium.
DAB_RICH_SIGMA = 4.0
DAB_RICH_OD = 0.3
SHIFT_PX = 4
#: Tile side of the tile tables (the images are 512 x 512 and 300 x 500 px).
TILE_SIZE = 256
ROTATE_DEG = 2.0
MODEL = "phantom"
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "real_tissue.json"


@dataclass(frozen=True)
class RealImage:
    """One real brightfield image with its provenance."""

    name: str
    rgb: np.ndarray
    mpp: float
    stain: str
    source: str
    description: str


def load_images() -> dict[str, RealImage]:
    """The two real images (both bundled with their packages: no download)."""
    import skimage.data
    from stardist.data import test_image_he_2d

    ihc = np.ascontiguousarray(skimage.data.immunohistochemistry())
    he = np.ascontiguousarray(test_image_he_2d()[..., :3])
    return {
        "ihc": RealImage(
            "ihc", ihc, ASSUMED_MPP, "DAB (FHL2) + hematoxylin",
            "skimage.data.immunohistochemistry()",
            "colonic glands, FHL2 IHC revealed with DAB, hematoxylin counterstain (CMMI)"),
        "he": RealImage(
            "he", he, ASSUMED_MPP, "H&E", "stardist.data.test_image_he_2d()",
            "H&E tumour tissue from the Cancer Imaging Archive (JPEG)"),
    }


def as_dask(rgb: np.ndarray, chunks: tuple[int, int] | None):
    """``rgb`` as it is (``chunks=None``) or as a dask array with ``chunks`` (y, x)."""
    if chunks is None:
        return rgb
    import dask.array as da

    return da.from_array(rgb, chunks=(chunks[0], chunks[1], 3))


def shifted(rgb: np.ndarray, px: int = SHIFT_PX) -> np.ndarray:
    """``rgb`` moved ``px`` pixels down and right (edge pixels repeated)."""
    out = np.pad(rgb, ((px, 0), (px, 0), (0, 0)), mode="edge")
    return out[: rgb.shape[0], : rgb.shape[1]]


def rotated(rgb: np.ndarray, degrees: float = ROTATE_DEG) -> np.ndarray:
    """``rgb`` rotated by ``degrees`` about its centre (reflected borders), uint8."""
    from skimage.transform import rotate

    out = rotate(rgb, degrees, mode="reflect", preserve_range=True, order=1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tissue_summary(rgb: np.ndarray, chunks: tuple[int, int] | None = None) -> dict[str, Any]:
    """Tissue fraction by :func:`daskpath.tissue_mask` (default threshold and smoothing)."""
    import daskpath

    mask = np.asarray(daskpath.tissue_mask(as_dask(rgb, chunks)))
    return {"tissue_fraction": float(mask.mean())}


def ssim_summary(rgb: np.ndarray, chunks: tuple[int, int] | None = None) -> dict[str, float]:
    """Mean SSIM map (:func:`daskpath.ssim_map`) of ``rgb`` vs itself, shifted and rotated."""
    import daskpath

    def mean_ssim(other: np.ndarray) -> float:
        return float(np.asarray(daskpath.ssim_map(as_dask(rgb, chunks),
                                                  as_dask(other, chunks))).mean())

    return {"self": mean_ssim(rgb), f"shift_{SHIFT_PX}px": mean_ssim(shifted(rgb)),
            f"rotate_{ROTATE_DEG:g}deg": mean_ssim(rotated(rgb))}


def tiles_summary(rgb: np.ndarray, chunks: tuple[int, int] | None = None,
                  size: int = TILE_SIZE) -> dict[str, Any]:
    """The tile table (:func:`daskpath.tile_table`: tissue, SSIM, per-tile registration, keep)
    of ``rgb`` paired with its shifted and its rotated copy, as if they were an H&E / IHC pair."""
    import daskpath

    # artefact QC flags these real fields as folds (and the IHC's dark DAB as bubbles / pen):
    # the detectors are phantom-tuned, so here they flag without excluding (qc.exclude false)
    cfg = daskpath.load_config(None, ["qc.exclude=false"])
    out: dict[str, Any] = {"size": size}
    for key, other in ((f"shift_{SHIFT_PX}px", shifted(rgb)),
                       (f"rotate_{ROTATE_DEG:g}deg", rotated(rgb))):
        t = daskpath.tile_table((as_dask(rgb, chunks), as_dask(other, chunks)), size=size,
                                slide="real", config=cfg)
        out[key] = {
            "tiles": len(t),
            "kept": int(t["keep"].sum()),
            "artefact": list(t["artefact"]),
            "registered": int(t["registered"].sum()),
            "ssim_rigid": [round(float(v), 4) for v in t["ssim_rigid"]],
            "ssim": [round(float(v), 4) for v in t["ssim"]],
            "dy": [None if np.isnan(v) else round(float(v), 2) for v in t["dy"]],
            "dx": [None if np.isnan(v) else round(float(v), 2) for v in t["dx"]],
        }
    return out


def stain_channels(rgb: np.ndarray, chunks: tuple[int, int] | None = None):
    """Hematoxylin and DAB OD (skimage HED vectors) as NumPy arrays."""
    from daskpath import stain

    h, dab = stain.hematoxylin_dab(as_dask(rgb, chunks))
    return np.asarray(h), np.asarray(dab)


def dab_rich(dab: np.ndarray) -> np.ndarray:
    """The DAB-rich compartment: smoothed DAB OD above :data:`DAB_RICH_OD`."""
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(dab.astype(np.float64), DAB_RICH_SIGMA) > DAB_RICH_OD


def stain_summary(rgb: np.ndarray, chunks: tuple[int, int] | None = None) -> dict[str, Any]:
    """H / DAB optical density percentiles and the DAB-positive and DAB-rich pixel fractions."""
    h, dab = stain_channels(rgb, chunks)
    pct = (1, 50, 99)
    return {
        "h_od_percentiles_1_50_99": [round(float(v), 4) for v in np.percentile(h, pct)],
        "dab_od_percentiles_1_50_99": [round(float(v), 4) for v in np.percentile(dab, pct)],
        "dab_positive_fraction": float((dab > DAB_POSITIVE_OD).mean()),
        "dab_rich_fraction": float(dab_rich(dab).mean()),
    }


def segment(rgb: np.ndarray, method: str, chunks: tuple[int, int] | None = None,
            dab_threshold: float | str = DAB_POSITIVE_OD):
    """The nuclei table of :func:`daskpath.measure_nuclei` with the shipped model."""
    import daskpath

    return daskpath.measure_nuclei(as_dask(rgb, chunks), MODEL, method=method,
                                   dab_threshold=dab_threshold)


def whole_image_ratios(df, shape: tuple[int, int]) -> tuple[float, float]:
    """(area ratio, count index) of one tile covering the image (:func:`tile_ratios`)."""
    import pandas as pd

    from daskpath.nuclei import tile_ratios

    tile = pd.DataFrame({"y0": [0], "x0": [0], "height": [shape[0]], "width": [shape[1]]})
    r = tile_ratios(df, tile, suffix="x").iloc[0]
    return float(r["ratio_x"]), float(r["ki67_index_x"])


def nuclei_summary(df, mpp: float, shape: tuple[int, int],
                   rich: np.ndarray | None = None) -> dict[str, Any]:
    """Counts, sizes (um^2) and ratios of a nuclei table; split by compartment with ``rich``."""
    area_um2 = df["area"].to_numpy(np.float64) * mpp * mpp
    field_mm2 = shape[0] * shape[1] * (mpp * 1e-3) ** 2
    ratio, index = whole_image_ratios(df, shape)
    out: dict[str, Any] = {
        "count": len(df),
        "per_mm2": round(len(df) / field_mm2, 1),
        "median_area_um2": round(float(np.median(area_um2)), 2) if len(df) else None,
        "area_um2_q10_q90": ([round(float(v), 2) for v in np.percentile(area_um2, [10, 90])]
                             if len(df) else None),
        # detections StarDist is confident about (the phantom model's threshold is 0.46)
        "count_prob_over_0.8": int((df["prob"] > 0.8).sum()),
        "n_positive": int(df["positive"].sum()),
        "ratio_area": round(ratio, 4),
        "index_count": round(index, 4),
    }
    if "dab_threshold" in df.attrs:
        out["dab_threshold"] = round(float(df.attrs["dab_threshold"]), 4)
    channels = sorted(set(df["channel"])) if len(df) else []
    if set(channels) <= {"dab", "hematoxylin"} and channels:
        out["count_by_channel"] = {c: int((df["channel"] == c).sum()) for c in channels}
        out["median_area_um2_by_channel"] = {
            c: round(float(np.median(area_um2[(df["channel"] == c).to_numpy()])), 2)
            for c in channels}
    if rich is not None and len(df):
        yy = np.clip(np.floor(df["y"].to_numpy()).astype(int), 0, shape[0] - 1)
        xx = np.clip(np.floor(df["x"].to_numpy()).astype(int), 0, shape[1] - 1)
        inside = rich[yy, xx]
        px_mm2 = (mpp * 1e-3) ** 2
        for key, sel, region in (("dab_rich", inside, rich), ("dab_poor", ~inside, ~rich)):
            n_px = int(region.sum())
            out[key] = {
                "count": int(sel.sum()),
                "per_mm2": round(sel.sum() / (n_px * px_mm2), 1) if n_px else None,
                # share of the compartment covered by nucleus area (about 0.2-0.4 in real tissue)
                "area_coverage": round(float(df["area"].to_numpy()[sel].sum()) / n_px, 3)
                if n_px else None,
                "positive_fraction": round(float(df["positive"].to_numpy()[sel].mean()), 3)
                if sel.any() else None,
            }
            if "count_by_channel" in out:
                ch = df["channel"].to_numpy()[sel]
                out[key]["count_by_channel"] = {c: int((ch == c).sum()) for c in channels}
    return out


def run_image(img: RealImage, chunks: tuple[int, int] | None = None,
              methods: tuple[str, ...] = ("nucleus", "nucleus-auto", "two-channel"),
              tables: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every stage on one image; ``methods`` picks the nuclei runs (``nucleus-auto``: Otsu).

    ``tables``, when given, receives each method's nuclei table (a pandas DataFrame).
    """
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "source": img.source, "description": img.description, "stain": img.stain,
        "shape": list(img.rgb.shape), "mpp_assumed": img.mpp,
        "field_um": [round(s * img.mpp, 1) for s in img.rgb.shape[:2]],
    }
    res |= tissue_summary(img.rgb, chunks)
    res["ssim"] = ssim_summary(img.rgb, chunks)
    res["tiles"] = tiles_summary(img.rgb, chunks)
    res["stain"] = stain_summary(img.rgb, chunks)
    _, dab = stain_channels(img.rgb, chunks)
    rich = dab_rich(dab) if img.name == "ihc" else None
    res["nuclei"] = {}
    shape = img.rgb.shape[:2]
    for m in methods:
        t = time.perf_counter()
        if m == "nucleus-auto":
            df = segment(img.rgb, "nucleus", chunks, dab_threshold="auto")
        else:
            df = segment(img.rgb, m, chunks)
        if tables is not None:
            tables[m] = df
        res["nuclei"][m] = nuclei_summary(df, img.mpp, shape, rich) | {
            "seconds": round(time.perf_counter() - t, 2)}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def scale_check(img: RealImage, factor: int = 2) -> dict[str, Any]:
    """Nuclei (``method="nucleus"``) on ``img`` upsampled ``factor`` times, as if scanned at
    ``mpp / factor`` (40x for the 20x images here): does the model follow the nucleus size?"""
    from skimage.transform import rescale

    big = rescale(img.rgb, factor, channel_axis=-1, preserve_range=True, order=1)
    big = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    base = segment(img.rgb, "nucleus")
    up = segment(big, "nucleus")
    return {
        "factor": factor,
        "mpp_simulated": img.mpp / factor,
        "count": [len(base), len(up)],
        "median_area_px": [float(base["area"].median()), float(up["area"].median())],
        "median_area_um2": [round(float(base["area"].median()) * img.mpp**2, 2),
                            round(float(up["area"].median()) * (img.mpp / factor) ** 2, 2)],
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("daskpath", "stardist", "tensorflow-cpu", "tensorflow", "scikit-image", "dask"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run(chunks: tuple[int, int] | None = None, rescale: int = 2) -> dict[str, Any]:
    """The whole smoke run on both images; a JSON-serialisable dict.

    ``rescale`` > 1 adds :func:`scale_check` on the H&E (``0``: skip it).
    """
    images = load_images()
    out = {
        "what": "daskpath on real tissue without a trained model (examples/real_tissue_smoke.py)",
        "model": MODEL,
        "mpp_note": "neither source documents a pixel size; 0.5 um/px (20x) derived from "
                    "nucleus widths (see the example's docstring)",
        "dab_positive_od": DAB_POSITIVE_OD,
        "dab_rich": {"sigma_px": DAB_RICH_SIGMA, "od": DAB_RICH_OD},
        "chunks": list(chunks) if chunks else None,
        "images": {k: run_image(v, chunks) for k, v in images.items()},
        "versions": versions(),
    }
    if rescale > 1:
        out["scale_check_he"] = scale_check(images["he"], rescale)
    return out


def table(results: dict[str, Any]) -> str:
    """A plain-text table of the results."""
    rows = []
    for name, r in results["images"].items():
        s = r["stain"]
        rows.append(f"{name}: {r['source']}  {r['shape'][0]}x{r['shape'][1]} px at "
                    f"{r['mpp_assumed']} um/px (assumed) = "
                    f"{r['field_um'][0]:g}x{r['field_um'][1]:g} um")
        rows.append(f"  tissue fraction {r['tissue_fraction']:.3f}   SSIM vs "
                    + ", ".join(f"{k} {v:.3f}" for k, v in r["ssim"].items()))
        for key, t in r["tiles"].items():
            if key == "size":
                continue
            rows.append(f"  tile table ({r['tiles']['size']} px) vs {key}: kept {t['kept']}/"
                        f"{t['tiles']}, registered {t['registered']}; SSIM rigid "
                        f"{t['ssim_rigid']} -> {t['ssim']}; dy {t['dy']} dx {t['dx']}")
        rows.append(f"  H OD p1/50/99 {s['h_od_percentiles_1_50_99']}  DAB OD p1/50/99 "
                    f"{s['dab_od_percentiles_1_50_99']}  DAB>{results['dab_positive_od']} "
                    f"{s['dab_positive_fraction']:.3f}  DAB-rich {s['dab_rich_fraction']:.3f}")
        rows.append(f"  {'nuclei':<13}{'count':>6}{'/mm2':>8}{'med um2':>9}{'pos':>5}"
                    f"{'ratio':>7}{'index':>7}  notes")
        for m, n in r["nuclei"].items():
            notes = []
            if "dab_threshold" in n:
                notes.append(f"thr {n['dab_threshold']:.3f}")
            if "count_by_channel" in n:
                notes.append(", ".join(f"{k} {v}" for k, v in n["count_by_channel"].items()))
            for key in ("dab_rich", "dab_poor"):
                if key in n:
                    notes.append(f"{key} {n[key]['count']} ({n[key]['per_mm2']:.0f}/mm2, "
                                 f"cover {n[key]['area_coverage']:.2f})")
            rows.append(f"  {m:<13}{n['count']:>6}{n['per_mm2']:>8.0f}{n['median_area_um2']:>9.1f}"
                        f"{n['n_positive']:>5}{n['ratio_area']:>7.3f}{n['index_count']:>7.3f}  "
                        + "; ".join(notes))
    sc = results.get("scale_check_he")
    if sc:
        rows.append(f"he upsampled {sc['factor']}x (as if {sc['mpp_simulated']:g} um/px), "
                    f"method nucleus: {sc['count'][0]} -> {sc['count'][1]} nuclei, median area "
                    f"{sc['median_area_px'][0]:g} -> {sc['median_area_px'][1]:g} px "
                    f"({sc['median_area_um2'][0]:g} -> {sc['median_area_um2'][1]:g} um2)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    p.add_argument("--chunks", type=int, nargs=2, metavar=("Y", "X"),
                   help="run on dask arrays with these chunks (default: whole NumPy images)")
    p.add_argument("--rescale", type=int, default=2,
                   help="also segment the H&E upsampled this many times (0: skip; default 2)")
    args = p.parse_args(argv)
    import dask

    with dask.config.set(scheduler="threads", num_workers=2):
        results = run(tuple(args.chunks) if args.chunks else None, args.rescale)
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
