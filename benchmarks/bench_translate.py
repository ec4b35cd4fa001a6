"""Benchmark: batched, tiled, seam-free translation vs the reference project's per-tile loop.

Same data for both: one ``--size`` x ``--size`` phantom H&E region (default 2048), in memory.

Baseline (named): pytorch-CycleGAN-and-pix2pix ``test.py`` as used on tiled slides -- every
256 px tile is an image of its own: ToTensor -> Normalize -> G -> tensor2im, batch 1, in a Python
loop, no overlap (its padding is the generator's own reflection padding at every tile edge), each
tile normalised with its own instance-norm statistics (``model.eval()`` keeps per-image
statistics for instance norm). Its file reading/writing and HTML page are left out, which only
favours it. It runs in one process with torch's threads; the faster of 1 and 2 threads (by
median) is the reference.

Candidate: :func:`daskpath.translate.translate` with its defaults over dask chunks (threads
scheduler): one window per halo'd chunk on CPU (``tile = chunk + 2 halo``, ``halo`` = the
generator's receptive-field margin), slide-level norm statistics folded into the convs, the
:class:`~daskpath.translate.fast.FastResnet` CPU path (``optimize=True``: NNPACK 7x7 convs,
folded input normalisation, channels_last residual blocks, malloc tuned for large
activations), torch intra-op threads = cores / dask threads. Rows: the default on 2 dask
threads; the same windows through the unoptimised module tree (``optimize=False``, what
``translate()`` ran before); 1 dask thread x 2 torch threads; 1 dask thread x 1 torch thread
(the same single core as the reference's 1-thread row: a per-core comparison); one 2048 px
chunk; bf16 autocast (opt-in ``amp="bf16"``: uses AVX512-BF16 where the CPU has it; runs the
module tree; changes outputs by a few uint8 levels, reported).

Throughput: 256 x 256 output tiles per second and megapixels per second from the **median** of
``--repeat`` interleaved runs (min and every run in the JSON), so load changes on a shared
machine hit every method alike. Exactness: uint8 difference of the default vs ``optimize=False``.
Seams: gradient energy across window borders / interior
(:func:`daskpath.translate.inference.seam_energy`; 1 = invisible) on the baseline's 256 grid and
on the candidate's window/chunk borders with per-tile statistics (no fix) and slide statistics
(the fix). Prints markdown tables and writes JSON.

    python benchmarks/bench_translate.py [--model phantom] [--size 2048] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def reference_loop(img: np.ndarray, net, spec, tile: int = 256) -> np.ndarray:
    """The reference's test loop: per tile ToTensor -> Normalize -> G -> tensor2im, batch 1."""
    import torch

    h, w = img.shape[:2]
    out = np.zeros_like(img)
    mean = torch.tensor(spec.input_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.input_std).view(1, 3, 1, 1)
    with torch.no_grad():
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                t = torch.from_numpy(img[y:y + tile, x:x + tile].copy()).permute(2, 0, 1)[None].float() / 255
                fake = net((t - mean) / std)
                im = (fake[0].float().numpy().transpose(1, 2, 0) + 1) / 2.0 * 255.0
                out[y:y + tile, x:x + tile] = im.astype(np.uint8)
    return out


