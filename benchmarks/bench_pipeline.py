"""Benchmark: cohort wall time, barrier run loop (the old main) vs pipelined run loop (working tree).

The issue: "Cohort wall time, 4 pairs of 4096² phantoms, all stages, 2 workers: barrier design
(today's main) vs pipelined, both in one run of the benchmark; aim >= 1.25x, with the
task-stream utilisation of both (from the performance report)."

Contenders (same phantoms, same config, same cluster shape, both measured in this run):

* **barrier** -- ``daskpath`` as of ``--old-commit`` (default 8c25a69, the last commit on main),
  extracted once with ``git archive`` into ``<workdir>/barrier_src-<commit>`` and put first on
  ``PYTHONPATH`` of its subprocess (and so of the subprocess's spawned dask workers), with a
  ``sitecustomize.py`` there that removes the editable install's import hook (which would
  otherwise serve modules the old tree lacks, e.g. ``daskpath.runner``, from the working tree).
  Checked in every variant: ``daskpath.__file__`` in the client and, via ``client.run``, on every
  worker before the run, and every loaded ``daskpath.*`` module in both after it. Its run loop
  preprocesses every slide, then runs each model stage (nuclei, translate, baselines) one slide
  at a time, blocking on each.
* **pipelined** -- ``daskpath`` of the working tree (this script's repository): each slide runs
  in a client-side thread through all stages, a bounded window of slides in flight, so one
  slide's model stages overlap the next slide's preprocessing.
* optional control ``serial`` (``--serial``) -- the working tree with one slide in flight (its
  run loop's thread pool patched to one thread): the same stage code as ``pipelined`` without the
  overlap. The working tree also changed the stages themselves (halo/overlap code, nuclei,
  translate, baselines), so barrier / pipelined is not the run loop alone: serial / pipelined is
  the overlap's share, barrier / serial the rest.

Each variant runs in a fresh subprocess (``--child``) that starts
``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` + ``Client`` (start-up time
reported apart), warms the client and the workers by importing the pipeline's modules and the
model libraries (torch, tensorflow, stardist; reported apart, ``--no-warm`` to include the imports
in the run), then times ``daskpath.pipeline.run(cfg, client=client, performance_report=html)``
with ``time.perf_counter`` inside ``distributed.get_task_stream``. Config: all default stages,
``tiles.size`` 1024 (``--tile``), a fresh ``output_dir``; everything else default.

Figures per run: wall seconds of ``run()``; **task-stream utilisation** = sum over task records
of the ``compute`` intervals (clipped to the run) / (wall x total worker threads); CPU seconds
(user + system of the workers and of the client process, which also hosts the scheduler);
compute seconds by task group; the time at which each slide's results were complete (pipelined:
the last write of the slide's ``.daskpath/state/<slide>.json``; barrier: its last stage's
``parts/<slide>.<stage>.parquet``), relative to the start of ``run()``; ``res.ok``. The variants
run alternately (barrier, pipelined) ``--repeat`` times; the table gives medians and the speed-up
= median barrier wall / median pipelined wall (and the median of the per-round ratios). JSON
(written after every run) goes to ``benchmarks/results/pipeline.json`` (``--json``); each run's
performance report (HTML) and stderr log stay in ``<workdir>/reports``.

The phantom cohort (``daskpath.synthetic.make_cohort(dir, pairs, size, seed=0)``, tiled JPEG
TIFF) is generated once, by the pinned old code, and cached in ``--workdir``.

    python benchmarks/bench_pipeline.py                 # 4 pairs of 4096², tiles 1024 (the issue)
    python benchmarks/bench_pipeline.py --repeat 3      # alternate the two 3 times, medians
    python benchmarks/bench_pipeline.py --serial        # + the control (working tree, 1 slide in flight)
    python benchmarks/bench_pipeline.py --quick         # smoke test: 2 pairs of 1024², tiles 512
    # options: --pairs --size --tile --repeat --serial --workdir --json --timeout --old-commit --no-warm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("barrier", "pipelined")
#: opt-in control (``--serial``): the working tree's code with one slide in flight (no overlap)
SERIAL = "serial"
N_WORKERS, THREADS = 2, 1
RESULT_TAG = "BENCH_PIPELINE_RESULT "
AIM = 1.25

#: imported in the client and on every worker before the timed run (missing ones are skipped:
#: the two code versions do not have the same modules)
WARM_MODULES = [
    "daskpath.pipeline", "daskpath.io", "daskpath.similarity", "daskpath.tissue", "daskpath.nuclei",
    "daskpath.stain", "daskpath.translate.inference", "daskpath.baselines.rf",
    "daskpath.baselines.classifier", "daskpath.report", "daskpath.runner", "daskpath.publish",
    "daskpath.stages.preprocess", "daskpath.stages.nuclei", "daskpath.stages.translate",
    "daskpath.stages.baselines", "torch", "tensorflow", "stardist.models", "skops.io",
]


# --------------------------------------------------------------------------------------------
# child: one variant, one run (runs in its own process, with the variant's daskpath)
# --------------------------------------------------------------------------------------------


def _warm(mods: list[str]) -> list[str]:
    """Import ``mods``; a module that does not exist in this code version is skipped."""
    import importlib

    done = []
    for m in mods:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name and (m == e.name or m.startswith(e.name + ".")):
                continue  # not in this version (e.g. daskpath.runner in the old code)
            raise
        done.append(m)
    return done


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _daskpath_file() -> str:
    return __import__("daskpath").__file__


def _under(path: str, root: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def _slide_done_times(out: Path, variant: str, slides: list[str], stages: list[str], e0: float) -> dict:
    """Seconds after the start of run() at which each slide's results were complete (file mtimes)."""
    done = {}
    for s in slides:
        if variant != "barrier":
            files = list((out / ".daskpath" / "state").glob("*.json"))
            files = [f for f in files if f.stem == s or f.stem.startswith(s + "-")] or []
        else:
            last = [st for st in ("nuclei", "translate", "baselines") if st in stages]
            files = [out / "parts" / (f"{s}.{last[-1]}.parquet" if last else f"{s}.tiles.parquet")]
        files = [f for f in files if f.exists()]
        if files:
            done[s] = round(max(f.stat().st_mtime for f in files) - e0, 2)
    return done


