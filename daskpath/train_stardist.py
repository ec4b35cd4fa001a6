"""Train the small StarDist2D model shipped as ``daskpath/models/stardist_phantom``.

The model sees the **hematoxylin + DAB optical density** of an IHC image (one channel, see
:mod:`daskpath.nuclei`), normalised with percentiles (1, 99.8) taken over the whole training set
(the stand-in for "per slide"). Training crops come from the synthetic IHC phantom
(:func:`daskpath.synthetic.render_region`) when that module is available, else from a built-in
disc phantom (:func:`disc_phantom`, the same Beer-Lambert HED colouring), plus, optionally,
stardist's own ``test_image_nuclei_2d``.

Reproduce the shipped model::

    python -m daskpath.train_stardist daskpath/models/stardist_phantom --epochs 40 --steps 25

:func:`train` returns the validation F1 at IoU 0.5, the optimised thresholds and the training
time, and writes ``config.json``, ``thresholds.json``, ``weights_best.weights.h5`` and
``daskpath.json`` (input channel, normalisation, halo, thresholds, training command) to
``out_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["train", "disc_phantom", "model_input", "training_data", "main"]

N_RAYS = 32
GRID = (2, 2)
UNET_DEPTH = 2
PERCENTILES = (1.0, 99.8)


def disc_phantom(
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    *,
    density: float = 0.35,
    radius: tuple[float, float] = (5.0, 11.0),
    positive_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A brightfield IHC phantom: elliptic nuclei, brown (DAB) positives, blue (H) negatives.

    Colours come from Beer-Lambert with skimage's HED vectors (as the synthetic slide module),
    with texture, a faint eosin-free background and JPEG-like noise. Returns
    ``(rgb uint8 (H, W, 3), labels int32 (H, W))``; label ``k`` is the k-th placed nucleus.
    """
    from daskpath.stain import HED

    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.int32)
    conc = np.zeros(shape + (3,), np.float64)
    conc[..., 0] = rng.uniform(0.0, 0.04)  # light background hematoxylin
    pf = rng.uniform(0.1, 0.9) if positive_fraction is None else positive_fraction
    mean_area = math.pi * np.mean(radius) ** 2
    n_target = int(density * h * w / mean_area)
    yy, xx = np.mgrid[0:h, 0:w]
    k = 0
    for _ in range(n_target * 4):
        if k >= n_target:
            break
        ry, rx = rng.uniform(*radius, size=2)
        cy, cx = rng.uniform(-rx / 2, h + rx / 2), rng.uniform(-rx / 2, w + rx / 2)
        th = rng.uniform(0, np.pi)
        y0, y1 = int(max(0, cy - 12)), int(min(h, cy + 13))
        x0, x1 = int(max(0, cx - 12)), int(min(w, cx + 13))
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = (dy * np.cos(th) + dx * np.sin(th)) / ry
        v = (-dy * np.sin(th) + dx * np.cos(th)) / rx
        inside = u * u + v * v <= 1.0
        if inside.sum() < 12 or (labels[y0:y1, x0:x1][inside] > 0).mean() > 0.05:
            continue
        k += 1
        m = inside & (labels[y0:y1, x0:x1] == 0)
        labels[y0:y1, x0:x1][m] = k
        tex = 1.0 + 0.15 * rng.standard_normal(m.sum())
        if rng.random() < pf:  # Ki67 positive: DAB with some hematoxylin counterstain
            dab, hem = rng.uniform(0.35, 1.1), rng.uniform(0.05, 0.3)
        else:
            dab, hem = rng.uniform(0.0, 0.04), rng.uniform(0.35, 1.0)
        conc[y0:y1, x0:x1, 0][m] += hem * tex
        conc[y0:y1, x0:x1, 2][m] += dab * tex
    conc += 0.01 * rng.standard_normal(conc.shape)
    od = np.clip(conc, 0, None) @ HED.rgb_from_stain
    rgb = 255.0 * np.power(10.0, -od) + rng.normal(0, 2.0, shape + (3,))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels


def model_input(rgb: np.ndarray) -> np.ndarray:
    """The shipped model's input channel: hematoxylin + DAB OD (float32), un-normalised."""
    from daskpath.stain import hematoxylin_dab

    h, dab = hematoxylin_dab(rgb)
    return (h + dab).astype(np.float32)


