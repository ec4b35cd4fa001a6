"""CLI conventions: help and defaults, -q/-v anywhere, `cluster --print CONFIG` without a
scheduler, progress without a terminal, quiet third-party chatter, a closed pipe, rounded tables,
the report's legend and tile ticks."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daskpath import _logging as dlog
from daskpath.cli import _HelpFormatter, _verbosity, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "daskpath"  # the console script users run
DASKPATH = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "daskpath.cli"]
# what must never reach a log file: progress-bar control characters, native chatter
CONTROL = re.compile(r"[\r\x1b]")
CHATTER = re.compile(r"absl|oneDNN|port\.cc|cpu_feature_guard|^[IW]\d{4} |VIPS|tensorflow",
                     re.IGNORECASE | re.MULTILINE)


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures logging for a process; put it back for the other tests."""
    names = ["", "daskpath", *dlog.CHATTY_LOGGERS]
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_daskpath_cli", False):
            root.removeHandler(h)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


# ------------------------------------------------------------------------------- help / defaults
def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    fmt = _HelpFormatter("daskpath")
    parsers = {"daskpath": parser, **_subparsers(parser)}
    assert {"synth", "ingest", "info", "run", "demo", "train", "config", "cluster"} <= set(parsers)
    for name, p in parsers.items():
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {'/'.join(a.option_strings) or a.dest}"
            assert a.help, f"{what} has no help text"
            if a.option_strings and a.nargs != 0 and a.default is not argparse.SUPPRESS:
                assert "default" in fmt._get_help_string(a), f"{what} does not show its default"


def test_help_of_every_command_shows_defaults(capsys):
    for cmd in ("synth", "run", "demo", "cluster", "ingest"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "(default: " in out and "-v, --verbose" in out and "-q, --quiet" in out, cmd
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "(default: 4096 4096)" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------ -q / -v
@pytest.mark.parametrize(
    ("argv", "verbosity"),
    [
        (["run", "c.yaml"], 0),
        (["-q", "run", "c.yaml"], -1),
        (["run", "c.yaml", "-q"], -1),
        (["run", "-q", "c.yaml"], -1),
        (["-v", "run", "c.yaml"], 1),
        (["run", "c.yaml", "-v"], 1),
        (["-v", "run", "c.yaml", "-v"], 2),
        (["run", "c.yaml", "-vv"], 2),
        (["cluster", "slurm", "--print", "c.yaml", "-v"], 1),
        (["config", "--quiet"], -1),
        (["train", "-v", "stardist", "--", "--epochs", "1"], 1),
    ],
)
def test_quiet_and_verbose_anywhere(argv, verbosity):
    args = build_parser().parse_args(argv)
    assert _verbosity(args) == verbosity


def test_verbose_after_the_command_reaches_logging(capsys):
    assert main(["config", "-q"]) == 0
    assert logging.getLogger("daskpath").getEffectiveLevel() == logging.WARNING
    assert main(["config", "-v"]) == 0
    assert logging.getLogger("daskpath").getEffectiveLevel() == logging.DEBUG


def test_v_shows_daskpath_debug_not_third_party_debug(capsys):
    dlog.setup_logging(1)
    logging.getLogger("daskpath.pipeline").debug("our debug line")
    for name in ("matplotlib", "numcodecs", "fsspec", "asyncio"):
        logging.getLogger(name).debug("their debug line")
        logging.getLogger(name).info("their info line")
    logging.getLogger("pyvips").info("VIPS: threadpool completed with 2 workers")
    err = capsys.readouterr().err
    assert "our debug line" in err
    assert "their" not in err
    assert "pyvips: info: VIPS: threadpool completed" in err  # chatter shown with -v
    dlog.setup_logging(0)
    logging.getLogger("pyvips").info("VIPS: threadpool completed with 2 workers")
    logging.getLogger("tensorflow").warning("5 out of the last 5 calls triggered retracing")
    logging.getLogger("daskpath.pipeline").debug("our debug line")
    logging.getLogger("daskpath.pipeline").info("slide a: preprocess computed")
    assert capsys.readouterr().err == "slide a: preprocess computed\n"


# ------------------------------------------------------------------------- native chatter
CHATTY_BYTES = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796025368.027790   19257 port.cc:153] oneDNN custom operations are on. You may "
    b"see slightly different numerical results\n"
    b"W0000 00:00:1796025368.1   19257 cuda_executor.cc:1] no GPU\n"
    b"E0000 00:00:1796025368.2   19257 real.cc:7] a real error\n"
    b"something else\n"
)


