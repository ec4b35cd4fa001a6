"""Bad input, end to end through the CLI: one line naming the thing and the fix, nothing partial."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from daskpath.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory, synth_cohort):
    """One good pair (copied), so each case only breaks one thing."""
    d = tmp_path_factory.mktemp("good")
    man = pd.read_csv(synth_cohort)
    he = shutil.copy(synth_cohort.parent / man.he[0], d / "g_HE.tif")
    ihc = shutil.copy(synth_cohort.parent / man.ihc[0], d / "g_IHC.tif")
    return Path(he), Path(ihc)


def _write_case(case: str, d: Path, he: Path, ihc: Path) -> tuple[str, str]:
    """Make the broken input of ``case``; return (manifest text, expected message part)."""
    rgb = tifffile.imread(he)
    if case == "missing file":
        return f"slide,he,ihc\ns1,{he},{d / 'gone_IHC.tif'}\n", "gone_IHC.tif"
    if case == "truncated tiff":
        data = ihc.read_bytes()
        (d / "trunc.tif").write_bytes(data[: len(data) // 2])
        return f"slide,he,ihc\ns1,{he},{d / 'trunc.tif'}\n", "trunc.tif"
    if case == "truncated png":
        from PIL import Image

        Image.fromarray(rgb[:512, :512]).save(d / "x.png")
        data = (d / "x.png").read_bytes()
        (d / "trunc.png").write_bytes(data[: len(data) // 2])
        Image.fromarray(rgb[:512, :512]).save(d / "ok.png")
        return f"slide,he,ihc\ns1,{d / 'ok.png'},{d / 'trunc.png'}\n", "trunc.png"
    if case == "not an image":
        (d / "notes_IHC.tif").write_text("this is not a slide\n")
        return f"slide,he,ihc\ns1,{he},{d / 'notes_IHC.tif'}\n", "notes_IHC.tif"
    if case == "empty file":
        (d / "empty_IHC.tif").write_bytes(b"")
        return f"slide,he,ihc\ns1,{he},{d / 'empty_IHC.tif'}\n", "empty_IHC.tif"
    if case == "corrupt zarr":
        z = d / "bad.zarr"
        z.mkdir()
        (z / "zarr.json").write_text("{ not json")
        return f"slide,he,ihc\ns1,{he},{z}\n", "bad.zarr"
    if case == "pair size mismatch":
        tifffile.imwrite(d / "small_IHC.tif", rgb[:1000, :1500], tile=(256, 256), photometric="rgb")
        return f"slide,he,ihc\ns1,{he},{d / 'small_IHC.tif'}\n", "small_IHC.tif"
    if case == "grayscale":
        tifffile.imwrite(d / "gray_IHC.tif", rgb[..., 0], tile=(256, 256))
        return f"slide,he,ihc\ns1,{he},{d / 'gray_IHC.tif'}\n", "gray_IHC.tif"
    if case == "16-bit":
        tifffile.imwrite(d / "u16_IHC.tif", rgb.astype(np.uint16) * 257, tile=(256, 256), photometric="rgb")
        return f"slide,he,ihc\ns1,{he},{d / 'u16_IHC.tif'}\n", "u16_IHC.tif"
    raise AssertionError(case)


SLIDE_CASES = [
    "missing file",
    "truncated tiff",
    "truncated png",
    "not an image",
    "empty file",
    "corrupt zarr",
    "pair size mismatch",
    "grayscale",
    "16-bit",
]


@pytest.mark.parametrize("case", SLIDE_CASES)
def test_bad_slide_reported_and_others_complete(case, good, tmp_path, capsys):
    he, ihc = good
    text, expect = _write_case(case, tmp_path, he, ihc)
    text += f"ok,{he},{ihc}\n"  # a good slide in the same cohort
    (tmp_path / "m.csv").write_text(text)
    out = tmp_path / "out"
    rc = main(["-q", "run", str(_config(tmp_path, out)), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails.slide) == ["s1"]
    msg = fails.error[0]
    assert expect in msg, msg
    assert "\n" not in msg and "Traceback" not in msg
    assert expect in err
    tiles = pd.read_parquet(out / "tiles.parquet")
    assert set(tiles.slide) == {"ok"}  # the good slide completed, the bad one left nothing
    assert not (out / "parts" / "s1.tiles.parquet").exists()
    assert not (out / "layers" / "s1.zarr").exists()


def _config(d: Path, out: Path) -> Path:
    cfg = d / "c.yaml"
    cfg.write_text(
        f"slides: {d / 'm.csv'}\noutput_dir: {out}\nstages: [preprocess]\n"
        "cluster:\n  n_workers: 1\n  threads_per_worker: 2\n  dashboard_address: '127.0.0.1:0'\n"
    )
    return cfg


@pytest.mark.parametrize(
    ("manifest", "expect"),
    [
        ("slide,he,ihc\na,x_HE.tif,x_IHC.tif\na,y_HE.tif,y_IHC.tif\n", "duplicate"),
        ("slide,he\na,x_HE.tif\n", "ihc"),
        ("slide,he,ihc\n", "no rows"),
        ("", "empty"),
    ],
)
def test_bad_manifest_exits_2_before_any_work(manifest, expect, tmp_path, capsys):
    (tmp_path / "m.csv").write_text(manifest)
    out = tmp_path / "out"
    rc = main(["run", str(_config(tmp_path, out)), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("daskpath: error:") and len(err.splitlines()) == 1
    assert expect in err.lower()
    assert not (out / "tiles.parquet").exists()


def test_missing_manifest(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(_config(tmp_path, out)), "--no-progress"]) == 2
    assert "m.csv" in capsys.readouterr().err


def test_all_white_slide_is_not_an_error(tmp_path, capsys):
    white = np.full((1024, 1024, 3), 246, np.uint8)
    for n in ("w_HE.tif", "w_IHC.tif"):
        tifffile.imwrite(tmp_path / n, white, tile=(256, 256), photometric="rgb")
    (tmp_path / "m.csv").write_text("slide,he,ihc\nw,w_HE.tif,w_IHC.tif\n")
    out = tmp_path / "out"
    assert main(["-q", "run", str(_config(tmp_path, out)), "--no-progress"]) == 0
    assert "no tissue" in pd.read_csv(out / "slides.csv").note[0]
