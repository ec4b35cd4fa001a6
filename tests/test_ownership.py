"""Folders daskpath did not create are never taken over; one writer per folder; bounded config
errors (a YAML alias bomb, a huge value)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from daskpath.config import load_config
from daskpath.errors import ConfigError
from daskpath.ownership import (
    LOCK,
    MARKER,
    FolderInUseError,
    FolderLock,
    OutputFolderError,
    claim_folder,
    is_daskpaths,
)


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if ".daskpath" not in p.parts}


def test_new_and_empty_folders_are_claimed(tmp_path):
    claim_folder(tmp_path / "new", run_id="r1")
    rec = json.loads((tmp_path / "new" / MARKER).read_text())
    assert rec["tool"] == "daskpath" and rec["last_run"] == "r1" and rec["taken_over"] is False
    (tmp_path / "empty").mkdir()
    claim_folder(tmp_path / "empty")
    assert is_daskpaths(tmp_path / "empty")
    claim_folder(tmp_path / "new", run_id="r2")  # ours: fine again, run id updated
    rec2 = json.loads((tmp_path / "new" / MARKER).read_text())
    assert rec2["last_run"] == "r2" and rec2["created"] == rec["created"]


def test_foreign_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "mydata.txt").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputFolderError) as e:
        claim_folder(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "thesis.tex" in msg and "--force" in msg
    assert _snapshot(tmp_path) == before and not (tmp_path / ".daskpath").exists()
    claim_folder(tmp_path, force=True)
    assert json.loads((tmp_path / MARKER).read_text())["taken_over"] is True
    assert _snapshot(tmp_path) == before  # taking over writes only daskpath's marker


def test_file_as_folder_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        claim_folder(f)


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    claim_folder(tmp_path)
    code = ("import sys\nfrom daskpath.ownership import FolderLock\n"
            f"FolderLock({str(tmp_path)!r}).acquire()\n")
    with FolderLock(tmp_path, what="daskpath run r1"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "FolderInUseError" in last and f"pid {os.getpid()}" in last
        assert "daskpath run r1" in last and socket.gethostname() in last
        with pytest.raises(FolderInUseError):  # same process, second lock object: refused too
            FolderLock(tmp_path).acquire()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # released: the next run takes it


def test_lock_of_a_killed_run_is_not_stale_forever(tmp_path):
    claim_folder(tmp_path)
    code = ("import os, time\nfrom daskpath.ownership import FolderLock\n"
            f"FolderLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(FolderInUseError):
        FolderLock(tmp_path).acquire()
    p.kill()
    p.wait()
    holder = json.loads((tmp_path / LOCK).read_text())
    assert holder["pid"] == p.pid  # the file still names the dead run ...
    with FolderLock(tmp_path):  # ... but the kernel dropped its lock and its pid is gone
        pass


def test_lock_recorded_by_another_host_goes_stale_without_heartbeat(tmp_path):
    claim_folder(tmp_path)
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "other-node", "since": "x",
                                             "heartbeat": time.time()}))
    with pytest.raises(FolderInUseError, match="other-node"):
        FolderLock(tmp_path).acquire()
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "other-node", "since": "x",
                                             "heartbeat": time.time() - 3600}))
    with FolderLock(tmp_path):
        pass


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    assert p.stat().st_size < 600
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "aliases" in msg and str(p) in msg and len(msg) < 300


@pytest.mark.parametrize("value", [list(range(5000)), "x" * 100_000, {"k": list(range(50))}])
def test_config_errors_show_values_truncated(tmp_path, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"tiles": {"size": value}})
    assert "tiles.size" in str(e.value) and len(str(e.value)) < 200


def test_config_file_not_utf8_or_huge(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"output_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(p)
    p.write_text("# pad\n" * 300_000)
    with pytest.raises(ConfigError, match="bytes"):
        load_config(p)


def test_train_stardist_refuses_a_foreign_folder(tmp_path):
    from daskpath.train_stardist import train

    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputFolderError, match="--force"):
        train(tmp_path, epochs=1, steps=1)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_export_refuses_a_foreign_folder(tmp_path):
    from daskpath.translate.tilepairs import RunInputs, export_tile_pairs

    out = tmp_path / "export"
    out.mkdir()
    (out / "trainA").mkdir()
    (out / "trainA" / "my_tile.png").write_bytes(b"not daskpath's")
    run = RunInputs(tmp_path / "run", tmp_path / "m.csv", tmp_path / "cache")
    with pytest.raises(OutputFolderError, match="did not create"):
        export_tile_pairs(run, out)
    assert (out / "trainA" / "my_tile.png").read_bytes() == b"not daskpath's"


@pytest.mark.parametrize("kind", ["rf", "classifier", "translator"])
def test_model_spec_may_not_name_files_outside_its_folder(tmp_path, kind):
    from daskpath.errors import ModelError

    outside = tmp_path / "secret.pth"
    outside.write_bytes(b"not a model")
    folder = tmp_path / "model"
    folder.mkdir()
    if kind == "translator":
        pytest.importorskip("torch")
        from daskpath.translate.checkpoints import GeneratorSpec, find_weights

        spec = GeneratorSpec(weights="../secret.pth")
        with pytest.raises(ModelError, match="outside the model folder"):
            find_weights(folder, spec)
        return
    from daskpath.baselines._common import read_spec

    (folder / "daskpath.json").write_text(json.dumps({"kind": kind, "weights": "../secret.pth"}))
    with pytest.raises(ModelError, match="outside the model folder"):
        read_spec(folder, kind)
