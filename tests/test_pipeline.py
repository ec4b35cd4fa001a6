"""The preprocessing pipeline end to end, on phantom slides and a process cluster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from daskpath.config import load_config
from daskpath.pipeline import TILE_COLUMNS, run
from daskpath.tissue import tissue_block


def _cfg(manifest, out, *extra):
    return load_config(None, [f"slides={manifest}", f"output_dir={out}", "stages=[preprocess]", *extra])


@pytest.fixture(scope="module")
def first_run(synth_cohort, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    res = run(_cfg(synth_cohort, out), client=dask_client)
    return res


def test_tables_written_and_consistent(first_run):
    res = first_run
    assert res.ok
    tiles = pd.read_parquet(res.output_dir / "tiles.parquet")
    slides = pd.read_csv(res.output_dir / "slides.csv")
    assert list(tiles.columns) == TILE_COLUMNS
    assert len(tiles) == 2 * 4  # two 2048^2 slides, 1024-px tiles
    assert sorted(slides["slide"]) == sorted(tiles["slide"].unique())
    assert tiles["tissue_fraction"].between(0, 1).all()
    assert tiles["ssim"].between(-1, 1).all()
    for s, g in tiles.groupby("slide"):
        row = slides.set_index("slide").loc[s]
        assert row["tiles_total"] == len(g)
        assert row["tiles_kept"] == int(g["keep"].sum())
    assert (res.output_dir / "layers").is_dir()
    assert not (res.output_dir / "failures.csv").exists()


def test_values_equal_whole_image_reference(first_run, synth_cohort):
    """Per-tile tissue fraction and SSIM equal a NumPy/skimage computation on the whole image."""
    tiles = pd.read_parquet(first_run.output_dir / "tiles.parquet")
    man = pd.read_csv(synth_cohort)
    slide, he, ihc = man.iloc[0]
    he = tifffile.imread(synth_cohort.parent / he, level=0)
    ihc = tifffile.imread(synth_cohort.parent / ihc, level=0)
    _, s_map = structural_similarity(
        rgb2gray(he), rgb2gray(ihc), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, full=True,
    )
    t_he, t_ihc = tissue_block(he), tissue_block(ihc)
    g = tiles[tiles["slide"] == slide]
    assert g["registered"].any()
    h, w = ihc.shape[:2]
    for r in g.itertuples():
        sl = (slice(r.y0, r.y0 + r.height), slice(r.x0, r.x0 + r.width))
        assert r.ssim_rigid == pytest.approx(s_map[sl].mean(), abs=1e-5)
        ssim = r.ssim_rigid
        if r.registered:  # the whole-image SSIM map against the IHC moved by the rounded shift
            sy, sx = round(r.dy), round(r.dx)
            ys = np.clip(np.arange(h) + sy, 0, h - 1)
            xs = np.clip(np.arange(w) + sx, 0, w - 1)
            _, moved = structural_similarity(
                rgb2gray(he), rgb2gray(ihc[ys][:, xs]), gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=1.0, full=True)
            ssim = moved[sl].mean()
            assert ssim > r.ssim_rigid
        assert r.ssim == pytest.approx(ssim, abs=1e-5)
        assert r.tissue_fraction_he == pytest.approx(t_he[sl].mean(), abs=1e-9)
        assert r.tissue_fraction_ihc == pytest.approx(t_ihc[sl].mean(), abs=1e-9)
        assert r.keep == (min(t_he[sl].mean(), t_ihc[sl].mean()) >= 0.5 and ssim >= 0.4)


def test_results_do_not_depend_on_chunk_size(first_run, synth_cohort, dask_client, tmp_path):
    ref = pd.read_parquet(first_run.output_dir / "tiles.parquet")
    for chunk in (512, 1536):
        res = run(_cfg(synth_cohort, tmp_path / str(chunk), f"chunk_size={chunk}"), client=dask_client)
        got = res.tiles
        pd.testing.assert_frame_equal(
            got.reset_index(drop=True), ref.reset_index(drop=True), check_exact=False, atol=1e-6
        )


def test_resume_skips_finished_slides(synth_cohort, dask_client, tmp_path):
    cfg = _cfg(synth_cohort, tmp_path)
    first = run(cfg, client=dask_client)
    parts = sorted((tmp_path / ".daskpath" / "work").glob("*/preprocess-*/part.parquet"))
    assert len(parts) == 2
    assert all(first.recomputed(s) == ["preprocess"] for s in first.slides.slide)
    mtimes = [p.stat().st_mtime_ns for p in parts]
    res = run(cfg, client=dask_client)
    assert [p.stat().st_mtime_ns for p in parts] == mtimes  # nothing recomputed
    assert all(res.recomputed(s) == [] for s in res.slides.slide)
    assert res.chunks_computed == 0
    assert len(res.tiles) == 8
    pd.testing.assert_frame_equal(res.tiles, first.tiles)


def test_bad_slide_does_not_sink_the_cohort(synth_cohort, dask_client, tmp_path):
    man = pd.read_csv(synth_cohort)
    folder = synth_cohort.parent
    rows = [
        {"slide": man.slide[0], "he": str(folder / man.he[0]), "ihc": str(folder / man.ihc[0])},
        {"slide": "missing", "he": str(folder / "nope_HE.tif"), "ihc": str(folder / man.ihc[1])},
    ]
    # a mismatched pair: a smaller IHC
    small = tmp_path / "small_IHC.tif"
    img = tifffile.imread(folder / man.ihc[1], level=0)[:1000, :1500]
    tifffile.imwrite(small, img, tile=(256, 256), photometric="rgb")
    rows.append({"slide": "mismatch", "he": str(folder / man.he[1]), "ihc": str(small)})
    m = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(m, index=False)
    res = run(_cfg(m, tmp_path / "out"), client=dask_client)
    assert not res.ok
    fails = pd.read_csv(tmp_path / "out" / "failures.csv").set_index("slide")
    assert set(fails.index) == {"missing", "mismatch"}
    assert "nope_HE.tif" in fails.loc["missing", "error"]
    assert "size" in fails.loc["mismatch", "error"].lower()
    assert set(res.tiles["slide"]) == {man.slide[0]}
    assert len(pd.read_csv(tmp_path / "out" / "slides.csv")) == 1


def test_all_white_slide_is_reported_not_an_error(dask_client, tmp_path):
    white = np.full((1024, 1536, 3), 247, np.uint8)
    for name in ("w_HE.tif", "w_IHC.tif"):
        tifffile.imwrite(tmp_path / name, white, tile=(256, 256), photometric="rgb")
    m = tmp_path / "manifest.csv"
    m.write_text("slide,he,ihc\nwhite,w_HE.tif,w_IHC.tif\n")
    res = run(_cfg(m, tmp_path / "out"), client=dask_client)
    assert res.ok
    row = res.slides.iloc[0]
    assert row["tiles_kept"] == 0 and row["tiles_tissue"] == 0
    assert "no tissue" in row["note"]
    assert (res.tiles["tissue_fraction"] == 0).all()


@pytest.mark.parametrize("stain", ["HE", "IHC"])
def test_tissue_mask_matches_phantom_truth(synth_cohort, stain):
    """White-background cleaning vs the phantom's true tissue outline (pale IHC counterstain included)."""
    import json

    import zarr

    folder = synth_cohort.parent
    slide = pd.read_csv(synth_cohort).slide[0]
    truth = zarr.open_group(str(folder / f"{slide}_truth.zarr"), mode="r")["tissue"][:]
    meta = json.loads((folder / f"{slide}_truth.json").read_text())
    if stain == "HE":  # truth is in IHC coordinates; ihc = he + offset
        dy, dx = meta["offset"]
        truth = np.roll(truth, (-dy, -dx), axis=(0, 1))
    img = tifffile.imread(folder / f"{slide}_{stain}.tif", level=0)
    m = tissue_block(img)
    iou = (m & truth).sum() / (m | truth).sum()
    assert iou >= 0.95, f"{stain} tissue IoU {iou:.3f}"