def _daskpath_modules_outside(root: str) -> list[str]:
    """Loaded ``daskpath`` modules whose file is not under ``root`` (must be none)."""
    bad = []
    for name, m in list(sys.modules.items()):
        f = getattr(m, "__file__", None)
        if (name == "daskpath" or name.startswith("daskpath.")) and f and not _under(f, root):
            bad.append(f"{name}: {f}")
    return bad


def _one_slide_in_flight() -> None:
    """The ``serial`` control: the working tree's run loop with a window of one slide."""
    import concurrent.futures as cf
    import types

    import daskpath.runner as runner

    if getattr(runner, "cf", None) is not cf:
        raise SystemExit("serial: daskpath.runner no longer uses concurrent.futures as 'cf'; "
                         "update _one_slide_in_flight")

    def one_thread(max_workers=None, *args, **kw):
        return cf.ThreadPoolExecutor(1, *args, **kw)

    runner.cf = types.SimpleNamespace(**{k: getattr(cf, k) for k in dir(cf) if not k.startswith("_")})
    runner.cf.ThreadPoolExecutor = one_thread


def child(a: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    t_imp = time.perf_counter()
    import distributed
    from distributed import Client, LocalCluster, get_task_stream
    from distributed.utils import key_split

    import daskpath

    if not _under(daskpath.__file__, a.expect):
        raise SystemExit(f"{a.child}: imported daskpath from {daskpath.__file__}, expected under {a.expect}")
    from daskpath.config import load_config
    from daskpath.io import read_manifest
    from daskpath.pipeline import run

    if a.child == SERIAL:
        _one_slide_in_flight()
    import_s = time.perf_counter() - t_imp
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    cluster = LocalCluster(n_workers=N_WORKERS, threads_per_worker=THREADS, processes=True,
                           dashboard_address=":0", host="127.0.0.1")
    client = Client(cluster)
    client.wait_for_workers(N_WORKERS)
    cluster_s = time.perf_counter() - t
    try:
        worker_files = client.run(lambda: __import__("daskpath").__file__)
        bad = {w: f for w, f in worker_files.items() if not _under(f, a.expect)}
        if bad:
            raise SystemExit(f"{a.child}: workers import daskpath from the wrong place: {bad} "
                             f"(expected under {a.expect})")
        nthreads = sum(client.nthreads().values())
        warm_s, warmed = 0.0, []
        if not a.no_warm:
            t = time.perf_counter()
            warmed = _warm(WARM_MODULES)
            client.run(_warm, WARM_MODULES)
            warm_s = time.perf_counter() - t
        cfg = load_config(None, [f"slides={a.manifest}", f"output_dir={out}", *a.set])
        slides = [str(s) for s in read_manifest(cfg.slides)["slide"]]
        cpu_w0 = client.run(_cpu_seconds)
        cpu_c0 = _cpu_seconds()
        load0 = os.getloadavg()
        with get_task_stream(client) as ts:
            e0 = time.time()
            p0 = time.perf_counter()
            res = run(cfg, client=client, performance_report=a.report)
            wall = time.perf_counter() - p0
            e1 = time.time()
        cpu_w1 = client.run(_cpu_seconds)
        cpu_c1 = _cpu_seconds()
        load1 = os.getloadavg()
        # every daskpath module the run loaded, in the client and on the workers, is the variant's
        stray = _daskpath_modules_outside(a.expect) + [
            f"{w}: {m}" for w, ms in client.run(_daskpath_modules_outside, a.expect).items() for m in ms]
        if stray:
            raise SystemExit(f"{a.child}: daskpath modules loaded from outside {a.expect}: {stray}")
        busy, groups, n_records = 0.0, {}, 0
        for rec in ts.data:
            n_records += 1
            for ss in rec.get("startstops", ()):
                if ss.get("action") != "compute":
                    continue
                d = max(0.0, min(ss["stop"], e1) - max(ss["start"], e0))
                busy += d
                g = key_split(rec.get("key"))
                groups[g] = groups.get(g, 0.0) + d
        cpu_workers = sum(cpu_w1[w] - cpu_w0.get(w, 0.0) for w in cpu_w1)
        failures = res.failures.to_dict("records") if len(res.failures) else []
        done = _slide_done_times(out, a.child, slides, list(cfg.stages), e0)
        result = {
            "variant": a.child,
            "ok": bool(res.ok),
            "failures": failures,
            "wall_s": round(wall, 3),
            "utilisation": round(busy / (wall * nthreads), 4) if wall > 0 else None,
            "compute_s": round(busy, 2),
            "worker_threads": nthreads,
            "task_records": n_records,
            "task_stream_truncated": n_records >= 100000,
            "compute_s_by_group": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "cpu_s_workers": round(cpu_workers, 2),
            "cpu_s_client": round(cpu_c1 - cpu_c0, 2),
            "cpu_s": round(cpu_workers + cpu_c1 - cpu_c0, 2),
            "slide_done_s": done,
            "first_slide_done_s": min(done.values()) if done else None,
            "cluster_start_s": round(cluster_s, 2),
            "warm_imports_s": round(warm_s, 2),
            "warmed": warmed,
            "import_s": round(import_s, 2),
            "load_avg_before": [round(x, 2) for x in load0],
            "load_avg_after": [round(x, 2) for x in load1],
            "daskpath_file": daskpath.__file__,
            "worker_daskpath_files": sorted(set(worker_files.values())),
            "stages": list(cfg.stages),
            "tiles": int(len(res.tiles)),
            "tiles_kept": int(res.tiles["keep"].sum()) if "keep" in res.tiles.columns else None,
            "slides": len(slides),
            "chunks_total": int(getattr(res, "chunks_total", 0) or 0),
            "report": a.report,
            "distributed": distributed.__version__,
        }
    finally:
        client.close()
        cluster.close()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# parent: old code, cohort, alternating subprocesses, table + JSON
# --------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def barrier_source(work: Path, commit: str) -> Path:
    """``<work>/barrier_src-<commit>``: the old ``daskpath`` package, extracted once."""
    dest = work / f"barrier_src-{commit[:12]}"
    marker = dest / ".commit"
    if marker.exists() and marker.read_text().strip() == commit and (dest / "daskpath").is_dir():
        (dest / "sitecustomize.py").write_text(SITECUSTOMIZE)
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "daskpath"], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    # The editable install's import hook would serve modules that the old tree lacks (e.g.
    # daskpath.runner) from the working tree; this sitecustomize (first on PYTHONPATH, so run in
    # the variant's process and in its spawned workers) removes the hook.
    (dest / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker.write_text(commit + "\n")
    return dest


SITECUSTOMIZE = '''"""bench_pipeline: no editable-install import hook for daskpath in the barrier variant."""
import sys

sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable___daskpath")]
sys.path_hooks[:] = [h for h in sys.path_hooks
                     if not getattr(h, "__module__", "").startswith("__editable___daskpath")]
sys.path[:] = [p for p in sys.path if not str(p).startswith("__editable__.daskpath")]
sys.path_importer_cache.clear()
'''


def _env(variant: str, barrier_src: Path) -> dict:
    env = dict(os.environ)
    old = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and "barrier_src" not in p]
    if variant == "barrier":
        old.insert(0, str(barrier_src))
    if old:
        env["PYTHONPATH"] = os.pathsep.join(old)
    else:
        env.pop("PYTHONPATH", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def make_cohort_cached(work: Path, barrier_src: Path, pairs: int, size: int, timeout: float) -> Path:
    """The phantom cohort (tiled JPEG TIFF), generated once by the pinned old code."""
    d = work / f"cohort-{pairs}x{size}"
    manifest = d / "manifest.csv"
    if manifest.exists():
        return manifest
    code = ("import sys\nfrom daskpath.synthetic import make_cohort\n"
            "make_cohort(sys.argv[1], pairs=int(sys.argv[2]), size=(int(sys.argv[3]),) * 2, seed=0)\n")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(d), str(pairs), str(size)], check=True,
                   env=_env("barrier", barrier_src), cwd=str(work), timeout=timeout)
    print(f"cohort: {pairs} pairs of {size}² written to {d} in {time.perf_counter() - t:.0f} s", flush=True)
    return manifest


