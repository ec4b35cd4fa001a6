"""Baselines from H&E alone: random-forest pixel classifier and 3-class ResNet18.

Figures use the shipped phantom models on a held-out phantom slide (seed 101, not among the
training seeds 20-31): a slide-level split.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
#: the random forest needs scikit-learn and skops (the classifier only torch)
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None or importlib.util.find_spec("skops") is None,
    reason="scikit-learn / skops not installed")

from daskpath.baselines import data as bdata  # noqa: E402
from daskpath.errors import InvalidInputError, ModelError, ModelNotFoundError  # noqa: E402
from daskpath.synthetic import render_region  # noqa: E402
from daskpath.tiles import tile_grid  # noqa: E402
from daskpath.translate.score import ratio_metrics  # noqa: E402


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Held-out phantom slide (seed 101, 4096^2, JPEG TIFF as written for users) and its kept
    1024 px tiles (tissue >= 0.5) with truth ratios."""
    slide = bdata.phantom_slide(101, (4096, 4096), tmp_path_factory.mktemp("heldout"))
    tiles = bdata.heldout_tiles(slide, 1024, 0.5)
    return slide, tiles


@pytest.fixture(scope="module")
def small_he():
    rgb, _ = render_region(1400, 1800, 300, 260, size=(4096, 4096), seed=5, stain="he")
    return rgb


def test_import_stays_light():
    code = ("import sys, daskpath, daskpath.baselines, daskpath.baselines.rf, daskpath.baselines.classifier; "
            "print(sorted(m for m in ('torch', 'sklearn', 'skops', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# random forest
# ---------------------------------------------------------------------------------------------
@needs_sklearn
@pytest.mark.parametrize("chunks", [(97, 131), (300, 29), (61, 67), (25, 260)])
def test_rf_chunked_equals_whole_image(small_he, chunks):
    from daskpath.baselines.rf import classify_image, load_rf, predict_pixels_rf

    clf, spec = load_rf("phantom")
    whole = classify_image(small_he, clf, spec)
    assert set(np.unique(whole)) == {0, 1, 2}
    lazy = predict_pixels_rf(da.from_array(small_he, chunks=(*chunks, 3)), "phantom")
    assert lazy.dtype == np.uint8 and lazy.shape == small_he.shape[:2]
    with dask.config.set(scheduler="threads"):
        got = lazy.compute()
    np.testing.assert_array_equal(got, whole)


def test_rf_features_need_exactly_the_halo(small_he):
    from daskpath.baselines.rf import RFSpec, pixel_features

    spec = RFSpec()
    d = spec.depth
    assert d == int(4 * spec.sigma_max + 0.5) + 2
    full = pixel_features(small_he, spec)
    assert full.shape[-1] == spec.n_features == 32
    inner = pixel_features(small_he[100 - d:200 + d, 60 - d:160 + d], spec)[d:-d, d:-d]
    np.testing.assert_array_equal(inner, full[100:200, 60:160])
    short = pixel_features(small_he[101 - d:199 + d, 61 - d:159 + d], spec)[d - 1:-d + 1, d - 1:-d + 1]
    assert not np.array_equal(short, full[100:200, 60:160])  # depth - 1 is not enough


@needs_sklearn
def test_rf_fast_features_equal_skimage(small_he):
    """Optimisation (issue 12): the OpenCV feature path equals skimage's
    multiscale_basic_features within float32 rounding, and the forest's classes with it."""
    from daskpath.baselines.rf import load_rf, pixel_features

    clf, spec = load_rf("phantom")
    ref = pixel_features(small_he, spec, reference=True)
    fast = pixel_features(small_he, spec)
    assert fast.shape == ref.shape and fast.dtype == np.float32 and fast.flags.c_contiguous
    scale = np.abs(ref).max(axis=(0, 1))
    err = np.abs(fast - ref).max(axis=(0, 1))
    assert (err <= 1e-6 + 1e-4 * scale).all(), err  # measured: <= 4e-7 absolute
    a = clf.predict(ref.reshape(-1, ref.shape[-1]))
    b = clf.predict(fast.reshape(-1, fast.shape[-1]))
    assert np.mean(a != b) <= 1e-4  # measured: 0 of 1.2 M pixels differ


def test_rf_gradient_is_numpys_bit_for_bit():
    """Optimisation (issue 12): the OpenCV gradient of the Hessian features is np.gradient."""
    from daskpath.baselines.rf import _gradient

    rng = np.random.default_rng(4)
    for shape in [(300, 411), (2, 9), (9, 2), (5, 5)]:
        g = (rng.random(shape) * 3 - 1).astype(np.float32) ** 3
        for axis in (0, 1):
            got = _gradient(g, axis)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, np.gradient(g, axis=axis))
            np.testing.assert_array_equal(_gradient(g[::-1, ::-1], axis),
                                          np.gradient(g[::-1, ::-1], axis=axis))


