"""3-class ResNet18 tile classifier: Ki67 ratio class from H&E alone.

Classes of a tile's Ki67 area ratio: **0** ``[0, 0.2)``, **1** ``[0.2, 0.5)``, **2** ``[0.5, 1]``
(:data:`daskpath.baselines.BINS`; the 3-class accuracy of ``metrics.json`` uses the same bins).

Input: the tile's RGB, block-averaged by ``downsample`` (8 for the shipped model: a 1024 px tile
becomes 128 x 128; trailing rows/columns that do not fill a block are dropped), scaled to [0, 1]
and normalised with ImageNet's mean / std (so torchvision ImageNet weights are a sensible start:
:func:`daskpath.baselines.resnet.load_torchvision_weights`). The network is fully convolutional
up to a global average pool, so other tile sizes run too, at the same pixel scale; it was trained
on ``tile`` px windows (1024 for the shipped model) and is most accurate there. Tiles under
``8 * downsample`` px on a side get no prediction (class -1, ratio NaN).

Outputs per tile: ``class_classifier`` (argmax of the softmax), ``ratio_classifier`` = expected
value of the class midpoints (0.1, 0.35, 0.75) under the softmax (a continuous estimate in
[0.1, 0.75], so its MAE is bounded below by the spread of the ratios inside a bin), and
``prob_classifier_0..2``.

Model folder: ``model.pt`` (a plain state dict with torchvision's keys, read with
``torch.load(weights_only=True)``: no code runs) + ``daskpath.json`` (arch, width, classes,
downsample, normalisation, training options and figures). Loaded once per worker process (a
locked cache); the task graph carries only the folder path. Each tile is cut from the dask array
and block-averaged in its own task (near its chunks); the network runs on batches of
``batch_size`` tiles (GPU when present, unless ``device`` says otherwise).

Reproduce the shipped model (``daskpath/models/classifier_phantom/README.md``)::

    python -m daskpath.baselines.classifier OUT_DIR --workdir /tmp/phantoms
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from daskpath.baselines._common import (
    BINS,
    as_rgb_dask,
    cached,
    check_tiles,
    ratio_class,
    read_spec,
    resolve_model,
    task_threads,
    write_spec,
)
from daskpath.errors import ConfigError, DaskpathError, InvalidInputError, ModelError, ModelNotFoundError

__all__ = [
    "ClassifierSpec",
    "prepare_tile",
    "load_classifier",
    "predict_tiles_classifier",
    "train_classifier",
    "main",
]

log = logging.getLogger(__name__)
_WEIGHTS = "model.pt"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassifierSpec:
    """Architecture, input and classes of a tile classifier (the JSON spec).

    Attributes
    ----------
    arch : str
        ``"resnet18"``.
    width : int
        Channels of the stem / ``layer1`` (torchvision: 64; shipped phantom model: 16).
    num_classes : int
        3.
    bins : tuple of float
        Upper edges of classes 0 and 1.
    midpoints : tuple of float
        Ratio represented by each class (for ``ratio_classifier``).
    downsample : int
        Block-average factor applied to a tile before the network.
    tile : int
        Tile side (px) the model was trained on.
    input_mean, input_std : tuple of float
        Per-channel normalisation of ``rgb / 255``.
    weights : str
        File name of the state dict inside the folder.
    extra : dict
        Provenance: training options, command, figures.
    """

    arch: str = "resnet18"
    width: int = 16
    num_classes: int = 3
    bins: tuple[float, ...] = BINS
    midpoints: tuple[float, ...] = (0.1, 0.35, 0.75)
    downsample: int = 8
    tile: int = 1024
    input_mean: tuple[float, ...] = _IMAGENET_MEAN
    input_std: tuple[float, ...] = _IMAGENET_STD
    weights: str = _WEIGHTS
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for k in ("bins", "midpoints", "input_mean", "input_std"):
            object.__setattr__(self, k, tuple(float(v) for v in getattr(self, k)))
        if self.arch != "resnet18":
            raise ModelError(f"classifier spec: arch={self.arch!r}; only 'resnet18' is supported")
        if not (isinstance(self.width, int) and self.width >= 1):
            raise ModelError(f"classifier spec: width={self.width!r} must be a positive integer")
        if self.num_classes != 3 or len(self.midpoints) != 3 or tuple(self.bins) != BINS:
            raise ModelError("classifier spec: needs num_classes=3, bins=[0.2, 0.5] and 3 midpoints")
        if not (isinstance(self.downsample, int) and self.downsample >= 1):
            raise ModelError(f"classifier spec: downsample={self.downsample!r} must be a positive integer")
        if len(self.input_mean) != 3 or len(self.input_std) != 3 or min(self.input_std) <= 0:
            raise ModelError("classifier spec: input_mean / input_std need 3 values (std > 0)")

    @property
    def min_tile(self) -> int:
        """Smallest tile side (px) that gets a prediction."""
        return 8 * self.downsample

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("bins", "midpoints", "input_mean", "input_std"):
            d[k] = list(d[k])
        return {"kind": "classifier", "format": "torch-state-dict", "classes": ["0-0.2", "0.2-0.5", "0.5-1"], **d}

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "spec") -> ClassifierSpec:
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names - {"kind", "format", "classes"})
        if unknown:
            raise ModelError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ModelError) as e:
            raise ModelError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------------------------
def block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    """``factor x factor`` block means of an RGB image, float32 in [0, 255] (remainder dropped)."""
    h, w = rgb.shape[0] // factor * factor, rgb.shape[1] // factor * factor
    a = np.asarray(rgb[:h, :w], dtype=np.float32)
    if factor == 1:
        return a
    return a.reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3), dtype=np.float32)


def _normalise(small: np.ndarray, spec: ClassifierSpec) -> np.ndarray:
    """``(h, w, 3)`` float32 block means -> ``(3, h, w)`` network input."""
    mean = np.asarray(spec.input_mean, np.float32) * np.float32(255.0)
    std = np.asarray(spec.input_std, np.float32) * np.float32(255.0)
    return np.ascontiguousarray(((small - mean) / std).transpose(2, 0, 1))


def prepare_tile(rgb: np.ndarray, spec: ClassifierSpec) -> np.ndarray | None:
    """Network input of one tile: ``(3, h / downsample, w / downsample)`` float32, or ``None``
    for a tile smaller than :attr:`ClassifierSpec.min_tile`."""
    if min(rgb.shape[:2]) < spec.min_tile:
        return None
    return _normalise(block_mean(rgb, spec.downsample), spec)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def _build(spec: ClassifierSpec):
    from daskpath.baselines.resnet import resnet18

    return resnet18(num_classes=spec.num_classes, width=spec.width)


def _load(folder: str, device: str) -> tuple[Any, ClassifierSpec]:
    import torch

    path = Path(folder)
    spec = ClassifierSpec.from_json(read_spec(path, "classifier"), source=str(path / "daskpath.json"))
    wpath = path / spec.weights
    if not wpath.is_file():
        raise ModelNotFoundError(f"{wpath}: weights missing; restore the file or retrain with "
                                 "python -m daskpath.baselines.classifier")
    try:
        sd = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{wpath}: not a readable torch state dict ({type(e).__name__}); "
                         "restore the file or retrain") from None
    net = _build(spec)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ModelError(f"{wpath}: does not match the spec (arch {spec.arch}, width {spec.width}): "
                         f"{first}; fix 'width' in daskpath.json or retrain") from None
    net.eval().to(torch.device(device))
    return net, spec


def _device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def load_classifier(model: str | os.PathLike[str] = "phantom", device: str | None = None
                    ) -> tuple[Any, ClassifierSpec]:
    """The network (eval mode, on ``device``) and spec of a model folder, once per process.

    Parameters
    ----------
    model : str or path-like
        ``"phantom"`` (shipped) or a folder with ``daskpath.json`` and ``model.pt``.
    device : str, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.

    Raises
    ------
    ModelError
        Missing folder / files, wrong kind, or weights that do not fit the spec.
    """
    folder = resolve_model("classifier", model)
    dev = _device(device)
    mtime = (folder / "daskpath.json").stat().st_mtime_ns
    return cached(("classifier", str(folder), mtime, dev), lambda: _load(str(folder), dev))




def _set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` once per process (the translation stage's helper)."""
    from daskpath.translate.inference import _set_torch_threads

    _set_torch_threads(n)


