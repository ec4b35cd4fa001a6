"""The command line, called as `main([...])`."""

from __future__ import annotations

import pandas as pd
import pytest

from daskpath.cli import main


def test_help_for_every_command(capsys):
    for cmd in ([], ["synth"], ["ingest"], ["run"], ["demo"], ["info"], ["config"], ["train"],
                ["cluster"], ["train", "stardist", "--"], ["train", "translator", "--"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    assert "daskpath" in capsys.readouterr().out


def test_synth_then_run(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "s"), "--pairs", "1", "--size", "1024", "1536", "--seed", "3"]) == 0
    manifest = tmp_path / "s" / "manifest.csv"
    assert manifest.exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"slides: {manifest}\noutput_dir: {tmp_path / 'o'}\nstages: [preprocess]\n"
        "cluster:\n  n_workers: 1\n  threads_per_worker: 2\n  dashboard_address: '127.0.0.1:0'\n"
    )
    assert main(["run", str(cfg), "--no-progress", "--set", "tiles.size=512", "-q"]) == 0
    cap = capsys.readouterr()
    out = cap.out
    assert "slide synth000" not in cap.err and "local cluster" not in cap.err  # -q: no info lines
    assert "tiles_kept" in out
    assert "report: " in out and "report.html" in out
    tiles = pd.read_parquet(tmp_path / "o" / "tiles.parquet")
    assert len(tiles) == 2 * 3
    assert main(["info", str(tmp_path / "s" / pd.read_csv(manifest).he[0])]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "nope.yaml"], "config file nope.yaml not found"),
        (["run", "{cfg}", "--set", "tiles.sise=4"], "unknown config key 'tiles.sise'"),
        (["run", "{cfg}", "--set", "slides={tmp}/missing.csv"], "missing.csv"),
        (["run", "{cfg}", "--set", "ssim.threshold=abc"], "'ssim.threshold' must be a number"),
        (["config", "--set", "cluster.kind=mars"], "'cluster.kind' = 'mars' is invalid"),
        (["info", "{tmp}/nothing.tif"], "nothing.tif"),
        (["ingest", "{tmp}/nothing.png"], "nothing.png"),
    ],
)
def test_bad_input_one_line_exit_2(argv, message, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"slides: {tmp_path / 'm.csv'}\noutput_dir: {tmp_path / 'o'}\n")
    argv = [a.format(cfg=cfg, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("daskpath: error: ")
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_config_prints_merged_yaml(capsys):
    assert main(["config", "--set", "tiles.size=2048"]) == 0
    out = capsys.readouterr().out
    assert "size: 2048" in out and "threshold: 0.4" in out