@needs_sklearn
def test_rf_heldout_phantom_slide(heldout):
    from daskpath.baselines import predict_tiles_rf

    slide, tiles = heldout
    he = da.from_array(slide.he, chunks=(2048, 2048, 3))
    with dask.config.set(scheduler="threads"):
        got = predict_tiles_rf(he, tiles, "phantom")
    assert list(got.columns[: len(tiles.columns)]) == list(tiles.columns)
    assert {"ratio_rf", "class_rf", "nucleus_px_rf", "positive_px_rf"} <= set(got.columns)
    m = ratio_metrics(got["ratio_rf"], got["truth"])
    # measured: 9 tiles, 3-class accuracy 1.0, MAE 0.002 (a pixel classifier on phantom H&E)
    assert m["n"] == len(tiles) >= 8
    assert m["acc3"] >= 0.9, m
    assert m["mae"] <= 0.02, m
    assert ((got["ratio_rf"] >= 0) & (got["ratio_rf"] <= 1)).all()


@needs_sklearn
def test_rf_tiles_only_computes_needed_chunks(small_he):
    from daskpath.baselines.rf import predict_tiles_rf

    he = da.from_array(small_he, chunks=(100, 100, 3))
    tiles = pd.DataFrame({"y0": [10], "x0": [20], "height": [50], "width": [60]})
    lazy = predict_tiles_rf(he, tiles, "phantom", compute=False)
    keys = [k for k in dict(lazy.__dask_graph__()) if "_count_rects" in str(k)]
    assert len(keys) == 1  # one chunk meets the tile
    with dask.config.set(scheduler="sync"):
        got = lazy.compute()
    assert got["nucleus_px_rf"].iloc[0] >= got["positive_px_rf"].iloc[0]


@needs_sklearn
@pytest.mark.parametrize("chunks", [(97, 131), (300, 260), (61, 67)])
def test_rf_tiles_classify_only_the_tiles_and_equal_the_whole_map(small_he, chunks):
    """Optimisation (issue 12): only the tiles' pixels are classified, not their chunks; the
    counts equal those of the whole-image class map for tiles that cross chunk borders, touch
    the slide edge or overlap each other."""
    from daskpath.baselines.rf import classify_image, load_rf, predict_tiles_rf

    clf, spec = load_rf("phantom")
    whole = classify_image(small_he, clf, spec)
    tiles = pd.DataFrame({"y0": [0, 90, 150, 240, 37], "x0": [0, 120, 200, 0, 37],
                          "height": [64, 100, 150, 60, 90], "width": [80, 90, 60, 260, 90]})
    he = da.from_array(small_he, chunks=(*chunks, 3))
    with dask.config.set(scheduler="sync"):
        got = predict_tiles_rf(he, tiles, "phantom")
    for r, g in zip(tiles.itertuples(), got.itertuples()):
        c = whole[r.y0:r.y0 + r.height, r.x0:r.x0 + r.width]
        assert g.positive_px_rf == np.count_nonzero(c == 2)
        assert g.nucleus_px_rf == np.count_nonzero(c > 0)
    assert (got["nucleus_px_rf"] > 0).all()


@needs_sklearn
def test_rf_model_not_in_graph_and_cached():
    import cloudpickle

    from daskpath.baselines.rf import load_rf, predict_tiles_rf

    he = da.zeros((2048, 2048, 3), dtype=np.uint8, chunks=(1024, 1024, 3))
    lazy = predict_tiles_rf(he, tile_grid((2048, 2048), 1024), "phantom", compute=False)
    size = len(cloudpickle.dumps(dict(lazy.__dask_graph__())))
    assert size < 60_000  # the forest file alone is ~150 kB
    assert load_rf("phantom")[0] is load_rf("phantom")[0]