def chunk_seams(size: int, chunk: int, tile: int, halo: int) -> list[int]:
    """Window-core borders (balanced layout) and chunk borders of the candidate along one axis."""
    from daskpath.translate import inference as inf

    out = []
    for c0 in range(0, size, chunk):
        lo, hi = max(0, c0 - halo), min(size, c0 + chunk + halo)
        out += [lo + s for s in inf.seam_positions(hi - lo, tile, halo) if c0 <= lo + s < c0 + chunk]
        if c0:
            out.append(c0)
    return sorted(set(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phantom")
    p.add_argument("--size", type=int, default=2048, help="H&E region side (px)")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--halo", type=int, default=None)
    p.add_argument("--workers", type=int, default=2, help="dask threads")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import dask
    import dask.array as da
    import torch

    from daskpath.synthetic import render_region
    from daskpath.translate import inference as inf
    from daskpath.translate.checkpoints import load_generator
    from daskpath.translate.fast import nnpack_available

    size = a.size - a.size % 256
    img, _ = render_region(1024, 1024, size, size, size=(4 * size, 4 * size), seed=123, stain="he")
    n_tiles = (size // 256) ** 2
    mp = size * size / 1e6
    net, spec = load_generator(a.model)
    halo = spec.halo if a.halo is None else a.halo
    tile = a.chunk + 2 * halo
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    res: dict = {"model": str(a.model), "arch": spec.arch, "ngf": spec.ngf, "norm": spec.norm,
                 "image": [size, size], "tiles_256": n_tiles, "chunk": a.chunk, "tile": tile, "halo": halo,
                 "workers": a.workers, "repeat": a.repeat,
                 "cpu": platform.processor() or platform.machine(), "cores": cores,
                 "torch": torch.__version__, "nnpack": nnpack_available(),
                 "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}

    he = da.from_array(img, chunks=(a.chunk, a.chunk, 3))
    t = time.perf_counter()
    net2, _ = load_generator(a.model)
    stats = (inf.slide_norm_stats(net2, inf.sample_tiles(he, 16, 256, 0), spec)
             if spec.norm == "instance" else "auto")
    t_stats = time.perf_counter() - t
    ref = inf.resolve_translator(a.model)

    def cand(chunk, workers, torch_threads=None, norm=stats, amp=None, optimize=True, tile_=None):
        x = he.rechunk((chunk, chunk, 3))
        arr = inf.translate(x, ref, norm_stats=norm, halo=halo, tile=tile_, torch_threads=torch_threads,
                            amp=amp, optimize=optimize)

        def run():
            with dask.config.set(scheduler="threads", num_workers=workers):
                return arr.compute()
        return run

    def ref_run(nt):
        def run():
            torch.set_num_threads(nt)
            return reference_loop(img, net, spec)
        return run

    w, tw = a.workers, max(1, cores // a.workers)
    main_key = f"daskpath default: {tile} px windows (chunk {a.chunk} + 2 x halo {halo}), {w} dask threads x {tw} torch"
    methods = {
        "reference loop, 1 torch thread": ref_run(1),
        f"reference loop, {min(2, cores)} torch threads": ref_run(min(2, cores)),
        main_key: cand(a.chunk, w),
        f"daskpath, same windows, optimize=False (module tree; the previous default), {w} x {tw}":
            cand(a.chunk, w, optimize=False),
        f"daskpath default, 1 dask thread x {cores} torch": cand(a.chunk, 1, torch_threads=cores),
        "daskpath default, 1 dask thread x 1 torch (one core, as the 1-thread reference)":
            cand(a.chunk, 1, torch_threads=1),
        f"daskpath default, one {size} px chunk (no overlap), 1 dask thread x {cores} torch":
            cand(size, 1, torch_threads=cores),
        f"daskpath, bf16 autocast (amp='bf16', opt-in; module tree), {w} x {tw}": cand(a.chunk, w, amp="bf16"),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    outs: dict = {}
    for k, fn in methods.items():  # warm-up: model caches, NNPACK, oneDNN kernels
        outs[k] = fn()
    for _ in range(a.repeat):  # interleaved, so load changes hit every method alike
        for k, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    torch.set_num_threads(cores)
    rows = {k: {"median_s": round(float(np.median(v)), 3), "min_s": round(min(v), 3),
                "tiles_per_s": round(n_tiles / float(np.median(v)), 2),
                "mp_per_s": round(mp / float(np.median(v)), 3), "all_s": [round(x, 3) for x in v]}
            for k, v in times.items()}
    ref_keys = [k for k in rows if k.startswith("reference")]
    best_ref = min(ref_keys, key=lambda k: rows[k]["median_s"])
    one_core_ref = ref_keys[0]
    for k in rows:
        rows[k]["speedup_vs_best_reference"] = round(rows[best_ref]["median_s"] / rows[k]["median_s"], 2)
        rows[k]["speedup_vs_best_reference_min"] = round(
            min(rows[r]["min_s"] for r in ref_keys) / rows[k]["min_s"], 2)
    res["methods"] = rows
    res["best_reference"] = best_ref
    res["slide_stats_seconds"] = round(t_stats, 3)
    res["speedup"] = rows[main_key]["speedup_vs_best_reference"]
    one_core = [k for k in rows if "one core" in k][0]
    res["speedup_one_core"] = round(rows[one_core_ref]["median_s"] / rows[one_core]["median_s"], 2)
    slow_key = [k for k in rows if "optimize=False" in k][0]
    res["speedup_vs_optimize_false"] = round(rows[slow_key]["median_s"] / rows[main_key]["median_s"], 2)

    def udiff(x, y):
        d = np.abs(x.astype(np.int16) - y.astype(np.int16))
        return {"max": int(d.max()), "mean": round(float(d.mean()), 5), "frac_differing": round(float((d > 0).mean()), 6),
                "p99": float(np.percentile(d, 99))}

    res["optimize_vs_module_tree_uint8_diff"] = udiff(outs[main_key], outs[slow_key])

    # seams: the reference's 256 grid; the candidate's window-core and chunk borders
    grid = list(range(256, size, 256))
    cs = chunk_seams(size, a.chunk, tile, halo)
    no_fix = cand(a.chunk, w, norm="tile")()
    cs768 = chunk_seams(size, 1024, 768, halo)
    no_fix768 = cand(1024, w, norm="tile", tile_=768)()
    fix768 = cand(1024, w, tile_=768)()
    res["seam_energy_ratio"] = {
        "reference loop (256 grid, per-tile stats)": round(inf.seam_energy(outs[best_ref], grid, grid)["ratio"], 3),
        f"daskpath {tile} px windows, per-tile stats (no fix)": round(inf.seam_energy(no_fix, cs, cs)["ratio"], 3),
        f"daskpath {tile} px windows, slide stats (fix)": round(inf.seam_energy(outs[main_key], cs, cs)["ratio"], 3),
        "daskpath tile 768, per-tile stats (no fix)": round(inf.seam_energy(no_fix768, cs768, cs768)["ratio"], 3),
        "daskpath tile 768, slide stats (fix)": round(inf.seam_energy(fix768, cs768, cs768)["ratio"], 3),
    }
    bf_key = [k for k in outs if "bf16" in k][0]
    res["bf16_vs_fp32_uint8_diff"] = udiff(outs[bf_key], outs[slow_key])
    res["seams"] = {"candidate": cs, "candidate_768": cs768}
    res["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print(f"image {size}x{size} ({n_tiles} tiles of 256 px), model {spec.arch} ngf={spec.ngf} {spec.norm}, "
          f"{cores} cores, torch {torch.__version__}, NNPACK {res['nnpack']}, {a.repeat} runs each, "
          f"load average {res['load_avg_start']} -> {res['load_avg_end']}")
    print("| method | median s | min s | tiles/s | MP/s | vs best reference (median) | (min) |")
    print("|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['tiles_per_s']:.2f} | {r['mp_per_s']:.3f} | "
              f"{r['speedup_vs_best_reference']:.2f}x | {r['speedup_vs_best_reference_min']:.2f}x |")
    print()
    print(f"one core vs one core (1-thread reference / 1x1 daskpath): {res['speedup_one_core']:.2f}x; "
          f"default vs optimize=False: {res['speedup_vs_optimize_false']:.2f}x")
    print(f"default vs optimize=False output (uint8 levels): {res['optimize_vs_module_tree_uint8_diff']}")
    print(f"bf16 vs fp32 output (uint8 levels): {res['bf16_vs_fp32_uint8_diff']}")
    print()
    print("| seams (border / interior gradient energy; 1 = invisible) | ratio |")
    print("|---|---|")
    for k, v in res["seam_energy_ratio"].items():
        print(f"| {k} | {v:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
