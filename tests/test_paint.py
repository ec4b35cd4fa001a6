"""Label painting (daskpath.nuclei._paint_polygons) vs StarDist's own ``polygons_to_label``.

The painter must give bit-identical label images (pixels, ids, overwrite order) to stardist 0.9's
``polygons_to_label`` / ``polygons_to_label_coord``, which rasterise each polygon with
``skimage.draw.polygon``. Random star-convex polygons cover clipping at the image edges,
negative coordinates, vertices on integer and half-integer pixel positions, zero-length rays,
overlaps with tied probabilities and empty inputs; a real block checks ``_segment_block``
against the old ``predict_instances(..., return_labels=True)`` path.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from daskpath import nuclei

geom2d = pytest.importorskip("stardist.geometry.geom2d")
pytest.importorskip("numba")

HAVE_TF = importlib.util.find_spec("tensorflow") is not None


def reference(coord: np.ndarray, prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``polygons_to_label`` from coordinates: its filter and stable sort, then its painter."""
    keep = prob > -np.inf
    coord, prob = coord[keep], prob[keep]
    order = np.argsort(prob, kind="stable")
    return geom2d.polygons_to_label_coord(coord[order], shape=shape, labels=order)


def random_polygons(rng: np.random.Generator, n: int, n_rays: int, shape: tuple[int, int],
                    grid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dist, points, prob)`` of ``n`` star-convex polygons, centres up to 12 px outside."""
    h, w = shape
    points = np.stack([rng.uniform(-12, h + 12, n), rng.uniform(-12, w + 12, n)], axis=1)
    dist = rng.uniform(0, 14, (n, n_rays)).astype(np.float32)
    if grid == "integer":
        points, dist = np.round(points).astype(np.int64), np.round(dist)
    elif grid == "half":
        points, dist = np.round(2 * points) / 2, np.round(2 * dist) / 2
    dist[rng.random((n, n_rays)) < 0.15] = 0  # degenerate rays
    dist[rng.random(n) < 0.05] = 0  # whole polygons collapsed onto their centre
    prob = rng.choice(np.float32([0.5, 0.7, 0.9]), n)  # many ties
    return dist, points, prob


SHAPES = [(1, 1), (7, 31), (40, 40), (64, 23)]


@pytest.mark.parametrize("n_rays", [32, 3, 8, 17, 64])
@pytest.mark.parametrize("grid", ["float", "integer", "half"])
def test_same_as_polygons_to_label(n_rays, grid):
    """Through stardist's own entry point: distances and centres as NMS returns them."""
    rng = np.random.default_rng([n_rays, len(grid)])
    for shape in SHAPES:
        for n in (0, 1, 2, 5, 30):
            dist, points, prob = random_polygons(rng, n, n_rays, shape, grid)
            want = geom2d.polygons_to_label(dist, points, shape=shape, prob=prob)
            coord = geom2d.dist_to_coord(dist, points)
            got = nuclei._paint_polygons(coord, prob, shape)
            assert got.dtype == np.int32 and got.shape == shape
            np.testing.assert_array_equal(got, want, err_msg=f"{shape=} {n=}")


