"""Tests of the realistic phantom mode and the phantom tag (daskpath.synthetic)."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image
from scipy import ndimage as ndi

from daskpath.errors import DaskpathError
from daskpath.synthetic import (
    ARTEFACT_BITS,
    DEFAULT_OFFSET,
    PHANTOM_TOKEN,
    RGB_FROM_HED,
    RealismParams,
    displacement,
    make_pair,
    render_region,
)

SIZE = (2048, 2048)
#: artefacts far more frequent than the defaults, so a 2048^2 pair holds every kind
DENSE = {"fold": 1.0, "pen": 1.0, "bubble": 1.0, "blur": 1.0, "dust": 1.0}
REAL = dict(realism="realistic")


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks)."""
    ranks = pd.Series(score).rank().to_numpy()
    n1 = int(label.sum())
    n0 = label.size - n1
    return float((ranks[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A 2048^2 realistic pair (PNG, seed 3, dense artefacts) with its truth."""
    out = tmp_path_factory.mktemp("real")
    p = make_pair(out, slide="r", size=SIZE, seed=3, layout="png", realism="realistic",
                  realism_params=DENSE)
    meta = json.loads((out / "r_truth.json").read_text())
    g = zarr.open_group(str(p.truth_labels), mode="r")
    return p, meta, pd.read_parquet(p.truth_nuclei), g


# ---------------------------------------------------------------------------------------------
# easy mode is unchanged
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stain, window, seed, rgb_hash, label_hash",
    [
        ("he", (700, 900, 600, 700), 1, "9a7bf696b50d8f0a", "d756d42c7aabb0ec"),
        ("ihc", (700, 900, 600, 700), 1, "3dea5c4c8d43eb41", "ac4eb91eaba46bd0"),
    ],
)
def test_easy_pixels_unchanged(stain, window, seed, rgb_hash, label_hash):
    # sha256 prefixes recorded from the generator before realistic mode existed
    rgb, lab = render_region(*window, size=(2048, 2048), seed=seed, stain=stain)
    assert hashlib.sha256(rgb.tobytes()).hexdigest()[:16] == rgb_hash
    assert hashlib.sha256(lab.tobytes()).hexdigest()[:16] == label_hash


# ---------------------------------------------------------------------------------------------
# determinism and chunk independence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stain", ["he", "ihc"])
def test_realistic_deterministic_and_differs_from_easy(stain):
    kw = dict(size=SIZE, stain=stain, realism_params=DENSE, **REAL)
    a, la = render_region(700, 900, 256, 300, seed=1, **kw)
    b, lb = render_region(700, 900, 256, 300, seed=1, **kw)
    c, _ = render_region(700, 900, 256, 300, seed=2, **kw)
    e, _ = render_region(700, 900, 256, 300, size=SIZE, stain=stain, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - c).mean() > 5
    assert np.abs(a.astype(int) - e).mean() > 2


@pytest.mark.parametrize("stain", ["he", "ihc"])
def test_realistic_region_equals_crop_of_larger_render(stain):
    # every artefact kind dense (blur halos, pen arcs, folds) and the IHC deformation
    kw = dict(size=SIZE, seed=5, stain=stain, realism_params={k: 4.0 for k in DENSE}, **REAL)
    big, big_l = render_region(800, 600, 700, 900, **kw)
    assert (big_l > 0).sum() > 1000
    windows = [(0, 0, 333, 417), (333, 417, 367, 483), (101, 37, 29, 811), (699, 899, 1, 1)]
    for y0, x0, h, w in windows:
        rgb, lab = render_region(800 + y0, 600 + x0, h, w, **kw)
        np.testing.assert_array_equal(rgb, big[y0 : y0 + h, x0 : x0 + w])
        np.testing.assert_array_equal(lab, big_l[y0 : y0 + h, x0 : x0 + w])


def test_realistic_files_do_not_depend_on_chunk_and_are_deterministic(tmp_path):
    kw = dict(size=(1300, 1030), seed=11, layout="stripped", realism_params=DENSE, **REAL)
    a = make_pair(tmp_path / "a", chunk=1024, **kw)
    b = make_pair(tmp_path / "b", chunk=2048, **kw)
    for x, y in ((a.he, b.he), (a.ihc, b.ihc)):
        assert x.read_bytes() == y.read_bytes()  # same seed, same bytes
    pd.testing.assert_frame_equal(pd.read_parquet(a.truth_nuclei), pd.read_parquet(b.truth_nuclei))
    za, zb = (zarr.open_group(str(p.truth_labels), mode="r") for p in (a, b))
    for name in ("ihc_labels", "he_labels", "tissue", "artefacts_he", "artefacts_ihc"):
        np.testing.assert_array_equal(za[name][:], zb[name][:])
    assert za["artefacts_he"][:].any() and za["artefacts_ihc"][:].any()
    # the flat layouts hold the scene after a JPEG q80 round trip of each 256 px tile
    img = tifffile.imread(a.he)
    ref, _ = render_region(0, 0, *kw["size"], size=kw["size"], seed=11, stain="he",
                           realism_params=DENSE, **REAL)
    diff = np.abs(img.astype(int) - ref)
    assert 0.2 < diff.mean() < 3.0


# ---------------------------------------------------------------------------------------------
# exact truth, turnover, displacement
# ---------------------------------------------------------------------------------------------
def test_realistic_truth_matches_labels(real):
    _, meta, df, g = real
    ihc_l, he_l = g["ihc_labels"][:], g["he_labels"][:]
    assert df["id"].is_unique
    for lab, area, y, x in ((ihc_l, "area", "y", "x"), (he_l, "area_he", "y_he", "x_he")):
        ids = np.unique(lab)
        ids = ids[ids > 0]
        np.testing.assert_array_equal(np.sort(df.loc[df[area] > 0, "id"].to_numpy()), ids)
        counts = np.bincount(lab.ravel(), minlength=int(df["id"].max()) + 1)
        np.testing.assert_array_equal(df[area].to_numpy(), counts[df["id"].to_numpy()])
        yy, xx = np.indices(lab.shape)
        sel = df[df[area] > 0]
        cy = np.bincount(lab.ravel(), weights=yy.ravel(), minlength=counts.size)
        cx = np.bincount(lab.ravel(), weights=xx.ravel(), minlength=counts.size)
        k = sel["id"].to_numpy()
        np.testing.assert_allclose(sel[y], cy[k] / counts[k], atol=1e-6)
        np.testing.assert_allclose(sel[x], cx[k] / counts[k], atol=1e-6)
        # absent from this section: NaN centroid, zero area
        absent = df[df[area] == 0]
        assert len(absent) > 100 and absent[y].isna().all() and absent[x].isna().all()
    assert len(df) > 1500
    assert meta["realism"] == "realistic"
    assert meta["realism_params"] == {**RealismParams().__dict__, **DENSE}
    assert meta["n_nuclei_he"] == int((df["area_he"] > 0).sum())
    assert meta["artefact_bits"] == ARTEFACT_BITS


def test_turnover_fraction(real, tmp_path):
    _, meta, df, _ = real
    both = (df["area"] > 0) & (df["area_he"] > 0)
    turnover = 1.0 - both.mean()
    assert turnover == pytest.approx(0.3, abs=0.04)
    assert meta["turnover_measured"] == pytest.approx(turnover)
    he_only = (df["area"] == 0).mean()
    assert he_only == pytest.approx(turnover / 2, abs=0.03)
    p = make_pair(tmp_path, size=(1024, 1024), seed=3, layout="png", realism="realistic",
                  realism_params={"turnover": 0.0})
    t0 = pd.read_parquet(p.truth_nuclei)
    assert ((t0["area"] > 0) & (t0["area_he"] > 0)).mean() > 0.97  # only border cuts differ


def test_displacement_matches_labels(real):
    _, meta, df, _ = real
    both = df[(df["area"] > 0) & (df["area_he"] > 0) & ~df["cut"]]
    assert len(both) > 1000
    dy, dx = displacement(meta, both["y_he"].to_numpy(), both["x_he"].to_numpy())
    err = np.hypot(both["y"] - both["y_he"] - dy, both["x"] - both["x_he"] - dx)
    assert np.median(err) < 1.0
    assert np.quantile(err, 0.95) < 1.8
    # non-rigid: a rigid offset explains the centroids much worse
    rigid = np.hypot(both["y"] - both["y_he"] - np.median(dy), both["x"] - both["x_he"]
                     - np.median(dx))
    assert np.quantile(rigid, 0.95) > np.quantile(err, 0.95) + 0.5, (rigid.describe(),
                                                                      err.describe())
    assert np.ptp(dy) + np.ptp(dx) > 3.0


def test_displacement_field_is_smooth_and_exact(real):
    _, meta, _, _ = real
    ys, xs = np.meshgrid(np.arange(-500.0, 4600.0, 50.0), np.arange(-500.0, 4600.0, 50.0),
                         indexing="ij")
    dy, dx = displacement(meta, ys, xs)
    mag = np.hypot(dy, dx)
    assert mag.max() > 8 and mag.max() < 60
    grad = max(np.abs(np.diff(d, axis=a)).max() for d in (dy, dx) for a in (0, 1)) / 50.0
    assert 1e-4 < grad < 0.01
    # inverse: the IHC pixel q shows the H&E pixel q - offset - v(q)
    d = meta["deformation"]
    qy, qx = ys + dy, xs + dx
    vy = sum(a * np.sin(ky * qy + kx * qx + ph) for ky, kx, ph, a in d["waves_y"])
    vx = sum(a * np.sin(ky * qy + kx * qx + ph) for ky, kx, ph, a in d["waves_x"])
    np.testing.assert_allclose(qy - d["offset"][0] - vy, ys, atol=1e-3)
    np.testing.assert_allclose(qx - d["offset"][1] - vx, xs, atol=1e-3)
    # easy slides: the rigid offset
    ey, ex = displacement({"offset": list(DEFAULT_OFFSET)}, ys[:3, :3], xs[:3, :3])
    assert (ey == DEFAULT_OFFSET[0]).all() and (ex == DEFAULT_OFFSET[1]).all()


def test_tissue_follows_displacement(real):
    p, meta, _, g = real
    tissue_ihc = g["tissue"][:]
    he = np.asarray(Image.open(p.he)).astype(np.float32).mean(axis=2)
    he_tissue = ndi.uniform_filter(he, 9) < 225
    ys, xs = np.nonzero(he_tissue[::16, ::16])
    ys, xs = ys * 16, xs * 16
    dy, dx = displacement(meta, ys, xs)
    qy, qx = np.round(ys + dy).astype(int), np.round(xs + dx).astype(int)
    ok = (qy >= 0) & (qy < SIZE[0]) & (qx >= 0) & (qx < SIZE[1])
    assert tissue_ihc[qy[ok], qx[ok]].mean() > 0.95
    rigid = tissue_ihc[np.clip(ys + 60, 0, SIZE[0] - 1), xs].mean()
    assert rigid < tissue_ihc[qy[ok], qx[ok]].mean()


# ---------------------------------------------------------------------------------------------
# stain variation
# ---------------------------------------------------------------------------------------------
def test_stain_variation_differs_between_seeds(tmp_path):
    metas = []
    for seed in (3, 4):
        make_pair(tmp_path, slide=f"s{seed}", size=(256, 256), seed=seed, layout="png", **REAL)
        metas.append(json.loads((tmp_path / f"s{seed}_truth.json").read_text())["stain"])
    base = {"he": [RGB_FROM_HED[0], None, RGB_FROM_HED[2]],
            "ihc": [RGB_FROM_HED[0], RGB_FROM_HED[1], RGB_FROM_HED[2]]}
    for m in metas:
        for sec in ("he", "ihc"):
            vec = np.asarray(m[sec]["vectors_rgb_from_hed"])
            for k in (0, 2):
                cos = vec[k] @ base[sec][k] / np.linalg.norm(vec[k]) / np.linalg.norm(base[sec][k])
                assert 0 < math.degrees(math.acos(min(cos, 1.0))) <= 4.0 + 1e-6
            assert all(0.85 <= s <= 1.15 for s in m[sec]["concentration_scale"])
            assert 0.95 <= m[sec]["brightness"] <= 1.05
    a, b = metas
    for sec in ("he", "ihc"):
        assert not np.allclose(a[sec]["vectors_rgb_from_hed"], b[sec]["vectors_rgb_from_hed"])
        assert a[sec]["brightness"] != b[sec]["brightness"]
    assert a["he"]["concentration_scale"] != a["ihc"]["concentration_scale"]  # per section
    # the glass colour follows the tint and brightness
    glass = [np.asarray(Image.open(tmp_path / f"s{s}_HE.png"))[:8, :8].reshape(-1, 3).mean(0)
             for s in (3, 4)]
    assert np.abs(glass[0] - glass[1]).max() > 1.0


# ---------------------------------------------------------------------------------------------
# artefacts
# ---------------------------------------------------------------------------------------------
def _window_around(mask: np.ndarray, half: int = 200) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    i = len(ys) // 2
    y0 = int(np.clip(ys[i] - half, 0, mask.shape[0] - 2 * half))
    x0 = int(np.clip(xs[i] - half, 0, mask.shape[1] - 2 * half))
    return y0, x0, 2 * half, 2 * half


@pytest.mark.parametrize("kind", list(ARTEFACT_BITS))
def test_artefacts_are_where_their_masks_say(real, kind):
    _, _, _, g = real
    bit = ARTEFACT_BITS[kind]
    art = g["artefacts_he"][:]
    assert (art & bit).any() and (g["artefacts_ihc"][:] & bit).any()
    y0, x0, h, w = _window_around((art & bit) > 0)
    kw = dict(size=SIZE, seed=3, stain="he", **REAL)
    with_, lab = render_region(y0, x0, h, w, realism_params=DENSE, **kw)
    without, lab0 = render_region(y0, x0, h, w, realism_params={**DENSE, kind: 0.0}, **kw)
    np.testing.assert_array_equal(lab, lab0)  # nuclei keep their truth under artefacts
    m = (art[y0 : y0 + h, x0 : x0 + w] & bit) > 0
    # outside the mask (with a margin for soft edges and the blur kernel), nothing changes
    margin = 40 if kind == "blur" else 16
    pad = np.pad((art & bit) > 0, margin)[y0 : y0 + h + 2 * margin, x0 : x0 + w + 2 * margin]
    far = ~ndi.binary_dilation(pad, iterations=margin)[margin:-margin, margin:-margin]
    np.testing.assert_array_equal(with_[far], without[far])
    od = -np.log10(np.maximum(with_.astype(float), 1) / 255)
    od0 = -np.log10(np.maximum(without.astype(float), 1) / 255)
    added = (od - od0)[m]
    if kind == "pen":
        inks = np.array([[0.80, 0.22, 0.62], [0.85, 0.50, 0.08], [0.80, 0.80, 0.78]])
        inks /= np.linalg.norm(inks, axis=1, keepdims=True)
        strong = added[np.linalg.norm(added, axis=1) > 0.1]
        assert len(strong) > 0.8 * len(added)
        cos = (strong / np.linalg.norm(strong, axis=1, keepdims=True)) @ inks.T
        assert np.median(cos.max(axis=1)) > 0.95  # the ink's hue
    elif kind == "fold":
        assert np.median(added.sum(axis=1)) > 0.3  # darker: tissue doubled
    elif kind == "bubble":
        inner = ndi.binary_erosion(m, iterations=10)
        assert ((od - od0)[inner].sum(axis=1) < 0).mean() > 0.9  # washed out
    elif kind == "dust":
        assert np.median(added.sum(axis=1)) > 0.5
    else:  # blur: lower Laplacian variance
        core = ndi.binary_erosion(m, iterations=30)
        gray, gray0 = with_.mean(axis=2), without.mean(axis=2)
        lv = ndi.laplace(gray)[core].var()
        lv0 = ndi.laplace(gray0)[core].var()
        assert core.sum() > 2000 and lv < 0.5 * lv0


def test_default_artefacts_are_rare(real):
    # defaults: per 1024^2 px and section, 0.008-0.025 artefacts of each kind
    p = RealismParams()
    assert 0.03 < p.fold + p.pen + p.bubble + p.blur + p.dust < 0.1
    _, meta, _, _ = real
    assert sum(meta["artefact_pixels"]["he"].values()) > 0


# ---------------------------------------------------------------------------------------------
# the H&E cue of Ki67 positivity
# ---------------------------------------------------------------------------------------------
def _he_features(df: pd.DataFrame, he: np.ndarray, he_l: np.ndarray) -> pd.DataFrame:
    d = df[(df["area_he"] > 0) & ~df["cut"]].copy()
    od = -np.log10(np.maximum(he.astype(float), 1) / 255).sum(axis=2)
    d["od"] = ndi.mean(od, he_l, d["id"].to_numpy())
    return d


def test_cue_overlaps_at_default(real):
    p, _, df, g = real
    d = _he_features(df, np.asarray(Image.open(p.he)), g["he_labels"][:])
    pos = d["positive"].to_numpy()
    assert 0.15 < pos.mean() < 0.85
    auc_area = _auc(d["area_he"].to_numpy(), pos)
    auc_od = _auc(d["od"].to_numpy(), pos)
    assert 0.55 < auc_area < 0.8
    assert 0.5 < auc_od < 0.85


def test_cue_strength_is_tunable(tmp_path):
    aucs = {}
    for cue in (0.0, 1.0):
        p = make_pair(tmp_path / str(cue), size=(1024, 1024), seed=2, layout="png",
                      realism="realistic", realism_params={"cue": cue, "context": 0.0})
        df = pd.read_parquet(p.truth_nuclei)
        d = df[(df["area_he"] > 0) & ~df["cut"]]
        aucs[cue] = _auc(d["area_he"].to_numpy(), d["positive"].to_numpy())
    assert abs(aucs[0.0] - 0.5) < 0.08
    assert aucs[1.0] > 0.85


def test_context_couples_positivity_to_density(tmp_path):
    """Positivity is higher where nuclei are dense (context > 0), not with context = 0."""
    gaps = {}
    for ctx in (0.0, 1.0):
        p = make_pair(tmp_path / str(ctx), size=(1024, 1024), seed=2, layout="png",
                      realism="realistic", realism_params={"context": ctx})
        df = pd.read_parquet(p.truth_nuclei)
        d = df[df["area_he"] > 0]
        yx = d[["y_he", "x_he"]].to_numpy()
        dist = np.hypot(*(yx[:, None, :] - yx[None, :, :]).transpose(2, 0, 1))
        crowd = (dist < 60).sum(axis=1)
        hi = crowd >= np.quantile(crowd, 0.67)
        lo = crowd <= np.quantile(crowd, 0.33)
        gaps[ctx] = d["positive"].to_numpy()[hi].mean() - d["positive"].to_numpy()[lo].mean()
    assert gaps[1.0] > gaps[0.0] + 0.05


# ---------------------------------------------------------------------------------------------
# the phantom tag
# ---------------------------------------------------------------------------------------------
def _png_text(path) -> dict[str, str]:
    data = path.read_bytes()
    out, pos = {}, 8
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(tag + body)
        if tag == b"tEXt":
            k, v = body.split(b"\0", 1)
            out[k.decode("latin-1")] = v.decode("latin-1")
        pos += 12 + n
    return out


@pytest.mark.parametrize("realism", ["easy", "realistic"])
@pytest.mark.parametrize("layout", ["tiled", "stripped", "png", "zarr"])
def test_phantom_tag(tmp_path, layout, realism):
    p = make_pair(tmp_path, slide="t", size=(256, 320), seed=3, layout=layout, realism=realism)
    for path in (p.he, p.ihc):
        if layout in ("tiled", "stripped"):
            with tifffile.TiffFile(path) as tf:
                desc = tf.pages[0].description
            assert PHANTOM_TOKEN in desc.split()
            assert f"realism={realism}" in desc and "seed=3" in desc
        elif layout == "png":
            assert _png_text(path)["daskpath"] == f"phantom realism={realism} seed=3"
            with Image.open(path) as im:
                assert im.text["daskpath"].startswith("phantom")
        else:
            attrs = zarr.open_group(str(path), mode="r").attrs["daskpath"]
            assert attrs["phantom"] is True and attrs["realism"] == realism
    meta = json.loads((tmp_path / "t_truth.json").read_text())
    assert meta["phantom_tag"].startswith(PHANTOM_TOKEN) and meta["realism"] == realism


def test_tiled_realistic_uses_scanner_jpeg_quality(tmp_path):
    p = make_pair(tmp_path, size=(512, 512), seed=1, layout="tiled", realism="realistic")
    with tifffile.TiffFile(p.he) as tf:
        assert tf.pages[0].compression == tifffile.COMPRESSION.JPEG
    assert json.loads((tmp_path / "synth000_truth.json").read_text())["quality"] == 80


# ---------------------------------------------------------------------------------------------
# bad input and the command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"realism": "hard"}, "realism"),
        ({"realism": "realistic", "realism_params": {"folds": 1}}, "folds"),
        ({"realism": "realistic", "realism_params": {"cue": 1.5}}, "cue"),
        ({"realism": "realistic", "realism_params": {"turnover": -0.1}}, "turnover"),
        ({"realism": "realistic", "realism_params": [1]}, "realism_params"),
        ({"realism_params": {"cue": 0.5}}, "realistic"),
    ],
)
def test_bad_realism_input(tmp_path, kwargs, match):
    with pytest.raises(DaskpathError, match=match):
        make_pair(tmp_path, size=(256, 256), **kwargs)
    with pytest.raises(ValueError):  # InvalidInputError is also a ValueError
        render_region(0, 0, 8, 8, size=(256, 256), seed=0, stain="he", **kwargs)


def test_cli_synth_realism(tmp_path):
    from daskpath.cli import main

    assert main(["synth", str(tmp_path), "--size", "256", "256", "--layout", "png",
                 "--realism", "realistic", "-q"]) == 0
    meta = json.loads((tmp_path / "synth000_truth.json").read_text())
    assert meta["realism"] == "realistic" and "deformation" in meta
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path), "--realism", "hard"])
    assert e.value.code == 2
