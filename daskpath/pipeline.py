"""The pipeline: manifest -> registered stages per slide -> published outputs and tables.

:func:`run` is the entry point (``daskpath.run``); the stages live in :mod:`daskpath.stages`,
the run loop in :mod:`daskpath.runner`, fingerprints and publication in :mod:`daskpath.publish`.
Each (slide, stage) result is fingerprinted (config keys it depends on, input files, models,
upstream results, stage version); a rerun recomputes exactly the stages whose fingerprint
changed and resumes unfinished ones chunk by chunk. A slide that fails (unreadable file,
mismatched pair, ...) is recorded in ``failures.csv`` and does not stop the others.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from daskpath.config import Config
from daskpath.runner import RunResult
from daskpath.stages.preprocess import (
    TILE_COLUMNS,
    SlidePlan,
    keep_mask,
    summarize_slide,
    tiles_from_sums,
)

__all__ = ["RunResult", "SlidePlan", "TILE_COLUMNS", "keep_mask", "plan_preprocess", "run",
           "summarize_slide", "tiles_from_sums"]

log = logging.getLogger(__name__)


def plan_preprocess(slide: str, he: str | Path, ihc: str | Path, cfg: Config,
                    output_dir: Path | None = None) -> SlidePlan:
    """Build the lazy preprocessing graph of one pair (nothing is computed).

    One task per chunk: it reads the chunk of both slides with its halo, computes the tissue
    masks and the SSIM map, reduces them to per-tile partial sums and writes the chunk's region
    of the layers. Chunks are recorded in the stage's fingerprinted work folder under
    ``output_dir`` (default ``cfg.output_dir``), exactly where :func:`run` looks for them, so
    computing some of ``plan.tasks`` and then running resumes from them.
    """
    import threading

    from daskpath.publish import internal_dir, slide_key
    from daskpath.runner import fingerprint_of, input_identity, model_identities
    from daskpath.stages import SlideContext, get_stage

    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    st = get_stage("preprocess")
    ctx = SlideContext(slide=slide, he=str(he), ihc=str(ihc), cfg=cfg, out=out, client=None,
                       stop=threading.Event(), stage="preprocess")
    fp, _ = fingerprint_of(st, ctx, input_identity(he, ihc), model_identities(st, cfg))
    ctx.work = internal_dir(out) / "work" / slide_key(slide) / f"preprocess-{fp}"
    ctx.work.mkdir(parents=True, exist_ok=True)
    return st.plan(ctx)


def run(
    cfg: Config,
    client=None,
    scheduler: str | None = None,
    progress: bool | Callable[[str, int, int], None] = False,
    performance_report: str | Path | None = None,
) -> RunResult:
    """Run the configured stages on every slide of the manifest.

    Parameters
    ----------
    cfg : Config
        Validated configuration; ``cfg.slides`` must point at a manifest.
    client : distributed.Client, optional
        Use this client; otherwise one is started from ``cfg.cluster`` (or ``scheduler``).
    scheduler : str, optional
        Address of an existing scheduler (ignored when ``client`` is given).
    progress : bool or callable
        ``True`` shows progress bars (slides, chunks); a callable gets ``(slide, done, total)``.
    performance_report : path, optional
        Write Dask's performance report (task stream, profiles, bandwidth) to this HTML file.

    Returns
    -------
    RunResult
        The cohort tables (also written under ``cfg.output_dir``), the failures, and per slide
        and stage whether it was recomputed (``result.stages``).
    """
    from daskpath.cluster import connect
    from daskpath.errors import ConfigError
    from daskpath.io import read_manifest

    if not cfg.slides:
        raise ConfigError("config key 'slides' is empty; set it to a manifest CSV (slide,he,ihc)")
    manifest = read_manifest(cfg.slides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_run_config(cfg, out)
    t0 = time.perf_counter()
    if client is None:
        with connect(cfg.cluster, scheduler) as c:
            return _run_reported(cfg, manifest, out, c, progress, t0, performance_report)
    return _run_reported(cfg, manifest, out, client, progress, t0, performance_report)


def _write_run_config(cfg: Config, out: Path) -> Path:
    """``output_dir/config.yaml``: the validated config of this run, paths made absolute, so
    the folder says what produced it (``daskpath run`` can rerun it; ``daskpath train
    translator --from-run`` finds the slides)."""
    import yaml

    from daskpath.outputs import atomic_path

    d = cfg.to_dict()
    d["slides"] = str(Path(cfg.slides).expanduser().resolve())
    d["output_dir"] = str(out.resolve())
    if cfg.cache_dir:
        d["cache_dir"] = str(Path(cfg.cache_dir).expanduser().resolve())
    path = out / "config.yaml"
    tmp = atomic_path(path)
    tmp.write_text("# written by daskpath run: the configuration of the run in this folder\n"
                   + yaml.safe_dump(d, sort_keys=False))
    os.replace(tmp, path)
    return path


def _run_reported(cfg, manifest, out, client, progress, t0, report) -> RunResult:
    from daskpath.runner import run_slides

    if report is None:
        return run_slides(cfg, manifest, out, client, progress, t0)
    from distributed import performance_report

    Path(report).parent.mkdir(parents=True, exist_ok=True)
    with performance_report(filename=str(report)):
        return run_slides(cfg, manifest, out, client, progress, t0)
