# %% [markdown]
# # daskpath from Python: a tour on a phantom pair
#
# A notebook-style script (cells marked `# %%`: open it in Jupyter with jupytext, in VS Code
# or Spyder, or run it whole: `python examples/api_tour.py`). It makes a 2048 x 2048
# phantom H&E / Ki67-IHC pair, starts a local `distributed` cluster, and walks through the API
# on it: xarray in, xarray out, lazy until computed, computed on the cluster. The test suite
# runs it (`tests/test_api.py::test_example_runs`). Files go to `$DASKPATH_TOUR_DIR` (default:
# a new temporary folder).

# %%
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from distributed import Client, LocalCluster

import daskpath

WORK = Path(os.environ.get("DASKPATH_TOUR_DIR") or tempfile.mkdtemp(prefix="daskpath-tour-"))

# %% [markdown]
# ## A cluster and a pair
# Two workers, one thread each (what a laptop or a CI machine affords). Any `Client` works:
# `Client()` in a notebook (worker processes), `Client("tcp://scheduler:8786")` for a running
# cluster. Once a client exists, every `.compute()` below runs on it. (A plain script that
# starts worker *processes* must do so under `if __name__ == "__main__":`, because they
# re-import it; this script keeps its cells at the top level, so its workers are threads.)

# %%
cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
client = Client(cluster)
print("dashboard:", client.dashboard_link)

manifest = daskpath.make_cohort(WORK / "slides", pairs=1, size=(2048, 2048), seed=7)
slides = daskpath.read_manifest(manifest)  # slide, he, ihc (absolute paths)
slide, he_path, ihc_path = slides.iloc[0][["slide", "he", "ihc"]]

ds = daskpath.open_pair(he_path, ihc_path)
print(ds)  # he, ihc: (y, x, c) uint8, dask-backed; coords y, x (px) and y_um, x_um (um)

# %% [markdown]
# ## Tissue and similarity: DataArrays on the slide's grid
# `tissue_mask` and `ssim_map` take the Dataset's variables as they are and return
# DataArrays with the same coordinates and attrs (`mpp`), so label-based selection works on
# the results, in pixels or (through `y_um` / `x_um`) in microns.

# %%
tissue = daskpath.tissue_mask(ds.he)
ssim = daskpath.ssim_map(ds.he, ds.ihc)
assert isinstance(tissue, xr.DataArray) and tissue.attrs["mpp"] == ds.attrs["mpp"]
print(f"tissue: {float(tissue.mean()):.1%} of the H&E; mean SSIM {float(ssim.mean()):.3f}")
top_left = ssim.sel(y=slice(0, 1023), x=slice(0, 1023))  # label-based, in pixels
print(f"top-left 1024 px ({float(top_left.y_um[-1]):.0f} um): SSIM {float(top_left.mean()):.3f}")

# %% [markdown]
# ## The tile table
# The pipeline's `tiles.parquet` rows for this pair: per 1024-px tile the tissue fraction of
# both sections, the mean SSIM, and `keep` (enough tissue and similar enough to compare).

# %%
tiles = daskpath.tile_table(ds, size=1024, min_tissue=0.5, ssim_threshold=0.4, slide=slide)
print(tiles[["y0", "x0", "tissue_fraction", "ssim", "keep"]])
kept = tiles[tiles.keep]

# %% [markdown]
# ## Nuclei on the kept tiles
# StarDist over chunks (each nucleus owned by the chunk holding its centroid), only where a
# kept tile is: the tile table is the region. The per-tile Ki67 ratio follows.

# %%
ihc = ds.ihc.chunk({"y": 1024, "x": 1024})  # StarDist work units: the tile size
nuclei = daskpath.measure_nuclei(ihc, region=kept)
ratios = daskpath.nuclei.tile_ratios(nuclei, tiles)
print(f"{len(nuclei)} nuclei, {int(nuclei.positive.sum())} Ki67-positive")
print(ratios.loc[tiles.keep, ["y0", "x0", "ratio_ihc", "ki67_index_ihc"]])

# %% [markdown]
# ## The whole pipeline, from a list of pairs
# `run()` takes the slide pairs as data (a DataFrame or `(slide, he, ihc)` tuples) as well as
# a manifest path, and the client we already have. Its tile table equals `tile_table`'s, and
# its nucleus table is GeoParquet: geopandas reads the outlines (slide pixels).

# %%
cfg = daskpath.load_config(None, [f"output_dir={WORK / 'out'}", "stages=[preprocess, nuclei]"])
result = daskpath.run(cfg, client=client, slides=[(slide, he_path, ihc_path)])
assert result.ok, result.failures
run_tiles = pd.read_parquet(result.output_dir / "tiles.parquet")
pd.testing.assert_frame_equal(run_tiles[tiles.columns], tiles)
print(result.slides[["slide", "tiles_kept", "ratio_ihc", "ki67_index_ihc"]])

table = result.output_dir / "nuclei" / f"{slide}.parquet"
try:
    import geopandas
except ImportError:
    print("geopandas is not installed: pandas.read_parquet reads the same table")
else:
    outlines = geopandas.read_parquet(table)
    print(type(outlines).__name__, len(outlines), "outlines, crs:", outlines.crs)
    assert sorted(outlines["id"]) == sorted(nuclei["id"])  # the same nuclei as above
    assert np.allclose(outlines.geometry.centroid.x, outlines["x"], atol=0.5)

# %% [markdown]
# ## Save the pair
# The readers behind the lazy arrays live in `.encoding`, not in `attrs`, so the Dataset
# writes to zarr (here the top-left quarter, pixels + coordinates + attrs) and reads back.

# %%
part = ds.isel(y=slice(0, 1024), x=slice(0, 1024))
part.to_zarr(WORK / "pair.zarr", mode="w", consolidated=False)
back = xr.open_zarr(WORK / "pair.zarr", consolidated=False)
xr.testing.assert_equal(back, part)
print("round trip:", dict(back.sizes), "mpp", back.attrs["mpp"])

client.close()
cluster.close()
