"""Exact, faster CPU inference for ResNet generators whose norm layers are folded.

After :func:`~daskpath.translate.inference.fold_norm` (slide-level statistics, or batch norm's
running statistics) a ResNet generator is a plain chain of convolutions, ReLUs and residual
adds. :class:`FastResnet` computes the same function with less work per pixel (measured on a
2-core AVX-512 machine, one thread, 1088 px window of the shipped model: 0.45 s -> 0.32 s;
the reference loop spends 0.52 s per megapixel, this path 0.27 s):

* **The two 7x7 convolutions** (``ReflectionPad2d(3) + Conv2d(3, ngf, 7)`` first and
  ``ReflectionPad2d(3) + Conv2d(ngf, 3, 7)`` last, full resolution, few channels: oneDNN runs
  them at a fraction of its speed on wider layers; the last one was ~30 % of the time) run
  through NNPACK (``torch._nnpack_spatial_convolution``, FFT-based), 3-5x faster. The last one
  uses zero padding instead of a padded copy of the full-resolution activation, and the 3 px
  border that reflection padding changes is recomputed exactly from thin reflect-padded strips.
* **Residual blocks and transposed convolutions in channels_last** (oneDNN hands a transposed
  convolution's NCHW output back through an extra full-size copy); the last ReLU is applied
  while copying back to NCHW for NNPACK, slab by slab.
* **Input normalisation** (``(x / 255 - mean) / std``) is folded into the first convolution
  (reflection padding commutes with a per-channel affine map), so the uint8 batch is converted
  to float once.
* **Output**: the reference's ``tensor2im`` ``(tanh(z) + 1) / 2 * 255``, truncated, is computed
  as ``255 * sigmoid(2 z)`` (the same function; torch's CPU ``tanh`` is ~6x slower than
  ``sigmoid``) and cast to uint8 before the NHWC transpose, which then moves bytes, not floats.

Outputs equal the unoptimised network up to float rounding: about 1e-5 on the tanh output,
and on uint8 at most 1 level where a value sits on a truncation boundary (~1e-5 of the values
of the shipped model; tests check max 1 level and every border and corner).

It applies to ``resnet_<n>blocks`` generators with ``padding_type="reflect"`` and no norm
layer left (instance norm with slide statistics, batch norm in eval mode, or ``norm="none"``),
in float32 on CPU; :func:`fast_generator` returns ``None`` for anything else (U-Nets,
per-tile statistics, other paddings) and the caller keeps the original network. Under
autocast (``amp="bf16"``) :meth:`FastResnet.forward` runs the original network. Without
NNPACK (a torch build without it) the 7x7 convolutions fall back to oneDNN.

NNPACK's thread pool is created once per process, with torch's intra-op thread count at its
first use (:func:`~daskpath.translate.inference.translate` sets that count per task before).

Process-wide allocator setting
------------------------------
A 1152 px window makes ~40 MB activations. glibc's ``malloc`` maps every block above its
(at most 32 MB) mmap threshold fresh from the kernel and returns it on ``free``, so each
forward pass page-faults and zero-fills every large activation again (~20 000 faults per
window, ~10 % of the time). :func:`tune_malloc` raises the mmap threshold to 256 MiB and the
trim threshold to 512 MiB (``mallopt``) once per process, so the activations are reused from
the heap. It is called when a translation network is built on CPU; ``DASKPATH_MALLOC_TUNE=0``
turns it off. The price is resident memory: a process keeps up to ~0.5 GB of freed heap
(dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that RSS follows freed
memory; this setting overrides that in processes that translate). So it is skipped in a dask
worker whose memory limit is under :data:`MALLOC_TUNE_MIN_LIMIT` (8 GiB): there the retained
heap counts against the limit and Dask pauses the worker at 80 % (seen: a 3 GiB SLURM worker
paused at 2.41 GiB). ``DASKPATH_MALLOC_TUNE=0`` turns it off everywhere (~10 % slower
translation).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastResnet", "fast_generator", "nnpack_available", "tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TUNED = False
_TUNE_LOCK = threading.Lock()


#: Dask workers with a smaller memory limit do not tune malloc (see the module docstring).
MALLOC_TUNE_MIN_LIMIT = 8 << 30


def _worker_memory_limit() -> int | None:
    """The memory limit (bytes) of the dask worker running this code; None outside one or unlimited."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except Exception:  # not in a distributed worker (or distributed missing)
        return None
    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    return int(limit) if limit else None


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep large freed blocks in the heap for reuse (glibc ``mallopt``); once per process.

    Returns True when the setting is in effect. A no-op (False) off glibc, with
    ``DASKPATH_MALLOC_TUNE=0``, or in a dask worker with a memory limit under
    :data:`MALLOC_TUNE_MIN_LIMIT`.
    """
    global _TUNED
    if _TUNED:
        return True
    if os.environ.get("DASKPATH_MALLOC_TUNE", "1") in ("0", "false", "no", "off"):
        return False
    limit = _worker_memory_limit()
    if limit is not None and limit < MALLOC_TUNE_MIN_LIMIT:
        return False
    with _TUNE_LOCK:
        if _TUNED:
            return True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
        _TUNED = ok
        return ok


@functools.cache
def nnpack_available() -> bool:
    """Whether torch's NNPACK convolution works here (initialises NNPACK; False when not built)."""
    try:
        if not torch._nnpack_available():  # also initialises NNPACK (needed before any call)
            return False
        x = torch.ones(1, 2, 9, 9)
        w = torch.ones(3, 2, 7, 7)
        y = torch._nnpack_spatial_convolution(x, w, torch.zeros(3), [3, 3], [1, 1])
        return bool(torch.allclose(y, F.conv2d(x, w, padding=3)))
    except (RuntimeError, AttributeError):
        return False


