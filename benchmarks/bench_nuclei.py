"""Benchmark: daskpath's chunked StarDist nuclei stage vs stardist's ``predict_instances_big``.

Input: an IHC phantom (``daskpath.synthetic.render_region``, default 8192 x 8192), turned into the
shipped model's input channel (hematoxylin + DAB OD) and stored as a chunked zarr array, so both
contenders read the same pixels and neither pays for rendering or colour deconvolution.

Contenders (same model ``phantom``, same normalisation and thresholds):

* ``predict_instances_big`` (stardist's own large-image path): ``block_size=1024``,
  ``min_overlap`` = the largest nucleus diameter in the model spec, ``context`` = its default
  (the receptive field), run in one process on the whole array held in memory;
* ``daskpath.nuclei.segment_nuclei`` on a ``distributed.LocalCluster`` with 1 and 2 worker
  processes, ``cores / workers`` threads each (TensorFlow's intra-op threads capped to the same
  number through ``DASKPATH_TF_THREADS``), so NMS and label painting of one chunk overlap with
  the network of another;
* the same, on the chunks that meet kept tiles only (``region=``), which is what the pipeline's
  nuclei stage runs: kept = tissue fraction >= 0.5 on 1024-px tiles (the SSIM half of the keep
  rule needs the H&E, which this benchmark does not render). Same nuclei in those tiles as the
  whole-slide run (tests/test_nuclei.py); fewer pixels through the network.

Each contender runs in its own process(es) with the model loaded before timing (warm). Wall
time and CPU time (user + system, summed over the contender's processes) are both reported: on a
shared machine CPU time is the steadier measure of work done. Peak
memory is the process's resident-set high-water mark (``VmHWM``) measured over the timed run only
(reset through ``/proc/self/clear_refs``). Prints a table and writes JSON.

    python benchmarks/bench_nuclei.py [--size 8192] [--chunk 2048] [--region-chunks 2048 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_input(size: int, seed: int, path: Path, chunk: int) -> tuple[float, float, float, np.ndarray]:
    """Render the IHC phantom block by block and store hematoxylin + DAB OD as zarr.

    Also returns the tissue fraction of every 1024-px tile (the default ``tiles.size``), from
    daskpath's tissue mask of the rendered IHC computed tile by tile.
    """
    import dask.array as da
    import zarr

    from daskpath.tissue import tissue_mask

    from daskpath.nuclei import resolve_model, slide_percentiles
    from daskpath.synthetic import render_region
    from daskpath.train_stardist import model_input

    t0 = time.perf_counter()
    z = zarr.open_array(str(path), mode="w", shape=(size, size), chunks=(chunk, chunk),
                        dtype=np.float32)
    b = 1024
    frac = np.zeros((size // b, size // b))
    for y0 in range(0, size, b):
        band = np.empty((b, size), np.float32)
        for x0 in range(0, size, b):
            rgb, _ = render_region(y0, x0, b, b, size=(size, size), seed=seed, stain="ihc")
            band[:, x0:x0 + b] = model_input(rgb)
            frac[y0 // b, x0 // b] = tissue_mask(da.from_array(rgb, chunks=(b, b, 3))).mean().compute()
        z[y0:y0 + b] = band

    lo, hi = slide_percentiles(da.from_zarr(str(path)), resolve_model("phantom").percentiles)
    return lo, hi, time.perf_counter() - t0, frac


def _run_big(path: str, norm, min_overlap: int, block: int, q) -> None:
    import zarr

    from daskpath.nuclei import load_stardist

    m = load_stardist("phantom")
    x = np.asarray(zarr.open_array(path, mode="r")[:])
    lo, hi = norm
    x = (x - np.float32(lo)) / np.float32(hi - lo)
    m.predict_instances(x[:256, :256], show_tile_progress=False, verbose=False)  # warm
    _reset_peak()
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        lab, det = m.predict_instances_big(
            x, axes="YX", block_size=block, min_overlap=min_overlap, context=None,
            show_progress=False, show_tile_progress=False, verbose=False,
        )
    dt = time.perf_counter() - t0
    q.put({"seconds": dt, "cpu_seconds": _cpu_seconds() - c0,
           "n_nuclei": int(len(det["points"])), "peak_rss_mb": _peak_mb()})


def run_big(path: Path, norm, min_overlap: int, block: int = 1024) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_big, args=(str(path), norm, min_overlap, block, q))
    p.start()
    res = q.get()
    p.join()
    return res


def run_daskpath(path: Path, norm, n_workers: int, chunk: int, cores: int, region=None,
                 threads: int | None = None) -> dict:
    import dask.array as da
    from distributed import Client, LocalCluster

    from daskpath import nuclei

    threads = threads or max(1, cores // n_workers)
    env = {"DASKPATH_TF_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    x = da.from_zarr(str(path)).rechunk(chunk)
    ref = nuclei.resolve_model("phantom")
    depth = nuclei.default_depth(ref)
    labels, table = nuclei.segment_nuclei(x, ref, normalize_percentiles=norm, depth=depth,
                                          region=region)
    # halo overhead: pixels StarDist sees / pixels of the chunks it runs on - 1
    seen = core = 0
    H, W = x.shape
    yb = np.concatenate([[0], np.cumsum(x.chunks[0])])
    xb = np.concatenate([[0], np.cumsum(x.chunks[1])])
    wanted = nuclei.chunks_in_region(yb, xb, region)
    for i in range(len(yb) - 1):
        for j in range(len(xb) - 1):
            if not wanted[i, j]:
                continue
            core += (yb[i + 1] - yb[i]) * (xb[j + 1] - xb[j])
            h = min(H, yb[i + 1] + depth) - max(0, yb[i] - depth)
            w = min(W, xb[j + 1] + depth) - max(0, xb[j] - depth)
            seen += h * w
    overhead = seen / max(core, 1) - 1.0
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", env=env, memory_limit=0) as cluster, \
            Client(cluster) as client:
        t_cold = time.perf_counter()
        client.run(lambda: nuclei.load_stardist("phantom") and None)
        t_cold = time.perf_counter() - t_cold
        client.run(_reset_peak)
        c0 = client.run(_cpu_seconds)
        t0 = time.perf_counter()
        (df,) = client.compute([table], sync=True)
        dt = time.perf_counter() - t0
        c1 = client.run(_cpu_seconds)
        peaks = client.run(_peak_mb)
    cpu = sum(c1[w] - c0[w] for w in c1)
    return {
        "seconds": dt, "cpu_seconds": cpu, "n_nuclei": int(len(df)),
        "peak_rss_mb": max(peaks.values()),
        "peak_rss_mb_per_worker": sorted(peaks.values()), "halo_overhead": overhead,
        "depth": depth, "chunk": chunk, "threads_per_worker": threads,
        "chunks_run": int(wanted.sum()), "chunks_total": int(wanted.size),
        "pixels_run_fraction": core / (H * W),
        "model_load_seconds": t_cold, "duplicate_centroids": int(df[["y", "x"]].duplicated().sum()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--region-chunks", type=int, nargs="*", default=[2048, 1024],
                    help="chunk sizes for the kept-tiles runs (none: skip them)")
    ap.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1

    from daskpath.nuclei import resolve_model

    ref = resolve_model("phantom")
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        path = Path(tmp) / "hdab.zarr"
        lo, hi, t_in, frac = make_input(a.size, a.seed, path, a.chunk)
        # the pipeline's nuclei stage runs on the chunks that meet kept tiles; here "kept" is
        # the tissue half of the keep rule (tissue fraction >= 0.5, 1024-px tiles): no H&E, no SSIM
        t = 1024
        kept = [(i * t, (i + 1) * t, j * t, (j + 1) * t) for i, j in zip(*np.nonzero(frac >= 0.5))]
        print(f"kept tiles: {len(kept)}/{frac.size}", flush=True)
        print(f"input {a.size}x{a.size} rendered + deconvolved in {t_in:.1f} s; "
              f"normalisation ({lo:.4f}, {hi:.4f})", flush=True)
        mp_px = a.size * a.size / 1e6
        rows = []
        min_overlap = ref.max_nucleus_diameter
        big = run_big(path, (lo, hi), min_overlap)
        rows.append({"contender": f"stardist predict_instances_big (overlap {min_overlap})",
                     "workers": 1, **big})
        print(rows[-1], flush=True)
        for n in a.workers:
            r = run_daskpath(path, (lo, hi), n, a.chunk, cores)
            rows.append({"contender": f"daskpath whole slide (chunk {a.chunk}, depth {r['depth']})",
                         "workers": n, **r})
            print(rows[-1], flush=True)
        # scaling with the work per worker fixed: 1 thread per worker, 1 then 2 workers
        r = run_daskpath(path, (lo, hi), 1, a.chunk, cores, threads=1)
        rows.append({"contender": f"daskpath whole slide (chunk {a.chunk}), 1 thread per worker",
                     "workers": 1, **r})
        print(rows[-1], flush=True)
        for chunk in a.region_chunks:
            for n in a.workers:
                r = run_daskpath(path, (lo, hi), n, chunk, cores, region=kept)
                rows.append({"contender": f"daskpath kept tiles (chunk {chunk}, {r['chunks_run']}/"
                                          f"{r['chunks_total']} chunks)", "workers": n,
                             "kept_tiles": len(kept), "tiles": int(frac.size), **r})
                print(rows[-1], flush=True)
    base = rows[0]["seconds"]
    for r in rows:
        r["nuclei_per_s"] = r["n_nuclei"] / r["seconds"]
        r["mp_per_s"] = mp_px / r["seconds"]
        r["speedup_vs_big"] = base / r["seconds"]
        r["cpu_speedup_vs_big"] = rows[0]["cpu_seconds"] / r["cpu_seconds"]
    one = next((r for r in rows if r["contender"].endswith("1 thread per worker")), None)
    two = next((r for r in rows if r["contender"].startswith("daskpath whole") and r["workers"] == 2
                and r["threads_per_worker"] == 1), None)
    if one is not None and two is not None:
        # 2 workers x 1 thread vs 1 worker x 1 thread: same threads per worker, twice the workers
        two["scaling_1_to_2_workers"] = one["seconds"] / two["seconds"]

    hdr = (f"{'contender':<58} {'wrk':>3} {'wall s':>7} {'CPU s':>7} {'nuclei':>7} "
           f"{'nuc/s':>6} {'MP/s':>5} {'x big':>5} {'CPU x':>5} {'halo':>6} {'peak MB':>8}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        halo = f"{100 * r['halo_overhead']:.1f}%" if "halo_overhead" in r else "-"
        print(f"{r['contender']:<58} {r['workers']:>3} {r['seconds']:>7.1f} "
              f"{r['cpu_seconds']:>7.1f} {r['n_nuclei']:>7} {r['nuclei_per_s']:>6.0f} "
              f"{r['mp_per_s']:>5.2f} {r['speedup_vs_big']:>5.2f} {r['cpu_speedup_vs_big']:>5.2f} "
              f"{halo:>6} {r['peak_rss_mb']:>8.0f}")
    out = {
        "size": a.size, "seed": a.seed, "model": "phantom", "cores": cores,
        "machine": platform.platform(), "python": sys.version.split()[0],
        "loadavg_at_end": os.getloadavg(), "rows": rows,
    }
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
