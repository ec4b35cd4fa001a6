"""Prometheus metrics: worker-side counters, and per-stage chunk progress on the scheduler.

distributed serves ``prometheus_client``'s default registry on every worker's and on the
scheduler's HTTP port (``/metrics``), so metrics registered here show up next to Dask's own.
Metrics are created lazily, once per process; without ``prometheus_client`` they are no-ops.

Workers (:func:`count`): ``daskpath_<name>_total`` for the names in :data:`COUNTERS`.

Scheduler (:func:`stage_chunks`, set by the run loop while a stage computes, at most every
second): the chunk tasks of each stage of each slide of the current run, the numbers the
progress bars and lines show (:data:`STAGE_METRICS`)::

    daskpath_stage_chunks{stage="nuclei",slide="s1"}           chunk tasks of the stage
    daskpath_stage_chunks_done{stage="nuclei",slide="s1"}      finished (computed or resumed)
    daskpath_stage_chunks_resumed{stage="nuclei",slide="s1"}   loaded from an earlier run
    daskpath_stage_chunks_computed_total{stage="nuclei"}       computed, all runs (a counter)

``sum by (stage) (daskpath_stage_chunks_done) / sum by (stage) (daskpath_stage_chunks)`` is a
stage's progress; ``rate(daskpath_stage_chunks_computed_total[5m])`` its chunks per second.
"""

from __future__ import annotations

import threading
import weakref

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["COUNTERS", "STAGE_METRICS", "StageMetricsPlugin", "count", "push_stage_chunks",
           "stage_chunks"]

COUNTERS = {
    "chunks_processed": "Slide chunks processed (all stages)",
    "pixels_processed": "Slide pixels processed by the preprocessing stage",
    "tiles_processed": "Tiles whose statistics were completed",
    "nuclei_found": "Nuclei segmented",
    "tiles_translated": "Tiles translated H&E -> virtual IHC",
}

_lock = threading.Lock()
_made: dict = {}


def count(name: str, n: float = 1.0) -> None:
    """Add ``n`` to the counter ``daskpath_<name>_total`` of this process."""
    if n <= 0:
        return
    c = _made.get(name)
    if c is None:
        with _lock:
            c = _made.get(name)
            if c is None:
                try:
                    from prometheus_client import Counter
                except ImportError:  # pragma: no cover - optional
                    _made[name] = False
                    return
                c = Counter(f"daskpath_{name}", COUNTERS.get(name, name))
                _made[name] = c
    if c is not False:
        c.inc(n)


#: the scheduler's per-stage chunk metrics: name -> (kind, labels, help)
STAGE_METRICS = {
    "stage_chunks": ("gauge", ("stage", "slide"),
                     "Chunk tasks of a stage of a slide in the current run"),
    "stage_chunks_done": ("gauge", ("stage", "slide"),
                          ("Chunk tasks of a stage of a slide finished (computed in this run, "
                           "or resumed from an earlier run's records)")),
    "stage_chunks_resumed": ("gauge", ("stage", "slide"),
                             "Chunk tasks of a stage of a slide loaded from an earlier run"),
    "stage_chunks_computed": ("counter", ("stage",), "Chunk tasks of a stage computed"),
}

_stage_made: dict = {}


def _stage_metric(name: str):
    m = _stage_made.get(name)
    if m is None:
        with _lock:
            m = _stage_made.get(name)
            if m is None:
                try:
                    import prometheus_client
                except ImportError:  # pragma: no cover - optional
                    m = _stage_made[name] = False
                else:
                    kind, labels, doc = STAGE_METRICS[name]
                    cls = prometheus_client.Gauge if kind == "gauge" else prometheus_client.Counter
                    m = _stage_made[name] = cls(f"daskpath_{name}", doc, labels)
    return m


def stage_chunks(stage: str, slide: str, total: int, done: int, resumed: int,
                 computed: int = 0) -> None:
    """Set the chunk gauges of ``stage`` of ``slide`` in this process (the scheduler's) and add
    ``computed`` newly computed chunks to the stage's counter."""
    for name, value in (("stage_chunks", total), ("stage_chunks_done", done),
                        ("stage_chunks_resumed", resumed)):
        g = _stage_metric(name)
        if g is not False:
            g.labels(stage=stage, slide=slide).set(value)
    c = _stage_metric("stage_chunks_computed")
    if c is not False and computed > 0:
        c.labels(stage=stage).inc(computed)


class StageMetricsPlugin(SchedulerPlugin):
    """Scheduler plugin: a handler ``daskpath_stage_chunks`` that sets :func:`stage_chunks` in
    the scheduler's process (registered by :func:`push_stage_chunks`; needs daskpath on the
    scheduler, as the workers do)."""

    name = "daskpath-stage-metrics"
    idempotent = True

    async def start(self, scheduler) -> None:
        scheduler.handlers["daskpath_stage_chunks"] = _stage_chunks_handler


def _stage_chunks_handler(**metrics) -> None:
    stage_chunks(**metrics)


_registered: weakref.WeakSet = weakref.WeakSet()  # clients whose scheduler has the plugin
_refused: weakref.WeakSet = weakref.WeakSet()  # clients whose scheduler could not take it


def push_stage_chunks(client, **metrics) -> None:
    """Set :func:`stage_chunks` (keyword arguments) on ``client``'s scheduler; the first call
    per client registers :class:`StageMetricsPlugin` (a scheduler that refuses it, e.g. one
    without daskpath, is not asked again). Raises what the scheduler raises."""
    if client in _refused:
        raise RuntimeError("the scheduler did not take daskpath's metrics plugin")
    if client not in _registered:
        try:
            client.register_plugin(StageMetricsPlugin())
        except Exception:
            _refused.add(client)
            raise
        _registered.add(client)
    client.sync(client.scheduler.daskpath_stage_chunks, **metrics)
