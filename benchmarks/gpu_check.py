"""GPU check (issue 12, item 5): what daskpath does on one NVIDIA GPU, in one JSON.

Phases (run in the order env, flops, translate, cluster, stardist), each in a process of its own
with a timeout (a phase that fails, hangs or runs out of time is recorded as such and the next
one runs; the JSON is rewritten after every phase, so an interrupted check still leaves what it
measured):

``env``
    Python, CPU cores, ``nvidia-smi``, torch and its CUDA build, the GPU's name, multiprocessors
    and memory; the datasheet peak TFLOP/s of that GPU (:data:`PEAKS`: H200, H100, A100, L4, T4,
    V100; ``unknown`` otherwise) and, on a GPU, a measured fp16 / bf16 matrix-product rate
    (8192^3) as a practical ceiling.
``flops``
    FLOPs per pixel of the generators, counted on the module tree with forward hooks
    (:func:`conv_macs`: every Conv2d / ConvTranspose2d / Linear, MACs x 2) and checked against
    the closed form of the ResNet generator (:func:`resnet_macs_per_pixel`); elementwise work
    (bias, norm, ReLU, padding) is not counted. Runs on CPU.
``translate``
    Network throughput on the GPU, megapixels per second, of the shipped translator (ResNet-6,
    ngf 8) and of a full-size ResNet-9 ngf=64 generator (random weights, the pix2pix / CycleGAN
    default) in fp32 (TF32 off), TF32 (torch's default for convolutions), fp16 autocast (the
    pipeline's default on CUDA) and bf16 autocast, at several batch sizes, channels_last, norms
    folded as the pipeline does; achieved TFLOP/s = MP/s x FLOPs per pixel, and the fraction of
    the datasheet peak for that precision. Plus the shipped model end to end
    (:func:`daskpath.translate.inference.translate_array`: uint8 in, uint8 out, windows with
    their halo, host-device copies) on a 2048^2 phantom H&E.
``stardist``
    The shipped StarDist model on the GPU through TensorFlow with memory growth on (as
    :mod:`daskpath.nuclei` sets it), MP/s of ``predict_instances`` (network + NMS) and of the
    network alone on a 2048^2 phantom IHC, peak GPU memory. Needs TensorFlow with CUDA
    (``gpu_check.sh --with-tf``); skipped, saying why, where it is missing.
``cluster``
    ``daskpath synth`` 2 pairs of 2048^2, then ``daskpath run`` twice: ``cluster.kind: local``
    (CPU) and ``cluster.kind: local-cuda`` (dask-cuda ``LocalCUDACluster``, one worker per GPU
    declaring ``GPU=1``, plus CPU workers); checks one GPU worker per GPU and compares the
    ``tiles.parquet`` of the two runs (:func:`compare_tables`: ratios within 0.02, the
    preprocessing columns equal) and the virtual IHC (within 1 uint8 level; the fraction of
    pixels beyond is reported too, since the GPU path runs fp16 autocast). Without TensorFlow
    the nuclei and translate stages cannot run: the run is then ``[preprocess, baselines]`` and
    the virtual IHC is translated directly on both clusters (``daskpath.translate.translate``
    with the runs' resource annotations).

Without a GPU (``--cpu-only``, or torch sees none) the GPU phases are recorded as skipped with
the reason; ``env``, ``flops`` and the CPU half of ``cluster`` still run. Prints Markdown tables
at the end and writes them beside the JSON (``.md``).

    python benchmarks/gpu_check.py [--out PATH] [--cpu-only] [--phases env,flops,...] [--budget S]

``benchmarks/gpu_check.sh`` installs (``gpu`` extra, or the wheels carried to an offline GPU
machine) and then runs this; see benchmarks/README.md, "GPU check".

Only the standard library is imported at module level: the driver must run, and write its JSON,
even where the install failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PHASES = ("env", "flops", "translate", "cluster", "stardist")  # the optional StarDist phase last
GPU_PHASES = ("translate", "stardist")
#: Default seconds per phase (each is also capped by what is left of ``--budget``).
PHASE_TIMEOUT = {"env": 60, "flops": 60, "translate": 150, "cluster": 300, "stardist": 120}

#: Datasheet peaks, dense (no 2:4 sparsity), TFLOP/s: fp32 (CUDA cores), tf32 / fp16 / bf16
#: (tensor cores). First pattern that matches the GPU's name wins (SXM figures where the name
#: does not say PCIe / NVL). Leads, not measurements: the ``env`` phase also measures a matrix
#: product. NVIDIA datasheets (H100/H200 SXM, H100 PCIe, H100 NVL, A100, L4, T4, V100 SXM2).
PEAKS: tuple[tuple[str, str, dict[str, float | None]], ...] = (
    (r"H200", "H200 SXM", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.5, "bf16": 989.5}),
    (r"H100.*NVL", "H100 NVL", {"fp32": 60.0, "tf32": 417.5, "fp16": 835.0, "bf16": 835.0}),
    (r"H100.*PCIe", "H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0}),
    (r"H100", "H100 SXM", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.5, "bf16": 989.5}),
    (r"A100", "A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}),
    (r"\bL4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0}),
    (r"\bT4\b", "T4", {"fp32": 8.1, "tf32": None, "fp16": 65.0, "bf16": None}),
    (r"V100", "V100 SXM2", {"fp32": 15.7, "tf32": None, "fp16": 125.0, "bf16": None}),
)


def peak_for(name: str | None) -> dict[str, Any]:
    """Datasheet peak TFLOP/s of the GPU called ``name`` (``label: unknown`` when not listed)."""
    for pattern, label, peaks in PEAKS:
        if name and re.search(pattern, name, flags=re.IGNORECASE):
            return {"label": label, "source": "datasheet, dense", **peaks}
    return {"label": "unknown", "source": None, "fp32": None, "tf32": None, "fp16": None, "bf16": None}


# ------------------------------------------------------------------------------------ FLOPs
def conv_macs(model, shape: tuple[int, int, int, int], device: str = "cpu") -> dict[str, Any]:
    """Multiply-accumulates of every convolution and linear layer of ``model`` for one input.

    Forward hooks on every ``Conv2d`` (output elements x input channels per group x kernel
    area), ``ConvTranspose2d`` (input elements x output channels per group x kernel area: each
    input value is scattered through the whole kernel) and ``Linear`` (output elements x input
    features) record the MACs of a forward pass on zeros of ``shape`` (N, C, H, W).
    Returns ``{"macs": total, "layers": [(name, kind, macs), ...]}``.
    """
    import torch
    from torch import nn

    layers: list[tuple[str, str, int]] = []
    handles = []

    def hook(name):
        def f(m, inp, out):
            x = inp[0]
            if isinstance(m, nn.ConvTranspose2d):
                k = math.prod(m.kernel_size)
                macs = x.numel() * (m.out_channels // m.groups) * k
            elif isinstance(m, nn.Conv2d):
                k = math.prod(m.kernel_size)
                macs = out.numel() * (m.in_channels // m.groups) * k
            else:  # Linear
                macs = out.numel() * m.in_features
            layers.append((name, type(m).__name__, int(macs)))
        return f

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        p = next(model.parameters(), None)
        dtype = p.dtype if p is not None else torch.float32
        with torch.inference_mode():
            model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return {"macs": sum(m for _, _, m in layers), "layers": layers}


def flops_per_pixel(model, h: int = 256, w: int = 256, channels: int = 3, device: str = "cpu") -> float:
    """FLOPs (2 x MACs of the conv / linear layers) per input pixel for an ``h x w`` image."""
    return 2.0 * conv_macs(model, (1, channels, h, w), device)["macs"] / (h * w)


def resnet_macs_per_pixel(ngf: int, n_blocks: int, input_nc: int = 3, output_nc: int = 3) -> int:
    """Closed form of the MACs per pixel of the reference's ResnetGenerator (2 down / 2 up).

    Conv7 in -> ngf; Conv3 s2 ngf -> 2ngf at 1/4 of the pixels; Conv3 s2 2ngf -> 4ngf at 1/16;
    ``2 n_blocks`` Conv3 4ngf -> 4ngf at 1/16; ConvTranspose3 4ngf -> 2ngf (inputs at 1/16);
    ConvTranspose3 2ngf -> ngf (inputs at 1/4); Conv7 ngf -> out. ResNet-9 ngf 64: 756,096.
    """
    return (49 * input_nc * ngf
            + 9 * ngf * 2 * ngf // 4
            + 9 * 2 * ngf * 4 * ngf // 16
            + 2 * n_blocks * 9 * (4 * ngf) ** 2 // 16
            + 9 * 4 * ngf * 2 * ngf // 16
            + 9 * 2 * ngf * ngf // 4
            + 49 * ngf * output_nc)


# ------------------------------------------------------------------------- table comparison
#: Columns the preprocess stage writes; both runs compute them on CPU workers: equal up to rounding.
PREPROCESS_COLUMNS = ("tissue_fraction", "ssim", "ssim_rigid", "dy", "dx")
RATIO_PREFIXES = ("ratio_", "ki67_index_")


def compare_tables(cpu, gpu, ratio_tol: float = 0.02, exact_atol: float = 1e-6) -> dict[str, Any]:
    """Compare the ``tiles.parquet`` of a CPU run and a GPU run of the same slides.

    ``ratio_*`` / ``ki67_index_*`` columns must agree within ``ratio_tol`` (and be NaN in the
    same tiles); the preprocessing columns (:data:`PREPROCESS_COLUMNS`) within ``exact_atol``
    and ``keep`` exactly; every other numeric column is reported (largest absolute difference)
    but does not decide ``ok``.
    """
    import numpy as np

    problems: list[str] = []
    key = [c for c in ("slide", "y0", "x0") if c in cpu.columns and c in gpu.columns]
    a = cpu.sort_values(key).reset_index(drop=True) if key else cpu.reset_index(drop=True)
    b = gpu.sort_values(key).reset_index(drop=True) if key else gpu.reset_index(drop=True)
    if set(a.columns) != set(b.columns):
        problems.append(f"columns differ: only CPU {sorted(set(a.columns) - set(b.columns))}, "
                        f"only GPU {sorted(set(b.columns) - set(a.columns))}")
    if len(a) != len(b):
        problems.append(f"rows differ: CPU {len(a)}, GPU {len(b)}")
        return {"ok": False, "rows": [len(a), len(b)], "problems": problems}
    if key and not a[key].equals(b[key]):
        problems.append("tile keys (slide, y0, x0) differ")
    out: dict[str, Any] = {"rows": len(a), "ratio_max_abs_diff": {}, "preprocess_max_abs_diff": {},
                           "other_max_abs_diff": {}}
    for col in sorted(set(a.columns) & set(b.columns)):
        if col in key:
            continue
        x, y = a[col], b[col]
        if col == "keep" or x.dtype == bool:
            n = int((x.astype(bool) != y.astype(bool)).sum())
            if n:
                problems.append(f"{col}: {n} tiles differ")
            continue
        if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
            n = int((x.astype(str) != y.astype(str)).sum())
            if n:
                out["other_max_abs_diff"][col] = f"{n} differ"
            continue
        xv, yv = x.to_numpy(np.float64), y.to_numpy(np.float64)
        nan_x, nan_y = np.isnan(xv), np.isnan(yv)
        both = ~nan_x & ~nan_y
        d = float(np.abs(xv[both] - yv[both]).max()) if both.any() else 0.0
        nan_mismatch = int((nan_x != nan_y).sum())
        if col.startswith(RATIO_PREFIXES):
            out["ratio_max_abs_diff"][col] = d
            if d > ratio_tol:
                problems.append(f"{col}: max |CPU - GPU| {d:.4f} > {ratio_tol}")
            if nan_mismatch:
                problems.append(f"{col}: NaN in {nan_mismatch} tiles of one run only")
        elif col in PREPROCESS_COLUMNS:
            out["preprocess_max_abs_diff"][col] = d
            if d > exact_atol or nan_mismatch:
                problems.append(f"{col}: max |CPU - GPU| {d:.3g} > {exact_atol} "
                                f"(NaN mismatches {nan_mismatch})")
        else:
            out["other_max_abs_diff"][col] = d if not nan_mismatch else f"{d:.4g}, NaN in {nan_mismatch} tiles of one run"
    out["ok"] = not problems
    out["problems"] = problems
    return out


def compare_images(cpu, gpu, levels: int = 1) -> dict[str, Any]:
    """uint8 difference of two RGB images over the pixels written in either (not all 255)."""
    import numpy as np

    a, b = np.asarray(cpu), np.asarray(gpu)
    if a.shape != b.shape:
        return {"ok": False, "problems": [f"shapes differ: {a.shape} vs {b.shape}"]}
    written = ~((a == 255).all(axis=-1) & (b == 255).all(axis=-1))
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))[written]
    if d.size == 0:
        return {"ok": False, "problems": ["no translated pixels"], "written_fraction": 0.0}
    res = {"max": int(d.max()), "mean": round(float(d.mean()), 5),
           "p99_9": float(np.percentile(d, 99.9)), "frac_over": round(float((d > levels).mean()), 7),
           "levels": levels, "written_fraction": round(float(written.mean()), 4)}
    res["ok"] = res["max"] <= levels
    res["problems"] = [] if res["ok"] else [(f"max {res['max']} uint8 levels > {levels} "
                                              f"({res['frac_over']:.2e} of the values)")]
    return res


# ------------------------------------------------------------------------------------ phases
def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return _jsonable(x.item())
        except Exception:  # noqa: BLE001 - anything numpy-like that will not convert
            return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(data), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class Recorder:
    """What a phase measured so far; written to its part file after every update."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.data = path, {}

    def update(self, **kw) -> None:
        self.data.update(kw)
        if self.path is not None:
            write_json(self.path, self.data)


