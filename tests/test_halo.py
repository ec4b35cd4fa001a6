"""Halo and chunk alignment (daskpath._halo): chunked results equal whole-array references."""

from __future__ import annotations

import math
import random

import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from daskpath._halo import (
    align_chunks,
    ceil_to,
    gaussian_radius,
    halo_depth,
    overlap_2d,
    read_with_halo,
)
from daskpath.errors import DaskpathError, InvalidInputError


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((61, 83))


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# align_chunks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("chunks", "size", "multiple", "min_size", "expected"),
    [
        # already aligned: kept, a thin last chunk merged (dask overlap's and rf's old rule)
        ((100, 100, 100, 5), None, 1, 16, (100, 100, 105)),
        ((64, 64, 64, 64, 64, 64, 19), 403, 1, 5, (64, 64, 64, 64, 64, 64, 19)),
        ((29,) * 10 + (13,), None, 1, 24, (29,) * 9 + (42,)),  # rf: odd chunks, depth 24
        ((300, 300, 29), None, 1, 24, (300, 300, 29)),
        ((8, 16, 8), None, 4, 8, (8, 16, 8)),  # aligned but uneven: borders kept
        # interior chunk thinner than the halo: regridded to the median
        ((50, 3, 50), None, 1, 5, (50, 53)),
        ((18,) * 55 + (6,), None, 1, 64, (64,) * 14 + (100,)),  # rf's old rule: one 996-px chunk
        # nuclei: stride 16, depth 64
        ((64, 32, 64, 10), 170, 16, 64, (64, 106)),
        ((100, 100, 100), 300, 16, 64, (96, 96, 108)),
        ((1000, 1000, 500), 2500, 16, 128, (992, 992, 516)),  # median 62.5 strides rounds half to even
        # translate: stride 4, depth 64
        ((100, 92), None, 4, 64, (100, 92)),
        ((130, 126), None, 4, 64, (128, 128)),  # was (132, 124): any multiple of 4 gives the same pixels
        ((68, 68, 56), None, 4, 64, (68, 124)),
        ((32, 32), None, 4, 64, (64,)),
        ((97, 97, 97, 97, 15), None, 4, 0, (96, 96, 96, 96, 19)),
        # single chunks stay whatever their size
        ((3,), None, 4, 5, (3,)),
        ((10, 10), None, 1, 64, (20,)),
        ((0,), None, 4, 5, (0,)),
        # a nominal chunk size and the axis length
        (1030, 2500, 16, 64, (1024, 1024, 452)),
        (256, 1000, 1, 0, (256, 256, 256, 232)),
        (256, 1030, 1, 16, (256, 256, 256, 262)),
    ],
)
def test_align_chunks_table(chunks, size, multiple, min_size, expected):
    got = align_chunks(chunks, size, multiple=multiple, min_size=min_size)
    assert got == expected
    assert sum(got) == (size if size is not None else sum(chunks))


def _nuclei_aligned_chunks(chunks, size, m, depth):
    """daskpath.nuclei._aligned_chunks as it was before the halo module (the rule to keep)."""
    chunks = tuple(int(c) for c in chunks)
    if any(c % m for c in chunks[:-1]) or any(c < depth for c in chunks[:-1]):
        target = max(m, int(math.ceil(depth / m) * m), int(round(np.median(chunks) / m)) * m)
        n, r = divmod(size, target)
        chunks = (target,) * n + ((r,) if r else ())
    if len(chunks) > 1 and chunks[-1] < depth:
        chunks = chunks[:-2] + (chunks[-2] + chunks[-1],)
    return chunks


