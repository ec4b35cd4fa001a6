"""Streaming training data: crops read from the slides on demand, loader workers, AMP, torchrun."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from daskpath.errors import ConfigError, InvalidInputError  # noqa: E402
from daskpath.translate.data import EpochSampler, make_loader, run_tile_stream  # noqa: E402
from daskpath.translate.tilepairs import export_tile_pairs  # noqa: E402
from daskpath.translate.train import (Precision, TrainConfig, main, resolve_precision,  # noqa: E402
                                      train)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CROP = 64


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory):
    """Three 512^2 phantom pairs (two tiled TIFF, one OME-Zarr) and a hand-made run folder:
    128-px tiles, most on the refined alignment (the phantom's IHC is the H&E moved by (1, -1)),
    edge tiles included (the IHC window leaves the slide: edge pixels repeated)."""
    from daskpath.synthetic import make_cohort

    root = tmp_path_factory.mktemp("stream")
    tif = make_cohort(root / "tif", pairs=2, size=(512, 512), seed=3, layout="tiled", tile_size=256)
    zr = make_cohort(root / "zarr", pairs=1, size=(512, 512), seed=5, layout="zarr")
    man = pd.concat([pd.read_csv(tif).assign(base=str(tif.parent)),
                     pd.read_csv(zr).assign(base=str(zr.parent), slide="z000")])
    man["he"] = [str(Path(b) / p) for b, p in zip(man["base"], man["he"])]
    man["ihc"] = [str(Path(b) / p) for b, p in zip(man["base"], man["ihc"])]
    manifest = root / "manifest.csv"
    man[["slide", "he", "ihc"]].to_csv(manifest, index=False)
    rows = []
    for s in man["slide"]:
        for y0 in range(0, 512, 128):
            for x0 in range(0, 512, 128):
                reg = (y0 // 128 + x0 // 128) % 3 != 0
                rows.append(dict(slide=s, y0=y0, x0=x0, height=128, width=128, tissue_fraction=1.0, ssim=0.5,
                                 keep=True, dy=0.8 if reg else np.nan, dx=-1.2 if reg else np.nan,
                                 registered=reg))
    run_dir = root / "run"
    run_dir.mkdir()
    pd.DataFrame(rows).to_parquet(run_dir / "tiles.parquet")
    return run_dir, manifest


@pytest.fixture(scope="module")
def exported(stream_run, tmp_path_factory):
    run_dir, manifest = stream_run
    out = tmp_path_factory.mktemp("export")
    table = export_tile_pairs(run_dir, out, manifest=manifest, test_fraction=0.34, seed=0)
    return table, out


def _tiny(**kw):
    opts = dict(ngf=4, ndf=4, crop=CROP, batch_size=2, epochs=1, steps_per_epoch=2, save_every=1, tile=192,
                loader_workers=0)
    return TrainConfig(**{**opts, **kw})


def test_stream_reads_the_exported_crops(stream_run, exported):
    """Every streamed crop is the same crop of the exported PNG pair (H&E and IHC on the refined
    alignment, tiled TIFF and OME-Zarr), rotated/flipped alike; items are a function of the key."""
    from PIL import Image

    _, manifest = stream_run
    table, out = exported
    ds = run_tile_stream(table, manifest, crop=CROP, seed=3, split=None)
    assert len(ds) == len(table) == 48 and ds._open == {}  # checked, then closed
    seen = set()
    for i in range(40):
        a, b, key = ds[(1, i)]
        ta, ya, xa, tb, yb, xb, k, flip = key[2:]
        assert (ta, ya, xa) == (tb, yb, xb) and a.shape == b.shape == (CROP, CROP, 3)
        r = table.iloc[ta]
        ref_a = np.asarray(Image.open(out / r.a))[ya:ya + CROP, xa:xa + CROP]
        ref_b = np.asarray(Image.open(out / r.b))[ya:ya + CROP, xa:xa + CROP]
        ref_a, ref_b = np.rot90(ref_a, k), np.rot90(ref_b, k)
        if flip:
            ref_a, ref_b = ref_a[:, ::-1], ref_b[:, ::-1]
        assert np.array_equal(a, ref_a) and np.array_equal(b, ref_b), (r.slide, r.y0, r.x0)
        seen.add((r.slide, bool(r.registered), r.x0 == 0))
    assert {s for s, _, _ in seen} == {"synth000", "synth001", "z000"}
    assert (True, True) in {(reg, edge) for _, reg, edge in seen}  # a shifted window off the slide
    a2, b2, _ = ds[(1, 5)]
    assert np.array_equal(a2, ds[(1, 5)][0]) and not np.array_equal(a2, ds[(2, 5)][0])
    clone = pickle.loads(pickle.dumps(ds))  # paths and numbers, no open files
    assert clone._open == {} and np.array_equal(clone[(1, 5)][1], b2)
    # CycleGAN: A and B drawn apart
    un = run_tile_stream(table, manifest, crop=CROP, seed=3, paired=False)
    keys = np.array([un[(0, i)][2] for i in range(8)])
    assert (keys[:, 2] != keys[:, 5]).any()
    with pytest.raises(InvalidInputError, match="smaller than --crop"):
        run_tile_stream(table, manifest, crop=256)


def test_loader_workers_and_ranks(stream_run, exported):
    """Batches do not depend on the number of worker processes (persistent across epochs), and
    ranks take disjoint samples."""
    _, manifest = stream_run
    table, _ = exported
    ds = run_tile_stream(table, manifest, crop=CROP, seed=0)
    batches = {}
    for workers in (0, 2):
        loader, sampler = make_loader(ds, 2, 3, workers=workers)
        got = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            got.extend(list(loader))
        batches[workers] = got
        del loader
    assert len(batches[0]) == 6
    for (a0, b0, k0), (a2, b2, k2) in zip(batches[0], batches[2]):
        assert torch.equal(a0, a2) and torch.equal(b0, b2) and torch.equal(k0, k2)
    assert a0.dtype == torch.uint8 and a0.shape == (2, CROP, CROP, 3)
    assert {int(k[0]) for _, _, ks in batches[0] for k in ks} == {0, 1}
    from daskpath import io
    from daskpath.translate.data import worker_init

    inherited = (io._READER_CACHE, io._ZARR_CACHE)  # what a forked worker must not reuse
    worker_init(0)
    assert io._READER_CACHE is not inherited[0] and io._ZARR_CACHE is not inherited[1]
    assert not io._READER_CACHE and not io._ZARR_CACHE
    shards = [list(EpochSampler(5, r, 2)) for r in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(i for s in shards for _, i in s) == list(range(10))


def test_stream_training_resumes_and_matches(stream_run, exported, tmp_path):
    """Training on the stream: 2 epochs in one go == 1 epoch + resume (one run with a loader
    worker process); checkpoints in the reference layout."""
    from daskpath.translate.checkpoints import load_generator

    _, manifest = stream_run
    table, _ = exported
    ds = run_tile_stream(table, manifest, crop=CROP, seed=0)
    a = train(_tiny(epochs=2), ds, tmp_path / "a", progress=False)
    train(_tiny(epochs=1, loader_workers=1), ds, tmp_path / "b", progress=False, log_samples=True)
    b = train(_tiny(epochs=2), ds, tmp_path / "b", progress=False, resume=True, log_samples=True)
    sa = torch.load(a / "latest_net_G.pth", weights_only=True)
    sb = torch.load(b / "latest_net_G.pth", weights_only=True)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5), k
    rows = list(csv.DictReader(open(b / "loss_log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    samples = list(csv.DictReader(open(b / "samples_rank0.csv")))
    assert [(int(r["epoch"]), int(r["index"])) for r in samples] == [(e, i) for e in (0, 1) for i in range(4)]
    assert {r["slide"] for r in samples} <= set(table.loc[table["split"] == "train", "slide"])
    net, _ = load_generator(b)
    assert set(sb) == set(net.state_dict())
    training = json.loads((b / "daskpath.json").read_text())["extra"]["training"]
    assert training["streamed"] and training["precision"] == "float32" and training["n_pairs"] == len(ds)
    with pytest.raises(ConfigError, match="unpaired"):
        train(_tiny(mode="cyclegan"), ds, tmp_path / "c", progress=False)


def test_amp_is_cuda_only_and_the_step_runs_under_autocast(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--amp needs --device cuda") as e:
        resolve_precision("cpu", True)
    assert "\n" not in str(e.value)
    assert not resolve_precision("cpu", None).enabled and not resolve_precision("cuda", False).enabled
    p16, pbf = resolve_precision("cuda", None), resolve_precision("cuda:1", None, "bfloat16")
    assert (p16.device_type, p16.dtype, pbf.dtype) == ("cuda", torch.float16, torch.bfloat16)
    with pytest.warns(UserWarning):  # no CUDA here: torch disables it, but the object is CUDA's
        ac = p16.autocast()
    assert isinstance(ac, torch.autocast) and ac.device == "cuda" and ac.fast_dtype == torch.float16
    with pytest.MonkeyPatch.context() as mp:  # as on a CUDA machine: fp16 scales, bf16 does not
        mp.setattr(torch.cuda, "is_available", lambda: True)
        assert p16.scaler().is_enabled() and not pbf.scaler().is_enabled()
    assert not Precision().scaler().is_enabled()
    rc = main([str(tmp_path / "m"), "--amp", "--no-progress"])
    assert rc == 2 and "--amp needs --device cuda" in capsys.readouterr().err
    # the training steps under a real autocast (bfloat16 on CPU: the CUDA path's code)
    from daskpath.translate import train as tr

    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),) * 2]
    for mode in ("pyramid", "cyclegan"):
        cfg = _tiny(mode=mode, crop=32)
        nets = {"G_A" if mode == "cyclegan" else "G": tr.init_weights(tr.build_generator(cfg.spec()))}
        if mode == "cyclegan":
            nets["G_B"] = tr.init_weights(tr.build_generator(cfg.spec()))
            nets["D_A"], nets["D_B"] = (tr.init_weights(tr.define_D(3, 4, 3, "instance")) for _ in range(2))
        else:
            nets["D"] = tr.init_weights(tr.define_D(6, 4, 3, "instance"))
        opt_g = torch.optim.Adam([p for k, n in nets.items() if k[0] == "G" for p in n.parameters()])
        opt_d = torch.optim.Adam([p for k, n in nets.items() if k[0] == "D" for p in n.parameters()])
        a, b = tr.PairSampler(pairs, 32, paired=mode != "cyclegan").batch(2, rng)
        prec = Precision("cpu", torch.bfloat16)
        step = tr._step_cyclegan if mode == "cyclegan" else tr._step_pix2pix
        pools = (tr.ImagePool(2), tr.ImagePool(2))
        losses = step(cfg, nets, opt_g, opt_d, tr.GANLoss(cfg.gan_mode), a, b, pools, prec, prec.scaler())
        assert all(np.isfinite(v) for v in losses.values()), losses


def test_cli_stream_flags(tmp_path, capsys):
    base = [str(tmp_path / "m"), "--ngf", "4", "--ndf", "4", "--crop", "64", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "1", "--tile", "192", "--no-progress"]
    assert main(base + ["--stream"]) == 2
    assert "--stream reads a run's slides" in capsys.readouterr().err
    assert main(base + ["--loader-workers", "-1"]) == 2
    assert "loader_workers" in capsys.readouterr().err


def test_torchrun_two_processes_on_cpu(stream_run, tmp_path):
    """``torchrun --nproc_per_node 2`` with Gloo: rank 0 exports and writes the checkpoints, the
    two ranks train on disjoint samples, and DDP's averaged gradients give the weights one
    process gets with the two ranks' batches as one (``--batch-size 4``)."""
    run_dir, manifest = stream_run
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "daskpath.translate.train", str(out), "--from-run", str(run_dir), "--slides", str(manifest),
           "--test-fraction", "0.34", "--ngf", "4", "--ndf", "4", "--crop", str(CROP), "--batch-size", "2",
           "--steps-per-epoch", "2", "--epochs", "1", "--tile", "192", "--threads", "1",
           "--loader-workers", "0", "--no-eval", "--no-progress", "--log-samples"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained pix2pix") == 1 and "x 2 processes" in r.stdout  # rank 0 prints
    sd = torch.load(out / "latest_net_G.pth", weights_only=True)
    assert (out / "1_net_G.pth").is_file() and (out / "train_state.pt").is_file()
    assert not any(k.startswith("module.") for k in sd)  # the reference's plain state dict
    assert len(list(csv.DictReader(open(out / "loss_log.csv")))) == 2  # rank 0's log only
    assert json.loads((out / "daskpath.json").read_text())["extra"]["training"]["world_size"] == 2
    seen = [{(r["epoch"], r["index"], r["slide"], r["y0"], r["x0"], r["y"], r["x"])
             for r in csv.DictReader(open(out / f"samples_rank{k}.csv"))} for k in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4 and seen[0].isdisjoint(seen[1])
    assert sorted(int(s[1]) for ss in seen for s in ss) == list(range(8))
    # one process, batch 4 = both ranks' samples: same weights (biases before an instance norm
    # have no gradient but float noise, which Adam scales up to +-lr: weights only)
    ds = run_tile_stream(pd.read_csv(out / "tile_pairs" / "pairs.csv"), manifest, crop=CROP, seed=0)
    one = train(_tiny(batch_size=4), ds, tmp_path / "one", progress=False)
    ref = torch.load(one / "latest_net_G.pth", weights_only=True)
    for k in (k for k in sd if k.endswith(".weight")):
        assert torch.allclose(sd[k], ref[k], atol=1e-5), k
