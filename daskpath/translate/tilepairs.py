"""Training pairs from a finished run: the kept tiles of ``tiles.parquet``, split by slide.

A run (``daskpath run``) writes ``<output_dir>/tiles.parquet``: one row per tile with ``slide, y0,
x0, height, width, keep`` (``keep`` = enough tissue and H&E/IHC SSIM above the threshold: the
tiles where the two sections agree). :func:`export_tile_pairs` reads the H&E and the IHC of
every kept tile through :func:`daskpath.io.open_pair` -- the IHC on the refined alignment of
the tile where per-tile registration refined it (``registered``: moved by the rounded ``dy,
dx``; :mod:`daskpath.registration`), else at the same pixel coordinates, as the pipeline
compares them -- and writes them in the layout of pytorch-CycleGAN-and-pix2pix:

* ``layout="unaligned"`` (default; CycleGAN's ``--dataset_mode unaligned`` and
  :func:`~daskpath.translate.train.folder_pairs`): ``trainA/``, ``trainB/``, ``testA/``,
  ``testB/``, one PNG per tile, the same file name on both sides (``<slide>_y<y0>_x<x0>.png``),
  so pairs match by sorted name;
* ``layout="aligned"`` (pix2pix's ``--dataset_mode aligned``): ``train/``, ``test/``, each PNG the
  H&E (A, left) and the IHC (B, right) side by side.

plus ``pairs.csv`` (one row per exported tile: ``slide, y0, x0, height, width, split, a, b`` and
the tile table's measurements) and ``split.json`` (the slide lists, fraction and seed).

**Slide-level split** (:func:`split_slides`): whole slides go to train or test -- never tiles of
one slide on both sides, since neighbouring tiles of one slide share stain, scanner and
patient -- deterministic for a seed: the slides with kept tiles are sorted, shuffled by
``numpy.random.default_rng(seed)``, and the first ``max(1, round(fraction * n))`` (at most
``n - 1``) are held out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from daskpath.errors import InvalidInputError

__all__ = ["RunInputs", "run_inputs", "kept_tiles", "split_slides", "export_tile_pairs", "LAYOUTS"]

log = logging.getLogger(__name__)

#: Folder layouts of :func:`export_tile_pairs`.
LAYOUTS = ("unaligned", "aligned")
_NEEDED = ("slide", "y0", "x0", "height", "width", "keep")


@dataclass(frozen=True)
class RunInputs:
    """Where a finished run's tiles and slides are: its ``output_dir``, manifest and cache."""

    run_dir: Path
    manifest: Path
    cache_dir: Path | None = None
    chunk_size: int | None = None


