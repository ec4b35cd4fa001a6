"""The run loop: slides flow through the registered stages, a bounded window at a time.

Each slide runs in one client-side thread that takes it through the configured stages in
registry order: for every stage it computes the fingerprint (:mod:`daskpath.publish`), reuses
the published result when the fingerprint is unchanged, otherwise runs the stage (its chunk
tasks go to the cluster; finished chunks are recorded, so an interrupted stage resumes) and
publishes it. A slide's nuclei start while the next slide is preprocessed: there is no barrier
between stages, and at most ``window`` slides are in flight, so memory stays flat.

On clusters with GPU workers, graph building is serialised by one lock (``dask.annotate`` of
the model tasks' GPU resource sets process-global config) and released while a thread waits for
the cluster; CPU clusters annotate nothing and take no lock. A signal sets the stop event: slide
threads cancel their futures and stop.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import shutil
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from daskpath.config import Config
from daskpath.errors import DaskpathError
from daskpath.outputs import read_table, round_floats, write_json, write_table
from daskpath.publish import (
    RunSet,
    _crash_point,
    describe_changes,
    file_identity,
    internal_dir,
    model_identity,
    read_done,
    slide_key,
    stage_fingerprint,
    write_done,
)
from daskpath.stages import Interrupted, SlideContext, Stage, get_stage, stage_names

__all__ = ["RunResult", "run_slides", "slide_key"]

log = logging.getLogger("daskpath.pipeline")

#: serialises graph building across slide threads on clusters with GPU workers, where model
#: graphs carry ``dask.annotate(resources=...)``, which sets process-global dask config
#: (released while a thread waits on the cluster). CPU clusters annotate nothing: no lock.
BUILD_LOCK = threading.RLock()


class _NoLock:
    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


@dataclass
class RunResult:
    """What :func:`daskpath.pipeline.run` produced."""

    output_dir: Path
    tiles: pd.DataFrame
    slides: pd.DataFrame
    failures: pd.DataFrame
    seconds: float
    chunks_computed: int = 0
    chunks_total: int = 0
    #: per slide and stage: ``{"fp", "recomputed", "chunks", "chunks_resumed"}``
    stages: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failures.empty

    def recomputed(self, slide: str) -> list[str]:
        """The stages run (not reused) for ``slide`` in this run."""
        return [s for s, v in self.stages.get(slide, {}).items() if v.get("recomputed")]


@dataclass
class SlideOutcome:
    slide: str
    parts: dict[str, pd.DataFrame] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    failure: dict[str, str] | None = None
    message: str = ""
    #: per stage: fingerprint record, keep thresholds, work folder, {published name: work item}
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: work folders this run used for the slide (kept by the pruning, done or not)
    work_dirs: list[Path] = field(default_factory=list)
    #: opening the pair (and waiting for its ingest): {"started": unix time, "seconds": wall}
    opened: dict[str, float] = field(default_factory=dict)


#: Seconds between two progress lines when stderr is not a terminal (a log file, a pipe);
#: the environment variable ``DASKPATH_PROGRESS_INTERVAL`` overrides it.
PROGRESS_LOG_INTERVAL = 30.0


def _progress_interval() -> float:
    try:
        return float(os.environ.get("DASKPATH_PROGRESS_INTERVAL", PROGRESS_LOG_INTERVAL))
    except ValueError:
        return PROGRESS_LOG_INTERVAL


def _interactive() -> bool:
    """Whether progress bars can be drawn: stderr is a terminal, or a Jupyter kernel runs us
    (tqdm.auto then draws a widget)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
    return "ipykernel" in sys.modules and "IPython" in sys.modules


#: Chunks of a stage that must have been computed in this run before an ETA is shown.
ETA_MIN_CHUNKS = 3