def _synthetic_crops(n: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        from daskpath import synthetic
    except ImportError:
        return []
    render = getattr(synthetic, "render_region", None)
    if render is None:
        return []
    rng = np.random.default_rng(seed)
    slide = (4096, 4096)
    out = []
    for i in range(n):
        y0, x0 = (int(v) for v in rng.integers(0, slide[0] - size, 2))
        # phantom seeds 1000+ are kept apart from the seeds tests and demos use
        rgb, lab = render(y0, x0, size, size, size=slide, seed=int(1000 + seed * 10 + i % 4),
                          stain="ihc")
        out.append((np.asarray(rgb), np.asarray(lab, np.int32)))
    return out


def _jpeg(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    """Round trip through JPEG, as the tiled slide files are written."""
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover
        return rgb
    return imagecodecs.jpeg_decode(imagecodecs.jpeg_encode(rgb, level=quality))


def training_data(
    n: int = 96, size: int = 256, seed: int = 0, use_stardist_test_image: bool = False,
    disc_fraction: float = 0.0,
) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Training images (model input, un-normalised) and label masks; plus a description.

    ``n * (1 - disc_fraction)`` crops of the synthetic IHC phantom (every other one round-tripped
    through JPEG q90 like the slide files), the rest :func:`disc_phantom` images (all of them if
    :mod:`daskpath.synthetic` is unavailable), optionally stardist's ``test_image_nuclei_2d``.
    """
    from stardist import fill_label_holes

    crops = _synthetic_crops(int(round(n * (1 - disc_fraction))), size, seed)
    crops = [(_jpeg(rgb) if i % 2 else rgb, lab) for i, (rgb, lab) in enumerate(crops)]
    source = f"daskpath.synthetic.render_region x{len(crops)} (half JPEG q90)" if crops else ""
    n_disc = n - len(crops)
    crops += [disc_phantom((size, size), seed=seed * 1000 + i) for i in range(n_disc)]
    source = ", ".join(s for s in (source, f"disc_phantom x{n_disc}") if s)
    X = [model_input(rgb) for rgb, _ in crops]
    Y = [fill_label_holes(lab) for _, lab in crops]
    if use_stardist_test_image:
        from stardist.data import test_image_nuclei_2d

        img, mask = test_image_nuclei_2d(return_mask=True)
        img = img.astype(np.float32)
        # scale the fluorescence image into the OD range of the phantoms
        lo, hi = np.percentile(np.concatenate([x.ravel() for x in X[:8]]), PERCENTILES)
        ilo, ihi = np.percentile(img, PERCENTILES)
        img = (img - ilo) / (ihi - ilo) * (hi - lo) + lo
        for y0 in range(0, img.shape[0] - size + 1, size):
            for x0 in range(0, img.shape[1] - size + 1, size):
                X.append(img[y0:y0 + size, x0:x0 + size].copy())
                Y.append(fill_label_holes(mask[y0:y0 + size, x0:x0 + size]).astype(np.int32))
        source += ", stardist test_image_nuclei_2d"
    return X, Y, source


def _augment(x: np.ndarray, y: np.ndarray):
    k = np.random.randint(4)
    x, y = np.rot90(x, k), np.rot90(y, k)
    if np.random.rand() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    x = x * np.random.uniform(0.8, 1.2) + np.random.uniform(-0.05, 0.05)
    x = x + np.random.normal(0, 0.02, x.shape)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)


def train(
    out_dir: str | Path,
    epochs: int = 40,
    steps: int = 25,
    seed: int = 0,
    *,
    n_images: int = 96,
    patch: int = 128,
    batch_size: int = 4,
    use_stardist_test_image: bool = False,
    disc_fraction: float = 0.0,
    max_nucleus_diameter: int = 32,
    force: bool = False,
) -> dict[str, Any]:
    """Train a tiny StarDist2D on IHC phantoms and write it (plus ``daskpath.json``) to ``out_dir``.

    ``out_dir`` is replaced only when daskpath made it (or it is empty or new); a non-empty
    folder of the user's is refused unless ``force`` is true (see :mod:`daskpath.ownership`).

    Returns
    -------
    dict
        ``val_f1_iou50``, ``thresholds`` (prob, nms), ``train_seconds``, ``n_train``, ``n_val``,
        ``out_dir``.
    """
    import os

    from daskpath.ownership import check_folder

    check_folder(out_dir, force=force)  # before any work: a user's folder is never replaced

    from daskpath.nuclei import _configure_tensorflow

    _configure_tensorflow()  # quiet TF's import chatter, thread cap
    import tensorflow as tf
    from stardist.matching import matching_dataset
    from stardist.models import Config2D, StarDist2D

    np.random.seed(seed)
    tf.random.set_seed(seed)
    try:
        tf.keras.utils.set_random_seed(seed)
    except Exception:  # noqa: BLE001
        pass

    out_dir = Path(out_dir).resolve()
    t0 = time.perf_counter()
    X, Y, source = training_data(n_images, 256, seed, use_stardist_test_image, disc_fraction)
    lo, hi = (float(v) for v in np.percentile(np.concatenate([x.ravel() for x in X]), PERCENTILES))
    X = [((x - lo) / (hi - lo)).astype(np.float32) for x in X]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(X))
    n_val = max(2, len(X) // 8)
    val, trn = idx[:n_val], idx[n_val:]
    X_trn, Y_trn = [X[i] for i in trn], [Y[i] for i in trn]
    X_val, Y_val = [X[i] for i in val], [Y[i] for i in val]

    conf = Config2D(
        n_rays=N_RAYS, grid=GRID, n_channel_in=1, unet_n_depth=UNET_DEPTH,
        train_patch_size=(patch, patch), train_batch_size=batch_size, train_epochs=epochs,
        train_steps_per_epoch=steps, train_tensorboard=False, use_gpu=False,
        train_reduce_lr={"factor": 0.5, "patience": 8, "min_delta": 0},
    )
    tmp = out_dir.parent / f".{out_dir.name}.daskpath-partial"  # daskpath's own name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        model = StarDist2D(conf, name=tmp.name, basedir=str(tmp.parent))
        model.train(X_trn, Y_trn, validation_data=(X_val, Y_val), augmenter=_augment,
                    epochs=epochs, steps_per_epoch=steps)
        thr = model.optimize_thresholds(X_val, Y_val, nms_threshs=[0.3, 0.4, 0.5],
                                        predict_kwargs={"show_tile_progress": False})
    train_s = time.perf_counter() - t0
    Y_pred = [model.predict_instances(x, show_tile_progress=False, verbose=False)[0] for x in X_val]
    st = matching_dataset(Y_val, Y_pred, thresh=0.5, show_progress=False)
    rf = int(max(model._axes_tile_overlap("YX")))

    for f in tmp.glob("weights_last*"):
        f.unlink()
    for f in tmp.glob("weights_now*"):
        f.unlink()
    cmd = (f"python -m daskpath.train_stardist {out_dir.name} --epochs {epochs} --steps {steps} "
           f"--seed {seed} --n-images {n_images} --disc-fraction {disc_fraction}"
           + (" --stardist-image" if use_stardist_test_image else ""))
    spec = {
        "name": out_dir.name,
        "framework": "stardist",
        "class": "StarDist2D",
        "input": {
            "channel": "h+dab",
            "description": "hematoxylin + DAB optical density (base-10) from colour "
                           "deconvolution with skimage's HED vectors (daskpath.stain)",
        },
        "normalize": {"percentiles": list(PERCENTILES), "scope": "slide",
                      "training_range": [lo, hi]},
        "receptive_field": rf,
        "max_nucleus_diameter": int(max_nucleus_diameter),
        "div_by": [GRID[0] * 2**UNET_DEPTH, GRID[1] * 2**UNET_DEPTH],
        "halo": int(math.ceil((rf + max_nucleus_diameter) / 8) * 8),
        "halo_rule": "ceil_to(receptive_field + max_nucleus_diameter, div_by)",
        "thresholds": {"prob": float(thr["prob"]), "nms": float(thr["nms"])},
        "dab_threshold": 0.15,
        "validation": {"f1_iou50": float(st.f1), "precision": float(st.precision),
                       "recall": float(st.recall), "n_images": int(n_val)},
        "training": {
            "command": cmd, "seed": seed, "epochs": epochs, "steps_per_epoch": steps,
            "n_train": len(X_trn), "patch": patch, "batch_size": batch_size, "data": source,
            "seconds": round(train_s, 1),
            "config": {"n_rays": N_RAYS, "grid": list(GRID), "unet_n_depth": UNET_DEPTH},
        },
    }
    (tmp / "daskpath.json").write_text(json.dumps(spec, indent=2) + "\n")
    if out_dir.exists():
        # ours (checked above) or the user passed force: swap, then remove the old one
        old = out_dir.parent / (out_dir.name + f".old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return {
        "val_f1_iou50": float(st.f1),
        "thresholds": {"prob": float(thr["prob"]), "nms": float(thr["nms"])},
        "train_seconds": round(train_s, 1),
        "n_train": len(X_trn),
        "n_val": n_val,
        "receptive_field": rf,
        "data": source,
        "out_dir": str(out_dir),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m daskpath.train_stardist", description=__doc__.split("\n")[0]
    )
    p.add_argument("out_dir")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=96)
    p.add_argument("--stardist-image", action="store_true",
                   help="add stardist's test_image_nuclei_2d to the training set")
    p.add_argument("--disc-fraction", type=float, default=0.0)
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR even when it holds files daskpath did not create")
    a = p.parse_args(argv)
    res = train(a.out_dir, a.epochs, a.steps, a.seed, n_images=a.n_images,
                use_stardist_test_image=a.stardist_image, disc_fraction=a.disc_fraction,
                force=a.force)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