def test_native_chatter_dropped_around_imports(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with dlog.quiet_native_stderr():
        os.write(2, CHATTY_BYTES)
    err = capfd.readouterr().err
    assert err == ("E0000 00:00:1796025368.2   19257 real.cc:7] a real error\nsomething else\n")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # what -v sets: everything shown
    with dlog.quiet_native_stderr():
        os.write(2, CHATTY_BYTES)
    assert capfd.readouterr().err == CHATTY_BYTES.decode()


def test_chatter_env_set_for_workers_and_restored(monkeypatch):
    for k in dlog.QUIET_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(dlog, "_USER_ENV", {})
    with dlog.chatter_env(0):
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
        assert not dlog.native_chatter_shown()
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    with dlog.chatter_env(1):
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
        assert dlog.native_chatter_shown()
    # the user's own setting wins
    monkeypatch.setattr(dlog, "_USER_ENV", {"TF_CPP_MIN_LOG_LEVEL": "1"})
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    with dlog.chatter_env(1):
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


def test_worker_preload_quiets_chatty_loggers(monkeypatch):
    """What ``daskpath.cluster.dask_setup`` runs in each worker: levels from the environment."""
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    dlog.quiet_chatty_loggers()
    assert all(logging.getLogger(n).level == logging.ERROR for n in dlog.CHATTY_LOGGERS)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    dlog.quiet_chatty_loggers()
    assert logging.getLogger("pyvips").level == logging.INFO


# ------------------------------------------------------------------------------ cluster --print
@pytest.fixture
def no_scheduler(monkeypatch):
    """Starting a Dask scheduler (or a jobqueue cluster, which starts one) fails the test."""
    import distributed

    def boom(*a, **k):
        raise AssertionError("rendering must not start a scheduler")

    monkeypatch.setattr(distributed.Scheduler, "__init__", boom)
    monkeypatch.setattr(distributed.LocalCluster, "__init__", boom)
    try:
        import dask_jobqueue

        monkeypatch.setattr(dask_jobqueue.SLURMCluster, "__init__", boom)
    except ImportError:
        pass


def test_cluster_slurm_print_config_as_documented(tmp_path, capsys, no_scheduler):
    pytest.importorskip("dask_jobqueue")
    cfg = tmp_path / "my.yaml"
    cfg.write_text("cluster:\n  slurm:\n    queue: a100\n    gpus: 2\n")
    assert main(["cluster", "slurm", "--print", str(cfg)]) == 0  # the README's form
    out = capsys.readouterr().out
    assert out.startswith("#!/usr/bin/env bash")
    assert "#SBATCH -p a100" in out and "#SBATCH --gres=gpu:2" in out
    assert "tcp://SCHEDULER_HOST:PORT" in out
    # the config before --print, and --set after it, work too
    assert main(["cluster", "slurm", str(cfg), "--print", "--set", "cluster.slurm.queue=h100"]) == 0
    assert "#SBATCH -p h100" in capsys.readouterr().out


def test_cluster_kubernetes_print_config_as_documented(tmp_path, capsys, no_scheduler):
    import yaml

    cfg = tmp_path / "my.yaml"
    cfg.write_text("cluster:\n  kubernetes:\n    image: reg.example/daskpath:2\n")
    assert main(["cluster", "kubernetes", "--print", str(cfg)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs[0]["kind"] == "DaskCluster"
    assert docs[0]["spec"]["worker"]["spec"]["containers"][0]["image"] == "reg.example/daskpath:2"


def test_cluster_print_two_configs_is_bad_input(tmp_path, capsys):
    assert main(["cluster", "slurm", "a.yaml", "--print", "b.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daskpath: error: two configs given") and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------- broken pipe
def test_closed_stdout_pipe_exits_quietly():
    p = subprocess.Popen([*DASKPATH, "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT)
    p.stdout.close()  # the reader (`| head`) has gone before anything is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141
    assert err == ""


# ----------------------------------------------------------------------- progress without a TTY
def test_progress_lines_without_a_terminal(caplog, monkeypatch):
    from daskpath import runner

    monkeypatch.setenv("DASKPATH_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="daskpath.pipeline"):
        prog = runner._Progress(True, total=2, interactive=False)
        assert prog.bars is None and prog.lines
        prog.chunks(10, 0)
        prog.chunks(0, 4)
        prog.slide("a")
        prog.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1] == ("progress: 1 of 2 slide(s) done; 4 of the 10 chunk task(s) submitted so far "
                         "finished")
    monkeypatch.setenv("DASKPATH_PROGRESS_INTERVAL", "3600")
    caplog.clear()
    prog = runner._Progress(True, total=2, interactive=False)
    prog.chunks(10, 10)
    assert not caplog.records  # at most one line per interval


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from daskpath import runner

    assert runner._Progress(True, total=1).bars is None  # pytest's stderr is not a terminal
    prog = runner._Progress(True, total=1, interactive=True)
    try:
        assert prog.bars is not None and not prog.lines
    finally:
        prog.close()
    assert runner._Progress(False, total=1).bars is None
    assert not runner._Progress(False, total=1).lines


# --------------------------------------------------------------------- messages and tables
def test_resume_lines_say_what_happens():
    from daskpath.runner import _change_line, _resume_line

    assert _resume_line("a", "preprocess", 4, 64) == (
        "slide a: preprocess: resuming: 4 of 64 chunks were computed by an earlier run; "
        "computing the other 60")
    line = _resume_line("a", "preprocess", 64, 64)
    assert "all 64 chunks were computed by an earlier run" in line and "already" not in line
    assert _change_line("a", ["preprocess"], [], False, [], overwrite=True) == (
        "slide a: preprocess recomputed (overwrite: true)")


def _tiles(fractions, ssim=0.6, size=512):
    n = len(fractions)
    return pd.DataFrame({
        "slide": "s", "y0": 0, "x0": np.arange(n) * size, "height": size, "width": size,
        "tissue_fraction": fractions, "ssim": ssim,
        "keep": [f >= 0.5 and ssim >= 0.4 for f in fractions],
    })


def test_no_tissue_note_agrees_with_the_tissue_area():
    from daskpath.config import load_config
    from daskpath.stages.preprocess import summarize_slide

    cfg = load_config(None, ["tiles.size=512"])
    scattered = summarize_slide(_tiles([0.3, 0.4]), cfg, 0.49797074999999996)
    assert scattered["tissue_area_px"] == round(0.7 * 512 * 512)
    assert isinstance(scattered["tissue_area_px"], int)
    assert "no tissue found" not in scattered["note"]
    assert "tiles.min_tissue (0.5)" in scattered["note"]
    empty = summarize_slide(_tiles([0.0, 0.0]), cfg, 0.5)
    assert empty["tissue_area_px"] == 0 and "no tissue found" in empty["note"]
    dissimilar = summarize_slide(_tiles([0.9, 0.9], ssim=0.1), cfg, 0.5)
    assert "ssim.threshold" in dissimilar["note"]


def test_numbers_rounded_for_people():
    from daskpath.outputs import format_number, round_floats

    df = pd.DataFrame({"mpp": [0.49797074999999996], "n": [3], "ssim": [0.534548123456],
                       "mm2": [np.nan]})
    text = round_floats(df).to_csv(index=False)
    assert text == "mpp,n,ssim,mm2\n0.497971,3,0.534548,\n"
    assert [format_number(v) for v in (0.49797, 367769.0, 0.000412345, 12.3456, 1.0)] == [
        "0.498", "367769", "0.000412", "12.346", "1"]


# ---------------------------------------------------------------------- a run through main()
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One preprocess run of a 1024x1536 phantom pair through main(), stderr not a terminal."""
    from daskpath.synthetic import make_cohort

    tmp = tmp_path_factory.mktemp("conv")
    manifest = make_cohort(tmp / "s", pairs=1, size=(1024, 1536), seed=3)
    cfg = tmp / "c.yaml"
    cfg.write_text(
        f"slides: {manifest}\noutput_dir: {tmp / 'o'}\nstages: [preprocess]\ntiles:\n  size: 512\n"
        "cluster:\n  n_workers: 1\n  threads_per_worker: 2\n  dashboard_address: '127.0.0.1:0'\n"
    )
    return cfg, tmp / "o"


def test_run_without_terminal_tables_and_stderr(small_run, capsys, monkeypatch):
    cfg, out = small_run
    monkeypatch.setenv("DASKPATH_PROGRESS_INTERVAL", "0")
    assert main(["run", str(cfg), "--set", "overwrite=true"]) == 0
    cap = capsys.readouterr()
    assert not CONTROL.search(cap.err), cap.err
    assert "progress: " in cap.err
    # printed table: no 17-digit floats, whole numbers without decimals
    assert not re.search(r"\d\.\d{4,}", cap.out), cap.out
    csv = (out / "slides.csv").read_text()
    assert not re.search(r"\d\.\d{7,}", csv), csv
    slides = pd.read_csv(out / "slides.csv")
    assert slides["tissue_area_px"].dtype.kind == "i"


def test_report_figure_has_legend_and_integer_tile_ticks(small_run, monkeypatch):
    from daskpath import report
    from daskpath.config import load_config
    from daskpath.publish import slide_key

    cfg_path, out = small_run
    if not (out / "tiles.parquet").exists():
        assert main(["-q", "run", str(cfg_path), "--no-progress"]) == 0
    cfg = load_config(cfg_path)
    tiles = pd.read_parquet(out / "tiles.parquet")
    figs = []
    monkeypatch.setattr(report, "_png", lambda fig: figs.append(fig) or "png")
    monkeypatch.setattr(report, "_fig_jpeg", lambda fig: figs.append(fig) or "jpeg")
    slide = tiles["slide"].iloc[0]
    chosen = tiles.iloc[:0]  # no gallery tiles to number
    assert report._slide_figure(slide, tiles, out / "layers" / f"{slide_key(slide)}.zarr", cfg,
                                chosen)
    tiles = tiles.assign(ratio_ihc=np.linspace(0, 1, len(tiles)))
    assert report._ratio_maps(slide, tiles, cfg)
    thumbs, ratios = figs
    legend = thumbs.axes[0].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == 3
    assert labels[0].startswith("kept") and labels[1].startswith("tissue, SSIM <")
    assert "background" in labels[2]
    for ax in (thumbs.axes[2], ratios.axes[0]):  # the SSIM map, a ratio map
        for ticks in (ax.get_xticks(), ax.get_yticks()):
            assert np.allclose(ticks, np.round(ticks)), ticks
        assert ax.get_xlabel() == "tile x" and ax.get_ylabel() == "tile y"


# ------------------------------------------------------------- a real run's stderr, a subprocess
@pytest.mark.slow
def test_run_stderr_in_a_log_file_is_clean(tmp_path):
    """`daskpath run` with stderr a file: no progress-bar control characters, no TensorFlow /
    absl / oneDNN / libvips lines (the nuclei stage imports TensorFlow in the workers; the PNG
    pair is ingested through libvips), progress as plain lines."""
    pytest.importorskip("stardist")
    from daskpath.synthetic import make_cohort

    manifest = make_cohort(tmp_path / "s", pairs=1, size=(1024, 1024), seed=5, layout="png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"slides: {manifest}\noutput_dir: {tmp_path / 'o'}\nstages: [preprocess, nuclei]\n"
        "tiles:\n  size: 512\n"
        "cluster:\n  n_workers: 1\n  threads_per_worker: 2\n  dashboard_address: '127.0.0.1:0'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in dlog.QUIET_ENV}
    env["DASKPATH_PROGRESS_INTERVAL"] = "0"
    with open(tmp_path / "stderr.log", "w") as err_file:
        proc = subprocess.run([*DASKPATH, "run", str(cfg)], stdout=subprocess.PIPE,
                              stderr=err_file, stdin=subprocess.DEVNULL, text=True, cwd=tmp_path,
                              env=env, timeout=600, check=False)
    err = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "flat raster(s) on the cluster" in err  # libvips ran, on the workers
    assert "nuclei" in err and "progress: " in err
    assert not CONTROL.search(err), repr(err[-2000:])
    assert not CHATTER.search(err), err
