"""Dask clusters: a local one by default, or an existing scheduler.

The dashboard binds to localhost unless the config says otherwise; its link is logged at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from daskpath.config import ClusterConfig
from daskpath.errors import ConfigError, DaskpathError

__all__ = ["connect", "local_cluster_kwargs"]

log = logging.getLogger(__name__)


def local_cluster_kwargs(cfg: ClusterConfig, n_cores: int | None = None) -> dict:
    """Keyword arguments for :class:`distributed.LocalCluster` from the config.

    Default sizing: one worker process per 2 cores (at least 1) with the remaining cores as
    threads, so numpy/scipy kernels that release the GIL keep every core busy while a process
    boundary isolates memory.
    """
    cores = n_cores or os.cpu_count() or 1
    n_workers = cfg.n_workers or max(1, cores // 2)
    threads = cfg.threads_per_worker or max(1, cores // n_workers)
    return {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": True,
        "memory_limit": cfg.memory_limit,
        "dashboard_address": cfg.dashboard_address,
        "host": "127.0.0.1",
    }


def quiet_distributed(level: int | None = None) -> None:
    """Keep distributed's own logging to errors (its teardown chatter is not for users).

    ``daskpath -vv`` keeps its INFO messages.
    """
    root = logging.getLogger("daskpath")
    if level is None:
        level = logging.INFO if root.getEffectiveLevel() <= logging.DEBUG - 5 else logging.ERROR
    for name in ("distributed", "tornado", "bokeh"):
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def connect(cfg: ClusterConfig, scheduler: str | None = None) -> Iterator:
    """Yield a :class:`distributed.Client` for the configured cluster; closes what it started.

    Parameters
    ----------
    cfg : ClusterConfig
        ``kind`` is ``local`` (start a LocalCluster) or ``address`` (connect to ``address``).
    scheduler : str, optional
        An existing scheduler address; overrides ``cfg`` (the CLI's ``--scheduler``).
    """
    from distributed import Client, LocalCluster

    quiet_distributed()
    address = scheduler or (cfg.address if cfg.kind == "address" else None)
    if cfg.kind == "address" and not address:
        raise ConfigError("cluster.kind is 'address' but cluster.address is empty; set it or pass --scheduler")
    if address:
        try:
            client = Client(address, timeout="20s")
        except OSError as e:
            raise DaskpathError(
                f"cannot reach the Dask scheduler at {address}; start it or fix the address ({e})"
            ) from e
        log.info("connected to scheduler %s, dashboard: %s", address, client.dashboard_link)
        try:
            yield client
        finally:
            client.close()
        return
    kwargs = local_cluster_kwargs(cfg)
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        log.info(
            "local cluster: %d workers x %d threads, dashboard: %s",
            kwargs["n_workers"],
            kwargs["threads_per_worker"],
            client.dashboard_link,
        )
        yield client