def test_align_chunks_reproduces_nuclei_rule_and_invariants():
    rng = random.Random(0)
    for _ in range(3000):
        m = rng.choice([1, 2, 4, 8, 16])
        depth = rng.choice([0, 1, 5, 16, 24, 64, 88])
        if rng.random() < 0.5:
            c, size = rng.randint(1, 300), rng.randint(1, 2000)
            chunks = (c,) * (size // c) + ((size % c,) if size % c else ())
        else:
            chunks = tuple(rng.randint(1, 300) for _ in range(rng.randint(1, 8)))
            size = sum(chunks)
        got = align_chunks(chunks, size, multiple=m, min_size=depth)
        assert got == _nuclei_aligned_chunks(chunks, size, m, depth), (chunks, m, depth)
        assert sum(got) == size
        assert all(c % m == 0 and c >= depth for c in got[:-1])
        assert len(got) == 1 or got[-1] >= depth
        assert align_chunks(got, multiple=m, min_size=depth) == got  # idempotent


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (((10, 10),), {"multiple": 0}, "multiple must be >= 1"),
        (((10, 10),), {"min_size": -1}, "min_size must be >= 0"),
        (((),), {}, "empty"),
        (((10, -1),), {}, "chunk size must be >= 0"),
        (((10, 10), 25), {}, "sum to 20, not to size=25"),
        ((64,), {}, "give the axis length"),
        ((0, 100), {}, "chunk size must be >= 1"),
        (((10.5, 10),), {}, "must be an integer"),
        (((10, 10),), {"multiple": True}, "must be an integer"),
        (("abc",), {}, "must be an integer"),
    ],
)
def test_align_chunks_bad_arguments(args, kwargs, match):
    with pytest.raises(InvalidInputError, match=match) as e:
        align_chunks(*args, **kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, DaskpathError)


# --------------------------------------------------------------------------------------------
# depth helpers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sigma", "truncate", "radius"),
                         [(1.5, 3.5, 5), (1.0, 3.5, 4), (4.0, 4.0, 16), (5.6, 4.0, 22), (0.7, 4.0, 3),
                          (0.0, 4.0, 0), (2.5, 3.5, 9)])
def test_gaussian_radius_is_scipys_support(sigma, truncate, radius):
    assert gaussian_radius(sigma, truncate) == radius
    if sigma:
        impulse = np.zeros(101)
        impulse[50] = 1.0
        support = np.flatnonzero(ndi.gaussian_filter1d(impulse, sigma, truncate=truncate))
        assert (support.min(), support.max()) == (50 - radius, 50 + radius)


@pytest.mark.parametrize(("sigma", "truncate"), [(-1.0, 4.0), (float("nan"), 4.0), (1.0, 0.0), (1.0, -2.0)])
def test_gaussian_radius_bad_arguments(sigma, truncate):
    with pytest.raises(ValueError, match="gaussian"):
        gaussian_radius(sigma, truncate)


@pytest.mark.parametrize(
    ("args", "kwargs", "depth"),
    [((), {}, 0), ((5,), {}, 5), ((), {"receptive_field": 175, "multiple": 4}, 88),
     ((), {"receptive_field": 128}, 64), ((96,), {"max_object": 40, "multiple": 16}, 144),
     ((5,), {"receptive_field": 10, "max_object": 3}, 13), ((64,), {"multiple": 4}, 64)],
)
def test_halo_depth(args, kwargs, depth):
    assert halo_depth(*args, **kwargs) == depth


def test_ceil_to_and_bad_depth_arguments():
    assert [ceil_to(v, 4) for v in (0, 1, 4, 5)] == [0, 4, 4, 8]
    with pytest.raises(InvalidInputError, match="radius"):
        halo_depth(-1)
    with pytest.raises(InvalidInputError, match="multiple"):
        halo_depth(4, multiple=0)


