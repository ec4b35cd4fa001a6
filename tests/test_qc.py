"""Artefact QC (daskpath.qc): painted artefacts on phantom tissue, clean tissue, chunk
independence, a small realistic phantom pair against its artefact truth.

Floors are the values measured when the detectors were written (see each test) minus a
margin; the painted artefacts and the phantom's were made by people who knew the detectors,
so these floors guard against regressions, they do not certify real-slide accuracy.
"""

from __future__ import annotations

import cv2
import dask.array as da
import numpy as np
import pytest

from daskpath import qc
from daskpath.errors import InvalidInputError
from daskpath.qc import ARTEFACT_BITS, ARTEFACT_KINDS, artefact_block, artefact_mask, qc_radius
from daskpath.synthetic import render_region

SIZE = (4096, 4096)
WINDOW = (1536, 1536, 1024, 1024)  # y0, x0, h, w: tissue in both sections of seed 3
INKS = {"green": (0.90, 0.25, 0.70), "blue": (0.90, 0.55, 0.10), "black": (0.85, 0.85, 0.80)}


# ------------------------------------------------------------------------------------------
# painting (optical density, Beer-Lambert: what a stain, an ink or a fold does to light)
# ------------------------------------------------------------------------------------------
def _od(rgb):
    return -np.log10((rgb.astype(np.float32) + 1.0) / 256.0)


def _rgb(od):
    return np.clip(256.0 * 10.0 ** (-od) - 1.0, 0, 255).round().astype(np.uint8)


def _canvas_line(shape, pts, thickness):
    """Anti-aliased thick polyline coverage in [0, 1] (drawn at 4x, area-averaged)."""
    f = 4
    big = np.zeros((shape[0] * f, shape[1] * f), np.uint8)
    cv2.polylines(big, [np.round(np.asarray(pts) * f).astype(np.int32)], False, 255,
                  thickness=int(thickness * f), lineType=cv2.LINE_AA)
    return cv2.resize(big, (shape[1], shape[0]), interpolation=cv2.INTER_AREA) / 255.0


def paint(rgb, seed=0):
    """One of each artefact in its own quadrant of a 1024^2 tile; returns (rgb, truth bits).

    pen: a green, a blue and a black stroke (thick anti-aliased polylines, semi-transparent
    ink whose OD adds to the tissue's); bubble: a circle whose interior keeps 40 % of the
    tissue OD with a dark neutral 3 px rim; fold: a band where the tissue OD doubles, shifted
    by (3, 2) px; blur: a disc Gaussian-blurred with sigma 4.
    """
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    assert (h, w) == (1024, 1024)
    od = _od(rgb)
    truth = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    # pen, top-left quadrant: three arcs
    for k, (name, ink) in enumerate(INKS.items()):
        t = np.linspace(0, 1, 40)
        pts = np.stack([60 + 380 * t, 90 + 140 * k + 40 * np.sin(3 * t + k)], 1)  # (x, y)
        cover = _canvas_line((h, w), pts, thickness=10 + 3 * k)
        od += (0.75 + 0.15 * rng.random()) * cover[..., None] * np.asarray(ink, np.float32)
        truth[cover >= 0.5] |= ARTEFACT_BITS["pen"]
    # bubble, top-right quadrant
    cy, cx, r = 250, 770, 130
    d = np.hypot(yy - cy, xx - cx)
    od = np.where((d < r)[..., None], od * 0.4, od)
    rim = np.clip(1.0 - np.abs(d - r - 1.5) / 2.0, 0, 1).astype(np.float32)
    od += rim[..., None] * np.array([0.5, 0.5, 0.47], np.float32)
    truth[d <= r + 3] |= ARTEFACT_BITS["bubble"]
    # fold, bottom-left quadrant: a 40 px band, tissue OD doubled and shifted
    th = np.deg2rad(35)
    u = (yy - 770) * np.cos(th) - (xx - 250) * np.sin(th)
    v = (yy - 770) * np.sin(th) + (xx - 250) * np.cos(th)
    band = (np.abs(u) < 20) & (np.abs(v) < 200)
    shifted = np.roll(od, (3, 2), axis=(0, 1))
    od = np.where(band[..., None], 2.0 * shifted, od)
    truth[band] |= ARTEFACT_BITS["fold"]
    # blur, bottom-right quadrant
    disc = np.hypot(yy - 770, xx - 770) < 150
    blurred = cv2.GaussianBlur(rgb, (0, 0), 4.0)
    out = _rgb(od)
    out[disc] = blurred[disc]
    truth[disc] |= ARTEFACT_BITS["blur"]
    return out, truth


QUADRANT = {"pen": (slice(0, 512), slice(0, 512)), "bubble": (slice(0, 512), slice(512, 1024)),
            "fold": (slice(512, 1024), slice(0, 512)), "blur": (slice(512, 1024), slice(512, 1024))}


@pytest.fixture(scope="module")
def clean():
    """Easy-phantom tissue of both sections, the same window."""
    out = {}
    for stain in ("he", "ihc"):
        rgb, _ = render_region(*WINDOW, size=SIZE, seed=3, stain=stain)
        out[stain] = rgb
    return out


