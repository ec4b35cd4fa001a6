"""Nuclei stage (daskpath.nuclei): shipped StarDist model vs phantom truth, chunked vs whole
image, ownership at chunk borders, ratio methods, tile ratios, model loading errors.

TensorFlow tests carry the ``nuclei`` marker and skip when stardist is not importable.
"""

from __future__ import annotations

import importlib.util
import json

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest

from daskpath import nuclei, ome
from daskpath.errors import InvalidInputError, ModelError

HAVE_STARDIST = importlib.util.find_spec("stardist") is not None and (
    importlib.util.find_spec("tensorflow") is not None
)
SKIP_REASON = "stardist/tensorflow not installed (extra 'nuclei')"
needs_tf = [pytest.mark.nuclei, pytest.mark.skipif(not HAVE_STARDIST, reason=SKIP_REASON)]

SLIDE = (2048, 2048)
SEED = 5
TILE = 512


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """A 2048^2 phantom IHC slide written as tiled JPEG TIFF, read back, with its truth."""
    import tifffile
    import zarr

    from daskpath.synthetic import make_pair

    out = tmp_path_factory.mktemp("nuclei_phantom")
    pair = make_pair(out, slide="nuc", size=SLIDE, seed=SEED)
    rgb = tifffile.imread(pair.ihc)
    truth = pd.read_parquet(pair.truth_nuclei)
    labels = np.asarray(zarr.open_group(str(pair.truth_labels), mode="r")["ihc_labels"][:])
    return {"rgb": rgb, "truth": truth, "labels": labels, "pair": pair}


@pytest.fixture(scope="session")
def tiles():
    rows = [
        {"slide": "nuc", "y0": y, "x0": x, "height": TILE, "width": TILE}
        for y in range(0, SLIDE[0], TILE) for x in range(0, SLIDE[1], TILE)
    ]
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def measured(phantom, tmp_path_factory):
    """The nucleus method on the whole phantom; labels written to zarr in the same pass."""
    rgb = da.from_array(phantom["rgb"], chunks=(512, 512, 3))
    store = str(tmp_path_factory.mktemp("labels") / "labels.zarr")
    df = nuclei.measure_nuclei(rgb, "phantom", method="nucleus", labels_store=store)
    return df, ome.read_image(store)  # level 0 of the NGFF label image


@pytest.fixture(scope="session")
def model_input(phantom):
    from daskpath.stain import hematoxylin_dab

    h, dab = hematoxylin_dab(phantom["rgb"])
    x = h + dab
    ref = nuclei.resolve_model("phantom")
    norm = nuclei.slide_percentiles(x, ref.percentiles)
    return x, norm


