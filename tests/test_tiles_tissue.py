"""Tissue mask and tile reductions: chunked equals whole-array references."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from daskpath.errors import InvalidInputError
from daskpath.tiles import tile_grid, tile_means, tile_sums
from daskpath.tissue import max_od, tissue_block, tissue_mask, tissue_radius


def _slide(shape=(600, 760), seed=0):
    """White glass with pale-pink stroma, a dark blob, a lumen, dust specks and pale blue IHC-like tissue."""
    rng = np.random.default_rng(seed)
    img = np.full(shape + (3,), 246, np.uint8)
    img[50:350, 60:400] = (232, 196, 218)  # pale eosin stroma
    img[120:160, 100:140] = (90, 60, 140)  # nuclei cluster
    img[200:260, 250:330] = (247, 247, 247)  # lumen (background inside tissue)
    img[380:560, 450:740] = (212, 214, 226)  # IHC light counterstain
    specks = rng.integers(0, shape[0] * shape[1], 40)
    img.reshape(-1, 3)[specks] = (60, 60, 60)  # isolated dust on the glass
    noise = rng.integers(-4, 5, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("chunks", [(600, 760), (97, 131), (64, 256), (17, 600)])
def test_tissue_chunked_equals_whole(chunks):
    img = _slide()
    ref = tissue_block(img)
    out = tissue_mask(da.from_array(img, chunks=chunks + (3,)))
    assert out.dtype == bool
    np.testing.assert_array_equal(out.compute(), ref)


def test_tissue_separates_background_from_pale_tissue():
    img = _slide()
    m = tissue_block(img)
    assert m[60:340, 70:390][:100, :].mean() > 0.99  # pale pink stroma is tissue
    assert m[390:550, 460:730].mean() > 0.99  # pale IHC counterstain is tissue
    assert m[215:245, 265:315].mean() < 0.01  # the lumen is background
    assert m[:40, :].mean() < 0.001 and m[-30:, :400].mean() < 0.001  # glass, with dust specks
    assert m[572:, :].mean() < 0.01  # the mask may bleed a few px past the tissue edge


def test_tissue_radius_and_bad_input():
    assert tissue_radius(4.0) == 16
    with pytest.raises(InvalidInputError, match="uint8"):
        tissue_mask(da.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(InvalidInputError, match=r"\(y, x, 3\)"):
        tissue_mask(da.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(InvalidInputError, match="threshold"):
        tissue_mask(da.zeros((10, 10, 3), dtype=np.uint8), threshold=0)


def test_max_od_white_and_black():
    px = np.array([[[255, 255, 255], [0, 0, 0], [255, 128, 255]]], np.uint8)
    od = max_od(px)
    assert od[0, 0] == 0.0
    assert od[0, 1] == pytest.approx(np.log10(256))
    assert od[0, 2] == pytest.approx(-np.log10(129 / 256))


def test_tile_grid_edges():
    g = tile_grid((1000, 1300), 256)
    assert len(g) == 4 * 6
    assert g["height"].tolist()[-1] == 1000 - 768
    assert g["width"].tolist()[-1] == 1300 - 1280
    assert (g["height"] * g["width"]).sum() == 1000 * 1300
    with pytest.raises(ValueError):
        tile_grid((10, 10), 0)


@pytest.mark.parametrize("chunks", [(97, 131), (256, 256), (1000, 1300), (300, 700), (512, 100)])
def test_tile_means_match_numpy(chunks):
    rng = np.random.default_rng(1)
    m = rng.random((1000, 1300))
    b = m > 0.7
    out = tile_means([da.from_array(m, chunks=chunks), da.from_array(b, chunks=chunks)], 256).compute()
    for ty, y in enumerate(range(0, 1000, 256)):
        for tx, x in enumerate(range(0, 1300, 256)):
            assert out[ty, tx, 0] == pytest.approx(m[y : y + 256, x : x + 256].mean(), abs=1e-12)
            assert out[ty, tx, 1] == pytest.approx(b[y : y + 256, x : x + 256].mean(), abs=1e-12)


def test_tile_sums_one_task_output_per_chunk():
    m = da.ones((1024, 1024), chunks=256)
    s = tile_sums([m], 512)
    assert s.shape == (2, 2, 1)
    np.testing.assert_array_equal(s.compute()[..., 0], 512 * 512)
