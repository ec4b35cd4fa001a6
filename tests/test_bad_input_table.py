"""The bad-input table: every kind of bad input a user was seen to give, one row each.

Each row asserts: exit status 2 and one line naming the thing and the fix (run-level input,
refused before any work), or exit status 1 with the slide in ``failures.csv`` and the others
complete (a per-slide fault); and that no file outside ``output_dir`` was created or changed
(a sentinel tree around the run is compared before and after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from daskpath.cli import main


def _tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    seen = {}
    for dirpath, dirs, files in os.walk(root):
        d = Path(dirpath)
        if skip is not None and (d == skip or skip in d.parents):
            dirs[:] = []
            continue
        for f in files + [x for x in dirs if (d / x).is_symlink()]:
            p = d / f
            try:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12] if p.is_file() else "-"
            except OSError:
                digest = "unreadable"
            seen[str(p.relative_to(root))] = digest
    return seen


@pytest.fixture(scope="module")
def good(tmp_path_factory, synth_cohort):
    d = tmp_path_factory.mktemp("goodpair")
    man = pd.read_csv(synth_cohort)
    he = Path(shutil.copy(synth_cohort.parent / man.he[0], d / "g_HE.tif"))
    ihc = Path(shutil.copy(synth_cohort.parent / man.ihc[0], d / "g_IHC.tif"))
    return he, ihc


def _config(d: Path, out: Path, extra: str = "") -> Path:
    cfg = d / "c.yaml"
    cfg.write_text(f"slides: {d / 'm.csv'}\noutput_dir: {out}\nstages: [preprocess]\n"
                   "cluster:\n  n_workers: 1\n  threads_per_worker: 2\n"
                   "  dashboard_address: '127.0.0.1:0'\n" + extra)
    return cfg


def _manifest(d: Path, rows: list[tuple[str, str, str]]) -> None:
    (d / "m.csv").write_text("slide,he,ihc\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))


# ------------------------------------------------------------------ refused before any work
def _run_level(case: str, d: Path, he: Path, ihc: Path) -> tuple[list[str], str]:
    """Build the input of ``case`` in ``d``; return (CLI args, expected part of the message)."""
    out = d / "out"
    ok = [("s1", str(he), str(ihc))]
    _manifest(d, ok)
    cfg = _config(d, out)
    run = ["run", str(cfg), "--no-progress"]

    def with_config(text: str) -> Path:
        p = d / "c2.yaml"
        p.write_text(text)
        return p

    base = cfg.read_text()
    if case == "unknown config key":
        return ["run", str(with_config(base + "tiles:\n  sise: 512\n")), "--no-progress"], "tiles.sise"
    if case == "config value of the wrong type":
        return [*run, "--set", "tiles.size=big"], "tiles.size"
    if case == "config value out of range":
        return [*run, "--set", "tiles.size=16"], "tiles.size"
    if case == "SSIM threshold out of range":
        return [*run, "--set", "ssim.threshold=2"], "ssim.threshold"
    if case == "unknown stage":
        return [*run, "--set", "stages=[preprocess,segment]"], "stages"
    if case == "config file missing":
        return ["run", str(d / "nope.yaml")], "nope.yaml"
    if case == "config not YAML":
        return ["run", str(with_config("tiles: [1, 2\n"))], "not valid YAML"
    if case == "config not a mapping":
        return ["run", str(with_config("- a\n- b\n"))], "mapping"
    if case == "YAML alias bomb":
        lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
        lines += [f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
        return ["run", str(with_config("\n".join(lines) + "\n"))], "aliases"
    if case == "huge config value":
        return [*run, "--set", f"tiles.size=[{','.join(['1'] * 5000)}]"], "tiles.size"
    if case == "config not UTF-8":
        p = d / "latin1.yaml"
        p.write_bytes(base.encode() + b"# caf\xe9\n")
        return ["run", str(p)], "UTF-8"
    if case == "--set without '='":
        return [*run, "--set", "tiles.size"], "dotted.key=value"
    if case == "slides key empty":
        return ["run", str(with_config(base.replace(f"slides: {d / 'm.csv'}", "slides: ''"))),
                "--no-progress"], "slides"
    if case == "output_dir is a file":
        out.write_text("a file")
        return run, "is a file"
    if case == "output_dir holds the user's files":
        out.mkdir()
        (out / "config.yaml").write_text("my own config")
        (out / "report.html").write_text("my report")
        return run, "--force"
    if case == "unknown cluster kind":
        return [*run, "--set", "cluster.kind=mesos"], "cluster.kind"
    if case == "TLS without certificate files":
        return [*run, "--set", "cluster.security.kind=tls"], "daskpath cluster tls"
    if case == "mistyped nuclei model":
        return [*run, "--set", "stages=[preprocess,nuclei]", "--set",
                f"nuclei.model={d / 'no_such_model'}"], "no_such_model"
    if case == "mistyped translator model":
        return [*run, "--set", "stages=[preprocess,nuclei,translate]", "--set",
                f"translate.model={d / 'no_such_gen.pth'}"], "no_such_gen.pth"
    if case == "manifest missing":
        (d / "m.csv").unlink()
        return run, "m.csv"
    if case == "manifest empty":
        (d / "m.csv").write_text("")
        return run, "empty"
    if case == "manifest without rows":
        (d / "m.csv").write_text("slide,he,ihc\n")
        return run, "no rows"
    if case == "manifest without ihc column":
        (d / "m.csv").write_text(f"slide,he\ns1,{he}\n")
        return run, "ihc"
    if case == "duplicate slide id":
        _manifest(d, ok + ok)
        return run, "duplicate"
    if case == "slide id with ../":
        _manifest(d, [("../../victim/data", str(he), str(ihc))])
        return run, "not plain names"
    if case == "absolute slide id":
        _manifest(d, [("/abs/path/data", str(he), str(ihc))])
        return run, "not plain names"
    if case == "slide id ./x next to x":
        _manifest(d, [("x", str(he), str(ihc)), ("./x", str(he), str(ihc))])
        return run, "not plain names"
    if case == "slide ids differing in case":
        _manifest(d, [("Case1", str(he), str(ihc)), ("case1", str(he), str(ihc))])
        return run, "differ only in case"
    if case == "slide id with spaces":
        _manifest(d, [("my slide", str(he), str(ihc))])
        return run, "not plain names"
    if case == "empty cell":
        (d / "m.csv").write_text(f"slide,he,ihc\ns1,{he},\n")
        return run, "empty 'ihc'"
    if case == "same file as H&E and IHC":
        _manifest(d, [("s1", str(he), str(he))])
        return run, "same file"
    if case == "same file through a link":
        os.symlink(he, d / "link_IHC.tif")
        _manifest(d, [("s1", str(he), str(d / "link_IHC.tif"))])
        return run, "same file"
    if case == "manifest not UTF-8":
        (d / "m.csv").write_bytes(b"slide,he,ihc\ns\xe91,a.tif,b.tif\n")
        return run, "m.csv"
    if case == "output_dir not UTF-8":
        bad = os.fsdecode(bytes(d / "out") + b"\xff")
        return [*run, "--set", f"output_dir={bad}"], "not valid UTF-8"
    if case == "two runs into one folder":
        from daskpath.ownership import FolderLock, claim_folder

        claim_folder(out)
        lock = FolderLock(out, what="daskpath run first")
        lock.acquire()
        d.joinpath(".lock-holder").write_text("held")  # released by the test after the run
        _LOCKS.append(lock)
        return run, "in use by daskpath run first"
    raise AssertionError(case)


_LOCKS: list = []

RUN_LEVEL = [
    "unknown config key", "config value of the wrong type", "config value out of range",
    "SSIM threshold out of range", "unknown stage", "config file missing", "config not YAML",
    "config not a mapping", "YAML alias bomb", "huge config value", "config not UTF-8",
    "--set without '='", "slides key empty", "output_dir is a file",
    "output_dir holds the user's files", "unknown cluster kind", "TLS without certificate files",
    "mistyped nuclei model", "mistyped translator model", "manifest missing", "manifest empty",
    "manifest without rows", "manifest without ihc column", "duplicate slide id",
    "slide id with ../", "absolute slide id", "slide id ./x next to x",
    "slide ids differing in case", "slide id with spaces", "empty cell",
    "same file as H&E and IHC", "same file through a link", "manifest not UTF-8",
    "output_dir not UTF-8", "two runs into one folder",
]


@pytest.mark.parametrize("case", RUN_LEVEL)
def test_refused_before_any_work(case, good, tmp_path, capsys):
    world = tmp_path
    (world / "sentinel").mkdir()
    (world / "sentinel" / "thesis.tex").write_text("years of work")
    d = world / "case"
    d.mkdir()
    args, expect = _run_level(case, d, *good)
    out = d / "out"
    before = _tree(world)
    try:
        rc = main(args)
    finally:
        while _LOCKS:
            _LOCKS.pop().release()
    err = capsys.readouterr().err.strip()
    assert rc == 2, (case, rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("daskpath: error:"), (case, err[:500])
    assert len(lines[0]) < 400, (case, len(lines[0]))
    assert expect in lines[0], (case, lines[0])
    after = _tree(world)
    # nothing outside output_dir changed; inside it, nothing that looks like a result
    outside = {k: v for k, v in after.items() if not k.startswith("case/out")}
    assert outside == {k: v for k, v in before.items() if not k.startswith("case/out")}, case
    assert not (out / "tiles.parquet").exists() and not (out / "run.json").exists()
    if case == "output_dir holds the user's files":
        assert (out / "config.yaml").read_text() == "my own config"
        assert not (out / ".daskpath").exists()


# --------------------------------------------------------------------- per-slide faults
def _slide_cases(d: Path, he: Path, ihc: Path) -> dict[str, tuple[str, str]]:
    """{slide id: (ihc path, expected part of its failures.csv message)}; H&E is the good one."""
    rgb = tifffile.imread(he)
    cases: dict[str, tuple[str, str]] = {}
    cases["missing_file"] = (str(d / "gone_IHC.tif"), "gone_IHC.tif")
    data = ihc.read_bytes()
    (d / "trunc.tif").write_bytes(data[: len(data) // 2])
    cases["truncated_tiff"] = (str(d / "trunc.tif"), "truncated")
    (d / "notes.tif").write_text("not a slide\n")
    cases["not_an_image"] = (str(d / "notes.tif"), "not a supported image")
    (d / "empty.tif").write_bytes(b"")
    cases["empty_file"] = (str(d / "empty.tif"), "empty")
    (d / "plain_dir").mkdir()
    cases["folder_not_zarr"] = (str(d / "plain_dir"), "not a zarr")
    z = d / "bad.zarr"
    z.mkdir()
    (z / "zarr.json").write_text("{ not json")
    cases["corrupt_zarr"] = (str(z), "bad.zarr")
    tifffile.imwrite(d / "small.tif", rgb[:1000, :1500], tile=(256, 256), photometric="rgb")
    cases["pair_size_mismatch"] = (str(d / "small.tif"), "small.tif")
    tifffile.imwrite(d / "gray.tif", rgb[..., 0], tile=(256, 256))
    cases["grayscale"] = (str(d / "gray.tif"), "grayscale")
    tifffile.imwrite(d / "u16.tif", rgb.astype(np.uint16) * 257, tile=(256, 256), photometric="rgb")
    cases["bits_16"] = (str(d / "u16.tif"), "16-bit")
    cmyk = np.concatenate([255 - rgb, np.zeros_like(rgb[..., :1])], axis=-1)
    tifffile.imwrite(d / "cmyk.tif", cmyk, tile=(256, 256), photometric="separated")
    cases["cmyk_tiff"] = (str(d / "cmyk.tif"), "CMYK")
    import pyvips

    pyvips.Image.new_from_array(rgb[:512, :512]).colourspace("cmyk").jpegsave(str(d / "cmyk.jpg"))
    cases["cmyk_jpeg"] = (str(d / "cmyk.jpg"), "CMYK")
    tifffile.imwrite(d / "tiny.tif", rgb[:3, :3], photometric="rgb")
    cases["tiny_3x3"] = (str(d / "tiny.tif"), "at least 64 px")
    tifffile.imwrite(d / "one.tif", rgb[:1, :1], photometric="rgb")
    cases["one_pixel"] = (str(d / "one.tif"), "at least 64 px")
    os.symlink(d / "loop_b", d / "loop_a")
    os.symlink(d / "loop_a", d / "loop_b")
    cases["symlink_loop"] = (str(d / "loop_a"), "symbolic-link loop")
    os.mkfifo(d / "fifo.tif")
    cases["fifo"] = (str(d / "fifo.tif"), "not a regular file")
    return cases


@pytest.fixture(scope="module")
def per_slide_run(good, tmp_path_factory):
    world = tmp_path_factory.mktemp("perslide")
    (world / "sentinel").mkdir()
    (world / "sentinel" / "data.txt").write_text("keep")
    d = world / "case"
    d.mkdir()
    he, ihc = good
    cases = _slide_cases(d, he, ihc)
    _manifest(d, [(s, str(he), p) for s, (p, _) in cases.items()] + [("ok", str(he), str(ihc))])
    out = d / "out"
    cfg = _config(d, out)
    before = _tree(world, skip=out)
    rc = main(["-q", "run", str(cfg), "--no-progress"])
    after = _tree(world, skip=out)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return {"rc": rc, "out": out, "cases": cases, "changed": changed}


PER_SLIDE = ["missing_file", "truncated_tiff", "not_an_image", "empty_file", "folder_not_zarr",
             "corrupt_zarr", "pair_size_mismatch", "grayscale", "bits_16", "cmyk_tiff",
             "cmyk_jpeg", "tiny_3x3", "one_pixel", "symlink_loop", "fifo"]


@pytest.mark.parametrize("slide", PER_SLIDE)
def test_bad_slide_fails_alone(slide, per_slide_run):
    r = per_slide_run
    assert r["rc"] == 1 and not r["changed"], r["changed"]
    fails = pd.read_csv(r["out"] / "failures.csv").set_index("slide")
    msg = fails.loc[slide, "error"]
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 400, msg
    assert r["cases"][slide][1] in msg, (slide, msg)
    tiles = pd.read_parquet(r["out"] / "tiles.parquet")
    assert set(tiles.slide) == {"ok"}  # the good slide completed; no bad slide left anything
    assert sorted(fails.index) == sorted(PER_SLIDE)


def test_table_has_every_kind():
    assert len(RUN_LEVEL) + len(PER_SLIDE) >= 45