# ---------------------------------------------------------------------------------------------
# accuracy vs phantom truth
# ---------------------------------------------------------------------------------------------
class TestAccuracy:
    pytestmark = needs_tf

    def test_detection_f1_vs_truth(self, phantom, measured):
        from stardist.matching import matching

        df, lab = measured
        st = matching(phantom["labels"], lab, thresh=0.5)
        print(f"\nF1@0.5 = {st.f1:.4f} (precision {st.precision:.4f}, recall {st.recall:.4f}, "
              f"{st.n_true} true, {st.n_pred} predicted)")
        assert st.f1 >= 0.9
        assert lab.dtype == np.int32
        assert set(np.unique(lab)) - {0} == set(df["id"])  # every painted id is in the table

    def test_tile_ratio_vs_truth(self, phantom, tiles, measured):
        measured, _ = measured
        truth = phantom["truth"]
        ours = nuclei.tile_ratios(measured, tiles)
        ref = nuclei.tile_ratios(truth, tiles)
        ok = ref["ratio_ihc"].notna() & ours["ratio_ihc"].notna()
        assert ok.sum() >= 8
        err = (ours["ratio_ihc"] - ref["ratio_ihc"])[ok].abs()
        err_c = (ours["ki67_index_ihc"] - ref["ki67_index_ihc"])[ok].abs()
        print(f"\nper-tile ratio_ihc: MAE {err.mean():.4f}, max {err.max():.4f} over {ok.sum()} "
              f"tiles; ki67_index MAE {err_c.mean():.4f}, max {err_c.max():.4f}; "
              f"threshold {measured.attrs['dab_threshold']:.3f}")
        assert err.max() <= 0.03
        assert err_c.max() <= 0.03

    def test_positive_classification(self, phantom, measured):
        """Nuclei matched to the truth by centroid agree on Ki67 status."""
        from scipy.spatial import cKDTree

        truth = phantom["truth"]
        measured, _ = measured
        d, i = cKDTree(truth[["y", "x"]].to_numpy()).query(measured[["y", "x"]].to_numpy())
        close = d < 3
        agree = (measured["positive"].to_numpy()[close] == truth["positive"].to_numpy()[i[close]])
        assert close.mean() > 0.9
        assert agree.mean() > 0.99

    def test_two_channel_method(self, phantom, tiles, measured):
        measured, _ = measured
        rgb = da.from_array(phantom["rgb"][:1024], chunks=(512, 1024, 3))
        two = nuclei.measure_nuclei(rgb, "phantom", method="two-channel")
        assert set(two["channel"]) == {"dab", "hematoxylin"}
        assert two.attrs["n_dab"] > 0 and two.attrs["n_hematoxylin"] > 0
        top = tiles[tiles["y0"] < 1024]
        r2 = nuclei.tile_ratios(two, top, suffix="two_channel")
        r1 = nuclei.tile_ratios(measured, top)
        both = r1["ratio_ihc"].notna() & r2["ratio_two_channel"].notna()
        diff = (r2["ratio_two_channel"] - r1["ratio_ihc"])[both]
        truth = nuclei.tile_ratios(phantom["truth"], top)["ratio_ihc"]
        e1 = (r1["ratio_ihc"] - truth)[both].abs()
        e2 = (r2["ratio_two_channel"] - truth)[both].abs()
        print(f"\ntwo-channel minus nucleus ratio per tile: mean {diff.mean():+.4f}, "
              f"MAE {diff.abs().mean():.4f} over {both.sum()} tiles; MAE vs truth: nucleus "
              f"{e1.mean():.4f}, two-channel {e2.mean():.4f}")
        assert both.sum() >= 4 and np.isfinite(diff).all()
        # the nucleus method is the accurate one; the study's method is reported, not trusted
        assert e1.mean() <= e2.mean() + 1e-9
        # two-channel still tracks the truth (same ordering of tiles)
        assert np.corrcoef(r2["ratio_two_channel"][both], truth[both])[0, 1] > 0.8

    def test_region_gives_the_same_nuclei_as_the_whole_slide(self, phantom, measured, tmp_path):
        """Segmenting only the chunks that meet two tiles finds, in those tiles, exactly the
        nuclei (ids, areas, DAB) of the whole-slide run, and runs StarDist on nothing else."""
        full, _ = measured
        rects = [(512, 1024, 512, 1024), (1024, 1536, 1536, 2048)]  # (y0, y1, x0, x1)
        rgb = da.from_array(phantom["rgb"], chunks=(512, 512, 3))
        store = str(tmp_path / "labels.zarr")
        tiles = pd.DataFrame([(y0, x0, y1 - y0, x1 - x0) for y0, y1, x0, x1 in rects],
                             columns=["y0", "x0", "height", "width"])  # a tile table
        part = nuclei.measure_nuclei(rgb, "phantom", region=tiles, labels_store=store)

        def inside(df):
            m = np.zeros(len(df), bool)
            for y0, y1, x0, x1 in rects:
                m |= (df["y"] >= y0) & (df["y"] < y1) & (df["x"] >= x0) & (df["x"] < x1)
            return df[m].sort_values("id").reset_index(drop=True)

        got, want = inside(part), inside(full)
        assert len(want) > 50
        pd.testing.assert_frame_equal(got[["id", "y", "x", "area", "dab_od", "positive"]],
                                      want[["id", "y", "x", "area", "dab_od", "positive"]])
        # nothing outside the two (512-px) chunks: no nuclei, zero labels
        assert len(part) == len(got)
        lab = ome.read_image(store)
        outside = np.ones(lab.shape, bool)
        for y0, y1, x0, x1 in rects:
            outside[y0:y1, x0:x1] = False
        assert not lab[outside].any() and lab[~outside].any()

    def test_polygons_and_geojson(self, measured, tmp_path):
        """Outlines are in slide pixels (their centroid and area agree with the table's), and the
        GeoJSON has one QuPath detection per nucleus with the outline as a closed ring."""
        df, _ = measured
        poly = np.stack(df["polygon"].to_numpy()).reshape(len(df), -1, 2)  # (n, rays, (y, x))
        y, x = poly[..., 0].astype(np.float64), poly[..., 1].astype(np.float64)
        shoelace = 0.5 * np.abs((x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y).sum(1))
        assert np.median(shoelace / df["area"]) == pytest.approx(1.0, abs=0.15)
        assert np.abs(y.mean(1) - df["y"]).max() < 3 and np.abs(x.mean(1) - df["x"]).max() < 3
        path = nuclei.write_geojson(df, tmp_path / "n.geojson", mpp=0.5)
        gj = json.loads(path.read_text())
        feats = gj["features"]
        assert gj["type"] == "FeatureCollection" and len(feats) == len(df)
        f0, r0 = feats[0], df.iloc[0]
        ring = np.array(f0["geometry"]["coordinates"][0])
        assert f0["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all()
        assert ring[:, 0].mean() == pytest.approx(r0["x"], abs=3)  # GeoJSON is (x, y)
        props = f0["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == ("Positive" if r0["positive"] else "Negative")
        assert props["measurements"]["area_um2"] == pytest.approx(r0["area"] * 0.25)
        n_pos = sum(f["properties"]["classification"]["name"] == "Positive" for f in feats)
        assert n_pos == int(df["positive"].sum())
        assert not list(tmp_path.glob(".*partial*"))

    def test_auto_threshold_macenko_and_label_store(self, phantom, measured, tmp_path):
        df_all, _ = measured
        rgb = da.from_array(phantom["rgb"][:1024, 1024:], chunks=(512, 512, 3))
        store = str(tmp_path / "labels.zarr")
        df = nuclei.measure_nuclei(rgb, "phantom", stain_matrix="macenko", dab_threshold="auto",
                                   labels_store=store)
        assert df.attrs["stain_matrix"]["source"] == "macenko"
        assert df.attrs["dab_threshold_mode"] == "auto"
        t = df.attrs["dab_threshold"]
        neg, pos = df.loc[~df["positive"], "dab_od"], df.loc[df["positive"], "dab_od"]
        assert neg.median() < t < pos.median()
        assert len(df) > 50
        # same nuclei classified the same as with HED vectors and the fixed threshold
        ref = df_all[(df_all["y"] < 1024 - 20) & (df_all["x"] >= 1024 + 20)]
        sub = df[(df["y"] < 1024 - 20) & (df["x"] >= 20)]
        assert abs(sub["positive"].mean() - ref["positive"].mean()) < 0.02
        lab = ome.read_image(store)
        assert lab.dtype == np.int32 and lab.shape == (1024, 1024)
        assert set(np.unique(lab)) - {0} == set(df["id"])
        info = ome.describe(store)  # a standalone OME-NGFF label image (pyramid: later)
        assert info["kind"] == "label image" and [a[0] for a in info["axes"]] == ["y", "x"]


# ---------------------------------------------------------------------------------------------
# chunked vs whole image, ownership
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def whole_image(model_input):
    """stardist's own predict_instances on the whole 1024 x 2048 strip (the reference)."""
    x, norm = model_input
    x = x[:1024, :1536]
    m = nuclei.load_stardist("phantom")
    lo, hi = norm
    lab, det = m.predict_instances((x - lo) / (hi - lo), show_tile_progress=False, verbose=False)
    return x, norm, lab


@pytest.mark.parametrize(
    "chunks, depth",
    [(256, None), ((196, 330), 128), (384, 64)],  # (196, 330) is aligned to (200, 328)
    ids=["c256-default", "c196x330-d128", "c384-d64"],
)
class TestChunked:
    pytestmark = needs_tf

    def test_same_nuclei_as_whole_image(self, whole_image, chunks, depth):
        from stardist.matching import matching

        x, norm, ref_lab = whole_image
        arr = da.from_array(x, chunks=chunks)
        labels, table = nuclei.segment_nuclei(
            arr, "phantom", normalize_percentiles=norm, depth=depth
        )
        lab, tab = dask.compute(labels, table)
        assert labels.numblocks[1] >= 4  # many chunks wide
        st = matching(ref_lab, lab, thresh=0.5)
        n_ref = len(np.unique(ref_lab)) - 1
        print(f"\n{chunks} depth={depth}: F1 {st.f1:.5f}, {len(tab)} vs {n_ref} whole-image")
        assert st.f1 >= 0.99
        assert abs(len(tab) - n_ref) <= 0.005 * n_ref
        assert not tab[["y", "x"]].duplicated().any()
        assert tab["id"].is_unique
        assert set(np.unique(lab)) - {0} == set(tab["id"])


@pytest.mark.nuclei
@pytest.mark.skipif(not HAVE_STARDIST, reason=SKIP_REASON)
def test_nucleus_on_chunk_border_counted_once():
    """One big nucleus centred on the corner of four chunks: one row, one id in all chunks."""
    from daskpath.stain import HED, reconstruct_rgb, hematoxylin_dab

    yy, xx = np.mgrid[0:256, 0:256]
    conc = np.zeros((256, 256, 3))
    conc[..., 0] = 0.02
    for cy, cx, r in [(128, 128, 9), (125, 60, 7), (40, 131, 8), (200, 200, 6)]:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        conc[disc, 0] = 0.8
    rgb = reconstruct_rgb(conc, HED)
    h, dab = hematoxylin_dab(rgb)
    x = h + dab
    labels, table = nuclei.segment_nuclei(
        da.from_array(x, chunks=128), "phantom", normalize_percentiles=(0.0, float(x.max()))
    )
    lab, tab = dask.compute(labels, table)
    assert len(tab) == 4
    centre = tab.loc[((tab["y"] - 128).abs() < 3) & ((tab["x"] - 128).abs() < 3)]
    assert len(centre) == 1
    cid = int(centre["id"].iloc[0])
    for sl in [np.s_[120:128, 120:128], np.s_[120:128, 128:136], np.s_[128:136, 120:128],
               np.s_[128:136, 128:136]]:
        assert (lab[sl] == cid).any()  # the same id is painted in all four chunks
    assert set(np.unique(lab)) - {0} == set(tab["id"])


@pytest.mark.nuclei
@pytest.mark.skipif(not HAVE_STARDIST, reason=SKIP_REASON)
def test_process_workers_load_model_by_reference(model_input):
    """The graph holds only a ModelRef; a spawned worker process loads the model itself."""
    import pickle

    from distributed import Client, LocalCluster

    x, norm = model_input
    arr = da.from_array(x[:512, :768], chunks=256)
    labels, table = nuclei.segment_nuclei(arr, "phantom", normalize_percentiles=norm)
    graph = dict(labels.__dask_graph__())
    assert len(pickle.dumps(graph)) < 20_000_000  # no model weights inside
    local = dask.compute(labels, table, scheduler="threads")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        remote = client.compute([labels, table], sync=True)
    np.testing.assert_array_equal(remote[0], local[0])
    pd.testing.assert_frame_equal(remote[1], local[1])


def test_gpu_resource_annotation_on_model_tasks():
    """Model tasks carry the resource annotation; building the graph needs no TensorFlow."""
    x = da.zeros((512, 768), dtype=np.float32, chunks=256)
    _, table = nuclei.segment_nuclei(x, "phantom", normalize_percentiles=(0, 1),
                                     resources={"GPU": 1})
    def resources(layer, key):
        ann = (layer.annotations or {}).get("resources")
        return ann(key) if callable(ann) else ann

    annotated = [
        k for layer in table.__dask_graph__().layers.values() for k in layer
        if str(k).startswith("_segment_block") and resources(layer, k) == {"GPU": 1}
    ]
    assert len(annotated) == 6


# ---------------------------------------------------------------------------------------------
# tile ratios (no TF)
# ---------------------------------------------------------------------------------------------
def test_chunks_in_region():
    ys = np.array([0, 100, 200, 250])
    xs = np.array([0, 64, 128])
    assert nuclei.chunks_in_region(ys, xs, None).all()
    got = nuclei.chunks_in_region(ys, xs, [(100, 200, 64, 65), (249, 250, 0, 1), (5, 5, 0, 9)])
    want = np.array([[False, False], [False, True], [True, False]])
    np.testing.assert_array_equal(got, want)
    # half-open: a rectangle ending where a chunk starts does not select it
    np.testing.assert_array_equal(nuclei.chunks_in_region(ys, xs, [(0, 100, 0, 64)]),
                                  [[True, False], [False, False], [False, False]])
    assert not nuclei.chunks_in_region(ys, xs, []).any()


def test_tile_ratios_by_centroid():
    tiles = pd.DataFrame({"slide": "s", "y0": [0, 0, 10, 10], "x0": [0, 10, 0, 10],
                          "height": 10, "width": 10})
    nuc = pd.DataFrame({
        "y": [1.0, 2.0, 9.99, 10.0, 15.0],
        "x": [1.0, 2.0, 9.99, 0.0, 15.0],
        "area": [10, 30, 60, 5, 7],
        "positive": [True, False, True, False, False],
    })
    out = nuclei.tile_ratios(nuc, tiles)
    assert out["ratio_ihc"].iloc[0] == pytest.approx(70 / 100)
    assert out["ki67_index_ihc"].iloc[0] == pytest.approx(2 / 3)
    assert np.isnan(out["ratio_ihc"].iloc[1]) and np.isnan(out["ki67_index_ihc"].iloc[1])
    assert out["ratio_ihc"].iloc[2] == 0.0 and out["ratio_ihc"].iloc[3] == 0.0
    assert list(out.columns[:5]) == ["slide", "y0", "x0", "height", "width"]


def test_tile_ratios_two_channel_definition():
    tiles = pd.DataFrame({"slide": "s", "y0": [0], "x0": [0], "height": 10, "width": 10})
    nuc = pd.DataFrame({"y": [1.0, 2, 3], "x": [1.0, 2, 3], "area": [10, 20, 40],
                        "positive": [True, False, False],
                        "channel": ["dab", "hematoxylin", "hematoxylin"]})
    out = nuclei.tile_ratios(nuc, tiles, suffix="two_channel")
    assert out["ratio_two_channel"].iloc[0] == pytest.approx(10 / 60)
    assert out["ki67_index_two_channel"].iloc[0] == pytest.approx(1 / 2)


def test_tile_ratios_several_slides_need_slide_column():
    tiles = pd.DataFrame({"slide": ["a", "b"], "y0": 0, "x0": 0, "height": 5, "width": 5})
    nuc = pd.DataFrame({"y": [1.0], "x": [1.0], "area": [3], "positive": [True]})
    with pytest.raises(InvalidInputError, match="slide"):
        nuclei.tile_ratios(nuc, tiles)
    nuc["slide"] = "b"
    out = nuclei.tile_ratios(nuc, tiles)
    assert np.isnan(out["ratio_ihc"].iloc[0]) and out["ratio_ihc"].iloc[1] == 1.0


# ---------------------------------------------------------------------------------------------
# model loading
# ---------------------------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        nuclei.load_stardist(tmp_path / "nope")


def test_non_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="config.json"):
        nuclei.load_stardist(tmp_path)
    with pytest.raises(ModelError, match="config.json"):
        nuclei.resolve_model(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_rays": 32, "n_dim": 2}))
    with pytest.raises(ModelError, match="weights"):
        nuclei.load_stardist(tmp_path)


def test_shipped_model_spec_needs_no_tensorflow():
    import subprocess
    import sys

    ref = nuclei.resolve_model("phantom")
    assert ref.n_channel_in == 1 and ref.grid == (2, 2) and ref.input == "h+dab"
    assert nuclei.default_depth(ref) % 8 == 0
    assert ref.spec["thresholds"]["prob"] > 0
    code = ("import sys, daskpath.nuclei as n; r = n.resolve_model('phantom'); "
            "n.default_depth(r); assert 'tensorflow' not in sys.modules, 'TF imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.nuclei
@pytest.mark.skipif(not HAVE_STARDIST, reason=SKIP_REASON)
def test_offline_published_name(monkeypatch):
    from stardist.models import StarDist2D

    def offline(*a, **k):
        raise OSError("URL fetch failure on https://github.com/...: [Errno -3] name resolution")

    monkeypatch.setattr(StarDist2D, "from_pretrained", classmethod(lambda cls, name: offline()))
    from daskpath._process_cache import _CACHE

    _CACHE.pop(("stardist", "2D_versatile_fluo"), None)
    with pytest.raises(ModelError, match="local folder") as e:
        nuclei.load_stardist("2D_versatile_fluo")
    assert "\n" not in str(e.value)


@pytest.mark.nuclei
@pytest.mark.skipif(not HAVE_STARDIST, reason=SKIP_REASON)
def test_model_cache_builds_once_under_threads():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:
        models = list(ex.map(lambda _: nuclei.load_stardist("phantom"), range(8)))
    assert all(m is models[0] for m in models)


@pytest.mark.parametrize("kw, match", [
    ({"method": "watershed"}, "method"),
    ({"dab_threshold": "high"}, "dab_threshold"),
    ({"stain_matrix": "vahadane"}, "stain_matrix"),
])
def test_measure_nuclei_bad_arguments(kw, match):
    rgb = da.zeros((64, 64, 3), dtype=np.uint8, chunks=32)
    with pytest.raises(InvalidInputError, match=match):
        nuclei.measure_nuclei(rgb, "phantom", **kw)