@pytest.fixture(scope="module")
def painted(clean):
    return {stain: paint(rgb, seed=k) for k, (stain, rgb) in enumerate(clean.items())}


def _tissue(rgb):
    """Tissue for scoring only: smoothed max-channel OD above the slide's glass level."""
    from daskpath.similarity import gaussian_blur
    from daskpath.tissue import max_od

    m = gaussian_blur(max_od(rgb), 4.0, 4.0, "nearest")
    return m > np.percentile(m[::7, ::7], 5) + 0.04


def _pr(pred, truth):
    tp = int((pred & truth).sum())
    return tp / max(int(pred.sum()), 1), tp / max(int(truth.sum()), 1)


# ------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------
def test_bits_and_kinds_match_the_phantom_truth():
    assert ARTEFACT_KINDS == ("pen", "bubble", "fold", "blur")
    assert ARTEFACT_BITS == {"fold": 1, "pen": 2, "bubble": 4, "blur": 8}
    synthetic = pytest.importorskip("daskpath.synthetic")
    bits = getattr(synthetic, "ARTEFACT_BITS", None)
    if bits is None:
        pytest.skip("the phantom has no artefact truth yet")
    assert {k: bits[k] for k in ARTEFACT_KINDS} == ARTEFACT_BITS


def test_radius_is_aligned():
    r = qc_radius()
    assert r > 0 and r % 16 == 0


@pytest.mark.parametrize("bad, what", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8), np.uint8), "(y, x, 3)"),
    (np.zeros((8, 8, 4), np.uint8), "(y, x, 3)"),
])
def test_bad_input(bad, what):
    with pytest.raises(InvalidInputError, match=what.replace("(", r"\(").replace(")", r"\)")):
        artefact_block(bad)
    with pytest.raises(ValueError):
        artefact_mask(bad)


def test_artefact_fractions_edge_tiles():
    bits = np.zeros((300, 500), np.uint8)
    bits[:100, :256] = ARTEFACT_BITS["pen"]
    bits[256:, 256:] = ARTEFACT_BITS["fold"] | ARTEFACT_BITS["blur"]
    fr = qc.artefact_fractions(bits, 256)
    assert fr["pen"].shape == (2, 2)
    np.testing.assert_allclose(fr["pen"], [[100 / 256, 0], [0, 0]])
    np.testing.assert_allclose(fr["fold"], [[0, 0], [0, 1.0]])  # edge tile: its own area
    np.testing.assert_allclose(fr["blur"], fr["fold"])
    assert not fr["bubble"].any()
    with pytest.raises(InvalidInputError):
        qc.artefact_fractions(bits[..., None], 256)


def test_tiny_and_empty_blocks():
    assert artefact_block(np.zeros((0, 5, 3), np.uint8)).shape == (0, 5)
    for shape in [(1, 1), (3, 7), (9, 2)]:
        out = artefact_block(np.full(shape + (3,), 240, np.uint8))
        assert out.shape == shape and out.dtype == np.uint8 and not out.any()


# ------------------------------------------------------------------------------------------
# clean tissue: no flags
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stain", ["he", "ihc"])
def test_clean_phantom_tissue_is_not_flagged(clean, stain):
    bits = artefact_block(clean[stain])
    # measured 2026-11-30: at most 0.4 % of the window per kind (fold on H&E, dense nuclei)
    for kind in ARTEFACT_KINDS:
        frac = float(((bits & ARTEFACT_BITS[kind]) > 0).mean())
        assert frac < 0.01, (kind, frac)
    # no 256-px tile flagged at the default 2 % threshold
    fr = qc.artefact_fractions(bits, 256)
    for kind in ARTEFACT_KINDS:
        assert (fr[kind] <= qc.DEFAULT_TILE_THRESHOLD).all(), (kind, fr[kind].max())


# ------------------------------------------------------------------------------------------
# painted artefacts
# ------------------------------------------------------------------------------------------
# pixel precision / recall measured on the painted tiles, 2026-11-30 (H&E; IHC):
# pen 0.95/0.74; 0.90/0.89 - bubble 0.49/0.09; 0.48/0.37 (a band around the rim, not the
# whole disc) - fold 0.84/0.62; 0.48/0.81 (IHC: the blurred disc is flagged as fold too) -
# blur 1.00/0.72; 1.00/0.73. Floors: measured minus a margin.
_FLOORS = {"pen": (0.85, 0.65), "bubble": (0.4, 0.05), "fold": (0.4, 0.5), "blur": (0.95, 0.6)}


@pytest.mark.parametrize("stain", ["he", "ihc"])
@pytest.mark.parametrize("kind", ARTEFACT_KINDS)
def test_painted_artefact_found(painted, stain, kind):
    rgb, truth = painted[stain]
    bits = artefact_block(rgb)
    p = (bits & ARTEFACT_BITS[kind]) > 0
    t = (truth & ARTEFACT_BITS[kind]) > 0
    prec, rec = _pr(p, t)
    floor_p, floor_r = _FLOORS[kind]
    assert prec >= floor_p and rec >= floor_r, (kind, stain, round(prec, 3), round(rec, 3))
    # tile level: the quadrant holding the artefact is flagged, the others are not
    for name, q in QUADRANT.items():
        frac = float(p[q].mean())
        if name == kind:
            assert frac > qc.DEFAULT_TILE_THRESHOLD, (kind, stain, frac)
        elif (kind, name) == ("fold", "blur"):
            continue  # known confusion: a strongly blurred pale IHC patch reads as a fold
        else:
            assert frac <= qc.DEFAULT_TILE_THRESHOLD, (kind, "in the", name, "quadrant", frac)