@pytest.mark.parametrize("step", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vertices_on_the_pixel_grid(step, dtype):
    """Vertices exactly on (fractions of) pixel positions: skimage's vertex and edge rules."""
    rng = np.random.default_rng(int(4 * step))
    for shape in SHAPES:
        for _ in range(20):
            dist, points, prob = random_polygons(rng, 12, int(rng.choice([4, 6, 32])), shape,
                                                 "float")
            coord = (np.round(geom2d.dist_to_coord(dist, points) / step) * step).astype(dtype)
            np.testing.assert_array_equal(nuclei._paint_polygons(coord, prob, shape),
                                          reference(coord, prob, shape))


@pytest.mark.parametrize(
    "rows, cols",
    [
        ([2, 2, 6, 6], [2, 6, 6, 2]),  # square on pixel centres: boundary rows and columns
        ([0, 0, 4], [0, 4, 0]),  # triangle from the origin, hypotenuse through pixel centres
        ([3, 3 + 1e-13, 3], [1, 5, 9]),  # sliver along row 3
        ([0, 3 - 1e-13, 0], [4, 5, 6]),  # tip within eps of pixel (3, 5): painted
        ([0, 3 - 2e-12, 0], [4, 5, 6]),  # ... just beyond eps: not painted
        ([1e-13, 5, 5], [3, 0, 6]),  # vertex within eps of row 0
        ([-3.5, -3.5, 2.5, 2.5], [-3.5, 2.5, 2.5, -3.5]),  # negative half-integer corners
        ([-0.7, -0.7, -0.2], [1, 4, 2]),  # negative rows only: truncation, nothing painted
        ([4, 4, 4, 4], [4, 4, 4, 4]),  # a point on a pixel
        ([-1e14, -1e14, 1e14, 1e14], [-1e14, 1e14, 1e14, -1e14]),  # covers the image
        ([1e14, 1e14, 2e14], [1e14, 2e14, 1e14]),  # far outside
        ([2, 9, 9, 2, 5.5], [2, 2, 9, 9, 5.5]),  # not star-shaped from its mean: a notch
    ],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # float32 rounds the 1e-13s away
def test_hand_made_cases(rows, cols, dtype):
    coord = np.array([[rows, cols]], dtype)
    for shape in [(10, 10), (4, 7), (1, 12)]:
        prob = np.float32([0.5])
        np.testing.assert_array_equal(nuclei._paint_polygons(coord, prob, shape),
                                      reference(coord, prob, shape), err_msg=f"{shape=}")


def test_edges_through_pixel_centres():
    """Edges through a pixel centre, with vertices a rounded fraction away (1/3, 0.1, ...): the
    crossing test's sign at that pixel comes down to rounding, so skimage's float64 arithmetic
    must be reproduced, not just the crossing column."""
    rng = np.random.default_rng(11)
    fractions = np.array([0.1, 0.3, 1 / 3, 0.7, 2 / 3, 0.9, 1.1, 1 / 7, 2.2, 3.3])
    for k in range(3000):
        centre = rng.integers(2, 18, 2).astype(np.float64)
        u = np.round(rng.normal(size=2) * 7 / 2) / 7
        a, b = rng.choice(fractions, 2)
        tip = rng.uniform(0, 20, 2)
        coord = np.stack([centre + a * u, centre - b * u, tip], axis=1)[None]
        if k % 2:
            coord = coord.astype(np.float32)
        prob = np.float32([1])
        np.testing.assert_array_equal(nuclei._paint_polygons(coord, prob, (20, 20)),
                                      reference(coord, prob, (20, 20)), err_msg=f"{coord}")


def test_eps_vertex_rule_is_exercised():
    """A pixel only skimage's vertex tolerance paints: below a triangle's tip at (3 - 1e-13, 5),
    outside the triangle, and not painted once the tip is 2e-12 away."""
    tips = [3 - 1e-13, 3 - 2e-12]
    coord = [np.array([[[0, tip, 0], [4, 5, 6]]]) for tip in tips]
    got = [nuclei._paint_polygons(c, np.float32([1]), (10, 10)) for c in coord]
    want = [reference(c, np.float32([1]), (10, 10)) for c in coord]
    assert want[0][3, 5] == got[0][3, 5] == 1 and want[1][3, 5] == got[1][3, 5] == 0


def test_overwrite_order_and_ids():
    """Highest probability painted last; ids are positions in the input plus one; NaN and -inf
    probabilities drop out and renumber the rest, as in ``polygons_to_label``."""
    square = np.array([[2, 2, 8, 8], [2, 8, 8, 2]], np.float32)
    coord = np.stack([square, square + 1, square - 1, square + 2])
    for prob in (np.float32([0.9, 0.5, 0.7, 0.5]), np.float32([0.5, 0.5, 0.5, 0.5]),
                 np.float32([0.8, np.nan, 0.7, -np.inf])):
        got = nuclei._paint_polygons(coord, prob, (12, 12))
        np.testing.assert_array_equal(got, reference(coord, prob, (12, 12)))
    got = nuclei._paint_polygons(coord, np.float32([0.9, 0.5, 0.7, 0.5]), (12, 12))
    assert got[5, 5] == 1 and got[9, 9] == 4


def test_empty_inputs():
    for shape in [(5, 6), (0, 4)]:
        got = nuclei._paint_polygons(np.zeros((0, 2, 32), np.float32), np.zeros(0, np.float32),
                                     shape)
        assert got.dtype == np.int32 and got.shape == shape and not got.any()
    with pytest.raises(ValueError):  # no vertices: skimage's min() of an empty array
        geom2d.polygons_to_label_coord(np.zeros((1, 2, 0)), (5, 5))
    with pytest.raises(ValueError):
        nuclei._paint_polygons(np.zeros((1, 2, 0)), np.float32([1]), (5, 5))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30, -1e30, 9.3e18, -9.3e18, 1e-200])
