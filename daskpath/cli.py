"""Command-line interface: thin subcommands over the library.

``main(argv)`` returns the exit status: 0 success, 1 some slides failed or an internal error,
2 bad input (a one-line message naming the file/key and the fix; ``-v`` adds the traceback),
128 + N after signal N stopped the command: 130 for SIGINT (Ctrl-C), 143 for SIGTERM (what SLURM
sends on ``scancel`` and at the time limit). A stopped ``daskpath run`` keeps its finished chunks
and slides and prints one line, ``daskpath: interrupted: rerun the same command to resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from daskpath import __version__
from daskpath.errors import DaskpathError

__all__ = ["main"]

log = logging.getLogger("daskpath")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT, raised in the main thread of the CLI (see :func:`_stop_signals`).

    A ``KeyboardInterrupt``, so code that cleans up after Ctrl-C (cancelling futures, closing the
    cluster) does the same after SIGTERM.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _stop_signals(received: list[int]) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread.

    The first signal is appended to ``received``, mutes the teardown loggers for the rest of the
    process (a stopping cluster's chatter is not for users) and raises; later ones are only
    appended, so that they do not break the shutdown the first one started (it is bounded by
    ``daskpath.cluster.INTERRUPT_CLOSE_TIMEOUT``). A signal that was ignored when the command
    started (SIGINT of a background job) stays ignored. Outside the main thread (``main`` called
    from a thread) nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:  # noqa: ARG001
        received.append(signum)
        if len(received) == 1:
            # no import in a signal handler: without daskpath.cluster there is no cluster to stop
            quiet = getattr(sys.modules.get("daskpath.cluster"), "quiet_teardown", None)
            if quiet is not None:
                quiet()
            raise Interrupted(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _fail(message: str) -> None:
    """The one line on stderr that tells why a command stopped."""
    print(f"daskpath: {message}", file=sys.stderr)


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    if verbosity >= 2:
        level = logging.DEBUG - 5  # -vv: distributed's own INFO messages too
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _cmd_synth(args: argparse.Namespace) -> int:
    from daskpath.synthetic import make_cohort

    manifest = make_cohort(
        args.out_dir,
        pairs=args.pairs,
        size=tuple(args.size),
        seed=args.seed,
        layout=args.layout,
        tile_size=args.tile_size,
    )
    print(f"wrote {args.pairs} synthetic pair(s); manifest: {manifest}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from daskpath.io import ingest

    dst = ingest(args.src, args.dst, chunk_size=args.chunk_size, overwrite=args.overwrite)
    print(f"ingested {args.src} -> {dst}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from daskpath.io import slide_info

    for p in args.slides:
        info = slide_info(p)
        print(f"{p}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0


def _print_result(res) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        if len(res.slides):
            cols = [c for c in res.slides.columns if c not in ("height", "width", "mpp")]
            print(res.slides[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    # what this run's tables are made of (run.json): stale outputs of other runs are not listed
    run_json = res.output_dir / "run.json"
    published = json.loads(run_json.read_text()).get("outputs", []) if run_json.exists() else []
    names = [n for n in ("tiles.parquet", "slides.csv", "metrics.json", "run.json")
             if (res.output_dir / n).exists()]
    names += sorted({f.split("/")[0] + "/" for f in published if "/" in f})
    stages = [s for v in res.stages.values() for s, d in v.items() if d.get("recomputed")]
    done = f"{len(stages)} slide-stage(s) computed, {res.chunks_computed} of {res.chunks_total} chunks"
    print(f"\noutputs in {res.output_dir}/ ({', '.join(names)}) in {res.seconds:.1f} s ({done})")
    report = res.output_dir / "report.html"
    if report.exists():
        print(f"report: {report.resolve()}")
    if not res.failures.empty:
        print(f"{len(res.failures)} slide(s) failed, see {res.output_dir / 'failures.csv'}:",
              file=sys.stderr)
        for r in res.failures.itertuples(index=False):
            print(f"  {r.slide} [{r.stage}]: {r.error}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from daskpath.config import load_config
    from daskpath.pipeline import run

    overrides = list(args.set or [])
    if args.cluster:
        overrides.append(f"cluster.kind={args.cluster}")
    cfg = load_config(args.config, overrides)
    res = run(
        cfg,
        scheduler=args.scheduler,
        progress=not args.no_progress,
        performance_report=args.performance_report,
    )
    _print_result(res)
    return 0 if res.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from daskpath.config import load_config
    from daskpath.pipeline import run
    from daskpath.synthetic import make_cohort

    out = Path(args.out)
    manifest = out / "slides" / "manifest.csv"
    if not manifest.exists() or args.fresh:
        print(f"making a synthetic {args.size}x{args.size} slide pair in {out / 'slides'} ...")
        make_cohort(out / "slides", pairs=args.pairs, size=(args.size, args.size), seed=args.seed)
    overrides = [
        f"slides={manifest}",
        f"output_dir={out / 'results'}",
        "cluster.n_workers=2",
        "cluster.threads_per_worker=1",
        "cluster.dashboard_address=127.0.0.1:0",
        "overwrite=true",
    ] + list(args.set or [])
    cfg = load_config(None, overrides)
    res = run(cfg, progress=not args.no_progress)
    _print_result(res)
    return 0 if res.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
    """Pass the remaining arguments to the trainer of ``args.what``."""
    rest = list(args.rest)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if args.what == "stardist":
        from daskpath.train_stardist import main as train_main
    elif args.what == "rf":
        from daskpath.baselines.rf import main as train_main
    elif args.what == "classifier":
        from daskpath.baselines.classifier import main as train_main
    else:
        from daskpath.translate.train import main as train_main
    return int(train_main(rest) or 0)


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from daskpath.config import load_config

    cfg = load_config(args.config, args.set or [])
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from daskpath.cluster import kubernetes_manifests, manifests_yaml, slurm_job_script
    from daskpath.config import load_config

    cfg = load_config(args.config, args.set or [])
    if not args.print:
        print(f"daskpath cluster {args.target}: nothing to do; add --print to render the "
              f"{'job script' if args.target == 'slurm' else 'manifests'}", file=sys.stderr)
        return 2
    if args.target == "slurm":
        print(slurm_job_script(cfg.cluster), end="")
    else:
        print(manifests_yaml(kubernetes_manifests(cfg.cluster)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog="daskpath",
        description="Ki67 tumor ratios in whole-slide H&E / IHC pairs, at cluster scale with Dask.",
    )
    p.add_argument("--version", action="version", version=f"daskpath {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging; tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("synth", help="write synthetic (phantom) H&E/IHC pairs with ground truth")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--pairs", type=int, default=1)
    s.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(4096, 4096))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layout", choices=("tiled", "png", "stripped"), default="tiled",
                   help="tiled pyramidal JPEG TIFF (default) or the flat layouts of the reference cohort")
    s.add_argument("--tile-size", type=int, default=512)
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("ingest", help="convert a flat raster (PNG, stripped TIFF) to chunked OME-Zarr")
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path, nargs="?", default=None)
    s.add_argument("--chunk-size", type=int, default=1024)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_ingest)

    s = sub.add_parser("info", help="print size, tiles, mpp and levels of slides")
    s.add_argument("slides", nargs="+", type=Path)
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("run", help="run the pipeline on the slides of a config")
    s.add_argument("config", type=Path)
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set tiles.size=2048 (repeatable)")
    s.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    s.add_argument("--cluster", default=None,
                   choices=("local", "local-cuda", "slurm", "kubernetes", "address"),
                   help="cluster kind (same as --set cluster.kind=KIND)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--performance-report", metavar="FILE.html", default=None,
                   help="write Dask's performance report of the run to this file")
    s.set_defaults(func=_cmd_run, resumable=True)

    s = sub.add_parser("demo", help="synthetic pair + whole pipeline on a local cluster")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--size", type=int, default=4096)
    s.add_argument("--pairs", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fresh", action="store_true", help="regenerate the synthetic slides")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_demo, resumable=True)

    s = sub.add_parser(
        "train",
        help="train a model: stardist (nucleus segmentation), translator (H&E -> IHC GAN), "
        "rf (random-forest pixel classifier) or classifier (3-class ResNet18)",
        description="Reproduce a shipped model or train your own. Arguments after WHAT go to the "
        "trainer: `daskpath train stardist -- --help`, `daskpath train translator -- --help`, "
        "`daskpath train rf -- --help`, `daskpath train classifier -- --help`. "
        "`daskpath train translator OUT_DIR --config RUN.yaml` trains on the kept tiles of a finished "
        "run (random crops, flips), holding out whole slides (--test-fraction) for evaluation.json.",
    )
    s.add_argument("what", choices=("stardist", "translator", "rf", "classifier"))
    s.add_argument("rest", nargs=argparse.REMAINDER, help="trainer arguments (see -- --help)")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("config", help="print the merged, validated configuration")
    s.add_argument("config", type=Path, nargs="?", default=None)
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.set_defaults(func=_cmd_config)

    s = sub.add_parser("cluster", help="render the SLURM job script or Kubernetes manifests of a config")
    s.add_argument("target", choices=("slurm", "kubernetes"))
    s.add_argument("config", type=Path, nargs="?", default=None)
    s.add_argument("--print", action="store_true",
                   help="print the sbatch script of one worker job / the DaskCluster manifests")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.set_defaults(func=_cmd_cluster)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daskpath`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = -1 if args.quiet else args.verbose
    _setup_logging(verbosity)
    received: list[int] = []  # stop signals, first first
    try:
        with _stop_signals(received):
            return int(args.func(args))
    except DaskpathError as e:
        if args.verbose:
            log.exception("error")
        _fail(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            log.exception("interrupted")
        _fail("interrupted: rerun the same command to resume" if getattr(args, "resumable", False)
              else "interrupted")
        return 128 + (received[0] if received else signal.SIGINT)
    except Exception as e:  # noqa: BLE001
        if args.verbose:
            log.exception("internal error")
        _fail(f"internal error: {type(e).__name__}: {e} (rerun with -v for the traceback)")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
