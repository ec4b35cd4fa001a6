"""Every image daskpath writes is an OME-NGFF 0.5 image that ome-zarr-py's Reader (what
napari-ome-zarr uses) opens and ome-zarr-models validates; ingests are reused when unchanged."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from daskpath import io, ome

ome_zarr_models = pytest.importorskip("ome_zarr_models")
pytest.importorskip("ome_zarr")

MPP = 0.5


# ------------------------------------------------------------------------------------------
# helpers: what a user's tools see
# ------------------------------------------------------------------------------------------


def reader_nodes(path: Path) -> list:
    """Nodes ome-zarr-py's Reader finds (napari-ome-zarr makes one layer per data node)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    loc = parse_url(str(path))
    assert loc is not None, f"ome-zarr-py does not recognise {path}"
    return [n for n in Reader(loc)() if n.data]


def validate(path: Path, expect: str) -> object:
    """ome-zarr-models' NGFF 0.5 model of the group at ``path`` (raises if invalid)."""
    model = ome_zarr_models.open_ome_zarr(zarr.open_group(str(path), mode="r"), version="0.5")
    assert type(model).__name__ == expect, (path, type(model))
    return model


def check_image(path: Path, *, axes: list[str], scale0: list[float],
                unit: str | None = "micrometer", channels: list[str] | None = None,
                labels: list[str] = ()) -> dict:
    """Reader + models + metadata checks shared by every written image; returns describe()."""
    d = ome.describe(path)
    assert d["ngff"] and d["version"] == "0.5"
    assert [a[0] for a in d["axes"]] == axes
    assert all(u == unit for n, t, u in d["axes"] if t == "space")
    assert d["levels"][0]["scale"] == pytest.approx(scale0)
    for k, lv in enumerate(d["levels"]):  # each level halves: scale doubles
        assert lv["scale"][-2:] == pytest.approx([s * 2**k for s in scale0[-2:]])
    assert max(d["levels"][-1]["shape"][-2:]) < 2048
    kind = "label image" if axes == ["y", "x"] else "image"
    assert d["kind"] == kind
    validate(path, "ImageLabel" if kind == "label image" else "Image")
    nodes = reader_nodes(path)  # a label's image comes first (the Reader follows source)
    node = next((n for n in nodes if n.zarr.basename() == path.name), None)
    assert node is not None, f"Reader found no image in {path}"
    assert [tuple(x.shape) for x in node.data] == [tuple(lv["shape"]) for lv in d["levels"]]
    if channels is not None:
        assert d["channels"] == channels
        assert node.metadata["channel_names"] == channels
    assert sorted(d["labels"]) == sorted(labels)
    if labels:
        validate(path / "labels", "Labels")
        for name in labels:
            validate(path / "labels" / name, "ImageLabel")
        names = [n.metadata.get("name") for n in nodes]
        assert set(labels) <= set(names)  # the Reader follows the labels group
    return d


def _mean2(a: np.ndarray) -> np.ndarray:
    """Reference 2x2 mean over the last two axes, edge replicated, rounded half up for ints."""
    h, w = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)]
    a = np.pad(a, pad, mode="edge").astype(np.float64)
    s = a[..., 0::2, 0::2] + a[..., 1::2, 0::2] + a[..., 0::2, 1::2] + a[..., 1::2, 1::2]
    return s / 4


