"""Benchmark: daskpath's preprocessing (read pair + tissue mask + SSIM + tile table) vs the seed's way.

Measured in one run, every configuration in a fresh subprocess (so peak memory is clean):

1. **Preprocessing throughput** (megapixels of the pair per second, pair pixels = H * W) on a
   synthetic ``--size`` x ``--size`` pair:

   * *seed's way* (the baseline): open each whole PNG with PIL (``Image.open(p).convert('RGB')``,
     ``np.asarray``), crop tile by tile (1024 px), tissue by a white threshold per tile (all
     channels > 220 = background), ``skimage.metrics.structural_similarity`` per tile on
     ``rgb2gray`` (``gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
     data_range=1``); one process, one thread;
   * ``daskpath.pipeline.run`` on the tiled JPEG TIFF pair, on a ``LocalCluster`` of 2 worker
     processes x 1 thread, with ``layers.downsample=0`` and with the default layers;
   * ``daskpath`` on the same PNG files as the baseline: ``daskpath.io.ingest`` of both PNGs into
     OME-Zarr, then ``run`` on the stores (ingest time and run time reported separately).

   Peak memory: the baseline subprocess's ``ru_maxrss``; for daskpath each worker process's
   ``ru_maxrss`` (asked through ``client.run`` at the end) and the client process's own.
2. **SSIM stage alone** on a ``--ssim-size``^2 gray pair (a crop of the pair), single thread:
   ``daskpath.similarity.ssim_block`` (float32, the default path, and float64, the bit-exact
   path) vs ``skimage.metrics.structural_similarity(..., full=True)`` on the same float64 data;
   max abs difference of the maps.
3. **Scaling** of ``run`` from 1 to 2 worker processes (1 thread each) on the ``--size`` pair.
4. **Peak memory per worker** for the ``--small``^2 vs the ``--big``^2 pair (``chunk_size``
   2048 for both, default layers): it must not grow with the slide size.

5. ``--only issue12`` (issue 12, item 1): the 2 x 8192² tiled pairs (1024-px tiles), one run
   per side, sides interleaved over ``--repeats`` rounds: the seed's loop on the TIFFs
   (``tifffile.imread`` + per-tile skimage SSIM), TIAToolbox 2.1.3 in its own venv
   (``--tia-python``; work only, its import apart), and ``daskpath run`` *including* the start
   of its LocalCluster (start-up reported apart), on the same job (QC and registration off) and
   on the defaults, optionally also daskpath as of another source tree (``--before``). JSON:
   ``results/preprocess-issue12.json``.

Timings of items 1-4 exclude process/cluster start-up and library imports on both sides (workers are warmed
by importing the pipeline's modules first); they include reading and decoding the files (from
the OS page cache once a file has been read). ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` / ``NUMEXPR_NUM_THREADS`` = 1 for every process of both sides; OpenCV is
single-threaded inside daskpath. The synthetic pairs are generated once and cached in
``--workdir``.

    python benchmarks/bench_preprocess.py [--quick] [--size 16384] [--big 32768] [--small 8192]
                                          [--repeats 3] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import os

_THREAD_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}
for _k, _v in _THREAD_ENV.items():  # before numpy is imported, here and in spawned workers
    os.environ[_k] = _v

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TILE = 1024
SEED = 0
MiB = 1024.0 * 1024.0


# --------------------------------------------------------------------------------------------
# helpers (both sides)
# --------------------------------------------------------------------------------------------


def _maxrss_mib() -> float:
    """Peak resident set of this process (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MiB


def _pair_dir(workdir: Path, layout: str, size: int) -> Path:
    return workdir / "data" / f"{layout}-{size}"


def ensure_pair(workdir: Path, layout: str, size: int) -> tuple[Path, Path, float | None]:
    """Generate (once) the synthetic pair ``synth000`` of ``size``^2 in ``layout``; return paths.

    The truth JSON is written last by ``make_pair``, so its presence marks a complete pair.
    Returns ``(he, ihc, seconds)`` with ``seconds`` None when it was cached.
    """
    from daskpath.synthetic import make_pair

    d = _pair_dir(workdir, layout, size)
    ext = ".png" if layout == "png" else ".tif"
    he, ihc = d / f"synth000_HE{ext}", d / f"synth000_IHC{ext}"
    def done() -> bool:
        return (d / "synth000_truth.json").exists() and he.exists() and ihc.exists()

    def busy() -> bool:  # another process (an earlier, concurrent run) is writing this pair
        now = time.time()
        return d.exists() and any(now - q.stat().st_mtime < 300 for q in d.rglob("*"))

    waited = False
    while not done() and busy():
        if not waited:
            print(f"  waiting for the {layout} {size}x{size} pair being written in {d} ...",
                  flush=True)
            waited = True
        time.sleep(10)
    if done():
        return he, ihc, None
    print(f"  generating {layout} {size}x{size} pair in {d} ...", flush=True)
    t0 = time.perf_counter()
    make_pair(d, slide="synth000", size=(size, size), seed=SEED, layout=layout)
    dt = time.perf_counter() - t0
    print(f"  ... {dt:.0f} s", flush=True)
    return he, ihc, dt


def _write_manifest(path: Path, rows: list[tuple[str, Path, Path]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("slide,he,ihc\n")
        for slide, he, ihc in rows:
            f.write(f"{slide},{he},{ihc}\n")
    return path


# --------------------------------------------------------------------------------------------
# child jobs (each runs in its own fresh subprocess)
# --------------------------------------------------------------------------------------------


def job_baseline(p: dict) -> dict:
    """The seed's way: whole PNGs in memory with PIL, tile by tile skimage SSIM."""
    import numpy as np
    import pandas as pd
    from PIL import Image
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    Image.MAX_IMAGE_PIXELS = None  # the seed had to lift PIL's decompression-bomb limit too
    load0 = os.getloadavg()[0]
    rss0 = _rss_mib()
    c0 = _cpu_s()
    t0 = time.perf_counter()
    he = np.asarray(Image.open(p["he"]).convert("RGB"))
    ihc = np.asarray(Image.open(p["ihc"]).convert("RGB"))
    t_read = time.perf_counter() - t0
    h, w = he.shape[:2]
    tile = p["tile"]
    rows = []
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            a = he[y0:y0 + tile, x0:x0 + tile]
            b = ihc[y0:y0 + tile, x0:x0 + tile]
            t_he = 1.0 - float(np.all(a > 220, axis=-1).mean())
            t_ihc = 1.0 - float(np.all(b > 220, axis=-1).mean())
            s = structural_similarity(rgb2gray(a), rgb2gray(b), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1)
            tissue = min(t_he, t_ihc)
            rows.append({"slide": "synth000", "y0": y0, "x0": x0, "height": a.shape[0],
                         "width": a.shape[1], "tissue_fraction": tissue, "ssim": float(s),
                         "keep": tissue >= 0.5 and s >= 0.4})
    df = pd.DataFrame(rows)
    seconds = time.perf_counter() - t0
    cpu = _cpu_s() - c0
    if p.get("tiles_out"):
        df.to_parquet(p["tiles_out"], index=False)
    return {"seconds": seconds, "cpu_seconds": cpu, "read_seconds": t_read, "pixels": h * w, "tiles": len(df),
            "tiles_kept": int(df["keep"].sum()), "peak_mib": _maxrss_mib(),
            "rss_before_mib": rss0, "load_before": load0, "load_after": os.getloadavg()[0]}


def _warm_worker() -> float:
    """Import what the pipeline's tasks import, so the timed run does not pay for it."""
    import cv2  # noqa: F401
    import skimage.color  # noqa: F401
    import tiffslide  # noqa: F401
    import zarr  # noqa: F401

    import daskpath.io  # noqa: F401
    import daskpath.similarity
    import daskpath.tiles  # noqa: F401
    import daskpath.tissue  # noqa: F401

    daskpath.similarity._cv2()
    import psutil

    return psutil.Process().memory_info().rss / MiB


def _worker_maxrss() -> float:
    import resource as r

    return r.getrusage(r.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker_cpu() -> float:
    import resource as r

    ru = r.getrusage(r.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def job_daskpath(p: dict) -> dict:
    """``daskpath.pipeline.run`` on a fresh LocalCluster; optionally ingest PNGs first."""
    from distributed import Client, LocalCluster

    from daskpath.config import load_config
    from daskpath.io import ingest
    from daskpath.pipeline import run

    out = Path(p["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    with LocalCluster(n_workers=p["workers"], threads_per_worker=1, processes=True,
                      memory_limit="auto", dashboard_address=None, host="127.0.0.1") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(p["workers"])
        rss_idle = client.run(_warm_worker)
        load0 = os.getloadavg()[0]
        wcpu0 = client.run(_worker_cpu)
        c0 = _cpu_s()
        t0 = time.perf_counter()
        ingest_s = 0.0
        he, ihc = p["he"], p["ihc"]
        if p.get("ingest"):
            zdir = out / "zarr"
            zdir.mkdir(parents=True, exist_ok=True)
            he = ingest(he, zdir / "synth000_HE.ome.zarr", overwrite=True)
            ihc = ingest(ihc, zdir / "synth000_IHC.ome.zarr", overwrite=True)
            ingest_s = time.perf_counter() - t0
        c_ingest = _cpu_s() - c0
        manifest = _write_manifest(out / "manifest.csv", [("synth000", Path(he), Path(ihc))])
        over = {"slides": str(manifest), "output_dir": str(out / "run"), "overwrite": True,
                "stages": ["preprocess"],
                "cache_dir": str(out / "cache"), "layers": {"downsample": p["downsample"]},
                "cluster": {"n_workers": p["workers"], "threads_per_worker": 1}}
        if p.get("chunk_size"):
            over["chunk_size"] = p["chunk_size"]
        cfg = load_config(overrides=over)
        t1 = time.perf_counter()
        res = run(cfg, client=client)
        t_end = time.perf_counter()
        ccpu = _cpu_s() - c0
        wcpu = client.run(_worker_cpu)
        if not res.ok:
            raise RuntimeError(f"daskpath run failed: {res.failures.to_dict('records')}")
        peaks = client.run(_worker_maxrss)
        if p.get("tiles_out"):
            res.tiles.to_parquet(p["tiles_out"], index=False)
        from daskpath.io import open_slide

        chunks = open_slide(he, chunk_size=cfg.chunk_size).attrs["chunk_size"]
    shape = res.slides[["height", "width"]].iloc[0]
    workers_cpu = sum(wcpu[k] - wcpu0[k] for k in wcpu)
    return {"seconds": t_end - t0, "run_seconds": t_end - t1, "ingest_seconds": ingest_s,
            "cpu_seconds": workers_cpu + ccpu, "workers_cpu_seconds": workers_cpu,
            "client_cpu_seconds": ccpu, "ingest_cpu_seconds": c_ingest,
            "pixels": int(shape["height"]) * int(shape["width"]), "tiles": len(res.tiles),
            "tiles_kept": int(res.tiles["keep"].sum()),
            "worker_peak_mib": sorted(peaks.values()), "worker_idle_mib": sorted(rss_idle.values()),
            "client_peak_mib": _maxrss_mib(), "chunk_size": list(chunks),
            "load_before": load0, "load_after": os.getloadavg()[0]}


def job_ssim(p: dict) -> dict:
    """SSIM map alone, single thread: daskpath's ssim_block vs skimage (full=True)."""
    import numpy as np
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    from daskpath.io import open_slide
    from daskpath.similarity import _ssim_rgb_block, ssim_block

    n = p["n"]
    rgb = []
    for path in (p["he"], p["ihc"]):
        s = open_slide(path).data
        y0, x0 = (s.shape[0] - n) // 2, (s.shape[1] - n) // 2
        rgb.append(np.ascontiguousarray(s[y0:y0 + n, x0:x0 + n].compute(scheduler="sync")))
    a64, b64 = rgb2gray(rgb[0]), rgb2gray(rgb[1])
    a32, b32 = a64.astype(np.float32), b64.astype(np.float32)

    def sk():
        return structural_similarity(a64, b64, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1, full=True)[1]

    def sk_rgb():
        return structural_similarity(rgb2gray(rgb[0]), rgb2gray(rgb[1]), gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False, data_range=1,
                                     full=True)[1]

    cases = {
        "skimage_f64": sk,
        "daskpath_f32": lambda: ssim_block(a32, b32),
        "daskpath_f64": lambda: ssim_block(a64, b64),
        "skimage_rgb": sk_rgb,
        "daskpath_rgb_f32": lambda: _ssim_rgb_block(rgb[0], rgb[1], 1.5, np.float32),
    }
    load0 = os.getloadavg()[0]
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    maps = {}
    for _ in range(p["repeats"]):
        for k, f in cases.items():  # interleaved, so background load hits every case alike
            c0 = _cpu_s()
            t0 = time.perf_counter()
            m = f()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(_cpu_s() - c0)
            maps.setdefault(k, m)
    ref = maps["skimage_f64"]
    return {
        "n": n, "pixels": n * n, "repeats": p["repeats"], "times": times,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "cpu": cpu, "median_cpu": {k: statistics.median(v) for k, v in cpu.items()},
        "maxdiff_f32": float(np.max(np.abs(maps["daskpath_f32"].astype(np.float64) - ref))),
        "maxdiff_f64": float(np.max(np.abs(maps["daskpath_f64"] - ref))),
        "maxdiff_rgb_f32": float(np.max(np.abs(maps["daskpath_rgb_f32"].astype(np.float64)
                                               - maps["skimage_rgb"]))),
        "peak_mib": _maxrss_mib(), "load_before": load0, "load_after": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------------------------
# issue 12: 2 x 8192² tiled JPEG TIFF pairs (1024-px tiles), one run each, start-up included
# --------------------------------------------------------------------------------------------


def _cpu_all() -> float:
    """CPU seconds of this process and of its reaped children (worker processes)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def job_seed_tiff(p: dict) -> dict:
    """The seed's loop on the TIFF pairs: ``tifffile.imread`` of each whole slide, then per
    1024-px tile the white-threshold tissue and ``structural_similarity(rgb2gray(a),
    rgb2gray(b), ...)``; one process, one thread, pairs one after the other."""
    import numpy as np
    import tifffile
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    load = os.getloadavg()
    c0, t0 = _cpu_all(), time.perf_counter()
    tiles = kept = pixels = 0
    for he_p, ihc_p in p["pairs"]:
        he, ihc = tifffile.imread(he_p), tifffile.imread(ihc_p)
        h, w = he.shape[:2]
        pixels += h * w
        for y0 in range(0, h, p["tile"]):
            for x0 in range(0, w, p["tile"]):
                a = he[y0:y0 + p["tile"], x0:x0 + p["tile"]]
                b = ihc[y0:y0 + p["tile"], x0:x0 + p["tile"]]
                tissue = min(1.0 - float(np.all(a > 220, axis=-1).mean()),
                             1.0 - float(np.all(b > 220, axis=-1).mean()))
                s = structural_similarity(rgb2gray(a), rgb2gray(b), gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False, data_range=1)
                tiles += 1
                kept += int(tissue >= 0.5 and s >= 0.4)
        del he, ihc
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_all() - c0,
            "pixels": pixels, "tiles": tiles, "tiles_kept": kept, "peak_mib": _maxrss_mib(),
            "loadavg_before": load, "loadavg_after": os.getloadavg()}


def job_tiatoolbox(p: dict) -> dict:
    """TIAToolbox's way (run with its own venv's python): per pair ``WSIReader.open`` of both
    slides, its morphological tissue mask of the H&E, sliding-window patch extraction of
    1024-px patches over that mask (``min_mask_ratio`` 0.5), the IHC patch at the same place
    (``read_rect``), and skimage SSIM per tissue tile. The import is timed apart (work only)."""
    load = os.getloadavg()
    c0, t0 = _cpu_all(), time.perf_counter()
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity
    from tiatoolbox.tools import patchextraction
    from tiatoolbox.wsicore.wsireader import WSIReader

    import_s, import_cpu = time.perf_counter() - t0, _cpu_all() - c0
    c0, t0 = _cpu_all(), time.perf_counter()
    tiles = kept = pixels = 0
    for he_p, ihc_p in p["pairs"]:
        he, ihc = WSIReader.open(he_p), WSIReader.open(ihc_p)
        w, h = he.info.slide_dimensions
        pixels += h * w
        mask = he.tissue_mask(method="morphological", resolution=p["mask_resolution"],
                              units="baseline")
        ext = patchextraction.get_patch_extractor(
            "slidingwindow", input_img=he, input_mask=mask, patch_size=(p["tile"], p["tile"]),
            stride=(p["tile"], p["tile"]), resolution=0, units="level", min_mask_ratio=0.5)
        for i, patch in enumerate(ext):
            x0, y0 = int(ext.locations_df["x"][i]), int(ext.locations_df["y"][i])
            other = ihc.read_rect((x0, y0), (p["tile"], p["tile"]), resolution=0, units="level")
            s = structural_similarity(rgb2gray(patch[..., :3]), rgb2gray(other[..., :3]),
                                      gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1)
            tiles += 1
            kept += int(s >= 0.4)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_all() - c0,
            "import_seconds": import_s, "import_cpu_seconds": import_cpu, "pixels": pixels,
            "tiles": tiles, "tiles_kept": kept, "peak_mib": _maxrss_mib(),
            "loadavg_before": load, "loadavg_after": os.getloadavg()}


def job_daskpath_startup(p: dict) -> dict:
    """``daskpath.pipeline.run`` on the pairs' manifest including the start of its own
    LocalCluster (``daskpath.cluster.connect``: 2 worker processes x 1 thread, daskpath's worker
    preload) and its shutdown. Start-up (cluster + workers ready) is reported apart; CPU is this
    process (client + scheduler) plus the worker processes (reaped children)."""
    from daskpath.cluster import connect
    from daskpath.config import load_config
    from daskpath.pipeline import run

    out = Path(p["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    over = {"slides": p["manifest"], "output_dir": str(out / "run"), "overwrite": True,
            "stages": ["preprocess"], "cache_dir": str(out / "cache"),
            "layers": {"downsample": p["downsample"]},
            "qc": {"enabled": p["qc"]}, "registration": {"enabled": p["registration"]},
            "cluster": {"n_workers": p["workers"], "threads_per_worker": 1,
                        "dashboard_address": None}}
    cfg = load_config(overrides=over)
    load = os.getloadavg()
    c0, t0 = _cpu_all(), time.perf_counter()
    with connect(cfg.cluster) as client:
        client.wait_for_workers(p["workers"])
        t_up, c_up = time.perf_counter() - t0, _cpu_all() - c0
        wcpu0 = sum(client.run(_worker_cpu).values())
        c_self0 = _cpu_s()
        t1 = time.perf_counter()
        res = run(cfg, client=client)
        t_run = time.perf_counter() - t1
        wcpu = sum(client.run(_worker_cpu).values()) - wcpu0
        c_self = _cpu_s() - c_self0
        peaks = sorted(client.run(_worker_maxrss).values())
    seconds, cpu = time.perf_counter() - t0, _cpu_all() - c0
    if not res.ok:
        raise RuntimeError(f"daskpath run failed: {res.failures.to_dict('records')}")
    if p.get("tiles_out"):
        res.tiles.to_parquet(p["tiles_out"], index=False)
    px = int((res.slides["height"] * res.slides["width"]).sum())
    return {"seconds": seconds, "cpu_seconds": cpu, "startup_seconds": t_up,
            "startup_cpu_seconds": c_up, "run_seconds": t_run, "run_cpu_seconds": wcpu + c_self,
            "workers_cpu_seconds": wcpu, "client_cpu_seconds": c_self, "pixels": px,
            "tiles": len(res.tiles), "tiles_kept": int(res.tiles["keep"].sum()),
            "worker_peak_mib": peaks, "client_peak_mib": _maxrss_mib(),
            "loadavg_before": load, "loadavg_after": os.getloadavg()}


JOBS = {"baseline": job_baseline, "daskpath": job_daskpath, "ssim": job_ssim,
        "seed_tiff": job_seed_tiff, "tiatoolbox": job_tiatoolbox,
        "daskpath_startup": job_daskpath_startup}


def _child_main(kind: str, params: str) -> None:
    res = JOBS[kind](json.loads(params))
    sys.stdout.flush()
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------


def spawn(kind: str, params: dict, log: Path, python: str | None = None,
          pythonpath: str | None = None) -> dict:
    """Run one job in a fresh interpreter; return its result dict.

    ``python``: another interpreter (TIAToolbox's own venv); ``pythonpath``: a source tree put
    first on the path (daskpath as of another commit, for a before / after in one run)."""
    env = dict(os.environ, **_THREAD_ENV, PYTHONUNBUFFERED="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--_child", kind,
           "--_params", json.dumps(params)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"=== {kind} {json.dumps(params)} rc={proc.returncode} "
                f"wall={time.perf_counter() - t0:.1f}s\n{proc.stdout}\n{proc.stderr}\n")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{kind} job failed (rc {proc.returncode}); see {log}\n"
                       + "\n".join(proc.stderr.splitlines()[-25:]))


def repeat(kind: str, params: dict, n: int, log: Path, label: str) -> dict:
    """``n`` fresh subprocesses; medians of the times, max of the peaks."""
    runs = []
    for i in range(n):
        r = spawn(kind, params, log)
        runs.append(r)
        extra = f", ingest {r['ingest_seconds']:.1f} s" if r.get("ingest_seconds") else ""
        print(f"  {label} [{i + 1}/{n}]: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU"
              f"{extra} "
              f"(load {r['load_before']:.1f} -> {r['load_after']:.1f})", flush=True)
    return aggregate(runs)


def aggregate(runs: list[dict]) -> dict:
    """Medians of the times, max of the peaks, over the runs of one configuration."""
    out = {"runs": runs, "repeats": len(runs),
           "seconds": statistics.median(r["seconds"] for r in runs),
           "pixels": runs[0]["pixels"]}
    out["mpx_per_s"] = out["pixels"] / 1e6 / out["seconds"]
    for key in ("run_seconds", "ingest_seconds", "read_seconds", "cpu_seconds",
                "workers_cpu_seconds", "client_cpu_seconds", "ingest_cpu_seconds"):
        if key in runs[0]:
            out[key] = statistics.median(r[key] for r in runs)
    if "peak_mib" in runs[0]:
        out["peak_mib"] = max(r["peak_mib"] for r in runs)
    if "worker_peak_mib" in runs[0]:
        out["worker_peak_mib"] = max(max(r["worker_peak_mib"]) for r in runs)
        out["worker_idle_mib"] = max(max(r["worker_idle_mib"]) for r in runs)
        out["client_peak_mib"] = max(r["client_peak_mib"] for r in runs)
        out["chunk_size"] = runs[0]["chunk_size"]
    return out


def _mem(r: dict) -> str:
    if "worker_peak_mib" in r:
        return (f"workers {r['worker_peak_mib']:.0f} MiB each (idle {r['worker_idle_mib']:.0f}), "
                f"client {r['client_peak_mib']:.0f} MiB")
    return f"{r['peak_mib']:.0f} MiB"


def _t(r: dict) -> str:
    mp = r["pixels"] / 1e6
    return (f"wall {r['seconds']:.1f} s = {r['mpx_per_s']:.2f} MP/s; CPU {r['cpu_seconds']:.1f} s"
            f" = {mp / r['cpu_seconds']:.2f} MP/CPU-s")


def _ratio(a: dict, b: dict) -> str:
    return (f"**{a['seconds'] / b['seconds']:.2f}x** wall, "
            f"**{a['cpu_seconds'] / b['cpu_seconds']:.2f}x** CPU")


def table(res: dict) -> str:
    """Markdown table of the results."""
    rows = []
    n = res["params"]["size"]
    base = res.get("baseline")

    def ratio(r):
        return _ratio(base, r) if base else "-"

    if base:
        for key, what in (("daskpath_nolayers", "layers.downsample=0"),
                          ("daskpath_layers", "default layers (downsample 8)")):
            r = res.get(key)
            if r:
                rows.append((f"Preprocess {n}² pair: seed (PIL PNG, per-tile skimage) vs daskpath "
                             f"tiled TIFF, 2 workers x 1 thread, {what}",
                             _t(base), _t(r), ratio(r),
                             f"seed {_mem(base)}; daskpath {_mem(r)}"))
        r = res.get("daskpath_png")
        if r:
            rows.append((f"Preprocess {n}² from the same PNGs: daskpath ingest to OME-Zarr + run "
                         "(layers.downsample=0)", _t(base),
                         f"{r['ingest_seconds']:.1f} s ingest + {r['run_seconds']:.1f} s run = "
                         f"{_t(r)}", ratio(r), f"daskpath {_mem(r)}"))
    s = res.get("ssim")
    if s:
        px = s["pixels"] / 1e6
        md = s["median_cpu"]  # single-threaded: CPU time = wall time on an idle machine
        sk = md["skimage_f64"]
        for key, what, diff in (
                ("daskpath_f32", "float32 (default)", s["maxdiff_f32"]),
                ("daskpath_f64", "float64 (bit-exact path)", s["maxdiff_f64"])):
            rows.append((f"SSIM map alone, {s['n']}² gray, 1 thread, CPU s: skimage full=True (float64) "
                         f"vs ssim_block {what}; max abs diff {diff:.2g}",
                         f"{sk:.2f} s = {px / sk:.1f} MP/s", f"{md[key]:.2f} s = "
                         f"{px / md[key]:.1f} MP/s", f"**{sk / md[key]:.2f}x**",
                         f"{s['peak_mib']:.0f} MiB (process)"))
        skr, dr = md["skimage_rgb"], md["daskpath_rgb_f32"]
        rows.append((f"gray + SSIM from RGB uint8, {s['n']}²: rgb2gray + skimage vs daskpath's "
                     f"per-chunk kernel (float32); max abs diff {s['maxdiff_rgb_f32']:.2g}",
                     f"{skr:.2f} s = {px / skr:.1f} MP/s", f"{dr:.2f} s = {px / dr:.1f} MP/s",
                     f"**{skr / dr:.2f}x**", "-"))
    one, two = res.get("scaling_1"), res.get("daskpath_nolayers")
    if one and two:
        rows.append((f"Scaling, {n}² tiled, layers.downsample=0: 1 worker (baseline column) vs 2 "
                     "workers, 1 thread each", _t(one), _t(two),
                     f"**{one['seconds'] / two['seconds']:.2f}x** wall speed-up (CPU "
                     f"{one['cpu_seconds'] / two['cpu_seconds']:.2f}x)",
                     f"1 worker: {_mem(one)}; 2 workers: {_mem(two)}"))
    sm, bg = res.get("mem_small"), res.get("mem_big")
    if sm and bg:
        a, b = res["params"]["small"], res["params"]["big"]
        c = sm["chunk_size"][0]
        rows.append((f"Peak memory per worker, {a}² (baseline column) vs {b}² tiled, chunk {c}, "
                     "2 workers, default layers", f"{sm['worker_peak_mib']:.0f} MiB ({_t(sm)})",
                     f"{bg['worker_peak_mib']:.0f} MiB ({_t(bg)})",
                     f"{bg['worker_peak_mib'] / sm['worker_peak_mib']:.2f}x memory for "
                     f"{(b / a) ** 2:.0f}x pixels",
                     f"{a}²: {_mem(sm)}; {b}²: {_mem(bg)}"))
    lines = ["| what | baseline | daskpath | ratio | peak memory |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def issue12(args: argparse.Namespace) -> int:
    """Issue 12's row: 2 x 8192² tiled JPEG TIFF pairs (1024-px tiles), every side in one run,
    repeats interleaved (so background load hits each alike), medians; pair-MP per CPU-second."""
    wd = args.workdir.absolute()
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / "bench-issue12.log"
    log.write_text("")
    data = args.issue12_data
    if data is None:
        data = wd / "data" / "issue12-tiled1024-8192x2"
        if not (data / "manifest.csv").exists():
            from daskpath.synthetic import make_cohort

            print(f"  generating 2 x 8192² tiled pairs (1024-px tiles) in {data} ...", flush=True)
            make_cohort(data, pairs=2, size=(8192, 8192), seed=0, layout="tiled", tile_size=1024)
    man = data / "manifest.csv"
    import csv

    with open(man) as f:
        rows = list(csv.DictReader(f))
    pairs = [[str((data / r["he"]).resolve()), str((data / r["ihc"]).resolve())] for r in rows]
    res: dict = {"params": {"what": "issue12", "pairs": pairs, "repeats": args.repeats, "tile": TILE,
                            "threads_env": _THREAD_ENV},
                 "machine": _machine(), "versions": _versions(), "rows": {}}
    tiles_dir = wd / "tiles-issue12"
    tiles_dir.mkdir(exist_ok=True)

    def dp(qc: bool, reg: bool, tag: str) -> dict:
        return {"manifest": str(man), "output_dir": str(wd / "out-issue12"), "workers": 2,
                "downsample": 0, "qc": qc, "registration": reg,
                "tiles_out": str(tiles_dir / f"{tag}.parquet")}

    configs: list[tuple[str, str, dict, dict]] = [  # key, job, params, spawn options
        ("seed", "seed_tiff", {"pairs": pairs, "tile": TILE}, {}),
        ("daskpath_fair", "daskpath_startup", dp(False, False, "fair"), {}),
        ("daskpath_default", "daskpath_startup", dp(True, True, "default"), {}),
    ]
    if args.before:
        configs += [
            ("before_fair", "daskpath_startup", dp(False, False, "before_fair"),
             {"pythonpath": str(args.before)}),
            ("before_default", "daskpath_startup", dp(True, True, "before_default"),
             {"pythonpath": str(args.before)})]
    tia_ok = False
    if args.tia_python and Path(args.tia_python).exists():
        probe = subprocess.run([args.tia_python, "-c", "import tiatoolbox; print(tiatoolbox.__version__)"],
                               capture_output=True, text=True, check=False)
        tia_ok = probe.returncode == 0
        res["params"]["tiatoolbox"] = probe.stdout.strip() or probe.stderr[-300:]
    if tia_ok:
        configs.append(("tiatoolbox", "tiatoolbox", {"pairs": pairs, "tile": TILE,
                                                     "mask_resolution": 1 / 32},
                        {"python": args.tia_python}))
    else:
        res["rows"]["tiatoolbox"] = {"not_measured": f"no working TIAToolbox at {args.tia_python}"}
    runs: dict[str, list[dict]] = {k: [] for k, *_ in configs}

    def save() -> None:
        for key, rs in runs.items():
            if rs:
                res["rows"][key] = _agg12(rs)
        res["machine"]["loadavg_end"] = os.getloadavg()
        res["table_markdown"] = table12(res)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")

    print(f"issue 12: {len(pairs)} pairs from {man}; load {os.getloadavg()}", flush=True)
    for i in range(args.repeats):
        for key, job, params, opts in configs:
            r = spawn(job, params, log, **opts)
            runs[key].append(r)
            print(f"  [{i + 1}/{args.repeats}] {key}: {r['seconds']:.1f} s wall, "
                  f"{r['cpu_seconds']:.1f} CPU-s, {r['pixels'] / 1e6 / r['cpu_seconds']:.2f} "
                  f"pair-MP/CPU-s (load {r['loadavg_before'][0]:.1f} -> "
                  f"{r['loadavg_after'][0]:.1f})", flush=True)
            save()
    # the tile tables agree with the run before the change (same inputs, same settings)
    import numpy as np
    import pandas as pd

    for tag in ("fair", "default"):
        a, b = tiles_dir / f"{tag}.parquet", tiles_dir / f"before_{tag}.parquet"
        if a.exists() and b.exists():
            ta, tb = pd.read_parquet(a), pd.read_parquet(b)
            num = [c for c in ta.columns if ta[c].dtype.kind == "f"]
            diff = max(float(np.nanmax(np.abs(ta[c].to_numpy() - tb[c].to_numpy()), initial=0))
                       for c in num)
            same = all((ta[c].to_numpy() == tb[c].to_numpy()).all() for c in ta.columns
                       if c not in num)
            res[f"tiles_vs_before_{tag}"] = {"max_abs_diff": diff, "other_columns_equal": same}
    save()
    print()
    print(res["table_markdown"])
    print(f"\nJSON: {args.json}; log: {log}")
    return 0


def _agg12(rs: list[dict]) -> dict:
    out = {"runs": rs, "repeats": len(rs), "pixels": rs[0]["pixels"]}
    for k in rs[0]:
        if isinstance(rs[0][k], (int, float)) and k != "pixels":
            out[k] = statistics.median(r[k] for r in rs)
    out["loadavg"] = [r["loadavg_before"] for r in rs]
    return out


def table12(res: dict) -> str:
    """Markdown table of the issue-12 row."""
    rows = res["rows"]
    lines = ["| side (2 x 8192² tiled pairs, one run) | wall s | CPU s | pair-MP / CPU-s | "
             "start-up apart | vs seed (CPU / wall) | vs TIAToolbox (CPU / wall) | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    seed, tia = rows.get("seed"), rows.get("tiatoolbox")
    names = {"seed": "seed's loop (tifffile whole decode + skimage SSIM per tile)",
             "tiatoolbox": "TIAToolbox 2.1.3 (morphological mask, sliding window, skimage SSIM; work only)",
             "daskpath_fair": "daskpath run, same job (qc, registration off), incl. cluster start",
             "daskpath_default": "daskpath run, defaults (QC + registration), incl. cluster start",
             "before_fair": "daskpath before (HEAD), same job, incl. cluster start",
             "before_default": "daskpath before (HEAD), defaults, incl. cluster start"}
    for key, name in names.items():
        r = rows.get(key)
        if r is None:
            continue
        if "not_measured" in r:
            lines.append(f"| {name} | - | - | - | - | - | - | not measured: {r['not_measured']} |")
            continue
        mp = r["pixels"] / 1e6
        up = "-"
        if "startup_seconds" in r:
            up = (f"start {r['startup_seconds']:.1f} s; run {r['run_seconds']:.1f} s wall, "
                  f"{r['run_cpu_seconds']:.1f} CPU-s (workers {r['workers_cpu_seconds']:.1f}, "
                  f"client {r['client_cpu_seconds']:.1f}) = {mp / r['run_cpu_seconds']:.1f} pair-MP/CPU-s")
        elif "import_seconds" in r:
            up = f"import {r['import_seconds']:.0f} s ({r['import_cpu_seconds']:.0f} CPU-s), excluded"

        def ratio(base, r=r):
            if not base or "not_measured" in base or base is r:
                return "-"
            return (f"{base['cpu_seconds'] / r['cpu_seconds']:.2f}x / "
                    f"{base['seconds'] / r['seconds']:.2f}x")
        loads = ", ".join(f"{la[0]:.1f}" for la in r["loadavg"])
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{mp / r['cpu_seconds']:.1f} | {up} | {ratio(seed)} | {ratio(tia)} | {loads} |")
    return "\n".join(lines)


def _machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("daskpath", "dask", "distributed", "numpy", "scipy", "scikit-image",
                 "opencv-python-headless", "opencv-python", "pillow", "tiffslide", "zarr",
                 "pyvips"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=16384, help="pair side for items 1-3")
    ap.add_argument("--big", type=int, default=32768, help="large pair side for item 4")
    ap.add_argument("--small", type=int, default=8192, help="small pair side for item 4")
    ap.add_argument("--ssim-size", type=int, default=4096, help="gray pair side for item 2")
    ap.add_argument("--repeats", type=int, default=3,
                    help="repeats (fresh processes) of each item; the --big run is done once")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/daskpath-bench"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: size 2048, small 2048, big 4096, ssim 1024, 1 repeat")
    ap.add_argument("--only", default="baseline,daskpath,png,ssim,scaling,memory",
                    help="comma-separated subset of: baseline,daskpath,png,ssim,scaling,memory; "
                         "or issue12 alone (item 5)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "preprocess.json")
    ap.add_argument("--tia-python", default="/tmp/tia/bin/python",
                    help="python of a separate venv with tiatoolbox==2.1.3 (issue12 row; "
                         "skipped and reported as not measured when it does not import)")
    ap.add_argument("--before", type=Path, default=None,
                    help="issue12 row: a source tree of daskpath as before the change (e.g. "
                         "`git archive HEAD daskpath | tar -x -C DIR`), measured in the same run")
    ap.add_argument("--issue12-data", type=Path, default=None,
                    help="issue12 row: folder with manifest.csv of the 2 x 8192² tiled pairs "
                         "(default: generated once in --workdir)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_params", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        _child_main(args._child, args._params)
        return 0
    if args.quick:
        args.size, args.small, args.big, args.ssim_size, args.repeats = 2048, 2048, 4096, 1024, 1
    only = set(args.only.split(","))
    if only == {"issue12"}:
        return issue12(args)
    wd = args.workdir.absolute()
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / "bench.log"
    log.write_text("")
    tiles_dir = wd / "tiles"
    tiles_dir.mkdir(exist_ok=True)
    res: dict = {"params": {"size": args.size, "small": args.small, "big": args.big,
                            "ssim_size": args.ssim_size, "repeats": args.repeats,
                            "quick": args.quick, "tile": TILE, "seed": SEED,
                            "threads_env": _THREAD_ENV},
                 "machine": _machine(), "versions": _versions(), "generation_seconds": {}}
    t_all = time.perf_counter()
    print(f"machine: {res['machine']['cpus']} CPUs, {res['machine']['memory_gib']} GiB, "
          f"load {res['machine']['loadavg_start'][0]:.1f}", flush=True)

    print("data:", flush=True)
    need = [("tiled", args.size)]
    if only & {"baseline", "png"}:
        need.append(("png", args.size))
    if args.ssim_size > args.size:
        ap.error(f"--ssim-size {args.ssim_size} must not exceed --size {args.size}")
    pairs = {}
    for layout, size in dict.fromkeys(need):
        he, ihc, dt = ensure_pair(wd, layout, size)
        pairs[(layout, size)] = (str(he), str(ihc))
        if dt is not None:
            res["generation_seconds"][f"{layout}-{size}"] = dt

    def dp(size, workers=2, downsample=0, layout="tiled", chunk=None, tiles_out=None, **kw):
        he, ihc = pairs[(layout, size)]
        return {"he": he, "ihc": ihc, "workers": workers, "downsample": downsample,
                "chunk_size": chunk, "output_dir": str(wd / "out"), "tiles_out": tiles_out, **kw}

    reps = args.repeats
    n = args.size

    def save() -> None:  # after every item, so an interrupted run keeps what it measured
        res["total_seconds"] = time.perf_counter() - t_all
        res["table_markdown"] = table(res)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    if "baseline" in only:
        print(f"1. preprocessing {n}x{n}:", flush=True)
        he, ihc = pairs[("png", n)]
        res["baseline"] = repeat("baseline", {"he": he, "ihc": ihc, "tile": TILE,
                                              "tiles_out": str(tiles_dir / "baseline.parquet")},
                                 reps, log, "seed's way (PIL + per-tile skimage)")
    save()
    if "daskpath" in only:
        res["daskpath_nolayers"] = repeat(
            "daskpath", dp(n, tiles_out=str(tiles_dir / "daskpath_tiff.parquet")), reps, log,
            "daskpath tiled TIFF, 2 workers, downsample=0")
        res["daskpath_layers"] = repeat("daskpath", dp(n, downsample=8), reps, log,
                                        "daskpath tiled TIFF, 2 workers, default layers")
    save()
    if "png" in only:
        res["daskpath_png"] = repeat(
            "daskpath", dp(n, layout="png", ingest=True,
                           tiles_out=str(tiles_dir / "daskpath_png.parquet")), reps, log,
            "daskpath PNG: ingest + run, 2 workers, downsample=0")
    save()
    if "ssim" in only:
        print(f"2. SSIM stage {args.ssim_size}x{args.ssim_size}:", flush=True)
        he, ihc = pairs[("tiled", n)]
        s = spawn("ssim", {"he": he, "ihc": ihc, "n": args.ssim_size, "repeats": max(3, reps)},
                  log)
        res["ssim"] = s
        print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in s["median"].items())
              + f"; max diff f32 {s['maxdiff_f32']:.2g}, f64 {s['maxdiff_f64']:.2g}", flush=True)
    save()
    if "scaling" in only:
        print(f"3. scaling {n}x{n}:", flush=True)
        res["scaling_1"] = repeat("daskpath", dp(n, workers=1), reps, log,
                                  "daskpath tiled TIFF, 1 worker, downsample=0")
        if "daskpath_nolayers" not in res:
            res["daskpath_nolayers"] = repeat("daskpath", dp(n), reps, log,
                                              "daskpath tiled TIFF, 2 workers, downsample=0")
    save()
    if "memory" in only:
        print(f"4. memory per worker {args.small}^2 vs {args.big}^2:", flush=True)
        for size in (args.small, args.big):  # generated here: the big one takes minutes
            he, ihc, dt = ensure_pair(wd, "tiled", size)
            pairs[("tiled", size)] = (str(he), str(ihc))
            if dt is not None:
                res["generation_seconds"][f"tiled-{size}"] = dt
        res["mem_small"] = repeat("daskpath", dp(args.small, downsample=8, chunk=2048), reps,
                                  log, f"daskpath {args.small}^2, chunk 2048, default layers")
        if args.big == n and res.get("daskpath_layers", {}).get("chunk_size") == [2048, 2048]:
            res["mem_big"] = res["daskpath_layers"]  # the same configuration, measured above
        else:
            res["mem_big"] = repeat("daskpath", dp(args.big, downsample=8, chunk=2048), 1, log,
                                    f"daskpath {args.big}^2, chunk 2048, default layers")

    # agreement of the tile tables (same PNG pixels: differences come from tile borders only)
    try:
        import numpy as np
        import pandas as pd

        b, p = tiles_dir / "baseline.parquet", tiles_dir / "daskpath_png.parquet"
        if "baseline" in res and "daskpath_png" in res and b.exists() and p.exists():
            tb = pd.read_parquet(b).set_index(["y0", "x0"]).sort_index()
            tp = pd.read_parquet(p).set_index(["y0", "x0"]).sort_index()
            d = np.abs(tb["ssim"] - tp["ssim"])
            res["tile_agreement_png"] = {
                "tiles": len(d), "ssim_maxdiff": float(d.max()), "ssim_meandiff": float(d.mean()),
                "keep_baseline": int(tb["keep"].sum()), "keep_daskpath": int(tp["keep"].sum()),
                "keep_agree": float((tb["keep"] == tp["keep"]).mean())}
    except Exception as e:  # noqa: BLE001 - a side check must not lose the results
        res["tile_agreement_png"] = {"error": repr(e)}

    res["total_seconds"] = time.perf_counter() - t_all
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["table_markdown"] = table(res)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(res["table_markdown"])
    if "tile_agreement_png" in res:
        print(f"\ntile tables, seed vs daskpath on the same PNG: {res['tile_agreement_png']}")
    print(f"\ntotal {res['total_seconds'] / 60:.1f} min; JSON: {args.json}; log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