def run_network(net: Any, batch: np.ndarray, device: str | None = None) -> np.ndarray:
    """Softmax probabilities ``(n, 3)`` float64 of a ``(n, 3, h, w)`` float32 batch."""
    import torch

    dev = next(net.parameters()).device if device is None else torch.device(device)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(dev)
        return torch.softmax(net(x).float(), dim=1).cpu().numpy().astype(np.float64)


class _PredictBatch:
    """Picklable batch task: network from the per-process cache, one forward per tile shape."""

    def __init__(self, folder: str, device: str | None, threads: int | None) -> None:
        self.folder, self.device, self.threads = folder, device, threads

    def __call__(self, inputs: list[np.ndarray | None]) -> np.ndarray:
        _set_threads(task_threads(self.threads))
        net, _ = load_classifier(self.folder, self.device)
        out = np.full((len(inputs), 3), np.nan)
        shapes: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            if x is not None:
                shapes.setdefault(x.shape, []).append(i)
        for idx in shapes.values():
            out[idx] = run_network(net, np.stack([inputs[i] for i in idx]))
        return out


def _prepare(rgb: np.ndarray, spec: ClassifierSpec) -> np.ndarray | None:
    return prepare_tile(rgb, spec)


def _assemble(tiles: pd.DataFrame, parts: list[np.ndarray], spec: ClassifierSpec, model: str) -> pd.DataFrame:
    probs = np.concatenate(parts) if parts else np.zeros((0, 3))
    ok = np.isfinite(probs).all(axis=1)
    out = tiles.copy()
    out["class_classifier"] = np.where(ok, np.nan_to_num(probs).argmax(axis=1), -1).astype(np.int64)
    out["ratio_classifier"] = np.where(ok, np.nan_to_num(probs) @ np.asarray(spec.midpoints), np.nan)
    for k in range(3):
        out[f"prob_classifier_{k}"] = probs[:, k]
    out.attrs["classifier_model"] = model
    return out