# --------------------------------------------------------------------------------------------
# read_with_halo
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 3, 8, 100])
@pytest.mark.parametrize(
    "loc",
    [(0, 20, 0, 25), (0, 20, 60, 83), (40, 61, 0, 25), (40, 61, 60, 83),  # corners
     (0, 20, 30, 50), (40, 61, 30, 50), (20, 40, 0, 25), (20, 40, 60, 83),  # edges
     (20, 40, 30, 50), (0, 61, 0, 83), (30, 31, 41, 42)],  # inside, whole, one pixel
)
def test_read_with_halo_matches_numpy_slicing(rgb, loc, depth):
    y0, y1, x0, x1 = loc
    block, core = read_with_halo(rgb, loc, rgb.shape[:2], depth)
    ya, xa = max(0, y0 - depth), max(0, x0 - depth)
    np.testing.assert_array_equal(block, rgb[ya:y1 + depth, xa:x1 + depth])
    np.testing.assert_array_equal(block[core], rgb[y0:y1, x0:x1])
    # a filter on the halo'd block, core kept, equals the filter on the whole slide
    gray = rgb[..., 1].astype(np.float64)
    blk, core = read_with_halo(gray, loc, gray.shape, depth)
    ref = ndi.gaussian_filter(gray, 2.0, mode="reflect")[y0:y1, x0:x1]
    got = ndi.gaussian_filter(blk, 2.0, mode="reflect")[core]
    if depth >= gaussian_radius(2.0):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    ("loc", "shape", "depth", "match"),
    [((0, 10, 0, 10), (5, 20), 2, "not inside the slide"),
     ((5, 2, 0, 10), (20, 20), 2, "not inside the slide"),
     ((-1, 2, 0, 10), (20, 20), 2, "non-negative integers"),
     ((0, 2, 0), (20, 20), 2, "must be \\(y0, y1, x0, x1\\)"),
     ((0, 2, 0, 10), (20, 20), -1, "depth must be >= 0")],
)
def test_read_with_halo_bad_arguments(rgb, loc, shape, depth, match):
    with pytest.raises(InvalidInputError, match=match):
        read_with_halo(rgb, loc, shape, depth)


# --------------------------------------------------------------------------------------------
# overlap_2d
# --------------------------------------------------------------------------------------------
SIGMA = 2.0
R = gaussian_radius(SIGMA)  # 8


def _gauss(x, mode="reflect"):
    return ndi.gaussian_filter(x, SIGMA, mode=mode)


def _gauss_yx(x, mode="nearest"):
    return ndi.gaussian_filter(x.astype(np.float64), SIGMA, mode=mode, axes=(0, 1))


CHUNKINGS = [(61, 83), (10, 17), (9, 83), (20, 7), (13, 13), ((5, 30, 26), (40, 3, 40)),
             ((2, 59), (80, 3))]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("mode", ["reflect", "nearest", "mirror", "constant"])
def test_overlap_2d_gaussian_equals_whole_array(image, chunks, mode):
    x = da.from_array(image, chunks=chunks)
    out = overlap_2d(_gauss, x, depth=R, dtype=np.float64, mode=mode)
    assert out.dtype == np.float64 and out.shape == image.shape
    for c, ax in zip(out.chunks, (0, 1)):
        assert all(s >= R for s in c[:-1]) and (len(c) == 1 or c[-1] >= R)
    np.testing.assert_array_equal(out.compute(scheduler="sync"), _gauss(image, mode))


def test_overlap_2d_keeps_chunks_that_fit(image):
    x = da.from_array(image, chunks=(13, 30))
    out = overlap_2d(_gauss, x, depth=R, dtype=np.float64)
    assert out.chunks == x.chunks
    assert len(out.dask.layers) == 3  # input, halo exchange, one task per chunk (no trim layer)


def test_overlap_2d_depth_short_of_the_radius_differs(image):
    x = da.from_array(image, chunks=(20, 30))
    out = overlap_2d(_gauss, x, depth=R - 1, dtype=np.float64).compute(scheduler="sync")
    assert not np.array_equal(out, _gauss(image))


@pytest.mark.parametrize("chunks", [(10, 17), ((5, 30, 26), (40, 3, 40))])
def test_overlap_2d_rgb_channels_kept_and_dropped(rgb, chunks):
    x = da.from_array(rgb, chunks=chunks + (1,))  # channel axis is rechunked to one chunk
    kept = overlap_2d(_gauss_yx, x, depth=R, dtype=np.float64)
    assert kept.shape == rgb.shape and kept.chunks[2] == (3,)
    np.testing.assert_array_equal(kept.compute(scheduler="sync"), _gauss_yx(rgb))

    def gray(block):
        return _gauss(block.astype(np.float64).mean(axis=-1))

    dropped = overlap_2d(gray, x, depth=R, dtype=np.float64, drop_axis=2)
    assert dropped.shape == rgb.shape[:2]
    np.testing.assert_array_equal(dropped.compute(scheduler="sync"), gray(rgb))


