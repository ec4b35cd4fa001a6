"""The CPU fast path (FastResnet) computes what the module tree computes, borders included."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dask.array as da  # noqa: E402

from daskpath.translate import fast as fst  # noqa: E402
from daskpath.translate import inference as inf  # noqa: E402
from daskpath.translate.checkpoints import GeneratorSpec, load_generator, save_generator  # noqa: E402
from daskpath.translate.networks import define_G, init_weights  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def he_image():
    from daskpath.synthetic import render_region

    img, _ = render_region(600, 500, 132, 180, size=(2048, 2048), seed=3, stain="he")
    return img


def _folded(norm: str, n_blocks: int = 6, dropout: bool = False, ngf: int = 8, seed: int = 0, image=None):
    torch.manual_seed(seed)
    net = init_weights(define_G(f"resnet_{n_blocks}blocks", ngf, norm, use_dropout=dropout), "normal", 0.2)
    if norm == "batch":
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    spec = GeneratorSpec(arch=f"resnet_{n_blocks}blocks", ngf=ngf, norm=norm, dropout=dropout, tile=192, halo=64)
    if norm == "instance":
        inf.slide_norm_stats(net, image[None], spec)
    inf.fold_norm(net)
    return net, spec


@pytest.mark.parametrize("norm,n_blocks,dropout", [("instance", 6, False), ("batch", 9, True), ("none", 6, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_resnet_equals_module_tree(he_image, norm, n_blocks, dropout, channels_last):
    net, spec = _folded(norm, n_blocks, dropout, image=he_image)
    fast = fst.FastResnet(net, spec.input_mean, spec.input_std, channels_last=channels_last)
    batch = np.stack([he_image, he_image[::-1, ::-1]])  # N = 2, 132 x 180 (multiples of 4)
    x = inf._to_tensor(batch, spec, torch.device("cpu"))
    with torch.inference_mode():
        ref = net(x)
        got = fast(x)
        assert got.shape == ref.shape
        err = (got - ref).abs()
        assert err.max().item() < 1e-4
        # borders and corners, where reflection padding was replaced by zero padding + strips
        for sl in [np.s_[..., :4, :], np.s_[..., -4:, :], np.s_[..., :, :4], np.s_[..., :, -4:]]:
            assert err[sl].max().item() < 1e-4
        u_ref = inf._to_uint8(ref)
        u = fast.forward_uint8(batch)
    assert u.dtype == np.uint8 and u.shape == batch.shape
    d = np.abs(u.astype(int) - u_ref)
    # float rounding (folded input normalisation, NNPACK's FFT, sigmoid for tanh) moves a value
    # across a truncation boundary now and then: at most 1 level, rarely
    assert d.max() <= 1 and (d > 0).mean() < 5e-3


def test_fast_resnet_without_nnpack_and_tiny_images(he_image):
    net, spec = _folded("batch", image=he_image)
    fast = fst.FastResnet(net, spec.input_mean, spec.input_std, nnpack=False)
    tiny = he_image[:8, :12]  # below the NNPACK border strips' minimum: plain reflect + conv
    for img in (he_image, tiny):
        x = inf._to_tensor(img[None], spec, torch.device("cpu"))
        with torch.inference_mode():
            assert (fast(x) - net(x)).abs().max().item() < 1e-4
    if fst.nnpack_available():
        fast2 = fst.FastResnet(net, spec.input_mean, spec.input_std)
        x = inf._to_tensor(tiny[None], spec, torch.device("cpu"))
        with torch.inference_mode():
            assert (fast2(x) - net(x)).abs().max().item() < 1e-4


def test_fast_generator_refuses_what_it_cannot_compute(he_image):
    unet = define_G("unet_128", 4, "batch").eval()
    assert fst.fast_generator(unet) is None
    per_tile = define_G("resnet_6blocks", 4, "instance").eval()  # instance norm not folded
    assert fst.fast_generator(per_tile) is None
    replicate = define_G("resnet_6blocks", 4, "none", padding_type="replicate").eval()
    assert fst.fast_generator(replicate) is None
    net, _ = _folded("none", image=he_image)
    assert isinstance(fst.fast_generator(net), fst.FastResnet)
    with pytest.raises(ValueError, match="folded norms"):
        fst.FastResnet(per_tile)


def test_autocast_falls_back_to_the_module_tree(he_image):
    net, spec = _folded("batch", image=he_image)
    fast = fst.FastResnet(net, spec.input_mean, spec.input_std)
    x = inf._to_tensor(he_image[None], spec, torch.device("cpu"))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast(x), net(x)
    assert torch.equal(a, b)


def test_translate_default_is_the_fast_path_and_exact(tmp_path, he_image):
    torch.manual_seed(0)
    spec = GeneratorSpec(arch="resnet_6blocks", ngf=8, norm="instance", tile=192, halo=64)
    save_generator(init_weights(define_G("resnet_6blocks", 8, "instance"), "normal", 0.2), tmp_path / "m", spec)
    d = da.from_array(he_image, chunks=(68, 96, 3))
    stats = inf.slide_norm_stats(load_generator(tmp_path / "m")[0], he_image[None], spec)
    fast = inf.translate(d, tmp_path / "m", norm_stats=stats).compute(scheduler="threads")
    slow = inf.translate(d, tmp_path / "m", norm_stats=stats, optimize=False).compute(scheduler="threads")
    net, _ = load_generator(tmp_path / "m")
    inf.freeze_norm(net, stats)
    whole = inf.run_generator(net, he_image[None], spec)[0]
    for out in (fast, slow):
        assert out.shape == he_image.shape
        diff = np.abs(out.astype(int) - whole)
        assert diff.max() <= 1 and (diff > 0).mean() < 5e-3
    ref = inf.resolve_translator(tmp_path / "m")
    cached = inf.get_generator(inf.TranslatorRef(ref.model, spec, "slide", stats), "cpu")
    assert type(cached).__name__ == "FastResnet"
    plain = inf.get_generator(inf.TranslatorRef(ref.model, spec, "slide", stats, optimize=False), "cpu")
    assert type(plain).__name__ == "ResnetGenerator"


def test_auto_tile_one_window_per_block_on_cpu():
    spec = GeneratorSpec(arch="resnet_6blocks", ngf=8, tile=512, halo=64)
    assert inf.auto_tile((1152, 1100), spec, 64, cpu=True) == 1152
    assert inf.auto_tile((3000, 3000), spec, 64, cpu=True) == inf.CPU_MAX_TILE
    assert inf.auto_tile((100, 90), spec, 64, cpu=True) == 512
    assert inf.auto_tile((1152, 1152), spec, 64, cpu=False) == 512
    unet = GeneratorSpec(arch="unet_256", ngf=8, tile=256, halo=32)
    assert inf.auto_tile((1152, 1152), unet, 32, cpu=True) == 256


def test_tune_malloc_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(fst, "_TUNED", False)
    monkeypatch.setenv("DASKPATH_MALLOC_TUNE", "0")
    assert fst.tune_malloc() is False
    monkeypatch.delenv("DASKPATH_MALLOC_TUNE")
    assert isinstance(fst.tune_malloc(), bool)


def test_task_threads_count_every_worker_process_on_the_host(dask_client, monkeypatch):
    """2 worker processes x 1 thread on this host: each task gets cores // 2 torch threads."""
    import os

    monkeypatch.delenv("DASKPATH_TORCH_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host_threads = sum(w["nthreads"] for w in dask_client.scheduler_info(n_workers=-1)["workers"].values())
    got = dask_client.submit(inf._task_threads, pure=False).result()
    assert got == max(1, cores // host_threads)


def test_tune_malloc_skipped_on_memory_tight_workers(monkeypatch):
    """In a dask worker with a small memory limit the retained heap would pause the worker."""
    from types import SimpleNamespace

    import distributed

    monkeypatch.setattr(fst, "_TUNED", False)
    monkeypatch.delenv("DASKPATH_MALLOC_TUNE", raising=False)
    small = SimpleNamespace(memory_manager=SimpleNamespace(memory_limit=3 << 30))
    monkeypatch.setattr(distributed, "get_worker", lambda: small)
    assert fst._worker_memory_limit() == 3 << 30
    assert fst.tune_malloc() is False and fst._TUNED is False
    big = SimpleNamespace(memory_manager=SimpleNamespace(memory_limit=16 << 30))
    monkeypatch.setattr(distributed, "get_worker", lambda: big)
    assert fst._worker_memory_limit() == 16 << 30
    assert isinstance(fst.tune_malloc(), bool)  # allowed (False only off glibc)