def predict_tiles_classifier(he: Any, tiles: pd.DataFrame, model: str | os.PathLike[str] = "phantom", *,
                             batch_size: int = 16, device: str | None = None,
                             resources: dict[str, float] | None = None, torch_threads: int | None = None,
                             compute: bool = True, record_dir: str | os.PathLike[str] | None = None):
    """Ki67 ratio class (and a ratio estimate) per tile from H&E alone, by the ResNet18.

    Parameters
    ----------
    he : dask.array.Array or numpy.ndarray
        ``(y, x, 3)`` uint8 RGB H&E.
    tiles : pandas.DataFrame
        One row per tile, columns ``y0, x0, height, width`` (px); other columns are kept.
    model : str or path-like
        Shipped model name (``"phantom"``) or model folder.
    batch_size : int
        Tiles per forward pass (one task each).
    device : str, optional
        Torch device of the forward passes; default CUDA when the worker has one.
    resources : dict, optional
        Dask resources for the forward-pass tasks (e.g. ``{"GPU": 1}``).
    torch_threads : int, optional
        Intra-op threads per task (default: the worker's cores shared among its threads).
    compute : bool
        ``False``: return a :class:`dask.delayed.Delayed` of the DataFrame.
    record_dir : path, optional
        Record each batch's class probabilities as ``record_dir/<first>-<end>.npz``; a rerun
        loads them instead of running the network again (resume after an interrupt).

    Returns
    -------
    pandas.DataFrame
        ``tiles`` plus ``class_classifier`` (0, 1, 2; -1 for tiles under ``8 * downsample`` px),
        ``ratio_classifier`` (softmax-expected class midpoint; NaN where no prediction) and
        ``prob_classifier_0..2``.

    Raises
    ------
    InvalidInputError, ModelError
        Wrong dtype / shape of ``he``, a bad tile table, a missing or inconsistent model folder.
    """
    import dask

    he = as_rgb_dask(he)
    tiles = check_tiles(tiles, he.shape[:2])
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise InvalidInputError(f"classifier: batch_size={batch_size!r} must be a positive integer")
    folder = resolve_model("classifier", model)
    spec = ClassifierSpec.from_json(read_spec(folder, "classifier"), source=str(folder / "daskpath.json"))
    if not (folder / spec.weights).is_file():
        raise ModelNotFoundError(f"{folder / spec.weights}: weights missing; restore the file or retrain with "
                                 "python -m daskpath.baselines.classifier")
    prepared = [
        dask.delayed(_prepare, pure=True)(he[y0:y0 + h, x0:x0 + w], spec)
        for y0, x0, h, w in zip(tiles["y0"], tiles["x0"], tiles["height"], tiles["width"])
    ]
    fn = _PredictBatch(str(folder), device, torch_threads)
    with dask.annotate(resources=resources) if resources else _null():
        parts = [dask.delayed(fn, pure=True)(prepared[i:i + batch_size])
                 for i in range(0, len(prepared), batch_size)]
    if record_dir is not None:
        from daskpath.resume import recorded

        n = len(prepared)  # record names carry the batch bounds: a new batch_size never mixes
        parts = [recorded(p, Path(record_dir) / f"{i * batch_size}-{min(n, (i + 1) * batch_size)}.npz",
                          "npz")[0] for i, p in enumerate(parts)]
    result = dask.delayed(_assemble, pure=True)(tiles, parts, spec, str(model))
    return result.compute() if compute else result


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class _SlideWindows:
    """Network inputs of one slide at the model's scale and its candidate training windows."""

    small: np.ndarray  # (3, H/ds, W/ds) normalised
    pos: np.ndarray  # (k, 2) window origins in cells
    ratio: np.ndarray  # (k,) truth area ratio of each window