def _versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (small rates on a slow CPU do not round to 0)."""
    return float(f"{x:.{digits}g}")


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def phase_env(a, rec: Recorder) -> None:
    rec.update(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
               cores=os.cpu_count(), cpu=platform.processor() or platform.machine(),
               cpu_only=a.cpu_only)
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                            "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=30)
        rec.update(nvidia_smi=q.stdout.strip() or q.stderr.strip())
    else:
        rec.update(nvidia_smi="nvidia-smi not on PATH")
    rec.update(versions=_versions("daskpath", "torch", "dask", "distributed", "dask-cuda", "tensorflow",
                                  "tensorflow-cpu", "stardist", "numpy", "zarr", "nvidia-ml-py"))
    import torch

    avail = torch.cuda.is_available() and not a.cpu_only
    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cuda_available": bool(torch.cuda.is_available()),
                            "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if avail:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_name=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    info["peak_tflops"] = peak_for(info.get("gpu_name"))
    rec.update(**info)
    if avail and not a.no_matmul:
        dev = torch.device("cuda")
        n = 8192
        meas = {}
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            x = torch.randn(n, n, device=dev, dtype=dt)
            y = torch.randn(n, n, device=dev, dtype=dt)
            for _ in range(3):
                x @ y
            _sync(dev)
            t = time.perf_counter()
            for _ in range(10):
                x @ y
            _sync(dev)
            meas[name] = round(10 * 2 * n**3 / (time.perf_counter() - t) / 1e12, 1)
            del x, y
        torch.cuda.empty_cache()
        rec.update(matmul_tflops_measured=meas)


def phase_flops(a, rec: Recorder) -> None:
    import torch

    from daskpath.translate.checkpoints import load_generator
    from daskpath.translate.networks import define_G

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    s = a.flops_size
    net, spec = load_generator(a.model)
    shipped = {"model": a.model, "arch": spec.arch, "ngf": spec.ngf,
               "flops_per_pixel": flops_per_pixel(net, s, s)}
    m = re.match(r"resnet_(\d+)blocks", spec.arch)
    if m:
        shipped["closed_form"] = 2 * resnet_macs_per_pixel(spec.ngf, int(m.group(1)))
    rec.update(size=s, shipped=shipped)
    big = define_G(f"resnet_{a.big_blocks}blocks", a.big_ngf, "instance").eval()
    full = {"arch": f"resnet_{a.big_blocks}blocks", "ngf": a.big_ngf, "flops_per_pixel": flops_per_pixel(big, s, s),
            "closed_form": 2 * resnet_macs_per_pixel(a.big_ngf, a.big_blocks)}
    rec.update(full_size=full)
    ok = all(abs(d["flops_per_pixel"] - d.get("closed_form", d["flops_per_pixel"])) < 1e-6 for d in (shipped, full))
    rec.update(hooks_equal_closed_form=ok)
    if not ok:
        raise RuntimeError(f"hook count != closed form: {shipped} {full}")


def _generators(a, rgb):
    """(label, net, spec, flops per pixel) of the shipped model and the full-size ResNet, on CPU.

    Instance norms get slide statistics from tiles of the phantom H&E ``rgb`` and are folded into
    the convolutions, as the pipeline's ``norm_stats: slide`` does.
    """
    import torch

    from daskpath.translate import inference as inf
    from daskpath.translate.checkpoints import GeneratorSpec, load_generator
    from daskpath.translate.networks import define_G, init_weights

    t = min(256, rgb.shape[0] // 4 * 4)
    tiles = inf.sample_tiles(rgb, 8, t, 0)
    out = []
    net, spec = load_generator(a.model)
    fpp = flops_per_pixel(net, t, t)
    if spec.norm == "instance":
        inf.slide_norm_stats(net, tiles, spec)  # frozen slide statistics, as the pipeline's "slide"
    inf.fold_norm(net)
    out.append((f"shipped {a.model} ({spec.arch}, ngf {spec.ngf})", net, spec, fpp))
    torch.manual_seed(0)
    arch = f"resnet_{a.big_blocks}blocks"
    big = init_weights(define_G(arch, a.big_ngf, "instance")).eval()
    fpp = flops_per_pixel(big, t, t)
    bspec = GeneratorSpec(arch=arch, ngf=a.big_ngf, norm="instance")
    inf.slide_norm_stats(big, tiles, bspec)
    inf.fold_norm(big)
    out.append((f"{arch} ngf {a.big_ngf} (random weights)", big, bspec, fpp))
    return out


def _time_net(net, x, ctx, min_time: float, max_iters: int, dev) -> tuple[float, int]:
    import torch

    with torch.inference_mode(), ctx():
        for _ in range(2):
            net(x)
        _sync(dev)
        n, t0 = 0, time.perf_counter()
        while n < max_iters:
            net(x)
            n += 1
            if n >= 2 or dev.type != "cuda":
                _sync(dev)
                if time.perf_counter() - t0 >= min_time:
                    break
        _sync(dev)
    return time.perf_counter() - t0, n


def phase_translate(a, rec: Recorder) -> None:
    import numpy as np
    import torch

    from daskpath.synthetic import render_region
    from daskpath.translate import inference as inf

    dev = torch.device("cuda" if a.device == "cuda" else "cpu")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else (platform.processor() or "cpu")
    peaks = peak_for(name) if dev.type == "cuda" else peak_for(None)
    torch.backends.cudnn.benchmark = bool(a.cudnn_benchmark)
    rec.update(device=str(dev), gpu_name=name, peak_tflops=peaks, tile=a.tile, batch_sizes=a.batch_sizes,
               precisions=a.precisions, cudnn_benchmark=bool(a.cudnn_benchmark),
               note="network only: input already on the device, channels_last, norms folded; "
                    "fp32 = TF32 off, tf32 = torch's default for convolutions")
    rows: list[dict] = []
    e2e: list[dict] = []
    s = a.e2e_size
    img, _ = render_region(0, 0, s, s, size=(s, s), seed=123, stain="he")  # phantom H&E
    gens = _generators(a, img)
    for label, net, spec, fpp in gens:
        net = net.to(dev)
        if dev.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        for prec in a.precisions:
            if dev.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
                torch.backends.cudnn.allow_tf32 = prec == "tf32"
            elif prec == "tf32":
                continue
            if prec in ("fp16", "bf16"):
                dt = torch.float16 if prec == "fp16" else torch.bfloat16
                def ctx(dt=dt):
                    return torch.autocast(dev.type, dtype=dt)
            else:
                ctx = contextlib.nullcontext
            for bs in a.batch_sizes:
                row = {"model": label, "precision": prec, "batch": bs, "tile": a.tile,
                       "flops_per_pixel": fpp}
                try:
                    x = torch.randn(bs, 3, a.tile, a.tile, device=dev)
                    if dev.type == "cuda":
                        x = x.contiguous(memory_format=torch.channels_last)
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    dt_s, n = _time_net(net, x, ctx, a.min_time, a.max_iters, dev)
                    mp = bs * a.tile * a.tile * n / dt_s / 1e6
                    tflops = mp * 1e6 * fpp / 1e12
                    peak = peaks.get(prec)
                    row.update(iters=n, seconds=_sig(dt_s), mp_per_s=_sig(mp), tflops=_sig(tflops),
                               frac_of_peak=_sig(tflops / peak) if peak else None)
                    if dev.type == "cuda":
                        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                    del x
                except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
                    row.update(error=f"out of memory: {str(e).splitlines()[0]}")
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001 - recorded in the row
                    row.update(error=f"{type(e).__name__}: {e}")
                rows.append(row)
                rec.update(rows=rows)
        net.to("cpu")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cuda":  # back to torch's defaults (the pipeline's setting)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
    # the shipped model end to end, as the pipeline's translate tasks run it (one block)
    label, net, spec, fpp = gens[0]
    net = net.to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    for amp in ("fp16", False) if dev.type == "cuda" else (False,):
        row = {"model": label, "amp": amp or "fp32 (tf32 convs)", "image": s, "tile": spec.tile,
               "halo": spec.halo, "batch": 8}
        try:
            inf.translate_array(img[:512, :512], net, spec, batch_size=8, amp=amp)  # warm
            _sync(dev)
            times = []
            for _ in range(a.e2e_repeat):
                t0 = time.perf_counter()
                out = inf.translate_array(img, net, spec, batch_size=8, amp=amp)
                _sync(dev)
                times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            row.update(seconds=_sig(med), mp_per_s=_sig(s * s / med / 1e6), out_mean=float(out.mean()))
        except Exception as e:  # noqa: BLE001 - recorded in the row
            row.update(error=f"{type(e).__name__}: {e}")
        e2e.append(row)
        rec.update(end_to_end=e2e)
    ok_rows = [r for r in rows if "mp_per_s" in r]
    if ok_rows:
        best = {}
        for r in ok_rows:
            k = (r["model"], r["precision"])
            if k not in best or r["mp_per_s"] > best[k]["mp_per_s"]:
                best[k] = r
        rec.update(best=list(best.values()))
    if not ok_rows:
        raise RuntimeError("no configuration ran")


def phase_stardist(a, rec: Recorder) -> None:
    import numpy as np

    try:
        import tensorflow as tf
    except ImportError as e:
        rec.update(status="skipped",
                   reason=f"tensorflow not importable ({e}): StarDist on GPU needs TensorFlow with CUDA "
                          "(gpu_check.sh --with-tf installs tensorflow[and-cuda], several GB)")
        return
    from daskpath.nuclei import _configure_tensorflow, load_stardist, resolve_model
    from daskpath.synthetic import render_region
    from daskpath.train_stardist import model_input

    _configure_tensorflow()  # memory growth on every GPU, as the pipeline's workers do
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    growth = [bool(tf.config.experimental.get_memory_growth(g)) for g in gpus]
    rec.update(tensorflow=tf.__version__, tf_gpus=[g.name for g in gpus], memory_growth=growth,
               tf_cuda_build=bool(tf.test.is_built_with_cuda()))
    if a.device == "cuda" and not gpus:
        rec.update(status="skipped",
                   reason="tensorflow sees no GPU (tensorflow-cpu installed, or its CUDA libraries "
                          "do not match the driver): install tensorflow[and-cuda]")
        return
    s = a.stardist_size
    ref = resolve_model("phantom")
    model = load_stardist("phantom")
    rgb, _ = render_region(0, 0, s, s, size=(s, s), seed=11, stain="ihc")
    x = model_input(rgb)
    lo, hi = np.percentile(x, ref.percentiles)
    x = ((x - lo) / (hi - lo)).astype(np.float32)
    devname = "/GPU:0" if a.device == "cuda" else "/CPU:0"
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), tf.device(devname):
        model.predict_instances(x[:256, :256], verbose=False, show_tile_progress=False)  # warm
        t_net, t_all, n_nuc = [], [], 0
        for _ in range(a.stardist_repeat):
            t0 = time.perf_counter()
            model.predict(x, show_tile_progress=False)
            t_net.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, det = model.predict_instances(x, verbose=False, show_tile_progress=False)
            t_all.append(time.perf_counter() - t0)
            n_nuc = len(det["points"])
    mp = s * s / 1e6
    res = {"size": s, "device": devname, "nuclei": n_nuc,
           "network_seconds": _sig(min(t_net)), "network_mp_per_s": _sig(mp / min(t_net)),
           "predict_instances_seconds": _sig(min(t_all)),
           "predict_instances_mp_per_s": _sig(mp / min(t_all))}
    if gpus and a.device == "cuda":
        with contextlib.suppress(Exception):
            res["gpu_peak_mem_mib"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
    rec.update(**res)


def _failures(res) -> list:
    """The failed (slide, stage, error) rows of a run result, as records."""
    f = getattr(res, "failures", None)
    return f.to_dict("records")[:10] if hasattr(f, "to_dict") else []


@contextlib.contextmanager
def _hide_gpus():
    """``CUDA_VISIBLE_DEVICES=""`` for the worker processes started inside (a CPU-only run)."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _run_pipeline(cfg_overrides: list[str], client=None):
    from daskpath.config import load_config
    from daskpath.pipeline import run

    cfg = load_config(None, cfg_overrides)
    t0 = time.perf_counter()
    res = run(cfg, client=client) if client is not None else run(cfg)
    return cfg, res, time.perf_counter() - t0


