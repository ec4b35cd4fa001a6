"""Flat-raster ingest: MP/s against libvips' own PNG decode, and serial vs parallel ingest.

Run: ``python benchmarks/bench_ingest.py [--size 8192] [--files 4] [--repeats 3] [--json OUT]``

On phantom PNGs written once per run (``daskpath.synthetic.make_cohort(layout="png")``,
``--files`` PNGs of ``--size``^2, i.e. ``--files / 2`` pairs; or ``--png-dir`` with existing
``*.png``), each item is timed ``--repeats`` times and the median reported:

1. **One PNG** (the first H&E), in this process:

   * *baseline*: ``vips copy x.png x.v`` (``pyvips.Image.new_from_file(png,
     access="sequential").write_to_file("x.v")``): libvips decodes the PNG and writes raw
     pixels, the limit for any PNG ingest (PNG decode is serial: one zlib stream);
   * ``daskpath.io.ingest`` (chunk 1024): decode + zstd-compressed NGFF level 0 + pyramid.

   Reported in MP/s (megapixels of level 0 per second); ``ingest / vips`` > 1 means slower.
   The peak RSS of one ingest is measured in a fresh subprocess (its ``VmHWM``; the interpreter
   and imports included).

2. **Several PNGs** (``--files``): ingested one after the other in this process (what a run did
   before: in the client) vs as tasks on a ``LocalCluster`` of ``--workers`` processes x 1
   thread through :func:`daskpath.io.ingest_on_cluster` (the run's pre-phase; cluster start-up
   excluded). Every repeat writes into a fresh cache folder.

The load average (1 min) is recorded at the start and the end: on a shared machine the
parallel gain is bounded by the cores actually free. Results go to ``--json`` (default
``benchmarks/results/ingest.json``). Tests never assert on these.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _median(fn, repeats: int) -> tuple[float, list[float], float]:
    """Median wall seconds, the runs, and median CPU seconds of this process."""
    times, cpus = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(times), times, statistics.median(cpus)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child started from
# this (large) process would report this process's peak as its own
_PEAK = """
import resource, sys
from daskpath.io import ingest
ingest(sys.argv[1], sys.argv[2], chunk_size=1024)
try:
    with open("/proc/self/status") as f:
        print(next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_mib(png: Path, dst: Path) -> float:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(png), str(dst)], check=True,
                         capture_output=True, text=True).stdout.split()[-1]
    shutil.rmtree(dst, ignore_errors=True)
    return int(out) / 1024.0  # KiB