def _integral(a: np.ndarray) -> np.ndarray:
    s = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.float64)
    s[1:, 1:] = a.cumsum(0).cumsum(1)
    return s


def _box(s: np.ndarray, y: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    return s[y + n, x + n] - s[y, x + n] - s[y + n, x] + s[y, x]


def _slide_windows(slide, spec: ClassifierSpec, tile: int, stride: int, min_tissue: float) -> _SlideWindows:
    """Every ``tile``-px window on a ``stride``-px lattice with tissue >= ``min_tissue`` and nuclei.

    Truth ratio of a window: nuclei owned by their H&E centroid (as on the tile grid).
    """
    from daskpath.baselines.data import TISSUE_LEVEL

    ds = spec.downsample
    h, w = slide.size[0] // ds, slide.size[1] // ds
    small = block_mean(slide.he, ds)[:h, :w]
    tissue = (slide.he.min(axis=2) < TISSUE_LEVEL)[:h * ds, :w * ds]
    tissue = tissue.reshape(h, ds, w, ds).mean(axis=(1, 3))
    t = slide.truth
    t = t[np.isfinite(t["y_he"]) & (t["area_he"] > 0)]
    cy = np.clip((t["y_he"].to_numpy() // ds).astype(int), 0, h - 1)
    cx = np.clip((t["x_he"].to_numpy() // ds).astype(int), 0, w - 1)
    area = t["area_he"].to_numpy(float)
    pos = t["positive"].to_numpy(bool)
    tot_a = np.zeros((h, w))
    pos_a = np.zeros((h, w))
    np.add.at(tot_a, (cy, cx), area)
    np.add.at(pos_a, (cy, cx), area * pos)
    n, st = tile // ds, max(1, stride // ds)
    yy, xx = np.meshgrid(np.arange(0, h - n + 1, st), np.arange(0, w - n + 1, st), indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    tis = _box(_integral(tissue), yy, xx, n) / (n * n)
    tot = _box(_integral(tot_a), yy, xx, n)
    pa = _box(_integral(pos_a), yy, xx, n)
    keep = (tis >= min_tissue) & (tot > 0)
    return _SlideWindows(_normalise(small, spec), np.stack([yy[keep], xx[keep]], 1), pa[keep] / tot[keep])


def _dense_metrics(net: Any, spec: ClassifierSpec, slides: Sequence[Any], stride: int,
                   min_tissue: float) -> dict[str, Any]:
    """3-class accuracy, balanced accuracy, MAE and confusion on every ``spec.tile`` window of a
    ``stride`` lattice (tissue >= ``min_tissue``) of ``slides``."""
    n = spec.tile // spec.downsample
    probs, ratios = [], []
    for s in slides:
        w = _slide_windows(s, spec, spec.tile, stride, min_tissue)
        for i in range(0, len(w.pos), 32):
            xb = np.stack([w.small[:, y:y + n, x:x + n] for y, x in w.pos[i:i + 32]])
            probs.append(run_network(net, xb))
        ratios.append(w.ratio)
    if not probs:
        return {"n": 0}
    p, r = np.concatenate(probs), np.concatenate(ratios)
    c, pc = ratio_class(r), p.argmax(axis=1)
    conf = np.zeros((3, 3), int)
    np.add.at(conf, (c, pc), 1)
    return {"n": int(len(r)), "stride": stride, "acc3": float((pc == c).mean()),
            "balanced_acc3": float(np.mean([conf[i, i] / conf[i].sum() for i in range(3) if conf[i].sum()])),
            "mae": float(np.abs(p @ np.asarray(spec.midpoints) - r).mean()), "confusion": conf.tolist()}


def train_classifier(
    out_dir: str | os.PathLike[str],
    seeds: Sequence[int] = tuple(range(20, 32)),
    heldout_seeds: Sequence[int] = (100, 101, 102),
    size: tuple[int, int] = (4096, 4096),
    *,
    width: int = 16,
    downsample: int = 8,
    tile: int = 1024,
    stride: int = 32,
    steps: int = 1200,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    min_tissue: float = 0.5,
    dense_stride: int = 256,
    seed: int = 0,
    threads: int = 2,
    workdir: str | os.PathLike[str] | None = None,
    init_from: str | os.PathLike[str] | None = None,
    realism: str = "easy",
    command: str | None = None,
) -> dict[str, Any]:
    """Train the 3-class ResNet18 on phantom tiles; write a model folder; return its figures.

    Training windows are every ``tile``-px window on a ``stride``-px lattice of the training
    slides with tissue >= ``min_tissue`` (labelled with the truth ratio class); batches draw the
    three classes equally often, with random 90-degree rotations and flips. AdamW with a cosine
    learning-rate decay; cross-entropy. The held-out figures use other phantom slides (a
    slide-level split), grid tiles of ``tile`` px with tissue >= ``min_tissue``, predicted through
    :func:`predict_tiles_classifier` (the dask path).

    Parameters
    ----------
    out_dir : path-like
        Model folder to write (``model.pt``, ``daskpath.json``, ``evaluation.json``, ``loss_log.csv``).
    seeds, heldout_seeds : sequence of int
        Training and held-out phantom slides (disjoint).
    size : tuple of int
        Phantom slide size.
    width : int
        ResNet18 width (64 = torchvision's).
    downsample, tile, stride : int
        Input block-average factor, training window side and lattice step (px).
    steps, batch_size, lr, weight_decay : int, int, float, float
        Optimisation.
    min_tissue : float
        Tissue fraction of a usable window / held-out tile.
    dense_stride : int
        Lattice step (px) of the overlapping held-out windows of ``heldout_dense`` (more windows,
        hence steadier figures for the middle class, than the tile grid).
    seed : int
        Seeds torch and numpy (a run is reproducible on one machine).
    threads : int
        Torch threads.
    workdir : path-like, optional
        Where phantom slides are written (and reused); default a temporary folder.
    realism : {"easy", "realistic"}
        Kind of phantom slides (:func:`daskpath.synthetic.make_pair`).
    init_from : path-like, optional
        A torchvision ResNet18 checkpoint to start from (head replaced); its width must match.
    command : str, optional
        The command line, recorded in the spec.

    Returns
    -------
    dict
        Held-out ``acc3``, ``balanced_acc3``, ``mae`` etc. (``heldout``), timings, sizes.
    """
    import tempfile

    import dask
    import dask.array as da
    import torch
    import torch.nn.functional as F

    from daskpath.baselines.data import heldout_tiles, phantom_slides
    from daskpath.baselines.resnet import load_torchvision_weights
    from daskpath.translate.score import ratio_metrics

    if not seeds:
        raise InvalidInputError("train classifier: seeds is empty; give at least one training phantom seed")
    overlap = sorted(set(seeds) & set(heldout_seeds))
    if overlap:
        raise InvalidInputError(f"train classifier: seed {overlap[0]} is both a training and a held-out "
                                "slide; keep the split slide-level")
    if tile % downsample or tile // downsample < 8:
        raise InvalidInputError(f"train classifier: tile={tile} must be a multiple of downsample={downsample} "
                                f"and at least {8 * downsample}")
    spec = ClassifierSpec(width=width, downsample=downsample, tile=tile)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    wd = Path(tmp.name if tmp else workdir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        train = phantom_slides(seeds, size, wd, realism)
        held = phantom_slides(heldout_seeds, size, wd, realism) if heldout_seeds else []
        t_data = time.time() - t0
        wins = [_slide_windows(s, spec, tile, stride, min_tissue) for s in train]
        del train
        pool = [(k, i) for k, w in enumerate(wins) for i in range(len(w.ratio))]
        if not pool:
            raise InvalidInputError("train classifier: no training window has enough tissue; lower "
                                    "min_tissue or use larger slides")
        labels = np.array([ratio_class(wins[k].ratio[i]) for k, i in pool])
        by_class = [np.flatnonzero(labels == c) for c in range(3)]
        present = [c for c in range(3) if len(by_class[c])]
        n = tile // downsample
        net = _build(spec)
        if init_from:
            load_torchvision_weights(net, init_from, head="replace")
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        net.train()
        log_rows = []
        t_train0 = time.time()
        for step in range(steps):
            cls = rng.choice(present, batch_size)
            xb = np.empty((batch_size, 3, n, n), np.float32)
            for b, c in enumerate(cls):
                k, i = pool[int(rng.choice(by_class[c]))]
                y, x = wins[k].pos[i]
                patch = wins[k].small[:, y:y + n, x:x + n]
                patch = np.rot90(patch, int(rng.integers(4)), axes=(1, 2))
                if rng.integers(2):
                    patch = patch[:, :, ::-1]
                xb[b] = patch
            logits = net(torch.from_numpy(xb))
            loss = F.cross_entropy(logits, torch.from_numpy(cls.astype(np.int64)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            acc = float((logits.argmax(1).numpy() == cls).mean())
            log_rows.append((step, loss.item(), acc, sched.get_last_lr()[0]))
            if step % 50 == 0 or step == steps - 1:
                log.info("step %d loss %.4f acc %.3f", step, loss.item(), acc)
        t_train = time.time() - t_train0
        net.eval()
        training = {
            "seeds": list(seeds), "heldout_seeds": list(heldout_seeds), "size": list(size),
            "stride": stride, "steps": steps, "batch_size": batch_size, "lr": lr,
            "weight_decay": weight_decay, "min_tissue": min_tissue, "seed": seed, "threads": threads,
            "init_from": str(init_from or ""), "n_windows": len(pool),
            "windows_per_class": [int(len(b)) for b in by_class],
            "command": command or "", "data": f"phantom (daskpath.synthetic.make_pair, realism={realism}, JPEG TIFF)",
        }
        spec = ClassifierSpec(**{**asdict(spec), "extra": {"training": training}})
        tmpw = out / (spec.weights + ".tmp")
        torch.save(net.state_dict(), tmpw)
        os.replace(tmpw, out / spec.weights)
        write_spec(out, spec.to_json())
        with open(out / "loss_log.csv", "w") as f:
            f.write("step,loss,acc,lr\n")
            f.writelines(f"{s},{lo:.5f},{a:.4f},{r:.6g}\n" for s, lo, a, r in log_rows)

        rows = []
        t_eval0 = time.time()
        for s in held:
            tl = heldout_tiles(s, tile, min_tissue)
            with dask.config.set(scheduler="threads", num_workers=1):
                p = predict_tiles_classifier(da.from_array(s.he, chunks=(2048, 2048, 3)), tl, out,
                                             device="cpu", torch_threads=threads)
            rows.append(p.assign(seed=s.seed))
        dense = _dense_metrics(net, spec, held, dense_stride, min_tissue) if held else None
        t_eval = time.time() - t_eval0
    finally:
        torch.set_num_threads(old_threads)
        if tmp:
            tmp.cleanup()
    report: dict[str, Any] = {
        "model": str(out), "width": width, "params": int(sum(p.numel() for p in net.parameters())),
        "model_bytes": int((out / spec.weights).stat().st_size),
        "final_train_loss": float(np.mean([r[1] for r in log_rows[-20:]])),
        "timing_s": {"phantoms": round(t_data, 1), "train": round(t_train, 1), "evaluation": round(t_eval, 1)},
    }
    if held:
        df = pd.concat(rows, ignore_index=True)
        truth_cls = ratio_class(df["truth"])
        m = ratio_metrics(df["ratio_classifier"], df["truth"])
        m["acc3"] = float((df["class_classifier"].to_numpy() == truth_cls).mean())
        conf = np.zeros((3, 3), int)
        np.add.at(conf, (truth_cls, df["class_classifier"].to_numpy()), 1)
        m["confusion"] = conf.tolist()
        m["balanced_acc3"] = float(np.mean([conf[i, i] / conf[i].sum() for i in range(3) if conf[i].sum()]))
        mid = np.asarray(spec.midpoints)[df["class_classifier"].to_numpy()]
        m["mae_bin_midpoint"] = float(np.abs(mid - df["truth"].to_numpy()).mean())
        report["heldout"] = m
        report["heldout_dense"] = dense
        report["heldout_per_seed"] = {
            int(k): {"n": int(len(g)),
                     "acc3": float((g["class_classifier"].to_numpy() == ratio_class(g["truth"])).mean()),
                     "mae": float(np.abs(g["ratio_classifier"] - g["truth"]).mean())}
            for k, g in df.groupby("seed")}
        report["tiles"] = df[["seed", "y0", "x0", "tissue", "n", "truth", "class_classifier",
                              "ratio_classifier"]].round(4).to_dict("records")
    spec = ClassifierSpec(**{**asdict(spec), "extra": {**spec.extra, "evaluation": {
        k: v for k, v in report.items() if k not in ("tiles", "model")}}})
    write_spec(out, spec.to_json())
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m daskpath.baselines.classifier OUT_DIR [options]`` (``--help``)."""
    import shlex

    p = argparse.ArgumentParser(
        prog="daskpath train classifier",
        description="Train the 3-class ResNet18 (Ki67 ratio 0-0.2, 0.2-0.5, 0.5-1) on phantom H&E "
                    "tiles and write a model folder (model.pt, daskpath.json, evaluation.json).")
    p.add_argument("out_dir", help="model folder to write")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(20, 32)), help="training phantom seeds")
    p.add_argument("--heldout-seeds", type=int, nargs="*", default=[100, 101, 102],
                   help="held-out phantom seeds (slide-level split) for the figures")
    p.add_argument("--size", type=int, nargs=2, default=[4096, 4096], metavar=("H", "W"))
    p.add_argument("--width", type=int, default=16, help="ResNet18 width (torchvision: 64)")
    p.add_argument("--downsample", type=int, default=8, help="block-average factor of the input")
    p.add_argument("--tile", type=int, default=1024, help="training window / held-out tile side (px)")
    p.add_argument("--stride", type=int, default=32, help="lattice step of training windows (px)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--dense-stride", type=int, default=256,
                   help="lattice step (px) of the overlapping held-out windows (heldout_dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where phantom slides are written and reused")
    p.add_argument("--realism", choices=("easy", "realistic"), default="easy",
                   help="phantom kind (daskpath synth --realism)")
    p.add_argument("--init-from", default=None, help="torchvision resnet18 .pth to start from (same width)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the loss every 50 steps")
    a = p.parse_args(argv)
    for k in ("width", "downsample", "tile", "stride", "steps", "batch_size", "threads", "dense_stride"):
        if getattr(a, k) < 1:
            raise ConfigError(f"train classifier: --{k.replace('_', '-')}={getattr(a, k)} must be >= 1")
    if a.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cmd = "python -m daskpath.baselines.classifier " + " ".join(
        shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    res = train_classifier(a.out_dir, a.seeds, a.heldout_seeds, tuple(a.size), width=a.width,
                           downsample=a.downsample, tile=a.tile, stride=a.stride, steps=a.steps,
                           batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                           dense_stride=a.dense_stride, seed=a.seed,
                           threads=a.threads, workdir=a.workdir, realism=a.realism, init_from=a.init_from, command=cmd)
    print(json.dumps({k: v for k, v in res.items() if k != "tiles"}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except DaskpathError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
