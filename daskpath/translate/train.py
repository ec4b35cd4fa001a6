"""Train H&E -> IHC generators: pix2pix, pyramid pix2pix (BCI) and CycleGAN.

Losses (as in pytorch-CycleGAN-and-pix2pix and BCI):

* ``pix2pix``: conditional PatchGAN on ``cat(A, B)`` (vanilla GAN loss) + ``lambda_l1 * L1``
  (``lambda_l1 = 100``).
* ``pyramid`` (BCI's pyramid pix2pix): the pix2pix GAN term + ``lambda_pyramid * sum_s L1_s``
  (replacing the single-scale term)
  over four scales (full, 1/2, 1/4, 1/8); each octave blurs with a 3x3 Gaussian (sigma 1) four
  times, then keeps every second pixel (``lambda_pyramid = 25``).
* ``cyclegan``: LSGAN for ``G_A: A->B`` and ``G_B: B->A`` + ``lambda_cycle * L1`` cycle terms
  (10 each way) + ``lambda_identity * lambda_cycle * L1`` identity terms (0.5), discriminators fed
  from 50-image pools.

Adam (lr 2e-4, betas 0.5/0.999), constant for ``epochs`` then linear decay to zero over
``epochs_decay`` (the reference's ``linear`` policy). Every run writes into ``out_dir``:

``latest_net_G.pth`` (pix2pix/pyramid) or ``latest_net_G_A.pth`` / ``latest_net_G_B.pth``
(CycleGAN), discriminators ``latest_net_D*.pth``, ``<epoch>_net_*.pth`` every ``save_every``
epochs, ``daskpath.json`` (so the folder is a model folder), ``train_state.pt`` (optimisers,
schedulers, epoch: what ``resume=True`` continues from), ``loss_log.csv`` (one row per step) and
``loss_log.png``.

Norm statistics: ``train_norm="pooled"`` trains an instance-norm generator with statistics
pooled over the whole batch (:class:`PooledNorm`), which is what inference does with slide-level
statistics (``translate(norm_stats="slide")``); with per-crop statistics (``"instance"``, the
reference's) small crops learn to lean on statistics that a slide does not have. The saved state
dict is the reference's either way. ``init_from`` starts the generator from a checkpoint.

Data: :func:`phantom_pairs` renders aligned H&E / IHC regions of phantom slides (the IHC window
is taken at the known section offset, so pairs are pixel-aligned for pix2pix);
:func:`folder_pairs` reads the reference's ``trainA/``, ``trainB/`` folders (pairs by sorted file
name) or pix2pix's aligned ``train/`` (A|B side by side); ``--config RUN.yaml`` (or
``--from-run OUTPUT_DIR --slides MANIFEST``) exports the kept tiles of a finished run with a
slide-level train/test split (:mod:`daskpath.translate.tilepairs`), trains on the train slides
only and writes ``evaluation.json`` for the held-out slides
(:func:`daskpath.translate.evaluate.evaluate_pairs`). Crops are random, with flips and 90-degree rotations applied to both images alike.
Everything random is drawn from ``seed`` (torch, numpy), so a run is reproducible on one machine.

Streaming (``--from-run``, default ``--stream``): training reads random crops of the train
tiles from the run's slides on demand (:class:`daskpath.translate.data.TileStream`, the IHC on
the refined alignment), through a ``DataLoader`` with ``--loader-workers`` processes
(default ``min(4, cores - 1)``), so memory does not grow with the number of tiles; crops are a
function of ``(seed, epoch, index)``, so they do not depend on the number of workers and a
resumed run trains on what an uninterrupted one would. The export is still written (the
reference's folder layout, and the held-out tiles the evaluation reads); ``--no-stream`` trains
on the exported PNGs held in memory, as before.

Mixed precision (``--amp``, default on with ``--device cuda``, refused on CPU):
``torch.autocast`` in ``float16`` with a ``GradScaler`` (``--amp-dtype bfloat16``: no scaler).
Several GPUs (or CPU processes): launch with ``torchrun --nproc_per_node N -m
daskpath.translate.train ...``; each process trains on its own share of the samples
(``--batch-size`` per process), G and D are wrapped in ``DistributedDataParallel`` (NCCL on
CUDA, Gloo on CPU; in G's step D is called outside its wrapper, frozen), rank 0 alone exports,
writes checkpoints and ``loss_log.csv`` (its own losses), and evaluates; ``--log-samples``
writes each rank's samples.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from daskpath.errors import ConfigError, DaskpathError, InvalidInputError, ModelError
from daskpath.translate.checkpoints import GeneratorSpec, SPEC_NAME, build_generator
from daskpath.translate.networks import define_D, init_weights

__all__ = [
    "TrainConfig",
    "phantom_pairs",
    "folder_pairs",
    "PairSampler",
    "GANLoss",
    "ImagePool",
    "PooledNorm",
    "pool_instance_norms",
    "gaussian_pyramid",
    "pyramid_l1",
    "Precision",
    "resolve_precision",
    "DistInfo",
    "init_distributed",
    "train",
    "main",
]

log = logging.getLogger(__name__)
Mode = Literal["pix2pix", "pyramid", "cyclegan"]


@dataclass
class TrainConfig:
    """Training options (names follow the reference's command line where one exists)."""

    mode: Mode = "pix2pix"
    arch: str = "resnet_6blocks"
    ngf: int = 16
    ndf: int = 16
    norm: str = "instance"
    dropout: bool = False
    n_layers_d: int = 3
    crop: int = 128
    batch_size: int = 4
    epochs: int = 10
    epochs_decay: int = 0
    steps_per_epoch: int = 50
    lr: float = 2e-4
    beta1: float = 0.5
    gan_mode: str | None = None  # default: vanilla for pix2pix/pyramid, lsgan for cyclegan
    lambda_gan: float = 1.0
    lambda_l1: float = 100.0
    lambda_pyramid: float = 25.0
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    pool_size: int = 50
    save_every: int = 5
    seed: int = 0
    tile: int = 512
    threads: int | None = None
    train_norm: str = "instance"  # "pooled": G's instance norms use batch-pooled statistics
    init_from: str = ""  # start G from this checkpoint (.pth or model folder) instead of random
    loader_workers: int | None = None  # DataLoader processes of a streamed dataset (None: min(4, cores-1))
    amp: bool | None = None  # mixed precision: None = on with CUDA, off on CPU
    amp_dtype: str = "float16"  # or "bfloat16" (no GradScaler)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("pix2pix", "pyramid", "cyclegan"):
            raise ConfigError(f"train: mode={self.mode!r} must be pix2pix, pyramid or cyclegan")
        if self.crop % 4 or self.crop < 32:
            raise ConfigError(f"train: crop={self.crop} must be a multiple of 4 and >= 32")
        if self.arch.startswith("unet") and self.crop % (256 if self.arch == "unet_256" else 128):
            raise ConfigError(f"train: crop={self.crop} must be a multiple of {self.arch[5:]} for {self.arch}")
        for k in ("batch_size", "epochs", "steps_per_epoch", "save_every"):
            if not (isinstance(getattr(self, k), int) and getattr(self, k) >= 1):
                raise ConfigError(f"train: {k}={getattr(self, k)!r} must be a positive integer")
        if self.gan_mode is None:
            self.gan_mode = "lsgan" if self.mode == "cyclegan" else "vanilla"
        if self.gan_mode not in ("vanilla", "lsgan"):
            raise ConfigError(f"train: gan_mode={self.gan_mode!r} must be vanilla or lsgan")
        if self.train_norm not in ("instance", "pooled"):
            raise ConfigError(f"train: train_norm={self.train_norm!r} must be instance or pooled")
        if self.train_norm == "pooled" and self.norm != "instance":
            raise ConfigError("train: train_norm='pooled' applies to norm='instance' generators only")
        lw = self.loader_workers
        if lw is not None and not (isinstance(lw, int) and lw >= 0):
            raise ConfigError(f"train: loader_workers={self.loader_workers!r} must be an integer >= 0 "
                              "(0: read in the training process)")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"train: amp_dtype={self.amp_dtype!r} must be float16 or bfloat16")

    def spec(self) -> GeneratorSpec:
        return GeneratorSpec(arch=self.arch, ngf=self.ngf, norm=self.norm, dropout=self.dropout,
                             tile=self.tile)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def phantom_pairs(
    seeds: Sequence[int] = (0, 1, 2, 3),
    regions_per_seed: int = 4,
    region: int = 512,
    size: tuple[int, int] = (4096, 4096),
    offset: tuple[int, int] | None = None,
    min_tissue: float = 0.6,
    rng_seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Aligned ``(he, ihc)`` uint8 regions of phantom slides (no files written).

    For each slide seed, ``regions_per_seed`` windows of ``region`` px with at least
    ``min_tissue`` tissue are rendered with :func:`daskpath.synthetic.render_region`; the IHC
    window is shifted by the section offset, so nucleus ``i`` sits at the same pixel in both.
    """
    from daskpath.synthetic import DEFAULT_OFFSET, render_region

    dy, dx = DEFAULT_OFFSET if offset is None else offset
    rng = np.random.default_rng(rng_seed)
    out = []
    for s in seeds:
        got, tries = 0, 0
        while got < regions_per_seed and tries < 50 * regions_per_seed:
            tries += 1
            y0 = int(rng.integers(0, size[0] - region))
            x0 = int(rng.integers(0, size[1] - region))
            he, _ = render_region(y0, x0, region, region, size=size, seed=s, stain="he", offset=offset)
            if (he.min(axis=2) < 215).mean() < min_tissue:
                continue
            ihc, _ = render_region(y0 + dy, x0 + dx, region, region, size=size, seed=s, stain="ihc",
                                   offset=offset)
            out.append((he, ihc))
            got += 1
    if not out:
        raise InvalidInputError("phantom_pairs: no region with enough tissue; lower min_tissue")
    return out


def folder_pairs(root: str | os.PathLike[str], split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    """``(A, B)`` images of a split in the reference's folder layouts.

    ``<root>/<split>A`` + ``<root>/<split>B`` (unaligned layout: pairs by sorted file name), or
    ``<root>/<split>/`` (aligned layout: each image is A and B side by side, A on the left), as
    :func:`daskpath.translate.tilepairs.export_tile_pairs` writes them.
    """
    from PIL import Image

    root = Path(root)
    da_, db_, ab = root / f"{split}A", root / f"{split}B", root / split
    exts = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
    if da_.is_dir() and db_.is_dir():
        fa = sorted(p for p in da_.iterdir() if p.suffix.lower() in exts)
        fb = sorted(p for p in db_.iterdir() if p.suffix.lower() in exts)
        if not fa or len(fa) != len(fb):
            raise InvalidInputError(f"{root}: {len(fa)} images in {split}A but {len(fb)} in {split}B; "
                                    "they must pair one to one by sorted name")
        return [(np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB")))
                for a, b in zip(fa, fb)]
    if ab.is_dir():
        files = sorted(p for p in ab.iterdir() if p.suffix.lower() in exts)
        if not files:
            raise InvalidInputError(f"{ab}: no images; export tile pairs there (daskpath train translator --config RUN.yaml)")
        out = []
        for f in files:
            img = np.asarray(Image.open(f).convert("RGB"))
            if img.shape[1] % 2:
                raise InvalidInputError(f"{f}: aligned A|B image has an odd width {img.shape[1]}; "
                                        "it must be A and B side by side")
            w = img.shape[1] // 2
            out.append((img[:, :w], img[:, w:]))
        return out
    raise InvalidInputError(f"{root}: needs {split}A/ and {split}B/ (or an aligned {split}/) folder of images; "
                            "export tile pairs there")


class PairSampler:
    """Random aligned crops with flips / 90-degree rotations; ``paired=False`` crops A and B apart."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], crop: int, paired: bool = True) -> None:
        for a, b in pairs:
            if min(a.shape[:2]) < crop or min(b.shape[:2]) < crop:
                raise InvalidInputError(f"PairSampler: image {a.shape[:2]} smaller than crop={crop}")
            if paired and a.shape != b.shape:
                raise InvalidInputError(f"PairSampler: paired images differ in shape {a.shape} vs {b.shape}")
        self.pairs, self.crop, self.paired = pairs, crop, paired

    def _crop(self, img: np.ndarray, rng: np.random.Generator, yx=None) -> tuple[np.ndarray, tuple]:
        c = self.crop
        if yx is None:
            yx = (int(rng.integers(0, img.shape[0] - c + 1)), int(rng.integers(0, img.shape[1] - c + 1)))
        return img[yx[0]:yx[0] + c, yx[1]:yx[1] + c], yx

    def batch(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two ``(n, 3, crop, crop)`` float tensors in [-1, 1]."""
        xa, xb = [], []
        for _ in range(n):
            a, b = self.pairs[int(rng.integers(len(self.pairs)))]
            ca, yx = self._crop(a, rng)
            if not self.paired:
                b = self.pairs[int(rng.integers(len(self.pairs)))][1]
                yx = None
            cb, _ = self._crop(b, rng, yx)
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            ca, cb = np.rot90(ca, k), np.rot90(cb, k)
            if flip:
                ca, cb = ca[:, ::-1], cb[:, ::-1]
            xa.append(ca)
            xb.append(cb)
        return _tensor(np.stack(xa)), _tensor(np.stack(xb))


def _tensor(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
class GANLoss(nn.Module):
    """The reference's GANLoss: ``vanilla`` (BCE with logits) or ``lsgan`` (MSE) against 1 / 0."""

    def __init__(self, mode: str = "vanilla") -> None:
        super().__init__()
        self.loss = nn.BCEWithLogitsLoss() if mode == "vanilla" else nn.MSELoss()

    def forward(self, pred: torch.Tensor, real: bool) -> torch.Tensor:
        return self.loss(pred, torch.full_like(pred, 1.0 if real else 0.0))


class ImagePool:
    """History of generated images (Shrivastava et al.): half the time return an older one."""

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size, self.images = size, []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif self.rng.random() > 0.5:
                i = self.rng.randrange(self.size)
                out.append(self.images[i].clone())
                self.images[i] = img
            else:
                out.append(img)
        return torch.cat(out, 0)


class PooledNorm(nn.Module):
    """Instance norm whose statistics are pooled over the whole batch (``N, H, W``), no parameters.

    Training with it (``train_norm="pooled"``) matches what inference does with slide-level
    statistics (:func:`daskpath.translate.inference.slide_norm_stats` pools the statistics of
    many tissue tiles, then freezes them): the generator never learns to rely on per-crop
    statistics, which differ from slide statistics on small crops. It holds no parameters or
    buffers, so the state dict is the same as with ``InstanceNorm2d(affine=False)``.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps)


def pool_instance_norms(net: nn.Module) -> int:
    """Replace every ``InstanceNorm2d`` of ``net`` by :class:`PooledNorm` (in place); returns the count."""
    n = 0
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.InstanceNorm2d):
            parent_name, _, leaf = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, leaf, PooledNorm(m.eps))
            n += 1
    return n


_G3 = None


def _gauss3() -> torch.Tensor:
    global _G3
    if _G3 is None:
        t = torch.tensor([-1.0, 0.0, 1.0])
        g = torch.exp(-t**2 / 2.0)
        g = g / g.sum()
        _G3 = (g[:, None] * g[None, :]).view(1, 1, 3, 3)
    return _G3


def gaussian_pyramid(x: torch.Tensor, levels: int = 4) -> list[torch.Tensor]:
    """``levels`` scales of ``x`` (N, C, H, W); each octave: 3x3 Gaussian (sigma 1) x 4, then /2."""
    k = _gauss3().to(x.device, x.dtype).repeat(x.shape[1], 1, 1, 1)
    out = [x]
    for _ in range(levels - 1):
        y = out[-1]
        for _ in range(4):
            y = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])
        out.append(y[:, :, ::2, ::2])
    return out


def pyramid_l1(fake: torch.Tensor, real: torch.Tensor, levels: int = 4) -> torch.Tensor:
    """Sum over pyramid scales of the mean absolute difference (BCI's multi-scale L1)."""
    return sum(F.l1_loss(a, b) for a, b in zip(gaussian_pyramid(fake, levels), gaussian_pyramid(real, levels)))


# --------------------------------------------------------------------------------------------
# training loop
# --------------------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _lr_lambda(cfg: TrainConfig):
    def f(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - cfg.epochs) / float(cfg.epochs_decay + 1)

    return f


def _init_generator(net: nn.Module, source: str) -> None:
    """Start ``net`` from the weights of ``source`` (folder or ``.pth``), norms may differ.

    Every tensor whose name and shape match is copied. Going from an instance-norm generator
    (convs with bias) to a batch-norm one (convs before a norm without bias) the dropped bias is
    the one a following norm subtracts again, so a batch-norm net in train mode with the
    initial affine (1, 0) computes what the source computes with batch-pooled statistics
    (``train_norm="pooled"``). Batch-norm parameters and running statistics keep their initial
    values. Raises if a convolution weight has no counterpart.
    """
    from daskpath.translate.checkpoints import _resolve

    p, folder = _resolve(source)
    if folder is not None:
        spec_path = folder / SPEC_NAME
        name = "latest_net_G.pth"
        if spec_path.is_file():
            name = json.loads(spec_path.read_text()).get("weights") or name
        p = folder / name
    sd = torch.load(p, map_location="cpu", weights_only=True)
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = net.state_dict()
    copied = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k.endswith(".weight") and own[k].dim() == 4 and k not in copied]
    if missing:
        raise ModelError(f"init_from {source}: no weights for {missing[:3]}; "
                         "the architectures (arch, ngf) must match")
    net.load_state_dict(copied, strict=False)


def _save(net: nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    os.replace(tmp, path)


def _plot(csv_path: Path, png_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in rows[0] if k not in ("epoch", "step", "lr", "seconds")]
    steps = np.array([int(r["step"]) for r in rows])
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 1.8 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        v = np.array([float(r[k]) for r in rows])
        ax.plot(steps, v, lw=0.5, alpha=0.4)
        w = max(1, len(v) // 50)
        if len(v) >= w:
            ax.plot(steps[w - 1:], np.convolve(v, np.ones(w) / w, mode="valid"), lw=1.2)
        ax.set_ylabel(k, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png_path)


@dataclass(frozen=True)
class Precision:
    """Mixed precision of a training run: autocast ``dtype`` on ``device_type`` (``None``: off).

    ``float16`` runs with a :class:`torch.amp.GradScaler` (dynamic loss scaling); ``bfloat16``
    has float32's range and needs none. When off, :meth:`autocast` is a null context and the
    scaler a pass-through, so the training step is the same code either way.
    """

    device_type: str = "cpu"
    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def resolve_precision(device: str | torch.device, amp: bool | None, amp_dtype: str = "float16") -> Precision:
    """The :class:`Precision` of ``--amp`` on ``device``: ``None`` means on for CUDA, off otherwise.

    Raises
    ------
    ConfigError
        ``amp=True`` on a device other than CUDA, or an unknown ``amp_dtype``.
    """
    dev = torch.device(device)
    if amp_dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"train: amp_dtype={amp_dtype!r} must be float16 or bfloat16")
    if amp and dev.type != "cuda":
        raise ConfigError(f"train: --amp needs --device cuda (mixed precision is not used on {dev.type}); "
                          "drop --amp or pass --device cuda")
    on = dev.type == "cuda" if amp is None else bool(amp)
    return Precision(dev.type, getattr(torch, amp_dtype) if on else None)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` launch (``rank 0 of 1`` when not launched so)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"train: environment variable {name}={os.environ[name]!r} is not an integer; "
                          "launch with torchrun") from None


def init_distributed(device: str = "cpu") -> tuple[DistInfo, str]:
    """Join the process group of a ``torchrun`` launch (``WORLD_SIZE > 1``); idempotent.

    Backend NCCL for a CUDA device, Gloo otherwise. Returns this process's :class:`DistInfo`
    and its device: ``cuda:<LOCAL_RANK>`` under ``torchrun`` with a CUDA device.
    """
    info = DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0),
                    _env_int("LOCAL_WORLD_SIZE", 1))
    if not info.distributed:
        return info, device
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return info, device


def _raw(net: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``net`` itself)."""
    return getattr(net, "module", net)


def _to_unit(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 (from a loader) -> ``(N, 3, H, W)`` float in [-1, 1] on ``dev``."""
    x = x.to(dev, non_blocking=True).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


def train(
    cfg: TrainConfig,
    pairs,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
    log_samples: bool = False,
) -> Path:
    """Train a generator on ``pairs`` and write a model folder + logs into ``out_dir``.

    Parameters
    ----------
    cfg : TrainConfig
        Mode, architecture, schedule, loss weights, loader workers, mixed precision.
    pairs : list of (A, B) uint8 arrays, or a :class:`~daskpath.translate.data.CropDataset`
        Aligned pairs held in memory (cropped by :class:`PairSampler`), or a dataset read
        through a ``DataLoader`` (e.g. :class:`~daskpath.translate.data.TileStream`, which
        reads crops from the slides on demand). CycleGAN samples A and B independently.
    out_dir : path
        Checkpoints, ``daskpath.json``, ``loss_log.csv`` / ``.png``.
    resume : bool
        Continue from ``out_dir/train_state.pt`` and the latest checkpoints.
    device : str
        ``"cpu"``, ``"cuda"``; under ``torchrun`` each process takes ``cuda:<LOCAL_RANK>``.
    log_samples : bool
        With a dataset: every process writes ``samples_rank<r>.csv`` (epoch, index and the
        tile/crop of each sample it trained on).

    Returns
    -------
    pathlib.Path
        ``out_dir`` (a model folder :func:`~daskpath.translate.load_generator` reads).
    """
    from tqdm.auto import tqdm

    from daskpath.translate.data import CropDataset, default_loader_workers, make_loader

    dist_info, device = init_distributed(device)
    is_main = dist_info.is_main
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_all(cfg.seed)
    dev = torch.device(device)
    prec = resolve_precision(dev, cfg.amp, cfg.amp_dtype)
    streaming = isinstance(pairs, CropDataset)
    spec = cfg.spec()
    cyc = cfg.mode == "cyclegan"
    if streaming and pairs.paired == cyc:
        raise ConfigError(f"train: the dataset is {'paired' if pairs.paired else 'unpaired'} but mode {cfg.mode} "
                          f"needs {'unpaired' if cyc else 'paired'} crops; build it with paired={not cyc}")
    if streaming and pairs.crop != cfg.crop:
        raise ConfigError(f"train: the dataset crops {pairs.crop} px but crop={cfg.crop}; build it with crop={cfg.crop}")
    nets: dict[str, nn.Module] = {"G_A" if cyc else "G": init_weights(build_generator(spec))}
    if cyc:
        nets["G_B"] = init_weights(build_generator(spec))
        nets["D_A"] = init_weights(define_D(3, cfg.ndf, cfg.n_layers_d, "batch" if cfg.norm == "batch" else "instance"))
        nets["D_B"] = init_weights(define_D(3, cfg.ndf, cfg.n_layers_d, "batch" if cfg.norm == "batch" else "instance"))
    else:
        nets["D"] = init_weights(define_D(6, cfg.ndf, cfg.n_layers_d, "batch" if cfg.norm == "batch" else "instance"))
    if cfg.init_from and not resume:
        _init_generator(nets["G_A" if cyc else "G"], cfg.init_from)
    if cfg.train_norm == "pooled":
        for k in [k for k in nets if k.startswith("G")]:
            pool_instance_norms(nets[k])
    for n in nets.values():
        n.to(dev).train()
    gnames = [k for k in nets if k.startswith("G")]
    dnames = [k for k in nets if k.startswith("D")]
    opt_g = torch.optim.Adam([p for k in gnames for p in nets[k].parameters()], lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam([p for k in dnames for p in nets[k].parameters()], lr=cfg.lr, betas=(cfg.beta1, 0.999))
    sch = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(cfg)) for o in (opt_g, opt_d)]
    scaler = prec.scaler()
    start = 0
    state_path = out / "train_state.pt"
    if resume:
        if not state_path.is_file():
            raise InvalidInputError(f"{state_path}: nothing to resume from; run without --resume first")
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        for k, n in nets.items():
            n.load_state_dict(torch.load(out / f"latest_net_{k}.pth", map_location="cpu", weights_only=True))
        opt_g.load_state_dict(st["opt_g"])
        opt_d.load_state_dict(st["opt_d"])
        for s, sd in zip(sch, st["sched"]):
            s.load_state_dict(sd)
        if "scaler" in st and scaler.is_enabled():
            scaler.load_state_dict(st["scaler"])
        start = int(st["epoch"])
        # the schedule follows this run's epochs/epochs_decay (a resume may extend training)
        for o in (opt_g, opt_d):
            for g in o.param_groups:
                g["lr"] = cfg.lr * _lr_lambda(cfg)(start)
    if dist_info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        nets = {k: DDP(n, device_ids=ids) for k, n in nets.items()}  # rank 0's weights broadcast
    total = cfg.epochs + cfg.epochs_decay
    if streaming:
        workers = (cfg.loader_workers if cfg.loader_workers is not None
                   else default_loader_workers(dist_info.local_world_size))
        loader, esampler = make_loader(pairs, cfg.batch_size, cfg.steps_per_epoch, workers=workers,
                                       rank=dist_info.rank, world_size=dist_info.world_size,
                                       pin_memory=dev.type == "cuda", seed=cfg.seed)
    else:
        sampler = PairSampler(pairs, cfg.crop, paired=not cyc)
    gan = GANLoss(cfg.gan_mode).to(dev)
    pools = (ImagePool(cfg.pool_size, cfg.seed), ImagePool(cfg.pool_size, cfg.seed + 1)) if cyc else None
    csv_path = out / "loss_log.csv"
    if is_main and not resume and csv_path.exists():
        csv_path.unlink()
    spec_full = replace(spec, weights="latest_net_G_A.pth" if cyc else "latest_net_G.pth",
                        extra={"training": {**asdict(cfg), "n_pairs": len(pairs),
                                            "world_size": dist_info.world_size, "streamed": streaming,
                                            "precision": str(prec.dtype or "float32")}})
    t0 = time.time()
    from daskpath.runner import _interactive

    # a bar on a terminal; in a log file (no control characters) one line per epoch instead
    bar = tqdm(total=(total - start) * cfg.steps_per_epoch, desc=f"train {cfg.mode}",
               disable=not (is_main and progress and _interactive()))
    writer_f = open(csv_path, "a", newline="") if is_main else None
    writer = None
    samples_f = None
    if streaming and log_samples:
        samples_path = out / f"samples_rank{dist_info.rank}.csv"
        samples_f = open(samples_path, "a" if resume else "w", newline="")
        samples_w = csv.writer(samples_f)
        if samples_f.tell() == 0:
            samples_w.writerow(["rank", "epoch", "index", "pair", "slide", "y0", "x0", "y", "x"])
    step_fn = _step_cyclegan if cyc else _step_pix2pix
    try:
        for epoch in range(start, total):
            if streaming:
                esampler.set_epoch(epoch)
                batches = iter(loader)
            else:  # same data order on resume; each rank its own draws
                rng = np.random.default_rng([cfg.seed, epoch] if not dist_info.distributed
                                            else [cfg.seed, epoch, dist_info.rank])
            torch.manual_seed(cfg.seed * 100003 + epoch)
            for step in range(cfg.steps_per_epoch):
                if streaming:
                    a8, b8, keys = next(batches)
                    a, b = _to_unit(a8, dev), _to_unit(b8, dev)
                    if samples_f is not None:
                        for k in keys.tolist():
                            slide, y0, x0 = (pairs.tile(k[2]) if hasattr(pairs, "tile") else ("", 0, 0))
                            samples_w.writerow([dist_info.rank, k[0], k[1], k[2], slide, y0, x0, k[3], k[4]])
                else:
                    a, b = sampler.batch(cfg.batch_size, rng)
                    a, b = a.to(dev), b.to(dev)
                losses = step_fn(cfg, nets, opt_g, opt_d, gan, a, b, pools, prec, scaler)
                if writer_f is not None:
                    row = {"epoch": epoch + 1, "step": epoch * cfg.steps_per_epoch + step + 1,
                           "lr": opt_g.param_groups[0]["lr"], **losses, "seconds": round(time.time() - t0, 2)}
                    if writer is None:
                        writer = csv.DictWriter(writer_f, fieldnames=list(row))
                        if writer_f.tell() == 0:
                            writer.writeheader()
                    writer.writerow(row)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k.startswith("G")})
            for s in sch:
                s.step()
            if is_main:
                for k, n in nets.items():
                    _save(_raw(n), out / f"latest_net_{k}.pth")
                    if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == total:
                        _save(_raw(n), out / f"{epoch + 1}_net_{k}.pth")
                tmp = state_path.with_name("train_state.tmp")
                st = {"epoch": epoch + 1, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                      "sched": [s.state_dict() for s in sch]}
                if scaler.is_enabled():
                    st["scaler"] = scaler.state_dict()
                torch.save(st, tmp)
                os.replace(tmp, state_path)
                writer_f.flush()
            if samples_f is not None:
                samples_f.flush()
            if is_main and progress and bar.disable:
                log.info("train %s: epoch %d of %d done (%.0f s)", cfg.mode, epoch + 1, total,
                         time.time() - t0)
    finally:
        for f in (writer_f, samples_f):
            if f is not None:
                f.close()
        bar.close()
        if streaming:
            del loader  # persistent workers end with the loader
    if dist_info.distributed:
        import torch.distributed as dist

        dist.barrier()  # every rank done before the model folder is declared complete
    if is_main:
        tmp = out / (SPEC_NAME + ".tmp")
        tmp.write_text(json.dumps(spec_full.to_json(), indent=2) + "\n")
        os.replace(tmp, out / SPEC_NAME)
        _plot(csv_path, out / "loss_log.png")
    return out


def _step_pix2pix(cfg, nets, opt_g, opt_d, gan, a, b, _pools, prec=Precision(), scaler=None) -> dict[str, float]:
    g, d = nets["G"], nets["D"]
    scaler = scaler if scaler is not None else prec.scaler()
    with prec.autocast():
        fake = g(a)
    # D: real pairs vs fake pairs
    for p in d.parameters():
        p.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    with prec.autocast():
        loss_d_fake = gan(d(torch.cat([a, fake.detach()], 1)), False)
        loss_d_real = gan(d(torch.cat([a, b], 1)), True)
        loss_d = 0.5 * (loss_d_fake + loss_d_real)
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)
    # G: fool D + L1 (pix2pix) or multi-scale L1 (pyramid); D frozen and called outside DDP
    for p in d.parameters():
        p.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    with prec.autocast():
        loss_gan = gan(_raw(d)(torch.cat([a, fake], 1)), True) * cfg.lambda_gan
        l1 = F.l1_loss(fake.float(), b)
        loss_l1 = l1 * (cfg.lambda_pyramid if cfg.mode == "pyramid" else cfg.lambda_l1)
        out = {"G_GAN": loss_gan.item(), "G_L1": loss_l1.item()}
        loss_g = loss_gan + loss_l1
        if cfg.mode == "pyramid":  # the three coarser scales, same weight as the full one
            loss_p = (pyramid_l1(fake.float(), b) - l1) * cfg.lambda_pyramid
            loss_g = loss_g + loss_p
            out["G_pyramid"] = loss_p.item()
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()
    out.update(D_real=loss_d_real.item(), D_fake=loss_d_fake.item())
    return out


def _step_cyclegan(cfg, nets, opt_g, opt_d, gan, a, b, pools, prec=Precision(), scaler=None) -> dict[str, float]:
    ga, gb, da_, db_ = nets["G_A"], nets["G_B"], nets["D_A"], nets["D_B"]
    scaler = scaler if scaler is not None else prec.scaler()
    for p in [*da_.parameters(), *db_.parameters()]:
        p.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    lam, lid = cfg.lambda_cycle, cfg.lambda_identity
    with prec.autocast():
        fake_b, fake_a = ga(a), gb(b)
        rec_a, rec_b = gb(fake_b), ga(fake_a)
        loss_idt_a = F.l1_loss(ga(b), b) * lam * lid if lid > 0 else torch.zeros((), device=a.device)
        loss_idt_b = F.l1_loss(gb(a), a) * lam * lid if lid > 0 else torch.zeros((), device=a.device)
        loss_g_a = gan(_raw(da_)(fake_b), True) * cfg.lambda_gan
        loss_g_b = gan(_raw(db_)(fake_a), True) * cfg.lambda_gan
        loss_cyc_a = F.l1_loss(rec_a, a) * lam
        loss_cyc_b = F.l1_loss(rec_b, b) * lam
        loss_g = loss_g_a + loss_g_b + loss_cyc_a + loss_cyc_b + loss_idt_a + loss_idt_b
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    for p in [*da_.parameters(), *db_.parameters()]:
        p.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    fb, fa = pools[0].query(fake_b), pools[1].query(fake_a)
    with prec.autocast():
        loss_d_a = 0.5 * (gan(da_(b), True) + gan(da_(fb), False))
        loss_d_b = 0.5 * (gan(db_(a), True) + gan(db_(fa), False))
        loss_d = loss_d_a + loss_d_b
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)
    scaler.update()
    return {"G_A": loss_g_a.item(), "G_B": loss_g_b.item(), "G_cycle_A": loss_cyc_a.item(),
            "G_cycle_B": loss_cyc_b.item(), "G_idt_A": loss_idt_a.item(), "G_idt_B": loss_idt_b.item(),
            "D_A": loss_d_a.item(), "D_B": loss_d_b.item()}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m daskpath.translate.train",
                                description="Train an H&E -> IHC generator (pix2pix, pyramid, CycleGAN).")
    p.add_argument("out_dir", help="output model folder (checkpoints, daskpath.json, loss_log.csv/png)")
    d = TrainConfig()
    for k, v in asdict(d).items():
        if k == "extra":
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=v)
        elif k == "gan_mode":
            p.add_argument(flag, choices=["vanilla", "lsgan"], default=None)
        elif k == "train_norm":
            p.add_argument(flag, choices=["instance", "pooled"], default=v,
                           help="pooled: batch-pooled statistics in G's instance norms (matches "
                                "slide-level statistics at inference)")
        elif k == "threads":
            p.add_argument(flag, type=int, default=None)
        elif k == "loader_workers":
            p.add_argument(flag, type=int, default=None, metavar="N",
                           help="DataLoader worker processes reading a streamed dataset (default "
                                "min(4, cores - 1), per process under torchrun; 0: read in the "
                                "training process)")
        elif k == "amp":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help="mixed precision (autocast + GradScaler); default on with --device "
                                "cuda, off on CPU (where --amp is refused)")
        elif k == "amp_dtype":
            p.add_argument(flag, choices=["float16", "bfloat16"], default=v,
                           help="autocast dtype with --amp (bfloat16: no loss scaling)")
        else:
            p.add_argument(flag, type=type(v), default=v)
    p.add_argument("--data", default="phantom",
                   help="'phantom' (rendered phantom regions) or a folder with trainA/ trainB/ (or aligned train/)")
    g = p.add_argument_group("train on a finished run's kept tiles (slide-level train/test split)")
    g.add_argument("--config", default=None, metavar="RUN.yaml",
                   help="the run's config: its slides manifest and output_dir (tiles.parquet)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of --config (repeatable)")
    g.add_argument("--from-run", default=None, metavar="OUTPUT_DIR",
                   help="a finished run's output_dir (with --slides, or instead of --config's output_dir)")
    g.add_argument("--slides", default=None, metavar="MANIFEST.csv", help="the run's manifest (with --from-run)")
    g.add_argument("--test-fraction", type=float, default=0.25,
                   help="share of slides held out for evaluation (whole slides, never split)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the slide-level split")
    g.add_argument("--export-dir", default=None,
                   help="where tile pairs are written (default OUT_DIR/tile_pairs)")
    g.add_argument("--layout", choices=["unaligned", "aligned"], default="unaligned",
                   help="trainA/trainB/testA/testB (default) or pix2pix's side-by-side train/ test/")
    g.add_argument("--max-tiles-per-slide", type=int, default=None)
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation on the test split")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read training crops from the run's slides on demand (default; memory flat "
                        "in the number of tiles); --no-stream: train on the exported PNGs held in memory")
    g.add_argument("--log-samples", action="store_true",
                   help="with --stream: each process writes OUT_DIR/samples_rank<r>.csv (the "
                        "epoch, index, tile and crop of every sample it trained on)")
    g.add_argument("--force", action="store_true",
                   help="export into a non-empty folder daskpath did not make (only its own "
                        "names there are replaced)")
    p.add_argument("--phantom-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--regions", type=int, default=4, help="phantom regions per seed")
    p.add_argument("--region", type=int, default=512, help="phantom region side (px)")
    p.add_argument("--phantom-size", type=int, nargs=2, default=[4096, 4096])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def _rank0_first(dist_info: DistInfo, fn):
    """Run ``fn`` on rank 0 only, then let every rank go on (or fail with rank 0's message)."""
    if not dist_info.distributed:
        return fn()
    import torch.distributed as dist

    result, msg, err = None, [None], None
    if dist_info.is_main:
        try:
            result = fn()
        except Exception as e:  # every rank must hear of it, or the others wait forever
            msg, err = [str(e) if isinstance(e, DaskpathError) else f"rank 0 failed: {e!r}"], e
    dist.broadcast_object_list(msg, src=0)
    if err is not None:
        raise err
    if msg[0] is not None:
        raise DaskpathError(msg[0])
    return result


def _run_pairs(args: argparse.Namespace, cfg: TrainConfig, dist_info: DistInfo = DistInfo()) -> tuple:
    """Export a run's kept tiles (slide-level split; rank 0) and build the train split's data:
    a :class:`~daskpath.translate.data.TileStream` (``--stream``, default) or the exported PNGs."""
    from daskpath.translate.tilepairs import export_tile_pairs, run_inputs

    if args.data != "phantom":
        raise ConfigError("train: use either --data or --config/--from-run, not both")
    run = run_inputs(args.config, args.from_run, args.slides, args.set)
    export = Path(args.export_dir) if args.export_dir else Path(args.out_dir) / "tile_pairs"
    _rank0_first(dist_info, lambda: export_tile_pairs(
        run, export, test_fraction=args.test_fraction, seed=args.split_seed, layout=args.layout,
        max_tiles_per_slide=args.max_tiles_per_slide, force=args.force))
    import pandas as pd

    table = pd.read_csv(export / "pairs.csv")
    train_rows = table[table["split"] == "train"]
    small = train_rows[(train_rows["height"] < cfg.crop) | (train_rows["width"] < cfg.crop)]
    stream = args.stream is not False
    if stream:
        from daskpath.translate.data import run_tile_stream

        if len(small) == len(train_rows):
            raise ConfigError(f"train: every train tile of {export} is smaller than --crop {cfg.crop}; lower --crop")
        pairs = run_tile_stream(table, run.manifest, crop=cfg.crop, seed=cfg.seed, paired=cfg.mode != "cyclegan",
                                split="train", chunk_size=run.chunk_size, cache_dir=run.cache_dir)
    else:
        pairs = [p for p in folder_pairs(export, "train") if min(p[0].shape[:2]) >= cfg.crop]
        if not pairs:
            raise ConfigError(f"train: every train tile of {export} is smaller than --crop {cfg.crop}; lower --crop")
    if len(small) and dist_info.is_main:
        log.warning("train: %d train tile(s) smaller than crop %d left out", len(small), cfg.crop)
    info = json.loads((export / "split.json").read_text())
    extra = {"data": "run", "run_dir": info["run_dir"], "manifest": info["manifest"], "export_dir": str(export),
             "test_fraction": args.test_fraction, "split_seed": args.split_seed, "layout": args.layout,
             "stream": stream, "train_slides": info["train_slides"], "test_slides": info["test_slides"],
             "n_train_tiles": len(pairs), "n_test_tiles": info["n_test_tiles"]}
    return pairs, extra, export


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daskpath.translate.train`` / ``daskpath train translator``; returns the exit status.

    Under ``torchrun`` every process runs this; rank 0 alone exports, writes and evaluates.
    """
    args = build_parser().parse_args(argv)
    created = False
    try:
        kw = {k: getattr(args, k) for k in asdict(TrainConfig()) if k != "extra"}
        cfg = TrainConfig(**kw)
        resolve_precision(args.device, cfg.amp, cfg.amp_dtype)  # refuse --amp on CPU before any work
        cmd = "python -m daskpath.translate.train " + " ".join(sys.argv[1:] if argv is None else list(argv))
        import torch.distributed as dist

        was = dist.is_available() and dist.is_initialized()
        dist_info, device = init_distributed(args.device)
        created = dist_info.distributed and not was
        export = None
        if args.config or args.from_run:
            pairs, extra, export = _run_pairs(args, cfg, dist_info)
        else:
            if args.stream:
                raise ConfigError("train: --stream reads a run's slides; use it with --config or --from-run")
            if args.data == "phantom":
                pairs = phantom_pairs(args.phantom_seeds, args.regions, args.region, tuple(args.phantom_size),
                                      rng_seed=args.seed)
                extra = {"data": "phantom", "phantom_seeds": args.phantom_seeds, "regions": args.regions,
                         "region": args.region, "phantom_size": args.phantom_size}
            else:
                pairs = folder_pairs(args.data)
                extra = {"data": args.data}
        if args.log_samples and not (export is not None and extra.get("stream")):
            raise ConfigError("train: --log-samples logs a streamed dataset; use it with --from-run/--config")
        cfg.extra = {"command": cmd, **extra}
        t = time.time()
        out = train(cfg, pairs, args.out_dir, resume=args.resume, progress=not args.no_progress,
                    device=device, log_samples=args.log_samples)
        if dist_info.is_main:
            ranks = f" x {dist_info.world_size} processes" if dist_info.distributed else ""
            print(f"trained {cfg.mode} {cfg.arch} ngf={cfg.ngf} on {len(pairs)} pair(s){ranks} in "
                  f"{time.time() - t:.0f} s -> {out}")
        if export is not None and not args.no_eval and dist_info.is_main:
            from daskpath.outputs import write_json
            from daskpath.translate.evaluate import evaluate_pairs

            res = evaluate_pairs(out, export, "test")
            write_json(res, Path(out) / "evaluation.json")
            m = res["tiles"]
            print(f"test split ({len(res['slides_scored'])} held-out slide(s), {res['n_tiles']} tiles): "
                  f"3-class accuracy {m.get('acc3', float('nan')):.3f}, MAE {m.get('mae', float('nan')):.4f}, "
                  f"SSIM {res['ssim']:.3f} -> {Path(out) / 'evaluation.json'}")
    except DaskpathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