def _no_tf32() -> None:
    """Plain fp32 convolutions and matmuls in this (worker) process (torch's default is TF32)."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _direct_virtual(manifest: Path, cluster_overrides: list[str], chunk: int, amps: dict[str, Any]):
    """Virtual IHC of every slide translated on the cluster of ``cluster_overrides``.

    ``amps``: label -> ``amp`` of :func:`daskpath.translate.translate` (``None``: the default,
    fp16 autocast on CUDA; ``False``: fp32, with TF32 turned off in the GPU workers first).
    Returns ``{label: {slide: (y, x, 3) uint8}}``.
    """
    import pandas as pd

    from daskpath import io
    from daskpath.cluster import connect, model_annotations
    from daskpath.config import load_config
    from daskpath.translate import translate

    cfg = load_config(None, cluster_overrides)
    out: dict[str, dict] = {}
    with connect(cfg.cluster) as client:
        ann = model_annotations(client)
        for label, amp in amps.items():
            if amp is False:
                client.run(_no_tf32)
            out[label] = {}
            for _, r in pd.read_csv(manifest).iterrows():
                ds = io.open_pair(manifest.parent / r["he"], manifest.parent / r["ihc"], chunk_size=chunk)
                arr = translate(ds["he"].data, "phantom", resources=ann.get("resources"), amp=amp)
                out[label][r["slide"]] = client.compute(arr).result()
    return out


def phase_cluster(a, rec: Recorder) -> None:
    import importlib.util

    import pandas as pd

    from daskpath.synthetic import make_cohort

    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module object without a spec (a stand-in)
            return name in sys.modules

    has = {m: importable(m) for m in ("tensorflow", "stardist", "torch", "sklearn", "skops", "dask_cuda")}
    if a.run_stages:
        stages = a.run_stages.split(",")
    elif has["tensorflow"] and has["stardist"]:
        stages = ["preprocess", "nuclei", "translate", "baselines"]
    else:
        stages = ["preprocess", "baselines"] if has["torch"] or (has["sklearn"] and has["skops"]) else ["preprocess"]
    methods = [m for m, ok in (("rf", has["sklearn"] and has["skops"]), ("classifier", has["torch"])) if ok]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="daskpath-gpu-check-"))
    rec.update(workdir=str(work), stages=stages, baselines_methods=methods, packages=has,
               pairs=a.pairs, size=a.run_size)
    if "translate" not in stages:
        rec.update(stages_note="tensorflow/stardist missing: nuclei and translate cannot run in the pipeline; "
                               "the virtual IHC is compared by translating directly on both clusters")
    t0 = time.perf_counter()
    manifest = make_cohort(work / "slides", pairs=a.pairs, size=(a.run_size, a.run_size), seed=7)
    rec.update(synth_seconds=round(time.perf_counter() - t0, 2))
    base = [f"slides={manifest}", "overwrite=true", f"stages=[{','.join(stages)}]",
            f"tiles.size={a.run_tile}", "cluster.dashboard_address=127.0.0.1:0",
            f"baselines.methods=[{','.join(methods)}]"]
    if a.chunk:
        base.append(f"chunk_size={a.chunk}")
    cpu_cluster = ["cluster.kind=local"] + ([f"cluster.n_workers={a.cpu_workers}"] if a.cpu_workers else [])
    runs: dict[str, Any] = {}
    # CPU: the workers must not see the GPU (model tasks pick CUDA whenever torch sees one)
    with _hide_gpus():
        _, res, secs = _run_pipeline(base + [f"output_dir={work / 'cpu'}"] + cpu_cluster)
    runs["local"] = {"ok": bool(res.ok), "seconds": round(secs, 2), "tiles": len(res.tiles),
                     "failures": _failures(res)}
    cpu_tiles = pd.read_parquet(work / "cpu" / "tiles.parquet")
    cols = [c for c in cpu_tiles.columns if c.startswith(RATIO_PREFIXES)]
    runs["local"]["ratio_means"] = {c: float(cpu_tiles[c].mean()) for c in cols}
    runs["local"]["kept_tiles"] = int(cpu_tiles["keep"].sum()) if "keep" in cpu_tiles else None
    rec.update(runs=runs)
    if not a.gpu:
        runs["local-cuda"] = {"status": "skipped", "reason": a.no_gpu_reason}
        rec.update(runs=runs, compare={"status": "skipped", "reason": a.no_gpu_reason})
        return
    # GPU: LocalCUDACluster, one worker per GPU (+ CPU workers for the CPU stages)
    from daskpath.cluster import connect
    from daskpath.config import load_config

    cuda_cluster = ["cluster.kind=local-cuda"] + ([f"cluster.n_workers={a.cpu_workers}"] if a.cpu_workers else [])
    ccfg = load_config(None, base + [f"output_dir={work / 'gpu'}"] + cuda_cluster)
    t0 = time.perf_counter()
    with connect(ccfg.cluster) as client:
        t_start = time.perf_counter() - t0
        info = client.scheduler_info(n_workers=-1)["workers"]
        gpu_workers = [w for w, d in info.items() if d.get("resources", {}).get("GPU")]
        devices = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"), workers=gpu_workers)
        first = sorted((v or "").split(",")[0] for v in devices.values())
        from dask_cuda.utils import get_n_gpus

        n_gpus = int(get_n_gpus())
        runs["local-cuda"] = {"cluster_start_seconds": round(t_start, 2), "workers": len(info),
                              "gpu_workers": len(gpu_workers), "gpus": n_gpus,
                              "gpu_worker_devices": first,
                              "one_worker_per_gpu": len(gpu_workers) == n_gpus and len(set(first)) == n_gpus}
        rec.update(runs=runs)
        _, res, secs = _run_pipeline(base + [f"output_dir={work / 'gpu'}"] + cuda_cluster, client=client)
    runs["local-cuda"].update(ok=bool(res.ok), seconds=round(secs, 2), tiles=len(res.tiles),
                              failures=_failures(res))
    rec.update(runs=runs)
    gpu_tiles = pd.read_parquet(work / "gpu" / "tiles.parquet")
    cmp = {"tiles": compare_tables(cpu_tiles, gpu_tiles, ratio_tol=a.ratio_tol)}
    rec.update(compare=cmp)
    # virtual IHC: translated directly on both clusters, the GPU in fp32 (TF32 off: must agree with
    # the CPU within 1 uint8 level, as the tests ask of any two runs) and with the pipeline's GPU
    # default, fp16 autocast (reported: its effect on the tables is what the ratio check bounds)
    t0 = time.perf_counter()
    chunk = a.chunk or 2048
    with _hide_gpus():
        v_cpu = _direct_virtual(manifest, cpu_cluster, chunk, {"fp32": False})["fp32"]
    v_gpu = _direct_virtual(manifest, cuda_cluster, chunk, {"fp32": False, "fp16": None})
    cmp["virtual_fp32"] = {s: compare_images(v_cpu[s], v_gpu["fp32"][s]) for s in v_cpu}
    cmp["virtual_fp16"] = {s: compare_images(v_cpu[s], v_gpu["fp16"][s]) for s in v_cpu}
    cmp["virtual_source"] = ("daskpath.translate.translate of each slide's H&E on each cluster (model tasks "
                             f"annotated GPU=1 on local-cuda), {round(time.perf_counter() - t0, 1)} s")
    if "translate" in stages:  # what the two runs wrote: GPU fp16 autocast vs CPU
        from daskpath import ome

        cmp["virtual_layers"] = {
            s: compare_images(ome.read_image(work / "cpu" / "layers" / f"{s}.virtual.zarr"),
                              ome.read_image(work / "gpu" / "layers" / f"{s}.virtual.zarr"))
            for s in sorted(cpu_tiles["slide"].unique())}
    cmp["ok"] = bool(cmp["tiles"]["ok"] and all(v["ok"] for v in cmp["virtual_fp32"].values()))
    rec.update(compare=cmp)


PHASE_FUNCS = {"env": phase_env, "flops": phase_flops, "translate": phase_translate,
               "stardist": phase_stardist, "cluster": phase_cluster}


# ------------------------------------------------------------------------------------ driver
def _child(a) -> int:
    """Run one phase in this process; write what it measured to ``--phase-out``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    rec = Recorder(Path(a.phase_out))
    try:
        PHASE_FUNCS[a.phase](a, rec)
        status = rec.data.pop("status", "ok")
        rec.update(status=status)
        return 0
    except BaseException as e:  # noqa: BLE001 - recorded; the driver goes on
        rec.update(status="failed", error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc()[-3000:])
        return 1


