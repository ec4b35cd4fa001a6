"""Stages: the units of a run, and the one registry that config, run loop, tables and report read.

A stage is a class with a ``name``, the stages it ``requires``, the config keys it depends on
(:meth:`Stage.keys`), the models it loads (:meth:`Stage.models`), the files it publishes
(:meth:`Stage.artefacts`), a :meth:`Stage.run` that computes one slide (chunk tasks submitted to
the cluster through :meth:`SlideContext.compute`, each chunk recorded so an interrupted run
resumes) and returns the slide's per-tile part table, and :meth:`Stage.tile_columns` /
:meth:`Stage.summarize` that turn a part into columns of ``tiles.parquet`` and ``slides.csv``.

Adding a stage is one module defining a :class:`Stage` subclass plus one line in
:data:`REGISTRY` (see ``docs/writing-a-stage.md``).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daskpath.publish import Artefact

if TYPE_CHECKING:
    import pandas as pd

    from daskpath.config import Config

__all__ = ["REGISTRY", "SlideContext", "Stage", "get_stage", "stage_names", "Interrupted"]

log = logging.getLogger("daskpath.pipeline")

#: name -> "module:Class", in run order (a stage comes after the stages it requires).
REGISTRY: dict[str, str] = {
    "preprocess": "daskpath.stages.preprocess:PreprocessStage",
    "nuclei": "daskpath.stages.nuclei:NucleiStage",
    "translate": "daskpath.stages.translate:TranslateStage",
    "baselines": "daskpath.stages.baselines:BaselinesStage",
}

_INSTANCES: dict[str, Stage] = {}
_LOCK = threading.Lock()


def stage_names() -> tuple[str, ...]:
    """Registered stage names in run order (no stage module is imported)."""
    return tuple(REGISTRY)


def get_stage(name: str) -> Stage:
    """The registered stage ``name`` (imported on first use)."""
    with _LOCK:
        if name not in _INSTANCES:
            mod, _, cls = REGISTRY[name].partition(":")
            _INSTANCES[name] = getattr(importlib.import_module(mod), cls)()
        return _INSTANCES[name]


class Interrupted(Exception):
    """The run was asked to stop (signal); raised in slide threads."""


class Stage:
    """Base class of a stage (see module docstring). Subclasses set the class attributes."""

    #: registry name, also the ``stages`` config value
    name: str = ""
    #: stages whose part tables this stage reads
    requires: tuple[str, ...] = ()
    #: bump when the stage's results change for the same inputs and keys
    version: int = 1
    #: config sections listed by ``daskpath config`` for this stage (documentation only)
    config_sections: tuple[str, ...] = ()

    def keys(self, cfg: Config) -> dict[str, Any]:
        """Config values the stage's results depend on, by dotted key."""
        return {}

    def models(self, cfg: Config) -> dict[str, tuple[Path | None, str]]:
        """Models the stage loads: ``{config key: (file or folder or None, name)}``."""
        return {}

    def check(self, cfg: Config) -> None:
        """Fail fast, before any slide is touched (a mistyped model path, ...).

        Default: resolve :meth:`models` (which raises :class:`~daskpath.errors.ModelError`).
        """
        self.models(cfg)

    def upstream(self, ctx: SlideContext) -> dict[str, Any]:
        """What the stage reads from its upstream stages (enters the fingerprint).

        Default: the upstream stages' fingerprints. Stages that read only the kept tiles use
        :meth:`SlideContext.kept_digest`, so a change that leaves the kept tiles alone does not
        recompute them.
        """
        return {r: ctx.fps[r] for r in self.requires}

    def artefacts(self, cfg: Config) -> list[Artefact]:
        """Files/folders the stage writes in its work folder and publishes."""
        return []

    def run(self, ctx: SlideContext) -> pd.DataFrame:
        """Compute one slide; return its part table (one row per tile, ``y0, x0`` + columns)."""
        raise NotImplementedError

    def tile_columns(self, part: pd.DataFrame, keep: np.ndarray, cfg: Config) -> dict[str, Any]:
        """Columns this stage adds to ``tiles.parquet`` (arrays aligned with the tile table)."""
        return {}

    def summarize(self, part: pd.DataFrame, keep: np.ndarray, cfg: Config) -> dict[str, Any]:
        """Columns this stage adds to the slide's row of ``slides.csv``."""
        return {}


