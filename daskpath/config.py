"""Configuration: defaults in frozen dataclasses; a user's YAML and ``--set`` validated into them.

The dataclasses below are the one source of the defaults (:func:`defaults_from_dataclasses`).
``daskpath/default.yaml`` (copied to ``configs/default.yaml``) documents every key with its
default and a comment; it is not read at run time, and a test keeps it equal to the dataclasses,
key for key and value for value.

Precedence: package defaults < the user's YAML file < ``--set dotted.key=value`` overrides.
Validation happens before any work starts: an unknown key, a value of the wrong type or out of
range raises :class:`~daskpath.errors.ConfigError` naming the dotted key and the fix. Relative
paths (``slides``, ``output_dir``, ``cache_dir``) are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daskpath.errors import ConfigError

__all__ = [
    "STAGES",
    "Config",
    "default_dict",
    "defaults_from_dataclasses",
    "load_config",
    "parse_set",
]

from daskpath.stages import stage_names  # noqa: E402 - the stage registry (no stage imported)

STAGES = stage_names()
CLUSTER_KINDS = ("local", "local-cuda", "slurm", "kubernetes", "address")
AVAILABLE_CLUSTERS = CLUSTER_KINDS
SECURITY_KINDS = ("none", "temporary", "tls")


@dataclass(frozen=True)
class TilesConfig:
    size: int = 1024
    min_tissue: float = 0.5


@dataclass(frozen=True)
class TissueConfig:
    threshold: float = 0.035
    sigma: float = 4.0


@dataclass(frozen=True)
class SsimConfig:
    threshold: float = 0.4
    sigma: float = 1.5
    dtype: str = "float32"


@dataclass(frozen=True)
class RegistrationConfig:
    """Per-tile registration refinement (:mod:`daskpath.registration`)."""

    enabled: bool = True
    max_shift: int = 64
    min_tissue: float = 0.1


@dataclass(frozen=True)
class QcConfig:
    """Artefact QC in the preprocess stage (:mod:`daskpath.qc`)."""

    enabled: bool = True
    max_fraction: float = 0.02
    exclude: bool = True


@dataclass(frozen=True)
class NucleiConfig:
    model: str = "phantom"
    method: str = "nucleus"
    dab_threshold: float | str = 0.15
    stain_matrix: str = "hed"
    prob_thresh: float | None = None
    nms_thresh: float | None = None
    chunk_size: int | None = None


@dataclass(frozen=True)
class TranslateConfig:
    model: str = "phantom"
    batch_size: int = 8
    blend: str = "crop"
    norm_stats: str = "auto"


@dataclass(frozen=True)
class LayersConfig:
    downsample: int = 8


@dataclass(frozen=True)
class BaselinesConfig:
    """Stage ``baselines``: Ki67 ratio predicted from H&E alone, without translation."""

    methods: tuple[str, ...] = ("rf", "classifier")
    rf_model: str = "phantom"
    classifier_model: str = "phantom"
    batch_size: int = 16


@dataclass(frozen=True)
class CudaConfig:
    """``cluster.kind: local-cuda``: one dask-cuda worker per GPU (resource ``GPU=1``)."""

    visible_devices: str | None = None
    threads_per_worker: int = 1
    rmm_pool_size: str | None = None


@dataclass(frozen=True)
class SlurmConfig:
    """``cluster.kind: slurm``: dask-jobqueue ``SLURMCluster``; each SLURM job runs workers."""

    queue: str | None = None
    account: str | None = None
    cores: int = 4
    memory: str = "16GiB"
    processes: int = 1
    gpus: int = 0
    walltime: str = "04:00:00"
    jobs: int = 1
    adaptive: bool = False
    minimum_jobs: int = 1
    maximum_jobs: int = 10
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    python: str | None = None
    log_directory: str | None = None
    death_timeout: int = 60


@dataclass(frozen=True)
class KubernetesConfig:
    """``cluster.kind: kubernetes``: a DaskCluster run by the dask-kubernetes operator."""

    name: str = "daskpath"
    namespace: str | None = None
    image: str = "daskpath:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    workers: int = 2
    worker_cpu: str = "2"
    worker_memory: str = "8Gi"
    gpu_workers: int = 0
    gpu_worker_cpu: str = "4"
    gpu_worker_memory: str = "32Gi"
    run_as_user: int = 1000
    idle_timeout: int = 0


@dataclass(frozen=True)
class SecurityConfig:
    """``cluster.security``: TLS between client, scheduler and workers (:mod:`daskpath.security`)."""

    kind: str = "none"
    dir: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class ClusterConfig:
    kind: str = "local"
    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str = "auto"
    dashboard_address: str | None = "127.0.0.1:8787"
    scheduler_host: str | None = "127.0.0.1"
    interface: str | None = None
    local_directory: str | None = None
    startup_timeout: int = 600
    cuda: CudaConfig = field(default_factory=CudaConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)


@dataclass(frozen=True)
class Config:
    """Validated run configuration (see ``configs/default.yaml`` for every key)."""

    slides: str | None = None
    output_dir: str = "daskpath_out"
    chunk_size: int | None = None
    cache_dir: str | None = None
    stages: tuple[str, ...] = STAGES
    overwrite: bool = False
    retries: int = 2
    tiles: TilesConfig = field(default_factory=TilesConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    ssim: SsimConfig = field(default_factory=SsimConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    qc: QcConfig = field(default_factory=QcConfig)
    nuclei: NucleiConfig = field(default_factory=NucleiConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of YAML types (mappings, lists, scalars)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (what ``yaml.safe_load`` gives)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def defaults_from_dataclasses() -> dict[str, Any]:
    """Every config key with its default, from the dataclasses (the one source of defaults).

    Returns
    -------
    dict
        Nested like the YAML (``{"tiles": {"size": 1024, ...}, ...}``), in field order, with
        YAML types: ``default.yaml`` parsed with ``yaml.safe_load`` equals it.
    """
    return Config().to_dict()


def default_dict() -> dict[str, Any]:
    """The package's default configuration as a nested dict (built at call time).

    The same as :func:`defaults_from_dataclasses`; ``default.yaml`` documents these values.
    """
    return defaults_from_dataclasses()


def _merge(base: dict[str, Any], over: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base:
            close = difflib.get_close_matches(str(k), [str(b) for b in base], n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{key}'{hint}; valid keys here: "
                f"{', '.join(prefix + str(b) for b in base)}"
            )
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' must be a mapping of sub-keys, got {show(v)}")
            out[k] = _merge(base[k], v, prefix=f"{key}.")
        else:
            out[k] = v
    return out


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected dotted.key=value, e.g. tiles.size=2048")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"--set '{item}': empty key; expected dotted.key=value")
        try:
            value = yaml.load(raw, Loader=_NoAliasLoader) if raw.strip() else None  # noqa: S506
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{p}' is set twice as a value and a mapping")
        node[parts[-1]] = value
    return out


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error line stays one short line.

    Containers are summarised by type and length first: ``repr`` of a deeply shared YAML
    structure (an alias bomb) would otherwise take minutes and gigabytes.
    """
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    r = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
    r.maxlevel, r.maxstring, r.maxother = 2, limit, limit
    try:
        text = r.repr(value)
    except Exception:  # a value whose repr fails still gets a one-line message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors/aliases: a config never needs them, and a few
    hundred bytes of nested aliases (a "billion laughs" document) expand to gigabytes."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in a daskpath config",
                event.start_mark)
        return super().compose_node(parent, index)


