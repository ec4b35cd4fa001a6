"""Translator training (pix2pix, pyramid pix2pix, CycleGAN), scoring helpers, shipped model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from daskpath.errors import ConfigError, DaskpathError  # noqa: E402
from daskpath.translate import score  # noqa: E402
from daskpath.translate.checkpoints import SHIPPED_MODELS, load_generator  # noqa: E402
from daskpath.translate.train import (ImagePool, PairSampler, TrainConfig, gaussian_pyramid,  # noqa: E402
                                      main, pyramid_l1, train)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        a = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        out.append((a, 255 - a))
    return out


def _cfg(mode, **kw):
    opts = dict(ngf=4, ndf=4, crop=32, batch_size=2, epochs=1, steps_per_epoch=2, save_every=1, tile=192)
    return TrainConfig(mode=mode, **{**opts, **kw})


@pytest.mark.parametrize("mode", ["pix2pix", "pyramid", "cyclegan"])
def test_train_writes_compatible_checkpoints(tmp_path, pairs, mode):
    out = train(_cfg(mode), pairs, tmp_path, progress=False)
    g = "G_A" if mode == "cyclegan" else "G"
    assert (out / f"latest_net_{g}.pth").is_file() and (out / f"1_net_{g}.pth").is_file()
    net, spec = load_generator(out)
    assert spec.arch == "resnet_6blocks" and spec.ngf == 4
    sd = torch.load(out / f"latest_net_{g}.pth", weights_only=True)
    assert set(sd) == set(net.state_dict())  # plain state_dict, reference key names
    rows = list(csv.DictReader(open(out / "loss_log.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(v)) for v in rows[-1].values())
    assert (out / "loss_log.png").is_file()
    if mode == "pyramid":
        assert "G_pyramid" in rows[0]


def test_training_is_reproducible_and_resumes(tmp_path, pairs):
    a = train(_cfg("pix2pix", epochs=2), pairs, tmp_path / "a", progress=False)
    b = train(_cfg("pix2pix", epochs=1), pairs, tmp_path / "b", progress=False)
    b = train(_cfg("pix2pix", epochs=2), pairs, tmp_path / "b", progress=False, resume=True)
    sa = torch.load(a / "latest_net_G.pth", weights_only=True)
    sb = torch.load(b / "latest_net_G.pth", weights_only=True)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5), k
    rows = list(csv.DictReader(open(b / "loss_log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    with pytest.raises(DaskpathError, match="nothing to resume"):
        train(_cfg("pix2pix"), pairs, tmp_path / "c", progress=False, resume=True)


def test_cli_main(tmp_path, pairs):
    from PIL import Image

    for split in ("trainA", "trainB"):
        (tmp_path / "data" / split).mkdir(parents=True)
    for i, (a, b) in enumerate(pairs):
        Image.fromarray(a).save(tmp_path / "data" / "trainA" / f"{i}.png")
        Image.fromarray(b).save(tmp_path / "data" / "trainB" / f"{i}.png")
    rc = main([str(tmp_path / "m"), "--data", str(tmp_path / "data"), "--ngf", "4", "--ndf", "4",
               "--crop", "32", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1",
               "--tile", "192", "--no-progress"])
    assert rc == 0
    spec = json.loads((tmp_path / "m" / "daskpath.json").read_text())
    assert spec["extra"]["training"]["extra"]["command"].startswith("python -m daskpath.translate.train")
    assert main([str(tmp_path / "m2"), "--data", str(tmp_path / "nodata"), "--no-progress"]) == 2


def test_config_errors():
    with pytest.raises(ConfigError, match="mode"):
        TrainConfig(mode="gan")
    with pytest.raises(ConfigError, match="crop"):
        TrainConfig(crop=30)


def test_gaussian_pyramid_octaves():
    x = torch.zeros(1, 3, 64, 64)
    x[..., 32, 32] = 1.0
    levels = gaussian_pyramid(x)
    assert [tuple(t.shape[-2:]) for t in levels] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    # 3x3 Gaussian (sigma 1) four times keeps the mass, then every second pixel is kept
    k = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / 2)
    k = k / k.sum()
    y = x
    for _ in range(4):
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (1, 1, 1, 1), mode="reflect"),
                                       (k[:, None] * k[None, :]).expand(3, 1, 3, 3), groups=3)
    assert torch.allclose(levels[1], y[..., ::2, ::2])
    assert float(pyramid_l1(x, x)) == 0.0


def test_sampler_aligned_and_pool():
    a = np.arange(40 * 40 * 3, dtype=np.uint8).reshape(40, 40, 3)
    s = PairSampler([(a, a.copy())], crop=16)
    xa, xb = s.batch(4, np.random.default_rng(0))
    assert torch.equal(xa, xb) and xa.shape == (4, 3, 16, 16)
    pool = ImagePool(2)
    assert pool.query(torch.zeros(3, 1, 2, 2)).shape == (3, 1, 2, 2)


def test_ratio_metrics_and_bins():
    m = score.ratio_metrics([0.1, 0.3, 0.6, np.nan], [0.12, 0.55, 0.6, 0.2])
    assert m["n"] == 3 and m["acc3"] == pytest.approx(2 / 3)
    assert m["confusion"] == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert m["mae"] == pytest.approx((0.02 + 0.25 + 0) / 3)


def test_dab_measure_on_real_phantom_ihc():
    from daskpath.synthetic import render_region

    size = (2048, 2048)
    ihc, lab = render_region(700, 1400, 384, 384, size=size, seed=4, stain="ihc")
    nuc = score.measure_dab_nuclei(ihc)
    assert abs(len(nuc) - len(np.unique(lab[lab > 0]))) <= 0.15 * len(nuc)
    assert 0 < nuc["positive"].mean() < 1


@pytest.mark.skipif(not (SHIPPED_MODELS["phantom"] / "daskpath.json").is_file(), reason="no shipped model")
def test_shipped_phantom_model_makes_brown_positive_nuclei():
    from daskpath.synthetic import DEFAULT_OFFSET, render_region
    from daskpath.translate.inference import get_generator, resolve_translator, translate_array

    size, (dy, dx) = (4096, 4096), DEFAULT_OFFSET
    he, lab_he = render_region(1500, 2600, 256, 256, size=size, seed=77, stain="he")
    ihc, _ = render_region(1500 + dy, 2600 + dx, 256, 256, size=size, seed=77, stain="ihc")
    net, spec = load_generator("phantom")
    assert spec.extra["training"]["extra"]["command"].startswith("python -m daskpath.translate.train")
    ref = resolve_translator("phantom")
    virt = translate_array(he, get_generator(ref), spec)
    v = score.measure_dab_nuclei(virt)
    r = score.measure_dab_nuclei(ihc)
    ratio = lambda d: (d["area"] * d["positive"]).sum() / d["area"].sum()  # noqa: E731
    assert abs(ratio(v) - ratio(r)) < 0.1


def test_pooled_norm_training_keeps_the_reference_layout(tmp_path, pairs):
    from daskpath.translate.train import PooledNorm, pool_instance_norms
    from daskpath.translate.networks import define_G

    g = define_G("resnet_6blocks", 4, "instance")
    keys = set(g.state_dict())
    assert pool_instance_norms(g) > 0 and set(g.state_dict()) == keys
    x = torch.randn(3, 4, 8, 8) * 2 + 1
    y = PooledNorm()(x)
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.var(unbiased=False)) - 1) < 1e-3
    out = train(_cfg("pix2pix", train_norm="pooled"), pairs, tmp_path / "p", progress=False)
    net, spec = load_generator(out)  # strict load into a plain instance-norm generator
    assert spec.norm == "instance" and spec.extra["training"]["train_norm"] == "pooled"
    init = train(_cfg("pix2pix", train_norm="pooled", init_from=str(out), lr=0.0), pairs,
                 tmp_path / "i", progress=False)
    a = torch.load(out / "latest_net_G.pth", weights_only=True)
    b = torch.load(init / "latest_net_G.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the initial weights come through
    # instance (pooled) -> batch norm: same function in train mode, running stats for eval
    bn = train(_cfg("pix2pix", norm="batch", init_from=str(out), lr=0.0), pairs, tmp_path / "b",
               progress=False)
    gi, _ = load_generator(out)
    gb, _ = load_generator(bn, eval=False)
    pool_instance_norms(gi)
    for m in gb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gi(x), gb.train()(x), atol=1e-4)
    with pytest.raises(ConfigError):
        TrainConfig(train_norm="group")
