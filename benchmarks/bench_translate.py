"""Benchmark: batched, tiled, seam-free translation vs the reference project's per-tile loop.

Same data for both: one ``--size`` x ``--size`` phantom H&E region (default 2048), in memory.

Baseline (named): pytorch-CycleGAN-and-pix2pix ``test.py`` as used on tiled slides -- every
256 px tile is an image of its own: ToTensor -> Normalize -> G -> tensor2im, batch 1, in a Python
loop, no overlap (its padding is the generator's own reflection padding at every tile edge), each
tile normalised with its own instance-norm statistics (``model.eval()`` keeps per-image
statistics for instance norm). Its file reading/writing and HTML page are left out, which only
favours it. It runs in one process with torch's threads; the faster of 1 and 2 threads is kept.

Candidate: :func:`daskpath.translate.translate` over dask chunks (threads scheduler), windows of
at most ``--tile`` px with ``halo`` px of context (the generator's receptive-field margin),
``--batch-size`` windows per forward pass, slide-level norm statistics folded into the convs,
torch intra-op threads = cores / dask threads. Rows: the default (``tile = chunk + 2 halo``:
one window per halo'd chunk, least recomputed overlap), 1 dask thread x 2 torch threads, one
2048 px chunk, bf16 autocast (opt-in: ``translate(amp="bf16")``, uses AVX512-BF16 where the CPU
has it; changes outputs by a few uint8 levels, reported), and the first run's configuration
(``tile=768`` on 1024 px chunks, batch 4, now laid out as balanced windows).

Throughput: 256 x 256 output tiles per second and megapixels per second (best of ``--repeat``,
runs interleaved). Seams: gradient energy across window borders / interior
(:func:`daskpath.translate.inference.seam_energy`; 1 = invisible) on the baseline's 256 grid and
on the candidate's window/chunk borders with per-tile statistics (no fix) and slide statistics
(the fix). Prints a markdown table and writes JSON.

    python benchmarks/bench_translate.py [--model phantom] [--size 2048] [--json out.json]
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
    p.add_argument("--tile", type=int, default=None, help="window side (default: chunk + 2 halo)")
    p.add_argument("--halo", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="dask threads")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import dask
    import dask.array as da
    import torch

    from daskpath.synthetic import render_region
    from daskpath.translate import inference as inf
    from daskpath.translate.checkpoints import load_generator

    size = a.size - a.size % 256
    img, _ = render_region(1024, 1024, size, size, size=(4 * size, 4 * size), seed=123, stain="he")
    n_tiles = (size // 256) ** 2
    mp = size * size / 1e6
    net, spec = load_generator(a.model)
    halo = spec.halo if a.halo is None else a.halo
    tile = a.tile or a.chunk + 2 * halo
    cores = os.cpu_count() or 1
    res: dict = {"model": str(a.model), "arch": spec.arch, "ngf": spec.ngf, "norm": spec.norm,
                 "image": [size, size], "tiles_256": n_tiles, "chunk": a.chunk, "tile": tile, "halo": halo,
                 "batch_size": a.batch_size, "workers": a.workers, "cpu": platform.processor() or platform.machine(),
                 "cores": cores, "torch": torch.__version__,
                 "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}

    he = da.from_array(img, chunks=(a.chunk, a.chunk, 3))
    t = time.perf_counter()
    net2, _ = load_generator(a.model)
    stats = (inf.slide_norm_stats(net2, inf.sample_tiles(he, 16, 256, 0), spec)
             if spec.norm == "instance" else "auto")
    t_stats = time.perf_counter() - t
    ref = inf.resolve_translator(a.model)

    def cand(tile_, chunk, batch, workers, torch_threads=None, norm=stats, amp=None):
        x = he.rechunk((chunk, chunk, 3))
        arr = inf.translate(x, ref, norm_stats=norm, tile=tile_, halo=halo, batch_size=batch,
                            torch_threads=torch_threads, amp=amp)

        def run():
            with dask.config.set(scheduler="threads", num_workers=workers):
                return arr.compute()
        return run

    def ref_run(nt):
        def run():
            torch.set_num_threads(nt)
            return reference_loop(img, net, spec)
        return run

    methods = {
        "reference loop, 1 torch thread": ref_run(1),
        f"reference loop, {min(2, cores)} torch threads": ref_run(min(2, cores)),
        f"daskpath: {tile} px windows (chunk {a.chunk} + 2 x halo {halo}), {a.workers} dask threads x "
        f"{max(1, cores // a.workers)} torch": cand(tile, a.chunk, a.batch_size, a.workers),
        f"daskpath: 1 window per chunk, 1 dask thread x {cores} torch":
            cand(tile, a.chunk, a.batch_size, 1, torch_threads=cores),
        f"daskpath: {2 * a.chunk + 2 * halo} px windows (chunk {2 * a.chunk}), 1 dask thread x {cores} torch":
            cand(2 * a.chunk + 2 * halo, 2 * a.chunk, 1, 1, torch_threads=cores),
        f"daskpath: as row 3 with bf16 autocast (amp='bf16', opt-in)":
            cand(tile, a.chunk, a.batch_size, a.workers, amp="bf16"),
        "daskpath, first run's settings (tile 768, halo 64, chunk 1024, batch 4; now balanced "
        f"{inf.window_size(1024 + halo, 768, halo)} px windows), 2 dask threads x 1 torch":
            cand(768, 1024, 4, 2, torch_threads=1),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    outs: dict = {}
    for _ in range(a.repeat):  # interleaved, so load changes hit every method alike
        for k, fn in methods.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    torch.set_num_threads(cores)
    rows = {k: {"seconds": round(min(v), 3), "tiles_per_s": round(n_tiles / min(v), 2),
                "mp_per_s": round(mp / min(v), 3), "all_s": [round(x, 2) for x in v]} for k, v in times.items()}
    ref_keys = [k for k in rows if k.startswith("reference")]
    best_ref = min(ref_keys, key=lambda k: rows[k]["seconds"])
    for k in rows:
        rows[k]["speedup_vs_best_reference"] = round(rows[best_ref]["seconds"] / rows[k]["seconds"], 2)
    res["methods"] = rows
    res["best_reference"] = best_ref
    res["slide_stats_seconds"] = round(t_stats, 3)
    main_key = list(methods)[2]
    res["speedup"] = rows[main_key]["speedup_vs_best_reference"]

    # seams: the reference's 256 grid; the candidate's window-core and chunk borders
    grid = list(range(256, size, 256))
    cs = chunk_seams(size, a.chunk, tile, halo)
    no_fix = cand(tile, a.chunk, a.batch_size, a.workers, norm="tile")()
    cs768 = chunk_seams(size, 1024, 768, halo)
    no_fix768 = cand(768, 1024, 4, 2, torch_threads=1, norm="tile")()
    res["seam_energy_ratio"] = {
        "reference loop (256 grid, per-tile stats)": round(inf.seam_energy(outs[best_ref], grid, grid)["ratio"], 3),
        f"daskpath {tile} px windows, per-tile stats (no fix)": round(inf.seam_energy(no_fix, cs, cs)["ratio"], 3),
        f"daskpath {tile} px windows, slide stats (fix)": round(inf.seam_energy(outs[main_key], cs, cs)["ratio"], 3),
        "daskpath tile 768, per-tile stats (no fix)": round(inf.seam_energy(no_fix768, cs768, cs768)["ratio"], 3),
        "daskpath tile 768, slide stats (fix)":
            round(inf.seam_energy(outs[list(methods)[-1]], cs768, cs768)["ratio"], 3),
    }
    bf_key = [k for k in outs if "bf16" in k][0]
    diff = np.abs(outs[bf_key].astype(np.int16) - outs[main_key].astype(np.int16))
    res["bf16_vs_fp32_uint8_diff"] = {"max": int(diff.max()), "mean": round(float(diff.mean()), 3),
                                      "p99": float(np.percentile(diff, 99))}
    res["seams"] = {"candidate": cs, "candidate_768": cs768}
    res["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print(f"image {size}x{size} ({n_tiles} tiles of 256 px), model {spec.arch} ngf={spec.ngf} {spec.norm}, "
          f"{cores} cores, torch {torch.__version__}, load average {res['load_avg_start']}")
    print("| method | s | tiles/s | MP/s | vs best reference |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['seconds']:.2f} | {r['tiles_per_s']:.2f} | {r['mp_per_s']:.3f} | "
              f"{r['speedup_vs_best_reference']:.2f}x |")
    print()
    print("| seams (border / interior gradient energy; 1 = invisible) | ratio |")
    print("|---|---|")
    for k, v in res["seam_energy_ratio"].items():
        print(f"| {k} | {v:.3f} |")
    print()
    print(f"bf16 vs fp32 output (uint8 levels): {res['bf16_vs_fp32_uint8_diff']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
