"""A real SLURM: the pipeline with ``cluster.kind: slurm``, its workers SLURM jobs on loopback.

``.ci/slurm-setup.sh`` installs Debian's slurm-wlm + munge (first time only) and starts a one-node
slurmctld + slurmd on 127.0.0.1. The test skips, saying why, only where SLURM cannot be started
(not root, no apt, daemons refuse to start).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / ".ci" / "slurm-setup.sh"


@pytest.fixture(scope="session")
def slurm():
    """Start (or find running) a single-node SLURM; skip with the script's reason if impossible."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue missing: pip install 'daskpath[slurm]'")
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("SLURM test needs Linux with bash")
    try:
        proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("cannot start SLURM: .ci/slurm-setup.sh took more than 300 s")
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        pytest.skip(f"cannot start SLURM (.ci/slurm-setup.sh exit {proc.returncode}): {tail}")
    if shutil.which("sbatch") is None:
        pytest.skip("cannot start SLURM: sbatch not on PATH after setup")
    return True


def _overrides(manifest: Path, out: Path) -> list[str]:
    return [
        f"slides={manifest}",
        f"output_dir={out}",
        "overwrite=true",
        "cluster.dashboard_address=127.0.0.1:0",
    ]


def _wait_for_slurm_workers(client, n: int, timeout: float, logs: Path) -> None:
    """Wait for ``n`` workers; on timeout fail with what SLURM says (job states, reasons, logs)."""
    from distributed.exceptions import WorkerStartTimeoutError

    try:
        client.wait_for_workers(n, timeout=timeout)
    except (TimeoutError, WorkerStartTimeoutError) as err:
        squeue = subprocess.run(["squeue", "-h", "-o", "%i %T %r %C %m"],
                                capture_output=True, text=True).stdout.strip()
        node = subprocess.run(["scontrol", "show", "node", "localhost"],
                              capture_output=True, text=True).stdout
        cfg = " ".join(w for w in node.split() if w.split("=")[0] in
                       ("CPUTot", "CPUAlloc", "RealMemory", "AllocMem", "State", "Reason"))
        tails = []
        for f in sorted(logs.glob("*.err"))[-2:]:
            tails.append(f"{f.name}: " + " | ".join(f.read_text().strip().splitlines()[-3:]))
        pytest.fail(f"{err}; squeue: {squeue!r}; node: {cfg}; logs: {tails}")


def test_pipeline_on_slurm_equals_local(slurm, tmp_path):
    from daskpath.cluster import connect
    from daskpath.config import load_config
    from daskpath.pipeline import run
    from daskpath.synthetic import make_cohort

    manifest = make_cohort(tmp_path / "slides", pairs=1, size=(2048, 2048), seed=7)

    local_cfg = load_config(None, _overrides(manifest, tmp_path / "local") + [
        "cluster.n_workers=1", "cluster.threads_per_worker=2"])
    local = run(local_cfg)
    assert local.ok

    logs = tmp_path / "slurm-logs"
    slurm_cfg = load_config(None, _overrides(manifest, tmp_path / "slurm") + [
        "cluster.kind=slurm",
        "cluster.slurm.cores=1",
        "cluster.slurm.memory=6GiB",  # a worker holds TensorFlow + torch + a 2176-px window (~2.5 GB)
        "cluster.slurm.jobs=2",
        "cluster.slurm.walltime=00:15:00",
        f"cluster.slurm.python={sys.executable}",
        f"cluster.slurm.log_directory={logs}",
        f"cluster.local_directory={tmp_path / 'scratch'}",
        "cluster.startup_timeout=120",
    ])
    t0 = time.perf_counter()
    with connect(slurm_cfg.cluster) as client:
        _wait_for_slurm_workers(client, 2, timeout=240, logs=logs)
        # the workers are SLURM jobs: each sees its own job id, and squeue lists them running
        job_ids = set(client.run(lambda: os.environ.get("SLURM_JOB_ID")).values())
        assert None not in job_ids and len(job_ids) == 2, job_ids
        squeue = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True)
        running = {line.split()[0] for line in squeue.stdout.splitlines() if "RUNNING" in line}
        assert job_ids <= running, (job_ids, squeue.stdout)
        res = run(slurm_cfg, client=client)
    seconds = time.perf_counter() - t0
    assert res.ok, res.failures
    print(f"\nSLURM run: {len(res.tiles)} tiles on jobs {sorted(job_ids)} in {seconds:.1f} s")

    got = pd.read_parquet(tmp_path / "slurm" / "tiles.parquet")
    want = pd.read_parquet(tmp_path / "local" / "tiles.parquet")
    assert len(want) > 0
    pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-9, rtol=0)
    assert any(logs.glob("*.err")) or any(logs.glob("*.out"))

    # the jobs end with the cluster
    for _ in range(30):
        q = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
        if not (job_ids & set(q.split())):
            break
        time.sleep(1)
    else:
        pytest.fail(f"SLURM jobs {job_ids} still queued after the cluster closed")