# ------------------------------------------------------------------------------------------
# daskpath.ome on its own
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rgb", "float", "labels"])
def test_region_writes_then_pyramid(tmp_path: Path, kind: str) -> None:
    """Level 0 written region by region (one writer per chunk, odd sizes), the pyramid from it
    equals a NumPy reference, and the result is a valid NGFF image."""
    rng = np.random.default_rng(1)
    shape, chunks = (2301, 1250), (384, 256)
    if kind == "rgb":
        data = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
        kw = {}
    elif kind == "float":
        data = rng.random((2, *shape), dtype=np.float32)
        kw = {"channels": ["a", "b"]}
    else:
        data = rng.integers(0, 50, shape, dtype=np.int32)
        kw = {}
    path = ome.create_image(tmp_path / f"{kind}.zarr", shape, kind=kind, chunks=chunks, mpp=MPP,
                            **kw)
    for y0 in range(0, shape[0], chunks[0]):
        for x0 in range(0, shape[1], chunks[1]):
            ome.write_region(path, y0, x0, data[..., y0:y0 + chunks[0], x0:x0 + chunks[1]])
    ome.build_pyramid(path)
    d = check_image(path, axes=["y", "x"] if kind == "labels" else ["c", "y", "x"],
                    scale0=[MPP, MPP] if kind == "labels" else [1.0, MPP, MPP],
                    channels={"rgb": ["R", "G", "B"], "float": ["a", "b"]}.get(kind))
    assert [lv["shape"][-2:] for lv in d["levels"]] == [(2301, 1250), (1151, 625), (576, 313)]
    np.testing.assert_array_equal(ome.read_image(path, channel_last=False), data)
    lvl1 = ome.read_image(path, 1, channel_last=False)
    lvl2 = ome.read_image(path, 2, channel_last=False)
    if kind == "labels":  # nearest: label values stay ids
        np.testing.assert_array_equal(lvl1, data[::2, ::2])
        np.testing.assert_array_equal(lvl2, data[::4, ::4])
    elif kind == "rgb":
        np.testing.assert_array_equal(lvl1, np.floor(_mean2(data) + 0.5).astype(np.uint8))
        np.testing.assert_array_equal(lvl2, np.floor(_mean2(lvl1) + 0.5).astype(np.uint8))
    else:
        np.testing.assert_allclose(lvl1, _mean2(data), rtol=1e-6)
        np.testing.assert_allclose(lvl2, _mean2(lvl1), rtol=1e-6)


def test_labels_of_an_image_and_class_colours(tmp_path: Path) -> None:
    img = ome.write_image(tmp_path / "img.zarr", np.zeros((3, 600, 500), np.uint8), mpp=0.25,
                          chunks=(256, 256))
    nuc = ome.create_labels(img / "labels" / "nuclei", (600, 500), chunks=(256, 256))
    cls = ome.create_labels(img / "labels" / "ki67", (600, 500), chunks=(256, 256), dtype=np.uint8,
                            colors=ome.CLASS_COLORS, properties=ome.CLASS_PROPERTIES)
    ome.write_region(cls, 0, 0, np.full((10, 10), 2, np.uint8))
    for p in (nuc, cls):
        ome.build_pyramid(p)
    check_image(img, axes=["c", "y", "x"], scale0=[1.0, 0.25, 0.25], labels=["nuclei", "ki67"])
    label = zarr.open_group(str(cls), mode="r").attrs["ome"]["image-label"]
    assert label["source"] == {"image": "../../"}  # the labelled image, as the spec says
    assert {c["label-value"]: c["rgba"] for c in label["colors"]}.keys() == {1, 2}
    assert {p["label-value"]: p["class"] for p in label["properties"]} == {1: "Negative",
                                                                          2: "Positive"}
    node = next(n for n in reader_nodes(img) if n.metadata.get("name") == "ki67")
    assert set(node.metadata["color"]) == {1, 2}  # napari colours the classes with these
    model = validate(cls, "ImageLabel")
    assert [c.label_value for c in model.ome_attributes.image_label.colors] == [1, 2]


def test_unknown_pixel_size_is_unitless_then_set(tmp_path: Path) -> None:
    p = ome.write_image(tmp_path / "l.zarr", np.arange(12, dtype=np.int32).reshape(3, 4),
                        kind="labels", chunks=(2, 2))
    d = check_image(p, axes=["y", "x"], scale0=[1.0, 1.0], unit=None)
    assert d["mpp"] is None and any("pixel size unknown" in n for n in d["notes"])
    ome.set_mpp(p, 0.3)
    d = check_image(p, axes=["y", "x"], scale0=[0.3, 0.3])
    assert d["mpp"] == pytest.approx(0.3) and not d["notes"]


