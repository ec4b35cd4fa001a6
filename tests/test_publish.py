"""Fingerprint ingredients and the publication journal (a run killed while publishing)."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest

from daskpath.config import load_config
from daskpath.pipeline import run
from daskpath.publish import (
    describe_changes,
    file_identity,
    model_identity,
    stage_fingerprint,
)
from daskpath.publish import slide_key


def test_file_identity_sees_content_changes_under_the_same_size_and_mtime(tmp_path):
    p = tmp_path / "slide.tif"
    p.write_bytes(b"a" * (3 << 20))
    st = p.stat()
    a = file_identity(p)
    with open(p, "r+b") as f:  # rewrite the last MiB, keep size and mtime
        f.seek(-10, os.SEEK_END)
        f.write(b"b" * 10)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    b = file_identity(p)
    assert a["size"] == b["size"] and a["mtime_ns"] == b["mtime_ns"]
    assert a["ends"] != b["ends"]
    assert file_identity(tmp_path / "missing.tif")["size"] is None


def test_model_identity_is_the_content_not_the_path(tmp_path):
    from daskpath.nuclei import SHIPPED_MODELS

    a = tmp_path / "a"
    shutil.copytree(SHIPPED_MODELS["phantom"], a)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "README.md").write_text("notes do not change the model")
    assert model_identity(a)["sha256"] == model_identity(b)["sha256"]
    th = json.loads((b / "thresholds.json").read_text())
    th["prob"] = 0.9
    (b / "thresholds.json").write_text(json.dumps(th))
    assert model_identity(a)["sha256"] != model_identity(b)["sha256"]
    assert model_identity(None, "2D_versatile_he") == {"name": "2D_versatile_he"}


def test_fingerprint_and_change_description():
    base = dict(keys={"tiles.size": 512}, inputs={"he": {"size": 1}}, models={}, upstream={})
    fp1, r1 = stage_fingerprint("preprocess", 1, **base)
    fp2, r2 = stage_fingerprint("preprocess", 1, **base | {"keys": {"tiles.size": 1024}})
    fp3, r3 = stage_fingerprint("preprocess", 2, **base)
    assert len({fp1, fp2, fp3}) == 3
    assert stage_fingerprint("preprocess", 1, **base)[0] == fp1
    assert describe_changes(r1, r2) == ["tiles.size"]
    assert describe_changes(r1, r3) == ["preprocess version"]
    assert describe_changes(None, r1) == []
    _, r4 = stage_fingerprint("preprocess", 1, **base | {"inputs": {"he": {"size": 2}}})
    assert describe_changes(r1, r4) == ["input he"]


def test_slide_keys_are_safe_and_distinct():
    assert slide_key("synth000") == "synth000"
    k1, k2 = slide_key("../../victim/data"), slide_key("/abs/path/data")
    assert "/" not in k1 + k2 and not k1.startswith(".") and k1 != k2


def test_slide_names_are_data_not_paths(synth_cohort, dask_client, tmp_path):
    """A slide id like ``../../victim/data`` is refused before any work, and nothing is written
    anywhere (the victim's files stay as they were)."""

    from daskpath.errors import ManifestError

    man = pd.read_csv(synth_cohort)
    folder = synth_cohort.parent
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.zarr").mkdir()
    (victim / "data.zarr" / "mine.txt").write_text("the user's")
    for name in ["../../victim/data", str(victim / "data"), "./x"]:
        rows = [{"slide": name, "he": str(folder / man.he[0]), "ihc": str(folder / man.ihc[0])}]
        m = tmp_path / "manifest.csv"
        pd.DataFrame(rows).to_csv(m, index=False)
        out = tmp_path / "a" / "b" / "out"
        with pytest.raises(ManifestError, match="not plain names"):
            run(load_config(None, [f"slides={m}", f"output_dir={out}", "stages=[preprocess]"]),
                client=dask_client)
        assert not out.exists()
    assert (victim / "data.zarr" / "mine.txt").read_text() == "the user's"
    assert sorted(victim.iterdir()) == [victim / "data.zarr"]
    assert slide_key("a/b") != slide_key("a_b")  # the file names stay distinct all the same
