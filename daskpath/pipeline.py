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
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daskpath.config import Config
from daskpath.ownership import FolderLock, claim_folder
from daskpath.publish import RunSet
from daskpath.runner import RunResult, check_models, new_run_id
from daskpath.stages.preprocess import (
    TILE_COLUMNS,
    SlidePlan,
    keep_mask,
    summarize_slide,
    tiles_from_sums,
)

__all__ = ["RunResult", "SlidePlan", "TILE_COLUMNS", "keep_mask", "plan_preprocess", "run",
           "summarize_slide", "tiles_from_sums"]

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

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
    cfg: Config | None = None,
    client=None,
    scheduler: str | None = None,
    progress: bool | Callable[[str, int, int], None] = False,
    performance_report: str | Path | None = None,
    *,
    slides: str | os.PathLike[str] | pd.DataFrame | Sequence[tuple[str, Any, Any]] | None = None,
) -> RunResult:
    """Run the configured stages on every slide of the manifest.

    Parameters
    ----------
    cfg : Config, optional
        Validated configuration (:func:`daskpath.load_config`); default: the defaults.
    client : distributed.Client, optional
        Use this client; otherwise one is started from ``cfg.cluster`` (or ``scheduler``).
    scheduler : str, optional
        Address of an existing scheduler (ignored when ``client`` is given).
    progress : bool or callable
        ``True`` shows progress bars (slides, chunks) on a terminal or in a notebook, and logs a
        progress line every 30 s otherwise (no control characters in log files); a callable
        gets ``(slide, done, total)``.
    performance_report : path, optional
        Write Dask's performance report (task stream, profiles, bandwidth) to this HTML file.
    slides : path, DataFrame or list of (slide, he, ihc), optional
        The slide pairs, instead of ``cfg.slides``: a manifest CSV, a DataFrame with columns
        ``slide, he, ihc``, or ``(slide, he, ihc)`` tuples (relative paths against the current
        directory). A DataFrame or list is written to ``output_dir/manifest.csv``, which the
        run's ``config.yaml`` then names, so the folder still says what produced it.

    Returns
    -------
    RunResult
        The cohort tables (also written under ``cfg.output_dir``), the failures, and per slide
        and stage whether it was recomputed (``result.stages``).

    Raises
    ------
    ConfigError
        Neither ``slides`` nor ``cfg.slides`` is given.
    ManifestError, ManifestNotFoundError
        The manifest is unreadable or invalid (a ``ValueError`` / ``FileNotFoundError``).

    Examples
    --------
    >>> cfg = daskpath.load_config(None, ["output_dir=out", "stages=[preprocess]"])  # doctest: +SKIP
    >>> res = daskpath.run(cfg, slides=[("a", "a_HE.tif", "a_IHC.tif")])         # doctest: +SKIP
    """
    from daskpath.cluster import connect
    from daskpath.config import load_config
    from daskpath.errors import ConfigError
    from daskpath.io import read_manifest

    if cfg is None:
        cfg = load_config()
    source = slides if slides is not None else cfg.slides
    if source is None or (isinstance(source, str) and not source):
        raise ConfigError("config key 'slides' is empty; set it to a manifest CSV (slide,he,ihc), "
                          "or pass slides= (a path, a DataFrame or (slide, he, ihc) tuples)")
    manifest = read_manifest(source)
    out = Path(cfg.output_dir)
    _check_utf8({"output_dir": str(out), "cache_dir": cfg.cache_dir or "",
                 **{f"slide {r.slide} he": r.he for r in manifest.itertuples(index=False)},
                 **{f"slide {r.slide} ihc": r.ihc for r in manifest.itertuples(index=False)}})
    check_models(cfg)  # every model the stages need, resolved before the cluster starts
    claim_folder(out, force=cfg.overwrite, option="--force (overwrite: true)")
    run_id = new_run_id()
    with FolderLock(out, what=f"daskpath run {run_id}"):
        runset = RunSet(out, run_id)
        if isinstance(source, str | os.PathLike):
            cfg = replace(cfg, slides=str(source))
        else:  # the manifest given as data: write it down, so config.yaml names a file
            cfg = replace(cfg, slides=str(_write_manifest(manifest, out, runset)))
        _write_run_config(cfg, out, runset)
        t0 = time.perf_counter()
        if client is None:
            with connect(cfg.cluster, scheduler) as c:
                res = _run_reported(cfg, manifest, out, c, progress, t0, performance_report, runset)
        else:
            res = _run_reported(cfg, manifest, out, client, progress, t0, performance_report,
                                runset)
        claim_folder(out, force=True, run_id=run_id)  # the marker names the last run
        return res


