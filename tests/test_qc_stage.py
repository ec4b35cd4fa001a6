"""Artefact QC in the preprocess stage: per-tile fractions equal the whole-image kernel, the
keep rule drops flagged tiles, and the thresholds apply at assembly (no recompute)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskpath
from daskpath.config import load_config
from daskpath.io import open_pair, read_manifest
from daskpath.pipeline import run
from daskpath.qc import ARTEFACT_KINDS, artefact_block, artefact_fractions
from daskpath.synthetic import make_cohort

#: every artefact kind several times per 1024^2 px, so a 2048^2 pair surely has each
DENSE = {"pen": 2.0, "fold": 2.0, "bubble": 2.0, "blur": 2.0, "dust": 0.5}


@pytest.fixture(scope="module")
def artefact_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("qc_cohort")
    return make_cohort(out, pairs=1, size=(2048, 2048), seed=31, realism="realistic",
                       realism_params=DENSE)


def test_tile_fractions_equal_the_whole_image_kernel(artefact_cohort):
    row = next(read_manifest(artefact_cohort).itertuples())
    ds = open_pair(row.he, row.ihc, chunk_size=768)  # chunks not aligned with the 512-px tiles
    t = daskpath.tile_table(ds, size=512)
    he, ihc = np.asarray(ds.he), np.asarray(ds.ihc)
    want = artefact_fractions(artefact_block(he) | artefact_block(ihc), 512)
    for kind in ARTEFACT_KINDS:
        np.testing.assert_allclose(t[f"qc_{kind}"].to_numpy(), want[kind].ravel(), atol=1e-9)
    flagged = np.zeros(len(t), bool)
    for kind in ARTEFACT_KINDS:
        hit = want[kind].ravel() > 0.02
        flagged |= hit
        assert all((kind in a.split(",")) == h for a, h in zip(t["artefact"], hit))
    assert flagged.sum() >= 3  # the dense phantom has artefacts on several tiles
    assert not (t["keep"] & flagged).any()
    # without exclusion the same tiles are kept when tissue and SSIM allow
    cfg = load_config(None, ["qc.exclude=false"])
    t2 = daskpath.tile_table(ds, size=512, config=cfg)
    assert (t2["keep"] == ((t2["tissue_fraction"] >= 0.5) & (t2["ssim"] >= 0.4))).all()
    assert t2["keep"].sum() > t["keep"].sum()


def test_thresholds_apply_without_recompute(artefact_cohort, dask_client, tmp_path):
    def cfg(*extra):
        return load_config(None, [f"slides={artefact_cohort}", f"output_dir={tmp_path / 'out'}",
                                  "stages=[preprocess]", "tiles.size=512", *extra])

    first = run(cfg(), client=dask_client)
    assert first.ok
    tiles = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    assert (tiles["artefact"] != "").sum() >= 3
    slides = pd.read_csv(tmp_path / "out" / "slides.csv")
    tissue = tiles[tiles["tissue_fraction"] >= 0.5]
    assert slides["tiles_artefact"].iloc[0] == int((tissue["artefact"] != "").sum())
    # a looser threshold: fewer artefact tiles, more kept, preprocess reused
    second = run(cfg("qc.max_fraction=0.2"), client=dask_client)
    assert second.ok and second.recomputed(second.slides["slide"].iloc[0]) == []
    t2 = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    assert (t2["artefact"] != "").sum() < (tiles["artefact"] != "").sum()
    assert t2["keep"].sum() > tiles["keep"].sum()
    for c in ("qc_pen", "qc_fold", "qc_bubble", "qc_blur"):
        assert np.array_equal(t2[c].to_numpy(), tiles[c].to_numpy())
    # QC off: NaN fractions, no artefact labels, preprocess recomputed
    third = run(cfg("qc.enabled=false"), client=dask_client)
    t3 = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    assert third.recomputed(third.slides["slide"].iloc[0]) == ["preprocess"]
    assert t3["qc_fold"].isna().all() and (t3["artefact"] == "").all()
