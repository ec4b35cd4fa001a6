"""Throughput of the H&E-only baselines (shipped phantom models), against named baselines.

Run: ``python benchmarks/bench_baselines.py [--size 4096] [--workers 2] [--json benchmarks/results/baselines.json]``

1. Random-forest pixel classifier: ``predict_tiles_rf`` over dask (threads, ``--workers``, 2048 px
   chunks, 1024 px tiles) against the baseline ``classify_image`` on the whole image in one thread
   (numpy, no dask). Also checks the per-tile ratios of both are equal.
2. ResNet18 classifier: ``predict_tiles_classifier`` (dask, batches of 16 tiles) against the
   baseline one tile per forward pass in a loop.

The image is a phantom H&E written as users get it (``make_pair``: JPEG TIFF), read into memory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _best(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import dask
    import dask.array as da
    import torch

    from daskpath.baselines import predict_tiles_classifier, predict_tiles_rf
    from daskpath.baselines.classifier import load_classifier, prepare_tile, run_network
    from daskpath.baselines.data import phantom_slide
    from daskpath.baselines.rf import classify_image, load_rf
    from daskpath.tiles import tile_grid

    with tempfile.TemporaryDirectory() as tmp:
        he = phantom_slide(100, (a.size, a.size), tmp).he
    tiles = tile_grid(he.shape[:2], 1024)
    mpx = he.shape[0] * he.shape[1] / 1e6
    res: dict = {"size": a.size, "workers": a.workers, "cpus": os.cpu_count(), "tiles": len(tiles),
                 "load_avg": os.getloadavg()[0]}

    clf, spec = load_rf("phantom")
    t_np, classes = _best(lambda: classify_image(he, clf, spec))
    arr = da.from_array(he, chunks=(2048, 2048, 3))
    with dask.config.set(scheduler="threads", num_workers=a.workers):
        t_da, got = _best(lambda: predict_tiles_rf(arr, tiles, "phantom"))
    nuc = np.array([np.count_nonzero(classes[y:y + h, x:x + w] > 0) for y, x, h, w in
                    zip(tiles.y0, tiles.x0, tiles.height, tiles.width)])
    res["rf"] = {"numpy_whole_image_s": round(t_np, 2), "dask_s": round(t_da, 2),
                 "speedup": round(t_np / t_da, 2), "mpx_per_s_dask": round(mpx / t_da, 2),
                 "equal_to_whole_image": bool(np.array_equal(nuc, got["nucleus_px_rf"].to_numpy()))}

    net, cspec = load_classifier("phantom", "cpu")
    torch.set_num_threads(a.workers)
    loop = lambda: [run_network(net, prepare_tile(he[y:y + h, x:x + w], cspec)[None])  # noqa: E731
                    for y, x, h, w in zip(tiles.y0, tiles.x0, tiles.height, tiles.width)]
    t_loop, _ = _best(loop, 2)
    with dask.config.set(scheduler="threads", num_workers=a.workers):
        t_cl, _ = _best(lambda: predict_tiles_classifier(arr, tiles, "phantom", device="cpu"), 2)
    res["classifier"] = {"one_tile_per_pass_s": round(t_loop, 3), "dask_batched_s": round(t_cl, 3),
                         "speedup": round(t_loop / t_cl, 2), "tiles_per_s": round(len(tiles) / t_cl, 1)}

    print(f"{'baseline':<12}{'reference':>26}{'daskpath':>14}{'speedup':>9}")
    print(f"{'rf':<12}{'whole image 1 thread ' + str(res['rf']['numpy_whole_image_s']) + ' s':>26}"
          f"{str(res['rf']['dask_s']) + ' s':>14}{res['rf']['speedup']:>9}")
    print(f"{'classifier':<12}{'1 tile/pass ' + str(res['classifier']['one_tile_per_pass_s']) + ' s':>26}"
          f"{str(res['classifier']['dask_batched_s']) + ' s':>14}{res['classifier']['speedup']:>9}")
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
