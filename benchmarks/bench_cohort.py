"""Cohort-scale figures (issue 5): scheduler overhead, resume after a killed client, worker faults.

Run: ``python benchmarks/bench_cohort.py [--quick] [--json benchmarks/results/cohort.json]``

1. Scheduler overhead: tasks and pickled graph size per slide for a reference-cohort-sized slide
   (31104 x 31938 px, default chunks), and the time to plan + submit a 20-slide cohort. The
   slides are empty OME-Zarr stores of the right shape (planning reads headers only).
2. Resume: a run whose client process is killed once ~50% of the chunks are recorded, then the
   same command again: chunks recomputed vs chunks total, and the tables equal a clean run's.
3. Fault: the same cohort with one worker process SIGKILLed at ~50%: results identical to the
   clean run; time overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent


def _cfg(manifest: Path, out: Path, *extra: str):
    from daskpath.config import load_config

    return load_config(None, [f"slides={manifest}", f"output_dir={out}", "stages=[preprocess]", *extra])


def _graph(collections) -> dict:
    """The merged, low-level task graph of some dask collections."""
    import dask
    from dask.base import collections_to_expr

    expr = collections_to_expr(collections, optimize_graph=False)
    return dict(expr.__dask_graph__())


def scheduler_overhead(work: Path, n_slides: int = 20) -> dict:
    import zarr
    from distributed import Client, LocalCluster

    from daskpath.pipeline import plan_preprocess

    shape = (31104, 31938)
    z = work / "empty.zarr"
    if not z.exists():
        root = zarr.open_group(str(z), mode="w")
        root.create_array("0", shape=shape + (3,), chunks=(1024, 1024, 3), dtype="uint8", fill_value=255)
        root.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [{
                "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"},
                         {"name": "c", "type": "channel"}],
                "datasets": [{"path": "0", "coordinateTransformations": [
                    {"type": "scale", "scale": [0.25, 0.25, 1.0]}]}],
            }],
        }
    rows = [{"slide": f"s{i:02d}", "he": str(z), "ihc": str(z)} for i in range(n_slides)]
    man = work / "cohort20.csv"
    pd.DataFrame(rows).to_csv(man, index=False)
    cfg = _cfg(man, work / "out20", "layers.downsample=8")
    t0 = time.perf_counter()
    plans = [plan_preprocess(r["slide"], r["he"], r["ihc"], cfg, output_dir=work / "out20") for r in rows]
    t_plan = time.perf_counter() - t0
    import dask

    graph = _graph([t for _, t in plans[0].tasks])
    import cloudpickle

    nbytes = len(cloudpickle.dumps(graph))
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as c, Client(c) as cl:
        t0 = time.perf_counter()
        futs = []
        for p in plans:
            futs += cl.compute([t for _, t in p.tasks])
        # wait until the scheduler knows every task
        n_expected = len(graph) * n_slides
        while sum(cl.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) for _ in [0]) < 0.95 * n_expected:
            time.sleep(0.05)
            if time.perf_counter() - t0 > 300:
                break
        t_submit = time.perf_counter() - t0
        cl.cancel(futs)
    return {
        "slide_shape": list(shape),
        "chunks_per_slide": plans[0].n_chunks,
        "tasks_per_slide": len(graph),
        "graph_bytes_per_slide": nbytes,
        "slides": n_slides,
        "plan_seconds_total": round(t_plan, 2),
        "submit_seconds_total": round(t_submit, 2),
    }


_CHILD = """
import sys
from daskpath.config import load_config
from daskpath.pipeline import run
cfg = load_config(None, sys.argv[1:])
res = run(cfg)
print("CHUNKS", res.chunks_computed, res.chunks_total)
"""


def resume(manifest: Path, work: Path, reference: pd.DataFrame, extra: list[str]) -> dict:
    out = work / "resume"
    args = [f"slides={manifest}", f"output_dir={out}", "overwrite=false", "stages=[preprocess]",
            "cluster.n_workers=2", "cluster.threads_per_worker=1",
            "cluster.dashboard_address=127.0.0.1:0", *extra]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    total = None
    t0 = time.time()
    killed_at = None
    while proc.poll() is None and time.time() - t0 < 600:
        n = len(list(out.glob(".daskpath/work/*/*/chunks/*.npz"))) + 16 * len(list(out.glob(".daskpath/work/*/preprocess-*/done.json")))
        if n >= 16:  # about half of the 32 chunks
            killed_at = n
            os.killpg(proc.pid, signal.SIGKILL)  # the client and its whole local cluster
            break
        time.sleep(0.05)
    proc.wait()
    res_out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, timeout=900)
    line = [ln for ln in res_out.stdout.splitlines() if ln.startswith("CHUNKS")][-1]
    computed, total = (int(v) for v in line.split()[1:])
    tiles = pd.read_parquet(out / "tiles.parquet")
    same = bool(((tiles[["tissue_fraction", "ssim"]].values - reference[["tissue_fraction", "ssim"]].values) ** 2).max() < 1e-12)
    return {"chunks_recorded_before_kill": killed_at, "chunks_recomputed_on_rerun": computed,
            "chunks_total": 32, "chunks_in_remaining_slides": total, "tables_equal_clean_run": same}


def fault(manifest: Path, work: Path, reference: pd.DataFrame, clean_s: float, extra: list[str]) -> dict:
    from distributed import Client, LocalCluster

    from daskpath.pipeline import run

    out = work / "fault"
    cfg = _cfg(manifest, out, "overwrite=true", *extra)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as c, Client(c) as cl:
        pids = cl.run(os.getpid)
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(res=run(cfg, client=cl)))
        t0 = time.perf_counter()
        th.start()
        killed = False
        while th.is_alive():
            n = len(list(out.glob(".daskpath/work/*/*/chunks/*.npz"))) + 16 * len(list(out.glob(".daskpath/work/*/preprocess-*/done.json")))
            if n >= 16 and not killed:
                os.kill(next(iter(pids.values())), signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        th.join()
        dt = time.perf_counter() - t0
    res = box["res"]
    diff = float(abs(res.tiles[["tissue_fraction", "ssim"]].values - reference[["tissue_fraction", "ssim"]].values).max())
    return {"tiles": len(res.tiles), "worker_killed": killed, "ok": res.ok, "max_abs_diff_vs_clean": diff,
            "seconds": round(dt, 1), "clean_seconds": round(clean_s, 1),
            "overhead": round(dt / clean_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/daskpath-bench-cohort")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(HERE / "results" / "cohort.json"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from distributed import Client, LocalCluster

    from daskpath.pipeline import run
    from daskpath.synthetic import make_cohort

    size = 2048 if a.quick else 4096
    chunk = 512 if a.quick else 1024  # 16 chunks per slide
    extra = [f"chunk_size={chunk}"]
    manifest = work / f"slides{size}" / "manifest.csv"
    if not manifest.exists():
        make_cohort(manifest.parent, pairs=2, size=(size, size), seed=11)
    results: dict = {"machine": f"{os.cpu_count()} cores", "slide_size": size, "chunk_size": chunk}
    results["scheduler"] = scheduler_overhead(work, n_slides=5 if a.quick else 20)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as c, Client(c) as cl:
        run(_cfg(manifest, work / "warm", "overwrite=true", *extra), client=cl)
        t0 = time.perf_counter()
        ref = run(_cfg(manifest, work / "clean", "overwrite=true", *extra), client=cl).tiles
        clean_s = time.perf_counter() - t0
    results["resume"] = resume(manifest, work, ref, extra)
    results["fault"] = fault(manifest, work, ref, clean_s, extra)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    s, r, f = results["scheduler"], results["resume"], results["fault"]
    print("| figure | value |\n|---|---|")
    print(f"| chunks / tasks per {s['slide_shape'][0]}x{s['slide_shape'][1]} slide | {s['chunks_per_slide']} / {s['tasks_per_slide']} |")
    print(f"| pickled graph per slide | {s['graph_bytes_per_slide'] / 1e6:.2f} MB |")
    print(f"| plan {s['slides']} slides / submit to scheduler | {s['plan_seconds_total']} s / {s['submit_seconds_total']} s |")
    print(f"| resume: chunks recorded before client kill | {r['chunks_recorded_before_kill']} of {r['chunks_total']} |")
    print(f"| resume: chunks recomputed on rerun | {r['chunks_recomputed_on_rerun']} of {r['chunks_total']} (tables equal clean run: {r['tables_equal_clean_run']}) |")
    print(f"| fault: worker killed at ~50%, {f['tiles']} tiles | max diff {f['max_abs_diff_vs_clean']:.1e}, {f['seconds']} s vs {f['clean_seconds']} s clean ({f['overhead']}x) |")


if __name__ == "__main__":
    main()
