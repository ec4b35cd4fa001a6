"""The GPU check (benchmarks/gpu_check.sh + gpu_check.py) on a machine without a GPU.

The FLOPs counter against hand-computed values, the peak table, the CPU-vs-GPU comparisons on
made-up tables and images, the translation measurement on CPU at toy sizes, and the whole
script on CPU (``--no-install``, ``--cpu-only``, small sizes): it writes one JSON with the GPU
phases skipped and saying why, and numbers for the CPU phases.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flops_counter_hand_computed(gc):
    torch = pytest.importorskip("torch")
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1))
    got = gc.conv_macs(net, (1, 3, 8, 8))
    # conv: 8*8 outputs x 4 channels x 3 inputs x 9 = 6912; transposed: 8*8*4 inputs x 2 x 9 = 4608
    assert [m for _, _, m in got["layers"]] == [6912, 4608] and got["macs"] == 11520
    assert gc.flops_per_pixel(net, 8, 8) == 2 * 11520 / 64
    # ResNet-9, ngf 64, by hand: 2 x 49*3*64 + 4 x 18432 + 18 x 9*256*256/16 = 756,096 MACs/px
    assert gc.resnet_macs_per_pixel(64, 9) == 756_096
    from daskpath.translate.networks import define_G

    torch.manual_seed(0)
    assert gc.flops_per_pixel(define_G("resnet_2blocks", 4, "instance"), 32, 32) == \
        2 * gc.resnet_macs_per_pixel(4, 2)


def test_peak_table(gc):
    assert gc.peak_for("NVIDIA H200")["fp16"] == 989.5
    assert gc.peak_for("NVIDIA H100 PCIe")["label"] == "H100 PCIe"
    assert gc.peak_for("NVIDIA A100-SXM4-80GB")["fp32"] == 19.5
    assert gc.peak_for("NVIDIA L4")["label"] == "L4"
    assert gc.peak_for("NVIDIA L40S")["label"] == "unknown"  # not the L4
    assert gc.peak_for("Tesla T4")["label"] == "T4" and gc.peak_for("Tesla V100-SXM2-16GB")["fp16"] == 125.0
    assert gc.peak_for(None) == gc.peak_for("AMD Instinct MI300X") and gc.peak_for(None)["fp32"] is None


def _tiles():
    return pd.DataFrame({"slide": ["a"] * 3 + ["b"] * 3, "y0": [0, 0, 1024] * 2, "x0": [0, 1024, 0] * 2,
                         "tissue_fraction": np.linspace(0.2, 0.9, 6), "ssim": np.linspace(0.3, 0.8, 6),
                         "keep": [True, False, True, True, True, False],
                         "ratio_ihc": [0.1, np.nan, 0.5, 0.3, 0.7, np.nan],
                         "ratio_virtual": [0.12, np.nan, 0.45, 0.3, 0.6, np.nan],
                         "nucleus_px_rf": [10.0, 0, 30, 40, 50, 0]})


def test_compare_tables(gc):
    cpu = _tiles()
    gpu = cpu.sample(frac=1, random_state=0)  # row order does not matter
    gpu["ratio_virtual"] = gpu["ratio_virtual"] + 0.015
    gpu["nucleus_px_rf"] = gpu["nucleus_px_rf"] + 3  # reported, does not decide
    r = gc.compare_tables(cpu, gpu)
    assert r["ok"], r["problems"]
    assert r["ratio_max_abs_diff"]["ratio_virtual"] == pytest.approx(0.015)
    assert r["other_max_abs_diff"]["nucleus_px_rf"] == 3
    bad = cpu.copy()
    bad.loc[0, "ratio_ihc"] += 0.03
    bad.loc[1, "ratio_virtual"] = 0.2  # NaN in one run only
    bad.loc[2, "ssim"] += 1e-3
    bad.loc[3, "keep"] = False
    r = gc.compare_tables(cpu, bad)
    assert not r["ok"]
    text = " | ".join(r["problems"])
    for what in ("ratio_ihc", "ratio_virtual: NaN", "ssim", "keep: 1 tiles"):
        assert what in text, text
    assert not gc.compare_tables(cpu, cpu.iloc[:4])["ok"]


def test_compare_images(gc):
    a = np.full((8, 8, 3), 255, np.uint8)
    a[:4] = 100
    b = a.copy()
    b[0, 0] = 101
    b[7, 7] = 0  # written in one image only: counted
    r = gc.compare_images(a, a)
    assert r["ok"] and r["max"] == 0 and r["written_fraction"] == pytest.approx(0.5)
    r = gc.compare_images(a, b)
    assert not r["ok"] and r["max"] == 255 and "uint8 levels" in r["problems"][0]
    b[7, 7] = 255
    assert gc.compare_images(a, b)["ok"]


def test_translate_phase_measures_on_cpu(gc):
    pytest.importorskip("torch")
    a = gc.parse_args(["--device", "cpu", "--tile", "64", "--batch-sizes", "1", "2", "--precisions", "fp32",
                       "tf32", "--big-ngf", "4", "--big-blocks", "1", "--min-time", "0", "--max-iters", "1",
                       "--e2e-size", "256", "--e2e-repeat", "1"])
    rec = gc.Recorder(None)
    gc.phase_translate(a, rec)
    rows = rec.data["rows"]
    assert {r["precision"] for r in rows} == {"fp32"}  # tf32 exists on CUDA only
    assert len(rows) == 4 and all(r["mp_per_s"] > 0 and r["frac_of_peak"] is None for r in rows)
    assert rows[-1]["flops_per_pixel"] == 2 * gc.resnet_macs_per_pixel(4, 1)
    (e2e,) = rec.data["end_to_end"]
    assert e2e["mp_per_s"] > 0 and "error" not in e2e


def test_shell_syntax_and_plan():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(SCRIPT)], check=True)
    p = subprocess.run([bash, str(SCRIPT), "--plan", "--wheels", "/nowhere"], check=False, capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "install: wheels from /nowhere" in p.stdout and "gpu_check.py" in p.stdout


def test_script_on_cpu_writes_json(gc, tmp_path):
    """The whole script, no install, no GPU, small sizes: one JSON, GPU phases skipped with a reason."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    args = ["--cpu-only", "--no-matmul", "--flops-size", "32", "--big-ngf", "8", "--big-blocks", "2",
            "--pairs", "1", "--run-size", "512", "--run-tile", "256", "--run-stages", "preprocess",
            "--cpu-workers", "1", "--workdir", str(tmp_path / "work")]
    p = subprocess.run([bash, str(SCRIPT), "--no-install", "--budget", "240", "--", *args],
                       check=False, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    ph = res["phases"]
    assert res["install"]["mode"] == "none" and res["gpu"] is False and res["ok"] is True
    for name in ("translate", "stardist"):
        assert ph[name]["status"] == "skipped" and "no GPU" in ph[name]["reason"]
    assert ph["env"]["status"] == "ok" and ph["env"]["cores"] >= 1 and ph["env"]["peak_tflops"]["label"] == "unknown"
    fl = ph["flops"]
    assert fl["status"] == "ok" and fl["hooks_equal_closed_form"] is True
    assert fl["full_size"]["flops_per_pixel"] == 2 * gc.resnet_macs_per_pixel(8, 2)
    assert fl["shipped"]["flops_per_pixel"] == 2 * gc.resnet_macs_per_pixel(8, 6)  # the shipped ResNet-6
    cl = ph["cluster"]
    assert cl["status"] == "ok", cl
    assert cl["runs"]["local"]["ok"] is True and cl["runs"]["local"]["tiles"] == 4
    assert cl["runs"]["local-cuda"]["status"] == "skipped" and "no GPU" in cl["runs"]["local-cuda"]["reason"]
    assert all(d["seconds"] > 0 for k, d in ph.items() if d["status"] == "ok")
    md = (out / "gpu_check.md").read_text()
    assert "| translate | skipped |" in md and "| local | True |" in md and md in p.stdout
    assert (out / "gpu_check.log").is_file()


def test_markdown_of_a_gpu_result(gc):
    """The tables render from a result shaped like a GPU run's (no GPU needed)."""
    row = {"model": "resnet_9blocks ngf 64 (random weights)", "precision": "fp16", "batch": 8,
           "mp_per_s": 150.0, "tflops": 226.8, "frac_of_peak": 0.2292}
    res = {"started": "now", "phases": {
        "env": {"status": "ok", "seconds": 9.0, "gpu_name": "NVIDIA H200", "torch": "2.11.0", "cores": 16,
                "peak_tflops": gc.peak_for("NVIDIA H200"), "matmul_tflops_measured": {"fp16": 780.0}},
        "translate": {"status": "ok", "seconds": 50.0, "best": [row],
                      "end_to_end": [{"model": "shipped", "amp": "fp16", "image": 2048, "halo": 64, "batch": 8,
                                      "mp_per_s": 80.0}]},
        "cluster": {"status": "ok", "seconds": 120.0, "pairs": 2, "size": 2048, "stages": ["preprocess"],
                    "runs": {"local": {"ok": True, "seconds": 30.0, "tiles": 8},
                             "local-cuda": {"ok": True, "seconds": 25.0, "tiles": 8, "gpu_workers": 1, "gpus": 1,
                                            "one_worker_per_gpu": True}},
                    "compare": {"tiles": {"ok": True, "ratio_max_abs_diff": {"ratio_rf": 0.001}, "problems": []},
                                "virtual_fp32": {"synth000": {"max": 1, "mean": 0.01, "frac_over": 0.0, "ok": True}},
                                "virtual_fp16": {"synth000": {"max": 4, "mean": 0.2, "frac_over": 1e-3,
                                                              "ok": False}}}},
        "stardist": {"status": "skipped", "reason": "tensorflow not importable"}}}
    md = gc.markdown(res)
    assert "| resnet_9blocks ngf 64 (random weights) | fp16 | 8 | 150.0 | 226.80 | 22.9 % |" in md
    assert "NVIDIA H200" in md and "fp16/bf16 989.5" in md and "| stardist | skipped |" in md
    assert "one per GPU: True" in md and "largest ratio difference 0.0010" in md
    assert "GPU fp32 (TF32 off) vs CPU: max 1 uint8 levels" in md and "GPU fp16 autocast vs CPU: max 4" in md
