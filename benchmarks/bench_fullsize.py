"""Benchmark: one full-size pair end to end, every default stage, the default local cluster.

The issue (12, item 3): "synthesise once, cached; run all default stages on the local default
cluster; report wall time per stage, CPU-seconds, peak memory per worker, and MP/s per stage".

What runs: ``daskpath synth DIR --size H W --layout png`` (the reference cohort's flat PNG
layout; default the cohort's 31104 x 31938; cached in ``--workdir`` and reused), then
``daskpath run CONFIG`` as a subprocess: the real command, with the default config (all
stages, the default local cluster for this machine) except ``output_dir`` / ``cache_dir`` and
the ``--set key=value`` overrides given here. Each run starts with an empty output and cache
folder, so the two PNG ingests are part of it.

Measured, from outside the run (no instrumentation in the run itself):

* wall time of the command (start-up, imports, cluster start and report included);
* per stage wall time, from ``run.json`` (``slides.<slide>.stages.<stage>.started/seconds``,
  and ``opened`` = opening the pair, which includes waiting for its ingest);
* CPU-seconds (user + system) of the whole process tree (the client, which also hosts the
  scheduler and the nannies, and every worker process), sampled every ``--interval`` s with
  psutil; per stage = the tree's CPU-seconds spent inside the stage's interval;
* peak RSS per process (workers and client) over the run, from the same samples;
* MP/s per stage: the pair's megapixels (H x W of one slide) per wall second of the stage, and
  for the model stages also the kept tiles' megapixels per wall second (what they segment /
  translate).

The machine's load average is recorded before and after. Writes JSON (``--json``) and prints a
markdown table.

    python benchmarks/bench_fullsize.py                      # 31104 x 31938, defaults
    python benchmarks/bench_fullsize.py --size 8192 8192     # a scaled pair, same stages
    python benchmarks/bench_fullsize.py --set cluster.n_workers=2 --set cluster.threads_per_worker=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _daskpath() -> list[str]:
    exe = BIN / "daskpath"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "daskpath"]


def synthesise(root: Path, size: tuple[int, int], layout: str, seed: int) -> Path:
    """The pair's manifest, made once (``.done`` marks a finished synthesis)."""
    data = root / f"data-{size[0]}x{size[1]}-{layout}-s{seed}"
    if (data / ".done").exists():
        return data / "manifest.csv"
    shutil.rmtree(data, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(_daskpath() + ["synth", str(data), "--pairs", "1", "--size", str(size[0]),
                                  str(size[1]), "--layout", layout, "--seed", str(seed)],
                   check=True)
    (data / ".done").write_text(f"{time.perf_counter() - t:.1f} s\n")
    return data / "manifest.csv"


class Sampler(threading.Thread):
    """Samples the CPU times and RSS of a process tree every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.stop = threading.Event()
        self.cpu_last: dict[int, float] = {}
        self.samples: list[tuple[float, float]] = []  # (unix time, cumulative tree CPU-s)
        self.peak: dict[int, dict] = {}

    def _tick(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                with p.oneshot():
                    ct = p.cpu_times()
                    rss = p.memory_info().rss
                    if p.pid not in self.peak:
                        cmd = " ".join(p.cmdline())[:160]
                        self.peak[p.pid] = {"pid": p.pid, "cmd": cmd, "rss": 0,
                                            "parent": p.ppid()}
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.cpu_last[p.pid] = ct.user + ct.system
            self.peak[p.pid]["rss"] = max(self.peak[p.pid]["rss"], rss)
        self.samples.append((time.time(), sum(self.cpu_last.values())))

    def run(self) -> None:
        while not self.stop.is_set():
            self._tick()
            self.stop.wait(self.interval)
        self._tick()

    def cpu_between(self, t0: float, t1: float) -> float:
        """Tree CPU-seconds spent in [t0, t1] (from the nearest samples)."""
        def at(t: float) -> float:
            best = None
            for ts, c in self.samples:
                if ts <= t:
                    best = c
                else:
                    break
            return best if best is not None else 0.0

        return at(t1) - at(t0)


def _kept_mp(out: Path, slide: str) -> tuple[int, float]:
    import pandas as pd

    t = pd.read_parquet(out / "tiles.parquet")
    t = t[t["slide"] == slide]
    k = t[t["keep"]]
    return int(len(k)), float((k["height"] * k["width"]).sum() / 1e6)


def _nuclei(out: Path, slide: str) -> int | None:
    import pandas as pd

    s = pd.read_csv(out / "slides.csv")
    s = s[s["slide"] == slide]
    return int(s["nuclei_ihc"].iloc[0]) if "nuclei_ihc" in s and len(s) else None


def run_once(manifest: Path, work: Path, sets: list[str], interval: float, label: str) -> dict:
    out, cache = work / "out", work / "cache"
    for p in (out, cache):
        shutil.rmtree(p, ignore_errors=True)
    cfg = work / "config.yaml"
    cfg.write_text(f"slides: {manifest}\noutput_dir: {out}\ncache_dir: {cache}\n")
    cmd = _daskpath() + ["run", str(cfg)]
    for s in sets:
        cmd += ["--set", s]
    load0 = os.getloadavg()
    t0w = time.time()
    t0 = time.perf_counter()
    log = open(work / f"run-{label}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"DASKPATH_PROGRESS_INTERVAL": "60"})
    sampler = Sampler(proc.pid, interval)
    sampler.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    log.close()
    load1 = os.getloadavg()
    if rc != 0:
        tail = (work / f"run-{label}.log").read_text()[-3000:]
        raise SystemExit(f"daskpath run failed (rc {rc}):\n{tail}")
    run = json.loads((out / "run.json").read_text())
    (slide, info), = run["slides"].items()
    n_kept, kept_mp = _kept_mp(out, slide)
    import pandas as pd

    tiles = pd.read_parquet(out / "tiles.parquet")
    h = int((tiles["y0"] + tiles["height"]).max())
    w = int((tiles["x0"] + tiles["width"]).max())
    slide_mp = h * w / 1e6
    rows = []
    stages = [("open (ingest)", info.get("opened", {}))] + list(info["stages"].items())
    for name, st in stages:
        if not st.get("seconds"):
            continue
        s0, sec = st["started"], st["seconds"]
        cpu = sampler.cpu_between(s0, s0 + sec)
        row = {"stage": name, "wall_s": round(sec, 1), "cpu_s": round(cpu, 1),
               "slide_mp_per_s": round(slide_mp / sec, 2)}
        if name in ("nuclei", "translate", "baselines"):
            row["kept_mp_per_s"] = round(kept_mp / sec, 3)
        rows.append(row)
    total_cpu = sampler.samples[-1][1] if sampler.samples else float("nan")
    client_pid = proc.pid
    workers = [p for p in sampler.peak.values() if p["parent"] == client_pid
               and "resource_tracker" not in p["cmd"]]
    return {
        "label": label, "sets": sets, "wall_s": round(wall, 1), "cpu_s": round(total_cpu, 1),
        "started_unix": t0w, "load_before": load0, "load_after": load1,
        "slide": slide, "slide_shape": [h, w], "slide_mp": round(slide_mp, 1),
        "tiles_kept": n_kept, "kept_mp": round(kept_mp, 1),
        "nuclei": _nuclei(out, slide),
        "stages": rows,
        "peak_rss_mib": {"client": round(sampler.peak.get(client_pid, {}).get("rss", 0) / 2**20),
                         "workers": [round(p["rss"] / 2**20) for p in workers]},
        "run_json_stages": info["stages"],
    }


def table(res: dict) -> str:
    lines = [f"**{res['label']}** ({' '.join(res['sets']) or 'defaults'}): wall {res['wall_s']:.0f} s "
             f"({res['wall_s'] / 60:.1f} min), CPU {res['cpu_s']:.0f} s; slide "
             f"{res['slide_shape'][0]} x {res['slide_shape'][1]}, {res['tiles_kept']} kept tiles "
             f"({res['kept_mp']} MP); peak RSS client {res['peak_rss_mib']['client']} MiB, workers "
             f"{res['peak_rss_mib']['workers']} MiB; load {res['load_before'][0]:.1f} -> "
             f"{res['load_after'][0]:.1f}", "",
             "| stage | wall s | CPU s | slide MP/s | kept-tile MP/s |", "|---|---|---|---|---|"]
    for r in res["stages"]:
        lines.append(f"| {r['stage']} | {r['wall_s']} | {r['cpu_s']} | {r['slide_mp_per_s']} | "
                     f"{r.get('kept_mp_per_s', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", nargs=2, type=int, default=[31104, 31938], metavar=("H", "W"))
    ap.add_argument("--layout", default="png", choices=["png", "tiled", "stripped"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/daskpath-bench/fullsize"))
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="config override key=value (repeatable), passed to daskpath run --set")
    ap.add_argument("--label", default="default")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "fullsize.json")
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    manifest = synthesise(a.workdir, tuple(a.size), a.layout, a.seed)
    work = a.workdir / f"run-{a.size[0]}x{a.size[1]}-{a.label}"
    work.mkdir(parents=True, exist_ok=True)
    res = run_once(manifest, work, a.sets, a.interval, a.label)
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                      "node": platform.node()}
    print(table(res))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(a.json.read_text()) if a.json.exists() else []
    old = [r for r in old if not (r.get("label") == res["label"] and r.get("slide_shape") == res["slide_shape"])]
    a.json.write_text(json.dumps(old + [res], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
