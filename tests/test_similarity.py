"""SSIM: the chunked map equals skimage's whole-image map."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from daskpath.similarity import ssim_map, ssim_radius


def _pair(shape=(403, 517), seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    # correlated second image: blurred/shifted copy plus noise, so SSIM spans a real range
    other = np.roll(base, (2, -3), axis=(0, 1)).astype(np.int16)
    other = np.clip(other * 0.8 + rng.normal(0, 25, other.shape) + 20, 0, 255).astype(np.uint8)
    return base, other


def _reference(a, b, sigma=1.5):
    _, s = structural_similarity(
        rgb2gray(a),
        rgb2gray(b),
        gaussian_weights=True,
        sigma=sigma,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    return s


def test_radius_matches_skimage():
    assert ssim_radius(1.5) == 5
    assert ssim_radius(1.0) == 4


@pytest.mark.parametrize("chunks", [(403, 517), (64, 64), (97, 131), (200, 517), (13, 250)])
def test_float64_chunked_equals_whole_image_bitwise(chunks):
    a, b = _pair()
    ref = _reference(a, b)
    out = ssim_map(
        da.from_array(a, chunks=chunks + (3,)),
        da.from_array(b, chunks=chunks + (3,)),
        dtype="float64",
    ).compute()
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("chunks", [(64, 64), (97, 131)])
def test_float32_within_1e4(chunks):
    a, b = _pair(seed=3)
    ref = _reference(a, b)
    out = ssim_map(da.from_array(a, chunks=chunks + (3,)), da.from_array(b, chunks=chunks + (3,)))
    assert out.dtype == np.float32
    assert out.chunks == da.from_array(a, chunks=chunks + (3,)).chunks[:2]
    err = np.abs(out.compute().astype(np.float64) - ref).max()
    assert err < 1e-4
    # the data really spans a range of similarities
    assert ref.min() < 0.2 < 0.6 < ref.max()


def test_identical_images_give_one():
    a, _ = _pair((128, 160))
    out = ssim_map(da.from_array(a, chunks=(50, 50, 3)), da.from_array(a, chunks=(50, 50, 3)))
    np.testing.assert_allclose(out.compute(), 1.0, atol=1e-5)


def test_other_sigma_still_matches():
    a, b = _pair((150, 170), seed=5)
    ref = _reference(a, b, sigma=2.5)
    out = ssim_map(
        da.from_array(a, chunks=(41, 57, 3)),
        da.from_array(b, chunks=(41, 57, 3)),
        sigma=2.5,
        dtype="float64",
    ).compute()
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((10, 10, 3), (10, 11, 3)), ((10, 10), (10, 10))],
)
def test_bad_shapes(a_shape, b_shape):
    a = da.zeros(a_shape, dtype=np.uint8)
    b = da.zeros(b_shape, dtype=np.uint8)
    with pytest.raises(ValueError):
        ssim_map(a, b)


def test_float32_within_1e4_on_phantom_tissue_and_glass():
    """Near-white glass is where float32 variance cancellation bites: still within 1e-4."""
    from daskpath.synthetic import render_region

    he, _ = render_region(0, 0, 768, 768, size=(4096, 4096), seed=0, stain="he")
    ihc, _ = render_region(0, 0, 768, 768, size=(4096, 4096), seed=0, stain="ihc")
    ref = _reference(he, ihc)
    out = ssim_map(da.from_array(he, chunks=(300, 300, 3)), da.from_array(ihc, chunks=(300, 300, 3)))
    assert np.abs(out.compute().astype(np.float64) - ref).max() < 1e-4
