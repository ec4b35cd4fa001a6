"""Every stage resumes chunk by chunk: a `daskpath run` killed (SIGKILL, client and workers) in
the middle of a stage, rerun: nothing recorded is computed again, and the tables equal a clean
run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

pytest.importorskip("stardist")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

from daskpath.config import load_config  # noqa: E402
from daskpath.pipeline import run  # noqa: E402
from daskpath.publish import internal_dir  # noqa: E402
from daskpath.runner import slide_key  # noqa: E402

pytestmark = pytest.mark.slow

# small chunks: many chunk tasks per stage, so a kill lands in the middle of one
SETTINGS = {
    "tiles": {"size": 512},
    "chunk_size": 256,
    "nuclei": {"chunk_size": 256},
    "baselines": {"batch_size": 1},
}


def _config(manifest, out) -> dict:
    return {
        "slides": str(manifest),
        "output_dir": str(out),
        **SETTINGS,
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None},
    }


@pytest.fixture(scope="module")
def clean(synth_cohort, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_clean")
    cfg = load_config(None, _flat(_config(synth_cohort, out)))
    res = run(cfg, client=dask_client)
    assert res.ok, res.failures
    return res


def _flat(d, prefix=""):
    items = []
    for k, v in d.items():
        if isinstance(v, dict):
            items += _flat(v, f"{prefix}{k}.")
        else:
            items.append(f"{prefix}{k}={'null' if v is None else v}")
    return items


def _records(out, stage):
    work = internal_dir(out) / "work"
    return [p for p in work.glob(f"*/{stage}-*/chunks/**/*")
            if p.is_file() and ".partial" not in p.name]


@pytest.mark.parametrize("stage", ["preprocess", "nuclei", "translate", "baselines"])
def test_kill_mid_stage_then_rerun_resumes(stage, clean, synth_cohort, dask_client, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(clean.output_dir, out, symlinks=True)
    slides = list(clean.slides.slide)
    for s in slides:  # forget the stage: the next run must compute it again, and only it
        for d in (internal_dir(out) / "work" / slide_key(s)).glob(f"{stage}-*"):
            shutil.rmtree(d)
    total = sum(clean.stages[s][stage]["chunks"] for s in slides)
    assert total >= 8, clean.stages
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(synth_cohort, out)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskpath.cli", "run", str(cfg_path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    killed_at = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            n = len(_records(out, stage))
            if n >= max(2, int(0.4 * total)):
                os.killpg(proc.pid, signal.SIGKILL)  # the client and its workers, as a node loss
                killed_at = n
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    log = proc.stdout.read().decode(errors="replace")
    assert killed_at is not None, f"the run ended before the kill:\n{log[-3000:]}"
    present = len(_records(out, stage))
    assert present >= killed_at
    cfg = load_config(None, _flat(_config(synth_cohort, out)))
    res = run(cfg, client=dask_client)
    assert res.ok, res.failures
    # only the killed stage ran again; every record present was loaded, not recomputed
    for s in slides:
        assert res.recomputed(s) in ([stage], []), res.stages[s]
    resumed = sum(res.stages[s][stage]["chunks_resumed"] for s in slides)
    computed = sum(res.stages[s][stage]["chunks"] - res.stages[s][stage]["chunks_resumed"]
                   for s in slides if res.stages[s][stage]["recomputed"])
    assert resumed == present, (resumed, present)
    assert computed <= total - present
    pd.testing.assert_frame_equal(res.tiles, clean.tiles, check_exact=False, atol=1e-9)
    pd.testing.assert_frame_equal(res.slides, clean.slides, check_exact=False, atol=1e-9)