def _pngs(args: argparse.Namespace, root: Path) -> list[Path]:
    if args.png_dir:
        found = sorted(Path(args.png_dir).glob("*.png"))[: args.files]
        if not found:
            raise SystemExit(f"no *.png in {args.png_dir}: give a folder of PNG slides")
        return found
    from daskpath.synthetic import make_cohort

    t = time.perf_counter()
    man = make_cohort(root / "png", pairs=max(1, (args.files + 1) // 2),
                      size=(args.size, args.size), seed=0, layout="png")
    print(f"wrote phantom PNGs in {time.perf_counter() - t:.0f} s", flush=True)
    return sorted(man.parent.glob("*.png"))[: args.files]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=8192, help="phantom side in px (default 8192)")
    ap.add_argument("--files", type=int, default=4, help="PNGs in the parallel item (default 4)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--png-dir", help="use these PNGs instead of writing phantoms")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "ingest.json"))
    args = ap.parse_args(argv)

    import pyvips
    from distributed import Client, LocalCluster

    from daskpath import io

    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        pngs = _pngs(args, tmp)
        one = pngs[0]
        h, w = io.slide_info(one)["shape"][:2]
        mp = h * w / 1e6
        print(f"{len(pngs)} PNG(s), first {one.name}: {h} x {w} px ({mp:.1f} MP, "
              f"{one.stat().st_size / 1e6:.0f} MB); load {load_start:.2f} on "
              f"{os.cpu_count()} cpus", flush=True)

        vfile = tmp / "x.v"

        def vips_copy() -> None:
            pyvips.Image.new_from_file(str(one), access="sequential").write_to_file(str(vfile))
            vfile.unlink()

        dst = tmp / "one.ome.zarr"

        def ingest_one() -> None:
            io.ingest(one, dst, chunk_size=1024)
            shutil.rmtree(dst)

        v_s, v_runs, v_cpu = _median(vips_copy, args.repeats)
        i_s, i_runs, i_cpu = _median(ingest_one, args.repeats)
        peak = _peak_rss_mib(one, dst)
        single = {"file": one.name, "shape": [h, w], "megapixels": mp,
                  "vips_copy_s": v_s, "ingest_s": i_s, "vips_copy_mps": mp / v_s,
                  "ingest_mps": mp / i_s, "ingest_over_vips": i_s / v_s,
                  "vips_copy_cpu_s": v_cpu, "ingest_cpu_s": i_cpu,
                  "ingest_peak_rss_mib": peak, "runs": {"vips_copy": v_runs, "ingest": i_runs}}
        print(f"one PNG: vips copy {mp / v_s:.1f} MP/s ({v_s:.2f} s), ingest {mp / i_s:.1f} MP/s "
              f"({i_s:.2f} s, {i_s / v_s:.2f}x vips), ingest peak RSS {peak:.0f} MiB", flush=True)

        total_mp = sum(io.slide_info(p)["shape"][0] * io.slide_info(p)["shape"][1]
                       for p in pngs) / 1e6
        counter = iter(range(10**6))

        def serial() -> None:
            cache = tmp / f"serial-{next(counter)}"
            cache.mkdir()
            for p in pngs:
                io.ingest(p, cache / (p.stem + ".ome.zarr"), chunk_size=1024)
            shutil.rmtree(cache)

        s_s, s_runs, s_cpu = _median(serial, args.repeats)
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0", host="127.0.0.1") as cluster, \
                Client(cluster) as client:
            client.run(lambda: __import__("daskpath.io"))  # imports are not the ingest's cost

            def parallel() -> None:
                cache = tmp / f"par-{next(counter)}"
                with io.ingest_on_cluster(client, pngs, cache) as batch:
                    for fut in batch.futures.values():
                        fut.result()
                assert len(list(cache.glob("*.ome.zarr"))) == len(pngs)
                shutil.rmtree(cache)

            def worker_cpu() -> float:
                return sum(client.run(lambda: sum(os.times()[:2])).values())

            w0 = worker_cpu()
            p_s, p_runs, p_client_cpu = _median(parallel, args.repeats)
            p_worker_cpu = (worker_cpu() - w0) / args.repeats
        load_end = os.getloadavg()[0]
        several = {"files": len(pngs), "megapixels": total_mp, "workers": args.workers,
                   "serial_client_s": s_s, "parallel_cluster_s": p_s, "speedup": s_s / p_s,
                   "serial_mps": total_mp / s_s, "parallel_mps": total_mp / p_s,
                   "serial_client_cpu_s": s_cpu, "parallel_client_cpu_s": p_client_cpu,
                   "parallel_workers_cpu_s": p_worker_cpu,
                   "runs": {"serial": s_runs, "parallel": p_runs}}
        print(f"{len(pngs)} PNGs ({total_mp:.0f} MP): serial in the client {s_s:.1f} s "
              f"({total_mp / s_s:.1f} MP/s), {args.workers} workers {p_s:.1f} s "
              f"({total_mp / p_s:.1f} MP/s): {s_s / p_s:.2f}x; CPU-s: client {s_cpu:.1f} serial, "
              f"{p_client_cpu:.1f} parallel (workers {p_worker_cpu:.1f}); load "
              f"{load_start:.2f} -> {load_end:.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {"size": args.size, "repeats": args.repeats, "cpus": os.cpu_count(),
              "load_avg_start": load_start, "load_avg_end": load_end,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "versions": {"pyvips": pyvips.__version__,
                           "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"},
              "one_png": single, "several_pngs": several}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