def test_dna_stains_are_not_pen(clean):
    """Hematoxylin-blue nuclei and DAB-brown are stain, not ink: darkening them is not pen."""
    for stain, rgb in clean.items():
        darker = _rgb(_od(rgb) * 1.6)  # a heavily stained section
        bits = artefact_block(darker)
        assert ((bits & ARTEFACT_BITS["pen"]) > 0).mean() < 0.002, stain


# ------------------------------------------------------------------------------------------
# chunk independence
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [(397, 411), (512, 1024), (1024, 250), (333, 333)])
def test_chunked_mask_equals_whole_image(painted, chunks):
    rgb = painted["he"][0]
    whole = artefact_block(rgb)
    lazy = artefact_mask(da.from_array(rgb, chunks=chunks + (3,)))
    assert lazy.dtype == np.uint8 and lazy.shape == rgb.shape[:2]
    np.testing.assert_array_equal(lazy.compute(scheduler="synchronous"), whole)


def test_block_with_halo_at_any_origin_equals_whole(painted):
    """What the preprocess task does: read_with_halo(depth=qc_radius()) at any chunk origin,
    artefact_block(block, origin=block start), keep the core."""
    from daskpath._halo import read_with_halo

    rgb = painted["ihc"][0]
    whole = artefact_block(rgb)
    d = qc_radius()
    for loc in [(301, 601, 405, 777), (0, 333, 517, 1024), (640, 1024, 0, 200), (7, 9, 11, 13)]:
        block, core = read_with_halo(rgb, loc, rgb.shape[:2], d)
        origin = (max(0, loc[0] - d), max(0, loc[2] - d))
        np.testing.assert_array_equal(artefact_block(block, origin=origin)[core],
                                      whole[loc[0]:loc[1], loc[2]:loc[3]])


# ------------------------------------------------------------------------------------------
# a realistic phantom pair against its artefact truth
# ------------------------------------------------------------------------------------------
def test_realistic_pair_against_truth(tmp_path):
    synthetic = pytest.importorskip("daskpath.synthetic")
    if not hasattr(synthetic, "ARTEFACT_BITS"):
        pytest.skip("the phantom has no artefact truth yet")
    import tifffile
    import zarr

    try:
        pair = synthetic.make_pair(
            tmp_path, size=(1024, 1024), seed=22, realism="realistic",
            realism_params={"fold": 4, "pen": 4, "bubble": 4, "blur": 4, "dust": 0})
    except TypeError:
        pytest.skip("make_pair has no realism yet")
    g = zarr.open_group(str(pair.truth_labels), mode="r")
    found = {k: [0, 0, 0] for k in ARTEFACT_KINDS}  # tile tp, fp, fn
    pix = {k: [0, 0, 0] for k in ARTEFACT_KINDS}
    for stain, path in (("he", pair.he), ("ihc", pair.ihc)):
        rgb = tifffile.imread(path)
        truth = g[f"artefacts_{stain}"][:]
        bits = artefact_block(rgb)
        tissue = _tissue(rgb)
        truth = np.where(tissue, truth, truth & ~np.uint8(ARTEFACT_BITS["blur"]))  # blur on
        bits = np.where(tissue, bits, bits & ~np.uint8(ARTEFACT_BITS["blur"]))  # glass: unseen
        pf, tf = qc.artefact_fractions(bits, 256), qc.artefact_fractions(truth, 256)
        for k in ARTEFACT_KINDS:
            P, T = pf[k] > qc.DEFAULT_TILE_THRESHOLD, tf[k] > qc.DEFAULT_TILE_THRESHOLD
            found[k] = [a + int(b) for a, b in zip(found[k], ((P & T).sum(), (P & ~T).sum(),
                                                             (~P & T).sum()))]
            p, t = (bits & ARTEFACT_BITS[k]) > 0, (truth & ARTEFACT_BITS[k]) > 0
            pix[k] = [a + int(b) for a, b in zip(pix[k], ((p & t).sum(), (p & ~t).sum(),
                                                         (~p & t).sum()))]
    # measured 2026-11-30 (seed 22, 256-px tiles, both sections, 32 tiles), tile precision /
    # recall: pen 0.95/0.95, bubble 0.73/1.0, fold 1.0/0.65, blur 1.0/0.96
    floors = {"pen": (0.8, 0.8), "bubble": (0.6, 0.85), "fold": (0.8, 0.5), "blur": (0.9, 0.8)}
    for k, (tp, fp, fn) in found.items():
        prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        assert prec >= floors[k][0] and rec >= floors[k][1], (k, found[k], pix[k])