@dataclass
class StageCounts:
    """Chunk tasks of one stage of one slide: ``total``, and ``done`` by an earlier run."""

    total: int = 0
    done: int = 0

    @property
    def computed(self) -> int:
        return self.total - self.done


#: Seconds between two looks at the scheduler for finished chunk tasks while a stage computes.
PROGRESS_POLL = 1.0


@dataclass
class _Shown:
    """A stage's chunk counts as reported (progress, Prometheus): known, resumed, computed."""

    total: int = 0
    resumed: int = 0
    finished: int = 0  # computed in this run and finished
    pushed: int = 0  # ``finished`` as last sent to the scheduler's metrics


def _chunk_keys(tasks: Sequence[Any]) -> list[Any]:
    """Keys of the chunk tasks :func:`daskpath.resume.recorded` made (computing, not loading a
    record) in the graphs of ``tasks``; each graph layer is looked at once, and only layers
    that are plain dicts (what ``dask.delayed`` makes) are read key by key."""
    from dask.base import is_dask_collection
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    from daskpath.resume import RECORD_PREFIX

    def chunk(k: Any) -> bool:
        name = k[0] if isinstance(k, tuple) and k else k
        return isinstance(name, str) and name.startswith(RECORD_PREFIX)

    keys: set[Any] = set()
    seen: set[str] = set()
    for t in tasks:
        if chunk(getattr(t, "key", None)):
            keys.add(t.key)
        if not is_dask_collection(t):
            continue
        g = t.__dask_graph__()
        layers = g.layers.items() if isinstance(g, HighLevelGraph) else [("", g)]
        for name, layer in layers:
            if name and name in seen:
                continue
            seen.add(name)
            if isinstance(layer, (dict, MaterializedLayer)) or chunk(name):
                keys.update(k for k in layer if chunk(k))
    return sorted(keys, key=str)


