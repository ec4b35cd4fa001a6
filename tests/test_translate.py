"""Generators, checkpoints (pytorch-CycleGAN-and-pix2pix layout) and tiled translation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dask  # noqa: E402
import dask.array as da  # noqa: E402

from daskpath.errors import ModelError  # noqa: E402
from daskpath.translate import inference as inf  # noqa: E402
from daskpath.translate.checkpoints import (GeneratorSpec, infer_spec, load_generator,  # noqa: E402
                                            save_generator)
from daskpath.translate.networks import count_params, define_G, init_weights  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# the documented layout, written out independently of daskpath.translate.networks
# ---------------------------------------------------------------------------------------------
def documented_resnet_layout(ngf=64, n_blocks=9, norm="instance", dropout=False):
    """Keys and shapes of the reference's ResnetGenerator (facts.md, 'GAN checkpoints')."""
    bias = norm == "instance"
    out = {}
    idx = 0

    def conv(i, cout, cin, k, transpose=False):
        out[f"model.{i}.weight"] = (cin, cout, k, k) if transpose else (cout, cin, k, k)
        if bias:
            out[f"model.{i}.bias"] = (cout,)

    def bn(prefix, c):
        if norm == "batch":
            for n in ("weight", "bias", "running_mean", "running_var"):
                out[f"{prefix}.{n}"] = (c,)
            out[f"{prefix}.num_batches_tracked"] = ()

    # ReflectionPad(3) [0], Conv7 [1], norm [2], ReLU [3]
    conv(1, ngf, 3, 7)
    bn("model.2", ngf)
    idx = 4
    for m in (1, 2):  # downsampling: Conv3 s2, norm, ReLU
        conv(idx, ngf * 2 * m, ngf * m, 3)
        bn(f"model.{idx + 1}", ngf * 2 * m)
        idx += 3
    dim = ngf * 4
    for _ in range(n_blocks):
        c2 = 6 if dropout else 5
        for j in (1, c2):
            out[f"model.{idx}.conv_block.{j}.weight"] = (dim, dim, 3, 3)
            if bias:
                out[f"model.{idx}.conv_block.{j}.bias"] = (dim,)
            bn(f"model.{idx}.conv_block.{j + 1}", dim)
        idx += 1
    for m in (4, 2):  # ConvTranspose3, norm, ReLU
        conv(idx, ngf * m // 2, ngf * m, 3, transpose=True)
        bn(f"model.{idx + 1}", ngf * m // 2)
        idx += 3
    # ReflectionPad(3) [idx], Conv7 with bias always [idx+1], Tanh
    out[f"model.{idx + 1}.weight"] = (3, ngf, 7, 7)
    out[f"model.{idx + 1}.bias"] = (3,)
    return out


def reference_checkpoint(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    return sd


def test_resnet9_instance_layout_matches_documentation():
    layout = documented_resnet_layout()
    assert len(layout) == 48
    net = define_G("resnet_9blocks", 64, "instance")
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == layout
    assert list(net.state_dict()) == list(layout)  # same order as the reference saves
    assert count_params(net) == 11_378_179  # "11.378 M"
    assert "model.26.weight" in layout


@pytest.mark.parametrize("n_blocks,norm,dropout", [(9, "instance", False), (6, "instance", True),
                                                   (6, "batch", False), (9, "batch", True),
                                                   (6, "none", False)])
def test_documented_checkpoint_loads_strictly(tmp_path, n_blocks, norm, dropout):
    layout = documented_resnet_layout(ngf=8, n_blocks=n_blocks, norm=norm, dropout=dropout)
    sd = reference_checkpoint(layout)
    torch.save(sd, tmp_path / "latest_net_G_A.pth")
    net, spec = load_generator(tmp_path)  # no spec: inferred from the keys
    assert (spec.arch, spec.ngf, spec.norm, spec.dropout) == (f"resnet_{n_blocks}blocks", 8, norm, dropout)
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k])


@pytest.mark.parametrize("arch", ["unet_128", "unet_256", "resnet_6blocks", "resnet_9blocks"])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_each_generator_roundtrips_reference_files(tmp_path, arch, norm):
    ref = init_weights(define_G(arch, 4, norm, use_dropout=True))
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "latest_net_G.pth")
    spec = GeneratorSpec(arch=arch, ngf=4, norm=norm, dropout=True, tile=256)
    (tmp_path / "daskpath.json").write_text(json.dumps(spec.to_json()))
    net, got = load_generator(tmp_path)
    assert got.arch == arch
    side = 256 if arch == "unet_256" else 128
    x = torch.rand(1, 3, side, side) * 2 - 1
    ref.eval()
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))


