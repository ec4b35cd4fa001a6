"""Faults and monitoring: a worker killed mid-run, performance report, Prometheus counters."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import pandas as pd
import pytest

from daskpath.config import load_config
from daskpath.pipeline import run


def _cfg(manifest, out, *extra):
    return load_config(None, [f"slides={manifest}", f"output_dir={out}", "stages=[preprocess]", *extra])


@pytest.fixture(scope="module")
def reference(synth_cohort, dask_client, tmp_path_factory):
    return run(_cfg(synth_cohort, tmp_path_factory.mktemp("ref")), client=dask_client).tiles


@pytest.mark.slow
def test_worker_killed_mid_run_does_not_change_results(synth_cohort, reference, tmp_path):
    from distributed import Client, LocalCluster

    out = tmp_path / "out"
    cfg = _cfg(synth_cohort, out, "chunk_size=512")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1"
    ) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        result: dict = {}

        def target():
            result["res"] = run(cfg, client=client)

        th = threading.Thread(target=target)
        th.start()
        deadline = time.time() + 120
        killed = None
        while time.time() < deadline and th.is_alive():
            n = len(list(out.glob(".daskpath/work/*/*/chunks/*.npz")))
            if n >= 6:  # ~20% of the 32 chunks done: kill a worker while others are in flight
                killed = next(iter(pids.values()))
                os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.05)
        th.join(300)
        assert killed is not None, "the run finished before a worker could be killed"
        res = result["res"]
    assert res.ok, res.failures
    pd.testing.assert_frame_equal(res.tiles, reference, check_exact=False, atol=1e-6)


def test_performance_report_and_prometheus_counters(synth_cohort, dask_client, tmp_path):
    report = tmp_path / "perf.html"
    res = run(_cfg(synth_cohort, tmp_path / "o"), client=dask_client, performance_report=report)
    assert res.ok
    assert report.exists() and "Dask Performance Report" in report.read_text()[:5000]
    info = dask_client.scheduler_info(n_workers=-1)
    total = 0.0
    for addr, w in info["workers"].items():
        port = w["services"]["dashboard"]
        host = addr.split("://")[1].rsplit(":", 1)[0]
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("daskpath_chunks_processed_total"):
                total += float(line.split()[-1])
    assert total >= 2  # both slides' chunks were counted on the workers