def test_describe_reports_old_and_non_ngff_stores(tmp_path: Path) -> None:
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    g.create_array("a", shape=(4, 4), dtype="int32")
    d = ome.describe(tmp_path / "plain.zarr")
    assert not d["ngff"] and "not OME-NGFF" in d["notes"][0]


# ------------------------------------------------------------------------------------------
# ingest: valid NGFF, same pixels, reused when unchanged
# ------------------------------------------------------------------------------------------


def _png(path: Path, rgb: np.ndarray, mpp: float | None = MPP) -> Path:
    import pyvips

    img = pyvips.Image.new_from_array(rgb)
    if mpp:
        img = img.copy(xres=1000.0 / mpp, yres=1000.0 / mpp)  # px per mm -> pHYs
    img.pngsave(str(path), compression=1)
    return path


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (700, 1100, 3), dtype=np.uint8)


def test_ingest_is_valid_ngff_and_reopens_to_the_same_pixels(tmp_path: Path, rgb) -> None:
    src = _png(tmp_path / "x_HE.png", rgb)
    out = io.ingest(src, chunk_size=256)
    assert out == tmp_path / "x_HE.ome.zarr"
    d = check_image(out, axes=["c", "y", "x"], scale0=[1.0, MPP, MPP], channels=["R", "G", "B"])
    assert [lv["shape"] for lv in d["levels"]][-1] == (3, 88, 138)  # until one chunk (256)
    omero = zarr.open_group(str(out), mode="r").attrs["ome"]["omero"]
    assert [c["color"] for c in omero["channels"]] == ["FF0000", "00FF00", "0000FF"]
    ident = d["daskpath"]["source_identity"]
    assert ident["size"] == src.stat().st_size and ident["ends"]
    arr = io.open_slide(out)
    assert arr.dims == ("y", "x", "c") and arr.data.chunks[2] == (3,)
    np.testing.assert_array_equal(arr.values, rgb)
    nodes = reader_nodes(out)
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), rgb.transpose(2, 0, 1))


