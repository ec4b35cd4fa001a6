"""Flat rasters of a run are ingested on the workers, in parallel, before/while slides run.

The run's pre-phase (:func:`daskpath.io.ingest_on_cluster`, called by
:func:`daskpath.runner.run_slides`) submits one ``ingest-*`` task per PNG that has no usable
ingest yet; a slide thread waits for its own two files only. Checked here on a 2-process
cluster: the ingests run as worker tasks, the results equal a run on the same pixels as tiled
TIFF, the next run reuses the cache (no ingest task), a corrupt PNG fails only its slide, and
two ingests racing on one cache entry leave one valid store.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from distributed import get_task_stream

from daskpath import io
from daskpath.config import load_config
from daskpath.errors import SlideError
from daskpath.pipeline import run
from daskpath.synthetic import make_cohort


def _cfg(manifest: Path, out: Path, *extra: str):
    return load_config(None, [f"slides={manifest}", f"output_dir={out}", "stages=[preprocess]",
                              "tiles.size=256", "chunk_size=512", *extra])


@pytest.fixture(scope="module")
def png_cohort(tmp_path_factory) -> Path:
    """Two 1024^2 phantom pairs as flat PNGs (the reference cohort's layout)."""
    return make_cohort(tmp_path_factory.mktemp("png"), pairs=2, size=(1024, 1024), seed=3,
                       layout="png")


def _ingest_keys(stream: list[dict]) -> list[tuple[str, str]]:
    return [(str(t["key"]), t["worker"]) for t in stream if str(t["key"]).startswith("ingest-")]


@pytest.fixture(scope="module")
def png_run(png_cohort, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("png-run")
    with get_task_stream(client=dask_client) as ts:
        res = run(_cfg(png_cohort, out), client=dask_client)
    return res, out, _ingest_keys(ts.data)


def test_ingest_runs_on_workers(png_run, dask_client) -> None:
    res, out, keys = png_run
    assert res.ok, res.failures
    workers = set(dask_client.scheduler_info(n_workers=-1)["workers"])
    assert len(keys) == 4 and len({k for k, _ in keys}) == 4  # 2 pairs x 2 PNGs, once each
    assert {w for _, w in keys} <= workers  # ran as worker tasks, not in the client
    stores = sorted((out / "cache").glob("*.ome.zarr"))
    assert len(stores) == 4
    assert not list((out / "cache").glob("*.partial*"))  # renamed, nothing left half-written
    assert io._PENDING == {}  # the run released its pending ingests


def test_png_results_equal_tiled_tiff(png_run, png_cohort, dask_client, tmp_path) -> None:
    """The same pixels as lossless tiled TIFF (read in place) give the same tile table."""
    _, out, _ = png_run
    rows = pd.read_csv(png_cohort)
    base = png_cohort.parent
    tif_rows = []
    for r in rows.itertuples(index=False):
        paths = []
        for col in ("he", "ihc"):
            src = base / getattr(r, col)
            rgb = io.open_slide(src, cache_dir=tmp_path / "c").values
            dst = tmp_path / (Path(src).stem + ".tif")
            tifffile.imwrite(dst, rgb, tile=(256, 256), photometric="rgb", compression="zlib")
            paths.append(dst)
        tif_rows.append((r.slide, *paths))
    man = tmp_path / "tif.csv"
    pd.DataFrame(tif_rows, columns=["slide", "he", "ihc"]).to_csv(man, index=False)
    tif = run(_cfg(man, tmp_path / "out"), client=dask_client)
    assert tif.ok, tif.failures
    a = pd.read_parquet(out / "tiles.parquet").sort_values(["slide", "y0", "x0"])
    b = pd.read_parquet(tmp_path / "out" / "tiles.parquet").sort_values(["slide", "y0", "x0"])
    assert len(a) == 2 * 16
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True),
                                  check_exact=False, rtol=1e-9, atol=1e-12)