def _eta_text(seconds: float | None) -> str:
    """``ETA ?`` (no estimate yet), ``ETA 40 s``, ``ETA 12 min``, ``ETA 2 h 05 min``."""
    if seconds is None or not np.isfinite(seconds):
        return "ETA ?"
    s = max(0, round(seconds))
    if s < 60:
        return f"ETA {s} s"
    m = -(-s // 60)  # whole minutes, rounded up
    if m < 60:
        return f"ETA {m} min"
    return f"ETA {m // 60} h {m % 60:02d} min"


@dataclass
class _StageProgress:
    """Chunk tasks of one stage over all slides that reached it so far in this run.

    ``total`` chunks are known, ``resumed`` of them were done by an earlier run (loaded, not
    computed) and ``done`` were computed in this run. The rate behind the ETA is ``done`` over
    the time this stage had chunks outstanding (``busy``), so resumed chunks, and the time a
    stage waits for its upstream stage, do not inflate it.
    """

    total: int = 0
    resumed: int = 0
    done: int = 0
    slides: set[str] = field(default_factory=set)
    busy: float = 0.0
    since: float | None = None  # start of the current stretch with chunks outstanding

    @property
    def finished(self) -> int:
        return self.resumed + self.done

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.finished)

    def add(self, now: float, total: int, resumed: int, done: int, slide: str) -> None:
        if self.since is not None:
            self.busy += now - self.since
        self.total += total
        self.resumed += resumed
        self.done += done
        self.slides.add(slide)
        self.since = now if self.remaining else None

    def eta(self, now: float) -> float | None:
        """Seconds until the known chunks are done; None until :data:`ETA_MIN_CHUNKS` were
        computed in this run."""
        elapsed = self.busy + (now - self.since if self.since is not None else 0.0)
        if self.done < ETA_MIN_CHUNKS or elapsed <= 0:
            return None
        return self.remaining / (self.done / elapsed)

    def text(self, now: float) -> str:
        """``nuclei: 37/352 chunks (3 slides) ETA 12 min`` (no ETA once all are done)."""
        n = len(self.slides)
        extra = f", {self.resumed} resumed" if self.resumed else ""
        line = f"{self.finished}/{self.total} chunks ({n} slide{'s' if n != 1 else ''}{extra})"
        return line + (f" {_eta_text(self.eta(now))}" if self.remaining else "")