def test_old_yxc_ingest_still_opens(tmp_path: Path, rgb) -> None:
    """Stores written before NGFF compliance (axes y, x, c) stay readable."""
    g = zarr.open_group(str(tmp_path / "old.ome.zarr"), mode="w", zarr_format=3)
    g.create_array("0", shape=rgb.shape, chunks=(256, 256, 3), dtype="uint8")[:] = rgb
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"},
                 {"name": "c", "type": "channel"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    np.testing.assert_array_equal(io.open_slide(tmp_path / "old.ome.zarr").values, rgb)
    assert any("not NGFF order" in n for n in ome.describe(tmp_path / "old.ome.zarr")["notes"])


def test_ingest_beside_the_png_is_reused_until_the_png_changes(tmp_path: Path, rgb, caplog,
                                                               monkeypatch) -> None:
    src = _png(tmp_path / "x_HE.png", rgb)
    io.ingest(src, chunk_size=256)  # `daskpath ingest flat/x_HE.png`
    calls: list = []
    real = io.ingest
    monkeypatch.setattr(io, "ingest", lambda *a, **k: calls.append(a) or real(*a, **k))
    with caplog.at_level(logging.INFO, logger="daskpath.io"):
        arr = io.open_slide(src, cache_dir=tmp_path / "cache")
    assert calls == [] and arr.attrs["path"] == str(tmp_path / "x_HE.ome.zarr")
    assert "slide x_HE.png: using ingest x_HE.ome.zarr (same file)" in caplog.text
    np.testing.assert_array_equal(arr.values, rgb)
    # without a cache_dir too (a flat raster alone would raise)
    assert io.open_slide(src).attrs["path"] == str(tmp_path / "x_HE.ome.zarr")
    # the PNG changes (re-exported): the old ingest is not used, a fresh one goes to the cache
    _png(src, rgb[::-1].copy())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="daskpath.io"):
        arr = io.open_slide(src, cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and Path(arr.attrs["path"]).parent == tmp_path / "cache"
    assert "not using ingest" in caplog.text and "different file" in caplog.text
    np.testing.assert_array_equal(arr.values, rgb[::-1])
    with pytest.raises(Exception, match="flat raster"):
        io.open_slide(src)  # the stale ingest beside it is not used
    # an ingest in cache_dir named like the PNG is used as well
    other = _png(tmp_path / "y_HE.png", rgb)
    io.ingest(other, tmp_path / "cache" / "y_HE.ome.zarr", chunk_size=256)
    assert io.open_slide(other, cache_dir=tmp_path / "cache").attrs["path"] == str(
        tmp_path / "cache" / "y_HE.ome.zarr")
    assert len(calls) == 2  # that explicit ingest only


def test_cli_info_prints_the_ngff_description(tmp_path: Path, rgb, capsys) -> None:
    from daskpath.cli import main

    out = io.ingest(_png(tmp_path / "x.png", rgb), chunk_size=256)
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OME-NGFF 0.5 image 'x', axes (c, y, x), 0.5 um/px at level 0, 4 level(s)" in text
    assert "channels: R, G, B" in text and "ingested from" in text


def test_synthetic_zarr_layout_is_ngff_and_lossless(tmp_path: Path) -> None:
    from daskpath.synthetic import make_pair

    z = make_pair(tmp_path, slide="z", size=(1024, 1536), seed=2, layout="zarr", tile_size=256)
    p = make_pair(tmp_path, slide="p", size=(1024, 1536), seed=2, layout="png")
    assert z.he.name == "z_HE.ome.zarr"
    check_image(z.he, axes=["c", "y", "x"], scale0=[1.0, MPP, MPP], channels=["R", "G", "B"])
    check_image(z.ihc, axes=["c", "y", "x"], scale0=[1.0, MPP, MPP], channels=["R", "G", "B"])
    arr = io.open_slide(z.he)
    assert arr.attrs["tile_size"] == (256, 256) and arr.attrs["levels"] == 2
    np.testing.assert_array_equal(arr.values, io.open_slide(p.he, cache_dir=tmp_path / "c").values)


# ------------------------------------------------------------------------------------------
# the pipeline's layers
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """One 1536 x 1024 phantom pair (tiled TIFF): big enough for a 2-level virtual pyramid."""
    from daskpath.synthetic import make_cohort

    return make_cohort(tmp_path_factory.mktemp("ome_synth"), pairs=1, size=(1536, 1024), seed=5)


def _cfg(manifest, out, *extra):
    from daskpath.config import load_config

    return load_config(None, [f"slides={manifest}", f"output_dir={out}", "tiles.size=512",
                              "chunk_size=512", *extra])


def test_preprocess_layers_are_ngff(small_cohort, dask_client, tmp_path) -> None:
    """layers/<slide>.zarr: channels tissue_he, tissue_ihc, ssim at 1/8 (scale mpp * 8) equal
    to the whole-image masks; thumbnails are RGB NGFF images equal to the slide pixels."""
    import tifffile

    from daskpath.pipeline import run
    from daskpath.similarity import gray, ssim_block
    from daskpath.tissue import tissue_block

    res = run(_cfg(small_cohort, tmp_path, "stages=[preprocess]"), client=dask_client)
    assert res.ok, res.failures
    slide, he_name, ihc_name = pd.read_csv(small_cohort).iloc[0]
    layers = tmp_path / "layers" / f"{slide}.zarr"
    d = check_image(layers, axes=["c", "y", "x"], scale0=[1.0, MPP * 8, MPP * 8],
                    channels=["tissue_he", "tissue_ihc", "ssim"])
    assert d["levels"][0]["shape"] == (3, 192, 128)
    assert [c["name"] for c in d["children"]] == [f"{slide} HE thumbnail", f"{slide} IHC thumbnail"]
    he = tifffile.imread(small_cohort.parent / he_name, level=0)
    ihc = tifffile.imread(small_cohort.parent / ihc_name, level=0)
    got = ome.read_image(layers, channel_last=False)
    ref = [tissue_block(he), tissue_block(ihc), ssim_block(gray(he), gray(ihc), sigma=1.5)]
    for k, r in enumerate(ref):
        small = r.astype(np.float32).reshape(192, 8, 128, 8).mean(axis=(1, 3))
        np.testing.assert_allclose(got[k], small, atol=1e-5)
    step = d["daskpath"]["thumbnail_step"]
    assert step == 2  # longest side 1536 -> <= 1024
    for name, img in (("he", he), ("ihc", ihc)):
        thumb = layers / "thumbnails" / name
        check_image(thumb, axes=["c", "y", "x"], scale0=[1.0, MPP * step, MPP * step],
                    channels=["R", "G", "B"])
        np.testing.assert_array_equal(ome.read_image(thumb), img[::step, ::step])


@pytest.mark.slow  # StarDist + the translation model on a process cluster: ~1 min on 2 cores
@pytest.mark.nuclei
def test_model_stage_layers_are_ngff(small_cohort, dask_client, tmp_path) -> None:
    """The virtual IHC and the nucleus label images: valid NGFF, level 0 equal to what the
    stages computed, label ids equal to the nuclei table's, Ki67 classes coloured."""
    pytest.importorskip("stardist")
    pytest.importorskip("torch")
    from daskpath.pipeline import run
    from daskpath.translate import translate

    cfg = _cfg(small_cohort, tmp_path, "stages=[preprocess,nuclei,translate]")
    res = run(cfg, client=dask_client)
    assert res.ok, res.failures
    slide = res.slides.slide[0]
    lay = tmp_path / "layers"
    assert sorted(p.name for p in lay.iterdir()) == sorted(
        [f"{slide}.zarr", f"{slide}.virtual.zarr", f"{slide}.ihc-labels.zarr",
         f"{slide}.ihc-ki67.zarr"])
    # the virtual IHC: RGB image with its two label images, 2 levels (1536 -> 768)
    vpath = lay / f"{slide}.virtual.zarr"
    d = check_image(vpath, axes=["c", "y", "x"], scale0=[1.0, MPP, MPP],
                    channels=["R", "G", "B"], labels=["nuclei", "ki67"])
    assert [lv["shape"] for lv in d["levels"]] == [(3, 1536, 1024), (3, 768, 512)]
    for name in ("nuclei", "ki67"):
        check_image(vpath / "labels" / name, axes=["y", "x"], scale0=[MPP, MPP])
    virtual = ome.read_image(vpath)
    ds = io.open_pair(*(small_cohort.parent / n for n in pd.read_csv(small_cohort).iloc[0, 1:]),
                      chunk_size=512)
    want = translate(ds["he"].data, cfg.translate.model, batch_size=cfg.translate.batch_size,
                     blend=cfg.translate.blend, norm_stats=cfg.translate.norm_stats)
    want = want.compute(scheduler="threads")
    written = ~(virtual == 255).all(axis=2)
    assert written.mean() > 0.3
    diff = np.abs(virtual.astype(int) - want.astype(int))[written]
    assert diff.max() <= 1  # the translated pixels (float rounding between processes)
    # label images vs the nuclei tables
    for labels, classes, table in (
        (vpath / "labels" / "nuclei", vpath / "labels" / "ki67", f"{slide}.virtual.parquet"),
        (lay / f"{slide}.ihc-labels.zarr", lay / f"{slide}.ihc-ki67.zarr", f"{slide}.parquet"),
    ):
        if labels.parent.name != "labels":  # standalone (their image is the user's slide)
            check_image(labels, axes=["y", "x"], scale0=[MPP, MPP])
            check_image(classes, axes=["y", "x"], scale0=[MPP, MPP])
        nuc = pd.read_parquet(tmp_path / "nuclei" / table)
        lab, cls = ome.read_image(labels), ome.read_image(classes)
        ids = np.unique(lab[lab > 0])
        assert len(nuc) > 20 and set(nuc["id"]) <= set(ids.tolist())
        assert len(ids) == pytest.approx(len(nuc), rel=0.05)
        pos = set(nuc.loc[nuc.positive, "id"])
        in_table = np.isin(lab, nuc["id"].to_numpy())
        np.testing.assert_array_equal(cls[in_table],
                                      np.where(np.isin(lab[in_table], list(pos)), 2, 1))
        assert not cls[lab == 0].any()
        np.testing.assert_array_equal(ome.read_image(labels, 1), lab[::2, ::2])


def test_class_labels_from_the_label_pyramid_equal_the_class_pyramid(tmp_path) -> None:
    """write_class_labels(from_pyramid=True) maps every level of the ids; the default maps
    level 0 and builds the class pyramid from it: same pixels at every level, and level 0 is
    the class of each id in the table (ids absent from the table stay 0)."""
    from daskpath.nuclei import _classes_of, write_class_labels

    rng = np.random.default_rng(3)
    shape, chunks = (1100, 2300), (256, 512)  # levels 2300, 1150, 575 px wide
    lab = np.zeros(shape, np.int32)
    ncols = shape[1] // 2
    for _ in range(900):  # square "nuclei" with grid-cell ids as segment_nuclei makes them
        y, x = int(rng.integers(0, shape[0] - 9)), int(rng.integers(0, shape[1] - 9))
        lab[y:y + 9, x:x + 9] = (y + 4) // 2 * ncols + (x + 4) // 2 + 1
    ids = np.unique(lab[lab > 0])
    table = pd.DataFrame({"id": ids[ids % 7 != 0],  # some painted ids have no table row
                          "positive": rng.random(int((ids % 7 != 0).sum())) < 0.4})
    src = tmp_path / "labels.zarr"
    ome.create_labels(src, shape, chunks=chunks, mpp=0.5, dtype=np.int32)
    ome.write_region(src, 0, 0, lab)
    ome.build_pyramid(src)
    write_class_labels(src, tmp_path / "a.zarr", table)
    task = write_class_labels(src, tmp_path / "b.zarr", table, from_pyramid=True, compute=False)
    assert not any("pyramid_after" in str(k) for k in dict(task.dask))  # levels mapped, not built
    task.compute()
    levels = ome.describe(src)["levels"]
    assert len(levels) == 3
    for k in range(len(levels)):
        np.testing.assert_array_equal(ome.read_image(tmp_path / "a.zarr", k),
                                      ome.read_image(tmp_path / "b.zarr", k))
    want = np.zeros(shape, np.uint8)
    pos = table.loc[table.positive, "id"].to_numpy()
    want[np.isin(lab, table["id"].to_numpy())] = 1
    want[np.isin(lab, pos)] = 2
    np.testing.assert_array_equal(ome.read_image(tmp_path / "b.zarr"), want)
    # the binary-search path (ids spread over more than the dense table's range) agrees
    sorted_ids = np.array([5, 9, 1 << 27, (1 << 27) + 3], np.int64)
    classes = np.array([1, 2, 2, 1], np.uint8)
    v = np.array([9, 5, 6, 1 << 27, (1 << 27) + 3, (1 << 27) + 1, 9], np.int64)
    np.testing.assert_array_equal(_classes_of(v, sorted_ids, classes), [2, 1, 0, 2, 1, 0, 2])
    np.testing.assert_array_equal(_classes_of(v[:3], sorted_ids, classes), [2, 1, 0])


@pytest.mark.parametrize("kind,dtype,channels", [("rgb", np.uint8, 3), ("labels", np.int32, 0),
                                                 ("float", np.float32, 2)])
def test_pyramid_tasks_equal_halving_whole_levels(tmp_path, monkeypatch, kind, dtype,
                                                  channels) -> None:
    """build_pyramid's row-of-chunks tasks (here 2 chunks wide, odd shapes, chunks that do not
    divide the levels) give the pixels of halving each whole level at once."""
    monkeypatch.setattr(ome, "PYRAMID_TASK_CHUNKS", 2)
    rng = np.random.default_rng(5)
    shape2 = (2101, 3333)
    shape = shape2 if kind == "labels" else (channels,) + shape2
    if kind == "labels":
        img = rng.integers(0, 50, shape2).astype(dtype)
        p = ome.create_labels(tmp_path / "l.zarr", shape2, chunks=(300, 280), mpp=0.5, dtype=dtype)
    else:
        img = (rng.random(shape) * 255).astype(dtype)
        p = ome.create_image(tmp_path / "i.zarr", shape2, kind=kind, chunks=(300, 280), mpp=0.5,
                             dtype=dtype, channels=[f"c{i}" for i in range(channels)]
                             if kind != "rgb" else None)
    ome.write_region(p, 0, 0, img)
    ome.build_pyramid(p)
    n = len(ome.describe(p)["levels"])
    assert n >= 3
    want = img
    for k in range(1, n):
        want = ome._down(want, kind)
        np.testing.assert_array_equal(ome.read_image(p, k, channel_last=False), want)


def _mean2x2_reference(b: np.ndarray) -> np.ndarray:
    s = (b[..., 0::2, 0::2].astype(np.uint16) + b[..., 1::2, 0::2] + b[..., 0::2, 1::2]
         + b[..., 1::2, 1::2])
    return ((s + 2) // 4).astype(np.uint8)


@pytest.mark.parametrize("shape", [(3, 1024, 2048), (3, 2, 2), (1, 6, 10), (2048, 2048),
                                   (3, 62, 38), (2, 3, 4, 6)])
def test_mean2x2_u8_equals_the_rounded_integer_mean(shape) -> None:
    """OpenCV's INTER_AREA halving is the rounded-half-up integer mean, bit for bit, for planar
    (c, y, x) blocks (no 2x2 cell spans two planes), 2-D blocks and (y, x, c) with channel_last
    (also with more channels than OpenCV takes at once); all 256 values, both rounding edges."""
    rng = np.random.default_rng(11)
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    b.reshape(-1)[:8] = [255, 255, 255, 254, 0, 0, 0, 2]  # sums 1019 (-> 255) and 2 (-> 1)
    np.testing.assert_array_equal(ome.mean2x2_u8(b), _mean2x2_reference(b))
    np.testing.assert_array_equal(ome._down(b, "rgb"), _mean2x2_reference(b))
    if len(shape) == 3:
        hwc = np.ascontiguousarray(np.moveaxis(b, 0, -1))
        want = np.moveaxis(_mean2x2_reference(b), 0, -1)
        np.testing.assert_array_equal(ome.mean2x2_u8(hwc, channel_last=True), want)
    for empty in ((0, 8, 3), (8, 0, 3)):  # e.g. a one-row band, cropped to even rows
        assert ome.mean2x2_u8(np.zeros(empty, np.uint8), channel_last=True).shape == (
            empty[0] // 2, empty[1] // 2, 3)
        assert ome.mean2x2_u8(np.zeros(empty[::-1], np.uint8)).shape == (3, empty[1] // 2,
                                                                           empty[0] // 2)
    wide = rng.integers(0, 256, (6, 8, 7), dtype=np.uint8)
    np.testing.assert_array_equal(ome.mean2x2_u8(wide, channel_last=True),
                                  np.moveaxis(_mean2x2_reference(np.moveaxis(wide, -1, 0)), 0, -1))


def test_images_are_written_with_zstd_level_1_and_every_chunk(tmp_path: Path) -> None:
    """Arrays use zstd at ZSTD_LEVEL; an image array opened for writing stores a chunk equal to
    the fill value (no emptiness check), a label image leaves it unwritten."""
    p = ome.create_image(tmp_path / "i.zarr", (64, 64), kind="rgb", chunks=(32, 32))
    a = ome.open_level(p, 0, mode="r+")
    codecs = [c for c in a.metadata.codecs if type(c).__name__ == "ZstdCodec"]
    assert [c.level for c in codecs] == [ome.ZSTD_LEVEL] == [1]
    ome.write_region(p, 0, 0, np.zeros((3, 32, 32), np.uint8))
    assert ome.open_level(p, 0).nchunks_initialized == 1
    lab = ome.create_labels(tmp_path / "l.zarr", (64, 64), chunks=(32, 32))
    ome.write_region(lab, 0, 0, np.zeros((32, 32), np.int32))
    assert ome.open_level(lab, 0).nchunks_initialized == 0
    assert ome.open_level(p, 0).config.write_empty_chunks is False  # read-only opens unchanged
