"""Cluster kinds, GPU placement helpers, operator files and `daskpath cluster --print`.

dask-cuda cannot run without a GPU: ``local-cuda`` is tested with a fake ``dask_cuda`` module whose
``LocalCUDACluster`` is a LocalCluster declaring ``GPU=1`` per worker; the ``gpu``-marked test
starts the real one where a GPU exists. The real SLURM run is in ``test_slurm.py``.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import dask
import pytest
import yaml

from daskpath.cli import main
from daskpath.cluster import (
    check_runnable,
    connect,
    gpu_resources,
    kubernetes_manifests,
    local_cluster_kwargs,
    local_cuda_cluster_kwargs,
    model_annotations,
    slurm_cluster_kwargs,
)
from daskpath.config import ClusterConfig, load_config
from daskpath.errors import ConfigError, DaskpathError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"


def cluster_cfg(*overrides: str) -> ClusterConfig:
    return load_config(None, ["cluster.dashboard_address=127.0.0.1:0", *overrides]).cluster


# ----------------------------------------------------------------------------- config -> kwargs
def test_local_kwargs_bind_localhost():
    kw = local_cluster_kwargs(ClusterConfig(), n_cores=8)
    assert kw["host"] == "127.0.0.1"
    assert kw["dashboard_address"].startswith("127.0.0.1:")
    assert (kw["n_workers"], kw["threads_per_worker"]) == (4, 2)
    kw = local_cluster_kwargs(cluster_cfg("cluster.interface=lo", "cluster.local_directory=/s"), 8)
    assert kw["interface"] == "lo" and "host" not in kw and kw["local_directory"] == "/s"


def test_local_cuda_kwargs_one_worker_per_gpu_plus_cpu_workers():
    gpu, cpu = local_cuda_cluster_kwargs(cluster_cfg(), n_gpus=2, n_cores=16, total_memory=64 * 2**30)
    assert gpu["n_workers"] == 2 and gpu["resources"] == {"GPU": 1}
    assert gpu["threads_per_worker"] == 1 and gpu["host"] == "127.0.0.1"
    # 14 cores left: 7 CPU workers x 2 threads; memory shared by all 9 processes
    assert (cpu["n_workers"], cpu["threads_per_worker"]) == (7, 2)
    assert gpu["memory_limit"] == cpu["memory_limit"] == 64 * 2**30 // 9
    gpu, cpu = local_cuda_cluster_kwargs(
        cluster_cfg("cluster.kind=local-cuda", "cluster.cuda.visible_devices='0,3'", "cluster.n_workers=0",
                    "cluster.cuda.rmm_pool_size=20GB", "cluster.memory_limit=8GiB"), n_gpus=2, n_cores=4)
    assert gpu["CUDA_VISIBLE_DEVICES"] == "0,3" and gpu["rmm_pool_size"] == "20GB"
    assert cpu["n_workers"] == 0 and gpu["memory_limit"] == "8GiB"


def test_slurm_kwargs_cpu_and_gpu_jobs():
    kw = slurm_cluster_kwargs(cluster_cfg("cluster.slurm.queue=short", "cluster.slurm.cores=8",
                                          "cluster.slurm.memory=32GiB", "cluster.slurm.processes=2"))
    assert (kw["queue"], kw["cores"], kw["memory"], kw["processes"]) == ("short", 8, "32GiB", 2)
    assert kw["scheduler_options"]["host"] == "127.0.0.1"
    assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:0"
    assert kw["python"] == sys.executable and "worker_command" not in kw
    assert not any("gres" in d for d in kw["job_extra_directives"])
    kw = slurm_cluster_kwargs(cluster_cfg("cluster.slurm.gpus=4", "cluster.slurm.cores=16",
                                          "cluster.slurm.job_extra_directives=[--qos=gpu]",
                                          "cluster.interface=ib0"))
    assert kw["processes"] == 4  # one worker per GPU
    assert kw["job_extra_directives"] == ["--qos=gpu", "--gres=gpu:4"]
    assert kw["worker_command"] == "dask_cuda.cli"
    assert kw["worker_extra_args"] == ["--resources", "GPU=1"]
    assert kw["interface"] == "ib0" and kw["scheduler_options"]["interface"] == "ib0"


def test_slurm_null_keys_fall_back_to_jobqueue_config():
    with dask.config.set({"jobqueue.slurm.job-extra-directives": ["--constraint=a100"],
                          "jobqueue.slurm.python": "/opt/venv/bin/python"}):
        kw = slurm_cluster_kwargs(cluster_cfg())
    assert kw["job_extra_directives"] == ["--constraint=a100"]
    assert kw["python"] == "/opt/venv/bin/python"
    assert kw["queue"] is None  # SLURMCluster reads jobqueue.slurm.queue itself


def test_slurm_job_script_renders_without_slurm():
    pytest.importorskip("dask_jobqueue")
    from daskpath.cluster import slurm_job_script

    script = slurm_job_script(cluster_cfg("cluster.slurm.gpus=2", "cluster.slurm.queue=gpu",
                                          "cluster.slurm.walltime=01:00:00"))
    assert "#SBATCH -p gpu" in script and "#SBATCH --gres=gpu:2" in script
    assert "#SBATCH -t 01:00:00" in script
    assert "-m dask_cuda.cli tcp://SCHEDULER_HOST:PORT" in script
    assert "--resources GPU=1" in script


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cluster.slurm.gpus=-1"], "'cluster.slurm.gpus' = -1 is invalid"),
        (["cluster.slurm.cores=0"], "'cluster.slurm.cores' = 0 is invalid"),
        (["cluster.slurm.minimum_jobs=5", "cluster.slurm.maximum_jobs=2"], "maximum_jobs (2)"),
        (["cluster.slurm.processes=8", "cluster.slurm.cores=4"], "'cluster.slurm.processes' = 8"),
        (["cluster.kubernetes.run_as_user=0"], "a non-root uid"),
        (["cluster.kubernetes.workers=0"], "at least one worker"),
        (["cluster.kubernetes.image_pull_policy=Sometimes"], "Always, IfNotPresent or Never"),
        (["cluster.cuda.threads_per_worker=0"], "'cluster.cuda.threads_per_worker' = 0"),
        (["cluster.n_workers=0"], "'cluster.n_workers' = 0 is invalid"),
        (["cluster.slurm.queu=gpu"], "unknown config key 'cluster.slurm.queu'"),
    ],
)
def test_bad_cluster_config(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_local_cuda_allows_gpu_workers_only():
    assert load_config(None, ["cluster.kind=local-cuda", "cluster.n_workers=0"]).cluster.n_workers == 0


# ------------------------------------------------------------------------- GPU helpers, real Dask
@pytest.fixture(scope="module")
def gpu_client():
    """A LocalCluster: one worker declaring GPU=1, one plain CPU worker."""
    from distributed import Client, LocalCluster, Nanny

    with LocalCluster(n_workers=1, threads_per_worker=1, resources={"GPU": 1}, processes=True,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        cluster.worker_spec["cpu"] = {"cls": Nanny, "options": {"nthreads": 1}}
        cluster.scale(len(cluster.worker_spec))
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            yield client


def test_model_annotations_with_gpu_workers(gpu_client):
    import dask.array as da

    assert gpu_resources(gpu_client)
    ann = model_annotations(gpu_client)
    assert ann == {"resources": {"GPU": 1}}
    check_runnable(gpu_client, ann)
    x = da.zeros((64, 64), chunks=16)
    with dask.annotate(**ann):
        y = x.map_blocks(lambda b: b + 1, dtype=x.dtype)
    check_runnable(gpu_client, y)
    assert gpu_client.compute(y.sum()).result(timeout=60) == 64 * 64 * 1


def test_gpu_tasks_execute_on_gpu_worker_only(gpu_client):
    import distributed

    def where():
        return distributed.get_worker().address

    with dask.annotate(resources={"GPU": 1}):
        futs = [gpu_client.submit(where, pure=False) for _ in range(8)]
    addrs = set(gpu_client.gather(futs))
    gpu_addr = {a for a, w in gpu_client.scheduler_info()["workers"].items()
                if w["resources"].get("GPU")}
    assert addrs == gpu_addr


def test_check_runnable_rejects_unrunnable_at_once(gpu_client, dask_client):
    t0 = time.perf_counter()
    with pytest.raises(DaskpathError, match=r"need worker resources \{'TPU': 1\}"):
        check_runnable(gpu_client, {"resources": {"TPU": 1}})
    with pytest.raises(DaskpathError, match="GPU"):
        check_runnable(gpu_client, {"resources": {"GPU": 2}})
    # a CPU-only cluster: no GPU annotation is offered, and a GPU task is refused, not left hanging
    assert not gpu_resources(dask_client)
    assert model_annotations(dask_client) == {}
    with pytest.raises(DaskpathError, match="start GPU workers"):
        check_runnable(dask_client, {"resources": {"GPU": 1}})
    check_runnable(dask_client, model_annotations(dask_client))  # {} is always runnable
    check_runnable(dask_client, None)
    assert time.perf_counter() - t0 < 10


def test_check_runnable_without_workers():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        with pytest.raises(DaskpathError, match="no Dask worker is connected"):
            check_runnable(client, {})


# ------------------------------------------------------------------------------ connect() kinds
def _http_sockets(client) -> list[str]:
    def hosts(dask_scheduler):
        server = dask_scheduler.http_server
        return [s.getsockname()[0] for s in getattr(server, "_sockets", {}).values()]

    return client.run_on_scheduler(hosts)


def test_connect_local_binds_scheduler_and_dashboard_to_localhost():
    cfg = cluster_cfg("cluster.n_workers=1", "cluster.threads_per_worker=1")
    with connect(cfg) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        hosts = _http_sockets(client)
        assert hosts and set(hosts) == {"127.0.0.1"}


@pytest.fixture
def fake_dask_cuda(monkeypatch):
    """A ``dask_cuda`` module whose LocalCUDACluster is a LocalCluster, one worker per 'GPU'."""
    from distributed import LocalCluster

    calls = {}

    class LocalCUDACluster(LocalCluster):
        def __init__(self, CUDA_VISIBLE_DEVICES=None, rmm_pool_size=None, **kwargs):  # noqa: N803
            calls.update(kwargs, CUDA_VISIBLE_DEVICES=CUDA_VISIBLE_DEVICES)
            super().__init__(processes=True, **kwargs)

    mod = types.ModuleType("dask_cuda")
    mod.LocalCUDACluster = LocalCUDACluster
    utils = types.ModuleType("dask_cuda.utils")
    utils.get_n_gpus = lambda: 2
    mod.utils = utils
    monkeypatch.setitem(sys.modules, "dask_cuda", mod)
    monkeypatch.setitem(sys.modules, "dask_cuda.utils", utils)
    return calls


def test_connect_local_cuda_faked(fake_dask_cuda):
    cfg = cluster_cfg("cluster.kind=local-cuda", "cluster.n_workers=1",
                      "cluster.threads_per_worker=1", "cluster.memory_limit=1GiB")
    with connect(cfg) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        gpu = [w for w in workers if w["resources"].get("GPU") == 1]
        cpu = [w for w in workers if not w["resources"]]
        assert (len(gpu), len(cpu)) == (2, 1)  # get_n_gpus() = 2, plus the CPU worker
        assert model_annotations(client) == {"resources": {"GPU": 1}}
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    assert fake_dask_cuda["n_workers"] == 2 and fake_dask_cuda["resources"] == {"GPU": 1}


def test_connect_local_cuda_missing_package_or_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    with pytest.raises(DaskpathError, match=r"daskpath\[gpu\]"):
        with connect(cluster_cfg("cluster.kind=local-cuda")):
            pass
    mod = types.ModuleType("dask_cuda")
    mod.LocalCUDACluster = object
    utils = types.ModuleType("dask_cuda.utils")

    def no_nvml():
        raise RuntimeError("NVMLError_LibraryNotFound")

    utils.get_n_gpus = no_nvml
    monkeypatch.setitem(sys.modules, "dask_cuda", mod)
    monkeypatch.setitem(sys.modules, "dask_cuda.utils", utils)
    with pytest.raises(DaskpathError, match="no usable GPU.*cluster.kind: local"):
        with connect(cluster_cfg("cluster.kind=local-cuda")):
            pass


def test_connect_slurm_without_sbatch(monkeypatch):
    pytest.importorskip("dask_jobqueue")
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "sbatch" else real(name))
    with pytest.raises(DaskpathError, match="sbatch is not on PATH"):
        with connect(cluster_cfg("cluster.kind=slurm")):
            pass


def test_connect_slurm_scales_or_adapts(monkeypatch):
    """SLURMCluster replaced by a LocalCluster stand-in: checks what connect() asks of it."""
    jq = pytest.importorskip("dask_jobqueue")
    import shutil

    from distributed import LocalCluster

    seen = {}

    class FakeSLURM(LocalCluster):
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs
            super().__init__(n_workers=0, dashboard_address="127.0.0.1:0", processes=False)

        def scale(self, n=None, jobs=0, **kw):
            seen.setdefault("scale", []).append(jobs)
            return super().scale(jobs)

        def adapt(self, **kw):
            seen["adapt"] = kw

    monkeypatch.setattr(jq, "SLURMCluster", FakeSLURM)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/" + name)
    with connect(cluster_cfg("cluster.kind=slurm", "cluster.slurm.jobs=2",
                             "cluster.slurm.cores=1", "cluster.startup_timeout=60")) as client:
        assert len(client.scheduler_info()["workers"]) >= 1
    assert 2 in seen["scale"] and seen["kwargs"]["cores"] == 1
    cfg = cluster_cfg("cluster.kind=slurm", "cluster.slurm.adaptive=true",
                      "cluster.slurm.minimum_jobs=0", "cluster.slurm.maximum_jobs=3")
    with connect(cfg):
        pass
    assert seen["adapt"] == {"minimum_jobs": 0, "maximum_jobs": 3}


def test_connect_kubernetes_adds_gpu_group(monkeypatch):
    op = pytest.importorskip("dask_kubernetes.operator")
    from distributed import LocalCluster

    seen = {}

    class FakeKube(LocalCluster):
        def __init__(self, custom_cluster_spec=None, namespace=None, **kw):
            seen["spec"], seen["namespace"] = custom_cluster_spec, namespace
            super().__init__(n_workers=1, threads_per_worker=1,
                             dashboard_address="127.0.0.1:0", processes=False)

        def add_worker_group(self, name, n_workers=0, custom_spec=None, **kw):
            seen["group"] = (name, n_workers, custom_spec)

    class FakePolicy:
        def __init__(self, spec):
            seen["policy"] = spec

        def exists(self):
            return False

        def create(self):
            seen["created"] = "spec" not in seen  # before the DaskCluster

    import kr8s.objects

    monkeypatch.setattr(op, "KubeCluster", FakeKube)
    monkeypatch.setattr(kr8s.objects, "object_from_spec", FakePolicy)
    cfg = cluster_cfg("cluster.kind=kubernetes", "cluster.kubernetes.gpu_workers=3",
                      "cluster.kubernetes.namespace=lab")
    with connect(cfg):
        pass
    assert seen["policy"]["kind"] == "NetworkPolicy" and seen["created"] is True
    assert seen["spec"]["kind"] == "DaskCluster" and seen["namespace"] == "lab"
    name, n, worker = seen["group"]
    assert (name, n) == ("gpu", 3)
    assert worker["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_connect_kubernetes_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    with pytest.raises(DaskpathError, match=r"daskpath\[kubernetes\]"):
        with connect(cluster_cfg("cluster.kind=kubernetes")):
            pass


@pytest.mark.gpu
def test_real_local_cuda_cluster():
    """Runs where an NVIDIA GPU and dask-cuda exist; skipped elsewhere."""
    pytest.importorskip("dask_cuda", reason="dask-cuda not installed (pip install 'daskpath[gpu]')")
    try:
        from dask_cuda.utils import get_n_gpus

        n = get_n_gpus()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no usable GPU: {type(e).__name__}: {e}")
    if n < 1:
        pytest.skip("no GPU")
    cfg = cluster_cfg("cluster.kind=local-cuda", "cluster.n_workers=1")
    with connect(cfg) as client:
        assert model_annotations(client) == {"resources": {"GPU": 1}}
        with dask.annotate(resources={"GPU": 1}):
            fut = client.submit(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert fut.result(timeout=120)


# -------------------------------------------------------------------------- Kubernetes manifests
def _validate(obj, schema: dict, path: str = "$") -> None:
    """A small OpenAPI v3 (Kubernetes structural schema) validator: types, required fields,
    unknown fields (as kubectl's strict field validation rejects them)."""
    if obj is None and schema.get("nullable"):
        return
    if schema.get("x-kubernetes-int-or-string"):
        assert isinstance(obj, (int, str)), f"{path}: int or string expected, got {obj!r}"
        return
    t = schema.get("type")
    if t == "object" or "properties" in schema:
        assert isinstance(obj, dict), f"{path}: object expected, got {type(obj).__name__}"
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            assert req in obj, f"{path}: required field '{req}' missing"
        for k, v in obj.items():
            if k in props:
                _validate(v, props[k], f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                _validate(v, schema["additionalProperties"], f"{path}.{k}")
            elif not (schema.get("x-kubernetes-preserve-unknown-fields")
                      or schema.get("additionalProperties") is True):
                raise AssertionError(f"{path}: unknown field '{k}'")
    elif t == "array":
        assert isinstance(obj, list), f"{path}: array expected"
        for i, v in enumerate(obj):
            _validate(v, schema.get("items", {}), f"{path}[{i}]")
    elif t == "string":
        assert isinstance(obj, str), f"{path}: string expected, got {obj!r}"
    elif t == "integer":
        assert isinstance(obj, int) and not isinstance(obj, bool), f"{path}: integer expected"
    elif t == "boolean":
        assert isinstance(obj, bool), f"{path}: boolean expected"
    if "enum" in schema:
        assert obj in schema["enum"], f"{path}: {obj!r} not in {schema['enum']}"


@functools.lru_cache(maxsize=1)
def _crd_schemas() -> dict[str, dict] | None:
    """kind -> openAPIV3Schema from the CRDs shipped inside dask-kubernetes (None if absent)."""
    try:
        import dask_kubernetes
    except ImportError:
        return None
    crds = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
    out = {}
    for p in crds.glob("*.yaml"):
        crd = yaml.load(p.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        out[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out or None


def _structural_check(doc: dict) -> None:
    """Without the CRDs: the fields the operator reads."""
    assert doc["apiVersion"] == "kubernetes.dask.org/v1"
    spec = doc["spec"]
    if doc["kind"] == "DaskJob":
        assert spec["job"]["spec"]["containers"]
        spec = spec["cluster"]["spec"]
    if doc["kind"] in ("DaskCluster", "DaskJob"):
        assert spec["scheduler"]["spec"]["containers"] and spec["scheduler"]["service"]["ports"]
        assert isinstance(spec["worker"]["replicas"], int) and spec["worker"]["spec"]["containers"]
    if doc["kind"] == "DaskWorkerGroup":
        assert isinstance(spec["cluster"], str) and spec["worker"]["spec"]["containers"]


def _check_docs(docs: list[dict]) -> None:
    schemas = _crd_schemas()
    for doc in docs:
        if doc["kind"] in ("ConfigMap", "NetworkPolicy"):
            continue
        _structural_check(doc)
        if schemas is not None:
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
            _validate(body, schemas[doc["kind"]], doc["kind"])


def _pods(docs: list[dict]):
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "DaskJob":
            yield spec["job"]["spec"]
            spec = spec["cluster"]["spec"]
        if doc["kind"] in ("DaskJob", "DaskCluster"):
            yield spec["scheduler"]["spec"]
            yield spec["worker"]["spec"]
        if doc["kind"] == "DaskWorkerGroup":
            yield spec["worker"]["spec"]


def _assert_non_root(docs: list[dict]) -> None:
    n = 0
    for pod in _pods(docs):
        n += 1
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 1
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert n


def _assert_locked_down(docs: list[dict]) -> None:
    for pod in _pods(docs):
        assert pod["automountServiceAccountToken"] is False
        names = {v["name"] for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
            assert [m["mountPath"] for m in writable] == ["/tmp"]
            assert {m["name"] for m in c["volumeMounts"]} <= names


def test_kubernetes_manifests_valid_and_hardened():
    cfg = cluster_cfg("cluster.kubernetes.gpu_workers=2", "cluster.kubernetes.namespace=lab")
    docs = kubernetes_manifests(cfg)
    assert [d["kind"] for d in docs] == ["DaskCluster", "DaskWorkerGroup", "NetworkPolicy"]
    _check_docs(docs)
    _assert_non_root(docs)
    _assert_locked_down(docs)
    cluster, group, policy = docs
    # only this cluster's pods (and labelled clients) reach the scheduler's ports
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "dask.org/cluster-name": "daskpath", "dask.org/component": "scheduler"}
    assert policy["metadata"]["namespace"] == "lab" and policy["spec"]["policyTypes"] == ["Ingress"]
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"dask.org/cluster-name": "daskpath"}}} in peers
    assert len(peers) == 2 and all(set(p) == {"podSelector"} for p in peers)
    assert cluster["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    assert group["spec"]["cluster"] == cluster["metadata"]["name"] == "daskpath"
    gpu = group["spec"]["worker"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["args"][0] == "dask-cuda-worker" and "GPU=1" in gpu["args"]
    cpu = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    # without GPU workers: the cluster and its policy
    assert [d["kind"] for d in kubernetes_manifests(cluster_cfg())] == ["DaskCluster", "NetworkPolicy"]


def test_kubernetes_tls_mounts_the_secret_and_speaks_tls(tmp_path):
    from daskpath.security import make_tls

    make_tls(tmp_path / "tls")
    cfg = cluster_cfg("cluster.kubernetes.gpu_workers=1", "cluster.security.kind=tls",
                      f"cluster.security.dir={tmp_path / 'tls'}")
    docs = kubernetes_manifests(cfg)
    _check_docs(docs)
    _assert_locked_down(docs)
    for pod in _pods(docs):
        secret = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert secret == [{"name": "tls", "secret": {"secretName": "daskpath-tls", "defaultMode": 0o400}}]
        args = pod["containers"][0]["args"]
        assert "--tls-ca-file=/etc/daskpath/tls/ca.pem" in args and "--tls-key=/etc/daskpath/tls/key.pem" in args
    sched = docs[0]["spec"]["scheduler"]["spec"]["containers"][0]["args"]
    assert "--protocol=tls" in sched
    for pod in list(_pods(docs))[1:]:  # workers dial the scheduler Service over TLS
        assert pod["containers"][0]["args"][1] == "tls://daskpath-scheduler:8786"
    with pytest.raises(DaskpathError, match="cluster.kind: address"):
        with connect(load_config(None, ["cluster.kind=kubernetes", "cluster.security.kind=tls",
                                        f"cluster.security.dir={tmp_path / 'tls'}"]).cluster):
            pass


def test_kubernetes_builtin_template_matches_operator_package():
    pytest.importorskip("dask_kubernetes.operator")
    cfg = cluster_cfg("cluster.kubernetes.gpu_workers=1")
    assert kubernetes_manifests(cfg, use_operator_package=False) == kubernetes_manifests(cfg)


# ---------------------------------------------------------------------------- cluster/ folder
def test_operator_files_present_and_parse():
    for rel in ["README.md", "slurm/jobqueue.yaml", "slurm/gpu-workers.sbatch",
                "slurm/run-cohort.sbatch", "kubernetes/daskjob.yaml",
                "kubernetes/operator-values.yaml", "kubernetes/Dockerfile"]:
        assert (CLUSTER_DIR / rel).is_file(), rel
    for p in CLUSTER_DIR.rglob("*.yaml"):
        list(yaml.safe_load_all(p.read_text()))


def test_daskjob_manifest_against_crd():
    docs = list(yaml.safe_load_all((CLUSTER_DIR / "kubernetes" / "daskjob.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ConfigMap", "DaskJob", "DaskWorkerGroup", "NetworkPolicy"]
    _check_docs(docs)
    _assert_non_root(docs)
    cm, job, cpu_group, policy = docs
    pods = list(_pods(docs))
    assert len(pods) == 4 and all(p["automountServiceAccountToken"] is False for p in pods)
    assert all(c["securityContext"]["readOnlyRootFilesystem"] for p in pods for c in p["containers"])
    assert policy["spec"]["podSelector"]["matchLabels"]["dask.org/component"] == "scheduler"
    driver = job["spec"]["job"]["spec"]["containers"][0]
    assert driver["args"][:2] == ["daskpath", "run"] and "$(DASK_SCHEDULER_ADDRESS)" in driver["args"]
    worker = job["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and "GPU=1" in worker["args"]
    assert cpu_group["spec"]["cluster"] == job["metadata"]["name"]  # operator names it after the job
    # the cohort config the driver runs is a valid daskpath config
    cohort = yaml.safe_load(cm["data"]["cohort.yaml"])
    load_config(None, cohort)


def test_helm_values_are_chart_keys():
    values = yaml.safe_load((CLUSTER_DIR / "kubernetes" / "operator-values.yaml").read_text())
    assert values["securityContext"]["runAsNonRoot"] is True
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    try:
        import dask_kubernetes
    except ImportError:
        pytest.skip("dask-kubernetes not installed: chart values.yaml not available to compare")
    chart = Path(dask_kubernetes.__file__).parent / (
        "operator/deployment/helm/dask-kubernetes-operator/values.yaml")
    known = yaml.safe_load(chart.read_text())

    def walk(ours, theirs, path=""):
        for k, v in ours.items():
            assert k in theirs, f"unknown chart value {path}{k}"
            if isinstance(v, dict) and isinstance(theirs[k], dict) and theirs[k]:
                walk(v, theirs[k], f"{path}{k}.")

    walk(values, known)


def test_jobqueue_yaml_renders_a_gpu_job():
    jq = pytest.importorskip("dask_jobqueue")
    conf = yaml.safe_load((CLUSTER_DIR / "slurm" / "jobqueue.yaml").read_text())
    slurm = dict(conf["jobqueue"]["slurm"])
    slurm["local-directory"] = None  # $TMPDIR is expanded on the node
    slurm["log-directory"] = None
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in slurm.items()}):
        with jq.SLURMCluster(scheduler_options={"host": "127.0.0.1", "dashboard": False}) as c:
            script = c.job_script()
    assert "#SBATCH --gres=gpu:4" in script and "-m dask_cuda.cli" in script
    assert "--resources GPU=1" in script and "module load cuda/12" in script


@pytest.mark.parametrize("script", ["gpu-workers.sbatch", "run-cohort.sbatch"])
def test_sbatch_scripts_are_valid_bash(script):
    path = CLUSTER_DIR / "slurm" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "#SBATCH --gres=gpu:" in text and "GPU=1" in text


# -------------------------------------------------------------------------------------- CLI
def test_cli_cluster_slurm_print(capsys):
    pytest.importorskip("dask_jobqueue")
    assert main(["cluster", "slurm", "--print", "--set", "cluster.slurm.gpus=2",
                 "--set", "cluster.slurm.queue=a100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/usr/bin/env bash")
    assert "#SBATCH --gres=gpu:2" in out and "#SBATCH -p a100" in out


def test_cli_cluster_kubernetes_print(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  kubernetes:\n    gpu_workers: 2\n    image: reg.example/daskpath:1\n")
    assert main(["cluster", "kubernetes", str(cfg), "--print"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["DaskCluster", "DaskWorkerGroup", "NetworkPolicy"]
    assert docs[1]["spec"]["worker"]["spec"]["containers"][0]["image"] == "reg.example/daskpath:1"
    _check_docs(docs)


def test_cli_cluster_needs_print_and_valid_config(capsys):
    assert main(["cluster", "slurm"]) == 2
    assert "add --print" in capsys.readouterr().err
    assert main(["cluster", "kubernetes", "--print", "--set", "cluster.kubernetes.run_as_user=0"]) == 2
    err = capsys.readouterr().err
    assert "cluster.kubernetes.run_as_user" in err and "Traceback" not in err


def test_free_port_helper_sanity():
    # the dashboard tests above bind ":0"; make sure loopback is usable at all
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


def test_local_workers_cap_tensorflow_threads(monkeypatch):
    """Several worker processes: each TensorFlow pool gets the worker's threads, not all cores."""
    from daskpath.cluster import local_cluster_kwargs
    from daskpath.config import load_config

    monkeypatch.delenv("DASKPATH_TF_THREADS", raising=False)
    kw = local_cluster_kwargs(load_config(None, ["cluster.n_workers=4"]).cluster, n_cores=8)
    assert kw["threads_per_worker"] == 2 and kw["env"] == {"DASKPATH_TF_THREADS": "2"}
    one = local_cluster_kwargs(load_config(None, ["cluster.n_workers=1"]).cluster, n_cores=8)
    assert "env" not in one  # one process: TensorFlow's own pool is already the machine