#: Largest config file read (bytes); a real config is a few hundred bytes.
MAX_CONFIG_BYTES = 1 << 20


def safe_load_config_text(text: str, where: str) -> Any:
    """Parse YAML without aliases; raise :class:`ConfigError` naming ``where`` on failure."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "syntax error"
        fix = "write the values out" if "aliases" in problem else "fix its syntax"
        raise ConfigError(f"config file {where}{line} is not valid YAML ({problem}); {fix}") from e


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {show(value)}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' must be an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {show(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {show(value)}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        value = data.get(f.name)
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value or {}, prefix=f"{key}.")
        else:
            kwargs[f.name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    def bad(key: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"config key '{key}' = {show(value)} is invalid: {want}")

    for s in cfg.stages:
        if s not in STAGES:
            raise bad("stages", list(cfg.stages), f"stages are {', '.join(STAGES)}")
    if not 0 <= cfg.retries <= 20:
        raise bad("retries", cfg.retries, "use 0..20")
    if not cfg.stages:
        raise bad("stages", [], "give at least one stage, e.g. [preprocess]")
    if "preprocess" not in cfg.stages:
        raise bad("stages", list(cfg.stages), "every run needs 'preprocess' (it selects the tiles)")
    if "translate" in cfg.stages and "nuclei" not in cfg.stages:
        raise bad("stages", list(cfg.stages), "'translate' is scored by the nuclei stage: add 'nuclei'")
    if cfg.nuclei.method not in ("nucleus", "two-channel"):
        raise bad("nuclei.method", cfg.nuclei.method, "nucleus or two-channel")
    thr = cfg.nuclei.dab_threshold
    if isinstance(thr, str) and thr != "auto":
        raise bad("nuclei.dab_threshold", thr, "a DAB optical density (e.g. 0.15) or auto")
    if not isinstance(thr, str) and not 0 < thr < 3:
        raise bad("nuclei.dab_threshold", thr, "a DAB optical density in (0, 3), or auto")
    if cfg.nuclei.stain_matrix not in ("hed", "macenko"):
        raise bad("nuclei.stain_matrix", cfg.nuclei.stain_matrix, "hed or macenko")
    for k in ("prob_thresh", "nms_thresh"):
        v = getattr(cfg.nuclei, k)
        if v is not None and not 0 < v < 1:
            raise bad(f"nuclei.{k}", v, "in (0, 1), or null for the model's own")
    if cfg.translate.batch_size < 1:
        raise bad("translate.batch_size", cfg.translate.batch_size, ">= 1")
    if cfg.translate.blend not in ("crop", "feather"):
        raise bad("translate.blend", cfg.translate.blend, "crop or feather")
    if cfg.translate.norm_stats not in ("auto", "slide", "tile", "running"):
        raise bad("translate.norm_stats", cfg.translate.norm_stats, "auto, slide, tile or running")
    if cfg.nuclei.chunk_size is not None and not 256 <= cfg.nuclei.chunk_size <= 8192:
        raise bad("nuclei.chunk_size", cfg.nuclei.chunk_size, "use 256..8192 px (or null: tiles.size)")
    for m in cfg.baselines.methods:
        if m not in ("rf", "classifier"):
            raise bad("baselines.methods", list(cfg.baselines.methods), "a subset of [rf, classifier]")
    if cfg.baselines.batch_size < 1:
        raise bad("baselines.batch_size", cfg.baselines.batch_size, ">= 1")
    if cfg.chunk_size is not None and not 256 <= cfg.chunk_size <= 32768:
        raise bad("chunk_size", cfg.chunk_size, "use 256..32768 px (or null for the default)")
    if not 64 <= cfg.tiles.size <= 65536:
        raise bad("tiles.size", cfg.tiles.size, "use 64..65536 px")
    if not 0.0 <= cfg.tiles.min_tissue <= 1.0:
        raise bad("tiles.min_tissue", cfg.tiles.min_tissue, "a fraction in [0, 1]")
    if not -1.0 <= cfg.ssim.threshold <= 1.0:
        raise bad("ssim.threshold", cfg.ssim.threshold, "SSIM is in [-1, 1]")
    if cfg.ssim.sigma <= 0:
        raise bad("ssim.sigma", cfg.ssim.sigma, "must be > 0 (design: 1.5)")
    if cfg.ssim.dtype not in ("float32", "float64"):
        raise bad("ssim.dtype", cfg.ssim.dtype, "float32 or float64")
    if not 0 <= cfg.registration.max_shift <= 1024:
        raise bad("registration.max_shift", cfg.registration.max_shift, "use 0..1024 px")
    if not 0.0 <= cfg.registration.min_tissue <= 1.0:
        raise bad("registration.min_tissue", cfg.registration.min_tissue, "a fraction in [0, 1]")
    if not 0.0 <= cfg.qc.max_fraction <= 1.0:
        raise bad("qc.max_fraction", cfg.qc.max_fraction, "a fraction of the tile in [0, 1]")
    if not 0 < cfg.tissue.threshold < 3:
        raise bad("tissue.threshold", cfg.tissue.threshold, "an optical density in (0, 3)")
    if cfg.tissue.sigma < 0:
        raise bad("tissue.sigma", cfg.tissue.sigma, "must be >= 0 px")
    if cfg.layers.downsample < 0:
        raise bad("layers.downsample", cfg.layers.downsample, "0 (off) or a factor >= 1")
    _check_cluster(cfg.cluster, bad)


def _check_cluster(c: ClusterConfig, bad: typing.Callable[[str, Any, str], ConfigError]) -> None:
    """The ``cluster.*`` checks (packages are checked when the cluster starts, not here)."""
    if c.kind not in CLUSTER_KINDS:
        raise bad("cluster.kind", c.kind, f"one of {', '.join(CLUSTER_KINDS)}")
    if c.security.kind not in SECURITY_KINDS:
        raise bad("cluster.security.kind", c.security.kind, f"one of {', '.join(SECURITY_KINDS)}")
    if c.security.kind == "tls":
        from daskpath.security import tls_files

        tls_files(c.security)  # every file present, before any work
    if c.security.kind == "temporary" and c.kind in ("kubernetes", "address"):
        raise bad("cluster.security.kind", "temporary",
                  f"a temporary CA cannot reach a {c.kind} scheduler started elsewhere; use "
                  "kind: tls with the files of `daskpath cluster tls DIR`")
    if c.kind not in AVAILABLE_CLUSTERS:
        raise bad(
            "cluster.kind",
            c.kind,
            f"not implemented in this version (available: {', '.join(AVAILABLE_CLUSTERS)})",
        )
    min_workers = 0 if c.kind == "local-cuda" else 1  # local-cuda: 0 = GPU workers only
    if c.n_workers is not None and c.n_workers < min_workers:
        raise bad("cluster.n_workers", c.n_workers, f"at least {min_workers} (or null)")
    if c.threads_per_worker is not None and c.threads_per_worker < 1:
        raise bad("cluster.threads_per_worker", c.threads_per_worker, ">= 1 (or null)")
    if c.startup_timeout < 1:
        raise bad("cluster.startup_timeout", c.startup_timeout, "seconds to wait for workers, >= 1")
    if c.cuda.threads_per_worker < 1:
        raise bad("cluster.cuda.threads_per_worker", c.cuda.threads_per_worker, ">= 1")
    s = c.slurm
    for key, value in (("cores", s.cores), ("processes", s.processes), ("jobs", s.jobs),
                       ("minimum_jobs", s.minimum_jobs), ("maximum_jobs", s.maximum_jobs)):
        if value < (0 if key == "minimum_jobs" else 1):
            raise bad(f"cluster.slurm.{key}", value, "must be >= 1 (minimum_jobs >= 0)")
    if s.gpus < 0:
        raise bad("cluster.slurm.gpus", s.gpus, "GPUs per job, >= 0")
    if s.minimum_jobs > s.maximum_jobs:
        raise bad("cluster.slurm.minimum_jobs", s.minimum_jobs,
                  f"must be <= cluster.slurm.maximum_jobs ({s.maximum_jobs})")
    if s.processes > s.cores:
        raise bad("cluster.slurm.processes", s.processes,
                  f"worker processes per job must be <= cluster.slurm.cores ({s.cores})")
    if s.gpus and s.gpus > s.cores:
        raise bad("cluster.slurm.gpus", s.gpus,
                  f"one worker per GPU needs at least one core each (cluster.slurm.cores = {s.cores})")
    k = c.kubernetes
    if k.workers < 0 or k.gpu_workers < 0:
        raise bad("cluster.kubernetes.workers", (k.workers, k.gpu_workers), "replicas must be >= 0")
    if k.workers + k.gpu_workers < 1:
        raise bad("cluster.kubernetes.workers", k.workers,
                  "at least one worker (workers or gpu_workers)")
    if k.run_as_user < 1:
        raise bad("cluster.kubernetes.run_as_user", k.run_as_user, "a non-root uid (>= 1)")
    if k.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
        raise bad("cluster.kubernetes.image_pull_policy", k.image_pull_policy,
                  "Always, IfNotPresent or Never")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] | dict[str, Any] = (),
) -> Config:
    """Load, merge and validate a configuration.

    Parameters
    ----------
    path : path-like, optional
        User YAML file; ``None`` uses the defaults only.
    overrides : list of "dotted.key=value" strings, or a nested dict
        Applied last (the CLI's ``--set``).

    Raises
    ------
    ConfigError
        Missing/unparsable file, unknown key, wrong type or out-of-range value.
    """
    data = default_dict()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass an existing YAML file")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} is {p.stat().st_size} bytes (limit "
                              f"{MAX_CONFIG_BYTES}); is it really a daskpath config?")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text; save it as UTF-8") from e
        user = safe_load_config_text(text, str(p))
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise ConfigError(f"config file {p} must be a mapping of keys, got {type(user).__name__}")
        data = _merge(data, user)
    over = parse_set(list(overrides)) if not isinstance(overrides, dict) else overrides
    data = _merge(data, over)
    cfg = _build(Config, data)
    _check(cfg)
    return cfg
