"""Tests of the phantom slide generator (daskpath.synthetic)."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hed, rgb_from_hed

from daskpath.errors import DaskpathError
from daskpath.synthetic import (
    DEFAULT_OFFSET,
    RGB_FROM_HED,
    SyntheticPair,
    make_cohort,
    make_pair,
    render_region,
)

SIZE = (4096, 4096)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> SyntheticPair:
    """A 4096^2 tiled pair (seed 3), shared by the file and truth tests."""
    return make_pair(tmp_path_factory.mktemp("pair"), slide="p", size=SIZE, seed=3)


@pytest.fixture(scope="module")
def ihc_decoded(pair):
    return tifffile.imread(pair.ihc)


@pytest.fixture(scope="module")
def truth(pair):
    g = zarr.open_group(str(pair.truth_labels), mode="r")
    return pd.read_parquet(pair.truth_nuclei), g["ihc_labels"][:], g["he_labels"][:], g


def test_stain_vectors_match_skimage():
    np.testing.assert_allclose(RGB_FROM_HED, rgb_from_hed)


# ---------------------------------------------------------------------------------------------
# determinism and chunk independence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stain", ["he", "ihc"])
def test_deterministic_per_seed(stain):
    kw = dict(size=(2048, 2048), stain=stain)
    a, la = render_region(700, 900, 256, 300, seed=1, **kw)
    b, lb = render_region(700, 900, 256, 300, seed=1, **kw)
    c, _ = render_region(700, 900, 256, 300, seed=2, **kw)
    assert a.dtype == np.uint8 and a.shape == (256, 300, 3)
    assert lb.dtype == np.int32 and lb.shape == (256, 300)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - c).mean() > 5


@pytest.mark.parametrize("stain", ["he", "ihc"])
def test_region_equals_crop_of_larger_render(stain):
    kw = dict(size=(2048, 2048), seed=5, stain=stain)
    big, big_l = render_region(800, 600, 700, 900, **kw)
    assert (big_l > 0).sum() > 1000  # the window holds tissue and nuclei
    # odd windows, straddling nuclei at their borders
    windows = [(0, 0, 333, 417), (333, 417, 367, 483), (101, 37, 29, 811), (699, 899, 1, 1)]
    for y0, x0, h, w in windows:
        rgb, lab = render_region(800 + y0, 600 + x0, h, w, **kw)
        np.testing.assert_array_equal(rgb, big[y0 : y0 + h, x0 : x0 + w])
        np.testing.assert_array_equal(lab, big_l[y0 : y0 + h, x0 : x0 + w])


def test_files_do_not_depend_on_chunk_and_are_deterministic(tmp_path):
    kw = dict(size=(1300, 1030), seed=11, layout="stripped")
    a = make_pair(tmp_path / "a", chunk=1024, **kw)
    b = make_pair(tmp_path / "b", chunk=2048, **kw)
    for x, y in ((a.he, b.he), (a.ihc, b.ihc)):
        np.testing.assert_array_equal(tifffile.imread(x), tifffile.imread(y))
    pd.testing.assert_frame_equal(pd.read_parquet(a.truth_nuclei), pd.read_parquet(b.truth_nuclei))
    za, zb = (zarr.open_group(str(p.truth_labels), mode="r") for p in (a, b))
    for name in ("ihc_labels", "he_labels", "tissue"):
        np.testing.assert_array_equal(za[name][:], zb[name][:])
    other, _ = render_region(0, 0, *kw["size"], size=kw["size"], seed=12, stain="he")
    assert not np.array_equal(tifffile.imread(a.he), other)


# ---------------------------------------------------------------------------------------------
# tiled pyramidal TIFF
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["he", "ihc"])
def test_tiled_files_open_with_tiffslide(pair, which):
    import tiffslide

    path = getattr(pair, which)
    assert path.name == f"p_{which.upper()}.tif"
    s = tiffslide.TiffSlide(path)
    assert s.dimensions == (SIZE[1], SIZE[0])
    assert s.level_count > 1
    assert s.level_dimensions[1] == (SIZE[1] // 2, SIZE[0] // 2)
    assert max(s.level_dimensions[-1]) < 1024
    assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
    assert float(s.properties["tiffslide.mpp-y"]) == pytest.approx(0.5)
    region = np.asarray(s.read_region((1000, 1200), 0, (300, 200), as_array=True))
    assert region.dtype == np.uint8 and region.shape == (200, 300, 3)
    ref, _ = render_region(1200, 1000, 200, 300, size=SIZE, seed=3, stain=which)
    assert np.abs(region.astype(int) - ref).mean() < 3.0  # JPEG q90
    thumb = np.asarray(s.read_region((0, 0), s.level_count - 1, s.level_dimensions[-1]))
    assert thumb[..., :3].std() > 5
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert (page.tilelength, page.tilewidth) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.photometric == tifffile.PHOTOMETRIC.RGB
        assert page.dtype == np.uint8 and page.samplesperpixel == 3


# ---------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------
def test_truth_ids_and_areas_match_labels(pair, truth):
    df, ihc_l, he_l, group = truth
    assert list(df.columns[:5]) == ["id", "y", "x", "area", "positive"]
    assert group["ihc_labels"].dtype == np.int32 and group["tissue"].dtype == bool
    assert group["ihc_labels"].chunks == (1024, 1024)
    ids = np.unique(ihc_l)
    ids = ids[ids > 0]
    np.testing.assert_array_equal(np.sort(df["id"].to_numpy()), ids)
    assert df["id"].is_unique
    counts = np.bincount(ihc_l.ravel())
    inner = df[~df["cut"]]
    assert len(inner) > 2000
    np.testing.assert_array_equal(inner["area"].to_numpy(), counts[inner["id"].to_numpy()])
    # centroids of the label pixels
    yy, xx = np.indices(ihc_l.shape)
    cy = np.bincount(ihc_l.ravel(), weights=yy.ravel()) / np.maximum(counts, 1)
    cx = np.bincount(ihc_l.ravel(), weights=xx.ravel()) / np.maximum(counts, 1)
    np.testing.assert_allclose(df["y"], cy[df["id"].to_numpy()], atol=1e-6)
    np.testing.assert_allclose(df["x"], cx[df["id"].to_numpy()], atol=1e-6)
    # the H&E label ids are the same nucleus set, a few dropped / added
    he_ids = np.unique(he_l)
    he_ids = he_ids[he_ids > 0]
    shared = np.intersect1d(he_ids, ids).size
    assert shared / ids.size > 0.95 and shared / he_ids.size > 0.95
    assert shared < min(ids.size, he_ids.size)  # not a copy
    assert df["y_he"].isna().sum() == ids.size - shared


def test_positive_nuclei_are_brown(ihc_decoded, truth):
    df, ihc_l, _, _ = truth
    win = np.s_[1024:3072, 1024:3072]  # tissue-rich centre, all ratio bins
    dab = rgb2hed(ihc_decoded[win])[..., 2]
    lab = ihc_l[win]
    inside = np.bincount(lab.ravel(), minlength=int(df["id"].max()) + 1)
    ok = df[(inside[df["id"].to_numpy()] == df["area"].to_numpy()) & (df["area"] >= 30)]
    mean_dab = np.asarray(ndi.mean(dab, lab, ok["id"].to_numpy()))
    pos = mean_dab[ok["positive"].to_numpy()]
    neg = mean_dab[~ok["positive"].to_numpy()]
    assert len(pos) > 300 and len(neg) > 300
    threshold = pos.min()
    assert (neg < threshold).mean() >= 0.98
    assert np.median(pos) > np.median(neg) + 0.05


def test_he_morphology_marks_positives(truth):
    df = truth[0]
    he = df[(df["area_he"] > 0) & ~df["cut"]]
    pos = he.loc[he["positive"], "area_he"]
    neg = he.loc[~he["positive"], "area_he"]
    assert pos.mean() > 1.4 * neg.mean()


def test_offset_is_known(pair, truth):
    df = truth[0]
    assert pair.offset == DEFAULT_OFFSET
    both = df[df["y_he"].notna() & ~df["cut"]]
    err = np.hypot(
        both["y"] - both["y_he"] - pair.offset[0], both["x"] - both["x_he"] - pair.offset[1]
    )
    assert np.median(err) < 1.0
    assert (err < 2.0).mean() > 0.98


def test_tissue_moves_with_offset():
    size, kw = (2048, 2048), dict(seed=3)
    he, _ = render_region(900, 200, 300, 300, size=size, stain="he", **kw)
    dy, dx = DEFAULT_OFFSET
    ihc, _ = render_region(900 + dy, 200 + dx, 300, 300, size=size, stain="ihc", **kw)
    bg_he = he.mean(axis=2) > 236  # glass is ~245, tissue (even the pale IHC) is darker
    bg_ihc = ihc.mean(axis=2) > 236
    assert 0.05 < bg_he.mean() < 0.95  # the window has a tissue edge
    assert (bg_he == bg_ihc).mean() > 0.97


def test_tile_coverage(truth):
    df, _, _, group = truth
    tissue = group["tissue"][:]
    t = 1024
    fractions, ratios = [], []
    for y in range(0, SIZE[0], t):
        for x in range(0, SIZE[1], t):
            frac = tissue[y : y + t, x : x + t].mean()
            fractions.append(frac)
            m = df["y"].between(y, y + t, inclusive="left") & df["x"].between(
                x, x + t, inclusive="left"
            )
            sub = df[m]
            if frac > 0.3 and len(sub) > 50:
                ratios.append(sub.loc[sub["positive"], "area"].sum() / sub["area"].sum())
    assert min(fractions) < 0.05 and max(fractions) > 0.9
    bins = np.digitize(ratios, [0.2, 0.5])
    assert set(bins) == {0, 1, 2}


def test_positive_field_override(tmp_path):
    p = make_pair(tmp_path, size=(1024, 1024), seed=1, layout="png", positive_field=0.0)
    assert not pd.read_parquet(p.truth_nuclei)["positive"].any()
    _, lab = render_region(0, 0, 1024, 1024, size=(1024, 1024), seed=1, stain="ihc",
                           positive_field=lambda y, x: np.ones_like(y))
    assert lab.max() > 0


# ---------------------------------------------------------------------------------------------
# flat layouts and the manifest
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["png", "stripped"])
def test_flat_layouts_are_lossless(tmp_path, layout):
    size = (700, 900)
    p = make_pair(tmp_path, slide="flat", size=size, seed=4, layout=layout)
    ext = "png" if layout == "png" else "tif"
    assert p.he.name == f"flat_HE.{ext}" and p.ihc.name == f"flat_IHC.{ext}"
    for path, stain in ((p.he, "he"), (p.ihc, "ihc")):
        if layout == "png":
            with Image.open(path) as im:
                assert im.mode == "RGB"
                img = np.asarray(im)
        else:
            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                assert not page.is_tiled and page.rowsperstrip == 64
                assert page.compression in (tifffile.COMPRESSION.ADOBE_DEFLATE,
                                            tifffile.COMPRESSION.DEFLATE)
                img = page.asarray()
        ref, _ = render_region(0, 0, *size, size=size, seed=4, stain=stain)
        np.testing.assert_array_equal(img, ref)


def test_cohort_manifest(tmp_path):
    manifest = make_cohort(tmp_path, pairs=2, size=(512, 640), seed=7, layout="png")
    assert manifest == tmp_path / "manifest.csv"
    with open(manifest, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["slide", "he", "ihc"]
    assert [r[0] for r in rows[1:]] == ["synth000", "synth001"]
    for slide, he, ihc in rows[1:]:
        assert (tmp_path / he).is_file() and (tmp_path / ihc).is_file()
        assert (tmp_path / f"{slide}_truth.json").is_file()
        assert not he.startswith("/")
    a = np.asarray(Image.open(tmp_path / rows[1][1]))
    b = np.asarray(Image.open(tmp_path / rows[2][1]))
    assert not np.array_equal(a, b)  # different seeds per pair
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layout": "jpeg2000"}, "layout"),
        ({"chunk": 1000}, "chunk"),
        ({"tile_size": 100}, "tile_size"),
        ({"size": (10, 10)}, "size"),
        ({"slide": "a/b"}, "slide"),
        ({"positive_field": 2.0}, "positive_field"),
        ({"mpp": 0.0}, "mpp"),
    ],
)
def test_bad_input(tmp_path, kwargs, match):
    with pytest.raises(DaskpathError, match=match):
        make_pair(tmp_path, **{"size": (256, 256), **kwargs})
