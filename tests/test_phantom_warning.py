"""No silent phantom models on real slides: phantoms are tagged in their files; a shipped
phantom-trained model on a slide without the tag is called out in the log, slides.csv, run.json
and report.html, with the config line to use instead."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from daskpath.config import load_config
from daskpath.io import PHANTOM_TOKEN, slide_info
from daskpath.pipeline import run
from daskpath.runner import PHANTOM_NOTE, phantom_models
from daskpath.stages import get_stage, stage_names
from daskpath.synthetic import make_pair


@pytest.mark.parametrize("layout", ["tiled", "png", "stripped", "zarr"])
def test_phantoms_are_tagged_in_every_layout(tmp_path, layout):
    p = make_pair(tmp_path, size=(1024, 1024), seed=1, layout=layout)
    assert slide_info(p.he)["phantom"] and slide_info(p.ihc)["phantom"]
    if layout == "png":  # an ingest carries the tag over
        from daskpath.io import ingest

        assert slide_info(ingest(p.he, tmp_path / "he.ome.zarr"))["phantom"]


def test_untagged_files_are_real(tmp_path):
    rgb = np.full((256, 256, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", rgb, tile=(128, 128), photometric="rgb",
                     description="scanned by someone")
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert not slide_info(tmp_path / "a.tif")["phantom"]
    assert not slide_info(tmp_path / "a.png")["phantom"]
    assert PHANTOM_TOKEN == "daskpath-phantom"


def test_shipped_models_are_recognised(tmp_path):
    stages = [get_stage(n) for n in stage_names()]
    found = phantom_models(stages, load_config(None, []))
    assert found == {"nuclei.model": "stardist_phantom", "translate.model": "translator_phantom",
                     "baselines.rf_model": "rf_phantom",
                     "baselines.classifier_model": "classifier_phantom"}
    # the same weights copied into a folder of the user's: the user's model, no warning
    mine = tmp_path / "my_stardist"
    shutil.copytree(Path(__file__).parent.parent / "daskpath" / "models" / "stardist_phantom", mine)
    cfg = load_config(None, [f"nuclei.model={mine}", "stages=[preprocess,nuclei]"])
    assert phantom_models([get_stage("nuclei")], cfg) == {}


def _untagged_copy(src: Path, dst: Path) -> None:
    """The phantom's pixels re-saved as a plain tiled TIFF: what a real slide looks like to us."""
    tifffile.imwrite(dst, tifffile.imread(src, level=0), tile=(256, 256), photometric="rgb",
                     compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")


def test_run_on_a_real_slide_with_phantom_models_says_so(synth_cohort, dask_client, tmp_path, caplog):
    man = pd.read_csv(synth_cohort)
    base = synth_cohort.parent
    real_he, real_ihc = tmp_path / "real_HE.tif", tmp_path / "real_IHC.tif"
    _untagged_copy(base / man.he[0], real_he)
    _untagged_copy(base / man.ihc[0], real_ihc)
    rows = pd.DataFrame({"slide": ["phantom", "real"],
                         "he": [str(base / man.he[0]), str(real_he)],
                         "ihc": [str(base / man.ihc[0]), str(real_ihc)]})
    rows.to_csv(tmp_path / "m.csv", index=False)
    cfg = load_config(None, [f"slides={tmp_path / 'm.csv'}", f"output_dir={tmp_path / 'out'}",
                             "stages=[preprocess,nuclei]"])
    with caplog.at_level(logging.WARNING, logger="daskpath"):
        res = run(cfg, client=dask_client)
    assert res.ok
    warns = [r.getMessage() for r in caplog.records if "trained on phantoms" in r.getMessage()]
    assert len(warns) == 1
    assert "(real)" in warns[0] and "nuclei.model: stardist_phantom" in warns[0]
    assert "nuclei.model: 2D_versatile_he" in warns[0]
    slides = pd.read_csv(tmp_path / "out" / "slides.csv").set_index("slide")
    assert str(slides.loc["real", "note"]).startswith(PHANTOM_NOTE)
    assert PHANTOM_NOTE not in str(slides.loc["phantom", "note"])
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["warnings"] == [warns[0].removeprefix("WARNING: ")]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "trained on phantoms only" in html and "2D_versatile_he" in html


def test_phantom_cohort_with_phantom_models_is_quiet(synth_cohort):
    from daskpath.io import read_manifest
    from daskpath.runner import phantom_model_warning

    cfg = load_config(None, [f"slides={synth_cohort}"])
    stages = [get_stage(n) for n in stage_names()]
    assert phantom_model_warning(stages, cfg, read_manifest(synth_cohort)) == (None, [])