def test_interrupted_run_resumes_only_missing_chunks(synth_cohort, first_run, dask_client, tmp_path):
    """Chunks recorded by an interrupted run are not recomputed; results equal a clean run."""
    import dask

    from daskpath.pipeline import plan_preprocess

    cfg = _cfg(synth_cohort, tmp_path, "chunk_size=512")
    man = pd.read_csv(synth_cohort)
    plan = plan_preprocess(man.slide[0], synth_cohort.parent / man.he[0], synth_cohort.parent / man.ihc[0], cfg, output_dir=tmp_path)
    assert plan.n_chunks == 16 and plan.n_done == 0
    # the "interrupted" run: 6 chunks finished before the client died
    dask.compute(*[t for _, t in plan.tasks[:6]], scheduler="threads")
    assert len(list(plan.work_dir.glob("chunks/*.npz"))) == 6
    res = run(cfg, client=dask_client)
    assert res.ok
    # 16 chunks per slide + one registration task per slide (its 4 tissue tiles)
    assert res.chunks_total == 34
    assert res.chunks_computed == 34 - 6
    pd.testing.assert_frame_equal(res.tiles, first_run.tiles, check_exact=False, atol=1e-6)
    assert not any(plan.work_dir.glob("chunks/*"))  # records are dropped once published
    # layers of the resumed slide are complete (no NaN holes from the first, partial run)
    from daskpath import ome

    layers = ome.read_image(tmp_path / "layers" / f"{man.slide[0]}.zarr", channel_last=False)
    assert not np.isnan(layers).any()  # tissue_he, tissue_ihc, ssim
