"""Cost of writing OME-NGFF images (axes ``c, y, x`` + pyramid) vs level 0 alone and the old layout.

Run: ``python benchmarks/bench_ngff.py [--quick] [--size 8192] [--repeats 3] [--json OUT]``

On a ``--size``^2 phantom pair (``daskpath.synthetic.make_pair``, tiled JPEG TIFF, generated
once per run), each item is timed ``--repeats`` times and the median reported:

1. **Full-resolution RGB image** (what the translate stage writes for the virtual IHC, and the
   largest image daskpath writes): the H&E pixels, in memory, written chunk by chunk (2048 px
   chunks, dask threads, ``--workers``) as

   * *old layout* (the baseline): a bare zarr array ``(y, x, 3)``, chunks ``(2048, 2048, 3)``;
   * *NGFF level 0*: :func:`daskpath.ome.create_image` + :func:`~daskpath.ome.write_region`
     into ``(3, y, x)`` (``c, y, x``) chunks;
   * *NGFF + pyramid*: the same, then :func:`~daskpath.ome.build_pyramid` (levels until the
     largest side is <= 1024 px, 2x2 mean, read back from level 0).

2. **Preprocess stage** (``daskpath.pipeline.run``, ``stages=[preprocess]``, LocalCluster of
   ``--workers`` processes x 1 thread, chunk 2048): ``layers.downsample=0`` (no layers) vs the
   default layers (1/8 NGFF image of three float channels + two RGB thumbnails, pyramids). The
   cluster start-up is excluded; each repeat writes into a fresh output folder.

3. **Ingest** of the H&E as a PNG into NGFF (``daskpath.io.ingest``, chunk 1024, pyramid built
   from the bands in memory) and the lookup a run makes to reuse it (probe + identity check).

Results go to ``--json`` (default ``benchmarks/results/ngff.json``; ``ngff-quick.json`` with
``--quick``: 4096^2). Ratios > 1 mean the NGFF way is slower. Tests never assert on these.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _median(fn, repeats: int, cpu=time.process_time) -> tuple[float, list[float], float]:
    """Median wall seconds, the runs, and median CPU seconds (``cpu()``: this process by
    default, the robust figure on a shared machine)."""
    times, cpus = [], []
    for _ in range(repeats):
        c, t = cpu(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        cpus.append(cpu() - c)
    return statistics.median(times), times, statistics.median(cpus)


def _rgb_writes(he: np.ndarray, root: Path, workers: int, repeats: int) -> dict:
    import dask
    import zarr

    from daskpath import ome

    h, w = he.shape[:2]
    c = 2048
    regions = [(y0, x0) for y0 in range(0, h, c) for x0 in range(0, w, c)]

    def old() -> None:
        p = root / "old.zarr"
        shutil.rmtree(p, ignore_errors=True)
        z = zarr.open_array(str(p), mode="w", shape=he.shape, chunks=(c, c, 3), dtype="uint8",
                            fill_value=255)

        def put(y0: int, x0: int) -> None:
            z[y0:y0 + c, x0:x0 + c] = he[y0:y0 + c, x0:x0 + c]

        dask.compute(*[dask.delayed(put)(*r) for r in regions], scheduler="threads",
                     num_workers=workers)

    def ngff(pyramid: bool) -> None:
        p = root / "ngff.zarr"
        shutil.rmtree(p, ignore_errors=True)
        ome.create_image(p, (h, w), kind="rgb", chunks=(c, c), mpp=0.5, fill_value=255)

        def put(y0: int, x0: int) -> None:
            ome.write_region(p, y0, x0, he[y0:y0 + c, x0:x0 + c], channel_last=True)

        dask.compute(*[dask.delayed(put)(*r) for r in regions], scheduler="threads",
                     num_workers=workers)
        if pyramid:
            ome.build_pyramid(p, compute=False).compute(scheduler="threads", num_workers=workers)

    t_old, r_old, c_old = _median(old, repeats)
    t_l0, r_l0, c_l0 = _median(lambda: ngff(False), repeats)
    t_pyr, r_pyr, c_pyr = _median(lambda: ngff(True), repeats)
    levels = ome.describe(root / "ngff.zarr")["levels"]
    return {
        "old_yxc_s": t_old, "ngff_level0_s": t_l0, "ngff_pyramid_s": t_pyr,
        "old_yxc_cpu_s": c_old, "ngff_level0_cpu_s": c_l0, "ngff_pyramid_cpu_s": c_pyr,
        "runs": {"old": r_old, "level0": r_l0, "pyramid": r_pyr},
        "levels": [lv["shape"] for lv in levels],
        "ratio_level0_vs_old": t_l0 / t_old,
        "ratio_pyramid_vs_level0": t_pyr / t_l0,
        "ratio_pyramid_vs_old": t_pyr / t_old,
        "cpu_ratio_level0_vs_old": c_l0 / c_old,
        "cpu_ratio_pyramid_vs_level0": c_pyr / c_l0,
        "cpu_ratio_pyramid_vs_old": c_pyr / c_old,
    }


def _preprocess(manifest: Path, root: Path, workers: int, repeats: int) -> dict:
    from distributed import Client, LocalCluster

    from daskpath.config import load_config
    from daskpath.pipeline import run

    out: dict = {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        n = [0]

        def cpu() -> float:  # user + system seconds of the workers and this process
            import resource

            def used() -> float:
                r = resource.getrusage(resource.RUSAGE_SELF)
                return r.ru_utime + r.ru_stime

            return sum(client.run(used).values()) + used()

        def once(downsample: int) -> None:
            n[0] += 1
            cfg = load_config(None, [f"slides={manifest}", f"output_dir={root / f'run{n[0]}'}",
                                     "stages=[preprocess]", "chunk_size=2048",
                                     f"layers.downsample={downsample}"])
            res = run(cfg, client=client)
            assert res.ok, res.failures

        once(8)  # warm the workers (imports, caches)
        for downsample in (0, 8):
            t, runs, c = _median(lambda d=downsample: once(d), repeats, cpu)
            out[f"downsample_{downsample}_s"] = t
            out[f"downsample_{downsample}_cpu_s"] = c
            out[f"downsample_{downsample}_runs"] = runs
    out["ratio_layers_vs_none"] = out["downsample_8_s"] / out["downsample_0_s"]
    out["cpu_ratio_layers_vs_none"] = out["downsample_8_cpu_s"] / out["downsample_0_cpu_s"]
    return out


def _ingest(he: np.ndarray, root: Path, repeats: int) -> dict:
    import pyvips

    from daskpath import io

    png = root / "x_HE.png"
    pyvips.Image.new_from_array(he).copy(xres=2000.0, yres=2000.0).pngsave(str(png),
                                                                           compression=1)
    t, runs, c = _median(lambda: io.ingest(png, chunk_size=1024, overwrite=True), repeats)
    t_reuse, _, _ = _median(lambda: io.open_slide(png, cache_dir=root / "cache"), repeats)
    assert not (root / "cache").exists()  # reused the ingest beside the PNG
    mb = he.nbytes / 1e6
    return {"ingest_s": t, "ingest_cpu_s": c, "ingest_runs": runs, "decoded_MB_per_s": mb / t,
            "reuse_lookup_s": t_reuse}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4096^2 instead of 8192^2")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", choices=("rgb", "preprocess", "ingest"), action="append")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    size = a.size or (4096 if a.quick else 8192)
    out_json = Path(a.json or Path(__file__).parent / "results" /
                    ("ngff-quick.json" if a.quick else "ngff.json"))

    import tifffile

    from daskpath.synthetic import make_cohort

    res: dict = {"size": size, "repeats": a.repeats, "workers": a.workers,
                 "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-ngff-") as tmp:
        root = Path(tmp)
        manifest = make_cohort(root / "slides", pairs=1, size=(size, size), seed=0)
        he = tifffile.imread(root / "slides" / "synth000_HE.tif", level=0)
        todo = a.only or ["rgb", "preprocess", "ingest"]
        if "rgb" in todo:
            (root / "rgb").mkdir()
            res["rgb_full_resolution"] = _rgb_writes(he, root / "rgb", a.workers, a.repeats)
            print("RGB image:", json.dumps(res["rgb_full_resolution"], default=str))
        if "preprocess" in todo:
            res["preprocess_stage"] = _preprocess(manifest, root / "pre", a.workers, a.repeats)
            print("preprocess:", json.dumps(res["preprocess_stage"]))
        if "ingest" in todo:
            (root / "ing").mkdir()
            res["ingest"] = _ingest(he, root / "ing", a.repeats)
            print("ingest:", json.dumps(res["ingest"]))
    res["load_avg_end"] = os.getloadavg()[0]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2, default=list) + "\n")
    print(f"\n{'item':<44}{'median s':>10}")
    if "rgb_full_resolution" in res:
        r = res["rgb_full_resolution"]
        for k in ("old_yxc_s", "ngff_level0_s", "ngff_pyramid_s"):
            print(f"RGB {size}^2 {k:<36}{r[k]:>10.2f}   cpu {r[k[:-2] + '_cpu_s']:.2f}")
        print(f"  ratios (wall / cpu): level0/old {r['ratio_level0_vs_old']:.2f} / "
              f"{r['cpu_ratio_level0_vs_old']:.2f}, pyramid/level0 "
              f"{r['ratio_pyramid_vs_level0']:.2f} / {r['cpu_ratio_pyramid_vs_level0']:.2f}, "
              f"pyramid/old {r['ratio_pyramid_vs_old']:.2f} / {r['cpu_ratio_pyramid_vs_old']:.2f}")
    if "preprocess_stage" in res:
        r = res["preprocess_stage"]
        print(f"preprocess no layers{'':<24}{r['downsample_0_s']:>10.2f}   cpu "
              f"{r['downsample_0_cpu_s']:.1f}")
        print(f"preprocess layers (downsample 8){'':<12}{r['downsample_8_s']:>10.2f}   cpu "
              f"{r['downsample_8_cpu_s']:.1f}")
        print(f"  ratio layers/none: wall {r['ratio_layers_vs_none']:.2f}, cpu "
              f"{r['cpu_ratio_layers_vs_none']:.2f}")
    if "ingest" in res:
        r = res["ingest"]
        print(f"ingest PNG -> NGFF{'':<26}{r['ingest_s']:>10.2f}")
        print(f"reuse lookup (probe + identity){'':<14}{r['reuse_lookup_s']:>10.3f}")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
