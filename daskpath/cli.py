"""Command-line interface: thin subcommands over the library.

``main(argv)`` returns the exit status: 0 success, 1 some slides failed or an internal error,
2 bad input (a one-line message naming the file/key and the fix; ``-v`` adds the traceback),
128 + N after signal N stopped the command: 130 for SIGINT (Ctrl-C), 143 for SIGTERM (what SLURM
sends on ``scancel`` and at the time limit). A stopped ``daskpath run`` keeps its finished chunks
and slides and prints one line, ``daskpath: interrupted: rerun the same command to resume``.
A closed output pipe (``daskpath run ... | head``) ends the command quietly: 141 (128 + SIGPIPE).

``-q`` / ``-v`` / ``-vv`` go before or after the subcommand. ``-q``: warnings and errors only;
default: one line per slide; ``-v``: daskpath's debug messages, TensorFlow's, absl's and
libvips' info (silenced otherwise, also in the worker processes); ``-vv``: every library's
debug output (see :mod:`daskpath._logging`). Progress bars are drawn only on a terminal; in a
log file or a pipe a progress line is logged every 30 s instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from daskpath import __version__
from daskpath._logging import chatter_env, setup_logging
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
    with contextlib.suppress(OSError):  # stderr itself may be a closed pipe
        print(f"daskpath: {message}", file=sys.stderr)


def _stdout_gone() -> None:
    """After a BrokenPipeError on stdout: point it at /dev/null, so that the interpreter's final
    flush does not report the same error again."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _cmd_synth(args: argparse.Namespace) -> int:
    from daskpath.synthetic import make_cohort

    manifest = make_cohort(
        args.out_dir,
        pairs=args.pairs,
        size=tuple(args.size),
        seed=args.seed,
        layout=args.layout,
        tile_size=args.tile_size,
        realism=args.realism,
    )
    print(f"wrote {args.pairs} synthetic pair(s) ({args.realism}); manifest: {manifest}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from daskpath.io import ingest

    dst = ingest(args.src, args.dst, chunk_size=args.chunk_size, overwrite=args.overwrite)
    print(f"ingested {args.src} -> {dst}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from daskpath import ome
    from daskpath.io import slide_info

    for p in args.slides:
        d = Path(p)
        if d.is_dir() and ((d / "zarr.json").is_file() or (d / ".zattrs").is_file()):
            # an OME-Zarr (ingest, layers, virtual IHC, labels): what the NGFF metadata says
            print("\n".join(ome.format_description(ome.describe(p))))
            continue
        info = slide_info(p)
        print(f"{p}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0


def _print_result(res) -> None:
    import pandas as pd

    from daskpath.outputs import format_number

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        if len(res.slides):
            cols = [c for c in res.slides.columns if c not in ("height", "width", "mpp")]
            print(res.slides[cols].to_string(index=False, float_format=format_number))
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
        print(f"report: {report.absolute()}")  # the link in output_dir, not the run folder
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
    if args.force:
        overrides.append("overwrite=true")
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
    from daskpath.errors import ConfigError

    if args.target == "tls":
        return _cluster_tls(args)
    if args.print is None:
        what = "job script" if args.target == "slurm" else "manifests"
        _fail(f"cluster {args.target}: nothing to do; add --print to render the {what} "
              f"(daskpath cluster {args.target} --print [CONFIG])")
        return 2
    config = args.config
    if isinstance(args.print, str):  # --print CONFIG
        if config is not None:
            raise ConfigError(f"two configs given ({args.print} and {config}): give one, as "
                              f"daskpath cluster {args.target} --print CONFIG")
        config = Path(args.print)
    cfg = load_config(config, args.set or [])
    if args.target == "slurm":
        print(slurm_job_script(cfg.cluster), end="")
    else:
        print(manifests_yaml(kubernetes_manifests(cfg.cluster)), end="")
    return 0


def _cluster_tls(args: argparse.Namespace) -> int:
    from daskpath.security import make_tls

    if args.config is None:
        _fail("cluster tls: name the folder for the certificates: daskpath cluster tls DIR "
              "[--host NODE ...]")
        return 2
    files = make_tls(args.config, hosts=args.host or [], days=args.days, force=args.force)
    d = Path(args.config)
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    print(f"use it with: cluster.security: {{kind: tls, dir: {d.resolve()}}}  "
          f"(SLURM scripts: DASKPATH_TLS_DIR={d.resolve()}; Kubernetes: kubectl create secret "
          f"generic <cluster.kubernetes.name>-tls --from-file={d.resolve()})")
    print(f"keep {files['ca_key_file'].name} private: whoever holds it can join the cluster")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    """Download a Zenodo record, verify it, write its manifest.csv. A failed download (network,
    checksum) exits 1 with one line; bad input (source, --api, --only) exits 2 through main."""
    from daskpath.fetch import FetchError, fetch_record

    try:
        manifest = fetch_record(args.source, args.dir, api=args.api, workers=args.workers,
                                progress=not args.no_progress, only=args.only)
    except FetchError as e:
        if _verbosity(args) > 0:
            log.exception("fetch failed")
        _fail(f"error: {e}")
        return 1
    with open(manifest) as fh:
        pairs = sum(1 for _ in fh) - 1
    print(f"{pairs} slide pair(s); manifest: {manifest}")
    print(f"use it with: daskpath run CONFIG.yaml --set slides={manifest}")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Help with the default of every option that takes a value: ``(default: X)`` is appended
    unless the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0:  # a flag (store_true, count, help, version): off unless given
            return text
        default = action.default
        if default is None or default == []:
            return f"{text} (default: none)"
        if isinstance(default, (tuple, list)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"  # help is %-formatted


def _verbosity_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``-v`` / ``-q``, on the main parser and again on every subcommand (so they work before
    or after it). A subcommand's go to their own ``dest`` (argparse copies a subparser's values
    over the main parser's, which would lose a ``-v`` given before the subcommand)."""
    sfx = "" if top else "_sub"
    extra = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", dest=f"verbose{sfx}",
                        **({"default": 0} if top else extra),
                        help="more output: -v adds daskpath's debug messages, TensorFlow / absl / "
                        "libvips info and tracebacks of errors; -vv every library's debug output")
    parser.add_argument("-q", "--quiet", action="store_true", dest=f"quiet{sfx}", **extra,
                        help="warnings and errors only")


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set tiles.size=2048; repeatable "
                        "(default: no overrides)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog="daskpath",
        description="Ki67 tumor ratios in whole-slide H&E / IHC pairs, at cluster scale with Dask.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"daskpath {__version__}")
    _verbosity_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        kw.setdefault("description", kw.get("help"))
        sp = sub.add_parser(name, formatter_class=_HelpFormatter, **kw)
        _verbosity_options(sp, top=False)
        return sp

    s = command("synth", help="write synthetic (phantom) H&E/IHC pairs with ground truth")
    s.add_argument("out_dir", type=Path, help="folder for the slides and manifest.csv")
    s.add_argument("--pairs", type=int, default=1, help="number of slide pairs")
    s.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(4096, 4096),
                   help="slide height and width in pixels")
    s.add_argument("--seed", type=int, default=0,
                   help="random seed of the first pair (pair i: seed + i)")
    s.add_argument("--layout", choices=("tiled", "png", "stripped", "zarr"), default="tiled",
                   help="tiled pyramidal JPEG TIFF, or the flat layouts of the reference cohort "
                   "(PNG, stripped TIFF), or OME-Zarr (NGFF 0.5)")
    s.add_argument("--tile-size", type=int, default=512,
                   help="TIFF tile side in pixels (tiled layout)")
    s.add_argument("--realism", choices=("easy", "realistic"), default="easy",
                   help="easy: the original phantom; realistic: non-rigid deformation between "
                   "sections, cell turnover, stain variation, a weak H&E cue of Ki67, artefacts "
                   "with truth masks, scanner JPEG")
    s.set_defaults(func=_cmd_synth)

    s = command("ingest", help="convert a flat raster (PNG, stripped TIFF) to chunked OME-Zarr")
    s.add_argument("src", type=Path, help="the slide file to convert")
    s.add_argument("dst", type=Path, nargs="?", default=None,
                   help="output folder (default: beside SRC, suffix replaced by .ome.zarr)")
    s.add_argument("--chunk-size", type=int, default=1024,
                   help="chunk side of the written arrays in pixels (a multiple of 16)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    s.set_defaults(func=_cmd_ingest)

    s = command("info", help="print size, tiles, mpp and levels of slides")
    s.add_argument("slides", nargs="+", type=Path, help="slide files or OME-Zarr folders")
    s.set_defaults(func=_cmd_info)

    s = command("run", help="run the pipeline on the slides of a config")
    s.add_argument("config", type=Path, help="the run's YAML config (see `daskpath config`)")
    _add_set(s)
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of an existing Dask scheduler (default: start the cluster of "
                   "cluster.kind)")
    s.add_argument("--cluster", default=None,
                   choices=("local", "local-cuda", "slurm", "kubernetes", "address"),
                   help="cluster kind, same as --set cluster.kind=KIND (default: the config's "
                   "cluster.kind)")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bars (on a terminal) or progress lines (otherwise)")
    s.add_argument("--force", action="store_true",
                   help="write into an output_dir that holds files daskpath did not create and "
                   "recompute every stage (same as --set overwrite=true); only daskpath's own "
                   "file names are written or removed there")
    s.add_argument("--performance-report", metavar="FILE.html", default=None,
                   help="write Dask's performance report of the run to this file (default: no "
                   "report)")
    s.set_defaults(func=_cmd_run, resumable=True)

    s = command("demo", help="synthetic pair + whole pipeline on a local cluster")
    s.add_argument("--out", default="demo_out", help="folder for the slides and the results")
    s.add_argument("--size", type=int, default=4096,
                   help="side of the square synthetic slides in pixels")
    s.add_argument("--pairs", type=int, default=1, help="number of slide pairs")
    s.add_argument("--seed", type=int, default=0, help="random seed of the synthetic slides")
    s.add_argument("--fresh", action="store_true", help="regenerate the synthetic slides")
    _add_set(s)
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bars (on a terminal) or progress lines (otherwise)")
    s.set_defaults(func=_cmd_demo, resumable=True)

    s = command(
        "train",
        help="train a model: stardist (nucleus segmentation), translator (H&E -> IHC GAN), "
        "rf (random-forest pixel classifier) or classifier (3-class ResNet18)",
        description="Reproduce a shipped model or train your own. Arguments after WHAT go to the "
        "trainer: `daskpath train stardist -- --help`, `daskpath train translator -- --help`, "
        "`daskpath train rf -- --help`, `daskpath train classifier -- --help`. "
        "`daskpath train translator OUT_DIR --config RUN.yaml` trains on the kept tiles of a finished "
        "run (random crops, flips), holding out whole slides (--test-fraction) for "
        "evaluation.json. -v/-q go before WHAT.",
    )
    s.add_argument("what", choices=("stardist", "translator", "rf", "classifier"),
                   help="the model to train")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="trainer arguments (see -- --help)")
    s.set_defaults(func=_cmd_train)

    s = command("config", help="print the merged, validated configuration")
    s.add_argument("config", type=Path, nargs="?", default=None,
                   help="a YAML config (default: the shipped defaults only)")
    _add_set(s)
    s.set_defaults(func=_cmd_config)

    s = command(
        "cluster",
        help="render the SLURM job script or Kubernetes manifests of a config",
        description="Print what cluster.kind slurm / kubernetes would submit, without starting "
        "anything: `daskpath cluster slurm --print my.yaml` (the sbatch script of one worker "
        "job; the scheduler address is the placeholder tcp://SCHEDULER_HOST:PORT), "
        "`daskpath cluster kubernetes --print my.yaml` (the DaskCluster manifests and the "
        "scheduler's NetworkPolicy). `daskpath cluster tls DIR --host NODE` makes a CA and a "
        "certificate for cluster.security (mutual TLS between client, scheduler and workers).",
    )
    s.add_argument("target", choices=("slurm", "kubernetes", "tls"),
                   help="what to render (slurm, kubernetes) or make (tls: a CA and certificate "
                   "for cluster.security)")
    s.add_argument("config", type=Path, nargs="?", default=None,
                   help="a YAML config (or give it after --print; default: the shipped defaults); "
                   "for tls: the folder to write")
    s.add_argument("--host", action="append", default=None, metavar="NAME",
                   help="tls: a host name or IP the scheduler is reached by (repeatable; "
                   "localhost is always included)")
    s.add_argument("--days", type=int, default=365, help="tls: certificate validity in days")
    s.add_argument("--force", action="store_true",
                   help="tls: write into a non-empty folder daskpath did not make")
    s.add_argument("--print", nargs="?", const=True, default=None, metavar="CONFIG",
                   help="print the sbatch script of one worker job / the DaskCluster manifests "
                   "of CONFIG (default: the config given before, else the shipped defaults)")
    _add_set(s)
    s.set_defaults(func=_cmd_cluster)

    s = command(
        "fetch",
        help="download a published cohort (a Zenodo record), verify it and write its "
        "manifest.csv",
        description="Download the files of a Zenodo record into DIR in parallel, resuming "
        "interrupted downloads (rerun the same command), verify each against the published "
        "checksum, extract zip archives, and pair H&E and IHC files by name into "
        "DIR/manifest.csv (slide,he,ihc). E.g. `daskpath fetch zenodo:11218961 cohort/` for "
        "the reference cohort.",
    )
    s.add_argument("source", help="the record: zenodo:<id>, 10.5281/zenodo.<id>, "
                   "https://doi.org/10.5281/zenodo.<id> or https://zenodo.org/records/<id>")
    s.add_argument("dir", type=Path, help="folder for the files and manifest.csv (created when "
                   "missing)")
    s.add_argument("--api", default=None, metavar="URL",
                   help="REST API base, for a mirror (default: https://zenodo.org/api)")
    s.add_argument("--workers", type=int, default=4, help="files downloaded at once")
    s.add_argument("--only", action="append", metavar="GLOB",
                   help="download only the files whose name matches GLOB (case-insensitive, "
                   "e.g. '*_HE.png'); repeatable (default: every file)")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) or progress lines (otherwise)")
    s.set_defaults(func=_cmd_fetch, resumable=True)
    return p


def _verbosity(args: argparse.Namespace) -> int:
    """-1 with -q (before or after the subcommand), else the number of -v."""
    if args.quiet or getattr(args, "quiet_sub", False):
        return -1
    return int(args.verbose) + int(getattr(args, "verbose_sub", 0))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daskpath`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = _verbosity(args)
    setup_logging(verbosity)
    received: list[int] = []  # stop signals, first first
    try:
        # before any worker process is spawned: they inherit the environment
        with chatter_env(verbosity), _stop_signals(received):
            status = int(args.func(args))
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return status
    except DaskpathError as e:
        if verbosity > 0:
            log.exception("error")
        _fail(f"error: {e}")
        return 2
    except BrokenPipeError:  # `daskpath run ... | head`: the reader has gone, so do we
        _stdout_gone()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        if verbosity > 0:
            log.exception("interrupted")
        _fail("interrupted: rerun the same command to resume" if getattr(args, "resumable", False)
              else "interrupted")
        return 128 + (received[0] if received else signal.SIGINT)
    except Exception as e:  # noqa: BLE001
        if verbosity > 0:
            log.exception("internal error")
        _fail(f"internal error: {type(e).__name__}: {e} (rerun with -v for the traceback)")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
