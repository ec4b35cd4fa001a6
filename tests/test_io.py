"""Tests for daskpath.io: in-place tiled reads, ingest of flat rasters, pairs, manifest, errors."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from daskpath import io
from daskpath.errors import InvalidInputError, ManifestError, PairMismatchError, SlideError

H, W = 1000, 1300  # not divisible by any chunk size used below
MPP = 0.5


def _image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: compresses like tissue, exposes off-by-one errors."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * 255 // h), (xx * 255 // w), ((yy + xx) % 256)], axis=-1)
    noise = rng.integers(0, 40, (h, w, 3))
    return ((base + noise) % 256).astype(np.uint8)


def _write_tiled(path: Path, arr: np.ndarray, *, tile: int = 256, compression: str = "zlib",
                 pyramid: bool = False, mpp: float | None = MPP) -> Path:
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    with tifffile.TiffWriter(path) as tw:
        tw.write(arr, tile=(tile, tile), compression=compression, photometric="rgb",
                 subifds=1 if pyramid else 0, **res)
        if pyramid:
            tw.write(arr[::2, ::2], tile=(tile, tile), compression=compression,
                     photometric="rgb", subfiletype=1)
    return path


def _write_png(path: Path, arr: np.ndarray) -> Path:
    import pyvips

    pyvips.Image.new_from_array(arr).write_to_file(str(path), compression=1)
    return path


@pytest.fixture(scope="session")
def rgb() -> np.ndarray:
    return _image()


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory, rgb: np.ndarray) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    f: dict[str, Path] = {}
    f["jpeg_tif"] = _write_tiled(d / "jpeg.tif", rgb, compression="jpeg")
    f["zlib_tif"] = _write_tiled(d / "zlib.tif", rgb, pyramid=True)
    f["tile512_tif"] = _write_tiled(d / "t512.tif", rgb, tile=512)
    f["png"] = _write_png(d / "flat.png", rgb)
    f["strip_tif"] = d / "strips.tif"
    tifffile.imwrite(f["strip_tif"], rgb, rowsperstrip=16, compression="zlib", photometric="rgb")
    f["onestrip_tif"] = d / "onestrip.tif"
    tifffile.imwrite(f["onestrip_tif"], rgb, rowsperstrip=H, photometric="rgb")
    f["jpg"] = d / "flat.jpg"
    import pyvips

    pyvips.Image.new_from_array(rgb).write_to_file(str(f["jpg"]), Q=95)
    rgba = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=-1)
    f["rgba_tif"] = d / "rgba.tif"
    tifffile.imwrite(f["rgba_tif"], rgba, tile=(256, 256), photometric="rgb", extrasamples=[2])
    f["rgba_png"] = _write_png(d / "rgba.png", rgba)
    # bad inputs
    f["gray_tif"] = d / "gray.tif"
    tifffile.imwrite(f["gray_tif"], rgb[..., 0], tile=(256, 256))
    f["u16_tif"] = d / "u16.tif"
    tifffile.imwrite(f["u16_tif"], rgb.astype(np.uint16) * 257, tile=(256, 256),
                     photometric="rgb")
    f["gray_png"] = _write_png(d / "gray.png", rgb[..., 0])
    f["u16_png"] = _write_png(d / "u16.png", rgb.astype(np.uint16) * 257)
    whole = f["zlib_tif"].read_bytes()
    f["trunc_tif"] = d / "trunc.tif"
    f["trunc_tif"].write_bytes(whole[: len(whole) // 2])
    png = f["png"].read_bytes()
    f["trunc_png"] = d / "trunc.png"
    f["trunc_png"].write_bytes(png[: len(png) // 2])
    f["text"] = d / "notes.tif"
    f["text"].write_text("slide,he,ihc\nthis is not an image\n")
    f["empty"] = d / "empty.svs"
    f["empty"].write_bytes(b"")
    f["missing"] = d / "does_not_exist.tif"
    return f


# ------------------------------------------------------------------------------------------
# Tiled TIFF, read in place
# ------------------------------------------------------------------------------------------


def test_tiled_jpeg_matches_tifffile(files: dict[str, Path]) -> None:
    import tiffslide

    ref = tifffile.imread(files["jpeg_tif"])
    slide = tiffslide.TiffSlide(files["jpeg_tif"])
    np.testing.assert_array_equal(slide.zarr_group["0"][:], ref)  # same decoder as tifffile
    arr = io.open_slide(files["jpeg_tif"])
    assert arr.dims == ("y", "x", "c") and arr.dtype == np.uint8 and arr.shape == (H, W, 3)
    assert arr.attrs["format"] == "tiff" and arr.attrs["tile_size"] == (256, 256)
    np.testing.assert_array_equal(arr.values, ref)


@pytest.mark.parametrize("chunk_size", [None, 256, 300, 700])
def test_tiled_lossless_exact_any_chunks(files: dict[str, Path], rgb: np.ndarray,
                                         chunk_size: int | None) -> None:
    arr = io.open_slide(files["zlib_tif"], chunk_size=chunk_size)
    np.testing.assert_array_equal(arr.values, rgb)
    np.testing.assert_array_equal(arr[123:877, 1001:1299].values, rgb[123:877, 1001:1299])


def test_pyramid_level1(files: dict[str, Path], rgb: np.ndarray) -> None:
    arr = io.open_slide(files["zlib_tif"], level=1)
    assert arr.shape == (H // 2, W // 2, 3)
    assert arr.attrs["downsample"] == 2.0 and arr.attrs["mpp"] == pytest.approx(2 * MPP)
    np.testing.assert_array_equal(arr.values, rgb[::2, ::2])
    with pytest.raises(SlideError, match="levels 0..1"):
        io.open_slide(files["zlib_tif"], level=2)


def test_default_chunks_align_to_tiles(files: dict[str, Path], caplog: pytest.LogCaptureFixture,
                                       ) -> None:
    assert io.open_slide(files["zlib_tif"]).attrs["chunk_size"] == (2048, 2048)
    assert io._choose_chunks((240, 512), None, "x") == (2160, 2048)
    assert io._choose_chunks((256, 256), 4096, "x") == (4096, 4096)
    with caplog.at_level(logging.INFO, logger="daskpath.io"):
        arr = io.open_slide(files["tile512_tif"], chunk_size=600)
    assert "rounded up to 1024x1024" in caplog.text
    assert arr.data.chunks[:2] == ((1000,), (1024, 276))
    arr = io.open_slide(files["zlib_tif"], chunk_size=300)
    assert arr.data.chunks[:2] == ((512, 488), (512, 512, 276))
    for bad in (0, -5, 1.5, "big"):
        with pytest.raises(InvalidInputError, match="chunk_size"):
            io.open_slide(files["zlib_tif"], chunk_size=bad)  # type: ignore[arg-type]


def test_coords_in_microns(files: dict[str, Path]) -> None:
    arr = io.open_slide(files["zlib_tif"])
    assert arr.attrs["mpp"] == pytest.approx(MPP)
    np.testing.assert_allclose(arr.y_um.values, arr.y.values * MPP)
    np.testing.assert_allclose(arr.x_um.values, arr.x.values * MPP)
    assert list(arr.c.values) == ["R", "G", "B"]
    assert arr.attrs["path"] == str(files["zlib_tif"])


def test_no_mpp_means_no_micron_coords(tmp_path: Path, rgb: np.ndarray) -> None:
    arr = io.open_slide(_write_tiled(tmp_path / "nompp.tif", rgb, mpp=None))
    assert arr.attrs.get("mpp") is None and "y_um" not in arr.coords


def test_rgba_drops_alpha(files: dict[str, Path], rgb: np.ndarray, tmp_path: Path) -> None:
    np.testing.assert_array_equal(io.open_slide(files["rgba_tif"]).values, rgb)
    assert io.slide_info(files["rgba_tif"])["channels"] == 4
    out = io.ingest(files["rgba_png"], tmp_path / "rgba.ome.zarr", chunk_size=512)
    np.testing.assert_array_equal(io.open_slide(out).values, rgb)


def test_reader_pickles_and_rereads(files: dict[str, Path], rgb: np.ndarray) -> None:
    arr = io.open_slide(files["zlib_tif"], chunk_size=256)
    clone = pickle.loads(pickle.dumps(arr.data))
    np.testing.assert_array_equal(clone[300:600, 700:900].compute(), rgb[300:600, 700:900])


def test_process_workers(files: dict[str, Path], tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    ref = tifffile.imread(files["jpeg_tif"])
    zarr_path = io.ingest(files["png"], tmp_path / "w.ome.zarr", chunk_size=256)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        tiled = io.open_slide(files["jpeg_tif"], chunk_size=256)
        total = client.compute(tiled.data.sum(dtype=np.uint64)).result()
        assert int(total) == int(ref.sum(dtype=np.uint64))
        ingested = io.open_slide(zarr_path, chunk_size=256)
        total = client.compute(ingested.data.sum(dtype=np.uint64)).result()
        assert int(total) == int(tifffile.imread(files["zlib_tif"]).sum(dtype=np.uint64))


def test_corrupt_tile_fails_lazily(tmp_path: Path, rgb: np.ndarray) -> None:
    path = _write_tiled(tmp_path / "bad.tif", rgb)
    with tifffile.TiffFile(path) as tf:
        off, count = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    raw = bytearray(path.read_bytes())
    raw[off:off + count] = b"\x00" * count
    path.write_bytes(bytes(raw))
    arr = io.open_slide(path, chunk_size=256)  # header and structure are fine
    np.testing.assert_array_equal(arr[:256, :256].values, rgb[:256, :256])
    with pytest.raises(SlideError, match="corrupt or truncated"):
        arr.values


# ------------------------------------------------------------------------------------------
# Ingest of flat rasters
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["png", "strip_tif", "onestrip_tif", "zlib_tif"])
def test_ingest_exact(files: dict[str, Path], rgb: np.ndarray, tmp_path: Path, key: str) -> None:
    out = io.ingest(files[key], tmp_path / f"{key}.ome.zarr", chunk_size=256)
    assert out.is_dir() and not Path(str(out) + ".partial").exists()
    group = zarr.open_group(str(out), mode="r")
    meta = group.attrs["ome"]
    assert meta["version"] == "0.5"
    ms = meta["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]  # NGFF: space axes last
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2", "3"]
    assert [c["label"] for c in meta["omero"]["channels"]] == ["R", "G", "B"]
    level0 = group["0"]
    assert level0.shape == (3, H, W) and level0.dtype == np.uint8
    assert level0.chunks == (3, 256, 256)
    np.testing.assert_array_equal(level0[:], rgb.transpose(2, 0, 1))
    assert group["1"].shape == (3, 500, 650) and group["3"].shape == (3, 125, 163)
    expect1 = ((rgb.reshape(500, 2, 650, 2, 3).sum(axis=(1, 3), dtype=np.uint16) + 2) // 4)
    np.testing.assert_array_equal(group["1"][:], expect1.astype(np.uint8).transpose(2, 0, 1))
    arr = io.open_slide(out)
    assert arr.attrs["format"] == "ome-zarr" and arr.attrs["tile_size"] == (256, 256)
    np.testing.assert_array_equal(arr.values, rgb)
    assert io.open_slide(out, level=1).shape == (500, 650, 3)


def test_ingest_jpeg_matches_vips_decode(files: dict[str, Path], tmp_path: Path) -> None:
    import pyvips

    ref = pyvips.Image.new_from_file(str(files["jpg"])).numpy()
    out = io.ingest(files["jpg"], tmp_path / "j.ome.zarr", chunk_size=384)
    np.testing.assert_array_equal(io.open_slide(out).values, ref)


def test_ingest_default_dst_overwrite_and_mpp(tmp_path: Path, rgb: np.ndarray) -> None:
    src = _write_png(tmp_path / "slide_01.png", rgb)
    out = io.ingest(src, chunk_size=512, mpp=0.25)
    assert out == tmp_path / "slide_01.ome.zarr"
    arr = io.open_slide(out)
    assert arr.attrs["mpp"] == pytest.approx(0.25)
    assert io.open_slide(out, level=1).attrs["mpp"] == pytest.approx(0.5)
    with pytest.raises(SlideError, match="already exists.*overwrite"):
        io.ingest(src, chunk_size=512)
    assert io.ingest(src, chunk_size=512, overwrite=True) == out


def test_ingest_interrupted_leaves_nothing_complete(tmp_path: Path, rgb: np.ndarray,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_png(tmp_path / "s.png", rgb)
    dst = tmp_path / "s.ome.zarr"

    real = io._level0_bands

    def interrupted(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        bands = real(*args, **kwargs)  # type: ignore[arg-type]
        yield next(bands)  # one band written, then the user hits Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_level0_bands", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.ingest(src, dst, chunk_size=256)
    assert not dst.exists() and not (tmp_path / "s.ome.zarr.partial").exists()
    (tmp_path / "s.ome.zarr.partial").mkdir()  # left by a killed process
    with pytest.raises(SlideError, match="unfinished ingest|not a zarr"):
        io.open_slide(tmp_path / "s.ome.zarr.partial")


def test_flat_raster_needs_ingest_or_cache(files: dict[str, Path], rgb: np.ndarray,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    with pytest.raises(SlideError, match=r"flat raster .*flat\.png.*daskpath ingest.*cache_dir"):
        io.open_slide(files["png"])
    info = io.slide_info(files["strip_tif"])
    assert info["needs_ingest"] and info["format"] == "tiff-stripped"
    arr = io.open_slide(files["png"], cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(arr.values, rgb)
    calls: list[object] = []
    monkeypatch.setattr(io, "ingest", lambda *a, **k: calls.append(a))
    again = io.open_slide(files["png"], cache_dir=tmp_path / "cache")  # cached: no new ingest
    assert calls == [] and again.attrs["path"] == arr.attrs["path"]
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    io.open_slide(files["png"], cache_dir=True)
    assert list((tmp_path / "xdg" / "daskpath").glob("flat-*.ome.zarr"))


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("missing", r"does_not_exist\.tif does not exist"),
        ("empty", r"empty\.svs is empty \(0 bytes\)"),
        ("text", r"notes\.tif is not a supported image"),
        ("trunc_tif", r"trunc\.tif is corrupt or truncated"),
        ("trunc_png", r"trunc\.png is corrupt or truncated"),
        ("gray_tif", r"gray\.tif is grayscale \(1 channel\).*RGB"),
        ("gray_png", r"gray\.png is grayscale \(1 channel\).*RGB"),
        ("u16_tif", r"u16\.tif has uint16 pixels \(16-bit\).*8-bit"),
        ("u16_png", r"u16\.png has uint16 pixels \(16-bit\).*8-bit"),
    ],
)
def test_bad_inputs(files: dict[str, Path], tmp_path: Path, key: str, pattern: str) -> None:
    for call in (lambda p: io.open_slide(p, cache_dir=tmp_path), io.slide_info,
                 lambda p: io.ingest(p, tmp_path / "x.ome.zarr")):
        with pytest.raises(SlideError, match=pattern) as info:
            call(files[key])
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x.ome.zarr").exists()


def test_truncated_png_with_trailer_fails_at_ingest(files: dict[str, Path], tmp_path: Path
                                                    ) -> None:
    raw = files["png"].read_bytes()
    bad = tmp_path / "cut.png"
    bad.write_bytes(raw[: len(raw) // 2] + raw[-12:])  # IEND present, image data cut
    with pytest.raises(SlideError, match="corrupt or truncated"):
        io.ingest(bad, tmp_path / "cut.ome.zarr", chunk_size=256)
    assert not (tmp_path / "cut.ome.zarr").exists()
    assert not (tmp_path / "cut.ome.zarr.partial").exists()


# ------------------------------------------------------------------------------------------
# Pairs and manifest
# ------------------------------------------------------------------------------------------


def test_open_pair_same_chunks(files: dict[str, Path], rgb: np.ndarray) -> None:
    ds = io.open_pair(files["zlib_tif"], files["tile512_tif"], chunk_size=300)
    assert set(ds.data_vars) == {"he", "ihc"}
    assert ds.he.data.chunks == ds.ihc.data.chunks
    assert ds.he.data.chunks[:2] == ((512, 488), (512, 512, 276))  # lcm(256, 512) = 512
    assert ds.attrs["mpp"] == pytest.approx(MPP)
    np.testing.assert_allclose(ds.ihc.y_um.values, ds.y.values * MPP)
    np.testing.assert_array_equal(ds.ihc.values, rgb)


def test_open_pair_mismatch(files: dict[str, Path], tmp_path: Path, rgb: np.ndarray) -> None:
    small = _write_tiled(tmp_path / "ihc_small.tif", rgb[:, :1200])
    with pytest.raises(PairMismatchError,
                       match=r"zlib\.tif is 1000x1300.*ihc_small\.tif is 1000x1200.*register"):
        io.open_pair(files["zlib_tif"], small)


def _manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_read_manifest(tmp_path: Path) -> None:
    df = io.read_manifest(_manifest(tmp_path, "slide,he,ihc,note\ns1,a/s1_HE.tif,/abs/s1.tif,x\n"
                                                 "s2, s2_HE.png ,s2_IHC.png,\n"))
    assert list(df.columns[:3]) == ["slide", "he", "ihc"] and list(df.slide) == ["s1", "s2"]
    assert df.he[0] == str(tmp_path / "a" / "s1_HE.tif") and df.ihc[0] == "/abs/s1.tif"
    assert df.he[1] == str(tmp_path / "s2_HE.png")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("slide,he,ihc\n", "has no rows"),
        ("slide,he\ns1,a.tif\n", r"lacks column\(s\) ihc"),
        ("slide,he,ihc\ns1,a,b\ns2,c,d\ns1,e,f\n", r"duplicate slide id\(s\) s1"),
        ("slide,he,ihc\ns1,,b\n", "empty 'he' on data row"),
    ],
)
def test_read_manifest_errors(tmp_path: Path, text: str | None, pattern: str) -> None:
    path = tmp_path / "manifest.csv" if text is None else _manifest(tmp_path, text)
    with pytest.raises(ManifestError, match=pattern) as info:
        io.read_manifest(path)
    assert "manifest.csv" in str(info.value)


def test_slide_info(files: dict[str, Path]) -> None:
    info = io.slide_info(files["zlib_tif"])
    assert info["shape"] == (H, W, 3) and info["tile_size"] == (256, 256)
    assert info["mpp"] == pytest.approx(MPP) and info["levels"] == [(H, W), (H // 2, W // 2)]
    assert info["format"] == "tiff" and not info["needs_ingest"]


def test_chunk_size_with_flat_raster_and_bad_ingest_chunks(
        files: dict[str, Path], rgb: np.ndarray, tmp_path: Path) -> None:
    arr = io.open_slide(files["png"], chunk_size=301, cache_dir=tmp_path)
    assert arr.attrs["tile_size"] == (304, 304) and arr.data.chunks[0][0] == 304
    np.testing.assert_array_equal(arr.values, rgb)
    ds = io.open_pair(files["zlib_tif"], files["png"], cache_dir=tmp_path)
    assert ds.he.data.chunks == ds.ihc.data.chunks and ds.attrs["chunk_size"] == (2048, 2048)
    with pytest.raises(InvalidInputError, match="chunk_size='big'"):
        io.open_slide(files["png"], chunk_size="big", cache_dir=tmp_path)  # type: ignore[arg-type]
    for bad in (0, 8, 302, 2.0):
        with pytest.raises(InvalidInputError, match="multiple of 16"):
            io.ingest(files["png"], tmp_path / "bad.ome.zarr", chunk_size=bad)  # type: ignore
    out = io.ingest(files["png"], tmp_path / "odd.ome.zarr", chunk_size=336)  # 21 x 16
    np.testing.assert_array_equal(io.open_slide(out).values, rgb)


def test_ingested_reads_interleave_planar_chunks_exactly(files: dict[str, Path], rgb: np.ndarray,
                                                       tmp_path: Path) -> None:
    """An ingested (planar c, y, x) slide reads as contiguous (y, x, 3) blocks, through dask
    and through its region reader, with the chunk-cached region reads of preprocessing and
    registration (each zarr chunk read once) equal to plain reads, at the edges too."""
    from daskpath.stages.preprocess import _zarr_level, read_region

    out = io.ingest(files["png"], tmp_path / "p.ome.zarr", chunk_size=256)
    slide = io.open_slide(out, chunk_size=384)
    blk = slide.data.blocks[1, 0].compute()
    assert blk.flags.c_contiguous and blk.shape[-1] == 3
    np.testing.assert_array_equal(slide.values, rgb)
    src = io.region_source(slide)
    assert type(src).__name__ == "ZarrLevelReader" and _zarr_level(src) is not None
    h, w = rgb.shape[:2]
    cache: dict[int, np.ndarray] = {}
    rng = np.random.default_rng(0)
    regions = [(0, h, 0, w), (h - 7, h, w - 300, w), (5, 6, 0, 1)] + [
        tuple(int(v) for v in (*sorted(rng.integers(0, h, 2)), *sorted(rng.integers(0, w, 2))))
        for _ in range(20)]
    for y0, y1, x0, x1 in regions:
        if y0 == y1 or x0 == x1:
            continue
        got = read_region(src, y0, y1, x0, x1, tiles=cache)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, rgb[y0:y1, x0:x1])
        np.testing.assert_array_equal(src[y0:y1, x0:x1], rgb[y0:y1, x0:x1])
    assert cache and all(b.shape[-1] == 3 for b in cache.values())
    assert len(cache) == len({(y // 256, x // 256) for y in range(0, h, 256) for x in range(0, w, 256)})


def test_interleave_equals_numpy() -> None:
    from daskpath.io import _interleave

    rng = np.random.default_rng(1)
    for shape, dtype in [((3, 5, 7), np.uint8), ((1, 4, 4), np.uint8), ((4, 3, 2), np.uint8),
                         ((3, 0, 5), np.uint8), ((3, 4, 5), np.float32), ((5, 2, 2), np.uint8)]:
        a = (rng.random(shape) * 200).astype(dtype)
        got = _interleave(a[:, ::-1] if shape[1] else a)  # a strided view too
        want = np.moveaxis(a[:, ::-1] if shape[1] else a, 0, -1)
        assert got.flags.c_contiguous and got.dtype == dtype
        np.testing.assert_array_equal(got, want)
