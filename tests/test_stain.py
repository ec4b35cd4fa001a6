"""Colour deconvolution (daskpath.stain): HED round trip, dask equivalence, Macenko."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from skimage.color import rgb2hed

from daskpath import stain
from daskpath.errors import InvalidInputError


@pytest.fixture(scope="module")
def hed_image():
    """An RGB image built by Beer-Lambert from known H, E, DAB concentrations."""
    rng = np.random.default_rng(3)
    conc = np.zeros((97, 131, 3))
    conc[..., 0] = rng.uniform(0, 0.8, conc.shape[:2])
    conc[..., 2] = rng.uniform(0, 0.8, conc.shape[:2]) * (rng.random(conc.shape[:2]) < 0.5)
    return conc, stain.reconstruct_rgb(conc)


def test_matches_skimage_rgb2hed_times_6(hed_image):
    _, rgb = hed_image
    ours = stain.deconvolve(rgb)
    ref = np.maximum(rgb2hed(rgb), 0) * 6.0
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_hed_round_trip(hed_image):
    conc, rgb = hed_image
    back = stain.deconvolve(rgb)
    # uint8 quantisation: 1/255 of intensity is at most ~0.02 OD at these densities
    assert np.abs(back[..., 0] - conc[..., 0]).max() < 0.03
    assert np.abs(back[..., 2] - conc[..., 2]).max() < 0.03
    # clipping the (tiny, negative) eosin residual at 0 moves some pixels by one grey level
    diff = np.abs(stain.reconstruct_rgb(back).astype(int) - rgb.astype(int))
    assert diff.max() <= 1


@pytest.mark.parametrize("chunks", [(17, 23, 3), (64, 64, 1), (97, 131, 3)])
def test_dask_equals_numpy(hed_image, chunks):
    _, rgb = hed_image
    h, dab = stain.hematoxylin_dab(rgb)
    hd, dd = stain.hematoxylin_dab(da.from_array(rgb, chunks=chunks))
    assert hd.dtype == np.float32 and dd.dtype == np.float32
    np.testing.assert_array_equal(hd.compute(), h)
    np.testing.assert_array_equal(dd.compute(), dab)
    full = stain.deconvolve_dask(da.from_array(rgb, chunks=chunks)).compute()
    np.testing.assert_array_equal(full, stain.deconvolve(rgb))


def test_uint8_and_float_input_agree(hed_image):
    _, rgb = hed_image
    a = stain.optical_density(rgb)
    b = stain.optical_density(rgb.astype(np.float64) / 255.0)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_custom_two_vector_matrix_completed():
    sm = stain.as_stain_matrix([[0.65, 0.70, 0.29], [0.27, 0.57, 0.78]])
    assert sm.names == ("hematoxylin", "dab", "residual")
    r = sm.rgb_from_stain
    assert abs(r[2] @ r[0]) < 1e-9 and abs(r[2] @ r[1]) < 1e-9
    rgb = np.full((4, 4, 3), 128, np.uint8)
    h, dab = stain.hematoxylin_dab(rgb, sm)
    assert h.shape == (4, 4) and dab.dtype == np.float32


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 3)), np.ones((4, 3)), np.ones((3, 2)), [[1, 0, 0], [2, 0, 0]]]
)
def test_bad_stain_matrix(bad):
    with pytest.raises(InvalidInputError):
        stain.as_stain_matrix(bad)


def _angle(a, b):
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return np.degrees(np.arccos(np.clip(a @ b, -1, 1)))


def test_macenko_recovers_vectors():
    rng = np.random.default_rng(0)
    true = np.array([[0.55, 0.75, 0.37], [0.20, 0.62, 0.76]])  # H and DAB off the HED defaults
    true /= np.linalg.norm(true, axis=1, keepdims=True)
    n = 40_000
    c = np.zeros((n, 2))
    kind = rng.random(n)
    c[kind < 0.45, 0] = rng.gamma(3, 0.2, (kind < 0.45).sum())  # pure H pixels
    c[kind > 0.55, 1] = rng.gamma(3, 0.2, (kind > 0.55).sum())  # pure DAB pixels
    mix = (kind >= 0.45) & (kind <= 0.55)
    c[mix] = rng.gamma(3, 0.15, (mix.sum(), 2))
    rgb = np.clip(255 * 10 ** -(c @ true), 0, 255).astype(np.uint8)
    bg = np.full((5000, 3), 245, np.uint8)  # background must be ignored
    sm = stain.estimate_stain_vectors_macenko(np.concatenate([rgb, bg]))
    assert sm.source == "macenko" and sm.names[:2] == ("hematoxylin", "dab")
    assert _angle(sm.rgb_from_stain[0], true[0]) < 3.0
    assert _angle(sm.rgb_from_stain[1], true[1]) < 3.0
    d = sm.to_dict()
    assert d["info"]["n_pixels"] > 10_000 and len(d["rgb_from_stain"]) == 3


def test_macenko_needs_tissue():
    with pytest.raises(InvalidInputError, match="tissue pixels"):
        stain.estimate_stain_vectors_macenko(np.full((100, 100, 3), 250, np.uint8))


def test_sample_pixels_dask_bounded():
    rgb = da.random.randint(0, 255, (512, 512, 3), chunks=(128, 128, 3)).astype(np.uint8)
    s = stain.sample_pixels(rgb, max_pixels=5000, seed=1)
    assert s.shape == (5000, 3) and s.dtype == np.uint8
    np.testing.assert_array_equal(s, stain.sample_pixels(rgb, max_pixels=5000, seed=1))