def test_overlap_2d_new_channels_and_mixed_inputs(image, rgb):
    def stack(a):
        return np.stack([_gauss(a), a], axis=-1)

    x = da.from_array(image, chunks=(13, 29))
    out = overlap_2d(stack, x, depth=R, dtype=np.float64, channels=2)
    assert out.shape == image.shape + (2,)
    np.testing.assert_array_equal(out.compute(scheduler="sync"), stack(image))

    def weighted(rgb_block, w_block):  # 3-D and 2-D blocks together, each with its own axes
        assert rgb_block.ndim == 3 and w_block.ndim == 2
        return _gauss(rgb_block[..., 0] * w_block)

    r = da.from_array(rgb, chunks=(13, 30, 3))
    w = da.from_array(image, chunks=(11, 83))  # takes r's chunks
    got = overlap_2d(weighted, r, w, depth=R, dtype=np.float64, drop_axis=-1)
    assert got.chunks == r.chunks[:2]
    np.testing.assert_array_equal(got.compute(scheduler="sync"), weighted(rgb, image))


@pytest.mark.parametrize("chunks", [(10, 17), ((5, 30, 26), (40, 3, 40))])
def test_overlap_2d_untrimmed_gets_the_core(image, chunks):
    seen = []

    def core_only(block, core):
        seen.append(core)
        return _gauss(block)[core] * 2

    out = overlap_2d(core_only, da.from_array(image, chunks=chunks), depth=R, dtype=np.float64,
                     trim=False)
    np.testing.assert_array_equal(out.compute(scheduler="sync"), _gauss(image) * 2)
    assert len(seen) == out.npartitions


@pytest.mark.parametrize("multiple", [1, 4, 16])
def test_overlap_2d_multiple_aligns_chunk_borders(image, multiple):
    out = overlap_2d(_gauss, da.from_array(image, chunks=(13, 19)), depth=R, dtype=np.float64,
                     multiple=multiple)
    for c in out.chunks:
        assert all(s % multiple == 0 and s >= R for s in c[:-1])
    np.testing.assert_array_equal(out.compute(scheduler="sync"), _gauss(image))


def test_overlap_2d_depth_zero_and_tiny_arrays(image):
    out = overlap_2d(np.negative, da.from_array(image, chunks=(7, 9)), depth=0, dtype=np.float64)
    assert out.chunks == da.from_array(image, chunks=(7, 9)).chunks
    np.testing.assert_array_equal(out.compute(), -image)
    tiny = image[:3, :5]  # smaller than the halo: one chunk, filtered with its own border rule
    got = overlap_2d(_gauss, da.from_array(tiny, chunks=(2, 2)), depth=R, dtype=np.float64)
    np.testing.assert_array_equal(got.compute(), _gauss(tiny))


def test_overlap_2d_name_meta_and_resources(image):
    x = da.from_array(image, chunks=(20, 30))
    a = overlap_2d(_gauss, x, depth=R, dtype=np.float32)
    b = overlap_2d(_gauss, x, depth=R, dtype=np.float32)
    assert a.name == b.name and a.name.startswith("gauss-")  # deterministic
    assert overlap_2d(_gauss, x, depth=R + 1, dtype=np.float32).name != a.name
    assert type(a._meta) is np.ndarray and a._meta.dtype == np.float32 and a._meta.ndim == 2
    named = overlap_2d(_gauss, x, depth=R, dtype=np.float64, name="my-filter-1")
    assert named.name == "my-filter-1"
    gpu = overlap_2d(_gauss, x, depth=R, dtype=np.float64, resources={"GPU": 1})
    annotated = [k for k, layer in gpu.dask.layers.items() if (layer.annotations or {}).get("resources")]
    assert annotated == [gpu.name]  # the compute tasks only, not the halo exchange


def test_overlap_2d_wrong_output_shape_raises(image):
    out = overlap_2d(lambda b: b[1:], da.from_array(image, chunks=(20, 30)), depth=R, dtype=np.float64)
    with pytest.raises(ValueError, match="returned shape"):
        out.compute(scheduler="sync")