def test_extreme_coordinates_as_skimage(bad):
    """Beyond the scanline painter's proven range skimage is erratic (nothing painted for a NaN
    or +inf maximum, an OverflowError for a minimum beyond 2**63): StarDist's painter runs."""
    for k in range(2):
        coord = np.array([[[1.0, 2.5, 6.0, 5.0], [1.0, 7.0, 4.0, 0.5]]])
        coord[0, k, 2] = bad
        prob = np.float32([1])
        try:
            want = reference(coord, prob, (9, 9))
        except OverflowError:
            with pytest.raises(OverflowError):
                nuclei._paint_polygons(coord, prob, (9, 9))
        else:
            np.testing.assert_array_equal(nuclei._paint_polygons(coord, prob, (9, 9)), want)


def test_fallback_without_numba(monkeypatch):
    """Without numba the painter is StarDist's own (same result, slower)."""
    rng = np.random.default_rng(3)
    dist, points, prob = random_polygons(rng, 40, 32, (50, 60), "half")
    coord = geom2d.dist_to_coord(dist, points)
    fast = nuclei._paint_polygons(coord, prob, (50, 60))
    monkeypatch.setattr(nuclei, "_paint_kernel", lambda: None)
    np.testing.assert_array_equal(nuclei._paint_polygons(coord, prob, (50, 60)), fast)
    np.testing.assert_array_equal(fast, reference(coord, prob, (50, 60)))


def test_import_daskpath_does_not_import_numba():
    code = "import sys, daskpath, daskpath.nuclei; sys.exit('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# a real block through _segment_block
# ---------------------------------------------------------------------------------------------
@pytest.mark.nuclei
@pytest.mark.skipif(not HAVE_TF, reason="stardist/tensorflow not installed (extra 'nuclei')")
def test_segment_block_same_as_stardist_labels(monkeypatch):
    """``_segment_block`` (labels and table) equals the old path, where ``predict_instances``
    painted the labels (``return_labels=True``); the whole block's labels are bit-identical."""
    import pandas as pd

    from daskpath.stain import hematoxylin_dab
    from daskpath.synthetic import render_region

    rgb, _ = render_region(1500, 1700, 400, 352, size=(4096, 4096), seed=5, stain="ihc")
    h, dab = hematoxylin_dab(rgb)
    img = h + dab
    ref = nuclei.resolve_model("phantom")
    kw = {"ref": ref, "origin": (1500, 1700), "core": (1580, 1820, 1780, 1972),
          "shape": (4096, 4096), "norm": nuclei.slide_percentiles(img, ref.percentiles),
          "prob_thresh": None, "nms_thresh": None}
    new_lab, new_tab = nuclei._segment_block(img, dab, **kw)

    model = nuclei.load_stardist(ref)
    predict = model.predict_instances
    seen = {}

    def old_predict(*args, **kwargs):  # the old call: stardist paints the labels
        kwargs["return_labels"] = True
        seen["labels"], det = predict(*args, **kwargs)
        seen["ours"] = nuclei._paint_polygons(det["coord"], det["prob"], seen["labels"].shape)
        seen["n"] = len(det["prob"])
        return seen["labels"], det

    monkeypatch.setattr(model, "predict_instances", old_predict)
    monkeypatch.setattr(nuclei, "_paint_polygons", lambda *a: seen["labels"])
    old_lab, old_tab = nuclei._segment_block(img, dab, **kw)

    assert seen["n"] >= 50 and len(old_tab) >= 20
    np.testing.assert_array_equal(seen["ours"], seen["labels"])
    assert new_lab.dtype == old_lab.dtype == np.int32
    np.testing.assert_array_equal(new_lab, old_lab)
    pd.testing.assert_frame_equal(new_tab.drop(columns="polygon"), old_tab.drop(columns="polygon"))
    for a, b in zip(new_tab["polygon"], old_tab["polygon"]):
        np.testing.assert_array_equal(a, b)
