"""Training pairs from a run's tile table: slide-level split, export layouts, train + evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

torch = pytest.importorskip("torch")

from daskpath.errors import InvalidInputError  # noqa: E402
from daskpath.translate.tilepairs import (RunInputs, export_tile_pairs, kept_tiles,  # noqa: E402
                                          run_inputs, split_slides)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(synth_cohort, dask_client, tmp_path_factory):
    """The preprocess stage on the two 2048^2 phantom pairs, 512 px tiles (7 kept per slide:
    4 at the rigid alignment, 7 once registration refines it)."""
    from daskpath.config import load_config
    from daskpath.pipeline import run

    out = tmp_path_factory.mktemp("run")
    # qc.exclude off: the fold detector flags a few dense 512-px tiles of the easy phantom
    # (documented in daskpath/qc.py); this module tests the export, not the QC
    cfg = load_config(None, [f"slides={synth_cohort}", f"output_dir={out}", "stages=[preprocess]",
                             "tiles.size=512", "qc.exclude=false"])
    run(cfg, client=dask_client)
    return out, synth_cohort


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------
def test_split_is_by_slide_deterministic_and_disjoint():
    slides = [f"s{i:02d}" for i in range(10)] * 3  # repeated ids: one decision per slide
    a = split_slides(slides, 0.3, seed=1)
    assert a == split_slides(list(reversed(slides)), 0.3, seed=1)  # order does not matter
    assert set(a) == {f"s{i:02d}" for i in range(10)}
    assert sorted(a.values()).count("test") == 3
    assert {k for k, v in a.items() if v == "test"} != {k for k, v in split_slides(slides, 0.3, seed=2).items()
                                                         if v == "test"}
    # at least one slide on each side, whatever the fraction
    assert list(split_slides(["a", "b"], 0.01).values()).count("test") == 1
    assert list(split_slides(["a", "b"], 0.99).values()).count("train") == 1


@pytest.mark.parametrize("fraction,slides,msg", [
    (0.0, ["a", "b"], "must be > 0 and < 1"),
    (1.0, ["a", "b"], "must be > 0 and < 1"),
    (-0.2, ["a", "b"], "must be > 0 and < 1"),
    ("half", ["a", "b"], "must be a number"),
    (0.5, ["a", "a"], "at least 2 slides"),
    (0.5, [], "at least 2 slides"),
])
def test_split_bad_input(fraction, slides, msg):
    with pytest.raises(InvalidInputError, match=msg) as e:
        split_slides(slides, fraction)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def test_export_writes_every_kept_tile_once_split_by_slide(tiny_run, tmp_path):
    run_dir, manifest = tiny_run
    kept = kept_tiles(run_dir)
    tiles = pd.read_parquet(run_dir / "tiles.parquet")
    assert len(kept) == int(tiles["keep"].sum()) == 14
    rigid = (tiles["tissue_fraction"] >= 0.5) & (tiles["ssim_rigid"] >= 0.4)
    assert int(rigid.sum()) == 8  # refinement kept more tiles
    table = export_tile_pairs(run_dir, tmp_path / "pairs", manifest=manifest, test_fraction=0.5, seed=0)
    assert len(table) == len(kept)
    assert sorted(zip(table["slide"], table["y0"], table["x0"])) == sorted(zip(kept["slide"], kept["y0"], kept["x0"]))
    by_split = table.groupby("split")["slide"].agg(set)
    assert by_split["train"].isdisjoint(by_split["test"])  # never one slide on both sides
    split = json.loads((tmp_path / "pairs" / "split.json").read_text())
    assert split["n_train_tiles"] + split["n_test_tiles"] == len(kept)
    for side in ("train", "test"):
        n = int(kept["slide"].isin(split[f"{side}_slides"]).sum())
        assert (table["split"] == side).sum() == n
        assert len(list((tmp_path / "pairs" / f"{side}A").glob("*.png"))) == n
        assert len(list((tmp_path / "pairs" / f"{side}B").glob("*.png"))) == n
    # the PNGs hold the slides' pixels at the tile's coordinates (H&E in A, IHC in B)
    from PIL import Image

    man = pd.read_csv(manifest)
    r = table.iloc[0]
    row = man.set_index("slide").loc[r.slide]
    he = tifffile.imread(manifest.parent / row["he"], level=0)
    ihc = tifffile.imread(manifest.parent / row["ihc"], level=0)
    sl = (slice(r.y0, r.y0 + r.height), slice(r.x0, r.x0 + r.width))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pairs" / r.a)), he[sl])
    # the IHC on the refined alignment: the phantom's IHC is the H&E moved by (1, -1)
    assert r.registered and (round(r.dy), round(r.dx)) == (1, -1)
    sl_ihc = (slice(r.y0 + 1, r.y0 + 1 + r.height), slice(r.x0 - 1, r.x0 - 1 + r.width))
    if r.x0 == 0:  # the slide's edge column repeated
        ihc = np.concatenate([ihc[:, :1], ihc], axis=1)
        sl_ihc = (sl_ihc[0], slice(0, r.width))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pairs" / r.b)), ihc[sl_ihc])
    # an identical export is left alone
    mtime = (tmp_path / "pairs" / r.a).stat().st_mtime_ns
    export_tile_pairs(run_dir, tmp_path / "pairs", manifest=manifest, test_fraction=0.5, seed=0)
    assert (tmp_path / "pairs" / r.a).stat().st_mtime_ns == mtime


def test_aligned_layout_and_folder_pairs(tiny_run, tmp_path):
    from daskpath.translate.train import folder_pairs

    run_dir, manifest = tiny_run
    table = export_tile_pairs(RunInputs(run_dir, manifest, run_dir / "cache"), tmp_path / "ab",
                              test_fraction=0.5, layout="aligned", max_tiles_per_slide=2)
    assert len(table) == 4 and (table.groupby("slide").size() == 2).all()
    assert not (tmp_path / "ab" / "trainA").exists()
    got = folder_pairs(tmp_path / "ab", "train")
    assert len(got) == (table["split"] == "train").sum()
    assert all(a.shape == b.shape == (512, 512, 3) for a, b in got)
    # re-exporting as unaligned replaces the aligned folders (no stale tiles on the wrong side)
    export_tile_pairs(RunInputs(run_dir, manifest, run_dir / "cache"), tmp_path / "ab", test_fraction=0.5)
    assert not (tmp_path / "ab" / "train").exists() and (tmp_path / "ab" / "trainA").is_dir()


def test_export_bad_input(tiny_run, tmp_path):
    run_dir, manifest = tiny_run
    cases = []
    cases.append((tmp_path / "nope", manifest, "run folder .* not found"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", manifest, "tiles.parquet not found"))
    (tmp_path / "nokeep").mkdir()
    t = pd.read_parquet(run_dir / "tiles.parquet").assign(keep=False)
    t.to_parquet(tmp_path / "nokeep" / "tiles.parquet")
    cases.append((tmp_path / "nokeep", manifest, "no kept tiles"))
    (tmp_path / "other").mkdir()
    pd.read_parquet(run_dir / "tiles.parquet").assign(slide="elsewhere").to_parquet(tmp_path / "other" / "tiles.parquet")
    cases.append((tmp_path / "other", manifest, "not in manifest"))
    for rd, m, msg in cases:
        with pytest.raises(InvalidInputError, match=msg) as e:
            export_tile_pairs(rd, tmp_path / "x", manifest=m)
        assert "\n" not in str(e.value)
    with pytest.raises(InvalidInputError, match="layout"):
        export_tile_pairs(run_dir, tmp_path / "x", manifest=manifest, layout="paired")
    with pytest.raises(InvalidInputError, match="--slides"):
        run_inputs(run_dir=tmp_path / "nokeep")  # a folder without the run's config.yaml
    # a run folder knows its slides: `daskpath run` wrote config.yaml with absolute paths
    found = run_inputs(run_dir=run_dir)
    assert found.manifest == Path(manifest).resolve() and found.run_dir == run_dir
    with pytest.raises(InvalidInputError, match="--config"):
        run_inputs()


# ---------------------------------------------------------------------------------------------
# the command: export, train on the train slides only, evaluate on the held-out ones
# ---------------------------------------------------------------------------------------------
def test_train_translator_from_run_config(tiny_run, tmp_path):
    from daskpath.cli import main
    from daskpath.translate.checkpoints import load_generator

    run_dir, manifest = tiny_run
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"slides: {manifest}\noutput_dir: {run_dir}\nstages: [preprocess]\ntiles:\n  size: 512\n")
    out = tmp_path / "model"
    rc = main(["train", "translator", str(out), "--config", str(cfg), "--test-fraction", "0.5",
               "--ngf", "4", "--ndf", "4", "--crop", "64", "--epochs", "1", "--epochs-decay", "1",
               "--steps-per-epoch", "2", "--batch-size", "2", "--tile", "192", "--threads", "1", "--no-progress"])
    assert rc == 0
    net, spec = load_generator(out)  # strict load of the reference layout
    sd = torch.load(out / "latest_net_G.pth", weights_only=True)
    assert set(sd) == set(net.state_dict()) and (out / "2_net_G.pth").is_file()
    extra = json.loads((out / "daskpath.json").read_text())["extra"]["training"]
    info = extra["extra"]
    assert info["data"] == "run" and set(info["train_slides"]).isdisjoint(info["test_slides"])
    kept = kept_tiles(run_dir)
    assert extra["n_pairs"] == info["n_train_tiles"] == int(kept["slide"].isin(info["train_slides"]).sum())
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["slides_scored"] == info["test_slides"]
    assert ev["n_tiles"] == info["n_test_tiles"] == int(kept["slide"].isin(info["test_slides"]).sum())
    assert {"acc3", "mae", "balanced_acc3", "confusion"} <= set(ev["tiles"]) and ev["tiles"]["n"] >= 1
    assert np.isfinite(ev["ssim"])


def test_train_translator_from_run_bad_input(tiny_run, tmp_path, capsys):
    from daskpath.translate.train import main

    run_dir, manifest = tiny_run
    base = [str(tmp_path / "m"), "--ngf", "4", "--ndf", "4", "--crop", "64", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "1", "--tile", "192", "--no-progress"]
    bad = [
        (["--from-run", str(tmp_path / "missing"), "--slides", str(manifest)], "run folder"),
        (["--from-run", str(run_dir), "--slides", str(manifest), "--test-fraction", "1.5"], "test_fraction"),
        (["--from-run", str(run_dir), "--slides", str(manifest), "--crop", "1024"], "smaller than --crop"),
        (["--from-run", str(run_dir), "--slides", str(manifest), "--data", str(tmp_path)], "either --data"),
    ]
    for extra, msg in bad:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1
