"""Validity table: how well each predictor does on realistic phantoms, slide-level split.

Run: ``python benchmarks/bench_validity.py [--workdir W] [--size 4096] [--tile 512] [--quick]``
(results: ``benchmarks/results/validity.json`` and a Markdown table on stdout).

Everything here is a *science* figure on phantoms made to be hard (``daskpath synth --realism
realistic``: non-rigid drift between sections, 30 % cell turnover, per-slide stain variation, a
weak H&E cue of Ki67, artefacts, scanner JPEG), not a figure about real tissue. Steps, each a
real command a user runs (their outputs are kept in the work folder and reused by a rerun):

1. ``daskpath synth W/cohort --pairs 10 --realism realistic``: slides 0-6 are the training
   slides, 7-9 the test slides (a slide-level split: no test slide is seen in training).
2. ``daskpath run`` (preprocess) on the 7 training slides; ``daskpath train translator
   --from-run`` for each mode (pix2pix, pyramid, CycleGAN) with the shipped recipe on a short
   schedule (one of the 7 slides is held out by the trainer for its evaluation.json, so the
   generator sees 6); ``daskpath train rf`` / ``train classifier`` on the 6 first training
   slides' seeds (realistic phantoms, the same pixels).
3. ``daskpath run`` on the 3 test slides with each generator (preprocess, nuclei and the
   baselines are reused between the three: only ``translate`` is recomputed), and once more
   with ``registration.enabled=false``; and the ground-truth methods (``nuclei.method:
   nucleus`` and ``two-channel``) against the phantom's exact truth (area ratio per tile, IHC
   frame).
4. Scores (daskpath.metrics.score) of every predictor against ``ratio_ihc`` (as the study
   scores them) on the kept tiles, side by side with the study's published figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
MODES = ("pix2pix", "pyramid", "cyclegan")
N_PAIRS, N_TRAIN = 10, 7
SEED0 = 500

#: The study's figures (206 tile pairs of 77 real consecutive-section pairs; Zenodo 11218961).
STUDY = {
    "cyclegan": {"class_accuracy": 0.60, "mae": 0.13},
    "resnet18 regression": {"mae": 0.078},
    "classifier": {"class_accuracy": 0.79},
    "rf (ilastik)": {"acc@0.05": 0.752, "acc@0.1": 0.845, "acc@0.2": 0.927, "mse": 0.0084,
                     "mae": 0.0455},
}


def sh(*args: str, log: Path) -> float:
    """Run a daskpath command, its output appended to ``log``; return wall seconds."""
    t = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(args)}\n")
        fh.flush()
        r = subprocess.run(list(args), stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode:
        sys.exit(f"bench_validity: `{' '.join(args)}` failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t


def daskpath(*args: str, log: Path) -> float:
    return sh(str(Path(sys.executable).parent / "daskpath"), *args, log=log)


def write_config(path: Path, **keys) -> Path:
    import yaml

    cfg: dict = {}
    for k, v in keys.items():
        d = cfg
        parts = k.split("__")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def truth_ratios(cohort: Path, slide: str, tile: int) -> pd.DataFrame:
    """Exact area ratio per tile (IHC frame, each nucleus owned by its centroid's tile)."""
    from daskpath.translate.score import truth_tile_ratios

    meta = json.loads((cohort / f"{slide}_truth.json").read_text())
    truth = pd.read_parquet(cohort / f"{slide}_truth.parquet")
    t = truth_tile_ratios(truth, tuple(meta["size"]), tile, frame="ihc")
    return t[["y0", "x0", "ratio"]].rename(columns={"ratio": "ratio_truth"}).assign(slide=slide)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "daskpath_validity")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--steps", type=int, default=25, help="translator steps per epoch")
    p.add_argument("--epochs", type=int, default=8, help="translator epochs (+ as many decaying)")
    p.add_argument("--crop", type=int, default=256, help="translator training crop (px)")
    p.add_argument("--classifier-steps", type=int, default=300)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--quick", action="store_true", help="2048 px slides, 2 epochs (a smoke run)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "validity.json")
    a = p.parse_args()
    if a.quick:
        a.size, a.epochs, a.steps = 2048, 2, 10
    W = a.workdir.absolute()
    W.mkdir(parents=True, exist_ok=True)
    log = W / "log.txt"
    times: dict[str, float] = {}
    cohort = W / "cohort"
    man = cohort / "manifest.csv"
    if not man.exists():
        times["synth"] = daskpath("synth", str(cohort), "--pairs", str(N_PAIRS), "--size", str(a.size),
                                  str(a.size), "--seed", str(SEED0), "--realism", "realistic", log=log)
    m = pd.read_csv(man)
    train, test = m.iloc[:N_TRAIN], m.iloc[N_TRAIN:]
    train.to_csv(cohort / "train.csv", index=False)
    test.to_csv(cohort / "test.csv", index=False)
    seeds = [str(SEED0 + i) for i in range(N_TRAIN)]
    common = dict(tiles__size=a.tile, cluster__dashboard_address=None)

    # 2. training ------------------------------------------------------------------------------
    models = W / "models"
    models.mkdir(exist_ok=True)
    run_train = W / "run_train"
    cfg_train = write_config(W / "train.yaml", slides=str(cohort / "train.csv"),
                             output_dir=str(run_train), stages=["preprocess"], **common)
    t = time.perf_counter()
    daskpath("run", str(cfg_train), "--no-progress", log=log)
    times["train preprocess run"] = time.perf_counter() - t
    modes = tuple(a.modes)
    recipe = ["--ngf", "8", "--ndf", "16", "--crop", str(a.crop), "--batch-size", "3",
              "--lr", "0.0005", "--train-norm", "pooled", "--threads", "2", "--no-progress",
              "--epochs", str(a.epochs), "--epochs-decay", str(a.epochs),
              "--steps-per-epoch", str(a.steps), "--save-every", "100"]
    for mode in modes:
        out = models / mode
        if not (out / "daskpath.json").exists():
            times[f"train {mode}"] = daskpath(
                "train", "translator", str(out), "--mode", mode, "--from-run", str(run_train),
                "--slides", str(cohort / "train.csv"), "--test-fraction", "0.15",
                "--export-dir", str(W / "pairs"), "--force", *recipe, log=log)
    for kind, extra in (("rf", []), ("classifier", ["--steps", str(a.classifier_steps)])):
        out = models / kind
        if not (out / "daskpath.json").exists():
            times[f"train {kind}"] = daskpath(
                "train", kind, str(out), "--seeds", *seeds[:6], "--heldout-seeds",
                "--size", str(a.size), str(a.size), "--realism", "realistic",
                "--workdir", str(W / "baseline_slides"), *extra, log=log)

    # 3. test runs -------------------------------------------------------------------------------
    def run_test(name: str, **keys) -> pd.DataFrame:
        out = W / f"run_{name}"
        cfg = write_config(W / f"{name}.yaml", slides=str(cohort / "test.csv"), output_dir=str(out),
                           baselines__rf_model=str(models / "rf"),
                           baselines__classifier_model=str(models / "classifier"), **common, **keys)
        times[f"test run {name}"] = daskpath("run", str(cfg), "--no-progress", log=log)
        return pd.read_parquet(out / "tiles.parquet")

    tables = {mode: run_test("test" if mode == modes[0] else f"test_{mode}",
                             translate__model=str(models / mode)) for mode in modes}
    noreg = run_test("test_noreg", translate__model=str(models / "pix2pix"),
                     registration__enabled=False)
    twoch = run_test("test_twochannel", stages=["preprocess", "nuclei"],
                     nuclei__method="two-channel")

    # 4. scores --------------------------------------------------------------------------------
    from daskpath.metrics import score

    def scores(tiles: pd.DataFrame, virtual_name: str) -> dict:
        kept = tiles[tiles["keep"]]
        out = {virtual_name: score(kept["ratio_virtual"], kept["ratio_ihc"])}
        for col in ("rf", "classifier"):
            if f"ratio_{col}" in kept:
                out[col] = score(kept[f"ratio_{col}"], kept["ratio_ihc"])
        return out

    result: dict = {"setup": {"pairs": N_PAIRS, "train_slides": list(train["slide"]),
                              "test_slides": list(test["slide"]), "size": a.size, "tile": a.tile,
                              "translator_steps": 2 * a.epochs * a.steps, "translator_crop": a.crop,
                              "classifier_steps": a.classifier_steps,
                              "seed0": SEED0,
                              "realism": "realistic (defaults)"},
                    "with_registration": {}, "without_registration": {}, "ground_truth_methods": {},
                    "tiles": {}, "study": STUDY, "seconds": times}
    for mode, t in tables.items():
        s = scores(t, f"virtual ({mode})")
        result["with_registration"] |= s if mode == modes[0] else {f"virtual ({mode})": s[f"virtual ({mode})"]}
    result["without_registration"] = scores(noreg, "virtual (pix2pix)")
    ref = tables[modes[0]]
    result["tiles"] = {"with_registration": {"kept": int(ref["keep"].sum()),
                                             "mean_ssim_kept": float(ref.loc[ref["keep"], "ssim"].mean())},
                       "without_registration": {"kept": int(noreg["keep"].sum()),
                                                "mean_ssim_kept": float(noreg.loc[noreg["keep"], "ssim"].mean())}}
    truth = pd.concat([truth_ratios(cohort, s, a.tile) for s in test["slide"]])
    for name, t in (("nucleus", ref), ("two-channel", twoch)):
        j = t[t["keep"]].merge(truth, on=["slide", "y0", "x0"], how="left")
        result["ground_truth_methods"][name] = score(j["ratio_ihc"], j["ratio_truth"])
    # registration error against the known deformation (tiles registered by the test run)
    from daskpath.synthetic import displacement

    err = []
    for s in test["slide"]:
        meta = json.loads((cohort / f"{s}_truth.json").read_text())
        g = ref[(ref["slide"] == s) & ref["dy"].notna()]
        cy, cx = (g["y0"] + g["height"] / 2).to_numpy(), (g["x0"] + g["width"] / 2).to_numpy()
        dy, dx = displacement(meta, cy, cx)
        err.extend(np.hypot(g["dy"].to_numpy() - dy, g["dx"].to_numpy() - dx))
    err = np.asarray(err)
    result["registration_error_px"] = {"n": int(len(err)), "median": float(np.median(err)),
                                       "p90": float(np.percentile(err, 90)),
                                       "within_1px": float((err <= 1).mean())}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(r: dict) -> str:
    cols = ["n", "acc@0.05", "acc@0.1", "acc@0.2", "mse", "mae", "class_accuracy", "balanced_accuracy"]
    lines = ["| predictor (vs ratio_ihc) | registration | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for reg in ("with_registration", "without_registration"):
        for name, s in r[reg].items():
            vals = [f"{s.get(c, float('nan')):.3f}" if c != "n" else str(s.get("n", 0)) for c in cols]
            lines.append(f"| {name} | {'on' if reg == 'with_registration' else 'off'} | " + " | ".join(vals) + " |")
    for name, s in r["ground_truth_methods"].items():
        vals = [f"{s.get(c, float('nan')):.3f}" if c != "n" else str(s.get("n", 0)) for c in cols]
        lines.append(f"| ground truth `{name}` vs exact phantom truth | on | " + " | ".join(vals) + " |")
    for name, s in r["study"].items():
        vals = [f"{s[c]:.3f}" if c in s else "" for c in cols]
        lines.append(f"| study (real slides): {name} | | " + " | ".join(vals) + " |")
    t = r["tiles"]
    lines.append("")
    lines.append(f"Kept tiles / mean SSIM of kept: registration on {t['with_registration']['kept']} / "
                 f"{t['with_registration']['mean_ssim_kept']:.3f}, off {t['without_registration']['kept']} / "
                 f"{t['without_registration']['mean_ssim_kept']:.3f}. Registration error vs the known "
                 f"deformation: median {r['registration_error_px']['median']:.2f} px, "
                 f"p90 {r['registration_error_px']['p90']:.2f} px, "
                 f"{100 * r['registration_error_px']['within_1px']:.0f} % within 1 px "
                 f"(n={r['registration_error_px']['n']}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
