"""A rerun recomputes exactly the stages a change affects, and its tables equal a clean run's.

One small phantom pair (1024 x 1024, 512-px tiles and chunks), all four stages. Each row changes
one config key (or replaces a file under the same name) in a copy of a finished output folder,
reruns, and checks (a) which stages were recomputed, (b) the published tables equal a clean run
with the new setting in a fresh folder, (c) the one-line change message names the cause.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("stardist")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

from daskpath.config import load_config  # noqa: E402
from daskpath.pipeline import run  # noqa: E402

pytestmark = pytest.mark.slow

ALL = ["preprocess", "nuclei", "translate", "baselines"]
MODEL_STAGES = {"nuclei", "translate", "baselines"}
BASE = ["tiles.size=512", "chunk_size=512", "tiles.min_tissue=0.3"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from daskpath.synthetic import make_cohort

    return make_cohort(tmp_path_factory.mktemp("fp_synth"), pairs=1, size=(1024, 1024), seed=11)


def _cfg(manifest, out, *extra):
    return load_config(None, [f"slides={manifest}", f"output_dir={out}", *BASE, *extra])


@pytest.fixture(scope="module")
def baseline(pair, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp_base")
    res = run(_cfg(pair, out), client=dask_client)
    assert res.ok, res.failures
    assert res.recomputed("synth000") == ALL
    assert res.tiles["keep"].sum() >= 1
    return res


def _copy_model(src_kind: str, dst):
    if src_kind == "nuclei":
        from daskpath.nuclei import SHIPPED_MODELS

        src = SHIPPED_MODELS["phantom"]
    elif src_kind == "translate":
        from daskpath.translate.checkpoints import SHIPPED_MODELS

        src = SHIPPED_MODELS["phantom"]
    else:
        raise ValueError(src_kind)
    shutil.copytree(src, dst)
    return dst


def _tables(out):
    tiles = pd.read_parquet(out / "tiles.parquet")
    slides = pd.read_csv(out / "slides.csv")
    return tiles, slides


# (id, overrides, stages that must be recomputed besides the model stages when the kept set
#  changes, what the message names)
ROWS = [
    ("tiles.size", ["tiles.size=1024"], set(ALL), "tiles.size"),
    ("tiles.min_tissue", ["tiles.min_tissue=0.9"], set(), "tiles.min_tissue"),
    ("tissue.threshold", ["tissue.threshold=0.06"], {"preprocess"}, "tissue.threshold"),
    ("tissue.sigma", ["tissue.sigma=2"], {"preprocess"}, "tissue.sigma"),
    ("ssim.sigma", ["ssim.sigma=2.0"], {"preprocess"}, "ssim.sigma"),
    ("ssim.dtype", ["ssim.dtype=float64"], {"preprocess"}, "ssim.dtype"),
    ("ssim.threshold", ["ssim.threshold=0.0", "tiles.min_tissue=0.01"], set(), "ssim.threshold"),
    ("chunk_size", ["chunk_size=1024"], {"preprocess", "translate"}, "chunk_size"),
    ("layers.downsample", ["layers.downsample=4"], {"preprocess"}, "layers.downsample"),
    ("nuclei.method", ["nuclei.method=two-channel"], {"nuclei", "translate"}, "nuclei.method"),
    ("nuclei.dab_threshold", ["nuclei.dab_threshold=0.25"], {"nuclei", "translate"}, "nuclei.dab_threshold"),
    ("nuclei.stain_matrix", ["nuclei.stain_matrix=macenko"], {"nuclei", "translate"}, "nuclei.stain_matrix"),
    ("translate.norm_stats", ["translate.norm_stats=tile"], {"translate"}, "translate.norm_stats"),
    ("baselines.methods", ["baselines.methods=[rf]"], {"baselines"}, "baselines.methods"),
]


def _expected(row_stages, clean, baseline):
    keep_changed = not np.array_equal(clean.tiles["keep"].to_numpy(), baseline.tiles["keep"].to_numpy()) \
        or len(clean.tiles) != len(baseline.tiles)
    return set(row_stages) | (MODEL_STAGES if keep_changed else set()), keep_changed


def _check_row(pair, baseline, dask_client, tmp_path, extra, row_stages, cause, caplog,
               prepare=None):
    out = tmp_path / "rerun"
    shutil.copytree(baseline.output_dir, out, symlinks=True)
    if prepare is not None:
        prepare(out)
    clean = run(_cfg(pair, tmp_path / "clean", *extra), client=dask_client)
    assert clean.ok, clean.failures
    with caplog.at_level("INFO", logger="daskpath.pipeline"):
        res = run(_cfg(pair, out, *extra), client=dask_client)
    assert res.ok, res.failures
    want, keep_changed = _expected(row_stages, clean, baseline)
    assert set(res.recomputed("synth000")) == want
    # the published tables equal a clean run's with the new setting
    for a, b in zip(_tables(out), _tables(clean.output_dir)):
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9)
    nuc = sorted(p.name for p in (out / "nuclei").glob("*.parquet"))
    assert nuc == sorted(p.name for p in (clean.output_dir / "nuclei").glob("*.parquet"))
    for name in nuc:
        pd.testing.assert_frame_equal(pd.read_parquet(out / "nuclei" / name),
                                      pd.read_parquet(clean.output_dir / "nuclei" / name))
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slide synth000:")][-1]
    if want:
        assert cause in line and "recomputed" in line, line
        assert all(s in line for s in want), line
    else:  # e.g. a threshold change that keeps the same tiles: nothing to recompute
        assert "up to date" in line, line
    return keep_changed


@pytest.mark.parametrize("name,extra,stages,cause", ROWS, ids=[r[0] for r in ROWS])
def test_config_change_recomputes_exactly_affected_stages(name, extra, stages, cause, pair, baseline,
                                                          dask_client, tmp_path, caplog):
    _check_row(pair, baseline, dask_client, tmp_path, extra, stages, cause, caplog)


def test_model_given_by_path_and_replaced_under_the_same_name(pair, baseline, dask_client, tmp_path, caplog):
    """nuclei.model as a folder path: a new key; then a file of that folder replaced: a new model."""
    folder = _copy_model("nuclei", tmp_path / "my_stardist")
    extra = [f"nuclei.model={folder}"]
    _check_row(pair, baseline, dask_client, tmp_path / "a", extra, {"nuclei", "translate"}, "nuclei.model", caplog)
    # replace a model file under the same name (stricter thresholds): only the model identity changes
    th = json.loads((folder / "thresholds.json").read_text())
    th["prob"] = min(0.9, float(th["prob"]) + 0.15)
    (folder / "thresholds.json").write_text(json.dumps(th))
    out = tmp_path / "a" / "rerun"
    clean = run(_cfg(pair, tmp_path / "b" / "clean", *extra), client=dask_client)
    caplog.clear()
    with caplog.at_level("INFO", logger="daskpath.pipeline"):
        res = run(_cfg(pair, out, *extra), client=dask_client)
    assert set(res.recomputed("synth000")) == {"nuclei", "translate"}
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slide synth000:")][-1]
    assert "model nuclei.model" in line, line
    for a, b in zip(_tables(out), _tables(clean.output_dir)):
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9)


def test_translate_model_replaced_under_the_same_name(pair, baseline, dask_client, tmp_path, caplog):
    torch = pytest.importorskip("torch")
    folder = _copy_model("translate", tmp_path / "my_gan")
    extra = [f"translate.model={folder}"]
    _check_row(pair, baseline, dask_client, tmp_path / "a", extra, {"translate"}, "translate.model", caplog)
    spec = json.loads((folder / "daskpath.json").read_text())
    wfile = folder / spec.get("weights", "latest_net_G.pth")
    sd = torch.load(wfile, map_location="cpu", weights_only=True)
    k = next(k for k, v in sd.items() if v.dtype.is_floating_point and v.ndim == 4)
    sd[k] = sd[k] * 0.9
    torch.save(sd, wfile)
    out = tmp_path / "a" / "rerun"
    clean = run(_cfg(pair, tmp_path / "b" / "clean", *extra), client=dask_client)
    res = run(_cfg(pair, out, *extra), client=dask_client)
    assert res.recomputed("synth000") == ["translate"]
    for a, b in zip(_tables(out), _tables(clean.output_dir)):
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9)


def test_slide_replaced_under_the_same_name(pair, baseline, dask_client, tmp_path, caplog):
    """A slide file rewritten in place (same path): every stage of that slide is recomputed."""
    from daskpath.synthetic import make_cohort

    other = make_cohort(tmp_path / "other", pairs=1, size=(1024, 1024), seed=23)
    folder = tmp_path / "slides"
    shutil.copytree(pair.parent, folder)
    man = folder / "manifest.csv"
    base = tmp_path / "base"
    first = run(_cfg(man, base), client=dask_client)
    assert first.ok
    shutil.copy(other.parent / "synth000_IHC.tif", folder / "synth000_IHC.tif")
    clean = run(_cfg(man, tmp_path / "clean"), client=dask_client)
    with caplog.at_level("INFO", logger="daskpath.pipeline"):
        res = run(_cfg(man, base), client=dask_client)
    assert res.recomputed("synth000") == ALL
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slide synth000:")][-1]
    assert "input ihc" in line, line
    for a, b in zip(_tables(base), _tables(clean.output_dir)):
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9)


def test_rerun_unchanged_recomputes_nothing(pair, baseline, dask_client, tmp_path, caplog):
    out = tmp_path / "same"
    shutil.copytree(baseline.output_dir, out, symlinks=True)
    with caplog.at_level("INFO", logger="daskpath.pipeline"):
        res = run(_cfg(pair, out), client=dask_client)
    assert res.recomputed("synth000") == [] and res.chunks_computed == 0
    assert any("up to date" in r.getMessage() for r in caplog.records)
    pd.testing.assert_frame_equal(res.tiles, baseline.tiles)


def test_fewer_stages_leave_nothing_claiming_to_be_current(pair, baseline, dask_client, tmp_path):
    out = tmp_path / "fewer"
    shutil.copytree(baseline.output_dir, out, symlinks=True)
    res = run(_cfg(pair, out, "stages=[preprocess]"), client=dask_client)
    assert res.ok and res.recomputed("synth000") == []
    assert not (out / "metrics.json").exists()
    assert not list((out / "nuclei").glob("*")) if (out / "nuclei").exists() else True
    assert sorted(p.name for p in (out / "layers").iterdir()) == ["synth000.zarr"]
    assert not any(c.startswith(("ratio_", "ki67_")) for c in res.tiles.columns)
    assert not any(c.startswith(("ratio_", "ki67_")) for c in pd.read_csv(out / "slides.csv").columns)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["stages"] == ["preprocess"]
    assert all(not f.startswith("nuclei/") and "labels" not in f for f in run_json["outputs"])
    html = (out / "report.html").read_text()
    assert "Predictors vs the ground truth" not in html
    # and the full set comes back without recomputing what was kept
    again = run(_cfg(pair, out), client=dask_client)
    assert set(again.recomputed("synth000")) == MODEL_STAGES
