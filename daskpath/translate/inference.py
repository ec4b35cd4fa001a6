"""Seam-free, batched H&E -> virtual IHC translation over dask chunks.

Tiling and halo rule
--------------------
Every dask chunk is read with a halo of ``halo`` pixels (:func:`~daskpath._halo.overlap_2d`,
the halo rule of :mod:`daskpath._halo`: no halo beyond the slide edge, as in a whole-image
run). Inside the halo'd block, windows of ``tile`` pixels step by ``core = tile - 2 * halo``;
each window contributes only its core (it is **center-cropped** by ``halo`` on every side that
is not a block edge), or, with ``blend="feather"``, all of it with weights that ramp linearly
to zero over the ``halo`` px next to its inner edges. Windows are stacked ``batch_size`` at a
time into one forward pass.

With ``halo`` at least half the generator's receptive field (88 px for ``resnet_9blocks``,
64 for ``resnet_6blocks``; :attr:`GeneratorSpec.default_halo`) each kept output pixel sees all of
its context, so for a network without per-tile statistics the tiled result equals a whole-image
forward pass up to float rounding, provided window origins fall on the network's stride grid:
``tile``, ``halo`` and the chunk sizes are multiples of 4 for ResNets (the input is rechunked to
a multiple of 4 when it is not). U-Nets see their whole window, so their tiles never equal a
whole-image pass; feathered blending hides the differences.

Normalisation statistics
------------------------
Instance norm (and batch norm in train mode, which the reference test script uses unless
``--eval``) normalises every window with its own statistics, so colours jump between windows.
``norm_stats="slide"`` (the default for instance norm) replaces those layers with
:class:`FrozenNorm` layers holding slide-level per-channel statistics measured once, by
:func:`slide_norm_stats`, on a sample of tissue tiles of the slide (one pooled pass: each layer
normalises with the statistics of all sampled tiles together, as if they were one image).
``"tile"`` keeps per-window statistics (the reference behaviour), ``"running"`` uses batch norm's
running statistics (eval mode, the default for batch norm). :func:`seam_energy` measures the
result: mean gradient magnitude across window borders over the same in the interior (1 = no seam).

Workers
-------
The graph holds a small picklable :class:`TranslatorRef` (model path or shipped name, spec and
the frozen statistics as numbers), never a network. Each worker process builds the network once
through :func:`get_generator`, a cache guarded by a lock. On CUDA the network runs in
``channels_last`` with fp16 autocast (``amp="bf16"`` for bfloat16); tasks can be annotated with
``resources={"GPU": 1}`` so that dask-cuda workers take them.
On CPU each task sets torch's intra-op threads to the cores divided by the dask worker's
threads (``translate(torch_threads=...)`` or ``DASKPATH_TORCH_THREADS`` override it), so dask
threads and torch threads do not oversubscribe the cores.

Window layout
-------------
Windows are at most ``tile`` px; along each axis of a block the fewest windows that cover it are
shrunk evenly (:func:`window_layout`), so a block just above one window costs two half-size
windows, not two full ones. ``tile=None`` (the default) picks :func:`auto_tile`: for ResNets on
CPU one window per halo'd chunk (up to :data:`CPU_MAX_TILE`), which recomputes the least
overlap (the cost per pixel does not grow with the window: 0.27-0.29 s/MP single-threaded from
576 to 2176 px windows); on GPUs and for U-Nets the spec's ``tile``, batched.

CPU fast path
-------------
With folded norms (``norm_stats`` "slide" or "running") a ResNet generator on CPU runs as
:class:`~daskpath.translate.fast.FastResnet` (``translate(optimize=True)``, the default): NNPACK
for the two 7x7 convolutions with exact reflection borders, channels_last residual blocks,
input normalisation folded into the first convolution; the same output up to float rounding
(at most 1 uint8 level). ``optimize=False`` runs the module tree as loaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from daskpath._halo import align_chunks, halo_depth, overlap_2d, read_with_halo
from daskpath._process_cache import cached
from daskpath.errors import InvalidInputError, ModelError
from daskpath.translate.checkpoints import GeneratorSpec, load_generator, read_spec, _resolve

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da
    from torch import nn

__all__ = [
    "NormStats",
    "TranslatorRef",
    "FrozenNorm",
    "resolve_translator",
    "get_generator",
    "slide_norm_stats",
    "freeze_norm",
    "fold_norm",
    "sample_tiles",
    "run_generator",
    "translate_array",
    "translate",
    "RegionTranslator",
    "translator",
    "window_starts",
    "window_size",
    "window_layout",
    "auto_tile",
    "seam_positions",
    "seam_energy",
]

Blend = Literal["crop", "feather"]
NormMode = Literal["auto", "slide", "tile", "running"]


# --------------------------------------------------------------------------------------------
# references, statistics and the per-process cache
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormStats:
    """Frozen per-layer statistics: ``{module name: (mean tuple, var tuple)}`` plus a token."""

    layers: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...]
    token: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, tuple[np.ndarray, np.ndarray]]) -> NormStats:
        layers = tuple((k, tuple(float(v) for v in m), tuple(float(v) for v in s))
                       for k, (m, s) in sorted(d.items()))
        token = hashlib.sha1(repr(layers).encode()).hexdigest()[:16]
        return cls(layers, token)


@dataclass(frozen=True)
class TranslatorRef:
    """What a task needs to rebuild a generator: model (name or path), spec, norm handling."""

    model: str
    spec: GeneratorSpec
    norm: Literal["slide", "tile", "running"] = "running"
    stats: NormStats | None = field(default=None, repr=False)
    optimize: bool = True

    @property
    def key(self) -> tuple:
        p = Path(self.model)
        mtime = p.stat().st_mtime_ns if p.exists() else 0
        return (self.model, mtime, self.spec, self.norm, self.stats.token if self.stats else None,
                self.optimize)


def resolve_translator(model: str | os.PathLike[str] | TranslatorRef,
                       spec: GeneratorSpec | None = None) -> TranslatorRef:
    """A :class:`TranslatorRef` for a shipped name, folder or ``.pth`` file (spec read, not weights)."""
    if isinstance(model, TranslatorRef):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"translate model must be a name or path, got {type(model).__name__}; "
                         "save the network with daskpath.translate.save_generator and pass the folder")
    p, folder = _resolve(model)
    if spec is None:
        spec = read_spec(folder if folder is not None else p.parent)
    if spec is None:  # bare checkpoint: infer the architecture from the keys (loads once here)
        spec = load_generator(p)[1]
    return TranslatorRef(str(p), spec)


_LOCK = threading.Lock()


def _torch_threads() -> None:
    n = os.environ.get("DASKPATH_TORCH_THREADS")
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def _task_threads(requested: int | None = None) -> int | None:
    """Intra-op torch threads for a translation task, so dask threads x torch threads <= cores.

    ``requested`` (``translate(torch_threads=...)``) wins, then ``DASKPATH_TORCH_THREADS``;
    otherwise, inside a dask worker thread (threaded scheduler or a distributed worker), the
    cores are shared out among the dask threads on this machine (``cores // threads``, at least
    1): for a distributed worker, the threads of every worker process on its host (asked of
    the scheduler once per process), so 8 workers x 2 threads on 16 cores run 1 torch thread
    per task, not 8. In the main thread (``scheduler="sync"``) torch's setting is left alone
    (``None``).
    """
    if requested:
        return max(1, int(requested))
    env = os.environ.get("DASKPATH_TORCH_THREADS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    nt = None
    try:
        from distributed import get_worker

        worker = get_worker()
    except Exception:  # not in a distributed worker (or no distributed installed)
        worker = None
    if worker is not None:
        nt = _host_threads(worker)
    if nt is None:
        if threading.current_thread() is threading.main_thread():
            return None
        import dask

        nt = int(dask.config.get("num_workers", None) or cores)
    return max(1, cores // max(nt, 1))


_HOST_THREADS: dict[str, int] = {}


def _host_threads(worker: Any) -> int:
    """Dask threads of all worker processes on ``worker``'s host (cached per worker; own count on error)."""
    own = int(worker.state.nthreads)
    n = _HOST_THREADS.get(worker.address)
    if n is not None:
        return n
    try:
        from distributed import get_client

        info = get_client().scheduler_info(n_workers=-1)["workers"]
        host = info[worker.address]["host"]
        n = sum(int(w.get("nthreads", 0)) for w in info.values() if w.get("host") == host)
    except Exception:  # scheduler unreachable, older distributed: this worker's threads only
        n = own
    n = max(n, own)
    _HOST_THREADS[worker.address] = n
    return n