def _relu_to_nchw(h: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """``relu(h).contiguous()`` for a channels_last ``h``, slab by slab (one pass, cache-sized)."""
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    for r in range(0, h.shape[2], rows):
        torch.clamp_min(h[:, :, r:r + rows], 0.0, out=out[:, :, r:r + rows])
    return out


def _is(m: nn.Module, name: str) -> bool:
    return type(m).__name__ == name


def _layers(net: nn.Module) -> list[nn.Module] | None:
    """The layers of a folded ResnetGenerator without identities/dropout, or None if not one."""
    from daskpath.translate.networks import Identity, ResnetBlock

    seq = getattr(net, "model", None)
    if not isinstance(seq, nn.Sequential):
        return None
    for m in net.modules():
        if isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d)) or _is(m, "FrozenNorm") or _is(m, "PooledNorm"):
            return None  # statistics not folded
        if isinstance(m, (nn.ReplicationPad2d, nn.ZeroPad2d)):
            return None
    layers = [m for m in seq if not isinstance(m, (Identity, nn.Identity, nn.Dropout))]
    if len(layers) < 7:
        return None
    head, tail = layers[:3], layers[-3:]
    ok = (isinstance(head[0], nn.ReflectionPad2d) and tuple(head[0].padding) == (3, 3, 3, 3)
          and isinstance(head[1], nn.Conv2d) and head[1].kernel_size == (7, 7)
          and head[1].padding == (0, 0) and head[1].stride == (1, 1) and isinstance(head[2], nn.ReLU)
          and isinstance(tail[0], nn.ReflectionPad2d) and tuple(tail[0].padding) == (3, 3, 3, 3)
          and isinstance(tail[1], nn.Conv2d) and tail[1].kernel_size == (7, 7)
          and tail[1].padding == (0, 0) and tail[1].stride == (1, 1) and isinstance(tail[2], nn.Tanh))
    if not ok:
        return None
    for m in layers[3:-3]:
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.ReLU, ResnetBlock)):
            return None
    return layers


