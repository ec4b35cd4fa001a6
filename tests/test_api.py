"""The Python API takes what it gives: xarray in, xarray out; tile tables; run() from data.

Shown here: ``Dataset.to_zarr`` round trip of an opened pair; tissue_mask / ssim_map /
translate take DataArrays and keep their coordinates and mpp; ``tile_table(ds)`` equals the
pipeline's ``tiles.parquet`` on the same pair; ``run()`` takes a manifest DataFrame or a list;
``measure_nuclei`` validates tile-table regions; the nuclei table is GeoParquet that
``geopandas.read_parquet`` loads; every public name in the README is reachable.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
import xarray as xr

import daskpath
from daskpath.errors import InvalidInputError, ManifestError
from daskpath.io import open_pair, open_slide, read_manifest, region_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(synth_cohort):
    """The first phantom pair of the session cohort (2048^2), as open_pair gives it."""
    man = read_manifest(synth_cohort)
    row = man.iloc[0]
    return row.slide, row.he, row.ihc, open_pair(row.he, row.ihc)


# --------------------------------------------------------------------------------------------
# readers out of attrs: Dataset.to_zarr
# --------------------------------------------------------------------------------------------
def test_open_pair_to_zarr_round_trip(pair, tmp_path):
    _, he, _, ds = pair
    assert all(not hasattr(v, "__getitem__") or isinstance(v, str | tuple)
               for v in ds.he.attrs.values())  # plain attrs only
    assert region_source(ds.he).path == he  # the reader is in encoding
    path = tmp_path / "pair.zarr"
    ds.to_zarr(path, mode="w")
    back = xr.open_zarr(path)
    xr.testing.assert_equal(back, ds)  # pixels and coordinates (y, x, c, y_um, x_um)
    assert back.attrs["mpp"] == ds.attrs["mpp"] == pytest.approx(0.5)
    assert back.he.attrs["path"] == he and back.he.attrs["mpp"] == ds.he.attrs["mpp"]
    # a view of the slide (cropped) has no usable reader; the full DataArray still does
    with pytest.raises(InvalidInputError, match="view"):
        region_source(ds.isel(y=slice(0, 100)).he)


def test_slide_without_mpp_writes_to_zarr(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", rgb, tile=(64, 64), photometric="rgb")
    arr = open_slide(tmp_path / "s.tif")
    assert arr.attrs.get("mpp") is None and "mpp" not in arr.attrs
    arr.to_dataset(name="he").to_zarr(tmp_path / "s.zarr", mode="w")
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "s.zarr").he.values, rgb)


# --------------------------------------------------------------------------------------------
# DataArray in, DataArray out
# --------------------------------------------------------------------------------------------
def test_tissue_mask_and_ssim_map_take_dataarrays(pair):
    _, _, _, ds = pair
    sub = ds.isel(y=slice(0, 700), x=slice(300, 1100))  # odd offsets: coords must follow
    mask = daskpath.tissue_mask(sub.he)
    assert isinstance(mask, xr.DataArray) and mask.dims == ("y", "x") and mask.name == "tissue"
    for c in ("y", "x", "y_um", "x_um"):
        np.testing.assert_array_equal(mask[c].values, sub[c].values)
    assert mask.attrs["mpp"] == sub.he.attrs["mpp"] and "c" not in mask.coords
    assert not mask.encoding.get("source")  # the result is not the slide
    plain = daskpath.tissue_mask(sub.he.data)  # a dask array in, a dask array out
    assert isinstance(plain, da.Array)
    np.testing.assert_array_equal(mask.values, plain.compute())
    np.testing.assert_array_equal(daskpath.tissue_mask(sub.he.values).compute(), plain.compute())

    s = daskpath.ssim_map(sub.he, sub.ihc)
    assert isinstance(s, xr.DataArray) and s.dims == ("y", "x") and s.attrs["mpp"] == 0.5
    np.testing.assert_array_equal(s.x_um.values, sub.x_um.values)
    np.testing.assert_array_equal(s.values, daskpath.ssim_map(sub.he.data, sub.ihc.data).compute())
    # label-based selection works on the result, in microns too
    assert float(s.sel(x=slice(300, 309)).mean()) == pytest.approx(float(s[:, :10].mean()))


@pytest.mark.parametrize("call", [
    lambda ds: daskpath.tissue_mask(ds),
    lambda ds: daskpath.ssim_map(ds, ds.ihc),
])
def test_a_dataset_is_refused_with_the_fix(pair, call):
    with pytest.raises(InvalidInputError, match=r"ds\.he"):
        call(pair[3])


def test_translate_takes_a_dataarray(pair):
    pytest.importorskip("torch")
    from daskpath.translate import translate
    from daskpath.translate.inference import translate as translate_dask

    sub = pair[3].he.isel(y=slice(0, 256), x=slice(512, 768))
    v = translate(sub, "phantom", torch_threads=1)
    assert isinstance(v, xr.DataArray) and v.dims == ("y", "x", "c") and v.name == "virtual_ihc"
    np.testing.assert_array_equal(v.x.values, sub.x.values)
    assert list(v.c.values) == ["R", "G", "B"] and v.attrs["mpp"] == 0.5
    want = translate_dask(sub.data, "phantom", torch_threads=1)
    with dask.config.set(scheduler="sync"):
        np.testing.assert_array_equal(v.values, want.compute())


# --------------------------------------------------------------------------------------------
# tile_table and run() from data
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_run(synth_cohort, dask_client, tmp_path_factory):
    """A preprocess run over the cohort, its manifest given as a DataFrame."""
    out = tmp_path_factory.mktemp("api_run")
    cfg = daskpath.load_config(None, [f"output_dir={out}", "stages=[preprocess]"])
    man = pd.read_csv(synth_cohort)
    man[["he", "ihc"]] = man[["he", "ihc"]].map(lambda p: str(synth_cohort.parent / p))
    res = daskpath.run(cfg, client=dask_client, slides=man)
    assert res.ok
    return res


def test_tile_table_equals_the_pipelines_table(pipeline_run, synth_cohort, dask_client):
    tiles = pd.read_parquet(pipeline_run.output_dir / "tiles.parquet")
    for row in read_manifest(synth_cohort).itertuples():
        ds = open_pair(row.he, row.ihc)
        got = daskpath.tile_table(ds, slide=row.slide)
        want = tiles[tiles["slide"] == row.slide].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    # lazily, on the cluster; and through dask's own halo for arrays without a reader
    lazy = daskpath.tile_table(ds, slide=row.slide, compute=False)
    pd.testing.assert_frame_equal(dask_client.compute(lazy).result(), want, check_exact=True)
    plain = daskpath.tile_table((ds.he.data, ds.ihc.data), slide=row.slide)
    pd.testing.assert_frame_equal(plain, want, check_exact=True)


def test_tile_table_settings_and_bad_input(pair):
    ds = pair[3]
    t = daskpath.tile_table(ds, size=768, min_tissue=0.0, ssim_threshold=-1.0)
    assert len(t) == 9 and t["keep"].all() and t["slide"].iloc[0] == Path(ds.attrs["he"]).stem
    assert t[["height", "width"]].max().tolist() == [768, 768]
    assert t["height"].iloc[-1] == 2048 - 2 * 768
    with pytest.raises(ValueError, match="tiles.size"):
        daskpath.tile_table(ds, size=0)
    with pytest.raises(InvalidInputError, match="common size"):
        daskpath.tile_table((ds.he, ds.ihc.isel(y=slice(0, 100))))
    with pytest.raises(InvalidInputError, match="open_pair"):
        daskpath.tile_table(ds.he)


def test_run_takes_a_list_of_tuples(pipeline_run, synth_cohort, dask_client, tmp_path):
    man = read_manifest(synth_cohort).iloc[:1]
    cfg = daskpath.load_config(None, [f"output_dir={tmp_path}", "stages=[preprocess]"])
    res = daskpath.run(cfg, client=dask_client, slides=list(man[["slide", "he", "ihc"]].itertuples(index=False)))
    want = pd.read_parquet(pipeline_run.output_dir / "tiles.parquet")
    want = want[want["slide"] == man.slide[0]].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "tiles.parquet"), want)
    # the folder still says what produced it: config.yaml names the written manifest
    import yaml

    written = yaml.safe_load((tmp_path / "config.yaml").read_text())["slides"]
    assert Path(written) == (tmp_path / "manifest.csv").absolute()  # the link, not its target
    pd.testing.assert_frame_equal(read_manifest(written), man.reset_index(drop=True))
    assert res.ok


@pytest.mark.parametrize("bad, match", [
    ([("a", "x.tif")], "not \\(slide, he, ihc\\)"),
    (["abc"], "not \\(slide, he, ihc\\)"),
    ([("a", "x.tif", "y.tif"), ("a", "z.tif", "w.tif")], "duplicate slide"),
    (pd.DataFrame({"slide": ["a"], "he": ["x.tif"]}), "lacks column"),
    (pd.DataFrame({"slide": ["a"], "he": [None], "ihc": ["y.tif"]}), "missing"),
    ([], "no rows"),
])
def test_manifest_as_data_is_checked(bad, match):
    with pytest.raises(ManifestError, match=match):
        read_manifest(bad)


def test_manifest_data_resolves_relative_paths_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = read_manifest([("a", "a_HE.tif", Path("/abs/a_IHC.tif"))])
    assert m.he[0] == str(tmp_path / "a_HE.tif") and m.ihc[0] == "/abs/a_IHC.tif"


# --------------------------------------------------------------------------------------------
# measure_nuclei regions in the tile table's convention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("region, match", [
    ([(0, 0, 0, 1024)], "empty.*height and width > 0"),
    ([(0, 1024, 1024, 0)], "empty"),
    ([(1024, 1024, 1025, 10)], "outside the 2048x2048"),
    ([(-1, 0, 10, 10)], "outside"),
    ([(0.5, 0, 10, 10)], "integer"),
    ([(0, 10, 10)], "\\(y0, x0, height, width\\)"),
    (pd.DataFrame({"y0": [0], "x0": [0], "height": [10]}), "lacks column.*width"),
    (pd.DataFrame({"y0": [0], "x0": [0], "height": [0], "width": [8], "keep": [True]}), "empty"),
])
def test_measure_nuclei_validates_regions(pair, region, match):
    """Checked before any model is loaded: a bad region never runs StarDist."""
    with pytest.raises(ValueError, match=match):
        daskpath.measure_nuclei(pair[3].ihc, region=region, compute=False)


def test_region_rows_follow_the_tile_table():
    from daskpath.nuclei import _region_rectangles

    tiles = pd.DataFrame({"y0": [0, 0, 1024], "x0": [0, 1024, 0], "height": [1024] * 3,
                          "width": [1024, 976, 1024], "keep": [True, False, True]})
    assert _region_rectangles(tiles, (2048, 2000)) == [(0, 1024, 0, 1024), (1024, 2048, 0, 1024)]
    assert _region_rectangles(tiles.drop(columns="keep"), (2048, 2000))[1] == (0, 1024, 1024, 2000)
    assert _region_rectangles([(10, 20, 30, 40)], (100, 100)) == [(10, 40, 20, 60)]
    assert _region_rectangles(tiles[tiles.keep & False], (2048, 2000)) == []  # no rows: no nuclei
    assert _region_rectangles(None, (1, 1)) is None


# --------------------------------------------------------------------------------------------
# nuclei tables as GeoParquet
# --------------------------------------------------------------------------------------------
def _nuclei_table(n: int = 5, rays: int = 32) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    th = np.linspace(0, 2 * np.pi, rays, endpoint=False)
    cy, cx, r = rng.uniform(50, 900, n), rng.uniform(50, 1900, n), rng.uniform(3, 9, n)
    poly = np.empty(n, object)
    for k in range(n):
        poly[k] = np.round(np.stack([cy[k] + r[k] * np.sin(th), cx[k] + r[k] * np.cos(th)],
                                    1).ravel(), 2).astype(np.float32)
    df = pd.DataFrame({"slide": "s1", "source": "ihc", "id": np.arange(1, n + 1, dtype=np.int32),
                       "y": cy.astype(np.float32), "x": cx.astype(np.float32),
                       "area": (np.pi * r * r).astype(np.int32), "prob": np.float32(0.9),
                       "dab_od": rng.uniform(0, 0.4, n).astype(np.float32),
                       "positive": rng.uniform(size=n) > 0.5, "channel": "h+dab", "polygon": poly})
    df.attrs.update({"method": "nucleus", "dab_threshold": 0.15})
    return df


def test_nuclei_table_is_geoparquet(tmp_path):
    gpd = pytest.importorskip("geopandas")
    import pyarrow.parquet as pq

    from daskpath.stages.nuclei import write_nuclei_parquet

    df = _nuclei_table()
    df.loc[4, "polygon"] = None  # a row without an outline: null geometry
    path = write_nuclei_parquet(df, tmp_path / "nuclei" / "s1.parquet")
    gdf = gpd.read_parquet(path)
    assert isinstance(gdf, gpd.GeoDataFrame) and gdf.geometry.name == "geometry"
    assert gdf.crs is None  # slide pixels, not longitude/latitude
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    col = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert "crs" in col and col["crs"] is None
    # outlines in slide pixels, x = column, y = row: centroid and area agree with the table
    ok = gdf.geometry.notna()
    assert ok.sum() == 4 and gdf.geometry[~ok].isna().all()
    cen = gdf.geometry[ok].centroid
    np.testing.assert_allclose(cen.x, df.x[ok], atol=0.05)
    np.testing.assert_allclose(cen.y, df.y[ok], atol=0.05)
    assert np.allclose(gdf.geometry[ok].area / df.area[ok], 1, atol=0.15)
    xmin, ymin, xmax, ymax = gdf.geometry[ok].total_bounds
    assert col["bbox"] == pytest.approx([xmin, ymin, xmax, ymax])
    # the scalar columns and attrs are as pandas wrote them before
    plain = pd.read_parquet(path)
    pd.testing.assert_frame_equal(plain.drop(columns=["geometry", "polygon"]),
                                  df.drop(columns="polygon"), check_dtype=False)
    assert plain.attrs == df.attrs
    empty = gpd.read_parquet(write_nuclei_parquet(df.iloc[:0], tmp_path / "e.parquet"))
    assert len(empty) == 0 and "geometry" in empty.columns


# --------------------------------------------------------------------------------------------
# the README's names
# --------------------------------------------------------------------------------------------
def _readme_names() -> set[str]:
    text = (ROOT / "README.md").read_text()
    names = set(re.findall(r"\bdaskpath(?:\.[A-Za-z_]\w*)+", text))
    for mod, items in re.findall(r"from (daskpath(?:\.\w+)*) import ([\w ,]+)", text):
        names |= {f"{mod}.{n.strip()}" for n in items.split(",") if n.strip()}
    # file names and config keys that look like dotted names
    return {n for n in names if not re.search(r"\.(py|json|yaml|md|pth|zarr|parquet|csv)$", n)
            and not n.startswith("daskpath.models")}


def test_readme_names_reachable_from_import_daskpath():
    names = sorted(_readme_names())
    assert "daskpath.tiles.tile_grid" in names and "daskpath.tile_table" in names
    # each top-level name in a fresh interpreter: only `import daskpath` has run before it
    first = sorted({n.split(".")[1] for n in names})
    code = ("import importlib, sys\nbad = []\n"
            "for group in sys.argv[1:]:\n"
            "    for m in [k for k in sys.modules if k == 'daskpath' or k.startswith('daskpath.')]:\n"
            "        del sys.modules[m]\n"
            "    import daskpath\n"
            "    for name in group.split(','):\n"
            "        obj = daskpath\n"
            "        try:\n"
            "            for part in name.split('.')[1:]:\n"
            "                obj = getattr(obj, part)\n"
            "        except AttributeError as e:\n"
            "            bad.append(f'{name}: {e}')\n"
            "print('\\n'.join(bad))\n")
    groups = [",".join(n for n in names if n.split(".")[1] == f) for f in first]
    out = subprocess.run([sys.executable, "-c", code, *groups], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"README names not reachable:\n{out.stdout}"


def test_import_daskpath_stays_light_and_all_is_short():
    code = ("import sys, daskpath; heavy = [m for m in ('dask', 'xarray', 'torch', "
            "'tensorflow', 'pandas') if m in sys.modules]; print(heavy, len(daskpath.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=False)
    heavy, n = out.stdout.rsplit(" ", 1)
    assert heavy == "[]" and int(n) <= 20
    assert "tile_table" in daskpath.__all__ and "tile_table" in daskpath.tiles.__all__


# --------------------------------------------------------------------------------------------
# the worked example
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_example_runs(tmp_path):
    """examples/api_tour.py, as a user runs it: a 2048^2 phantom against a distributed.Client
    (about 75 s here: StarDist runs twice, standalone and in the pipeline)."""
    pytest.importorskip("stardist")
    import os

    env = os.environ | {"DASKPATH_TOUR_DIR": str(tmp_path), "DASKPATH_TF_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "api_tour.py")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GeoDataFrame" in out.stdout and "round trip" in out.stdout
    assert (tmp_path / "out" / "tiles.parquet").is_file()
