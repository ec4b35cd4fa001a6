"""Dask clusters: local, local GPU (dask-cuda), SLURM (dask-jobqueue), Kubernetes (dask-kubernetes
operator), or an existing scheduler.

``cluster.kind`` picks one (see ``configs/default.yaml`` and ``cluster/README.md``):

``local``
    A :class:`distributed.LocalCluster` sized to the machine.
``local-cuda``
    dask-cuda's ``LocalCUDACluster``: one worker process per GPU, each declaring the resource
    ``GPU=1`` (so model tasks annotated with :func:`model_annotations` run there, one at a time per
    GPU), **plus** ``cluster.n_workers`` CPU-only worker processes added to the same scheduler for
    the CPU stages (reading, tissue, SSIM, reductions). CPU tasks carry no resource annotation, so
    they may also use spare threads of the GPU workers (``cluster.cuda.threads_per_worker``).
``slurm``
    dask-jobqueue's ``SLURMCluster``: the scheduler runs in this process (bound to
    ``cluster.scheduler_host``), workers are SLURM jobs. With ``cluster.slurm.gpus: N`` each job asks
    for ``--gres=gpu:N`` and runs one dask-cuda worker per GPU, each with ``GPU=1``.
``kubernetes``
    dask-kubernetes' operator ``KubeCluster`` from the spec of :func:`kubernetes_manifests`
    (CPU workers in the default group, a GPU worker group with ``nvidia.com/gpu`` limits).
``address``
    An existing scheduler (``cluster.address`` or ``--scheduler``).

The dashboard and a scheduler that daskpath starts bind to 127.0.0.1 unless configured
(``cluster.dashboard_address``, ``cluster.scheduler_host``, ``cluster.interface``); the dashboard
link is logged at start.

Interrupts: the worker processes of a local cluster (``local``, ``local-cuda``) load this module
as a Dask preload (:func:`dask_setup`): a SIGINT or SIGTERM sent to the whole process group (Ctrl-C
in a terminal; SLURM on ``scancel`` or at the time limit) stops the driver, which then closes them.
A ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM through the ``daskpath`` CLI) inside :func:`connect`
closes the client, then the cluster, quickly and quietly (no teardown chatter from distributed,
tornado or asyncio) and propagates.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from daskpath.config import ClusterConfig
from daskpath.errors import ConfigError, DaskpathError

__all__ = [
    "check_runnable",
    "connect",
    "gpu_resources",
    "kubernetes_manifests",
    "local_cluster_kwargs",
    "local_cuda_cluster_kwargs",
    "manifests_yaml",
    "model_annotations",
    "slurm_cluster_kwargs",
    "slurm_job_script",
]

log = logging.getLogger(__name__)

GPU = "GPU"  # the worker resource name GPU workers declare and model tasks ask for


# --------------------------------------------------------------------------------------- sizing
def _security(cfg: ClusterConfig) -> Any:
    """``distributed.security.Security`` of ``cluster.security`` (None: plain tcp)."""
    from daskpath.security import security_from_config

    return security_from_config(cfg.security)


def _security_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """``security=`` and ``protocol="tls://"`` for a cluster daskpath starts, or nothing."""
    sec = _security(cfg)
    return {"security": sec, "protocol": "tls://"} if sec is not None else {}


def _bind_options(cfg: ClusterConfig) -> dict[str, Any]:
    """Where a scheduler started by daskpath listens: ``interface`` wins over ``scheduler_host``."""
    if cfg.interface:
        return {"interface": cfg.interface}
    return {"host": cfg.scheduler_host} if cfg.scheduler_host else {}


def local_cluster_kwargs(cfg: ClusterConfig, n_cores: int | None = None) -> dict:
    """Keyword arguments for :class:`distributed.LocalCluster` from the config.

    Default sizing: one worker process per 2 cores (at least 1) with the remaining cores as
    threads, so numpy/scipy kernels that release the GIL keep every core busy while a process
    boundary isolates memory. TensorFlow's per-process thread pool is capped to the worker's
    threads (``DASKPATH_TF_THREADS``, unless set already), so several worker processes on one
    machine do not each spawn a pool as large as the machine.
    """
    cores = n_cores or os.cpu_count() or 1
    n_workers = cfg.n_workers or max(1, cores // 2)
    threads = cfg.threads_per_worker or max(1, cores // n_workers)
    kw = {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": True,
        "memory_limit": cfg.memory_limit,
        "dashboard_address": cfg.dashboard_address,
        **_bind_options(cfg),
    }
    if cfg.local_directory:
        kw["local_directory"] = cfg.local_directory
    if n_workers > 1 and "DASKPATH_TF_THREADS" not in os.environ:
        kw["env"] = {"DASKPATH_TF_THREADS": str(threads)}
    return kw


def _count_gpus(cfg: ClusterConfig) -> int:
    if cfg.cuda.visible_devices:
        return len([d for d in str(cfg.cuda.visible_devices).split(",") if d.strip()])
    from dask_cuda.utils import get_n_gpus

    return int(get_n_gpus())


def local_cuda_cluster_kwargs(
    cfg: ClusterConfig, n_gpus: int, n_cores: int | None = None, total_memory: int | None = None
) -> tuple[dict, dict]:
    """Keyword arguments for ``LocalCUDACluster`` and for the CPU workers added beside it.

    Returns
    -------
    gpu : dict
        For ``dask_cuda.LocalCUDACluster``: ``n_workers`` = ``n_gpus`` (one per GPU), each with
        ``resources={"GPU": 1}`` and ``cluster.cuda.threads_per_worker`` threads.
    cpu : dict
        ``n_workers`` CPU-only worker processes (default: one per 2 cores left after the GPU
        workers' threads) with ``threads_per_worker`` threads each.

    ``memory_limit: auto`` shares the machine memory evenly over all worker processes, GPU and
    CPU (each side would otherwise assume it owns the whole machine).
    """
    cores = n_cores or os.cpu_count() or 1
    gpu_threads = cfg.cuda.threads_per_worker
    left = max(1, cores - n_gpus * gpu_threads)
    n_cpu = cfg.n_workers if cfg.n_workers is not None else max(1, left // 2)
    cpu_threads = cfg.threads_per_worker or max(1, left // max(1, n_cpu))
    memory: Any = cfg.memory_limit
    if str(memory) == "auto":
        if total_memory is None:
            from distributed.system import MEMORY_LIMIT as total_memory
        memory = int(total_memory // max(1, n_gpus + n_cpu))
    gpu = {
        "n_workers": n_gpus,
        "threads_per_worker": gpu_threads,
        "resources": {GPU: 1},
        "memory_limit": memory,
        "dashboard_address": cfg.dashboard_address,
        **_bind_options(cfg),
    }
    if cfg.cuda.visible_devices:
        gpu["CUDA_VISIBLE_DEVICES"] = str(cfg.cuda.visible_devices)
    if cfg.cuda.rmm_pool_size:
        gpu["rmm_pool_size"] = cfg.cuda.rmm_pool_size
    if cfg.local_directory:
        gpu["local_directory"] = cfg.local_directory
    cpu = {"n_workers": n_cpu, "threads_per_worker": cpu_threads, "memory_limit": memory}
    if cfg.local_directory:
        cpu["local_directory"] = cfg.local_directory
    return gpu, cpu


def _add_cpu_workers(cluster, cpu: Mapping[str, Any], host: str | None = None) -> int:
    """Add ``cpu["n_workers"]`` CPU-only Nanny workers to a running SpecCluster's scheduler."""
    from distributed import Nanny

    n = int(cpu.get("n_workers", 0))
    for i in range(n):
        opts: dict[str, Any] = {
            "nthreads": cpu["threads_per_worker"],
            "memory_limit": cpu["memory_limit"],
        }
        for key in ("local_directory", "preload", "preload_argv", "security"):
            if cpu.get(key):
                opts[key] = cpu[key]
        if host:
            opts["host"] = host
        cluster.worker_spec[f"cpu-{i}"] = {"cls": Nanny, "options": opts}
    if n:
        cluster.scale(len(cluster.worker_spec))
    return n


def slurm_cluster_kwargs(cfg: ClusterConfig) -> dict:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` from ``cluster.slurm.*``.

    Keys left null (``queue``, ``account``, ``log_directory``, ``python``, ``interface``,
    ``local_directory``) and empty lists fall back to the site's dask-jobqueue config
    (``jobqueue.slurm.*``, e.g. ``cluster/slurm/jobqueue.yaml`` copied to ``~/.config/dask/``).
    With ``gpus: N`` each job asks for ``--gres=gpu:N`` and runs ``dask_cuda.cli`` (one worker per
    GPU, ``processes = N``), every worker declaring ``--resources GPU=1``.
    """
    import dask

    s = cfg.slurm
    processes = s.gpus if s.gpus else s.processes
    directives = list(s.job_extra_directives) or list(
        dask.config.get("jobqueue.slurm.job-extra-directives", None) or []
    )
    worker_args: list[str] = []
    if s.gpus:
        directives.append(f"--gres=gpu:{s.gpus}")
        worker_args += ["--resources", f"{GPU}=1"]
    sched = {"dashboard_address": cfg.dashboard_address, **_bind_options(cfg)}
    kw: dict[str, Any] = {
        "cores": s.cores,
        "memory": s.memory,
        "processes": processes,
        "walltime": s.walltime,
        "queue": s.queue,
        "account": s.account,
        "job_name": "daskpath",
        "job_extra_directives": directives,
        "job_script_prologue": list(s.job_script_prologue) or None,
        "worker_extra_args": worker_args or None,
        "python": s.python or dask.config.get("jobqueue.slurm.python", None) or sys.executable,
        "log_directory": s.log_directory,
        "local_directory": cfg.local_directory,
        "interface": cfg.interface,
        "death_timeout": s.death_timeout,
        "scheduler_options": sched,
    }
    if s.gpus:
        kw["worker_command"] = "dask_cuda.cli"
    return kw


def slurm_job_script(cfg: ClusterConfig) -> str:
    """The sbatch script one worker job of ``cluster.kind: slurm`` runs (needs no SLURM).

    No scheduler is started (nothing binds a port); the scheduler address in it is
    :data:`SCHEDULER_PLACEHOLDER`, a stand-in for the one chosen at run time.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as e:
        raise DaskpathError(
            "cluster.kind 'slurm' needs dask-jobqueue; pip install 'daskpath[slurm]'"
        ) from e
    import dask

    kw = slurm_cluster_kwargs(cfg)
    kw.pop("scheduler_options")
    # what SLURMCluster hands its jobs, without starting its scheduler: the job class renders the
    # script from the same keywords (dask-jobqueue's own ``cluster.job_script()`` does the same
    # once a scheduler runs)
    job_cls = SLURMCluster.job_cls
    config_name = job_cls.default_config_name()
    if kw.get("interface") is None:
        kw["interface"] = dask.config.get(f"jobqueue.{config_name}.interface", None)
    job = job_cls(SCHEDULER_PLACEHOLDER, name="dummy-name", config_name=config_name,
                  protocol=None, security=None, **kw)
    return job.job_script()


#: Stands for the scheduler address in a job script rendered before any scheduler runs.
SCHEDULER_PLACEHOLDER = "tcp://SCHEDULER_HOST:PORT"


# ----------------------------------------------------------------------------------- kubernetes
def _security_context(uid: int) -> tuple[dict, dict]:
    pod = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    return pod, container


def _k8s_worker_spec(
    image: str, replicas: int, resources: dict, command: list[str], env: list[dict]
) -> dict:
    """A DaskWorker spec, the same structure as ``dask_kubernetes.operator.make_worker_spec``."""
    return {
        "replicas": replicas,
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "image": image,
                    "args": command + ["--name", "$(DASK_WORKER_NAME)", "--dashboard",
                                       "--dashboard-address", "8788"],
                    "env": env,
                    "resources": resources,
                    "ports": [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}],
                }
            ]
        },
    }


def _k8s_cluster_template(name: str, image: str, replicas: int, resources: dict,
                          command: list[str], env: list[dict]) -> dict:
    """A DaskCluster like ``make_cluster_spec`` renders it (used when dask-kubernetes is absent)."""
    probe = {"httpGet": {"port": "http-dashboard", "path": "/health"}}
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": name},
        "spec": {
            "idleTimeout": 0,
            "worker": _k8s_worker_spec(image, replicas, resources, command, env),
            "scheduler": {
                "spec": {
                    "containers": [
                        {
                            "name": "scheduler",
                            "image": image,
                            "args": ["dask-scheduler", "--host", "0.0.0.0"],
                            "env": env,
                            "resources": resources,
                            "ports": [
                                {"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
                                {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"},
                            ],
                            "readinessProbe": {**probe, "initialDelaySeconds": 0,
                                               "periodSeconds": 1, "timeoutSeconds": 300},
                            "livenessProbe": {**probe, "initialDelaySeconds": 15, "periodSeconds": 20},
                        }
                    ]
                },
                "service": {
                    "type": "ClusterIP",
                    "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
                    "ports": [
                        {"name": "tcp-comm", "protocol": "TCP", "port": 8786, "targetPort": "tcp-comm"},
                        {"name": "http-dashboard", "protocol": "TCP", "port": 8787,
                         "targetPort": "http-dashboard"},
                    ],
                },
            },
        },
    }


#: Where a Kubernetes pod finds the TLS files (the Secret ``<name>-tls``), read-only.
K8S_TLS_MOUNT = "/etc/daskpath/tls"


def _harden(pod_spec: dict, uid: int, pull: str, tls_secret: str | None = None) -> None:
    """Non-root, no capabilities, read-only root filesystem (a writable emptyDir on /tmp for
    spilling and caches), no service-account token, and the TLS Secret mounted when given."""
    pod_ctx, ctr_ctx = _security_context(uid)
    pod_spec["securityContext"] = pod_ctx
    pod_spec["automountServiceAccountToken"] = False  # dask pods never talk to the API server
    volumes = [{"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": "/tmp"}]
    if tls_secret:
        volumes.append({"name": "tls", "secret": {"secretName": tls_secret, "defaultMode": 0o400}})
        mounts.append({"name": "tls", "mountPath": K8S_TLS_MOUNT, "readOnly": True})
    pod_spec["volumes"] = volumes
    for c in pod_spec.get("containers", []):
        c["securityContext"] = {**copy.deepcopy(ctr_ctx), "readOnlyRootFilesystem": True}
        c["imagePullPolicy"] = pull
        env = copy.deepcopy(c.get("env") or [])  # the operator appends to it
        env += [{"name": "HOME", "value": "/tmp"}, {"name": "MPLCONFIGDIR", "value": "/tmp/mpl"}]
        c["env"] = env
        c["volumeMounts"] = copy.deepcopy(mounts)


def _tls_args(role: str) -> list[str]:
    """Command-line TLS options of ``dask scheduler`` / ``dask worker`` reading the mounted Secret."""
    files = [f"--tls-ca-file={K8S_TLS_MOUNT}/ca.pem", f"--tls-cert={K8S_TLS_MOUNT}/cert.pem",
             f"--tls-key={K8S_TLS_MOUNT}/key.pem"]
    return (["--protocol=tls"] if role == "scheduler" else []) + files


def _tls_worker(args: list[str], cluster_name: str) -> list[str]:
    """A worker command that dials the scheduler Service over TLS: the address is given
    explicitly (the operator's DASK_SCHEDULER_ADDRESS says tcp://), plus the TLS files."""
    return [args[0], f"tls://{cluster_name}-scheduler:8786", *args[1:], *_tls_args("worker")]


def kubernetes_network_policy(cfg: ClusterConfig) -> dict:
    """A NetworkPolicy: the scheduler's ports admit only this cluster's workers and pods
    labelled ``daskpath.org/client: "true"`` (the driver, when it runs in the cluster)."""
    k = cfg.kubernetes
    meta: dict[str, Any] = {"name": f"{k.name}-scheduler"}
    if k.namespace:
        meta["namespace"] = k.namespace
    peers = [{"podSelector": {"matchLabels": {"dask.org/cluster-name": k.name}}},
             {"podSelector": {"matchLabels": {"daskpath.org/client": "true"}}}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": {"dask.org/cluster-name": k.name,
                                            "dask.org/component": "scheduler"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": 8786},
                                                  {"protocol": "TCP", "port": 8787}]}],
        },
    }


def kubernetes_manifests(cfg: ClusterConfig, use_operator_package: bool = True) -> list[dict]:
    """The DaskCluster (and, with ``gpu_workers``, a GPU DaskWorkerGroup) for ``kind: kubernetes``.

    The default worker group holds ``cluster.kubernetes.workers`` CPU workers; the GPU group
    ``<name>-gpu`` holds ``gpu_workers`` pods, each with an ``nvidia.com/gpu: 1`` limit running
    ``dask-cuda-worker --resources GPU=1``. Every pod runs as the non-root uid
    ``run_as_user`` with all capabilities dropped. The scheduler Service is ClusterIP: reach the
    dashboard with ``kubectl port-forward`` (nothing is exposed outside the cluster).

    ``make_cluster_spec`` of dask-kubernetes renders the base when installed (and
    ``use_operator_package``), else an equivalent built-in template.
    """
    k = cfg.kubernetes
    env = [{"name": "DASKPATH_CLUSTER", "value": "kubernetes"}]
    cpu_res = {"requests": {"cpu": k.worker_cpu, "memory": k.worker_memory},
               "limits": {"cpu": k.worker_cpu, "memory": k.worker_memory}}
    worker_cmd = ["dask-worker", "--nthreads", str(max(1, _cpu_count(k.worker_cpu))),
                  "--memory-limit", _k8s_memory(k.worker_memory)]
    spec = None
    if use_operator_package:
        try:
            from dask_kubernetes.operator import make_cluster_spec
        except ImportError:
            make_cluster_spec = None
        if make_cluster_spec is not None:
            spec = make_cluster_spec(name=k.name, image=k.image, n_workers=k.workers,
                                     resources=cpu_res, env=env, worker_command=worker_cmd)
    if spec is None:
        spec = _k8s_cluster_template(k.name, k.image, k.workers, cpu_res, worker_cmd, env)
    spec["spec"]["idleTimeout"] = k.idle_timeout
    if k.namespace:
        spec["metadata"]["namespace"] = k.namespace
    # the scheduler needs less than a worker
    sched_res = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    spec["spec"]["scheduler"]["spec"]["containers"][0]["resources"] = sched_res
    tls = f"{k.name}-tls" if cfg.security.kind == "tls" else None
    _harden(spec["spec"]["scheduler"]["spec"], k.run_as_user, k.image_pull_policy, tls)
    _harden(spec["spec"]["worker"]["spec"], k.run_as_user, k.image_pull_policy, tls)
    if tls:
        spec["spec"]["scheduler"]["spec"]["containers"][0]["args"] += _tls_args("scheduler")
        w = spec["spec"]["worker"]["spec"]["containers"][0]
        w["args"] = _tls_worker(w["args"], k.name)
    out = [spec]
    if k.gpu_workers:
        out.append(kubernetes_gpu_worker_group(cfg))
    out.append(kubernetes_network_policy(cfg))
    return out


def kubernetes_gpu_worker_group(cfg: ClusterConfig, cluster_name: str | None = None) -> dict:
    """A DaskWorkerGroup of ``gpu_workers`` pods, one GPU each, workers declaring ``GPU=1``."""
    k = cfg.kubernetes
    name = cluster_name or k.name
    res = {"requests": {"cpu": k.gpu_worker_cpu, "memory": k.gpu_worker_memory},
           "limits": {"cpu": k.gpu_worker_cpu, "memory": k.gpu_worker_memory,
                      "nvidia.com/gpu": "1"}}
    cmd = ["dask-cuda-worker", "--nthreads", str(max(1, _cpu_count(k.gpu_worker_cpu))),
           "--memory-limit", _k8s_memory(k.gpu_worker_memory), "--resources", f"{GPU}=1"]
    worker = _k8s_worker_spec(k.image, k.gpu_workers, res, cmd,
                              [{"name": "DASKPATH_CLUSTER", "value": "kubernetes"}])
    tls = f"{name}-tls" if cfg.security.kind == "tls" else None
    _harden(worker["spec"], k.run_as_user, k.image_pull_policy, tls)
    if tls:
        c = worker["spec"]["containers"][0]
        c["args"] = _tls_worker(c["args"], name)
    worker["spec"]["tolerations"] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    meta: dict[str, Any] = {"name": f"{name}-gpu"}
    if k.namespace:
        meta["namespace"] = k.namespace
    return {"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskWorkerGroup", "metadata": meta,
            "spec": {"cluster": name, "worker": worker}}


def _cpu_count(cpu: str) -> int:
    s = str(cpu)
    return max(1, int(float(s[:-1]) / 1000)) if s.endswith("m") else max(1, int(float(s)))


def _k8s_memory(mem: str) -> str:
    """Dask's ``--memory-limit`` for a pod memory limit: 90 % of it (``8Gi`` -> ``7730941132``),
    so that dask spills and pauses before the kernel's OOM killer ends the pod."""
    from dask.utils import parse_bytes

    s = str(mem)
    if s.endswith(("Ki", "Mi", "Gi", "Ti")):
        s += "B"
    return str(int(parse_bytes(s) * 0.9))


# ------------------------------------------------------------------------------ GPU annotations
def _workers(client) -> dict:
    """All workers (recent distributed lists only the first 5 unless asked for all).

    Asks the scheduler directly: ``client.scheduler_info()`` returns a cache that the client's
    periodic refresh (which fetches no workers) may overwrite between the fetch and the return,
    which the run loop's slide threads hit as "no worker connected".
    """
    scheduler = getattr(client, "scheduler", None)
    if scheduler is not None and not getattr(client, "asynchronous", False) and hasattr(client, "sync"):
        try:
            return dict(client.sync(scheduler.identity, n_workers=-1).get("workers", {}))
        except TypeError:  # an older scheduler without n_workers
            return dict(client.sync(scheduler.identity).get("workers", {}))
    if _takes_n_workers(client):
        return client.scheduler_info(n_workers=-1).get("workers", {})
    return client.scheduler_info().get("workers", {})


def _takes_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def gpu_resources(client) -> bool:
    """True when some worker of ``client``'s scheduler declares a ``GPU`` resource."""
    return any(
        (w.get("resources") or {}).get(GPU, 0) > 0 for w in _workers(client).values()
    )


def model_annotations(client) -> dict:
    """Dask annotations for model tasks (GAN, StarDist): ``{"resources": {"GPU": 1}}`` when the
    cluster has GPU workers, else ``{}`` (model tasks then run on CPU workers).

    Use as ``with dask.annotate(**model_annotations(client)): ...``.
    """
    return {"resources": {GPU: 1}} if gpu_resources(client) else {}


def _required_resources(annotations: Any) -> list[dict]:
    """Resource requirements from an annotations dict or from dask collections' graphs."""
    if annotations is None:
        return []
    if isinstance(annotations, Mapping):
        res = annotations.get("resources")
        return [dict(res)] if res else []
    items = annotations if isinstance(annotations, (list, tuple, set)) else [annotations]
    out: list[dict] = []
    for item in items:
        if isinstance(item, Mapping):
            out += _required_resources(item)
            continue
        graph = item.__dask_graph__() if hasattr(item, "__dask_graph__") else item
        layers = getattr(graph, "layers", None)
        if layers is None:
            continue
        for layer in layers.values():
            res = (getattr(layer, "annotations", None) or {}).get("resources")
            if res and dict(res) not in out:
                out.append(dict(res))
    return out


def check_runnable(client, annotations: Any) -> None:
    """Raise :class:`DaskpathError` now if no worker can run tasks with these annotations.

    The scheduler would otherwise keep such tasks waiting ("no-worker") forever.

    Parameters
    ----------
    client : distributed.Client
    annotations : dict, dask collection, or a list of them
        ``{"resources": {"GPU": 1}}`` (what :func:`model_annotations` returns), or collections
        whose graph layers carry ``dask.annotate(resources=...)`` annotations.
    """
    needs = _required_resources(annotations)
    workers = _workers(client)
    if not workers:
        raise DaskpathError(
            f"no Dask worker is connected to the scheduler at {client.scheduler.address}; "
            "start workers (or check the cluster's job/pod logs) and rerun"
        )
    have = [(w.get("resources") or {}) for w in workers.values()]
    for need in needs:
        if not any(all(r.get(k, 0) >= v for k, v in need.items()) for r in have):
            offered = sorted({k for r in have for k in r}) or ["none"]
            raise DaskpathError(
                f"tasks need worker resources {need} but none of the {len(workers)} workers has "
                f"them (resources offered: {', '.join(offered)}); start GPU workers "
                "(cluster.kind: local-cuda, cluster.slurm.gpus, cluster.kubernetes.gpu_workers) "
                "or submit without the resource annotation"
            )


# ------------------------------------------------------------------------------ interrupts
#: Seconds that closing the client, then the cluster, may each take after a KeyboardInterrupt
#: (SLURM sends SIGKILL 30 s after SIGTERM by default: KillWait).
INTERRUPT_CLOSE_TIMEOUT = 10
#: Seconds a local worker process outlives a SIGTERM, so that the driver's nanny closes it first.
WORKER_SIGTERM_GRACE = 2 * INTERRUPT_CLOSE_TIMEOUT

# Loggers that report an interrupted teardown (cancelled tasks, closed comms, "Task exception
# was never retrieved"); children with a level of their own (distributed.client) are silenced too.
_TEARDOWN_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh", "dask_jobqueue",
                     "dask_kubernetes", "kr8s")


def quiet_teardown() -> dict[str, int]:
    """Silence the loggers of an interrupted cluster shutdown; return their previous levels.

    Pass the returned dict to :func:`restore_log_levels` to undo it. The ``daskpath`` CLI calls
    this when a stop signal arrives and does not undo it (the process is ending: asyncio may
    report abandoned tasks when they are garbage collected, as late as interpreter exit).
    """
    names = set(_TEARDOWN_LOGGERS)
    names.update(n for n in list(logging.root.manager.loggerDict)
                 if n.split(".", 1)[0] in _TEARDOWN_LOGGERS)
    old = {}
    for name in sorted(names):
        logger = logging.getLogger(name)
        old[name] = logger.level
        logger.setLevel(logging.CRITICAL + 1)
    return old


def restore_log_levels(old: Mapping[str, int]) -> None:
    """Undo :func:`quiet_teardown`."""
    for name, level in old.items():
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _closing(thing) -> Iterator:
    """Yield ``thing`` (a client or a cluster) and close it on exit, however the block ends.

    After a ``KeyboardInterrupt`` the close is bounded by :data:`INTERRUPT_CLOSE_TIMEOUT` and
    silent: teardown loggers are muted and close errors (timeouts, closed comms) are dropped, so
    that the interrupt reaches the caller alone.
    """
    interrupted = False
    try:
        yield thing
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if interrupted:
            _close_quietly(thing)
        else:
            thing.close()


def _close_quietly(thing) -> None:
    old = quiet_teardown()
    try:
        thing.close(timeout=INTERRUPT_CLOSE_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - the interrupt is what the caller must see
        log.debug("closing %s after an interrupt: %s: %s", type(thing).__name__,
                  type(e).__name__, e)
    finally:
        gc.collect()  # abandoned asyncio tasks report themselves now, while muted
        restore_log_levels(old)


def _worker_preload() -> dict[str, list]:
    """``preload`` (and ``preload_argv``) for the local worker processes: the configured
    ``distributed.worker.preload`` modules plus this one (see :func:`dask_setup`)."""
    import dask

    preload = dask.config.get("distributed.worker.preload", default=None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    if __name__ in preload:
        return {}
    out: dict[str, list] = {"preload": [*preload, __name__]}
    argv = list(dask.config.get("distributed.worker.preload-argv", default=None) or [])
    if argv and isinstance(argv[0], list):  # one argv per preload: ours takes none
        out["preload_argv"] = [*argv, []]
    return out


class _ClosingWorkerFilter(logging.Filter):
    """Drop a worker's warnings about the tasks that it cancels while it closes."""

    def __init__(self, worker) -> None:
        from distributed.core import Status

        super().__init__()
        self._worker = weakref.ref(worker)
        self._closing = (Status.closing, Status.closing_gracefully, Status.closed)

    def filter(self, record: logging.LogRecord) -> bool:
        worker = self._worker()
        closing = worker is None or worker.status in self._closing
        return record.levelno >= logging.ERROR or not closing


def warm_imports() -> None:
    """Import the modules tasks use (zarr, numcodecs, tifffile, tiffslide) in one thread, so a
    worker's threads never race on a partially initialised module."""
    import importlib

    for name in ("numcodecs", "zarr", "zarr.core.array", "zarr.storage", "tifffile", "tiffslide"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional reader missing is the task's business
            pass
    try:  # a zarr read that never returns (seen once: a worker thread waiting on zarr's I/O
        # loop while the loop sat idle) becomes a TimeoutError, so the task is retried
        import zarr

        if zarr.config.get("async.timeout") is None:
            zarr.config.set({"async.timeout": ZARR_IO_TIMEOUT})
    except Exception:  # noqa: BLE001
        pass


#: Seconds a single zarr read or write may take in a worker before it fails (and is retried).
ZARR_IO_TIMEOUT = 300.0


def dask_setup(worker) -> None:
    """Dask preload hook, run in each worker process of a local cluster that :func:`connect`
    starts, so that the driver, not a signal, stops the workers.

    SLURM sends SIGTERM to every process of a job step (on ``scancel`` and at the time limit) and a
    terminal sends Ctrl-C's SIGINT to its whole foreground process group, so the worker processes
    get the signal the driver gets. By default a nanny-spawned worker dies of it: on SIGINT with a
    ``KeyboardInterrupt`` traceback, on SIGTERM at once, after which its nanny spawns a new one
    while the driver is closing the cluster (seconds lost). Here:

    * SIGINT is ignored;
    * SIGTERM starts a timer: the process exits (status 143) :data:`WORKER_SIGTERM_GRACE` s later
      unless its nanny has closed it by then, which is what the driver does on the same signal;
    * the worker's warnings about the tasks it cancels while it closes ("Async instruction ...
      ended with CancelledError") are dropped;
    * the Python loggers of TensorFlow, absl and pyvips are kept at ERROR unless the inherited
      ``TF_CPP_MIN_LOG_LEVEL`` is 0 (``daskpath -v``); see :mod:`daskpath._logging`.

    A worker process still exits at once when its parent dies (distributed watches the parent
    through a pipe), and a nanny kills a worker with SIGKILL, not SIGTERM. SIGTERM is not simply
    ignored: ``multiprocessing``'s exit handler terminates leftover daemon processes with SIGTERM
    and then joins them, which would wait forever for a worker that a timed-out close left behind.

    Does nothing in the driver's own process (``LocalCluster(processes=False)``: its worker
    threads share the driver's signal handlers and loggers).

    It also imports zarr and the image readers once, before any task runs: two threads of a
    worker importing zarr at the same moment (a task and the deserialisation of the next one)
    can see a half-initialised ``zarr.core.array`` ("cannot import name ... partially initialized
    module"), and the task then fails or its deserialisation is lost.
    """
    warm_imports()
    if multiprocessing.parent_process() is None:
        return
    from daskpath._logging import quiet_chatty_loggers

    # TensorFlow / libvips chatter: as the inherited environment says (TF_CPP_MIN_LOG_LEVEL)
    quiet_chatty_loggers()
    logging.getLogger("distributed.worker.state_machine").addFilter(_ClosingWorkerFilter(worker))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _exit_later)


def _exit_later(signum: int, frame) -> None:  # noqa: ARG001 - a signal handler
    timer = threading.Timer(WORKER_SIGTERM_GRACE, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()


# --------------------------------------------------------------------------------------- connect
def quiet_distributed(level: int | None = None) -> None:
    """Keep distributed's own logging to errors (its teardown chatter is not for users).

    ``daskpath -vv`` keeps its INFO messages.
    """
    root = logging.getLogger("daskpath")
    if level is None:
        level = logging.INFO if root.getEffectiveLevel() <= logging.DEBUG - 5 else logging.ERROR
    for name in ("distributed", "tornado", "bokeh", "dask_jobqueue", "dask_kubernetes", "kr8s"):
        logging.getLogger(name).setLevel(level)


def _wait_for_workers(client, n: int, timeout: int, what: str) -> None:
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError as e:
        got = len(_workers(client))
        raise DaskpathError(
            f"only {got} of {n} Dask worker(s) joined within {timeout} s ({what}); raise "
            "cluster.startup_timeout or check the worker logs"
        ) from e


@contextlib.contextmanager
def _client_for(cluster, cfg: ClusterConfig, what: str, n_wait: int) -> Iterator:
    from distributed import Client

    with _closing(Client(cluster)) as client:
        log.info("%s, dashboard: %s", what, client.dashboard_link)
        if n_wait:
            _wait_for_workers(client, n_wait, cfg.startup_timeout, what)
        yield client


def _start_local_cuda(cfg: ClusterConfig):
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        raise DaskpathError(
            "cluster.kind 'local-cuda' needs dask-cuda: pip install 'daskpath[gpu]' "
            f"(or use cluster.kind: local) ({e})"
        ) from e
    try:
        n_gpus = _count_gpus(cfg)
    except Exception as e:  # noqa: BLE001 - NVML missing, driver errors
        raise DaskpathError(
            f"cluster.kind 'local-cuda': no usable GPU ({type(e).__name__}: {e}); "
            "use cluster.kind: local on machines without an NVIDIA GPU"
        ) from e
    if n_gpus < 1:
        raise DaskpathError("cluster.kind 'local-cuda': no GPU found; use cluster.kind: local")
    gpu, cpu = local_cuda_cluster_kwargs(cfg, n_gpus)
    preload = _worker_preload()
    cpu = {**cpu, **preload}
    sec = _security_kwargs(cfg)
    if sec:
        gpu = {**gpu, **sec}
        cpu = {**cpu, "security": sec["security"]}
    try:
        cluster = LocalCUDACluster(**gpu, **preload)
    except Exception as e:  # noqa: BLE001
        raise DaskpathError(
            f"cannot start LocalCUDACluster ({type(e).__name__}: {e}); check the NVIDIA driver "
            "or use cluster.kind: local"
        ) from e
    try:
        _add_cpu_workers(cluster, cpu, host=gpu.get("host"))
    except Exception:
        cluster.close()
        raise
    desc = (f"local-cuda cluster: {n_gpus} GPU worker(s) + {cpu['n_workers']} CPU worker(s) x "
            f"{cpu['threads_per_worker']} threads")
    return cluster, desc, n_gpus + cpu["n_workers"]


def _start_slurm(cfg: ClusterConfig):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as e:
        raise DaskpathError("cluster.kind 'slurm' needs dask-jobqueue: pip install 'daskpath[slurm]'") from e
    if shutil.which("sbatch") is None:
        raise DaskpathError(
            "cluster.kind 'slurm': sbatch is not on PATH; run daskpath on a SLURM login node "
            "(or use cluster.kind: local / address)"
        )
    s = cfg.slurm
    sec = _security_kwargs(cfg)
    if sec and cfg.security.kind == "temporary":
        # dask-jobqueue writes the throw-away certificates (mode 0600) where the jobs can read
        # them: the submission folder, which SLURM jobs share with the login node
        shared = Path.cwd() / ".daskpath-jobqueue"
        shared.mkdir(mode=0o700, exist_ok=True)
        sec["shared_temp_directory"] = str(shared)
    cluster = SLURMCluster(**slurm_cluster_kwargs(cfg), **sec)
    try:
        if s.adaptive:
            cluster.adapt(minimum_jobs=s.minimum_jobs, maximum_jobs=s.maximum_jobs)
            jobs = s.minimum_jobs
        else:
            cluster.scale(jobs=s.jobs)
            jobs = s.jobs
    except Exception:
        cluster.close()
        raise
    per_job = s.gpus or s.processes
    desc = f"SLURM cluster: {jobs} job(s) x {per_job} worker(s), scheduler {cluster.scheduler_address}"
    return cluster, desc, 1 if jobs else 0


def _start_kubernetes(cfg: ClusterConfig):
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as e:
        raise DaskpathError(
            "cluster.kind 'kubernetes' needs dask-kubernetes: pip install 'daskpath[kubernetes]'"
        ) from e
    k = cfg.kubernetes
    if cfg.security.kind != "none":
        raise DaskpathError(
            "cluster.kind 'kubernetes' with cluster.security: KubeCluster connects without TLS; "
            "apply `daskpath cluster kubernetes --print CONFIG` (TLS Secret mounted) or the "
            "DaskJob, and connect with cluster.kind: address plus cluster.security")
    manifests = kubernetes_manifests(cfg)
    by_kind = {m["kind"]: m for m in manifests}
    try:  # the NetworkPolicy first, so the scheduler is never reachable by other pods
        from kr8s.objects import object_from_spec

        policy = object_from_spec(by_kind["NetworkPolicy"])
        if not policy.exists():
            policy.create()
    except Exception as e:  # noqa: BLE001 - no permission, no kr8s: say so, do not start open
        raise DaskpathError(
            f"cannot create the NetworkPolicy '{k.name}-scheduler' ({type(e).__name__}: {e}); "
            "apply it yourself (`daskpath cluster kubernetes --print CONFIG`) or ask the cluster "
            "admin for permission to create NetworkPolicies"
        ) from e
    try:
        cluster = KubeCluster(custom_cluster_spec=by_kind["DaskCluster"], namespace=k.namespace,
                              resource_timeout=cfg.startup_timeout, quiet=True)
    except Exception as e:  # noqa: BLE001 - credentials, API errors
        raise DaskpathError(
            f"cannot create the DaskCluster '{k.name}' ({type(e).__name__}: {e}); check kubectl "
            "access and that the dask-kubernetes operator is installed (cluster/README.md)"
        ) from e
    if "DaskWorkerGroup" in by_kind:
        try:
            cluster.add_worker_group(name="gpu", n_workers=k.gpu_workers,
                                     custom_spec=by_kind["DaskWorkerGroup"]["spec"]["worker"])
        except Exception:
            cluster.close()
            raise
    desc = f"Kubernetes DaskCluster {k.name}: {k.workers} CPU + {k.gpu_workers} GPU worker pod(s)"
    return cluster, desc, 1


_STARTERS = {"local-cuda": _start_local_cuda, "slurm": _start_slurm, "kubernetes": _start_kubernetes}


@contextlib.contextmanager
def connect(cfg: ClusterConfig, scheduler: str | None = None) -> Iterator:
    """Yield a :class:`distributed.Client` for the configured cluster; closes what it started.

    Parameters
    ----------
    cfg : ClusterConfig
        ``kind`` is ``local``, ``local-cuda``, ``slurm``, ``kubernetes`` (start that cluster, wait
        up to ``startup_timeout`` s for its first worker) or ``address`` (connect to ``address``).
    scheduler : str, optional
        An existing scheduler address; overrides ``cfg`` (the CLI's ``--scheduler``).

    Raises
    ------
    DaskpathError
        The package a kind needs is missing, the scheduler cannot be reached, no GPU, no worker
        joined in time.
    """
    # worker processes inherit this: TensorFlow's C++ start-up chatter is not for users
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from distributed import Client, LocalCluster

    quiet_distributed()
    address = scheduler or (cfg.address if cfg.kind == "address" else None)
    if cfg.kind == "address" and not address:
        raise ConfigError("cluster.kind is 'address' but cluster.address is empty; set it or pass --scheduler")
    if address:
        sec = _security(cfg)
        try:
            client = Client(address, timeout="20s", **({"security": sec} if sec else {}))
        except OSError as e:
            raise DaskpathError(
                f"cannot reach the Dask scheduler at {address}; start it or fix the address ({e})"
            ) from e
        log.info("connected to scheduler %s, dashboard: %s", address, client.dashboard_link)
        with _closing(client):
            yield client
        return
    if cfg.kind in _STARTERS:
        cluster, desc, n_wait = _STARTERS[cfg.kind](cfg)
        with _closing(cluster), _client_for(cluster, cfg, desc, n_wait) as client:
            yield client
        return
    kwargs = local_cluster_kwargs(cfg)
    kwargs.update(_security_kwargs(cfg))
    with _closing(LocalCluster(**kwargs, **_worker_preload())) as cluster, \
            _closing(Client(cluster)) as client:
        log.info(
            "local cluster: %d workers x %d threads, dashboard: %s",
            kwargs["n_workers"],
            kwargs["threads_per_worker"],
            client.dashboard_link,
        )
        yield client


def manifests_yaml(docs: Iterable[dict]) -> str:
    """Kubernetes manifests as one multi-document YAML (no anchors: kubectl-friendly)."""
    import yaml

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):  # noqa: ARG002
            return True

    return "---\n".join(yaml.dump(d, Dumper=_NoAliases, sort_keys=False) for d in docs)
