"""Model stages end to end: nuclei on the real IHC, translation + nuclei on the virtual IHC."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("stardist")
pytest.importorskip("torch")

from daskpath.config import load_config  # noqa: E402
from daskpath.pipeline import run  # noqa: E402


@pytest.fixture(scope="module")
def full_run(synth_cohort, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = load_config(None, [f"slides={synth_cohort}", f"output_dir={out}", "tiles.size=512",
                             "chunk_size=512"])
    return run(cfg, client=dask_client)


def _truth_ratio(folder, slide, tiles):
    truth = pd.read_parquet(folder / f"{slide}_truth.parquet")
    out = []
    for r in tiles.itertuples():
        sel = truth[(truth.y >= r.y0) & (truth.y < r.y0 + r.height) & (truth.x >= r.x0) & (truth.x < r.x0 + r.width)]
        a = sel.area.sum()
        out.append(sel.area[sel.positive].sum() / a if a else np.nan)
    return np.array(out)


def test_tables_have_ratio_columns_and_metrics(full_run):
    res = full_run
    assert res.ok, res.failures
    for col in ("ratio_ihc", "ki67_index_ihc", "ratio_virtual", "ki67_index_virtual",
                "ratio_rf", "ratio_classifier"):
        assert col in res.tiles.columns and col in res.slides.columns
    kept = res.tiles[res.tiles.keep]
    assert len(kept) >= 2
    assert kept["ratio_ihc"].between(0, 1).all()
    assert res.tiles.loc[~res.tiles.keep, "ratio_ihc"].isna().all()
    metrics = json.loads((res.output_dir / "metrics.json").read_text())
    v = metrics["tiles"]["virtual"]
    assert v["n"] == kept["ratio_virtual"].notna().sum()
    assert {"acc@0.05", "acc@0.1", "acc@0.2", "mse", "mae", "class_accuracy", "balanced_accuracy"} <= set(v)
    assert np.array(v["confusion"]["rows_truth_cols_pred"]).sum() == v["n"]
    # the H&E-only baselines are scored like the virtual IHC, on the same kept tiles
    for name in ("rf", "classifier"):
        b = metrics["tiles"][name]
        assert b["n"] == kept[f"ratio_{name}"].notna().sum() >= 2
        assert kept[f"ratio_{name}"].between(0, 1).all()
        assert res.tiles.loc[~res.tiles.keep, f"ratio_{name}"].isna().all()
    # the shipped random forest tracks the truth on these phantoms (see tests/test_baselines.py)
    assert metrics["tiles"]["rf"]["mae"] < 0.05
    assert set(kept["class_classifier"]) <= {0, 1, 2}
    sim = metrics["image_similarity_virtual_vs_real"]
    assert sim["n"] == len(kept) and 0.2 < sim["ssim_mean"] <= 1 and 10 < sim["psnr_mean_db"] < 60
    assert kept["ssim_virtual"].notna().all() and res.tiles.loc[~res.tiles.keep, "ssim_virtual"].isna().all()
    slide = res.slides.slide[0]
    nuc = pd.read_parquet(res.output_dir / "nuclei" / f"{slide}.parquet")
    assert {"y", "x", "area", "dab_od", "positive", "source"} <= set(nuc.columns)
    assert not nuc.duplicated(["y", "x"]).any()
    from daskpath import ome

    labels = ome.read_image(res.output_dir / "layers" / f"{slide}.ihc-labels.zarr")
    ids = np.unique(labels[labels > 0])
    assert set(nuc["id"]) <= set(ids.tolist())  # globally unique ids shared by table and labels
    assert len(ids) == pytest.approx(len(nuc), rel=0.02)
    # the virtual IHC is computed only near kept tiles: 512-px chunks = tiles here, and the
    # nuclei halo (80 px) reaches into the 8 neighbours of a kept tile; white elsewhere
    from scipy.ndimage import binary_dilation

    for s_ in res.slides.slide:
        v = ome.open_level(res.output_dir / "layers" / f"{s_}.virtual.zarr", 0)  # (3, y, x)
        t = res.tiles[res.tiles.slide == s_]
        grid = np.zeros((4, 4), bool)
        grid[t.y0 // 512, t.x0 // 512] = t.keep
        near = binary_dilation(grid, np.ones((3, 3), bool))
        assert v.nchunks == 16 and v.nchunks_initialized == near.sum()
        if not near.all():
            i, j = np.argwhere(~near)[0]
            assert (v[:, i * 512:(i + 1) * 512, j * 512:(j + 1) * 512] == 255).all()
    gj = json.loads((res.output_dir / "nuclei" / f"{slide}.geojson").read_text())
    assert len(gj["features"]) == len(nuc)
    used = json.loads((res.output_dir / "nuclei" / f"{slide}.json").read_text())
    assert used["method"] == "nucleus" and used["dab_threshold"] == 0.15
    assert "stain_matrix" in used and used["nuclei"] == len(nuc)


def test_report_shows_predictors_and_ratio_maps(full_run):
    html = (full_run.output_dir / "report.html").read_text()
    assert "Predictors vs the ground truth" in html
    assert "alt='virtual'" in html  # scatter + confusion figure of the virtual-IHC predictor
    for slide in full_run.slides.slide:
        assert f"alt='{slide} ratios'" in html
    assert html.count("data:image/png;base64,") >= 1 + 2 * len(full_run.slides)


def test_ground_truth_ratio_matches_phantom_truth(full_run, synth_cohort):
    """ratio_ihc measured by StarDist + DAB on the real IHC vs the phantom's known truth."""
    tiles = full_run.tiles
    errs = []
    for slide, g in tiles[tiles.keep].groupby("slide"):
        truth = _truth_ratio(synth_cohort.parent, slide, g)
        errs.append(np.abs(g["ratio_ihc"].to_numpy() - truth))
    err = np.concatenate(errs)
    assert np.nanmean(err) <= 0.03, f"MAE {np.nanmean(err):.3f}"