def _check_utf8(paths: dict[str, str]) -> None:
    """Refuse a path that is not valid UTF-8 (Python keeps such bytes as surrogates): it could
    not be written into config.yaml, run.json or the tables after the work was done."""
    from daskpath.errors import InvalidInputError

    for what, p in paths.items():
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            shown = str(p).encode("utf-8", "backslashreplace").decode("ascii", "replace")
            raise InvalidInputError(f"{what}: path {shown[:120]} is not valid UTF-8; rename it "
                                    "(daskpath records paths in UTF-8 tables)") from None


def _write_manifest(manifest: pd.DataFrame, out: Path, runset: RunSet) -> Path:
    """``output_dir/manifest.csv``: a manifest given as data, absolute paths, written atomically
    into the run's set; returns the user-facing path (which shows it once the run is done)."""
    from daskpath.outputs import write_table

    write_table(manifest, runset.path("manifest.csv"))
    return out.absolute() / "manifest.csv"


def _write_run_config(cfg: Config, out: Path, runset: RunSet) -> Path:
    """``output_dir/config.yaml``: the validated config of this run, paths made absolute, so
    the folder says what produced it (``daskpath run`` can rerun it; ``daskpath train
    translator --from-run`` finds the slides). Part of the run's set."""
    import yaml

    from daskpath.outputs import atomic_path

    d = cfg.to_dict()
    d["slides"] = os.path.abspath(Path(cfg.slides).expanduser())  # not resolved: a link stays
    d["output_dir"] = str(out.resolve())
    if cfg.cache_dir:
        d["cache_dir"] = str(Path(cfg.cache_dir).expanduser().resolve())
    path = runset.path("config.yaml")
    tmp = atomic_path(path)
    tmp.write_text(f"# written by daskpath run {runset.run_id}: the configuration of the run "
                   "in this folder\n" + yaml.safe_dump(d, sort_keys=False))
    os.replace(tmp, path)
    return path


def _run_reported(cfg, manifest, out, client, progress, t0, report, runset=None) -> RunResult:
    """:func:`run_slides`, inside Dask's performance report when ``report`` names a file.

    The report is written with BokehJS inline (``mode="inline"``, ~1.7 MB more) and its
    favicon made local (:func:`daskpath.report.offline_page`): the page renders without network
    access (a hospital network, a laptop offline), where Dask's default (BokehJS from a CDN)
    shows a blank page.
    """
    from daskpath.runner import run_slides

    if report is None:
        return run_slides(cfg, manifest, out, client, progress, t0, runset)
    from distributed import performance_report

    from daskpath.report import offline_page

    Path(report).parent.mkdir(parents=True, exist_ok=True)
    try:
        with performance_report(filename=str(report), mode="inline"):
            return run_slides(cfg, manifest, out, client, progress, t0, runset)
    finally:
        try:
            left = offline_page(report) if Path(report).is_file() else []
        except (OSError, ValueError) as e:  # the run's results matter more than its page
            left = [f"(not checked: {e})"]
        if left:
            log.warning("performance report %s may need the network: %s (the scheduler's "
                        "distributed ignored mode='inline'?)", report, left[0][:120])