def run_inputs(config: str | os.PathLike[str] | None = None, run_dir: str | os.PathLike[str] | None = None,
               slides: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> RunInputs:
    """Resolve a run from its config (``slides``, ``output_dir``) or from ``run_dir`` + manifest.

    Parameters
    ----------
    config : path, optional
        The YAML the run used; ``overrides`` (``"dotted.key=value"``) apply to it.
    run_dir, slides : path, optional
        Override the config's ``output_dir`` and ``slides``. Without ``config``, the run folder's
        own ``config.yaml`` (written by ``daskpath run``) is used when there is one; otherwise
        both are needed.
    overrides : sequence of str
        ``--set`` style overrides of ``config``.

    Returns
    -------
    RunInputs
        The run folder, the manifest, and where flat rasters were ingested (the run's
        ``cache_dir``, default ``<output_dir>/cache``) with the run's ``chunk_size``.

    Raises
    ------
    InvalidInputError
        Neither a config nor a run folder, or no manifest.
    """
    cache, chunk = None, None
    if config is None and run_dir is not None and (Path(run_dir).expanduser() / "config.yaml").is_file():
        config = Path(run_dir).expanduser() / "config.yaml"  # written by `daskpath run`
    if config is not None:
        from daskpath.config import load_config

        cfg = load_config(config, list(overrides))
        run_dir = run_dir if run_dir is not None else cfg.output_dir
        slides = slides if slides is not None else cfg.slides
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        chunk = cfg.chunk_size
    if run_dir is None:
        raise InvalidInputError("train from a run: pass --config RUN.yaml (the run's config) or --from-run OUTPUT_DIR")
    if slides is None:
        raise InvalidInputError(f"train from run {run_dir}: the slide manifest is unknown; pass --slides "
                                "MANIFEST.csv (the one the run used) or --config RUN.yaml")
    run_dir = Path(run_dir).expanduser()
    return RunInputs(run_dir, Path(slides).expanduser(), cache or run_dir / "cache", chunk)


def kept_tiles(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The kept rows of ``<run_dir>/tiles.parquet`` (``keep`` true), in file order.

    Raises
    ------
    InvalidInputError
        Missing run folder or ``tiles.parquet``, missing columns, or no kept tile.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise InvalidInputError(f"run folder {run_dir} not found; pass the output_dir of a finished `daskpath run`")
    path = run_dir / "tiles.parquet"
    if not path.is_file():
        raise InvalidInputError(f"{path} not found; run `daskpath run CONFIG.yaml` first (its preprocess "
                                "stage writes the tile table)")
    tiles = pd.read_parquet(path)
    missing = [c for c in _NEEDED if c not in tiles.columns]
    if missing:
        raise InvalidInputError(f"{path} lacks column(s) {', '.join(missing)}; it is not a daskpath tile "
                                "table: rerun `daskpath run`")
    kept = tiles[tiles["keep"].astype(bool)].reset_index(drop=True)
    if kept.empty:
        raise InvalidInputError(f"{path} has no kept tiles (keep = tissue >= tiles.min_tissue and SSIM >= "
                                "ssim.threshold); check the pairs are registered or lower ssim.threshold and rerun")
    return kept


def split_slides(slides: Sequence[str], test_fraction: float = 0.25, seed: int = 0) -> dict[str, str]:
    """Assign whole slides to ``"train"`` or ``"test"``, deterministically for ``seed``.

    Parameters
    ----------
    slides : sequence of str
        Slide ids (duplicates are ignored: one decision per slide).
    test_fraction : float
        Share of slides held out, ``0 < test_fraction < 1``; at least one slide goes to each side.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    dict
        ``{slide: "train" | "test"}``.
    """
    try:
        f = float(test_fraction)
    except (TypeError, ValueError):
        raise InvalidInputError(f"test_fraction={test_fraction!r} must be a number in (0, 1), e.g. 0.25") from None
    if not 0.0 < f < 1.0:
        raise InvalidInputError(f"test_fraction={test_fraction!r} must be > 0 and < 1, e.g. 0.25 to hold "
                                "out a quarter of the slides")
    uniq = sorted({str(s) for s in slides})
    if len(uniq) < 2:
        raise InvalidInputError(f"a slide-level train/test split needs at least 2 slides with kept tiles, got "
                                f"{len(uniq)} ({', '.join(uniq) or 'none'}); add slides to the run")
    order = np.random.default_rng(int(seed)).permutation(len(uniq))
    n_test = min(len(uniq) - 1, max(1, int(round(f * len(uniq)))))
    test = {uniq[i] for i in order[:n_test]}
    return {s: ("test" if s in test else "train") for s in uniq}


def _tile_name(slide: str, y0: int, x0: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in str(slide))
    return f"{safe}_y{int(y0)}_x{int(x0)}.png"


def _dirs(layout: str) -> list[str]:
    return ["trainA", "trainB", "testA", "testB"] if layout == "unaligned" else ["train", "test"]


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def export_tile_pairs(
    run: RunInputs | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    layout: str = "unaligned",
    max_tiles_per_slide: int | None = None,
    force: bool = False,
) -> pd.DataFrame:
    """Write the kept tiles of a run as H&E/IHC training pairs, split train/test by slide.

    Parameters
    ----------
    run : RunInputs or path
        The run (:func:`run_inputs`), or its ``output_dir`` (then ``manifest`` is needed).
    out_dir : path
        Destination (module docstring for the layout). Its layout folders are replaced; an
        export with the same tiles and split is left as it is.
    manifest : path, optional
        The run's manifest (``slide,he,ihc``), when ``run`` is a path.
    test_fraction, seed : float, int
        The slide-level split (:func:`split_slides`).
    layout : {"unaligned", "aligned"}
        ``trainA/trainB/testA/testB`` or pix2pix's side-by-side ``train/test``.
    max_tiles_per_slide : int, optional
        Keep at most this many kept tiles per slide (an even spread in table order).
    force : bool
        Write into a non-empty folder that daskpath did not make (only daskpath's own names,
        ``pairs.csv``, ``split.json`` and the layout folders, are replaced there).

    Returns
    -------
    pandas.DataFrame
        The ``pairs.csv`` table: ``slide, y0, x0, height, width, split, a, b`` (paths relative to
        ``out_dir``) and the tile table's other columns.
    """
    from daskpath.io import open_pair, read_manifest, region_source

    from daskpath.ownership import check_folder, claim_folder

    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout={layout!r} must be one of {', '.join(LAYOUTS)}")
    check_folder(Path(out_dir).expanduser(), force=force)
    if not isinstance(run, RunInputs):
        if manifest is None:
            raise InvalidInputError(f"export from run {run}: pass manifest= (the run's slide manifest)")
        run = RunInputs(Path(run).expanduser(), Path(manifest).expanduser(), Path(run).expanduser() / "cache")
    if max_tiles_per_slide is not None and int(max_tiles_per_slide) < 1:
        raise InvalidInputError(f"max_tiles_per_slide={max_tiles_per_slide!r} must be >= 1 (or None for all)")
    kept = kept_tiles(run.run_dir)
    man = read_manifest(run.manifest).set_index("slide")
    unknown = sorted(set(kept["slide"]) - set(man.index))
    if unknown:
        raise InvalidInputError(f"slide(s) {', '.join(map(str, unknown[:3]))} of {run.run_dir / 'tiles.parquet'} "
                                f"are not in manifest {run.manifest}; pass the manifest the run used")
    if max_tiles_per_slide is not None:
        n = int(max_tiles_per_slide)
        rows = []
        for _, idx in kept.groupby("slide", sort=False).indices.items():
            pick = np.unique(np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int))
            rows.extend(idx[pick])
        kept = kept.iloc[sorted(rows)].reset_index(drop=True)
    split = split_slides(kept["slide"].tolist(), test_fraction, seed)
    table = kept.copy()
    table["split"] = table["slide"].map(split)
    names = [_tile_name(s, y, x) for s, y, x in zip(table["slide"], table["y0"], table["x0"])]
    if layout == "unaligned":
        table["a"] = [f"{sp}A/{n}" for sp, n in zip(table["split"], names)]
        table["b"] = [f"{sp}B/{n}" for sp, n in zip(table["split"], names)]
    else:
        table["a"] = [f"{sp}/{n}" for sp, n in zip(table["split"], names)]
        table["b"] = table["a"]
    front = ["slide", "y0", "x0", "height", "width", "split", "a", "b"]
    table = table[front + [c for c in table.columns if c not in front]]

    out = Path(out_dir).expanduser()
    claim_folder(out, force=force, made_by="export tile pairs")
    info = {"run_dir": str(run.run_dir.absolute()), "manifest": str(run.manifest.absolute()),
            "test_fraction": float(test_fraction), "seed": int(seed), "layout": layout,
            "max_tiles_per_slide": max_tiles_per_slide,
            "train_slides": sorted(s for s, v in split.items() if v == "train"),
            "test_slides": sorted(s for s, v in split.items() if v == "test"),
            "n_train_tiles": int((table["split"] == "train").sum()),
            "n_test_tiles": int((table["split"] == "test").sum())}
    if _same_export(out, table, info):
        log.info("tile pairs in %s are up to date", out)
        return pd.read_csv(out / "pairs.csv")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("pairs.csv", "split.json"):  # incomplete until both are rewritten at the end
        (out / name).unlink(missing_ok=True)
    for d in _dirs("unaligned") + _dirs("aligned"):
        if (out / d).exists():
            shutil.rmtree(out / d)
    for d in _dirs(layout):
        (out / d).mkdir(parents=True)
    for slide, g in table.groupby("slide", sort=False):
        row = man.loc[slide]
        ds = open_pair(row["he"], row["ihc"], chunk_size=run.chunk_size, cache_dir=run.cache_dir)
        he_src, ihc_src = region_source(ds["he"]), region_source(ds["ihc"])
        shape = (int(ds["he"].shape[0]), int(ds["he"].shape[1]))
        for r in g.itertuples(index=False):
            ys, xs = slice(int(r.y0), int(r.y0 + r.height)), slice(int(r.x0), int(r.x0 + r.width))
            a, b = np.asarray(he_src[ys, xs]), _ihc_tile(ihc_src, r, shape)
            if layout == "unaligned":
                _save_png(a, out / r.a)
                _save_png(b, out / r.b)
            else:
                _save_png(np.concatenate([a, b], axis=1), out / r.a)
    from daskpath.outputs import write_json, write_table

    write_table(table, out / "pairs.csv")
    write_json(info, out / "split.json")
    return pd.read_csv(out / "pairs.csv")


def _ihc_tile(ihc_src, r, shape: tuple[int, int]) -> np.ndarray:
    """The IHC tile paired with H&E tile ``r``: on the refined alignment when registration
    refined it (``registered``; moved by the rounded ``dy, dx``, edge pixels repeated outside
    the slide), else at the same coordinates."""
    from daskpath._halo import read_padded

    y0, x0, h, w = int(r.y0), int(r.x0), int(r.height), int(r.width)
    if bool(getattr(r, "registered", False)):
        y0, x0 = y0 + int(round(r.dy)), x0 + int(round(r.dx))
    return read_padded(ihc_src, y0, y0 + h, x0, x0 + w, shape)


def _same_export(out: Path, table: pd.DataFrame, info: dict) -> bool:
    """Whether ``out`` already holds exactly this export (same tiles, split, layout, files)."""
    try:
        old_info = json.loads((out / "split.json").read_text())
        old = pd.read_csv(out / "pairs.csv")
    except (OSError, ValueError):
        return False
    keys = ["slide", "y0", "x0", "height", "width", "split", "a", "b"]
    if old_info != json.loads(json.dumps(info)) or list(old.columns[:len(keys)]) != keys:
        return False
    a = old[keys].astype(str).reset_index(drop=True)
    b = table[keys].astype(str).reset_index(drop=True)
    if not a.equals(b):
        return False
    return all((out / p).is_file() for p in pd.concat([old["a"], old["b"]]).unique())
