"""Shared fixtures: synthetic slides made once per session, one local process cluster."""

from __future__ import annotations

import os

import dask
import pytest


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory):
    """Two 2048x2048 phantom pairs (tiled JPEG TIFF) and their manifest."""
    from daskpath.synthetic import make_cohort

    out = tmp_path_factory.mktemp("synth")
    manifest = make_cohort(out, pairs=2, size=(2048, 2048), seed=7)
    return manifest


@pytest.fixture(scope="session")
def dask_client():
    """A LocalCluster with 2 worker *processes*: what users run, pickling included."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1"
    ) as cluster, Client(cluster) as client:
        from daskpath.cluster import warm_imports

        client.run(warm_imports)  # as the preload of daskpath's own clusters does
        yield client


@pytest.fixture(autouse=True)
def _reset_dask_config():
    """Each test starts from the same dask config."""
    with dask.config.set({}):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests: on a shared 2-core runner more threads
    spin and run up to 10x slower. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ skips in CI
#: With DASKPATH_STRICT_SKIPS=1 (CI, where every extra but ``gpu`` is installed) a skipped test
#: fails unless it carries the ``gpu`` marker: a missing package or service cannot hide a test.
STRICT_SKIPS = os.environ.get("DASKPATH_STRICT_SKIPS", "") not in ("", "0")


def _strict(report, gpu: bool) -> None:
    if STRICT_SKIPS and report.skipped and not gpu and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped, but DASKPATH_STRICT_SKIPS allows skips only for tests marked "
                           f"gpu: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict(outcome.get_result(), item.get_closest_marker("gpu") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole module here
    _strict(outcome.get_result(), False)
