"""Configuration: defaults, merging, validation messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from daskpath.config import Config, default_dict, defaults_from_dataclasses, load_config, parse_set
from daskpath.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_defaults_equal_configs_default_yaml():
    assert (ROOT / "configs" / "default.yaml").read_text() == (
        ROOT / "daskpath" / "default.yaml"
    ).read_text()


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"a.b": (type, value)}``: the type keeps 1, 1.0 and True apart."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = (type(v).__name__, v)
    return out


@pytest.mark.parametrize("path", ["daskpath/default.yaml", "configs/default.yaml"])
def test_default_yaml_equals_the_dataclass_defaults(path):
    """The dataclasses are the one source of defaults; the shipped YAML documents them."""
    shipped = _flat(yaml.safe_load((ROOT / path).read_text()))
    want = _flat(defaults_from_dataclasses())
    assert sorted(set(shipped) - set(want)) == [], f"{path}: keys that are no dataclass field"
    assert sorted(set(want) - set(shipped)) == [], f"{path}: dataclass fields missing here"
    wrong = {k: (shipped[k], want[k]) for k in want if shipped[k] != want[k]}
    assert wrong == {}, f"{path}: (yaml, dataclass) values differ"


def test_defaults_from_dataclasses_is_plain_yaml():
    d = defaults_from_dataclasses()
    assert d == default_dict() and d is not defaults_from_dataclasses()  # a fresh dict each call
    assert d["stages"] == list(Config().stages) and d["baselines"]["methods"] == ["rf", "classifier"]
    assert yaml.safe_load(yaml.safe_dump(d, sort_keys=False)) == d
    assert list(d) == [f.name for f in dataclasses.fields(Config)]


def test_defaults_load_and_match_dataclass_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.ssim.threshold == 0.4
    assert cfg.tiles.size == 1024
    assert cfg.cluster.kind == "local"
    assert cfg.cluster.dashboard_address.startswith("127.0.0.1")


def test_every_default_key_is_a_field():
    d = default_dict()
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(d) == fields


def test_user_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"slides": "m.csv", "tiles": {"size": 2048}, "ssim": {"threshold": 0.5}}))
    cfg = load_config(p, ["tiles.min_tissue=0.25", "stages=[preprocess]", "chunk_size=4096"])
    assert cfg.slides == "m.csv"
    assert cfg.tiles.size == 2048
    assert cfg.tiles.min_tissue == 0.25
    assert cfg.ssim.threshold == 0.5
    assert cfg.chunk_size == 4096
    assert cfg.stages == ("preprocess",)
    # ints are accepted where floats are expected, and round-trip through to_dict
    assert load_config(None, ["ssim.threshold=1"]).ssim.threshold == 1.0
    assert load_config(None, cfg.to_dict()) == cfg


def test_parse_set_nested():
    assert parse_set(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tile.size=3"], "unknown config key 'tile' (did you mean 'tiles'?)"),
        (["tiles.sise=3"], "unknown config key 'tiles.sise' (did you mean 'tiles.size'?)"),
        (["tiles.size=abc"], "config key 'tiles.size' must be an integer"),
        (["tiles.size=16"], "'tiles.size' = 16 is invalid"),
        (["tiles.min_tissue=1.5"], "'tiles.min_tissue' = 1.5 is invalid"),
        (["ssim.threshold=2"], "'ssim.threshold' = 2.0 is invalid: SSIM is in [-1, 1]"),
        (["ssim.threshold=high"], "config key 'ssim.threshold' must be a number"),
        (["ssim.dtype=float16"], "'ssim.dtype'"),
        (["stages=[bogus]"], "stages are preprocess, nuclei, translate, baselines"),
        (["stages=[]"], "give at least one stage"),
        (["baselines.methods=[rf,svm]"], "a subset of [rf, classifier]"),
        (["cluster.kind=cloud"], "'cluster.kind' = 'cloud' is invalid"),
        (["cluster.n_workers=0"], "'cluster.n_workers' = 0 is invalid"),
        (["overwrite=yes please"], "config key 'overwrite' must be true or false"),
        (["tiles=3"], "config key 'tiles' must be a mapping"),
        (["chunk_size=10"], "'chunk_size' = 10 is invalid"),
        (["noequals"], "expected dotted.key=value"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiles: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(lst)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("slides: x.csv\nssim:\n  treshold: 0.3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'ssim.treshold' \(did you mean 'ssim.threshold'\?\)"):
        load_config(unknown)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_demo_config_is_valid():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.slides and cfg.cluster.n_workers == 2


def test_import_daskpath_is_light():
    import subprocess
    import sys

    code = (
        "import sys, daskpath; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'stardist', 'dask', 'cv2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