def _arr(shape, chunks=5):
    return da.zeros(shape, dtype=np.uint8, chunks=chunks)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((_gauss,), {}, "at least one array"),
        ((_gauss, np.zeros((10, 10))), {}, "not a dask array"),
        ((_gauss, _arr((10,))), {}, "expected \\(y, x\\) or \\(y, x, c\\)"),
        ((_gauss, _arr((4, 4, 3, 2))), {}, "expected \\(y, x\\)"),
        ((_gauss, _arr((10, 10)), _arr((10, 11))), {}, "common size"),
        ((_gauss, _arr((10, 10))), {"depth": -1}, "depth must be >= 0"),
        ((_gauss, _arr((10, 10))), {"depth": 1.5}, "depth must be an integer"),
        ((_gauss, _arr((10, 10))), {"multiple": 0}, "multiple must be >= 1"),
        ((_gauss, _arr((10, 10, 3))), {"drop_axis": 1}, "drop_axis=1"),
        ((_gauss, _arr((10, 10))), {"drop_axis": 2}, "drop_axis=2"),
        ((_gauss, _arr((10, 10, 3))), {"drop_axis": 2, "channels": 2}, "not both"),
        ((_gauss, _arr((10, 10))), {"channels": 0}, "channels must be >= 1"),
        ((_gauss, _arr((10, 10))), {"trim": "yes"}, "trim must be True or False"),
        ((_gauss, _arr((10, 10))), {"trim": False, "core": 1}, "'core'"),
        (("gauss", _arr((10, 10))), {}, "callable"),
    ],
)
def test_overlap_2d_bad_arguments(args, kwargs, match):
    kw = {"depth": 2, "dtype": np.float64} | kwargs
    with pytest.raises(InvalidInputError, match=match) as e:
        overlap_2d(*args, **kw)
    assert isinstance(e.value, ValueError)


# --------------------------------------------------------------------------------------------
# one code path: the public lazy maps are the pipeline's kernel on read_with_halo blocks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [(97, 131), (17, 600)])
def test_tissue_and_ssim_equal_the_per_chunk_kernel(chunks):
    from daskpath.similarity import gray, ssim_block, ssim_map, ssim_radius
    from daskpath.tissue import tissue_block, tissue_mask, tissue_radius

    rng = np.random.default_rng(2)
    he = rng.integers(150, 256, (300, 640, 3), dtype=np.uint8)
    ihc = np.clip(he.astype(int) + rng.integers(-30, 30, he.shape), 0, 255).astype(np.uint8)
    dhe, dihc = da.from_array(he, chunks=chunks + (3,)), da.from_array(ihc, chunks=chunks + (3,))
    with dask.config.set(scheduler="sync"):
        mask = tissue_mask(dhe).compute()
        ssim = ssim_map(dhe, dihc, dtype="float64").compute()
    out = tissue_mask(dhe)
    d = max(tissue_radius(), ssim_radius())
    ys, xs = np.cumsum((0,) + out.chunks[0]), np.cumsum((0,) + out.chunks[1])
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            loc = (int(y0), int(y1), int(x0), int(x1))
            b_he, core = read_with_halo(he, loc, he.shape[:2], d)
            b_ihc, _ = read_with_halo(ihc, loc, he.shape[:2], d)
            np.testing.assert_array_equal(tissue_block(b_he)[core], mask[y0:y1, x0:x1])
            s = ssim_block(gray(b_he, np.float64), gray(b_ihc, np.float64))[core]
            np.testing.assert_array_equal(s, ssim[y0:y1, x0:x1])


def test_overlap_2d_wrong_channel_count_raises(image):
    out = overlap_2d(lambda b: np.stack([b, b, b], -1), da.from_array(image, chunks=(13, 30)), depth=R,
                     dtype=np.float64, channels=2)
    with pytest.raises(ValueError, match=r"returned shape \(\d+, \d+, 3\) .* expected \(\d+, \d+, 2\)"):
        out.compute(scheduler="sync")
