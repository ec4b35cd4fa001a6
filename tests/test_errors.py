"""The error hierarchy: each class also is the builtin it means, and real calls raise them."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daskpath import errors
from daskpath.errors import (
    ConfigError,
    DaskpathError,
    InvalidInputError,
    ManifestError,
    ManifestNotFoundError,
    ModelError,
    ModelNotFoundError,
    PairMismatchError,
    SlideError,
    SlideNotFoundError,
)

# class -> every class it must be (besides itself and Exception)
HIERARCHY = {
    DaskpathError: set(),
    ConfigError: {DaskpathError, ValueError},
    InvalidInputError: {DaskpathError, ValueError},
    SlideError: {InvalidInputError, DaskpathError, ValueError},
    SlideNotFoundError: {SlideError, InvalidInputError, DaskpathError, ValueError,
                         FileNotFoundError, OSError},
    PairMismatchError: {SlideError, InvalidInputError, DaskpathError, ValueError},
    ManifestError: {InvalidInputError, DaskpathError, ValueError},
    ManifestNotFoundError: {ManifestError, InvalidInputError, DaskpathError, ValueError,
                            FileNotFoundError, OSError},
    ModelError: {DaskpathError, ValueError},
    ModelNotFoundError: {ModelError, DaskpathError, ValueError, FileNotFoundError, OSError},
}
CANDIDATES = set(HIERARCHY) | {ValueError, FileNotFoundError, OSError, TypeError}


def test_all_lists_every_class():
    assert set(errors.__all__) == {c.__name__ for c in HIERARCHY}


@pytest.mark.parametrize("cls", list(HIERARCHY), ids=lambda c: c.__name__)
def test_hierarchy(cls):
    is_a = {c for c in CANDIDATES if c is not cls and issubclass(cls, c)}
    assert is_a == HIERARCHY[cls]


def test_config_and_input_errors_stay_apart():
    # "except ConfigError" must not swallow bad data, and the other way round
    assert not issubclass(InvalidInputError, ConfigError)
    assert not issubclass(ConfigError, InvalidInputError)
    assert not issubclass(ModelError, InvalidInputError)


# ---------------------------------------------------------------------------------------------
# real calls
# ---------------------------------------------------------------------------------------------
def _tiled_tiff(path: Path, shape: tuple[int, int]) -> Path:
    import tifffile

    tifffile.imwrite(path, np.full((*shape, 3), 200, np.uint8), tile=(16, 16), photometric="rgb")
    return path


def _open_missing(tmp: Path):
    from daskpath.io import open_slide

    open_slide(tmp / "gone_HE.tif")


def _open_garbage(tmp: Path):
    from daskpath.io import open_slide

    (tmp / "notes.tif").write_text("this is not a slide\n")
    open_slide(tmp / "notes.tif")


def _open_bad_chunk_size(tmp: Path):
    from daskpath.io import open_slide

    open_slide(_tiled_tiff(tmp / "a.tif", (64, 64)), chunk_size=0)


def _pair_mismatch(tmp: Path):
    from daskpath.io import open_pair

    open_pair(_tiled_tiff(tmp / "he.tif", (64, 64)), _tiled_tiff(tmp / "ihc.tif", (64, 96)))


def _manifest_missing(tmp: Path):
    from daskpath.io import read_manifest

    read_manifest(tmp / "manifest.csv")


def _manifest_duplicate(tmp: Path):
    from daskpath.io import read_manifest

    (tmp / "manifest.csv").write_text("slide,he,ihc\ns1,a,b\ns1,c,d\n")
    read_manifest(tmp / "manifest.csv")


def _tissue_float(tmp: Path):
    import dask.array as da

    from daskpath.tissue import tissue_mask

    tissue_mask(da.zeros((10, 10, 3), dtype=np.float32))


def _tissue_2d(tmp: Path):
    import dask.array as da

    from daskpath.tissue import tissue_mask

    tissue_mask(da.zeros((10, 10), dtype=np.uint8))


def _ssim_shapes(tmp: Path):
    import dask.array as da

    from daskpath.similarity import ssim_map

    ssim_map(da.zeros((10, 10, 3), dtype=np.uint8), da.zeros((10, 12, 3), dtype=np.uint8))


def _tile_grid_zero(tmp: Path):
    from daskpath.tiles import tile_grid

    tile_grid((10, 10), 0)


def _stain_matrix(tmp: Path):
    from daskpath.stain import as_stain_matrix

    as_stain_matrix(np.ones((4, 3)))


def _synthetic_size(tmp: Path):
    from daskpath.synthetic import make_pair

    make_pair(tmp, size=(8, 8))


def _tile_ratios_columns(tmp: Path):
    from daskpath.nuclei import tile_ratios

    tile_ratios(pd.DataFrame({"y": [1.0]}), pd.DataFrame({"y0": [0]}))


def _translate_dtype(tmp: Path):
    pytest.importorskip("torch")
    from daskpath.translate.inference import translate

    translate(np.zeros((64, 64, 3), np.float32), "phantom")


def _config_unknown_key(tmp: Path):
    from daskpath.config import load_config

    load_config(None, ["tiles.sise=3"])


def _config_missing_file(tmp: Path):
    from daskpath.config import load_config

    load_config(tmp / "missing.yaml")


def _stardist_missing(tmp: Path):
    from daskpath.nuclei import resolve_model

    resolve_model(tmp / "no_model")


def _translator_missing(tmp: Path):
    pytest.importorskip("torch")
    from daskpath.translate.inference import resolve_translator

    resolve_translator(tmp / "no_such.pth")


def _baseline_missing(tmp: Path):
    from daskpath.baselines._common import resolve_model

    resolve_model("rf", tmp / "no_model")


def _translator_spec(tmp: Path):
    pytest.importorskip("torch")
    from daskpath.translate.checkpoints import GeneratorSpec

    GeneratorSpec(norm="group")


# (call, the class it raises, the builtin a caller who knows no daskpath catches it by, text)
CASES = [
    (_open_missing, SlideNotFoundError, FileNotFoundError, "gone_HE.tif does not exist"),
    (_open_garbage, SlideError, ValueError, "notes.tif is not a supported image"),
    (_open_bad_chunk_size, InvalidInputError, ValueError, "chunk_size=0 is invalid"),
    (_pair_mismatch, PairMismatchError, ValueError, "size mismatch"),
    (_manifest_missing, ManifestNotFoundError, FileNotFoundError, "manifest.csv does not exist"),
    (_manifest_duplicate, ManifestError, ValueError, r"duplicate slide id\(s\) s1"),
    (_tissue_float, InvalidInputError, ValueError, "expected uint8 RGB, got float32"),
    (_tissue_2d, InvalidInputError, ValueError, r"expected \(y, x, 3\) RGB"),
    (_ssim_shapes, InvalidInputError, ValueError, "shapes differ"),
    (_tile_grid_zero, InvalidInputError, ValueError, "tile size must be > 0"),
    (_stain_matrix, InvalidInputError, ValueError, "stain matrix must have 2 or 3 rows"),
    (_synthetic_size, InvalidInputError, ValueError, "too small"),
    (_tile_ratios_columns, InvalidInputError, ValueError, "tile table lacks column"),
    (_translate_dtype, InvalidInputError, ValueError, "expected a \\(y, x, 3\\) uint8 RGB array"),
    (_config_unknown_key, ConfigError, ValueError, "did you mean 'tiles.size'"),
    (_config_missing_file, ConfigError, ValueError, "missing.yaml not found"),
    (_stardist_missing, ModelNotFoundError, FileNotFoundError, "no_model does not exist"),
    (_translator_missing, ModelNotFoundError, FileNotFoundError, "no_such.pth: model file"),
    (_baseline_missing, ModelNotFoundError, FileNotFoundError, "no such folder"),
    (_translator_spec, ModelError, ValueError, "norm='group' is unknown"),
]


@pytest.mark.parametrize(("call", "cls", "builtin", "match"), CASES,
                         ids=[c[0].__name__.strip("_") for c in CASES])
def test_real_calls_raise_the_class_and_its_builtin(tmp_path, call, cls, builtin, match):
    with pytest.raises(builtin, match=match) as info:
        call(tmp_path)
    e = info.value
    assert type(e) is cls, f"{type(e).__name__} raised, {cls.__name__} expected"
    assert isinstance(e, DaskpathError) and isinstance(e, ValueError)
    msg = str(e)
    assert msg and "\n" not in msg, "one line, naming the thing and the fix"
    # errors travel from dask workers to the client: a pickle round trip keeps class and text
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == msg


def test_input_errors_are_not_config_errors(tmp_path):
    with pytest.raises(InvalidInputError) as info:
        _tissue_float(tmp_path)
    assert not isinstance(info.value, ConfigError)
    with pytest.raises(ConfigError) as info:
        _config_unknown_key(tmp_path)
    assert not isinstance(info.value, InvalidInputError)