def test_module_prefix_and_old_instancenorm_buffers(tmp_path):
    ref = init_weights(define_G("resnet_6blocks", 8, "instance"))
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    # PyTorch < 0.4 saved running stats for InstanceNorm2d layers: model.2, model.5, conv_block.2 ...
    sd["module.model.2.running_mean"] = torch.zeros(8)
    sd["module.model.2.running_var"] = torch.ones(8)
    sd["module.model.10.conv_block.2.running_mean"] = torch.zeros(32)
    sd["module.model.10.conv_block.2.num_batches_tracked"] = torch.tensor(3)
    torch.save(sd, tmp_path / "latest_net_G_A.pth")
    net, spec = load_generator(tmp_path / "latest_net_G_A.pth")
    assert spec.arch == "resnet_6blocks"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), ref.eval()(x))


def test_epoch_checkpoint_picks_highest(tmp_path):
    a = define_G("resnet_6blocks", 4, "instance")
    b = init_weights(define_G("resnet_6blocks", 4, "instance"))
    torch.save(a.state_dict(), tmp_path / "5_net_G_A.pth")
    torch.save(b.state_dict(), tmp_path / "20_net_G_A.pth")
    torch.save(a.state_dict(), tmp_path / "20_net_D_A.pth")
    net, _ = load_generator(tmp_path)
    assert torch.equal(net.state_dict()["model.1.weight"], b.state_dict()["model.1.weight"])


def _bad_cases(tmp_path):
    good = define_G("resnet_6blocks", 4, "instance").state_dict()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "latest_net_G.pth").write_bytes(b"not a checkpoint at all")
    (tmp_path / "wrongarch").mkdir()
    torch.save(good, tmp_path / "wrongarch" / "latest_net_G.pth")
    spec = GeneratorSpec(arch="resnet_9blocks", ngf=4, norm="instance")
    (tmp_path / "wrongarch" / "daskpath.json").write_text(json.dumps(spec.to_json()))
    (tmp_path / "wrongnorm").mkdir()
    torch.save(good, tmp_path / "wrongnorm" / "latest_net_G.pth")
    (tmp_path / "wrongnorm" / "daskpath.json").write_text(
        json.dumps(GeneratorSpec(arch="resnet_6blocks", ngf=4, norm="batch").to_json()))
    (tmp_path / "empty").mkdir()
    torch.save(define_G("resnet_6blocks", 4, "instance"), tmp_path / "module.pth")  # pickled module
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "notensors.pth")
    (tmp_path / "badspec").mkdir()
    torch.save(good, tmp_path / "badspec" / "latest_net_G.pth")
    (tmp_path / "badspec" / "daskpath.json").write_text('{"arch": "resnet_6blocks", "ngff": 4}')
    return {
        "missing file": (tmp_path / "nope.pth", "not found"),
        "missing name": ("no_such_model", "neither a shipped model"),
        "not a checkpoint": (tmp_path / "garbage", "not a PyTorch checkpoint"),
        "wrong arch": (tmp_path / "wrongarch", "does not fit resnet_9blocks"),
        "wrong norm": (tmp_path / "wrongnorm", "does not fit"),
        "no weights": (tmp_path / "empty", "no generator weights"),
        "pickled module": (tmp_path / "module.pth", "not a PyTorch checkpoint"),
        "no tensors": (tmp_path / "notensors.pth", "non-tensor"),
        "bad spec key": (tmp_path / "badspec", "unknown key 'ngff'"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing name", "not a checkpoint", "wrong arch",
                                  "wrong norm", "no weights", "pickled module", "no tensors",
                                  "bad spec key"])