class _ChunkProgress:
    """The chunk tasks of one :meth:`SlideContext.compute`: announced, then followed on the
    scheduler until they finish (a failed look-up stops the following; the counts are then
    completed when the computation is)."""

    def __init__(self, ctx: SlideContext, tasks: Sequence[Any], label: str):
        self.ctx = ctx
        self.label = label
        self.pending = set(_chunk_keys(tasks))
        self.last = 0.0
        shown = ctx._shown.setdefault(label, _Shown())
        # the chunks counted (recorded, note_chunks) since the stage's last computation
        c = ctx.counts.get(ctx.stage) or StageCounts()
        noted = ctx._noted.setdefault(ctx.stage, StageCounts())
        total, resumed = c.total - noted.total, c.done - noted.done
        noted.total, noted.done = c.total, c.done
        # recorded chunk tasks nobody counted (a library function without note_chunks)
        total += max(0, len(self.pending) - (total - resumed))
        self.computed = total - resumed  # what this call reports as finished when it succeeds
        self.finished = 0
        shown.total += total
        shown.resumed += resumed
        if total:
            self._report(total, 0, resumed)
            self.push([], None)

    def _report(self, submitted: int, finished: int, resumed: int = 0) -> None:
        if self.ctx.on_chunks is not None:
            self.ctx.on_chunks(submitted, finished, slide=self.ctx.slide, stage=self.label,
                               resumed=resumed)

    def _finish(self, n: int) -> None:
        n = min(n, self.computed - self.finished)
        if n <= 0:
            return
        self.finished += n
        self.ctx._shown[self.label].finished += n
        self._report(0, n)

    def poll(self, anchor: Any) -> None:
        """Count the chunk tasks finished since the last look (at most every PROGRESS_POLL s)."""
        now = time.monotonic()
        if not self.pending or self.ctx._no_probe or now - self.last < PROGRESS_POLL:
            return
        self.last = now
        done = self.push(list(self.pending), anchor)
        if done is None:
            return
        self.pending.difference_update(done)
        self._finish(len(done))

    def push(self, keys: list[Any], anchor: Any) -> list[Any] | None:
        """One look at the scheduler (Scheduler.get_task_status): which of ``keys`` finished
        (None: the graph holding ``anchor`` is not there yet, or the look failed); and the
        counts to the scheduler's Prometheus gauges."""
        from daskpath.monitor import push_stage_chunks

        ctx = self.ctx
        done = None
        if keys and not ctx._no_probe:
            try:
                states = ctx.client.sync(ctx.client.scheduler.get_task_status,
                                         keys=[anchor, *keys])
            except Exception as e:  # noqa: BLE001 - progress must never fail a stage
                log.debug("chunk progress of %s/%s not followed on the scheduler: %s",
                          self.label, ctx.slide, e)
                ctx._no_probe = True  # counted as computations finish from now on
            else:
                if states.get(anchor) is not None:  # the graph has reached the scheduler
                    finished = (None, "memory", "released", "forgotten")
                    done = [k for k in keys if states.get(k, "waiting") in finished]
        if not ctx._no_metrics:
            shown = ctx._shown[self.label]
            metrics = {"stage": self.label, "slide": ctx.slide, "total": shown.total,
                       "resumed": shown.resumed, "done": shown.resumed + shown.finished,
                       "computed": shown.finished - shown.pushed}
            try:
                push_stage_chunks(ctx.client, **metrics)
            except Exception as e:  # noqa: BLE001 - e.g. no daskpath on the scheduler
                log.debug("no chunk metrics on the scheduler: %s", e)
                ctx._no_metrics = True
            else:
                shown.pushed += metrics["computed"]
        return done

    def close(self, ok: bool) -> None:
        """After the computation: on success every chunk task of it is finished; on failure
        (or a stop) the unfinished ones leave the totals (the slide's failure is reported)."""
        left = self.computed - self.finished
        if ok:
            self._finish(left)
        elif left > 0:
            self.ctx._shown[self.label].total -= left
            self._report(-left, 0)
        if ok and self.computed:  # (after a failure or a stop the cluster may be going away)
            self.push([], None)


