"""Resume cost per stage: chunks recomputed after a run is killed at ~50 % of a stage.

Run: ``python benchmarks/bench_resume.py [--at 0.5] [--stages preprocess,nuclei,...]``
(several minutes on 2 cores; JSON ``benchmarks/results/resume.json``).

The procedure is ``tests/test_resume_stages.py``'s, measured instead of asserted. On a phantom
cohort (``make_cohort(pairs=2, size=(2048, 2048), seed=7)``, made once and cached in
``--workdir``) with the test's settings (tiles.size 512, chunk_size 256, nuclei.chunk_size 256,
baselines.batch_size 1):

1. a clean run of all stages, in process, on a ``LocalCluster`` of 2 worker processes x 1 thread
   (this also warms the workers: models load once per worker process);
2. per stage, **from scratch** (the baseline, same cluster, same benchmark run): a copy of the
   clean output folder, the stage forgotten on both slides (its work
   folders removed), then ``run``: the wall (and CPU) time of recomputing that stage;
3. per stage, **killed + rerun**: another copy, the stage forgotten, ``python -m daskpath.cli run
   cfg.yaml --no-progress`` started in a new session (cluster.n_workers 2, threads_per_worker 1,
   dashboard off); its chunk records (``.daskpath/work/<slide>/<stage>-<fp>/chunks/**``) are
   counted every 20 ms and the whole process group (client + workers) is SIGKILLed once
   ``--at`` of the stage's chunks exist; then ``run`` in process again: chunks resumed (loaded)
   and recomputed (from ``RunResult.stages``), wall / CPU time, and the final ``tiles.parquet``
   against the clean run's (max abs difference of the float columns; other columns must be equal).

Also measured: a rerun with nothing to do (every stage reused), the fixed cost in both times
(reading the parts, assembling the tables, report.html); the table also gives both times above it. CPU seconds = user + system of the
worker processes (``client.run`` + ``getrusage``) and of this process (client + scheduler).
If the killed run finishes before the kill threshold, its row says "finished before kill".
BLAS/OpenMP pools are pinned to 1 thread (inherited by the workers and the CLI subprocess).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = ["preprocess", "nuclei", "translate", "baselines"]

# the settings of tests/test_resume_stages.py: many chunk tasks per stage
SETTINGS = {
    "tiles": {"size": 512},
    "chunk_size": 256,
    "nuclei": {"chunk_size": 256},
    "baselines": {"batch_size": 1},
}


def _config(manifest: Path, out: Path) -> dict:
    return {
        "slides": str(manifest),
        "output_dir": str(out),
        **SETTINGS,
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None},
    }


def _flat(d: dict, prefix: str = "") -> list[str]:
    items = []
    for k, v in d.items():
        if isinstance(v, dict):
            items += _flat(v, f"{prefix}{k}.")
        else:
            items.append(f"{prefix}{k}={'null' if v is None else v}")
    return items


def _load(manifest: Path, out: Path):
    from daskpath.config import load_config

    return load_config(None, _flat(_config(manifest, out)))


def _records(out: Path, stage: str) -> int:
    from daskpath.publish import internal_dir

    work = internal_dir(out) / "work"
    return sum(1 for p in work.glob(f"*/{stage}-*/chunks/**/*")
               if ".partial" not in p.name and p.is_file())


def _forget(out: Path, stage: str, slides: list[str]) -> None:
    """The test's way: remove the stage's work folders, on every slide."""
    from daskpath.publish import internal_dir
    from daskpath.runner import slide_key

    for s in slides:
        for d in (internal_dir(out) / "work" / slide_key(s)).glob(f"{stage}-*"):
            shutil.rmtree(d)


def _fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_workers(client) -> dict:
    def f():
        import resource as _r

        u = _r.getrusage(_r.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    return client.run(f)


def _timed_run(cfg, client):
    """``run`` in process: (result, wall s, CPU s of workers + this process)."""
    from daskpath.pipeline import run

    w0, c0 = _cpu_workers(client), _cpu_self()
    t0 = time.perf_counter()
    res = run(cfg, client=client)
    wall = time.perf_counter() - t0
    w1, c1 = _cpu_workers(client), _cpu_self()
    if set(w0) != set(w1):  # a worker restarted: its CPU time is not comparable
        cpu = float("nan")
    else:
        cpu = sum(w1[k] - w0[k] for k in w1) + (c1 - c0)
    return res, wall, cpu


def _stage_info(res, stage: str, slides: list[str]) -> dict:
    st = {s: res.stages.get(s, {}).get(stage, {}) for s in slides}
    chunks = sum(v.get("chunks", 0) for v in st.values() if v.get("recomputed"))
    resumed = sum(v.get("chunks_resumed", 0) for v in st.values() if v.get("recomputed"))
    return {
        "chunks": chunks,
        "chunks_resumed": resumed,
        "chunks_recomputed": chunks - resumed,
        "recomputed_stages": {s: res.recomputed(s) for s in slides},
        "per_slide": st,
    }


def _compare(out: Path, clean_out: Path) -> dict:
    """Max abs difference of tiles.parquet's float columns vs the clean run's (NaN = NaN)."""
    a = pd.read_parquet(out / "tiles.parquet")
    b = pd.read_parquet(clean_out / "tiles.parquet")
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return {"equal": False, "why": f"shape/columns differ: {a.shape} vs {b.shape}",
                "max_abs_diff": None}
    fl = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
    other = [c for c in a.columns if c not in fl]
    diff = 0.0
    nan_mismatch = []  # NaN or inf on one side only (or inf of opposite sign)
    for c in fl:
        x, y = a[c].to_numpy(float), b[c].to_numpy(float)
        with np.errstate(invalid="ignore"):
            d = np.abs(x - y)
        d[(x == y) | (np.isnan(x) & np.isnan(y))] = 0.0
        if not np.isfinite(d).all():
            nan_mismatch.append(c)
        if np.isfinite(d).any():
            diff = max(diff, float(d[np.isfinite(d)].max()))
    other_diff = [c for c in other if not a[c].equals(b[c])]
    return {
        "equal": not nan_mismatch and not other_diff and diff <= 1e-9,
        "max_abs_diff": diff,
        "float_columns": len(fl),
        "nan_or_inf_mismatch": nan_mismatch,
        "non_float_columns_differing": other_diff,
    }


def from_scratch(stage: str, clean_out: Path, work: Path, manifest: Path, slides: list[str], client) -> dict:
    out = _fresh_copy(clean_out, work / f"scratch-{stage}")
    _forget(out, stage, slides)
    res, wall, cpu = _timed_run(_load(manifest, out), client)
    info = _stage_info(res, stage, slides)
    return {"ok": bool(res.ok), "failures": res.failures.to_dict("records"), "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), **info, "tiles_vs_clean": _compare(out, clean_out)}


def killed_then_rerun(stage: str, total: int, at: float, clean_out: Path, work: Path, manifest: Path,
                      slides: list[str], client, timeout: float) -> dict:
    out = _fresh_copy(clean_out, work / f"kill-{stage}")
    _forget(out, stage, slides)
    assert _records(out, stage) == 0
    cfg_path = work / f"kill-{stage}.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(manifest, out)))
    log_path = work / f"kill-{stage}.log"
    threshold = max(1, math.ceil(at * total))
    with open(log_path, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "daskpath.cli", "run", str(cfg_path), "--no-progress"],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
        )
        killed_at = None
        first_record_s = None
        try:
            while time.perf_counter() - t0 < timeout and proc.poll() is None:
                n = _records(out, stage)
                if n and first_record_s is None:
                    first_record_s = time.perf_counter() - t0
                if n >= threshold:
                    os.killpg(proc.pid, signal.SIGKILL)  # the client and its workers: a node loss
                    killed_at = n
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None and killed_at is None:
                os.killpg(proc.pid, signal.SIGKILL)  # timed out: do not leave it running
            proc.wait(60)
        kill_s = time.perf_counter() - t0
    present = _records(out, stage)
    log_tail = log_path.read_text(errors="replace")[-2000:]
    if killed_at is None:
        status = "finished before kill" if proc.returncode == 0 else f"run ended, exit {proc.returncode}"
        if proc.returncode is not None and proc.returncode < 0 and time.perf_counter() - t0 >= timeout:
            status = f"timed out after {timeout:.0f} s, not killed at threshold"
    else:
        status = "killed"
    res, wall, cpu = _timed_run(_load(manifest, out), client)
    info = _stage_info(res, stage, slides)
    return {
        "status": status,
        "threshold": threshold,
        "records_at_kill": killed_at,
        "records_after_kill": present,
        "killed_after_s": round(kill_s, 2),
        "first_record_after_s": None if first_record_s is None else round(first_record_s, 2),
        "killed_run_exit": proc.returncode,
        "killed_run_log_tail": log_tail if status != "killed" else log_tail[-600:],
        "rerun": {"ok": bool(res.ok), "failures": res.failures.to_dict("records"), "wall_s": round(wall, 2),
                  "cpu_s": round(cpu, 2), **info},
        "tiles_vs_clean": _compare(out, clean_out),
    }


def _machine() -> dict:
    mem = {}
    try:
        for ln in Path("/proc/meminfo").read_text().splitlines():
            k, v = ln.split(":", 1)
            if k in ("MemTotal", "MemAvailable"):
                mem[k] = round(int(v.split()[0]) / 2**20, 1)
    except OSError:
        pass
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "mem_total_gib": mem.get("MemTotal"),
            "mem_available_gib_at_start": mem.get("MemAvailable"), "python": platform.python_version(),
            "platform": platform.platform()}


def _versions() -> dict:
    import importlib.metadata as md

    v = {}
    for p in ("daskpath", "dask", "distributed", "numpy", "pandas", "pyarrow", "torch", "tensorflow",
              "stardist", "scikit-learn", "zarr", "tifffile"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    return v


def _fmt(x, nd=1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def table(results: dict) -> str:
    noop = results.get("noop_rerun", {})
    lines = [
        "| stage | chunks total (2 slides) | records after kill | resumed on rerun | recomputed on rerun "
        "| rerun wall s (CPU s) | from scratch wall s (CPU s) | rerun / scratch (wall, CPU) "
        "| above the no-op rerun: rerun / scratch (wall s) | tiles.parquet vs clean: max abs diff | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st, r in results["stages"].items():
        k, sc = r["kill"], r["scratch"]
        rr = k["rerun"]
        ratio_w = rr["wall_s"] / sc["wall_s"] if sc["wall_s"] else float("nan")
        ratio_c = rr["cpu_s"] / sc["cpu_s"] if sc["cpu_s"] else float("nan")
        d = k["tiles_vs_clean"]
        dtxt = (f"{d['max_abs_diff']:.1e}" if d.get("max_abs_diff") is not None else "n/a") + \
               ("" if d.get("equal") else " (**differs**)")
        n0 = noop.get("wall_s")
        if n0 is not None:
            ew, es = rr["wall_s"] - n0, sc["wall_s"] - n0
            extra = f"{_fmt(ew)} / {_fmt(es)} = {_fmt(ew / es if es > 0 else float('nan'), 2)}"
        else:
            extra = "-"
        rec = f"{k['records_after_kill']}" + (f" (kill at {k['records_at_kill']})"
                                                if k["records_at_kill"] is not None else "")
        lines.append(
            f"| {st} | {r['chunks_total']} | {rec} | {rr['chunks_resumed']} | {rr['chunks_recomputed']} "
            f"| {_fmt(rr['wall_s'])} ({_fmt(rr['cpu_s'])}) | {_fmt(sc['wall_s'])} ({_fmt(sc['cpu_s'])}) "
            f"| {_fmt(ratio_w, 2)}, {_fmt(ratio_c, 2)} | {extra} | {dtxt} | {k['status']} |"
        )
    if noop:
        lines.append("")
        lines.append(f"Rerun with nothing to do (all stages reused): wall {_fmt(noop['wall_s'])} s, "
                     f"CPU {_fmt(noop['cpu_s'])} s. Clean run of all stages: wall "
                     f"{_fmt(results['clean']['wall_s'])} s, CPU {_fmt(results['clean']['cpu_s'])} s.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/daskpath-bench-resume")
    ap.add_argument("--at", type=float, default=0.5, help="kill once this fraction of the stage's chunks is recorded")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--timeout", type=float, default=600, help="seconds the killed run may take to reach --at")
    ap.add_argument("--json", default=str(HERE / "results" / "resume.json"))
    a = ap.parse_args()
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stages {bad}; stages are {STAGES}")
    if not 0 < a.at < 1:
        ap.error("--at must be in (0, 1)")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)

    from distributed import Client, LocalCluster

    from daskpath.synthetic import make_cohort

    manifest = work / "cohort" / "manifest.csv"
    if not manifest.exists():
        make_cohort(manifest.parent, pairs=2, size=(2048, 2048), seed=7)

    results: dict = {
        "what": "resume cost per stage: chunks recomputed after a SIGKILL of the run's process group "
                f"at ~{a.at:.0%} of the stage's chunk records, vs recomputing the stage from scratch",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": _machine(),
        "versions": _versions(),
        "load_average_start": list(os.getloadavg()),
        "cohort": {"pairs": 2, "size": [2048, 2048], "seed": 7},
        "settings": SETTINGS,
        "cluster": "in process: LocalCluster 2 worker processes x 1 thread; killed run: "
                   "daskpath.cli run, cluster.n_workers 2, threads_per_worker 1, dashboard off",
        "at": a.at,
        "stages": {},
    }
    jpath = Path(a.json)
    jpath.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["load_average_end"] = list(os.getloadavg())
        jpath.write_text(json.dumps(results, indent=2, default=str) + "\n")

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        clean_out = work / "clean"
        if clean_out.exists():
            shutil.rmtree(clean_out)
        print("clean run ...", flush=True)
        clean, wall, cpu = _timed_run(_load(manifest, clean_out), client)
        if not clean.ok:
            raise SystemExit(f"clean run failed: {clean.failures.to_dict('records')}")
        slides = list(clean.slides.slide)
        results["clean"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "slides": slides,
                            "tiles": len(clean.tiles),
                            "chunks": {st: {s: clean.stages[s][st]["chunks"] for s in slides} for st in STAGES}}
        print(f"  {wall:.1f} s; chunks per stage: {results['clean']['chunks']}", flush=True)
        noop_out = _fresh_copy(clean_out, work / "noop")
        res, wall, cpu = _timed_run(_load(manifest, noop_out), client)
        results["noop_rerun"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                 "recomputed": {s: res.recomputed(s) for s in slides}}
        save()
        for stage in stages:
            total = sum(clean.stages[s][stage]["chunks"] for s in slides)
            print(f"{stage}: {total} chunks; from scratch ...", flush=True)
            sc = from_scratch(stage, clean_out, work, manifest, slides, client)
            print(f"  scratch {sc['wall_s']} s; killed run ...", flush=True)
            k = killed_then_rerun(stage, total, a.at, clean_out, work, manifest, slides, client, a.timeout)
            print(f"  {k['status']} at {k['records_at_kill']} records ({k['records_after_kill']} after); "
                  f"rerun {k['rerun']['wall_s']} s, resumed {k['rerun']['chunks_resumed']}, "
                  f"recomputed {k['rerun']['chunks_recomputed']}", flush=True)
            results["stages"][stage] = {"chunks_total": total, "scratch": sc, "kill": k}
            save()
            for d in (work / f"scratch-{stage}", work / f"kill-{stage}"):
                shutil.rmtree(d, ignore_errors=True)
    save()
    print()
    print(table(results))


if __name__ == "__main__":
    main()