def test_bad_models_raise_model_error(tmp_path, case):
    path, msg = _bad_cases(tmp_path)[case]
    with pytest.raises(ModelError, match=msg) as e:
        load_generator(path)
    assert "\n" not in str(e.value)


def test_unknown_state_dict_layout():
    with pytest.raises(ModelError, match="not a ResnetGenerator"):
        infer_spec({"fc.weight": torch.zeros(2, 2)})


def test_spec_validation():
    with pytest.raises(ModelError, match="tile"):
        GeneratorSpec(arch="resnet_6blocks", tile=130)
    with pytest.raises(ModelError, match="arch"):
        GeneratorSpec(arch="vgg")
    assert GeneratorSpec(arch="resnet_9blocks").halo == 88
    assert GeneratorSpec(arch="resnet_6blocks").halo == 64


# ---------------------------------------------------------------------------------------------
# tiled inference
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def he_image():
    from daskpath.synthetic import render_region

    img, _ = render_region(800, 700, 192, 256, size=(2048, 2048), seed=5, stain="he")
    return img


def _random_model(tmp_path, norm, seed=0, ngf=8):
    torch.manual_seed(seed)
    spec = GeneratorSpec(arch="resnet_6blocks", ngf=ngf, norm=norm, tile=192, halo=64)
    net = init_weights(define_G(spec.arch, spec.ngf, norm), "normal", 0.2)
    if norm == "batch":
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path / f"m_{norm}_{seed}"
    save_generator(net, folder, spec)
    return folder, spec


def test_tiled_equals_whole_image_batchnorm_eval(tmp_path, he_image):
    folder, spec = _random_model(tmp_path, "batch")
    net, _ = load_generator(folder)
    whole = inf.run_generator(net, he_image[None], spec)[0]
    tiled = inf.translate_array(he_image, net, spec, tile=192, halo=64, batch_size=3)
    assert np.abs(tiled.astype(int) - whole).max() <= 1
    d = da.from_array(he_image, chunks=(100, 130, 3))  # odd chunks: rechunked to multiples of 4
    with dask.config.set(scheduler="threads"):
        out = inf.translate(d, folder, tile=192, halo=64, batch_size=4).compute()
    assert out.dtype == np.uint8 and out.shape == he_image.shape
    assert np.abs(out.astype(int) - whole).max() <= 1
    assert (out != whole).mean() < 1e-3


def test_tiled_equals_whole_image_frozen_instance_stats(tmp_path, he_image):
    folder, spec = _random_model(tmp_path, "instance")
    net, _ = load_generator(folder)
    stats = inf.slide_norm_stats(net, he_image[None], spec)  # net now has frozen layers
    whole = inf.run_generator(net, he_image[None], spec)[0]
    d = da.from_array(he_image, chunks=(128, 96, 3))
    out = inf.translate(d, folder, tile=192, halo=64, norm_stats=stats).compute(scheduler="threads")
    assert np.abs(out.astype(int) - whole).max() <= 1
    # the default for instance norm computes slide statistics from sampled tiles
    auto = inf.translate(d, folder, tile=192, halo=64).compute(scheduler="threads")
    assert auto.shape == he_image.shape