def test_next_run_reuses_cache(png_run, png_cohort, dask_client) -> None:
    _, out, _ = png_run
    with get_task_stream(client=dask_client) as ts:
        again = run(_cfg(png_cohort, out), client=dask_client)
    assert again.ok
    assert _ingest_keys(ts.data) == []  # no ingest task submitted
    assert len(list((out / "cache").glob("*.ome.zarr"))) == 4


def _corrupt_png(src: Path, dst: Path) -> None:
    """Flip bytes in the middle of the image data: header and IEND intact, so the file opens
    and the damage shows only when the pixels are decoded (on the worker)."""
    raw = bytearray(src.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])
    dst.write_bytes(bytes(raw))


def test_corrupt_png_fails_only_its_slide(png_cohort, dask_client, tmp_path) -> None:
    rows = pd.read_csv(png_cohort)
    base = png_cohort.parent
    bad = tmp_path / "broken_IHC.png"
    _corrupt_png(base / rows.loc[1, "ihc"], bad)
    io.slide_info(bad)  # the header still reads: the failure comes from the ingest task
    man = tmp_path / "m.csv"
    pd.DataFrame([(rows.loc[0, "slide"], base / rows.loc[0, "he"], base / rows.loc[0, "ihc"]),
                  ("bad", base / rows.loc[1, "he"], bad)],
                 columns=["slide", "he", "ihc"]).to_csv(man, index=False)
    with get_task_stream(client=dask_client) as ts:
        res = run(_cfg(man, tmp_path / "out", "retries=1"), client=dask_client)
    assert any("broken_IHC" in k for k, _ in _ingest_keys(ts.data))  # decoded on a worker
    assert not res.ok
    fails = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert list(fails["slide"]) == ["bad"]
    assert "broken_IHC.png" in fails.loc[0, "error"] and "\n" not in fails.loc[0, "error"]
    assert fails.loc[0, "stage"] == "open"
    tiles = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    assert set(tiles["slide"]) == {rows.loc[0, "slide"]}
    assert not list((tmp_path / "out" / "cache").glob("broken_IHC*"))  # no store, no temp


def test_racing_ingests_leave_one_valid_store(png_cohort, tmp_path) -> None:
    """Two runs sharing a cache ingest the same file at once: one store wins, both use it."""
    src = png_cohort.parent / pd.read_csv(png_cohort).loc[0, "he"]
    dst = tmp_path / "cache" / "same.ome.zarr"
    dst.parent.mkdir()
    barrier = threading.Barrier(2)
    real = io._level0_bands
    results: list[object] = []

    def synced(*args, **kwargs):  # both have created their temp store before either renames
        barrier.wait(timeout=30)
        return real(*args, **kwargs)

    def one() -> None:
        try:
            results.append(io._ingest_task(str(src), str(dst), 256))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            results.append(exc)

    io._level0_bands, saved = synced, io._level0_bands
    try:
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        io._level0_bands = saved
    assert len(results) == 2 and all(isinstance(r, dict) and "error" not in r for r in results)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["same.ome.zarr"]
    np.testing.assert_array_equal(io.open_slide(dst).values,
                                  io.open_slide(src, cache_dir=tmp_path / "c2").values)


def test_cluster_ingest_reports_lost_ingest_naming_the_file(png_cohort, tmp_path) -> None:
    """A failure that is not bad input (here: the client cannot submit) names the file."""
    src = png_cohort.parent / pd.read_csv(png_cohort).loc[0, "he"]

    class NoCluster:
        def submit(self, *a, **k):
            raise OSError("scheduler unreachable")

        def cancel(self, futures):  # pragma: no cover - nothing was submitted
            pass

    batch = io.ingest_on_cluster(NoCluster(), [src, src], tmp_path / "cache", limit=1)
    assert len(batch.jobs) == 1  # duplicates ingested once
    with batch, pytest.raises(SlideError, match=rf"ingest of .*{src.name}.*scheduler unreachable"):
        io.open_slide(src, cache_dir=tmp_path / "cache")
    assert io._PENDING == {}
