"""The preprocess stage's graph (each chunk decoded once, halo strips passed between chunk tasks,
tiles decoded straight from the TIFF, strip-wise kernels) gives the tile table it gave before
(issue 12), and its pieces equal the plain ways they replace."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest

from daskpath.config import load_config
from daskpath.io import open_slide, read_manifest, region_source
from daskpath.pipeline import plan_preprocess, run
from daskpath.stages.preprocess import combine_sums, preprocess_chunk, read_region
from daskpath.synthetic import make_cohort

DATA = Path(__file__).parent / "data"
DENSE = {"pen": 2.0, "fold": 2.0, "bubble": 2.0, "blur": 2.0, "dust": 0.5}
SETTINGS = {"default": [], "fair": ["qc.enabled=false", "registration.enabled=false"]}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The pair the expected tables were computed on (before the change): 2048 x 3072,
    realistic, artefacts on every tile row, 512-px TIFF tiles."""
    out = tmp_path_factory.mktemp("preprocess_equal")
    return make_cohort(out, pairs=1, size=(2048, 3072), seed=7, realism="realistic",
                       realism_params=DENSE)


def _cfg(cohort, out, *extra):
    return load_config(None, [f"slides={cohort}", f"output_dir={out}", "stages=[preprocess]",
                              "tiles.size=512", "chunk_size=1024", *extra])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_tile_table_equals_the_stored_one(cohort, dask_client, tmp_path, name):
    """Same tile table as the code before issue 12 computed (stored), within float rounding."""
    res = run(_cfg(cohort, tmp_path / "out", *SETTINGS[name]), client=dask_client)
    assert res.ok
    got = res.tiles.reset_index(drop=True)
    want = pd.read_csv(DATA / f"preprocess_expected_{name}.csv", keep_default_na=False,
                       na_values=[""])
    want["artefact"] = want["artefact"].fillna("")  # '' (no artefact) is not missing
    assert list(got.columns) == list(want.columns)
    for col in want.columns:
        if want[col].dtype.kind == "f" or got[col].dtype.kind == "f":
            np.testing.assert_allclose(got[col].to_numpy(np.float64),
                                       want[col].to_numpy(np.float64), atol=1e-9, rtol=0,
                                       equal_nan=True, err_msg=col)
        else:
            assert (got[col].astype(str).to_numpy() == want[col].astype(str).to_numpy()).all(), col


@pytest.mark.parametrize("qc", [False, True])
def test_strip_graph_equals_reading_each_halo(cohort, tmp_path, qc):
    """The stage's chunk tasks (halo from the neighbours' strips) give the per-tile sums of
    :func:`preprocess_chunk` reading every chunk with its own halo, bit for bit."""
    cfg = _cfg(cohort, tmp_path, f"qc.enabled={str(qc).lower()}", "layers.downsample=0")
    row = next(read_manifest(cohort).itertuples())
    plan = plan_preprocess(row.slide, row.he, row.ihc, cfg, output_dir=tmp_path)
    assert plan.n_chunks == 6
    got = combine_sums(list(dask.compute(*[t for _, t in plan.tasks], scheduler="sync")),
                       4, 6, 3)
    he, ihc = region_source(open_slide(row.he)), region_source(open_slide(row.ihc))
    kw = {"shape": plan.shape, "tile": 512, "tissue_threshold": cfg.tissue.threshold,
          "tissue_sigma": cfg.tissue.sigma, "ssim_sigma": cfg.ssim.sigma,
          "ssim_dtype": cfg.ssim.dtype, "layers": None, "factor": 0, "step": 1, "qc": qc}
    want = combine_sums([preprocess_chunk(loc=loc, he_src=he, ihc_src=ihc, **kw)
                         for loc, _ in plan.tasks], 4, 6, 3)
    assert got.shape == want.shape == (4, 6, 7 if qc else 3)
    np.testing.assert_array_equal(got, want)


def test_read_region_equals_the_reader(cohort):
    """Tiles decoded straight from the TIFF are the reader's pixels, on any region."""
    row = next(read_manifest(cohort).itertuples())
    src = region_source(open_slide(row.ihc))
    rng = np.random.default_rng(0)
    boxes = [(0, 2048, 0, 3072), (0, 1, 0, 1), (511, 513, 1023, 1537), (2000, 2048, 3000, 3072)]
    for _ in range(6):
        y0, x0 = int(rng.integers(0, 2000)), int(rng.integers(0, 3000))
        boxes.append((y0, int(rng.integers(y0 + 1, 2049)), x0, int(rng.integers(x0 + 1, 3073))))
    for y0, y1, x0, x1 in boxes:
        got = read_region(src, y0, y1, x0, x1)
        assert got.flags.c_contiguous and got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.asarray(src[slice(y0, y1), slice(x0, x1)]))


def test_registration_block_cache_reads_like_the_reader(cohort):
    """Registration's per-task cache of decoded tiles returns the reader's pixels."""
    from daskpath.registration import _BlockCache

    row = next(read_manifest(cohort).itertuples())
    src = region_source(open_slide(row.he))
    cache = _BlockCache(src)
    for y0, y1, x0, x1 in [(0, 700, 0, 700), (300, 1100, 500, 1600), (1500, 2048, 2900, 3072)]:
        np.testing.assert_array_equal(cache[slice(y0, y1), slice(x0, x1)],
                                      np.asarray(src[slice(y0, y1), slice(x0, x1)]))
