"""``write_geojson`` writes exactly the bytes of the original row-by-row writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daskpath import nuclei


def _reference_write_geojson(df: pd.DataFrame, path: str | os.PathLike[str], *,
                             mpp: float | None = None) -> Path:
    """The original per-row ``write_geojson`` (the byte-for-byte specification)."""
    from daskpath.outputs import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    classes = {True: {"name": "Positive", "color": [140, 80, 20]},
               False: {"name": "Negative", "color": [70, 70, 200]}}
    polys = df["polygon"].to_numpy() if "polygon" in df.columns else None
    cols = {c: df[c].to_numpy() for c in ("id", "y", "x", "area", "dab_od", "prob", "channel", "positive")
            if c in df.columns}
    try:
        with open(tmp, "w") as f:
            f.write('{"type": "FeatureCollection", "features": [\n')
            for k in range(len(df)):
                p = polys[k] if polys is not None else None
                if p is not None and len(p) >= 6:
                    ring = np.asarray(p, np.float64).reshape(-1, 2)[:, ::-1]  # (y, x) -> (x, y)
                    ring = np.vstack([ring, ring[:1]])
                    geom = {"type": "Polygon", "coordinates": [np.round(ring, 2).tolist()]}
                else:
                    geom = {"type": "Point",
                            "coordinates": [round(float(cols["x"][k]), 2), round(float(cols["y"][k]), 2)]}
                meas = {"area_px": float(cols["area"][k])}
                if mpp:
                    meas["area_um2"] = float(cols["area"][k]) * mpp * mpp
                if "dab_od" in cols:
                    meas["dab_od"] = round(float(cols["dab_od"][k]), 5)
                if "prob" in cols:
                    meas["prob"] = round(float(cols["prob"][k]), 4)
                props = {"objectType": "detection",
                         "classification": classes[bool(cols["positive"][k])],
                         "measurements": meas}
                if "channel" in cols:
                    props["channel"] = str(cols["channel"][k])
                feat = {"type": "Feature", "geometry": geom, "properties": props}
                if "id" in cols:
                    feat["id"] = str(int(cols["id"][k]))
                f.write(("," if k else "") + json.dumps(feat, separators=(",", ":")) + "\n")
            f.write("]}\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _table(n: int, seed: int = 0, rays: int = 32, extent: float = 30000.0) -> pd.DataFrame:
    """A nuclei table as ``_segment_block`` builds it: float32 outlines rounded to 2 decimals."""
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0, extent, n), rng.uniform(0, extent, n)
    phi = np.linspace(0, 2 * np.pi, rays, endpoint=False)
    rad = rng.uniform(3, 12, (n, rays))
    coord = np.stack([cy[:, None] + rad * np.sin(phi), cx[:, None] + rad * np.cos(phi)], 1)
    coord = coord.astype(np.float32)  # (n, 2, rays) like StarDist's "coord"
    outline = np.round(coord.transpose(0, 2, 1).reshape(n, 2 * rays), 2)
    poly = np.empty(n, object)
    for k in range(n):
        poly[k] = outline[k]
    return pd.DataFrame({
        "id": rng.integers(1, 2**31 - 1, n).astype(np.int32),
        "y": cy.astype(np.float32),
        "x": cx.astype(np.float32),
        "area": rng.integers(20, 600, n).astype(np.int32),
        "prob": rng.uniform(0.4, 1, n).astype(np.float32),
        "dab_od": rng.exponential(0.2, n).astype(np.float32),
        "positive": rng.random(n) < 0.3,
        "channel": np.where(rng.random(n) < 0.5, "h+dab", "dab"),
        "polygon": poly,
    })


def _assert_same(df: pd.DataFrame, tmp_path: Path, mpp: float | None = None) -> bytes:
    want = _reference_write_geojson(df, tmp_path / "want.geojson", mpp=mpp).read_bytes()
    got = nuclei.write_geojson(df, tmp_path / "got.geojson", mpp=mpp).read_bytes()
    assert got == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got.geojson", "want.geojson"]
    return got


@pytest.mark.parametrize("mpp", [None, 0.25, 0.5034])
def test_realistic_table_bytes(tmp_path, mpp):
    text = _assert_same(_table(3000), tmp_path, mpp)
    gj = json.loads(text)
    assert len(gj["features"]) == 3000
    assert text.count(b"\n") == 3000 + 2


def test_several_batches_bytes(tmp_path, monkeypatch):
    """Batch boundaries (the "," that starts every line but the first) are seamless."""
    monkeypatch.setattr(nuclei, "_GEOJSON_BATCH", 7)
    _assert_same(_table(50, seed=1), tmp_path, 0.25)


def test_mixed_and_missing_polygons_bytes(tmp_path):
    """Outline lengths differ; None, short (< 6 values -> Point), list and odd-typed outlines."""
    df = _table(200, seed=2)
    poly = df["polygon"].to_numpy().copy()
    rng = np.random.default_rng(2)
    for k in range(0, 200, 3):
        m = int(rng.integers(3, 20))
        poly[k] = np.round(rng.uniform(0, 5000, 2 * m), 2).astype(np.float32)
    poly[1] = None
    poly[4] = np.array([1.0, 2.0, 3.0, 4.0], np.float32)  # < 6 values: a Point
    poly[5] = np.array([], np.float32)
    poly[7] = [10.5, 20.25, 11.0, 21.0, 12.125, 22.0]  # a plain list
    poly[8] = np.array([10, 20, 11, 21, 12, 22, 13, 23], np.int32)
    poly[10] = np.array([10.004, 20.005, 11.015, 21.0, 12.0, 22.0], np.float64)
    poly[11] = np.arange(12, dtype=np.float32).reshape(6, 2)  # 2-D: reshaped like the original
    df["polygon"] = poly
    _assert_same(df, tmp_path, 0.25)


def test_no_polygon_column_bytes(tmp_path):
    df = _table(300, seed=3).drop(columns="polygon")
    df.loc[5, "x"] = np.float32(1234.565)
    _assert_same(df, tmp_path)


@pytest.mark.parametrize("drop", [["dab_od"], ["prob"], ["channel"], ["id"],
                                  ["dab_od", "prob", "channel", "id"]])
def test_missing_optional_columns_bytes(tmp_path, drop):
    _assert_same(_table(100, seed=4).drop(columns=drop), tmp_path, 0.25)


@pytest.mark.parametrize("mpp", [None, 0.25])
def test_empty_table_bytes(tmp_path, mpp):
    text = _assert_same(_table(0), tmp_path, mpp)
    assert json.loads(text) == {"type": "FeatureCollection", "features": []}
    _assert_same(_table(5).iloc[:0], tmp_path, mpp)


def test_nan_and_inf_values_bytes(tmp_path):
    """json.dumps writes NaN / Infinity; so does the fast writer, for any column."""
    df = _table(60, seed=5)
    df.loc[0:4, "dab_od"] = np.nan
    df.loc[3:6, "prob"] = np.nan
    df.loc[7, "dab_od"] = np.inf
    df.loc[8, "prob"] = -np.inf
    poly = df["polygon"].to_numpy().copy()
    for k, v in [(9, np.nan), (10, np.inf), (11, -np.inf), (12, 1e20), (13, 3e15)]:
        p = poly[k].copy()
        p[3] = v
        poly[k] = p
    poly[14] = None
    poly[15] = None
    df["polygon"] = poly
    df.loc[14, "x"] = np.nan
    df.loc[15, "y"] = np.inf
    text = _assert_same(df, tmp_path, 0.25)
    assert b"NaN" in text and b"Infinity" in text
    df["area"] = df["area"].astype(np.float64)
    df.loc[[0, 20], "area"] = np.nan
    _assert_same(df, tmp_path, 0.25)


def test_coordinate_edges_bytes(tmp_path):
    """Negative, zero, -0.0, large coordinates and values at the x.xx5 rounding edge."""
    vals = np.array([0.0, -0.0, -0.001, 0.004, 0.005, 0.015, 0.025, 0.045, 1.005, 2.675, 1234.565,
                     -1234.565, -0.5, 99.995, 999.9951, 9.999999, 12345678.125, -98765432.105,
                     31937.995, 1e9 + 0.005, 123456789012.345, 9.87e12, 1.5e13, 4e15, 1e-5,
                     0.1 + 0.2, 1 / 3, -2 / 3, 65504.0, 16777216.5], np.float64)
    rng = np.random.default_rng(6)
    n = 400
    polys = np.empty(n, object)
    for k in range(n):
        polys[k] = rng.choice(vals, 64)
    # float32 values next to every 0.005 edge, as daskpath's float32 outlines have them
    edge = (np.arange(0, 3_000_000, 7_919) + 0.5) / 100
    e32 = edge.astype(np.float32)
    near = np.concatenate([np.nextafter(e32, np.float32(-np.inf)), e32,
                           np.nextafter(e32, np.float32(np.inf))])
    polys[::2] = [np.resize(rng.permutation(near), 64) for _ in range(0, n, 2)]
    df = _table(n, seed=6)
    df["polygon"] = polys
    df["x"] = rng.choice(vals, n)
    df["dab_od"] = rng.choice(np.concatenate([vals, [1e-5, 4.5e-5, 0.000125, 1.000005]]), n)
    df.loc[::5, "polygon"] = None
    _assert_same(df, tmp_path, 0.25)
    _assert_same(df.assign(polygon=[None if p is None else -p for p in polys]), tmp_path)


def test_numpy_scalar_and_object_columns_bytes(tmp_path):
    """Other dtypes: float64 / int64 / object columns, numpy-scalar mpp, str ids and channels."""
    df = _table(80, seed=7)
    df["x"], df["y"] = df["x"].astype(np.float64), df["y"].astype(np.float64)
    df["area"] = df["area"].astype(np.int64)
    df["prob"] = df["prob"].astype(object)
    df["dab_od"] = df["dab_od"].astype(np.float64)
    df["positive"] = df["positive"].astype(object)
    df["channel"] = df["channel"].astype(object)
    df.loc[3, "channel"] = 'quo"te\\ é'
    df["id"] = df["id"].astype(np.int64) * 1000
    _assert_same(df, tmp_path, np.float64(0.25))
    _assert_same(df, tmp_path, 1)


def test_error_leaves_no_temp_file(tmp_path):
    """A table the writer cannot format (here, no ``area``) raises and leaves nothing behind."""
    df = _table(10).drop(columns="area")
    with pytest.raises(KeyError):
        nuclei.write_geojson(df, tmp_path / "n.geojson")
    assert list(tmp_path.iterdir()) == []


def test_float_area_signed_zero_bytes(tmp_path):
    """Float areas are not conflated by value: 0.0 and -0.0, 1 and 1.0 keep their own text."""
    df = _table(8, seed=8)
    df["area"] = np.array([0.0, -0.0, 0.0, -0.0, np.nan, 1.0, 2.5, np.nan])
    _assert_same(df, tmp_path, 0.25)
    df["area"] = np.array([0, -0.0, 1, 1.0, True, 2, 2.0, None], dtype=object)
    df = df.iloc[:7]
    _assert_same(df, tmp_path, 0.25)


def _float32_samples(rng: np.random.Generator, ndigits: int) -> np.ndarray:
    """Random float32 of many magnitudes, ties of ``ndigits`` decimals, and their neighbours."""
    mags = rng.uniform(0, 1, 60_000) * 10.0 ** rng.integers(-9, 7, 60_000)
    ties = np.arange(-3000, 3000) / 2**rng.integers(1, 12, 6000)  # k + 1/2 ulp-of-decimal cases
    x = np.concatenate([mags, -mags[:15_000], ties, [0.0, -0.0, 1e-5, 4.5e-5, 5e-5, 9.9995e-5,
                                                      1e-4, 0.00015, 999999.9, 1e6, 3e7]])
    x32 = x.astype(np.float32)
    return np.concatenate([x32, np.nextafter(x32, np.float32(np.inf)),
                           np.nextafter(x32, np.float32(-np.inf))])


@pytest.mark.parametrize("ndigits", [4, 5, 2])
def test_rounded_json_is_python_round(ndigits):
    """The bulk measurement formatter spells exactly json.dumps(round(float(x), ndigits))."""
    x = _float32_samples(np.random.default_rng(ndigits), ndigits)
    got = nuclei._rounded_json(x, ndigits, nuclei._GeojsonCache(None))
    want = [json.dumps(round(float(v), ndigits)) for v in x.tolist()]
    assert got == want


def test_polygon_batch_is_reference():
    """The bulk outline formatter spells exactly json.dumps of np.round(ring, 2).tolist()."""
    rng = np.random.default_rng(9)
    x = _float32_samples(rng, 2)
    x = x[np.abs(x) < 2e6]
    x = rng.permutation(np.concatenate([x, x.astype(np.float64) + 0.005]))
    x = np.resize(x, (len(x) // 32, 16))
    got = nuclei._polygon_json_batch(x.astype(np.float64), nuclei._GeojsonCache(None))
    assert any(t is None for t in got) and sum(t is not None for t in got) > 0.9 * len(got)
    for row, t in zip(x, got):
        if t is not None:
            assert t == nuclei._polygon_json_reference(row)