# ---------------------------------------------------------------------------------------------
# ResNet18 layout
# ---------------------------------------------------------------------------------------------
def documented_resnet18_layout(num_classes=1000):
    """torchvision resnet18 state dict, as documented: stem, 4 stages of 2 BasicBlocks, fc."""
    out = {"conv1.weight": (64, 3, 7, 7)}

    def bn(name, c):
        out.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                    f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})

    bn("bn1", 64)
    for stage, (cin, cout) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)], start=1):
        for b in (0, 1):
            p = f"layer{stage}.{b}"
            out[f"{p}.conv1.weight"] = (cout, cin if b == 0 else cout, 3, 3)
            bn(f"{p}.bn1", cout)
            out[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            bn(f"{p}.bn2", cout)
            if b == 0 and stage > 1:
                out[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                bn(f"{p}.downsample.1", cout)
    out["fc.weight"] = (num_classes, 512)
    out["fc.bias"] = (num_classes,)
    return out


def _checkpoint(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(3) if k.endswith("num_batches_tracked") else torch.rand(s, generator=g) + 0.5)
            for k, s in layout.items()}


def test_resnet18_has_torchvision_keys_and_loads_strictly(tmp_path):
    from daskpath.baselines.resnet import resnet18, torchvision_resnet18_layout

    layout = documented_resnet18_layout()
    assert len(layout) == 122
    net = resnet18(num_classes=1000)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == layout
    assert torchvision_resnet18_layout() == layout
    assert sum(p.numel() for p in net.parameters()) == 11_689_512  # torchvision's resnet18
    sd = _checkpoint(layout)
    torch.save(sd, tmp_path / "resnet18-f37072fd.pth")
    net.load_state_dict(torch.load(tmp_path / "resnet18-f37072fd.pth", weights_only=True), strict=True)
    assert torch.equal(net.layer3[0].downsample[0].weight, sd["layer3.0.downsample.0.weight"])


def test_torchvision_backbone_into_3_class_head(tmp_path):
    from daskpath.baselines.resnet import load_torchvision_weights, resnet18

    sd = _checkpoint(documented_resnet18_layout())
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "imagenet.pth")
    net = resnet18(num_classes=3)
    head = net.fc.weight.detach().clone()
    load_torchvision_weights(net, tmp_path / "imagenet.pth")
    assert torch.equal(net.conv1.weight, sd["conv1.weight"])
    assert torch.equal(net.fc.weight, head) and net.fc.weight.shape == (3, 512)
    with pytest.raises(ModelError, match="width=64"):
        load_torchvision_weights(resnet18(num_classes=3, width=16), sd)
    with pytest.raises(ModelError, match="no such checkpoint"):
        load_torchvision_weights(net, tmp_path / "missing.pth")