def _run_phase(name: str, argv: list[str], timeout: float, log) -> dict[str, Any]:
    fd, part = tempfile.mkstemp(prefix=f"gpu_check_{name}_", suffix=".json")
    os.close(fd)
    Path(part).write_text("{}")
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--phase", name, "--phase-out", part]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    secs = time.perf_counter() - t0
    try:
        data = json.loads(Path(part).read_text() or "{}")
    except json.JSONDecodeError:
        data = {}
    with contextlib.suppress(OSError):
        os.unlink(part)
    if timed_out:
        data.update(status="timeout", reason=f"stopped after {timeout:.0f} s (phase timeout or budget); "
                                             "figures above are what it measured before")
    elif "status" not in data:
        data.update(status="failed", error=f"phase process exited {proc.returncode} without a result "
                                           "(killed? see the log)")
    data["seconds"] = round(secs, 2)
    return data


def _fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(result: dict) -> str:
    """The Markdown tables of a result (phases; translation; StarDist; cluster run)."""
    ph = result.get("phases", {})
    lines = []
    env = ph.get("env", {})
    gpu = env.get("gpu_name") or "no GPU"
    peaks = env.get("peak_tflops") or {}
    lines.append(f"GPU check {result.get('started', '')}: {gpu}; torch {env.get('torch')} "
                 f"(CUDA {env.get('torch_cuda')}); {env.get('cores')} cores; datasheet peak "
                 f"({peaks.get('label', 'unknown')}) fp32 {_fmt(peaks.get('fp32'), 1)}, tf32 "
                 f"{_fmt(peaks.get('tf32'), 1)}, fp16/bf16 {_fmt(peaks.get('fp16'), 1)} TFLOP/s; measured "
                 f"matmul {env.get('matmul_tflops_measured', '-')}")
    lines += ["", "| phase | status | s | note |", "|---|---|---|---|"]
    for name in PHASES:
        d = ph.get(name)
        if d is None:
            continue
        note = d.get("reason") or d.get("error") or ""
        lines.append(f"| {name} | {d.get('status')} | {_fmt(d.get('seconds'), 1)} | {str(note)[:160]} |")
    fl = ph.get("flops", {})
    if fl.get("shipped"):
        lines.append("")
        lines.append(f"FLOPs per pixel (conv MACs x 2): shipped {fl['shipped'].get('arch')} ngf "
                     f"{fl['shipped'].get('ngf')}: {_fmt(fl['shipped'].get('flops_per_pixel'), 0)}; "
                     f"{fl.get('full_size', {}).get('arch')} ngf {fl.get('full_size', {}).get('ngf')}: "
                     f"{_fmt(fl.get('full_size', {}).get('flops_per_pixel'), 0)} (hooks = closed form: "
                     f"{fl.get('hooks_equal_closed_form')})")
    tr = ph.get("translate", {})
    if tr.get("best") or tr.get("rows"):
        lines += ["", "| translator (network only) | precision | best batch | MP/s | TFLOP/s | of peak |",
                  "|---|---|---|---|---|---|"]
        for r in tr.get("best") or tr.get("rows"):
            frac = r.get("frac_of_peak")
            lines.append(f"| {r['model']} | {r['precision']} | {r.get('batch')} | {_fmt(r.get('mp_per_s'), 1)} | "
                         f"{_fmt(r.get('tflops'), 2)} | {f'{100 * frac:.1f} %' if frac is not None else '-'} |")
        for r in tr.get("end_to_end", []):
            lines.append(f"| {r['model']}, end to end {r['image']}² (uint8 in/out, halo {r.get('halo')}) | "
                         f"{r['amp']} | {r['batch']} | {_fmt(r.get('mp_per_s'), 1)} | - | - |")
    sd = ph.get("stardist", {})
    if sd.get("status") == "ok":
        lines += ["", ("| StarDist (shipped, TF memory growth) | size | network MP/s | "
                       "predict_instances MP/s | nuclei | GPU peak MiB |"), "|---|---|---|---|---|---|",
                  (f"| {sd.get('device')} | {sd.get('size')}² | {_fmt(sd.get('network_mp_per_s'), 1)} | "
                   f"{_fmt(sd.get('predict_instances_mp_per_s'), 1)} | {sd.get('nuclei')} | "
                   f"{_fmt(sd.get('gpu_peak_mem_mib'), 0)} |")]
    cl = ph.get("cluster", {})
    runs = cl.get("runs") or {}
    if runs:
        head = f"| 2-slide run ({cl.get('pairs')} x {cl.get('size')}², stages {','.join(cl.get('stages', []))})"
        lines += ["", head + " | ok | s | tiles | note |", "|---|---|---|---|---|"]
        for k, r in runs.items():
            note = r.get("reason") or (f"{r.get('gpu_workers')} GPU worker(s) for {r.get('gpus')} GPU(s), "
                                       f"one per GPU: {r.get('one_worker_per_gpu')}" if "gpu_workers" in r else "")
            lines.append(f"| {k} | {r.get('ok', r.get('status'))} | {_fmt(r.get('seconds'), 1)} | "
                         f"{r.get('tiles', '-')} | {note} |")
        cmp = cl.get("compare") or {}
        if "tiles" in cmp:
            t = cmp["tiles"]
            worst = max((t.get("ratio_max_abs_diff") or {}).values(), default=None)
            lines.append("")
            lines.append(f"CPU vs GPU tables: ok {t.get('ok')}; largest ratio difference {_fmt(worst, 4)} "
                         f"(tolerance {cl.get('ratio_tol', 0.02)}); problems: {t.get('problems') or 'none'}")
            for key, what in (("virtual_fp32", "GPU fp32 (TF32 off)"), ("virtual_fp16", "GPU fp16 autocast"),
                              ("virtual_layers", "pipeline layers, GPU fp16")):
                for sl, v in (cmp.get(key) or {}).items():
                    lines.append(f"virtual IHC {sl}, {what} vs CPU: max {v.get('max')} uint8 levels, mean "
                                 f"{v.get('mean')}, beyond 1 level {v.get('frac_over')} of the values "
                                 f"(within 1 level: {v.get('ok')})")
    return "\n".join(lines) + "\n"


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else ROOT / "benchmarks" / "results" / "gpu_check.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else "
                                               "benchmarks/results/gpu_check.json)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--cpu-only", action="store_true", help="treat the machine as having no GPU")
    p.add_argument("--no-stardist", action="store_true", help="skip the StarDist phase (it runs last; skipped by itself without a CUDA TensorFlow)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all phases together")
    p.add_argument("--timeout", action="append", default=[], metavar="PHASE=S",
                   help="per-phase timeout, e.g. cluster=240 (repeatable)")
    p.add_argument("--install-json", default=None, help="install record written by gpu_check.sh")
    p.add_argument("--no-matmul", action="store_true", help="env: skip the measured matrix product")
    # translate
    p.add_argument("--model", default="phantom", help="shipped translator (or folder)")
    p.add_argument("--big-ngf", type=int, default=64)
    p.add_argument("--big-blocks", type=int, default=9)
    p.add_argument("--tile", type=int, default=512, help="network-only input side (px)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "fp16", "bf16"])
    p.add_argument("--min-time", type=float, default=0.5, help="seconds timed per configuration (at least)")
    p.add_argument("--max-iters", type=int, default=50)
    p.add_argument("--e2e-size", type=int, default=2048)
    p.add_argument("--e2e-repeat", type=int, default=3)
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--flops-size", type=int, default=256)
    # stardist
    p.add_argument("--stardist-size", type=int, default=2048)
    p.add_argument("--stardist-repeat", type=int, default=2)
    # cluster
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--run-size", type=int, default=2048)
    p.add_argument("--run-tile", type=int, default=1024, help="tiles.size of the runs")
    p.add_argument("--run-stages", default=None, help="stages of the runs (default: all that can run here)")
    p.add_argument("--chunk", type=int, default=None, help="chunk_size of the runs")
    p.add_argument("--cpu-workers", type=int, default=None, help="cluster.n_workers of both runs")
    p.add_argument("--ratio-tol", type=float, default=0.02)
    p.add_argument("--workdir", default=None)
    # internal: one phase in a child process
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--gpu", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-gpu-reason", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.phase:
        return _child(a)
    out = Path(a.out) if a.out else default_out()
    selected = [s.strip() for s in a.phases.split(",") if s.strip()]
    bad = [s for s in selected if s not in PHASES]
    if bad:
        print(f"gpu_check: unknown phase(s) {bad}; phases are {','.join(PHASES)}", file=sys.stderr)
        return 2
    timeouts = dict(PHASE_TIMEOUT)
    for t in a.timeout:
        k, _, v = t.partition("=")
        timeouts[k] = float(v)
    result: dict[str, Any] = {"started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                              "argv": argv, "budget_s": a.budget, "phases": {}}
    if a.install_json and Path(a.install_json).is_file():
        with contextlib.suppress(Exception):
            result["install"] = json.loads(Path(a.install_json).read_text())
    write_json(out, result)
    log_path = out.with_suffix(".log")
    t_start = time.perf_counter()
    gpu, why = False, "no GPU: --cpu-only" if a.cpu_only else "no GPU: torch.cuda.is_available() is False"
    # the children get the driver's arguments minus --out/--install-json (they write part files)
    child_argv = [x for x in argv]
    with open(log_path, "a") as log:
        for name in PHASES:
            if name not in selected:
                continue
            left = a.budget - (time.perf_counter() - t_start)
            if name in GPU_PHASES and not gpu:
                result["phases"][name] = {"status": "skipped", "reason": why}
            elif name == "stardist" and a.no_stardist:
                result["phases"][name] = {"status": "skipped", "reason": "--no-stardist"}
            elif left < 15:
                result["phases"][name] = {"status": "skipped",
                                          "reason": f"out of the time budget ({a.budget:.0f} s)"}
            else:
                result["phases"][name] = {"status": "running"}
                write_json(out, result)
                extra = ["--gpu", str(int(gpu)), "--no-gpu-reason", why, "--device", "cuda" if gpu else "cpu"]
                print(f"[gpu_check] {name} (timeout {min(timeouts[name], left):.0f} s) ...", flush=True)
                log.write(f"\n===== phase {name} =====\n")
                log.flush()
                result["phases"][name] = _run_phase(name, child_argv + extra, min(timeouts[name], left), log)
                print(f"[gpu_check] {name}: {result['phases'][name].get('status')} in "
                      f"{result['phases'][name]['seconds']} s "
                      f"{result['phases'][name].get('reason') or result['phases'][name].get('error') or ''}",
                      flush=True)
            if name == "env":
                e = result["phases"]["env"]
                gpu = e.get("status") == "ok" and bool(e.get("cuda_available")) and not a.cpu_only
                if not gpu and e.get("status") != "ok" and not a.cpu_only:
                    why = f"no GPU: the env phase {e.get('status')} ({e.get('error') or e.get('reason')})"
            write_json(out, result)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["gpu"] = gpu
    cl = result["phases"].get("cluster", {})
    cl.setdefault("ratio_tol", a.ratio_tol)
    result["ok"] = all(d.get("status") in ("ok", "skipped") for d in result["phases"].values()) and \
        (cl.get("compare", {}).get("ok", True) is not False)
    text = markdown(result)
    result["table_md"] = text
    write_json(out, result)
    out.with_suffix(".md").write_text(text)
    print()
    print(text)
    print(f"wrote {out} (log {log_path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