def run_variant(variant: str, rnd: int, a, work: Path, barrier_src: Path, manifest: Path,
                extra: list[str]) -> dict:
    reports = work / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    out = work / "runs" / f"{variant}-{rnd}"
    html = reports / f"{variant}-{rnd}.html"
    log = reports / f"{variant}-{rnd}.log"
    expect = barrier_src / "daskpath" if variant == "barrier" else ROOT / "daskpath"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--manifest", str(manifest),
           "--out", str(out), "--report", str(html), "--expect", str(expect)]
    for x in extra:
        cmd += ["--set", x]
    if a.no_warm:
        cmd.append("--no-warm")
    t = time.perf_counter()
    with open(log, "w") as errf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, cwd=str(work),
                             env=_env(variant, barrier_src), start_new_session=True)
        try:
            stdout, _ = p.communicate(timeout=a.timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the child and its local cluster
            stdout, _ = p.communicate()
            rc = "timeout"
    total = time.perf_counter() - t
    lines = [ln for ln in (stdout or "").splitlines() if ln.startswith(RESULT_TAG)]
    if rc == 0 and lines:
        r = json.loads(lines[-1][len(RESULT_TAG):])
    else:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        r = {"variant": variant, "ok": False, "error": f"subprocess exit {rc}", "stderr_tail": tail}
        print(f"!! {variant} round {rnd} failed ({rc}); last lines of {log}:", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
    r.update(round=rnd, process_s=round(total, 1), log=str(log))
    if r.get("ok") is False and r.get("failures"):
        print(f"!! {variant} round {rnd}: failed slides:", file=sys.stderr)
        for f in r["failures"]:
            print(f"   {f}", file=sys.stderr)
    return r


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    v = {"python": platform.python_version()}
    for name in ("dask", "distributed", "numpy", "torch", "tensorflow", "tensorflow-cpu", "stardist", "tifffile", "zarr",
                 "opencv-python-headless", "opencv-python", "scikit-learn"):
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            pass
    return v


def _machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    m = {"cores": cores, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        for ln in Path("/proc/meminfo").read_text().splitlines():
            if ln.startswith("MemTotal:"):
                m["memory_gib"] = round(int(ln.split()[1]) / 1024 ** 2, 1)
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                m["cpu"] = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return m


def _summary(runs: list[dict], variants: tuple[str, ...]) -> dict:
    s: dict = {}
    for v in variants:
        ok = [r for r in runs if r["variant"] == v and r.get("ok")]
        if not ok:
            s[v] = {"runs_ok": 0}
            continue

        def med(k):
            xs = [r[k] for r in ok if r.get(k) is not None]
            return round(statistics.median(xs), 3) if xs else None

        s[v] = {"runs_ok": len(ok), "wall_s_median": med("wall_s"), "wall_s": [r["wall_s"] for r in ok],
                "utilisation_median": med("utilisation"), "cpu_s_median": med("cpu_s"),
                "compute_s_median": med("compute_s"),
                "first_slide_done_s_median": med("first_slide_done_s"),
                "cluster_start_s_median": med("cluster_start_s"), "warm_imports_s_median": med("warm_imports_s")}

    def ratio(a: str, b: str) -> dict:
        x, y = s.get(a, {}).get("wall_s_median"), s.get(b, {}).get("wall_s_median")
        if not (x and y):
            return {}
        rounds = {r["round"]: r["wall_s"] for r in runs if r["variant"] == a and r.get("ok")}
        pairs = [(rounds[r["round"]], r["wall_s"]) for r in runs
                 if r["variant"] == b and r.get("ok") and r["round"] in rounds]
        out = {"ratio": round(x / y, 3), "per_round": [round(p / q, 3) for p, q in pairs]}
        if pairs:
            out["median_of_rounds"] = round(statistics.median(p / q for p, q in pairs), 3)
        return out

    sp = ratio("barrier", "pipelined")
    if sp:
        s["speedup"] = sp["ratio"]
        s["speedup_per_round"] = sp["per_round"]
        s["speedup_median_of_rounds"] = sp.get("median_of_rounds")
        s["aim"] = AIM
        s["aim_met"] = s["speedup"] >= AIM
    if SERIAL in variants:
        s["serial_vs_pipelined"] = ratio(SERIAL, "pipelined")  # the overlap alone, same stage code
        s["barrier_vs_serial"] = ratio("barrier", SERIAL)  # everything else that changed
    return s


def _table(res: dict) -> str:
    s = res["summary"]
    cfg = res["config"]
    variants = cfg["variants"]
    head = (f"Cohort: {cfg['pairs']} pairs of {cfg['size']}², tiles {cfg['tile']}, stages {cfg['stages']}, "
            f"{N_WORKERS} workers x {THREADS} thread; medians of {cfg['repeat']} round(s)")
    rows = [head, "",
            "| variant | wall s | utilisation | compute s | CPU s | first slide done s | cluster start s "
            "| warm imports s | speed-up vs barrier |",
            "|---|---|---|---|---|---|---|---|---|"]
    labels = {"barrier": f"barrier ({res['barrier_commit'][:7]})", "pipelined": "pipelined (working tree)",
              SERIAL: "control: working tree, 1 slide in flight"}
    b = s.get("barrier", {}).get("wall_s_median")
    for v in variants:
        x = s.get(v, {})
        if not x.get("runs_ok"):
            rows.append(f"| {labels[v]} | failed | | | | | | | |")
            continue

        def f(k, fmt="{:.1f}"):
            return fmt.format(x[k]) if x.get(k) is not None else "-"

        if v == "barrier":
            speed = "1.00x"
        elif b:
            speed = f"{b / x['wall_s_median']:.2f}x"
            speed = f"**{speed}**" if v == "pipelined" else speed
        else:
            speed = "-"
        rows.append(f"| {labels[v]} | {f('wall_s_median')} | {f('utilisation_median', '{:.0%}')} | "
                    f"{f('compute_s_median')} | {f('cpu_s_median')} | {f('first_slide_done_s_median')} | "
                    f"{f('cluster_start_s_median')} | {f('warm_imports_s_median')} | {speed} |")
    rows.append("")
    if s.get("speedup"):
        rows.append(f"speed-up (median barrier / median pipelined): {s['speedup']:.2f}x; per round: "
                    f"{', '.join(f'{r:.2f}x' for r in s.get('speedup_per_round', []))}; "
                    f"aim >= {AIM}x: {'met' if s['aim_met'] else 'NOT met'}")
    sv = s.get("serial_vs_pipelined") or {}
    if sv:
        rows.append(f"overlap alone (control / pipelined, same stage code): {sv['ratio']:.2f}x; "
                    f"the rest (barrier / control): {s['barrier_vs_serial'].get('ratio', float('nan')):.2f}x")
    rows.append("utilisation = task-stream compute time / (wall x worker threads); compute s = its "
                "numerator (task wall time, includes waiting for a CPU on a loaded machine)")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 pairs of 1024², tiles 512 (smoke test)")
    ap.add_argument("--pairs", type=int, default=None, help="phantom pairs (default 4; quick 2)")
    ap.add_argument("--size", type=int, default=None, help="slide side, px (default 4096; quick 1024)")
    ap.add_argument("--tile", type=int, default=None, help="tiles.size (default 1024; quick 512)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (barrier, pipelined)")
    ap.add_argument("--workdir", default="/tmp/daskpath-bench-pipeline")
    ap.add_argument("--json", default=None, help="default benchmarks/results/pipeline.json "
                                                  "(quick: pipeline-quick.json)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant subprocess")
    ap.add_argument("--old-commit", default="8c25a69", help="the barrier design's commit")
    ap.add_argument("--no-warm", action="store_true", help="do not pre-import modules (imports in the run)")
    ap.add_argument("--serial", action="store_true",
                    help="also run the control 'serial': the working tree with one slide in flight")
    # internal: one variant in this process
    ap.add_argument("--child", choices=(*VARIANTS, SERIAL), help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    ap.add_argument("--expect", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)

    variants = (*VARIANTS, SERIAL) if a.serial else VARIANTS
    pairs = a.pairs or (2 if a.quick else 4)
    size = a.size or (1024 if a.quick else 4096)
    tile = a.tile or (512 if a.quick else 1024)
    out_json = Path(a.json or HERE / "results" / ("pipeline-quick.json" if a.quick else "pipeline.json"))
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    commit = _git("rev-parse", "--verify", a.old_commit + "^{commit}")
    barrier_src = barrier_source(work, commit)
    manifest = make_cohort_cached(work, barrier_src, pairs, size, a.timeout)
    extra = [f"tiles.size={tile}"]
    dirty = _git("status", "--porcelain", "--", "daskpath").splitlines()
    res: dict = {
        "benchmark": "cohort wall time: barrier run loop (old main) vs pipelined run loop (working tree)",
        "config": {"pairs": pairs, "size": size, "tile": tile, "seed": 0, "layout": "tiled",
                   "stages": "default (preprocess, nuclei, translate, baselines)", "overrides": extra,
                   "n_workers": N_WORKERS, "threads_per_worker": THREADS, "repeat": a.repeat,
                   "variants": list(variants), "warm_imports": not a.no_warm, "quick": a.quick,
                   "timeout_s": a.timeout},
        "barrier_commit": commit,
        "barrier_src": str(barrier_src),
        "working_tree": {"head": _git("rev-parse", "HEAD"), "daskpath_files_changed": len(dirty)},
        "machine": _machine(),
        "versions": _versions(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": [],
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    for rnd in range(a.repeat):
        for v in variants:
            print(f"round {rnd + 1}/{a.repeat}: {v} ...", flush=True)
            r = run_variant(v, rnd, a, work, barrier_src, manifest, extra)
            res["runs"].append(r)
            if r.get("wall_s") is not None:
                print(f"  {v}: wall {r['wall_s']:.1f} s, utilisation {r['utilisation']:.0%}, "
                      f"ok={r['ok']}, cluster start {r['cluster_start_s']:.1f} s, "
                      f"warm {r['warm_imports_s']:.1f} s, load {r['load_avg_before'][0]:.1f}", flush=True)
            res["summary"] = _summary(res["runs"], variants)
            res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
            out_json.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(_table(res))
    print(f"\nJSON: {out_json}; performance reports: {work / 'reports'}")
    return 0 if all(r.get("ok") for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