class _Progress:
    """Slides and, per stage, chunk progress with an ETA.

    Stages report through :meth:`chunks` (``SlideContext.on_chunks``): the chunk tasks a slide's
    stage submits (``submitted``, of which ``resumed`` were done by an earlier run) and, as
    they finish, ``finished``. Per stage this gives ``nuclei: 37/352 chunks (3 slides) ETA 12
    min``: chunks finished / known (the slides that reached the stage so far), the ETA from this
    run's rate of the stage's computed chunks (``ETA ?`` until :data:`ETA_MIN_CHUNKS` finished).

    ``progress=True``: on a terminal (or in a notebook) a tqdm bar for the slides and one per
    stage that submitted chunks; otherwise (a log file, a pipe, a SLURM job's output) no control
    characters, and a line every :data:`PROGRESS_LOG_INTERVAL` seconds
    (``DASKPATH_PROGRESS_INTERVAL``) and one at the end: ``progress: 3 of 10 slide(s) done;
    preprocess: 480/480 chunks (10 slides); nuclei: 37/352 chunks (3 slides) ETA 12 min``.
    A callable gets ``(slide, done, total)`` as each slide finishes.
    """

    def __init__(self, progress: bool | Callable[[str, int, int], None], total: int,
                 interactive: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.cb = progress if callable(progress) else None
        self.total = total
        self.done = 0
        self.chunks_total = 0  # chunk tasks reported without a stage (their own line part)
        self.chunks_done = 0
        self.stages: dict[str, _StageProgress] = {}
        self.lock = threading.Lock()
        self.clock = clock
        self.bars: dict[str, Any] | None = None
        self.lines = False
        self._last = clock()
        self._logged = ""  # the last line logged
        self._stop = threading.Event()
        self.interval = _progress_interval()
        if progress is True:
            if _interactive() if interactive is None else interactive:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
                self.bars = {"slides": tqdm(total=total, unit="slide", desc="slides", position=0)}
            else:
                self.lines = True
            # a line per interval (or fresh ETAs on the bars) even while no chunk finishes
            tick = 1.0 if self.interval <= 0 else min(max(self.interval, 0.1), 1.0)
            threading.Thread(target=self._ticker, args=(tick,), daemon=True,
                             name="daskpath-progress").start()

    def chunks(self, submitted: int, finished: int, *, slide: str | None = None,
               stage: str | None = None, resumed: int = 0) -> None:
        """``submitted`` chunk tasks more (``resumed`` of them done by an earlier run),
        ``finished`` more computed; per ``stage`` when given."""
        with self.lock:
            if stage is None:
                self.chunks_total += submitted
                self.chunks_done += finished
            else:
                st = self.stages.get(stage)
                if st is None:
                    st = self.stages[stage] = _StageProgress()
                st.add(self.clock(), submitted, resumed, finished, slide or "")
                self._bar(stage, st)
            self._maybe_log()

    def _bar(self, stage: str, st: _StageProgress) -> None:
        """Draw ``stage``'s bar (lock held)."""
        if self.bars is None:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = self._tqdm(
                total=0, unit="chunk", desc=stage, position=len(self.bars), leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} chunks{postfix}")
        bar.total = st.total
        bar.n = st.finished
        n = len(st.slides)
        eta = f", {_eta_text(st.eta(self.clock()))}" if st.remaining else ""
        bar.set_postfix_str(f"{n} slide{'s' if n != 1 else ''}{eta}", refresh=False)
        bar.refresh()

    def slide(self, slide: str) -> None:
        with self.lock:
            self.done += 1
            if self.bars is not None:
                self.bars["slides"].update(1)
                self.bars["slides"].set_postfix_str(slide)
            elif self.cb is not None:
                self.cb(slide, self.done, self.total)
            self._maybe_log()

    def line(self) -> str:
        """The progress line (no control characters)."""
        now = self.clock()
        parts = [f"progress: {self.done} of {self.total} slide(s) done"]
        parts += [f"{name}: {st.text(now)}" for name, st in self.stages.items()]
        if self.chunks_total:
            parts.append(f"{self.chunks_done} of the {self.chunks_total} chunk task(s) submitted "
                         "so far finished")
        return "; ".join(parts)

    def _maybe_log(self, force: bool = False) -> None:
        """A progress line, if lines are wanted and the interval has passed (lock held)."""
        if not self.lines:
            return
        now = self.clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self._logged = self.line()
        log.info("%s", self._logged)

    def _ticker(self, tick: float) -> None:
        while not self._stop.wait(tick):
            with self.lock:
                if self.bars is not None:
                    for name, st in self.stages.items():
                        if st.remaining:
                            self._bar(name, st)
                else:
                    self._maybe_log()

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            if self.lines and self.stages and self.line() != self._logged:
                self._maybe_log(force=True)  # the final counts
        if self.bars is not None:
            for b in self.bars.values():
                b.close()


class _LockedContext(SlideContext):
    """SlideContext whose compute releases the build lock while it waits for the cluster."""

    _announced: dict[str, int]
    _lock: Any

    def compute(self, tasks, **kw):  # type: ignore[override]
        c = self.counts.get(self.stage)
        if c is not None and c.done > self._announced.get(self.stage, 0):
            log.info("%s", _resume_line(self.slide, self.stage, c.done, c.total))
            self._announced[self.stage] = c.done
        self._lock.release()
        try:
            return super().compute(tasks, **kw)
        finally:
            self._lock.acquire()


def _resume_line(slide: str, stage: str, done: int, total: int) -> str:
    """What a stage that found chunk records of an earlier run is doing now."""
    if done >= total:
        return (f"slide {slide}: {stage}: resuming: all {total} chunks were computed by an earlier "
                "run; loading them to finish the stage")
    return (f"slide {slide}: {stage}: resuming: {done} of {total} chunks were computed by an "
            f"earlier run; computing the other {total - done}")


def _change_line(slide: str, recomputed: list[str], changes: list[str], first: bool,
                 reused: list[str], overwrite: bool = False) -> str:
    if not recomputed:
        return f"slide {slide}: up to date ({', '.join(reused)} reused)"
    if overwrite:
        return f"slide {slide}: {', '.join(recomputed)} recomputed (overwrite: true)"
    if first:
        return f"slide {slide}: {', '.join(recomputed)} computed"
    causes = list(dict.fromkeys(changes))
    if len(causes) > 1 and "kept tiles" in causes:
        causes.remove("kept tiles")  # a consequence of the other changes
    if not causes:
        return f"slide {slide}: {', '.join(recomputed)} recomputed (unfinished, interrupted or missing results)"
    return f"slide {slide}: {', '.join(causes)} changed: {', '.join(recomputed)} recomputed"


def input_identity(he: str | Path, ihc: str | Path) -> dict[str, Any]:
    """The input part of every stage's fingerprint."""
    return {"he": file_identity(he), "ihc": file_identity(ihc)}


def check_models(cfg: Config) -> None:
    """Resolve and hash every model the configured stages need (a ModelError names the bad
    one), so a mistyped model path stops the run before any slide starts."""
    for n in stage_names():
        if n in cfg.stages:
            model_identities(get_stage(n), cfg)


def model_identities(st: Stage, cfg: Config) -> dict[str, Any]:
    """The model part of ``st``'s fingerprint (resolving the models checks them: ModelError)."""
    return {k: model_identity(p, name) for k, (p, name) in st.models(cfg).items()}


def fingerprint_of(st: Stage, ctx: SlideContext, inputs: dict[str, Any],
                   models: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Fingerprint and record of stage ``st`` for ``ctx``'s slide (see :mod:`daskpath.publish`)."""
    return stage_fingerprint(st.name, st.version, st.keys(ctx.cfg), inputs, models, st.upstream(ctx))


def _work_dir(work_root: Path, name: str, fp: str, run_id: str, arts, overwrite: bool
              ) -> tuple[Path, bool]:
    """The work folder of stage ``name`` under fingerprint ``fp``, and whether it is finished.

    A finished folder (``done.json``, ``part.parquet``, every artefact) is reused; an
    unfinished one is resumed. Finished folders are never changed (a published set may point
    into them): a recompute (``overwrite``, or a finished folder that lost an artefact) gets a
    new folder ``<name>-<fp>.<run_id>``; the pruning after the switch removes the old one.
    """
    base = f"{name}-{fp}"
    cands = [d for d in sorted(work_root.glob(base + "*"))
             if d.is_dir() and (d.name == base or d.name.startswith(base + "."))]
    if not overwrite:
        for d in cands:
            if (read_done(d) is not None and (d / "part.parquet").exists()
                    and all((d / a.name).exists() for a in arts)):
                return d, True
        for d in cands:
            if read_done(d) is None:
                return d, False
    fresh = work_root / base
    return (fresh if not fresh.exists() else work_root / f"{base}.{run_id}"), False


def _run_slide(row, stages: list[Stage], models: dict[str, dict], cfg: Config, out: Path, client,
               stop: threading.Event, progress: _Progress, lock: Any, prev_state: dict[str, Any],
               run_id: str) -> SlideOutcome:
    slide = row.slide
    res = SlideOutcome(slide)
    key = slide_key(slide)
    previous = prev_state.get(slide) or prev_state.get(key) or {}
    work_root = internal_dir(out) / "work" / key
    ctx = _LockedContext(slide=slide, he=row.he, ihc=row.ihc, cfg=cfg, out=out, client=client,
                         stop=stop, on_chunks=progress.chunks)
    ctx._announced = {}
    ctx._lock = lock
    info = {"tiles.min_tissue": cfg.tiles.min_tissue, "ssim.threshold": cfg.ssim.threshold}
    recomputed, reused, changes, first = [], [], [], True
    stage = "open"
    locked = False
    try:
        t_open = time.time()
        ctx.pair()  # outside the build lock: ingesting a flat raster may take minutes
        res.opened = {"started": round(t_open, 3), "seconds": round(time.time() - t_open, 3)}
        inputs = input_identity(row.he, row.ihc)  # after pair(): the files are checked slides
        lock.acquire()
        locked = True
        for st in stages:
            stage = st.name
            ctx.stage = st.name
            if stop.is_set():
                raise Interrupted("interrupted")
            fp, record = fingerprint_of(st, ctx, inputs, models[st.name])
            ctx.fps[st.name] = fp
            arts = st.artefacts(cfg)
            work, done = _work_dir(work_root, st.name, fp, run_id, arts, cfg.overwrite)
            res.work_dirs.append(work)
            prev = previous.get(st.name)
            part_path = work / "part.parquet"
            if done:
                part = read_table(part_path)
                reused.append(st.name)
                res.stages[st.name] = {"fp": fp, "recomputed": False, "chunks": 0, "chunks_resumed": 0}
            else:
                if prev and prev.get("record"):
                    first = False
                    diff = describe_changes(prev["record"], record)
                    changes += diff
                    if "kept tiles" in diff:
                        changes += [k for k, v in info.items() if (prev.get("info") or {}).get(k) != v]
                work.mkdir(parents=True, exist_ok=True)
                ctx.work = work
                started, t_run = time.time(), time.perf_counter()
                part = st.run(ctx)
                seconds = time.perf_counter() - t_run
                missing = [a.name for a in arts if not (work / a.name).exists()]
                if missing:
                    raise DaskpathError(f"stage {st.name} did not write {', '.join(missing)} "
                                        f"in {work}")
                write_table(part, part_path)
                write_done(work, record)
                shutil.rmtree(work / "chunks", ignore_errors=True)
                c = ctx.counts.get(st.name)
                res.stages[st.name] = {"fp": fp, "recomputed": True,
                                       "chunks": c.total if c else 0, "chunks_resumed": c.done if c else 0,
                                       "started": round(started, 3), "seconds": round(seconds, 3)}
                log.debug("slide %s: stage %s took %.1f s", slide, st.name, seconds)
                recomputed.append(st.name)
            res.state[st.name] = {
                "fp": fp, "record": record, "info": info,
                "work": os.path.relpath(work, internal_dir(out)),
                "artefacts": {a.relative(slide): a.name for a in arts},
            }
            ctx.parts[st.name] = part
            res.parts[st.name] = part
        res.message = _change_line(slide, recomputed, changes, first, reused, cfg.overwrite)
        log.info("%s", res.message)
    except Interrupted:
        raise
    except Exception as e:  # noqa: BLE001 - one bad slide must not sink the cohort
        if stop.is_set():
            raise Interrupted("interrupted") from e
        msg = str(e) if isinstance(e, DaskpathError) else f"{type(e).__name__}: {e}"
        msg = " ".join(msg.split())  # one line
        log.debug("slide %s failed in %s:\n%s", slide, stage, traceback.format_exc())
        res.failure = {"slide": slide, "stage": stage, "error": msg}
    finally:
        if locked:
            lock.release()
    progress.slide(slide)
    return res


def new_run_id() -> str:
    """A run id: start time plus a random suffix (sorts by time, unique across hosts)."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


#: What to configure instead of each shipped phantom-trained model, for real slides.
REAL_MODEL_HINT = {
    "nuclei.model": "nuclei.model: 2D_versatile_he (StarDist's pretrained H&E model, downloaded "
                    "when online) or a StarDist2D folder trained on your IHC",
    "translate.model": "translate.model: a translator folder trained on your slides "
                       "(daskpath train translator)",
    "baselines.rf_model": "baselines.rf_model: a folder from daskpath train rf",
    "baselines.classifier_model": "baselines.classifier_model: a folder from daskpath train classifier",
}


def phantom_models(stages: list[Stage], cfg: Config) -> dict[str, str]:
    """The run's models that are the shipped phantom-trained ones: ``{config key: model name}``."""
    root = Path(__file__).resolve().parent / "models"  # the shipped models
    found: dict[str, str] = {}
    for st in stages:
        for key, (path, name) in st.models(cfg).items():
            if path is None:
                continue
            p = Path(path).resolve()
            folder = p if p.is_dir() else p.parent
            if folder.parent == root and folder.name.endswith("_phantom"):
                found[key] = folder.name
    return found


def phantom_model_warning(stages: list[Stage], cfg: Config, manifest: pd.DataFrame
                          ) -> tuple[str | None, list[str]]:
    """A warning when shipped phantom-trained models run on slides that are not phantoms.

    Returns the one-line warning (None when there is nothing to say) and the slides concerned.
    A slide is a phantom when both of its files carry :data:`daskpath.io.PHANTOM_TOKEN`.
    """
    from daskpath.io import slide_info

    models = phantom_models(stages, cfg)
    if not models:
        return None, []
    real = []
    for row in manifest.itertuples(index=False):
        try:
            phantom = slide_info(row.he)["phantom"] and slide_info(row.ihc)["phantom"]
        except Exception:  # an unreadable slide fails in its own stage, with its own message
            continue
        if not phantom:
            real.append(str(row.slide))
    if not real:
        return None, []
    shown = ", ".join(real[:5]) + (f" and {len(real) - 5} more" if len(real) > 5 else "")
    used = ", ".join(f"{k}: {v}" for k, v in models.items())
    fixes = "; ".join(REAL_MODEL_HINT[k] for k in models if k in REAL_MODEL_HINT)
    return (f"models trained on phantoms only ({used}) ran on {len(real)} slide(s) that are not "
            f"daskpath phantoms ({shown}): their Ki67 numbers do not describe real tissue. "
            f"For real slides set {fixes}"), real


#: The note ``slides.csv`` carries for a real slide measured with phantom-trained models.
PHANTOM_NOTE = "phantom-trained model(s) on a real slide: numbers not meaningful (see report)"


def run_slides(cfg: Config, manifest: pd.DataFrame, out: Path, client, progress, t0: float,
               runset: RunSet | None = None) -> RunResult:
    """Run the configured stages over the manifest's slides, assemble the tables into the
    run's set (``runset``; a new one by default) and switch ``out`` to it."""
    stages = [get_stage(n) for n in stage_names() if n in cfg.stages]
    # model paths etc. are checked before any slide is touched; model files hashed once
    models: dict[str, dict] = {}
    for st in stages:
        models[st.name] = model_identities(st, cfg)
    if runset is None:
        runset = RunSet(out, new_run_id())
    warning, real = phantom_model_warning(stages, cfg, manifest)
    if warning:
        log.warning("WARNING: %s", warning)
    run_id = runset.run_id
    previous = RunSet.previous_state(out)
    started = time.time()
    from daskpath.cluster import model_annotations

    from daskpath.cluster import _workers

    workers = _workers(client)
    threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
    # slides in flight: one more than the worker threads, so a slide's serial steps (slide-level
    # statistics, a stage's tail) never leave a thread idle; the client holds little per slide
    window = max(3, threads + 1)
    lock = BUILD_LOCK if model_annotations(client) else _NoLock()
    stop = threading.Event()
    prog = _Progress(progress, len(manifest))
    outcomes: dict[str, SlideOutcome] = {}
    # pre-phase: flat rasters (PNG, stripped TIFF) not yet ingested are ingested on the workers,
    # in manifest order, one per worker thread at a time; a slide thread opening its pair waits
    # only for its own two files (io.open_pair), so the first slide starts once they are done
    from daskpath.io import ingest_on_cluster

    ingests = ingest_on_cluster(
        client, [p for r in manifest.itertuples(index=False) for p in (r.he, r.ihc)],
        Path(cfg.cache_dir) if cfg.cache_dir else out / "cache", cfg.chunk_size,
        limit=max(1, threads), retries=cfg.retries).__enter__()
    pool = cf.ThreadPoolExecutor(max_workers=window, thread_name_prefix="daskpath-slide")
    futs = {pool.submit(_run_slide, row, stages, models, cfg, out, client, stop, prog, lock,
                        previous, run_id): row.slide
            for row in manifest.itertuples(index=False)}
    try:
        pending = set(futs)
        while pending:
            done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for f in done:
                o = f.result()
                outcomes[o.slide] = o
    except BaseException:
        stop.set()
        ingests.close()
        pool.shutdown(wait=False, cancel_futures=True)
        prog.close()
        raise
    pool.shutdown(wait=True)
    ingests.close()
    prog.close()
    return _assemble(cfg, manifest, out, stages, outcomes, t0, runset, started,
                     warnings=[warning] if warning else [], real_slides=real)


def _assemble(cfg: Config, manifest: pd.DataFrame, out: Path, stages: list[Stage],
              outcomes: dict[str, SlideOutcome], t0: float, runset: RunSet,
              started: float, warnings: list[str] | None = None,
              real_slides: list[str] | None = None) -> RunResult:
    """Cohort tables from the current run's parts only; metrics, run.json, report; all into the
    run's set, which then replaces the previous one at once (:class:`RunSet`)."""
    run_id = runset.run_id
    previous_names = list(RunSet.previous(out).get("outputs") or [])
    for slide in manifest["slide"]:  # the finished artefacts of every slide that made it
        o = outcomes.get(slide)
        if o is None or o.failure is not None:
            continue
        for st in o.state.values():
            for name, item in st["artefacts"].items():
                runset.add_artefact(name, internal_dir(out) / st["work"] / item)
    from daskpath.stages.preprocess import TILE_COLUMNS, tile_keep

    parts, rows, failures = [], [], []
    for slide in manifest["slide"]:
        o = outcomes.get(slide)
        if o is None:
            continue
        if o.failure is not None:
            failures.append(o.failure)
            continue
        pre = o.parts["preprocess"]
        keep = tile_keep(pre, cfg)
        cols: dict[str, Any] = {}
        row: dict[str, Any] = {}
        for st in stages:
            p = o.parts[st.name]
            cols |= st.tile_columns(p, keep, cfg)
            row |= st.summarize(p, keep, cfg)
        parts.append(pd.DataFrame(cols))
        rows.append(row)
    tiles = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TILE_COLUMNS)
    slides = pd.DataFrame(rows)
    if real_slides and len(slides):
        flag = slides["slide"].isin(real_slides)
        slides.loc[flag, "note"] = [f"{PHANTOM_NOTE}; {n}" if n else PHANTOM_NOTE
                                    for n in slides.loc[flag, "note"].fillna("")]
    warnings = list(warnings or [])
    tiles.attrs["daskpath_run_id"] = run_id  # kept in the parquet metadata: the run it belongs to
    write_table(tiles, runset.path("tiles.parquet"))
    # 6 significant digits: for people
    write_table(round_floats(slides), runset.path("slides.csv"))
    metrics = None
    if "ratio_ihc" in tiles.columns:
        from daskpath.metrics import score_table

        kept = tiles[tiles["keep"]] if len(tiles) else tiles
        metrics = {
            "truth": "ratio_ihc (area ratio on the real IHC, nuclei stage)",
            "tiles": score_table(kept),
            "slides": score_table(slides) if len(slides) else {},
            "n_tiles_kept": int(len(kept)),
            **(
                {
                    "image_similarity_virtual_vs_real": {
                        "ssim_mean": float(kept["ssim_virtual"].mean()),
                        "psnr_mean_db": float(kept["psnr_virtual"].replace(np.inf, np.nan).mean()),
                        "n": int(kept["ssim_virtual"].notna().sum()),
                        "note": "consecutive sections: how IHC-like the virtual stain is, "
                        "not a pixel-exact match",
                    }
                }
                if "ssim_virtual" in kept.columns
                else {}
            ),
            "n_slides": int(len(slides)),
            "run_id": run_id,
        }
        write_json(metrics, runset.path("metrics.json"))
    fail_df = pd.DataFrame(failures, columns=["slide", "stage", "error"])
    if failures:
        write_table(fail_df, runset.path("failures.csv"))
    stage_info = {s: o.stages for s, o in outcomes.items()}
    total = sum(v.get("chunks", 0) for st in stage_info.values() for v in st.values())
    resumed = sum(v.get("chunks_resumed", 0) for st in stage_info.values() for v in st.values())
    from daskpath import __version__

    try:
        from daskpath.report import write_report

        write_report(runset.root, tiles, slides, fail_df, cfg, metrics, run_id=run_id,
                     warnings=warnings, manifest=manifest)
        runset.path("report.html")
    except ImportError as e:  # matplotlib is optional (extra "report")
        log.warning("report.html not written: %s (pip install 'daskpath[report]')", e)
    # fingerprints of what this set holds: the next run says what changed against them
    write_json({s: o.state for s, o in outcomes.items() if o.failure is None},
               runset.root / "state.json")
    runset.path("run.json")  # written last, listing every name of the set (itself included)
    write_json({
        "run_id": run_id,
        "daskpath_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": "complete" if not failures else "complete with failed slides",
        "stages": [s.name for s in stages],
        "warnings": warnings,
        "slides": {s: {"status": "failed" if o.failure else "ok", "opened": o.opened,
                       "stages": o.stages,
                       **({"failure": o.failure} if o.failure else {}), "message": o.message}
                   for s, o in outcomes.items()},
        "outputs": sorted(runset.names),
    }, runset.root / "run.json")
    _crash_point("assembled")
    runset.commit(previous_names)  # the switch: out/ now shows this set, all of it at once
    _prune(out, manifest, outcomes, runset)
    return RunResult(out, tiles, slides, fail_df, time.perf_counter() - t0,
                     chunks_computed=total - resumed, chunks_total=total, stages=stage_info)


def _prune(out: Path, manifest: pd.DataFrame, outcomes: dict[str, SlideOutcome],
           runset: RunSet) -> None:
    """After the switch: remove work folders neither the current set nor this run uses (a
    failed or interrupted slide keeps what it computed, to resume), and those of slides the
    manifest no longer has."""
    work = internal_dir(out) / "work"
    if not work.is_dir():
        return
    keep = {p.resolve() for p in runset.work_dirs}
    for o in outcomes.values():
        keep |= {p.resolve() for p in o.work_dirs}
    slides = {slide_key(s) for s in manifest["slide"]}
    for slide_dir in work.iterdir():
        if not slide_dir.is_dir():
            continue
        if slide_dir.name not in slides:
            shutil.rmtree(slide_dir, ignore_errors=True)
            continue
        for d in slide_dir.iterdir():
            if d.is_dir() and d.resolve() not in keep:
                shutil.rmtree(d, ignore_errors=True)