@dataclass
class SlideContext:
    """What a stage's :meth:`Stage.run` gets for one slide.

    ``work`` is the stage's own work folder (fingerprinted); write artefacts and chunk records
    there. ``parts`` holds the part tables of the stages already run for this slide.
    """

    slide: str
    he: str
    ihc: str
    cfg: Config
    out: Path
    client: Any
    stop: threading.Event
    work: Path = Path()
    stage: str = ""
    fps: dict[str, str] = field(default_factory=dict)
    parts: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, StageCounts] = field(default_factory=dict)
    #: progress: ``on_chunks(submitted, finished, slide=, stage=, resumed=)``, increments of the
    #: stage's chunk tasks (see :meth:`compute`)
    on_chunks: Callable[..., None] | None = None
    _pair: Any = None
    #: per progress label (a stage, or a part of one): the chunk counts reported so far
    _shown: dict[str, _Shown] = field(default_factory=dict, repr=False)
    #: per stage: ``counts`` as of the stage's last computation
    _noted: dict[str, StageCounts] = field(default_factory=dict, repr=False)
    _no_probe: bool = field(default=False, repr=False)  # the scheduler look-up failed once
    _no_metrics: bool = field(default=False, repr=False)  # the scheduler's metrics too

    # ---- inputs ----------------------------------------------------------------------------
    def pair(self):
        """The slide pair (``xarray.Dataset``), flat rasters ingested under ``cache_dir``."""
        if self._pair is None:
            from daskpath.io import open_pair

            cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "cache"
            self._pair = open_pair(self.he, self.ihc, chunk_size=self.cfg.chunk_size, cache_dir=cache)
        return self._pair

    def tiles(self) -> tuple[pd.DataFrame, np.ndarray]:
        """The slide's tile table (preprocess part) and its keep mask under the current thresholds."""
        from daskpath.stages.preprocess import tile_keep

        tiles = self.parts["preprocess"]
        return tiles, tile_keep(tiles, self.cfg)

    def kept_digest(self) -> dict[str, Any]:
        """Digest of the tile grid and the kept tiles (what model stages read from preprocess)."""
        import hashlib

        tiles, keep = self.tiles()
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(tiles[["y0", "x0", "height", "width"]].to_numpy(np.int64)).tobytes())
        h.update(np.packbits(keep).tobytes())
        return {"kept tiles": f"{int(keep.sum())}/{len(keep)}:{h.hexdigest()[:16]}"}

    # ---- computing -------------------------------------------------------------------------
    def recorded(self, task: Any, name: str, kind: str = "npz") -> Any:
        """``task`` (a Delayed) recorded as ``chunks/<name>.<kind>`` of this stage's work folder.

        On a rerun the record is loaded instead (the task's inputs leave the graph), so an
        interrupted stage recomputes only what was in flight. Counts toward the resume line.
        """
        from daskpath.resume import recorded

        c = self.counts.setdefault(self.stage, StageCounts())
        t, done = recorded(task, self.work / "chunks" / f"{name}.{kind}", kind)
        c.total += 1
        c.done += int(done)
        return t

    def record_dir(self, sub: str = "") -> Path:
        """A folder of chunk records inside this stage's work folder (for library functions
        that record their own chunks, e.g. ``measure_nuclei(record_dir=...)``)."""
        d = self.work / "chunks" / sub if sub else self.work / "chunks"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def compute(self, tasks: Sequence[Any], *, resources: dict | None = None,
                label: str | None = None) -> list[Any]:
        """Submit ``tasks`` (Delayed / collections) to the cluster and wait for all of them.

        Retries ``cfg.retries`` times; the stop event (a signal) cancels them. The submission
        is the span ``<label>/<slide>`` of the Dask dashboard. Chunk progress: the chunk tasks
        counted since the stage's last call (:meth:`recorded`, :meth:`note_chunks`) are
        reported to ``on_chunks`` as submitted, and the recorded chunk tasks of this graph,
        looked up on the scheduler every :data:`PROGRESS_POLL` seconds, as finished; the
        scheduler's Prometheus gauges follow (:func:`daskpath.monitor.stage_chunks`).

        ``label`` (default: the stage's name) names a part of a stage that progress shows on
        its own line, e.g. ``translate.nuclei`` (the nuclei on the virtual IHC).
        """
        from distributed import span, wait

        tasks = list(tasks)
        if not tasks:
            return []
        self._check_stop()
        label = label or self.stage or "compute"
        chunks = _ChunkProgress(self, tasks, label)
        with span(f"{label}/{self.slide}"):
            futs = self.client.compute(tasks, retries=self.cfg.retries)
        pending = set(futs)
        ok = False
        try:
            while pending:
                try:
                    wait(list(pending), timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    pass
                done = {f for f in pending if f.done()}
                for f in done:
                    if f.status == "error":
                        f.result()  # raises the task's exception
                pending -= done
                if pending:
                    chunks.poll(futs[0].key)
                self._check_stop()
            result = self.client.gather(futs)
            ok = True
            return result
        finally:
            if pending:
                self.client.cancel(list(pending))
            chunks.close(ok)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted")

    def note_chunks(self, total: int, done: int) -> None:
        """Count chunk tasks a library function recorded itself (``total``, ``done`` before)."""
        c = self.counts.setdefault(self.stage, StageCounts())
        c.total += int(total)
        c.done += int(done)