class FastResnet(nn.Module):
    """A folded ResnetGenerator, computed with the CPU shortcuts of the module docstring.

    Parameters
    ----------
    net : torch.nn.Module
        A ``ResnetGenerator`` after ``fold_norm`` (eval mode). Its modules are shared, not copied.
    input_mean, input_std : sequence of float
        The spec's input normalisation (folded into the first convolution for
        :meth:`forward_uint8`).
    nnpack : bool, optional
        Use NNPACK for the two 7x7 convolutions (default: when :func:`nnpack_available`).
    channels_last : bool
        Run the residual blocks and transposed convolutions in channels_last.
    """

    def __init__(self, net: nn.Module, input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5),
                 nnpack: bool | None = None, channels_last: bool = True) -> None:
        super().__init__()
        self.channels_last = channels_last
        layers = _layers(net)
        if layers is None:
            raise ValueError("FastResnet needs a ResnetGenerator with folded norms and reflection padding")
        self.net = net
        self.body = nn.Sequential(*layers[3:-3])
        from daskpath.translate.networks import ResnetBlock

        self.first_block = next((i for i, m in enumerate(self.body) if isinstance(m, ResnetBlock)), 0)
        c1, cl = layers[1], layers[-2]
        self.nnpack = nnpack_available() if nnpack is None else bool(nnpack and nnpack_available())
        with torch.no_grad():
            w1 = c1.weight.detach().float()
            b1 = (c1.bias.detach().float() if c1.bias is not None else torch.zeros(w1.shape[0]))
            mean = torch.tensor(input_mean, dtype=torch.float32)
            std = torch.tensor(input_std, dtype=torch.float32)
            # conv(((x / 255) - mean) / std) = conv'(x): w' = w / (255 std), b' = b - sum w mean / std
            self.register_buffer("w1", w1.contiguous())
            self.register_buffer("b1", b1.contiguous())
            self.register_buffer("w_in", (w1 / (255.0 * std.view(1, -1, 1, 1))).contiguous())
            self.register_buffer("b_in", b1 - (w1 * (mean / std).view(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
            self.register_buffer("w_out", cl.weight.detach().float().contiguous())
            bo = cl.bias.detach().float() if cl.bias is not None else torch.zeros(cl.out_channels)
            self.register_buffer("b_out", bo.contiguous())

    # ---------------------------------------------------------------------------------------
    def _last(self, y: torch.Tensor) -> torch.Tensor:
        """``Conv7(ReflectionPad3(y))`` (pre-tanh), NNPACK + exact borders when enabled."""
        w, b = self.w_out, self.b_out
        if not self.nnpack or y.dtype != torch.float32 or min(y.shape[-2:]) < 8:
            return F.conv2d(F.pad(y, (3, 3, 3, 3), mode="reflect"), w, b)
        y = y.contiguous()
        out = torch._nnpack_spatial_convolution(y, w, b, [3, 3], [1, 1])
        h, wd = y.shape[-2:]
        # zero padding differs from reflection within 3 px of each edge: recompute those from
        # 6 px strips, reflect-padded on every side where the strip meets the image edge
        out[:, :, :3, :] = F.conv2d(F.pad(y[:, :, :6, :], (3, 3, 3, 0), mode="reflect"), w, b)
        out[:, :, h - 3:, :] = F.conv2d(F.pad(y[:, :, h - 6:, :], (3, 3, 0, 3), mode="reflect"), w, b)
        out[:, :, :, :3] = F.conv2d(F.pad(y[:, :, :, :6], (3, 0, 3, 3), mode="reflect"), w, b)
        out[:, :, :, wd - 3:] = F.conv2d(F.pad(y[:, :, :, wd - 6:], (0, 3, 3, 3), mode="reflect"), w, b)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as the generator: normalised NCHW input, tanh output in [-1, 1]."""
        if torch.is_autocast_enabled("cpu") or x.device.type != "cpu" or x.dtype != torch.float32:
            return self.net(x)
        h = self._first(F.pad(x, (3, 3, 3, 3), mode="reflect"), self.w1, self.b1)
        return torch.tanh_(self._last(self._body(h)))

    def _body(self, h: torch.Tensor) -> torch.Tensor:
        """Stride-2 convs in NCHW; residual blocks and transposed convs in channels_last.

        oneDNN returns a transposed convolution's NCHW output through a full extra copy, and
        its channels_last convolutions are faster here; the last ReLU is applied while copying
        back to NCHW (for NNPACK) in 64-row slabs, which keeps the transpose in cache.
        """
        if not self.channels_last:
            return self.body(h)
        last = len(self.body) - 1
        for i, m in enumerate(self.body):
            if i == self.first_block:
                h = h.contiguous(memory_format=torch.channels_last)
            if i == last and isinstance(m, nn.ReLU):
                return _relu_to_nchw(h)
            h = m(h)
        return h.contiguous()

    def _first(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``ReLU(Conv7(x))`` on an already reflect-padded input."""
        if self.nnpack and x.dtype == torch.float32:
            return torch.relu_(torch._nnpack_spatial_convolution(x.contiguous(), w, b, [0, 0], [1, 1]))
        return torch.relu_(F.conv2d(x, w, b))

    def forward_uint8(self, batch: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 RGB -> ``(N, H, W, 3)`` uint8, the reference's ``tensor2im``.

        Input normalisation is folded into the first convolution; the output is
        ``trunc((tanh + 1) * 127.5)`` (values are in [0, 255], so truncation = ``astype``).
        """
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        x = F.pad(x, (3, 3, 3, 3), mode="reflect")
        h = self._first(x, self.w_in, self.b_in)
        del x
        z = self._last(self._body(h))
        # (tanh(z) + 1) * 127.5 == 255 * sigmoid(2 z); torch's CPU tanh is ~6x slower than sigmoid
        out = torch.sigmoid_(z.mul_(2.0)).mul_(255.0).to(torch.uint8)
        return out.permute(0, 2, 3, 1).contiguous().numpy()


def fast_generator(net: nn.Module, input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5)) -> FastResnet | None:
    """:class:`FastResnet` for ``net`` if it qualifies (folded ResNet, reflect padding), else None."""
    if _layers(net) is None:
        return None
    p = next(net.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.float32:
        return None
    return FastResnet(net, input_mean, input_std).eval()