def test_width_reduced_resnet_keeps_keys():
    from daskpath.baselines.resnet import resnet18

    small = resnet18(num_classes=3, width=16)
    assert list(small.state_dict()) == list(documented_resnet18_layout(3))
    assert small(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# classifier
# ---------------------------------------------------------------------------------------------
def test_classifier_heldout_phantom_slide(heldout):
    from daskpath.baselines import predict_tiles_classifier, ratio_class

    slide, tiles = heldout
    he = da.from_array(slide.he, chunks=(2048, 2048, 3))
    with dask.config.set(scheduler="threads"):
        got = predict_tiles_classifier(he, tiles, "phantom", device="cpu", batch_size=4)
    truth_cls = ratio_class(got["truth"])
    acc3 = float((got["class_classifier"].to_numpy() == truth_cls).mean())
    mae = float(np.abs(got["ratio_classifier"] - got["truth"]).mean())
    # measured on this slide: 9 tiles, accuracy 1.0, MAE 0.08 (ratio = expected class midpoint)
    assert acc3 >= 0.75, (acc3, got[["truth", "class_classifier"]])
    assert mae <= 0.12
    p = got[[f"prob_classifier_{k}" for k in range(3)]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got["ratio_classifier"], p @ np.array([0.1, 0.35, 0.75]), atol=1e-9)


def test_classifier_small_tiles_get_no_prediction(small_he):
    from daskpath.baselines import predict_tiles_classifier

    tiles = pd.DataFrame({"y0": [0, 0], "x0": [0, 200], "height": [256, 40], "width": [200, 60]})
    with dask.config.set(scheduler="sync"):
        got = predict_tiles_classifier(small_he, tiles, "phantom", device="cpu")
    assert got["class_classifier"].tolist()[1] == -1 and np.isnan(got["ratio_classifier"].iloc[1])
    assert got["class_classifier"].iloc[0] in (0, 1, 2)


@needs_sklearn
def test_both_on_worker_processes(dask_client, small_he):
    from daskpath.baselines import predict_tiles_classifier, predict_tiles_rf

    he = da.from_array(small_he, chunks=(128, 128, 3))
    tiles = tile_grid(small_he.shape[:2], 128)
    with dask.config.set(scheduler="sync"):
        ref_rf = predict_tiles_rf(he, tiles, "phantom")
        ref_cl = predict_tiles_classifier(he, tiles, "phantom", device="cpu")
    rf = dask_client.compute(predict_tiles_rf(he, tiles, "phantom", compute=False)).result()
    cl = dask_client.compute(predict_tiles_classifier(he, tiles, "phantom", compute=False)).result()
    pd.testing.assert_frame_equal(rf, ref_rf)
    np.testing.assert_array_equal(cl["class_classifier"], ref_cl["class_classifier"])
    np.testing.assert_allclose(cl["ratio_classifier"], ref_cl["ratio_classifier"], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the thing and the fix
# ---------------------------------------------------------------------------------------------
def _rf(he, tiles, model="phantom"):
    from daskpath.baselines import predict_tiles_rf

    return predict_tiles_rf(he, tiles, model, compute=False)


def _cl(he, tiles, model="phantom"):
    from daskpath.baselines import predict_tiles_classifier

    return predict_tiles_classifier(he, tiles, model, compute=False)


_TILES = pd.DataFrame({"y0": [0], "x0": [0], "height": [64], "width": [64]})
_HE = np.zeros((128, 128, 3), np.uint8)


@pytest.mark.parametrize("predict", [_rf, _cl], ids=["rf", "classifier"])
@pytest.mark.parametrize("he,tiles,model,exc,match", [
    (_HE, _TILES, "/no/such/model", ModelNotFoundError, "no such folder; use a shipped name"),
    (_HE, _TILES, "nope", ModelNotFoundError, "'nope': no such folder"),
    (_HE.astype(np.float32), _TILES, "phantom", InvalidInputError, "dtype float32 is not supported; pass RGB uint8"),
    (np.zeros((128, 128, 4), np.uint8), _TILES, "phantom", InvalidInputError, r"shape \(128, 128, 4\) is not"),
    (_HE, _TILES.drop(columns="width"), "phantom", InvalidInputError, "column 'width' is missing"),
    (_HE, _TILES.assign(y0=100), "phantom", InvalidInputError, "outside the 128 x 128 image"),
    (_HE, _TILES.assign(y0=0.5), "phantom", InvalidInputError, "must hold integers"),
    (_HE, [[0, 0, 64, 64]], "phantom", InvalidInputError, "pass a DataFrame"),
])
def test_bad_input_one_line(predict, he, tiles, model, exc, match):
    with pytest.raises(exc, match=match) as e:
        predict(he, tiles, model)
    assert "\n" not in str(e.value)


@needs_sklearn
def test_model_folder_of_other_kind_or_incomplete(tmp_path):
    import shutil

    from daskpath.baselines._common import SHIPPED

    with pytest.raises(ModelError, match="kind='rf' but a 'classifier' model is needed"):
        _cl(_HE, _TILES, SHIPPED["rf"]["phantom"])
    with pytest.raises(ModelError, match="no daskpath.json"):
        _rf(_HE, _TILES, tmp_path)
    broken = tmp_path / "rf"
    shutil.copytree(SHIPPED["rf"]["phantom"], broken)
    (broken / "model.skops").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="model.skops: cannot load"):
        _rf(_HE, _TILES, broken)


@needs_sklearn
def test_corrupt_tree_is_refused():
    import copy

    from daskpath.baselines.rf import _check_forest, load_rf

    clf, spec = load_rf("phantom")
    _check_forest(clf, spec.n_features, "shipped")
    bad = copy.deepcopy(clf)
    state = bad.estimators_[0].tree_.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = 10**6
    state["nodes"] = nodes
    bad.estimators_[0].tree_.__setstate__(state)
    with pytest.raises(ModelError, match="tree 0 is corrupt"):
        _check_forest(bad, spec.n_features, "crafted.skops")


@needs_sklearn
# ---------------------------------------------------------------------------------------------
# training commands (tiny runs: the shipped models come from the README commands)
# ---------------------------------------------------------------------------------------------
def test_train_rf_main_writes_a_usable_model(tmp_path, capsys):
    from daskpath.baselines.rf import load_rf, main

    out = tmp_path / "rf"
    assert main([str(out), "--seeds", "1", "--heldout-seeds", "2", "--size", "1024", "1024",
                 "--windows", "1", "--window", "256", "--trees", "2", "--max-depth", "6",
                 "--tile", "512", "--workdir", str(tmp_path / "ph")]) == 0
    assert '"val_pixel_accuracy"' in capsys.readouterr().out
    clf, spec = load_rf(out)
    assert len(clf.estimators_) == 2 and spec.extra["training"]["seeds"] == [1]
    assert (out / "evaluation.json").is_file()
    with pytest.raises(InvalidInputError, match="both a training and a held-out"):
        main([str(out), "--seeds", "1", "--heldout-seeds", "1"])


def test_train_classifier_main_writes_a_usable_model(tmp_path, capsys):
    from daskpath.baselines.classifier import load_classifier, main

    out = tmp_path / "cl"
    assert main([str(out), "--seeds", "1", "--heldout-seeds", "2", "--size", "1024", "1024",
                 "--tile", "512", "--stride", "128", "--steps", "2", "--batch-size", "4",
                 "--threads", "1", "--workdir", str(tmp_path / "ph")]) == 0
    assert '"heldout"' in capsys.readouterr().out
    net, spec = load_classifier(out, "cpu")
    assert spec.width == 16 and spec.extra["training"]["steps"] == 2
    assert (out / "loss_log.csv").read_text().startswith("step,loss,acc,lr")
