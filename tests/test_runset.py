"""A run publishes as one set: killed at any moment, ``output_dir`` shows the previous complete
set or the new one, never a mix. Two runs never share a folder; a foreign folder is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from daskpath.config import load_config
from daskpath.ownership import MARKER, FolderLock, OutputFolderError
from daskpath.pipeline import run
from daskpath.publish import Artefact, RunSet, internal_dir

CRASH_POINTS = ["assembled", "before-links", "before-switch", "after-switch", "mid-tidy",
                "after-commit"]


def _visible(out: Path) -> dict[str, str]:
    """What a user sees: every file under output_dir (links followed, .daskpath skipped) and
    its content hash."""
    seen = {}
    for root, dirs, files in os.walk(out, followlinks=True):
        dirs[:] = [d for d in dirs if d != ".daskpath"]
        for f in files:
            p = Path(root) / f
            rel = str(p.relative_to(out))
            try:
                seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            except FileNotFoundError:
                seen[rel] = "DANGLING"
    return seen


def _consistent(out: Path) -> str:
    """The run id every visible piece names, asserting they all name the same one."""
    run_json = json.loads((out / "run.json").read_text())
    rid = run_json["run_id"]
    assert f"run {rid}" in (out / "report.html").read_text()
    assert f"daskpath run {rid}" in (out / "config.yaml").read_text()
    size = yaml.safe_load((out / "config.yaml").read_text())["tiles"]["size"]
    tiles = pd.read_parquet(out / "tiles.parquet")
    assert int(tiles["width"].max()) == size  # the table was made under this config
    for name in run_json["outputs"]:
        assert (out / name).exists(), name
    return rid


def _config(tmp_path: Path, manifest: Path, out: Path, size: int) -> Path:
    p = tmp_path / f"run-{size}.yaml"
    p.write_text(yaml.safe_dump({
        "slides": str(manifest), "output_dir": str(out), "stages": ["preprocess"],
        "tiles": {"size": size},
        "cluster": {"n_workers": 1, "threads_per_worker": 2, "dashboard_address": None},
    }))
    return p


def _cli(cfg: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daskpath.cli", "run", str(cfg), "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600, start_new_session=True)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    from daskpath.synthetic import make_cohort

    return make_cohort(tmp_path_factory.mktemp("sets"), pairs=2, size=(1024, 1024), seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_anywhere_shows_one_complete_set(point, small_cohort, tmp_path):
    out = tmp_path / "out"
    first = _cli(_config(tmp_path, small_cohort, out, 512))
    assert first.returncode == 0, first.stderr[-2000:]
    before = _visible(out)
    rid1 = _consistent(out)
    # a second run under another config, killed (SIGKILL) at `point` of its publication
    cfg2 = _config(tmp_path, small_cohort, out, 256)
    killed = _cli(cfg2, {"DASKPATH_CRASH_AT": point})
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    now = _visible(out)
    rid = _consistent(out)
    if point in ("assembled", "before-links", "before-switch"):
        assert rid == rid1 and now == before  # the previous set, untouched
    else:
        assert rid != rid1  # the new set, complete
        assert "DANGLING" not in now.values()
    # the same command again finishes the job without recomputing what was done
    again = _cli(cfg2)
    assert again.returncode == 0, again.stderr[-2000:]
    rid3 = _consistent(out)
    assert rid3 != rid1 and "DANGLING" not in _visible(out).values()
    stages = json.loads((out / "run.json").read_text())["slides"]
    assert not any(v["recomputed"] for s in stages.values() for v in s["stages"].values())
    runs = list((internal_dir(out) / "runs").iterdir())
    assert [r.name for r in runs] == [rid3]  # older run folders are gone


def test_files_are_links_into_the_current_set(synth_cohort, dask_client, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, [f"slides={synth_cohort}", f"output_dir={out}", "stages=[preprocess]"])
    res = run(cfg, client=dask_client)
    assert res.ok
    rid = json.loads((out / "run.json").read_text())["run_id"]
    assert os.readlink(internal_dir(out) / "current") == f"runs/{rid}"
    for name in json.loads((out / "run.json").read_text())["outputs"]:
        link = out / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), name
        assert ".daskpath/current/" in os.readlink(link)
    assert json.loads((out / MARKER).read_text())["last_run"] == rid
    # a user deleting a published name loses no work: the rerun restores the link
    slide = res.slides.slide[0]
    (out / "layers" / f"{slide}.zarr").unlink()
    res2 = run(cfg, client=dask_client)
    assert res2.recomputed(slide) == [] and (out / "layers" / f"{slide}.zarr").is_dir()
    # an artefact lost inside daskpath's work folder is recomputed
    target = (out / "layers" / f"{slide}.zarr").resolve()
    import shutil

    shutil.rmtree(target)
    res3 = run(cfg, client=dask_client)
    assert res3.recomputed(slide) == ["preprocess"] and (out / "layers" / f"{slide}.zarr").is_dir()
    pd.testing.assert_frame_equal(res3.tiles, res.tiles, check_exact=False, atol=1e-12)


def test_existing_foreign_folder_is_refused_and_untouched(synth_cohort, dask_client, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in {"config.yaml": "my own", "slides.csv": "a,b\n", "report.html": "<p>"}.items():
        (out / name).write_text(text)
    (out / "layers" / "synth000.zarr").mkdir(parents=True)
    (out / "layers" / "synth000.zarr" / "mydata.txt").write_text("mine")
    before = _visible(out)
    cfg = load_config(None, [f"slides={synth_cohort}", f"output_dir={out}", "stages=[preprocess]"])
    with pytest.raises(OutputFolderError, match="overwrite"):
        run(cfg, client=dask_client)
    assert _visible(out) == before and not (out / ".daskpath").exists()


def test_cli_force_takes_over_only_daskpaths_names(small_cohort, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years")
    (out / "slides.csv").write_text("my own table")
    cfg = _config(tmp_path, small_cohort, out, 512)
    r = _cli(cfg)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--force" in r.stderr
    r = subprocess.run([sys.executable, "-m", "daskpath.cli", "run", str(cfg), "--no-progress",
                        "--force"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "thesis.tex").read_text() == "years"  # not daskpath's name: untouched
    assert (out / "slides.csv").is_symlink()  # daskpath's name: taken over, as asked
    _consistent(out)


def test_two_runs_into_one_folder(small_cohort, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = _config(tmp_path, small_cohort, out, 512)
    from daskpath.ownership import claim_folder

    claim_folder(out)
    with FolderLock(out, what="daskpath run other"):
        r = _cli(cfg)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "in use by daskpath run other" in line and f"pid {os.getpid()}" in line
    assert not (out / "tiles.parquet").exists()
    assert _cli(cfg).returncode == 0


def test_add_artefact_refuses_a_missing_item(tmp_path):
    rs = RunSet(tmp_path / "out", "r1")
    with pytest.raises(FileNotFoundError):
        rs.add_artefact("layers/s.zarr", tmp_path / "nowhere" / "layers.zarr")
    assert Artefact("layers.zarr", "layers/{slide}.zarr").relative("../x") != "layers/../x.zarr"


def test_older_layout_is_migrated(synth_cohort, dask_client, tmp_path):
    """A folder written by the journaled publication (real files, .daskpath/state) becomes a set
    of links; files the older version listed but the new run does not make are removed."""
    out = tmp_path / "out"
    (internal_dir(out) / "state").mkdir(parents=True)
    (internal_dir(out) / "state" / "synth000.json").write_text(json.dumps(
        {"nuclei": {"fp": "x", "status": "published", "record": {},
                    "artefacts": ["nuclei/synth000.parquet"]}}))
    (out / "nuclei").mkdir()
    (out / "nuclei" / "synth000.parquet").write_text("old")
    (out / "tiles.parquet").write_text("old")
    (out / "metrics.json").write_text("{}")
    (out / "run.json").write_text(json.dumps({"outputs": ["tiles.parquet", "metrics.json"]}))
    cfg = load_config(None, [f"slides={synth_cohort}", f"output_dir={out}", "stages=[preprocess]"])
    assert run(cfg, client=dask_client).ok
    assert (out / "tiles.parquet").is_symlink() and not (out / "metrics.json").exists()
    assert not (out / "nuclei" / "synth000.parquet").exists()
    assert not (internal_dir(out) / "state").exists()
    time.sleep(0)
