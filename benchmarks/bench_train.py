"""Streaming translator training vs in-memory tiles and the reference's PNG loop (issue 12, item 6).

Run: ``python benchmarks/bench_train.py [--quick] [--workdir DIR] [--json benchmarks/results/train.json]``

Data: ``--pairs`` phantom pairs (``daskpath.synthetic.make_cohort``, tiled JPEG TIFF,
``--size``^2) and a tile table built by hand: every ``--tile``-px tile of every slide kept, on
the refined alignment (``registered``, ``dy, dx`` = the phantom's section offset), as the
preprocess stage with ``tiles.size 256`` would write for tissue everywhere. One slide is held out
(``--test-fraction 0.25``); ``--max-tiles-per-slide`` sets N and 10N train tiles. Cached in
``--workdir`` (default ``/tmp/daskpath-bench-train``).

1. **Peak memory, N vs 10N train tiles**, the command line (``python -m daskpath.translate.train
   --from-run ... --no-eval``, on an export that is up to date, so nothing is rewritten) in a fresh
   process per configuration: ``--no-stream`` (the exported PNGs held in memory, as before) vs
   ``--stream`` (crops read from the slides on demand, ``--loader-workers`` processes). Sampled
   every 50 ms with psutil: RSS of the training process, and the proportional set size (PSS) of
   the process tree (training process + loader workers: forked workers share pages, PSS counts a
   shared page once). ``--mem-repeats`` fresh processes per configuration, interleaved; medians.
2. **Steps/s on CPU, same model, crop, batch and crops** (``train()`` in this process,
   ``loss_log.csv`` step times; the first ``--warmup`` steps of each run dropped): the streaming
   dataset (:class:`daskpath.translate.data.TileStream`) vs the reference project's loop
   (pytorch-CycleGAN-and-pix2pix: a map-style dataset over the exported PNG files, each item
   opened with PIL and converted to RGB, then cropped, flipped, rotated -- here drawing the very
   same crops as the stream -- through a ``DataLoader`` with the same workers) and the in-memory
   loop (today's :class:`~daskpath.translate.train.PairSampler` over the PNGs loaded up front).
   Runs interleave over ``--repeats`` rounds; medians of the per-step times.
3. **Loader alone**: samples/s of each dataset through its ``DataLoader`` without a model, and
   the per-sample read cost in the main process (0 workers).

Load average is recorded before and after (a shared machine inflates wall times).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def _setup(work: Path, pairs: int, size: int, tile: int) -> tuple[Path, Path]:
    """Slides + a hand-made run folder (every tile kept, registered at the phantom offset)."""
    from daskpath.synthetic import DEFAULT_OFFSET, make_cohort

    manifest = work / "slides" / "manifest.csv"
    if not manifest.is_file():
        t = time.perf_counter()
        make_cohort(work / "slides", pairs=pairs, size=(size, size), seed=11, layout="tiled")
        print(f"synth: {pairs} pairs of {size}^2 in {time.perf_counter() - t:.0f} s", flush=True)
    run = work / "run"
    if not (run / "tiles.parquet").is_file():
        run.mkdir(parents=True, exist_ok=True)
        rows = [dict(slide=s, y0=y0, x0=x0, height=tile, width=tile, tissue_fraction=1.0, ssim=0.6,
                     ssim_rigid=0.5, keep=True, dy=float(DEFAULT_OFFSET[0]), dx=float(DEFAULT_OFFSET[1]),
                     registered=True)
                for s in pd.read_csv(manifest)["slide"]
                for y0 in range(0, size - tile + 1, tile) for x0 in range(0, size - tile + 1, tile)]
        pd.DataFrame(rows).to_parquet(run / "tiles.parquet")
    return run, manifest


def _export(run: Path, manifest: Path, out: Path, per_slide: int, fraction: float) -> pd.DataFrame:
    from daskpath.translate.tilepairs import export_tile_pairs

    return export_tile_pairs(run, out, manifest=manifest, test_fraction=fraction, seed=0,
                             max_tiles_per_slide=per_slide, force=True)


def _peak_memory(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; peak RSS of the process and peak PSS of its tree (50 ms samples)."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    p = psutil.Process(proc.pid)
    peak = {"rss_main": 0, "pss_tree": 0, "rss_tree": 0, "workers": 0}
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            procs = [p, *p.children(recursive=True)]
            rss = [q.memory_info().rss for q in procs]
            pss = sum(q.memory_full_info().pss for q in procs)
            peak["rss_main"] = max(peak["rss_main"], rss[0])
            peak["rss_tree"] = max(peak["rss_tree"], sum(rss))
            peak["pss_tree"] = max(peak["pss_tree"], pss)
            peak["workers"] = max(peak["workers"], len(procs) - 1)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        time.sleep(0.05)
    reader.join()
    text = "".join(out)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    n = [ln for ln in text.splitlines() if ln.startswith("trained ")]
    mib = {k: round(v / 2**20, 1) for k, v in peak.items() if k != "workers"}
    return {**{f"{k}_mib": v for k, v in mib.items()}, "loader_processes": peak["workers"],
            "wall_s": round(time.perf_counter() - t, 1), "line": n[-1] if n else ""}


def _step_times(out: Path, warmup: int) -> list[float]:
    rows = list(csv.DictReader(open(out / "loss_log.csv")))
    t = np.array([float(r["seconds"]) for r in rows])
    return list(np.diff(t)[max(0, warmup - 1):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/daskpath-bench-train")
    p.add_argument("--json", default=str(HERE / "results" / "train.json"))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--size", type=int, default=3072)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--tiles", type=int, default=40, help="N: train tiles of the small case (10N the big one)")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ngf", type=int, default=16)
    p.add_argument("--mem-steps", type=int, default=10)
    p.add_argument("--mem-repeats", type=int, default=2, help="fresh processes per memory configuration")
    p.add_argument("--rate-steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--loader-workers", type=int, default=None, help="default: the trainer's min(4, cores - 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 pairs of 1024^2, few steps")
    a = p.parse_args()
    if a.quick:
        a.pairs, a.size, a.tiles, a.mem_steps, a.rate_steps, a.repeats, a.warmup = 3, 1024, 4, 3, 5, 1, 1
        a.mem_repeats = 1
        a.test_fraction = 0.34
        a.workdir = a.workdir + "-quick"
    import torch

    from daskpath.translate.data import CropDataset, default_loader_workers, make_loader, run_tile_stream
    from daskpath.translate.tilepairs import split_slides
    from daskpath.translate.train import TrainConfig, folder_pairs, train

    workers = default_loader_workers() if a.loader_workers is None else a.loader_workers
    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} CPUs, {platform.python_version()}, "
                 f"torch {torch.__version__}", "load_before": [round(x, 2) for x in os.getloadavg()],
                 "settings": {k: v for k, v in vars(a).items() if k not in ("json",)} | {"loader_workers": workers}}

    def save() -> None:
        if a.json and not a.quick:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")

    run, manifest = _setup(work, a.pairs, a.size, a.tile)
    slides = pd.read_csv(manifest)["slide"].tolist()
    n_train_slides = sum(v == "train" for v in split_slides(slides, a.test_fraction, 0).values())
    exports = {}
    for n in (a.tiles, 10 * a.tiles):
        per = math.ceil(n / n_train_slides)
        t = time.perf_counter()
        table = _export(run, manifest, work / f"export_{n}", per, a.test_fraction)
        exports[n] = (work / f"export_{n}", table, per)
        print(f"export N={n}: {int((table['split'] == 'train').sum())} train tiles, "
              f"{time.perf_counter() - t:.0f} s", flush=True)

    # 1. peak memory --------------------------------------------------------------------------
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    res["memory"] = []
    for rep, (n, (exp, table, per)), mode in ((r, e, m) for r in range(a.mem_repeats) for e in exports.items()
                                              for m in ("--no-stream", "--stream")):
        cmd = [sys.executable, "-m", "daskpath.translate.train", str(work / f"mem{mode[1:]}_{n}"),
               "--from-run", str(run), "--slides", str(manifest), "--export-dir", str(exp),
               "--max-tiles-per-slide", str(per), "--test-fraction", str(a.test_fraction), "--force",
               "--no-eval", mode, "--ngf", str(a.ngf), "--ndf", str(a.ngf), "--crop", str(a.crop),
               "--batch-size", str(a.batch), "--epochs", "1", "--steps-per-epoch", str(a.mem_steps),
               "--tile", "256", "--threads", str(a.threads), "--loader-workers", str(workers), "--no-progress"]
        r = _peak_memory(cmd, env)
        r.update(train_tiles=int((table["split"] == "train").sum()), mode=mode[2:], repeat=rep)
        res["memory"].append(r)
        print(f"memory {mode[2:]:>9} {r['train_tiles']:4d} tiles: main RSS {r['rss_main_mib']:7.1f} MiB, "
              f"tree PSS {r['pss_tree_mib']:7.1f} MiB ({r['loader_processes']} loader proc), "
              f"{r['wall_s']} s", flush=True)
        save()
    by = {}  # medians over the repeats
    for r in res["memory"]:
        by.setdefault((r["mode"], r["train_tiles"]), []).append(r)
    by = {k: {f: float(np.median([r[f] for r in v])) for f in ("rss_main_mib", "pss_tree_mib")} for k, v in by.items()}
    res["memory_median"] = [{"mode": m, "train_tiles": n, **v} for (m, n), v in sorted(by.items())]
    (ns, nb) = sorted({r["train_tiles"] for r in res["memory"]})
    res["memory_growth"] = {m: {k: round(by[(m, nb)][k] / by[(m, ns)][k], 3) for k in ("rss_main_mib", "pss_tree_mib")}
                            for m in ("no-stream", "stream")}
    res["memory_growth_mib"] = {m: {k: round(by[(m, nb)][k] - by[(m, ns)][k], 1) for k in ("rss_main_mib", "pss_tree_mib")}
                                for m in ("no-stream", "stream")}
    save()

    # 2. steps/s on the same crops ------------------------------------------------------------
    exp, table, _ = exports[10 * a.tiles]

    class ReferencePngs(CropDataset):
        """The reference's dataset: one PNG file per side, opened with PIL per item, cropped."""

        def __init__(self, rows: pd.DataFrame, root: Path, crop: int, seed: int) -> None:
            super().__init__(np.stack([rows["height"], rows["width"]], 1), crop, seed, True)
            self.files = [(str(root / x), str(root / y)) for x, y in zip(rows["a"], rows["b"])]

        def read(self, pair: int, side: str, y: int, x: int) -> np.ndarray:
            from PIL import Image

            img = np.asarray(Image.open(self.files[pair][side == "b"]).convert("RGB"))
            return img[y:y + self.crop, x:x + self.crop]

    rows = table[table["split"] == "train"].reset_index(drop=True)
    data = {
        "stream": lambda: run_tile_stream(table, manifest, crop=a.crop, seed=0, cache_dir=run / "cache"),
        "reference_png": lambda: ReferencePngs(rows, exp, a.crop, 0),
        "in_memory": lambda: folder_pairs(exp, "train"),
    }
    cfg = TrainConfig(ngf=a.ngf, ndf=a.ngf, crop=a.crop, batch_size=a.batch, epochs=1, steps_per_epoch=a.rate_steps,
                      tile=256, threads=a.threads, loader_workers=workers, save_every=100)
    # same crops: the streamed and the PNG items are equal
    s, r_ = data["stream"](), data["reference_png"]()
    same = all(np.array_equal(s[(0, i)][0], r_[(0, i)][0]) and np.array_equal(s[(0, i)][1], r_[(0, i)][1])
               for i in range(8))
    steps: dict[str, list[float]] = {k: [] for k in data}
    for rep in range(a.repeats):
        for name, make in data.items():
            d = make()
            out = train(cfg, d, work / f"rate_{name}", progress=False)
            steps[name].extend(_step_times(out, a.warmup))
    med = {k: float(np.median(v)) for k, v in steps.items()}
    res["steps"] = {k: {"median_step_s": round(med[k], 4), "steps_per_s": round(1 / med[k], 3),
                        "n_steps": len(steps[k]), "iqr_s": [round(float(np.percentile(steps[k], q)), 4) for q in (25, 75)]}
                    for k in steps}
    res["steps"]["same_crops_stream_vs_png"] = bool(same)
    res["steps"]["ratio_stream_vs_reference_png"] = round(med["reference_png"] / med["stream"], 3)
    res["steps"]["ratio_stream_vs_in_memory"] = round(med["in_memory"] / med["stream"], 3)
    for k in data:
        print(f"steps/s {k:>13}: {1 / med[k]:.3f} (median step {med[k]:.3f} s over {len(steps[k])})", flush=True)
    save()

    # 3. the loader alone ---------------------------------------------------------------------
    res["loader"] = {}
    for name in ("stream", "reference_png"):
        d = data[name]()
        for w in sorted({0, workers}):
            loader, sampler = make_loader(d, a.batch, a.rate_steps * 2, workers=w)
            times = []
            for epoch in range(2):  # epoch 0 warms the workers up
                sampler.set_epoch(epoch)
                t = time.perf_counter()
                for _ in loader:
                    pass
                times.append(time.perf_counter() - t)
            del loader
            n = a.rate_steps * 2 * a.batch
            res["loader"][f"{name}_workers{w}"] = {"samples_per_s": round(n / times[1], 1),
                                                   "ms_per_sample": round(1000 * times[1] / n, 2)}
            print(f"loader {name:>13} workers={w}: {n / times[1]:.1f} samples/s", flush=True)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    save()
    print(json.dumps({k: res[k] for k in ("memory_growth", "memory_growth_mib", "steps", "loader", "load_before",
                                          "load_after")}, indent=1))


if __name__ == "__main__":
    main()