def _set_torch_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` once (process-wide), under the cache lock."""
    if not n:
        return
    import torch

    if torch.get_num_threads() != n:
        with _LOCK:
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)


def _device(device: str | None):
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_generator(ref: TranslatorRef, device: str | None = None):
    """The generator for ``ref`` on ``device``, built once per process (under a lock)."""
    dev = _device(device)
    return cached(("generator", *ref.key, str(dev)), lambda: _build_generator(ref, dev))


def _build_generator(ref: TranslatorRef, dev):
    """Load the generator of ``ref``, set its norms for inference and move it to ``dev``."""
    _torch_threads()
    net, _ = load_generator(ref.model, ref.spec, device="cpu", eval=ref.norm != "tile")
    if ref.norm == "slide":
        if ref.stats is None:
            raise ModelError(f"{ref.model}: norm 'slide' needs statistics; "
                             "use slide_norm_stats() or translate(norm_stats='slide')")
        freeze_norm(net, ref.stats)
        fold_norm(net)
    elif ref.norm == "running":
        fold_norm(net)
    elif ref.norm == "tile":
        _tile_norm_mode(net)
    net.to(dev)
    if dev.type == "cuda":
        import torch

        net = net.to(memory_format=torch.channels_last)
    elif ref.optimize and ref.norm != "tile":
        from daskpath.translate.fast import fast_generator, tune_malloc

        fast = fast_generator(net, ref.spec.input_mean, ref.spec.input_std)
        if fast is not None:
            tune_malloc()
            net = fast
    return net


def _tile_norm_mode(net: nn.Module) -> None:
    """Per-window statistics everywhere: batch norm in train mode (no running update), dropout off."""
    from torch import nn

    net.eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None


@functools.cache
def _frozen_norm_class():
    from torch import nn

    class FrozenNorm(nn.Module):
        """Per-channel ``(x - mean) / sqrt(var + eps) * weight + bias`` with fixed statistics.

        ``mode="collect"`` normalises with the statistics of the whole batch (pooled over
        ``N, H, W``) and accumulates them; ``mode="frozen"`` uses the accumulated ones.
        """

        def __init__(self, channels: int, eps: float, weight=None, bias=None) -> None:
            import torch

            super().__init__()
            self.eps = float(eps)
            self.register_buffer("mean", torch.zeros(channels))
            self.register_buffer("var", torch.ones(channels))
            self.weight = None if weight is None else nn.Parameter(weight.detach().clone(), requires_grad=False)
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
            self.mode = "frozen"
            self._n = 0

        def forward(self, x):
            import torch

            if self.mode == "collect":
                xf = x.float()
                m = xf.mean(dim=(0, 2, 3))
                v = xf.var(dim=(0, 2, 3), unbiased=False)
                n = self._n
                # running average of means and of E[x^2] over calibration batches
                ex2 = self.var + self.mean**2 if n else torch.zeros_like(m)
                mean = (self.mean * n + m) / (n + 1) if n else m
                ex2 = (ex2 * n + v + m**2) / (n + 1)
                self.mean.copy_(mean)
                self.var.copy_(ex2 - mean**2)
                self._n = n + 1
                mean_b, var_b = m, v
            else:
                mean_b, var_b = self.mean, self.var
            shape = (1, -1, 1, 1)
            scale = torch.rsqrt(var_b + self.eps)
            w = scale if self.weight is None else scale * self.weight
            b = -mean_b * w if self.bias is None else self.bias - mean_b * w
            return x * w.to(x.dtype).view(shape) + b.to(x.dtype).view(shape)

    return FrozenNorm


def FrozenNorm(*args, **kw):  # noqa: N802 - a class built lazily (torch is imported on use)
    """Build a frozen-statistics norm layer (see :func:`freeze_norm`)."""
    return _frozen_norm_class()(*args, **kw)


def _norm_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch import nn

    return [(n, m) for n, m in net.named_modules()
            if isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d)) or type(m).__name__ == "FrozenNorm"]


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, leaf, new)


def _to_frozen(net: nn.Module) -> list[nn.Module]:
    from torch import nn

    out = []
    for name, m in _norm_layers(net):
        if type(m).__name__ == "FrozenNorm":
            out.append(m)
            continue
        affine = isinstance(m, nn.BatchNorm2d) and m.affine or getattr(m, "affine", False)
        new = FrozenNorm(m.num_features, m.eps, m.weight if affine else None, m.bias if affine else None)
        new.to(next(net.parameters()).device)
        _replace(net, name, new)
        out.append(new)
    return out


def freeze_norm(net: nn.Module, stats: NormStats) -> nn.Module:
    """Replace every instance/batch norm layer of ``net`` by a :class:`FrozenNorm` with ``stats``."""
    import torch

    _to_frozen(net)
    layers = dict(_norm_layers(net))
    names = {name for name, _, _ in stats.layers}
    if names != set(layers):
        raise ModelError(f"norm statistics cover layers {sorted(names)[:3]}... but the network has "
                         f"{sorted(layers)[:3]}...; recompute them for this model")
    for name, mean, var in stats.layers:
        m = layers[name]
        m.mean.copy_(torch.tensor(mean))
        m.var.copy_(torch.tensor(var))
        m.mode = "frozen"
    return net


def fold_norm(net: nn.Module) -> nn.Module:
    """Fold eval-mode norms into the conv before them (``conv -> norm`` inside a Sequential).

    A :class:`FrozenNorm` or an eval-mode ``BatchNorm2d`` after a ``Conv2d`` /
    ``ConvTranspose2d`` is an affine map per output channel: it is merged into the conv's weight
    and bias and replaced by an identity, saving one pass over every activation.
    """
    import torch
    from torch import nn

    from daskpath.translate.networks import Identity

    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        kids = list(seq.named_children())
        for (_, conv), (name, norm) in zip(kids, kids[1:]):
            if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) or conv.groups != 1:
                continue
            if type(norm).__name__ == "FrozenNorm" and norm.mode == "frozen":
                mean, var, w, b = norm.mean, norm.var, norm.weight, norm.bias
            elif isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.running_mean is not None:
                mean, var, w, b = norm.running_mean, norm.running_var, norm.weight, norm.bias
            else:
                continue
            with torch.no_grad():
                scale = torch.rsqrt(var + norm.eps)
                if w is not None:
                    scale = scale * w
                shift = -mean * scale + (b if b is not None else 0.0)
                shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
                conv.weight.mul_(scale.view(shape))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
                new_bias = bias * scale + shift
                conv.bias = nn.Parameter(new_bias, requires_grad=False)
            setattr(seq, name, Identity())
    return net


def _to_tensor(batch: np.ndarray, spec: GeneratorSpec, device, channels_last: bool = False):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.input_mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.input_std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _to_uint8(y) -> np.ndarray:
    """The reference's ``tensor2im``: ``(y + 1) / 2 * 255``, truncated to uint8 (NHWC)."""
    y = y.float().clamp_(-1.0, 1.0).add_(1.0).mul_(127.5)
    return y.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


def run_generator(net: nn.Module, batch: np.ndarray, spec: GeneratorSpec, *,
                  device=None, amp: str | bool | None = None, raw: bool = False):
    """One forward pass on a ``(N, H, W, 3)`` uint8 batch; returns uint8 NHWC (or float in [-1, 1]).

    ``amp``: None (fp16 autocast on CUDA, off on CPU), False, ``"fp16"`` or ``"bf16"``.
    """
    import torch

    dev = next(net.parameters()).device if device is None else _device(device)
    mode = ("fp16" if dev.type == "cuda" else None) if amp is None or amp is True else amp
    if mode and mode not in ("fp16", "bf16"):
        raise InvalidInputError(f"amp={amp!r} must be None, False, 'fp16' or 'bf16'")
    if not mode and not raw and dev.type == "cpu" and type(net).__name__ == "FastResnet":
        with torch.inference_mode():
            return net.forward_uint8(batch)
    cl = dev.type == "cuda"
    x = _to_tensor(batch, spec, dev, channels_last=cl)
    ctx = (torch.autocast(dev.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16)
           if mode else contextlib.nullcontext())
    with torch.inference_mode(), ctx:
        y = net(x)
        if raw:
            return y.float().permute(0, 2, 3, 1).cpu().numpy()
        return _to_uint8(y)


def sample_tiles(image, n: int = 16, tile: int = 256, seed: int = 0, min_tissue: float = 0.25,
                 multiple: int = 4) -> np.ndarray:
    """``n`` random ``tile``-px windows of an RGB image (numpy or dask) with tissue, ``(n, t, t, 3)``.

    Window origins are multiples of ``multiple``; tissue is any pixel with a channel below 215.
    Windows with less than ``min_tissue`` tissue are skipped (unless too few qualify).
    """
    import dask
    import dask.array as da

    h, w = image.shape[:2]
    t = int(min(tile, h // multiple * multiple, w // multiple * multiple))
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, (h - t) // multiple + 1, size=4 * n) * multiple
    xs = rng.integers(0, (w - t) // multiple + 1, size=4 * n) * multiple
    wins = [image[y:y + t, x:x + t] for y, x in zip(ys, xs)]
    if isinstance(image, da.Array):
        wins = list(dask.compute(*wins))
    wins = [np.asarray(v) for v in wins]
    frac = np.array([(v.min(axis=2) < 215).mean() for v in wins])
    order = np.argsort(~(frac >= min_tissue), kind="stable")
    return np.stack([wins[i] for i in order[:n]])


def slide_norm_stats(net: nn.Module, tiles: np.ndarray, spec: GeneratorSpec, *,
                     batch_size: int = 8, device=None) -> NormStats:
    """Slide-level statistics of every norm layer, from sample tiles ``(N, H, W, 3)`` uint8.

    The network's instance/batch norms are turned into :class:`FrozenNorm` layers in ``collect``
    mode; each batch is normalised with its pooled statistics and the per-layer means and second
    moments are averaged over batches. ``net`` is left with frozen layers holding them.
    """
    import torch

    layers = _to_frozen(net)
    if not layers:
        return NormStats.from_dict({})
    for m in layers:
        m.mode, m._n = "collect", 0
    dev = next(net.parameters()).device if device is None else _device(device)
    with torch.no_grad():
        for i in range(0, len(tiles), batch_size):
            net(_to_tensor(tiles[i:i + batch_size], spec, dev))
    for m in layers:
        m.mode = "frozen"
    return NormStats.from_dict({n: (m.mean.cpu().numpy(), m.var.cpu().numpy())
                                for n, m in _norm_layers(net)})


# --------------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------------
def window_starts(length: int, tile: int, halo: int) -> list[int]:
    """Window origins along one axis: steps of ``tile - 2 halo``, the last one flush with the end."""
    if length <= tile:
        return [0]
    core = tile - 2 * halo
    starts = list(range(0, length - tile, core))
    starts.append(length - tile)
    return sorted(set(starts))


def window_size(length: int, tile: int, halo: int, multiple: int = 4) -> int:
    """Balanced window side along one axis: as few windows as ``tile`` allows, shrunk evenly.

    ``n = ceil((length - 2 halo) / (tile - 2 halo))`` windows are needed; each is cut down to
    ``ceil((length - 2 halo) / n) + 2 halo`` (rounded up to ``multiple``, at most ``tile``), so
    the cores share the length instead of the last window overlapping the one before by up to a
    whole core (which cost up to twice the necessary compute on blocks just above one window).
    """
    if length <= tile:
        return length
    inner = length - 2 * halo
    n = -(-inner // (tile - 2 * halo))
    t = -(-(-(-inner // n) + 2 * halo) // multiple) * multiple
    return int(min(tile, t))


def window_layout(length: int, tile: int, halo: int, multiple: int = 4) -> tuple[list[int], int]:
    """``(starts, size)`` of the balanced windows along one axis (see :func:`window_size`)."""
    t = window_size(length, tile, halo, multiple)
    return window_starts(length, t, halo), t


def seam_positions(length: int, tile: int, halo: int, blend: Blend = "crop", multiple: int = 4) -> list[int]:
    """Pixel indices ``i`` where output from one window meets the next (between ``i-1`` and ``i``).

    Follows the balanced layout of :func:`window_layout` that :func:`translate_array` uses for
    ResNets (``multiple=4``).
    """
    starts, tile = window_layout(length, tile, halo, multiple)
    if blend == "crop":
        return [s + tile - halo for s in starts[:-1]]
    return [s + tile // 2 for s in starts[:-1]]


def _weights_1d(start: int, tile: int, length: int, halo: int, blend: Blend) -> np.ndarray:
    i = np.arange(tile, dtype=np.float64)
    lo_edge, hi_edge = start == 0, start + tile >= length
    d = np.full(tile, np.inf)
    if not lo_edge:
        d = np.minimum(d, i + 0.5)
    if not hi_edge:
        d = np.minimum(d, tile - i - 0.5)
    if blend == "crop":
        return np.where(d > halo, 1.0, 1e-6)
    return np.clip(d / max(halo, 1), 1e-6, 1.0)


def _pad_to(block: np.ndarray, h: int, w: int) -> np.ndarray:
    ph, pw = h - block.shape[0], w - block.shape[1]
    if ph <= 0 and pw <= 0:
        return block
    return np.pad(block, ((0, max(ph, 0)), (0, max(pw, 0)), (0, 0)), mode="symmetric")


def translate_array(
    rgb: np.ndarray,
    net: nn.Module,
    spec: GeneratorSpec,
    *,
    tile: int | None = None,
    halo: int | None = None,
    batch_size: int = 8,
    blend: Blend = "crop",
    amp: str | bool | None = None,
) -> np.ndarray:
    """Translate one in-memory RGB image ``(H, W, 3)`` uint8 with overlapping windows.

    See the module docstring for the window, crop and feather rules. ``tile`` and ``halo``
    default to the spec's. Returns ``(H, W, 3)`` uint8.
    """
    tile = int(tile or spec.tile)
    halo = int(spec.halo if halo is None else halo)
    m = spec.multiple
    if tile % m or tile <= 2 * halo:
        raise InvalidInputError(f"translate: tile={tile} must be a multiple of {m} and > 2*halo ({2 * halo})")
    if blend not in ("crop", "feather"):
        raise InvalidInputError(f"translate: blend={blend!r} must be 'crop' or 'feather'")
    h, w = rgb.shape[:2]
    # pad at the far end to the stride multiple (and to one window when the image is small)
    hp = max(-(-h // m) * m, min(tile, -(-h // m) * m))
    wp = max(-(-w // m) * m, min(tile, -(-w // m) * m))
    if spec.arch.startswith("unet"):  # U-Nets see whole windows of exactly `tile`
        hp, wp, th, tw = max(hp, tile), max(wp, tile), tile, tile
        ys, xs = window_starts(hp, th, halo), window_starts(wp, tw, halo)
    else:
        (ys, th), (xs, tw) = window_layout(hp, tile, halo, m), window_layout(wp, tile, halo, m)
    img = _pad_to(rgb, hp, wp)
    wins = [(y, x) for y in ys for x in xs]
    if blend == "crop":
        # every output pixel comes from exactly one window: the core of each window, starting
        # where the previous window's core ends (no accumulation buffers, no division)
        res = np.empty((hp, wp, 3), np.uint8)
        cy, cx = _core_ranges(ys, th, hp, halo), _core_ranges(xs, tw, wp, halo)
        for i in range(0, len(wins), batch_size):
            part = wins[i:i + batch_size]
            batch = np.stack([img[y:y + th, x:x + tw] for y, x in part])
            out = run_generator(net, batch, spec, amp=amp)
            for (y, x), o in zip(part, out):
                (y0, y1), (x0, x1) = cy[y], cx[x]
                res[y0:y1, x0:x1] = o[y0 - y:y1 - y, x0 - x:x1 - x]
        return res[:h, :w]
    acc = np.zeros((hp, wp, 3), np.float32)
    wsum = np.zeros((hp, wp, 1), np.float32)
    wy = {y: _weights_1d(y, th, hp, halo, blend) for y in ys}
    wx = {x: _weights_1d(x, tw, wp, halo, blend) for x in xs}
    for i in range(0, len(wins), batch_size):
        part = wins[i:i + batch_size]
        batch = np.stack([img[y:y + th, x:x + tw] for y, x in part])
        out = run_generator(net, batch, spec, amp=amp)
        for (y, x), o in zip(part, out):
            wgt = (wy[y][:, None] * wx[x][None, :]).astype(np.float32)[..., None]
            acc[y:y + th, x:x + tw] += o * wgt
            wsum[y:y + th, x:x + tw] += wgt
    res = acc / wsum
    return np.clip(np.rint(res), 0, 255).astype(np.uint8)[:h, :w]


def _core_ranges(starts: list[int], tile: int, length: int, halo: int) -> dict[int, tuple[int, int]]:
    """Output range ``[lo, hi)`` each window writes in crop mode: its core, after the previous one."""
    out, prev = {}, 0
    for s in starts:
        hi = length if s + tile >= length else s + tile - halo
        lo = max(prev, s + halo if s else 0)
        out[s] = (lo, hi)
        prev = hi
    return out


class _TranslateBlock:
    """Picklable per-chunk function: load the generator from the cache, translate the block."""

    def __init__(self, ref: TranslatorRef, tile: int | None, halo: int, batch_size: int, blend: Blend,
                 device: str | None, amp, torch_threads: int | None = None) -> None:
        self.ref, self.tile, self.halo = ref, tile, halo
        self.batch_size, self.blend, self.device, self.amp = batch_size, blend, device, amp
        self.torch_threads = torch_threads

    def __call__(self, block: np.ndarray) -> np.ndarray:
        cpu = _device(self.device).type == "cpu"
        if cpu:  # before the first forward pass: NNPACK sizes its thread pool on first use
            _set_torch_threads(_task_threads(self.torch_threads))
        net = get_generator(self.ref, self.device)
        tile = self.tile or auto_tile(block.shape[:2], self.ref.spec, self.halo, cpu)
        return translate_array(block, net, self.ref.spec, tile=tile, halo=self.halo,
                               batch_size=self.batch_size, blend=self.blend, amp=self.amp)


#: Largest window side :func:`auto_tile` picks on CPU: a 2048 px chunk with its halo is one window
#: (peak ~0.7 GB of activations for 2176 px with the shipped model, ~150 bytes per pixel).
CPU_MAX_TILE = 2304


def auto_tile(shape: tuple[int, ...], spec: GeneratorSpec, halo: int, cpu: bool) -> int:
    """Window side when ``translate(tile=None)``: the whole halo'd block for ResNets on CPU.

    On CPU, batching gains nothing and every window recomputes ``2 * halo`` px of context, so
    one window per block (up to :data:`CPU_MAX_TILE` px, balanced windows beyond) does the
    least work. On GPUs, and for U-Nets (which must see windows of exactly their ``tile``), the
    spec's ``tile`` with batching.
    """
    m = spec.multiple
    if not cpu or not spec.arch.startswith("resnet"):
        return int(spec.tile)
    side = -(-max(int(shape[0]), int(shape[1])) // m) * m
    return int(max(spec.tile, min(side, CPU_MAX_TILE), 2 * halo + m))


def translate(
    he,
    model: str | os.PathLike[str] | TranslatorRef = "phantom",
    *,
    tile: int | None = None,
    halo: int | None = None,
    batch_size: int = 8,
    blend: Blend = "crop",
    norm_stats: NormMode | NormStats = "auto",
    n_stat_tiles: int = 16,
    stat_tile: int | None = None,
    device: str | None = None,
    amp: str | bool | None = None,
    resources: dict[str, float] | None = None,
    seed: int = 0,
    torch_threads: int | None = None,
    optimize: bool = True,
) -> da.Array:
    """Lazy virtual IHC of an H&E slide, on the H&E's pixel grid.

    Parameters
    ----------
    he : dask.array.Array, shape (y, x, 3), uint8
        The H&E slide.
    model : str, Path or TranslatorRef
        Shipped model name (``"phantom"``), model folder, or checkpoint ``.pth``.
    tile, halo : int, optional
        Window side and per-side context margin. ``halo`` defaults to the spec's (at least half
        the receptive field: keep it so, or seams appear); the dask halo depth is ``halo``
        rounded up to the network stride. ``tile`` defaults to :func:`auto_tile`: on CPU one
        window per halo'd chunk for ResNets (least recomputed overlap), the spec's ``tile`` on
        GPUs and for U-Nets.
    batch_size : int
        Windows per forward pass.
    blend : {"crop", "feather"}
        Center-crop each window to its core, or blend overlaps with linear ramps.
    norm_stats : {"auto", "slide", "tile", "running"} or NormStats
        How instance/batch norm layers get their statistics (module docstring). ``"auto"``:
        ``"slide"`` for instance norm, ``"running"`` (eval mode) for batch norm.
    n_stat_tiles, stat_tile : int
        Number and side of the tissue tiles sampled for slide-level statistics.
    device : str, optional
        ``"cuda"``, ``"cpu"``, ...; default: CUDA when the worker has it.
    amp : None, False, "fp16" or "bf16"
        Autocast (default fp16 on CUDA, off on CPU).
    resources : dict, optional
        Dask resource annotation of the translation tasks, e.g. ``{"GPU": 1}``.
    torch_threads : int, optional
        Torch intra-op threads per task on CPU. Default: ``DASKPATH_TORCH_THREADS``, else the
        cores divided by the dask worker's threads (no oversubscription: 2 dask threads on 2
        cores run 1 torch thread each); with the sync scheduler torch's setting is kept.
    optimize : bool
        On CPU, run ResNet generators with folded norms through
        :class:`~daskpath.translate.fast.FastResnet` (NNPACK 7x7 convolutions, folded input
        normalisation, channels_last residual blocks): the same output up to float rounding
        (at most 1 uint8 level), ~1.3-1.4x faster per window. ``False`` runs the module tree
        as loaded.

    Returns
    -------
    dask.array.Array, shape (y, x, 3), uint8
        Chunked like ``he`` (rechunked to multiples of the network stride, and chunks thinner
        than the halo merged, if needed: :func:`~daskpath._halo.align_chunks`).
    """
    return translator(
        he, model, tile=tile, halo=halo, batch_size=batch_size, blend=blend, norm_stats=norm_stats,
        n_stat_tiles=n_stat_tiles, stat_tile=stat_tile, device=device, amp=amp, seed=seed,
        torch_threads=torch_threads, optimize=optimize,
    ).array(he, resources=resources)


@dataclass(frozen=True)
class RegionTranslator:
    """The per-chunk translation of :func:`translate`, also for any box of the slide.

    Built by :func:`translator` (which measures slide-level norm statistics once, as
    :func:`translate` does). :meth:`array` is :func:`translate`'s lazy result; :meth:`region`
    translates one box ``(y0, y1, x0, x1)`` read with the same halo and edge rule (``depth`` px
    of context, none beyond the slide edge: :func:`~daskpath._halo.read_with_halo`), so that a
    box inside a chunk gets the chunk's pixels up to float rounding when :attr:`exact_boxes`.
    Picklable (holds a :class:`TranslatorRef`, never a network).

    Attributes
    ----------
    fn : callable
        The per-block function (a halo'd ``(h, w, 3)`` uint8 block -> its translation).
    depth : int
        Halo read around each chunk or box (the generator's halo rounded up to ``multiple``).
    multiple : int
        Stride grid of window origins (4 for ResNets, else 1); box corners are snapped to it.
    name : str
        Dask key prefix of :meth:`array`.
    """

    fn: _TranslateBlock
    depth: int
    multiple: int
    name: str

    @property
    def exact_boxes(self) -> bool:
        """Whether a box equals the same pixels of a whole-chunk translation (float rounding).

        True for ResNet generators with frozen or running norms and ``blend="crop"``: every
        output pixel sees only its receptive field (<= the halo) on the stride grid. False for
        U-Nets (which see whole fixed windows laid out over the block), per-window norm
        statistics (``norm_stats="tile"``) and feathered blending, whose outputs depend on the
        window layout and hence on the block: translate whole chunks for those.
        """
        ref = self.fn.ref
        return (ref.spec.arch.startswith("resnet") and ref.norm != "tile" and self.fn.blend == "crop")

    def chunks(self, he_chunks: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Spatial chunks of :meth:`array` for an H&E chunked ``he_chunks`` (see ``overlap_2d``)."""
        return (align_chunks(he_chunks[0], multiple=self.multiple, min_size=self.depth),
                align_chunks(he_chunks[1], multiple=self.multiple, min_size=self.depth))

    def snap(self, box: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """``box`` grown outward to the stride grid (corners multiples of :attr:`multiple`, or
        the slide edge) and clipped to the slide ``shape``."""
        m = self.multiple
        y0, y1, x0, x1 = (int(v) for v in box)
        h, w = (int(v) for v in shape[:2])
        return (max(0, y0 // m * m), min(h, -(-y1 // m) * m), max(0, x0 // m * m), min(w, -(-x1 // m) * m))

    def array(self, he, resources: dict[str, float] | None = None) -> da.Array:
        """Lazy virtual IHC of the whole slide ``he`` (what :func:`translate` returns)."""
        import dask
        import dask.array as da

        if not isinstance(he, da.Array):
            he = da.asarray(he)
        return overlap_2d(self.fn, he, depth=self.depth, multiple=self.multiple, dtype=np.uint8,
                          resources=resources, name=f"{self.name}-{dask.base.tokenize(he)}")

    def region(self, src: Any, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
        """Translate the box ``(y0, y1, x0, x1)`` of the H&E read from ``src`` (``src[ys, xs]``,
        e.g. :func:`daskpath.io.region_source` or a numpy array) of slide size ``shape``.

        The box is read with :attr:`depth` px of halo clipped to the slide and translated by
        :attr:`fn`, as :meth:`array` does for a chunk; the box must be on the stride grid
        (:meth:`snap`). Returns ``(y1 - y0, x1 - x0, 3)`` uint8.
        """
        y0, y1, x0, x1 = (int(v) for v in box)
        if self.snap(box, shape) != (y0, y1, x0, x1) or y1 <= y0 or x1 <= x0:
            raise InvalidInputError(f"translate region {tuple(box)}: corners must be multiples of "
                                    f"{self.multiple} (or the slide edge) inside {tuple(shape[:2])}; "
                                    "use RegionTranslator.snap")
        block, core = read_with_halo(src, (y0, y1, x0, x1), shape[:2], self.depth)
        block = np.ascontiguousarray(np.asarray(block)[..., :3], dtype=np.uint8)
        return self.fn(block)[core]


def translator(
    he,
    model: str | os.PathLike[str] | TranslatorRef = "phantom",
    *,
    tile: int | None = None,
    halo: int | None = None,
    batch_size: int = 8,
    blend: Blend = "crop",
    norm_stats: NormMode | NormStats = "auto",
    n_stat_tiles: int = 16,
    stat_tile: int | None = None,
    device: str | None = None,
    amp: str | bool | None = None,
    seed: int = 0,
    torch_threads: int | None = None,
    optimize: bool = True,
) -> RegionTranslator:
    """The :class:`RegionTranslator` behind :func:`translate` (same parameters, no ``resources``).

    Checks the arguments and, for ``norm_stats="slide"`` (or ``"auto"`` with instance norm),
    measures the slide-level statistics on ``he`` once. ``translate(he, ...)`` is
    ``translator(he, ...).array(he, resources)``; :meth:`RegionTranslator.region` translates
    single boxes with the same halo, windows and statistics.
    """
    import dask.array as da

    if not isinstance(he, da.Array):
        he = da.asarray(he)
    if he.ndim != 3 or he.shape[2] != 3 or he.dtype != np.uint8:
        raise InvalidInputError(f"translate: expected a (y, x, 3) uint8 RGB array, got {he.shape} {he.dtype}; "
                                "pass the H&E as 8-bit RGB (drop alpha)")
    ref = resolve_translator(model)
    spec = ref.spec
    halo = int(spec.halo if halo is None else halo)
    m = spec.multiple
    if tile is not None:
        tile = int(tile)
        if tile % m or tile <= 2 * halo or halo < 0:
            raise InvalidInputError(f"translate: tile={tile} must be a multiple of {m} and > 2*halo ({2 * halo})")
    elif halo < 0 or halo >= spec.tile // 2:
        raise InvalidInputError(f"translate: halo={halo} must be >= 0 and < tile/2 ({spec.tile // 2})")
    if isinstance(norm_stats, NormStats):
        ref = TranslatorRef(ref.model, spec, "slide", norm_stats, optimize)
    else:
        mode = norm_stats
        if mode == "auto":
            mode = "slide" if spec.norm == "instance" else "running"
        if mode not in ("slide", "tile", "running"):
            raise InvalidInputError(f"translate: norm_stats={norm_stats!r} must be auto, slide, tile or running")
        if mode == "running" and spec.norm == "instance":
            mode = "tile"  # instance norm has no running statistics
        stats = None
        if mode == "slide":
            net, _ = load_generator(ref.model, spec)
            tiles = sample_tiles(he, n_stat_tiles, stat_tile or min(tile or spec.tile, 256), seed, multiple=m)
            stats = slide_norm_stats(net, tiles, spec)
        ref = TranslatorRef(ref.model, spec, mode, stats, optimize)
    # window origins on the stride grid: chunks and depth multiples of 4 for ResNets
    step = 4 if m == 4 else 1
    fn = _TranslateBlock(ref, tile, halo, batch_size, blend, device, amp, torch_threads)
    key = hashlib.sha1(repr((ref.key, tile, halo, blend, amp)).encode()).hexdigest()[:8]
    return RegionTranslator(fn, halo_depth(halo, multiple=step), step, f"translate-{key}")


# --------------------------------------------------------------------------------------------
# seams
# --------------------------------------------------------------------------------------------
def seam_energy(image: np.ndarray, seams_y: list[int] | None = None, seams_x: list[int] | None = None,
                *, period: int | None = None, offset: int = 0) -> dict[str, float]:
    """Gradient energy across window borders relative to the interior.

    ``border`` is the mean absolute difference between the pixels on either side of each seam
    (``|I[:, s] - I[:, s-1]|`` over rows and channels, and the same for horizontal seams);
    ``interior`` the same mean over all other adjacent pixel pairs. ``ratio = border /
    interior``: about 1 when seams are invisible, > 1 when colours jump at window borders.
    Seams are given as lists, or as ``offset + k * period``.
    """
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape[:2]
    if period is not None:
        seams_y = list(range(offset, h, period))[1:] if seams_y is None else seams_y
        seams_x = list(range(offset, w, period))[1:] if seams_x is None else seams_x
    seams_y = [s for s in (seams_y or []) if 0 < s < h]
    seams_x = [s for s in (seams_x or []) if 0 < s < w]
    dx = np.abs(np.diff(img, axis=1)).mean(axis=(0, 2))  # (w-1,) between x-1 and x at index x-1
    dy = np.abs(np.diff(img, axis=0)).mean(axis=(1, 2))
    mx = np.zeros(w - 1, bool)
    my = np.zeros(h - 1, bool)
    mx[[s - 1 for s in seams_x]] = True
    my[[s - 1 for s in seams_y]] = True
    border_vals = np.concatenate([dx[mx] * h, dy[my] * w])
    border_n = mx.sum() * h + my.sum() * w
    inter = (dx[~mx].sum() * h + dy[~my].sum() * w) / max((~mx).sum() * h + (~my).sum() * w, 1)
    border = float(border_vals.sum() / border_n) if border_n else float("nan")
    return {"border": border, "interior": float(inter), "ratio": border / float(inter) if inter else float("nan")}