def test_slide_statistics_remove_seams(tmp_path, he_image):
    folder, spec = _random_model(tmp_path, "instance", seed=1)
    d = da.from_array(he_image, chunks=(192, 256, 3))
    kw = dict(tile=96, halo=16)
    per_tile = inf.translate(d, folder, norm_stats="tile", **kw).compute(scheduler="sync")
    slide = inf.translate(d, folder, norm_stats="slide", **kw).compute(scheduler="sync")
    sy = inf.seam_positions(192, 96, 16)
    sx = inf.seam_positions(256, 96, 16)
    e_tile = inf.seam_energy(per_tile, sy, sx)["ratio"]
    e_slide = inf.seam_energy(slide, sy, sx)["ratio"]
    assert e_slide < e_tile
    assert e_slide < 1.3


def test_seam_energy_detects_steps():
    rng = np.random.default_rng(0)
    img = rng.integers(100, 110, (64, 64, 3)).astype(np.uint8)
    flat = inf.seam_energy(img, period=16)["ratio"]
    img[:, 32:] += 40
    step = inf.seam_energy(img, period=16)["ratio"]
    assert 0.8 < flat < 1.2 and step > 2


def test_unet_feather_and_small_images(tmp_path):
    torch.manual_seed(0)
    spec = GeneratorSpec(arch="unet_128", ngf=4, norm="batch", tile=128, halo=16)
    save_generator(init_weights(define_G("unet_128", 4, "batch")), tmp_path / "u", spec)
    img = np.random.default_rng(0).integers(0, 255, (150, 90, 3), dtype=np.uint8)
    out = inf.translate(da.from_array(img, chunks=(64, 64, 3)), tmp_path / "u", blend="feather")
    assert out.compute(scheduler="sync").shape == img.shape


def test_gpu_resource_annotation(tmp_path):
    folder, _ = _random_model(tmp_path, "batch")
    d = da.zeros((64, 64, 3), dtype=np.uint8, chunks=32)
    out = inf.translate(d, folder, tile=192, halo=64, resources={"GPU": 1})
    ann = [layer.annotations for layer in out.dask.layers.values() if layer.annotations]
    assert any(a.get("resources") == {"GPU": 1} for a in ann)


def test_model_is_not_in_the_graph(tmp_path):
    import pickle

    folder, _ = _random_model(tmp_path, "batch", ngf=16)
    out = inf.translate(da.zeros((64, 64, 3), dtype=np.uint8, chunks=32), folder, tile=192, halo=64)
    size = len(pickle.dumps(dict(out.__dask_graph__())))
    weights = (folder / "latest_net_G.pth").stat().st_size
    assert size < weights / 2


def test_import_daskpath_does_not_import_torch():
    code = "import sys, daskpath, daskpath.translate; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_balanced_window_layout_covers_with_least_overlap():
    # a 1088 px block with 768 px windows (halo 64): two 608 px windows, not two 768 px ones
    starts, t = inf.window_layout(1088, 768, 64)
    assert t == 608 and starts == [0, 480]
    assert inf.window_layout(500, 768, 64) == ([0], 500)
    for length in (200, 268, 1000, 1152, 2048):
        starts, t = inf.window_layout(length, 256, 32)
        assert t <= 256 and t % 4 == 0 and all(s % 4 == 0 for s in starts)
        assert len(starts) == len(inf.window_starts(length, 256, 32))  # no extra windows
        cores = inf._core_ranges(starts, t, length, 32)
        cover = np.zeros(length, int)
        for lo, hi in cores.values():
            cover[lo:hi] += 1
        assert (cover == 1).all()  # every pixel from exactly one window core


def test_task_threads_share_the_cores(monkeypatch):
    import threading

    monkeypatch.delenv("DASKPATH_TORCH_THREADS", raising=False)
    assert inf._task_threads(3) == 3
    assert inf._task_threads() is None  # main thread (sync scheduler): leave torch alone
    got = {}

    def worker():
        with dask.config.set(num_workers=2):
            got["n"] = inf._task_threads()

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert got["n"] == max(1, cores // 2)
    monkeypatch.setenv("DASKPATH_TORCH_THREADS", "1")
    assert inf._task_threads() == 1
