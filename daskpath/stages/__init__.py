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
    on_chunks: Callable[[int, int], None] | None = None  # (submitted, finished) increments
    _pair: Any = None

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
        from daskpath.pipeline import keep_mask

        tiles = self.parts["preprocess"]
        return tiles, keep_mask(tiles["tissue_fraction"], tiles["ssim"], self.cfg).to_numpy()

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

    def compute(self, tasks: Sequence[Any], *, resources: dict | None = None) -> list[Any]:
        """Submit ``tasks`` (Delayed / collections) to the cluster and wait for all of them.

        Retries ``cfg.retries`` times; the stop event (a signal) cancels them.
        """
        from distributed import wait

        tasks = list(tasks)
        if not tasks:
            return []
        self._check_stop()
        futs = self.client.compute(tasks, retries=self.cfg.retries)
        if self.on_chunks is not None:
            self.on_chunks(len(futs), 0)
        pending = set(futs)
        try:
            while pending:
                try:
                    wait(list(pending), timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    pass
                done = {f for f in pending if f.done()}
                if self.on_chunks is not None and done:
                    self.on_chunks(0, len(done))
                for f in done:
                    if f.status == "error":
                        f.result()  # raises the task's exception
                pending -= done
                self._check_stop()
            return self.client.gather(futs)
        finally:
            if pending:
                self.client.cancel(list(pending))

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted")

    def note_chunks(self, total: int, done: int) -> None:
        """Count chunk tasks a library function recorded itself (``total``, ``done`` before)."""
        c = self.counts.setdefault(self.stage, StageCounts())
        c.total += int(total)
        c.done += int(done)
