"""SIGTERM and SIGINT on a real ``daskpath run`` (a subprocess with its own local cluster).

SLURM sends SIGTERM on ``scancel`` and at the time limit, to every process of the job step; a
terminal sends Ctrl-C's SIGINT to its whole foreground process group. Either way the run must stop
with one line on stderr (no traceback, no asyncio or multiprocessing warnings), exit 128 + signal,
leave no process behind, and keep its finished chunks: the same command then resumes and ends
with the tables of an uninterrupted run.

Each run gets its own session (``start_new_session``), so the test can signal the driver alone or
its whole process group (driver, worker processes, multiprocessing's resource tracker) without
touching pytest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")

INTERRUPTED = "interrupted: rerun the same command to resume"
#: What must never reach stderr of an interrupted run.
NOISE = ("Traceback", "leaked semaphore", "Task exception was never retrieved",
         "Task was destroyed", "Exception ignored")
N_CHUNKS = 2 * 16  # 2 slides of 2048^2 px in 512^2 chunks
SIGNAL_AFTER = 4  # chunk records: the run is well under way, far from done
TIMEOUT = 240  # s, a loaded 2-core machine


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from daskpath.synthetic import make_cohort

    return make_cohort(tmp_path_factory.mktemp("signals-cohort"), pairs=2, size=(2048, 2048),
                       seed=5)


def _config(cohort: Path, out: Path) -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(
        f"slides: {cohort}\n"
        f"output_dir: {out}\n"
        "stages: [preprocess]\n"
        "chunk_size: 512\n"
        "tiles:\n  size: 512\n"
        "cluster:\n  n_workers: 2\n  threads_per_worker: 1\n  dashboard_address: null\n"
    )
    return path


# The console script's code, except that SIGINT gets Python's default handler: a shell that runs
# pytest in the background makes its children ignore SIGINT, and `daskpath` keeps an ignored
# SIGINT ignored (as a background job should).
_DASKPATH = ("import signal, sys\n"
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "from daskpath.cli import main\n"
             "sys.exit(main())\n")


def _command(config: Path) -> list[str]:
    return [sys.executable, "-c", _DASKPATH, "run", str(config)]


def _run(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command(config), capture_output=True, text=True, timeout=TIMEOUT,
                          start_new_session=True)


def _chunk_records(out: Path) -> int:
    # rglob also walks hidden folders (output_dir/.daskpath/work/...); the run renames folders
    # (e.g. layers.zarr.creating -> layers.zarr) while this walks them: a walk that loses one
    # is repeated
    for _ in range(100):
        try:
            return sum(1 for _ in out.rglob("chunks/*.npz"))
        except FileNotFoundError:
            continue
    return 0


def _group_gone(pgid: int, timeout: float = 30) -> bool:
    """True once no process of the group is left (workers, resource tracker)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _tiles(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "tiles.parquet")
    keys = [c for c in df.columns if not pd.api.types.is_float_dtype(df[c])]
    return df.sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> pd.DataFrame:
    """tiles.parquet of an uninterrupted run."""
    out = tmp_path_factory.mktemp("signals-reference") / "out"
    res = _run(_config(cohort, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return _tiles(out)


def _stop_signal_handlers() -> tuple[str, str]:
    h = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    return tuple(getattr(x, "__name__", str(x)) for x in h)


def test_local_workers_leave_stop_signals_to_the_driver():
    """connect()'s worker processes ignore SIGINT and outlive SIGTERM: the driver stops them."""
    from daskpath.cluster import connect
    from daskpath.config import load_config

    cfg = load_config(None, ["cluster.n_workers=1", "cluster.threads_per_worker=1",
                             "cluster.dashboard_address=null"]).cluster
    with connect(cfg) as client:
        handlers = list(client.run(_stop_signal_handlers).values())
    assert handlers == [(str(signal.SIG_IGN), "_exit_later")]


@pytest.mark.slow  # two runs each (interrupted, resumed): 26-50 s per test on 2 shared cores
@pytest.mark.parametrize(
    ("sig", "group", "status"),
    [
        (signal.SIGTERM, False, 143),
        (signal.SIGINT, False, 130),
        (signal.SIGTERM, True, 143),  # SLURM: every process of the job step gets it
    ],
    ids=["sigterm", "sigint", "sigterm-process-group"],
)
def test_signal_stops_quietly_and_the_rerun_resumes(cohort, reference, tmp_path, sig, group,
                                                    status):
    out = tmp_path / "out"
    config = _config(cohort, out)
    log = tmp_path / "stderr.txt"  # a file, not a pipe nobody reads while the run goes on
    with log.open("w") as stderr:
        proc = subprocess.Popen(_command(config), stdout=subprocess.DEVNULL, stderr=stderr,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while _chunk_records(out) < SIGNAL_AFTER:
            assert proc.poll() is None, f"run ended before the signal:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no chunk records appeared"
            time.sleep(0.05)
        (os.killpg if group else os.kill)(proc.pid, sig)
        proc.wait(timeout=120)
        err = log.read_text()
        assert proc.returncode == status, err[-3000:]
        assert err.count(INTERRUPTED) == 1, err[-3000:]
        for noise in NOISE:
            assert noise not in err, err[-3000:]
        assert _group_gone(proc.pid), "processes of the interrupted run are still alive"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < _chunk_records(out) < N_CHUNKS  # finished chunks kept, the run was cut short

    rerun = _run(config)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr, rerun.stderr[-3000:]
    pd.testing.assert_frame_equal(_tiles(out), reference, check_exact=False, rtol=0, atol=1e-9)