def test_rerun_skips_finished_stages(full_run, synth_cohort, dask_client):
    work = full_run.output_dir / ".daskpath" / "work"
    parts = sorted(work.glob("*/*/part.parquet"))
    assert len(parts) == 2 * 4  # two slides x four stages
    before = {p: p.stat().st_mtime_ns for p in parts}
    cfg = load_config(None, [f"slides={synth_cohort}", f"output_dir={full_run.output_dir}", "tiles.size=512",
                             "chunk_size=512"])
    res = run(cfg, client=dask_client)
    assert res.ok
    assert all(res.recomputed(s) == [] for s in res.slides.slide)
    assert {p: p.stat().st_mtime_ns for p in parts} == before
    pd.testing.assert_frame_equal(res.tiles, full_run.tiles)


def test_rerun_with_more_kept_tiles_measures_them(full_run, synth_cohort, dask_client, tmp_path):
    """Nuclei are segmented only where tiles are kept; a rerun that keeps more tiles (looser
    thresholds) measures the stage again instead of reusing the narrower result."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run.output_dir, out, symlinks=True)
    before = full_run.tiles
    cfg = load_config(None, [f"slides={synth_cohort}", f"output_dir={out}", "tiles.size=512", "chunk_size=512",
                             "tiles.min_tissue=0.05", "ssim.threshold=0", "stages=[preprocess,nuclei]"])
    res = run(cfg, client=dask_client)
    assert res.ok, res.failures
    # thresholds are applied at assembly: preprocessing is reused, the kept set changed
    assert all(res.recomputed(s) == ["nuclei"] for s in res.slides.slide)
    # the dropped stages (translate, baselines) leave nothing that claims to be current
    assert "ratio_virtual" not in res.tiles.columns and "ratio_rf" not in res.tiles.columns
    assert not list(out.glob("layers/*.virtual*")) and not list(out.glob("nuclei/*.virtual.*"))
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["stages"] == ["preprocess", "nuclei"]
    assert not any("virtual" in f for f in run_json["outputs"])
    newly = res.tiles.keep & ~before.keep
    assert newly.sum() >= 2
    assert res.tiles.loc[newly, "ratio_ihc"].notna().sum() >= 1
    # tiles kept both times: the same nuclei, the same ratios
    both = res.tiles.keep & before.keep
    np.testing.assert_allclose(res.tiles.loc[both, "ratio_ihc"], before.loc[both, "ratio_ihc"])
