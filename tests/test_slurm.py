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


def test_cohort_script_scheduler_accepts_only_tls(slurm, tmp_path):
    """cluster/slurm/run-cohort.sbatch with DASKPATH_TLS_DIR: the scheduler it starts (bound to
    the node's address, here loopback) speaks only TLS; a plain or foreign client is refused, and
    the driver, with cluster.security from the script, finishes the run."""
    import asyncio

    from distributed import Client
    from distributed.security import Security

    from daskpath.config import load_config
    from daskpath.security import make_tls, security_from_config
    from daskpath.synthetic import make_cohort

    manifest = make_cohort(tmp_path / "slides", pairs=1, size=(1024, 1024), seed=3)
    tls = tmp_path / "tls"
    make_tls(tls)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"slides: {manifest}\noutput_dir: {tmp_path / 'out'}\nstages: [preprocess]\n")
    work = tmp_path / "job"
    env = {**os.environ, "DASKPATH_VENV": sys.prefix, "DASKPATH_WORKER": "cpu",
           "DASKPATH_SCHEDULER_HOST": "127.0.0.1", "DASKPATH_TLS_DIR": str(tls),
           "DASKPATH_WORK": str(work)}
    script = ROOT / "cluster" / "slurm" / "run-cohort.sbatch"
    job = subprocess.run(
        ["sbatch", "--parsable", "--partition=debug", "--nodes=1", "--gres=none",
         "--cpus-per-task=2", "--mem=4G", "--time=00:10:00", f"--output={tmp_path / 'job.out'}",
         str(script), str(cfg)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    sched_file = work / "scheduler.json"
    for _ in range(180):
        if sched_file.is_file() and sched_file.stat().st_size:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no scheduler file; job output: {(tmp_path / 'job.out').read_text()[-800:]}")
    import json

    address = json.loads(sched_file.read_text())["address"]
    assert address.startswith("tls://127.0.0.1:"), address  # TLS, and loopback only

    sec = security_from_config(load_config(
        None, ["cluster.security.kind=tls", f"cluster.security.dir={tls}"]).cluster.security)

    async def probe() -> dict[str, str]:
        out = {}
        for name, addr, security in (("plain", "tcp://" + address.split("://", 1)[1], None),
                                     ("foreign", address, Security.temporary()),
                                     ("ours", address, sec)):
            try:
                async with Client(addr, asynchronous=True, timeout="5s", security=security) as c:
                    out[name] = "connected" if await c.run_on_scheduler(lambda: 1) == 1 else "?"
            except Exception as e:  # noqa: BLE001 - any refusal
                out[name] = f"refused ({type(e).__name__})"
        return out

    seen = asyncio.run(probe())
    assert seen["plain"].startswith("refused") and seen["foreign"].startswith("refused"), seen
    assert seen["ours"] == "connected", seen
    for _ in range(600):
        q = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout
        if not q.strip():
            break
        time.sleep(0.5)
    text = (tmp_path / "job.out").read_text()
    assert (tmp_path / "out" / "tiles.parquet").is_file(), text[-1500:]
