#!/usr/bin/env bash
# GPU check (issue 12, item 5): install daskpath for one NVIDIA GPU, then run
# benchmarks/gpu_check.py (dask-cuda LocalCUDACluster, translation fp32/TF32/fp16/bf16 MP/s and
# fraction of peak, StarDist on GPU, a 2-slide local-cuda run vs a CPU run). Writes one JSON:
# $OUT/gpu_check.json when OUT is set, else benchmarks/results/gpu_check.json (+ .md table, .log).
# Aim: <= 8 minutes from a fresh machine (--budget). See benchmarks/README.md, "GPU check".
#
# usage: bash benchmarks/gpu_check.sh [options] [-- options of gpu_check.py]
#   --fetch-wheels    on a machine WITH the package registries (no GPU needed): download into .whl/
#                     the wheels that an offline GPU machine lacks (CPython 3.12, x86-64, an image
#                     with torch + numpy/scipy/pandas preinstalled), add .whl/ to .git/info/exclude, exit
#   --wheels DIR      install offline from DIR (default: .whl/ when it holds wheels): pip --target a
#                     scratch folder put on PYTHONPATH, the machine's own CUDA torch, numpy, ... reused
#   --online          install from the registries into a venv (default when there are no wheels):
#                     pip install -e '.[gpu,torch,baselines,bench]' with .ci/constraints.txt, minus
#                     its dask/distributed pins (dask-cuda pins its own) and, when the machine's
#                     python already has a CUDA torch, minus the torch pin (that torch is reused)
#   --venv DIR        venv of --online (default ~/.cache/daskpath/venv-gpu, reused)
#   --with-tf         --online: also tensorflow[and-cuda] + stardist, for the StarDist-on-GPU phase
#                     and the nuclei/translate stages on GPU (several GB: budget minutes for it)
#   --no-install      run with $PYTHON (default python3) as it is
#   --budget S        seconds for install + check together (default 480 = 8 minutes)
#   --plan            print what would be done, do nothing
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/benchmarks/results}
JSON=$OUTDIR/gpu_check.json
LOG=$OUTDIR/gpu_check.log
WHEELS=""
MODE=""
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/daskpath/venv-gpu  # outside the tree: it must not travel or be committed
WITH_TF=0
BUDGET=480
PLAN=0
FETCH=0
WHEEL_PY=${WHEEL_PY:-3.12}
# what the offline GPU image lacks (it has torch, numpy, scipy, scikit-image, scikit-learn, pandas,
# pyarrow, xarray, opencv, pillow, matplotlib, tqdm, pyyaml, psutil, cloudpickle, toolz, fsspec,
# msgpack, click, jinja2, nvidia-ml-py, cuda-core, prometheus-client); pins as .ci/constraints.txt,
# dask/distributed as dask-cuda 26.10 requires them
DEVICE_WHEELS="dask==2026.7.1 distributed==2026.7.1 dask-cuda==26.10.0 rapids-dask-dependency==26.10.0
zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1 imagecodecs==2026.3.6
tifffile==2026.3.3 tiffslide==3.0.1 tblib==3.2.2 tornado==6.6.1 zict==3.0.0 locket==1.0.0
partd==1.4.2 skops==0.16.0 prettytable==3.18.0 wcwidth==0.9.4"
PASS=()

while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) FETCH=1 ;;
    --wheels) WHEELS=$2; MODE=wheels; shift ;;
    --online) MODE=online ;;
    --venv) VENV=$2; shift ;;
    --with-tf) WITH_TF=1 ;;
    --no-install) MODE=none ;;
    --budget) BUDGET=$2; shift ;;
    --plan) PLAN=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    --) shift; PASS=("$@"); break ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

if [ "$FETCH" = 1 ]; then
  dest=$ROOT/.whl
  mkdir -p "$dest"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" $DEVICE_WHEELS || { echo "gpu_check.sh: pip download failed" >&2; exit 1; }
  excl=$(cd "$ROOT" && git rev-parse --git-path info/exclude 2>/dev/null) || excl=""
  if [ -n "$excl" ]; then
    case "$excl" in /*) ;; *) excl=$ROOT/$excl ;; esac
    mkdir -p "$(dirname "$excl")"
    grep -qx '/.whl/' "$excl" 2>/dev/null || echo '/.whl/' >> "$excl"
  fi
  echo "wheels for CPython $WHEEL_PY in $dest: $(ls "$dest"/*.whl | wc -l) files, $(du -sh "$dest" | cut -f1)"
  echo "carry .whl to the GPU machine and run: bash benchmarks/gpu_check.sh"
  exit 0
fi

if [ -z "$MODE" ]; then
  if [ -n "$(ls "$ROOT"/.whl/*.whl 2>/dev/null)" ]; then MODE=wheels; WHEELS=$ROOT/.whl; else MODE=online; fi
fi
HAS_CUDA_TORCH=0  # (no nvidia-smi: no NVIDIA driver, so no usable CUDA torch either; skips a slow import)
if command -v nvidia-smi >/dev/null 2>&1 && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  HAS_CUDA_TORCH=1
fi

if [ "$PLAN" = 1 ]; then
  echo "gpu_check.sh plan: install: $MODE${WHEELS:+ from $WHEELS}; python: $PY; machine's torch with CUDA: $HAS_CUDA_TORCH"
  echo "  venv (online): $VENV; with tensorflow[and-cuda]: $WITH_TF; budget: ${BUDGET} s; JSON: $JSON"
  echo "  then: python benchmarks/gpu_check.py --out $JSON --budget <budget - install s> ${PASS[*]:-}"
  exit 0
fi

mkdir -p "$OUTDIR"
: > "$LOG"
INSTALL_JSON=$(mktemp "${TMPDIR:-/tmp}/gpu_check_install.XXXXXX")
RUNPY=$PY
rc=0
echo "[gpu_check.sh] install: $MODE (log: $LOG)"
case "$MODE" in
  wheels)
    SITE=${TMPDIR:-/tmp}/daskpath-gpu-site
    timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 || rc=$?
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    ;;
  online)
    CONS=$(mktemp "${TMPDIR:-/tmp}/gpu_constraints.XXXXXX")
    drop='^(dask|distributed|tensorflow-cpu)=='
    [ "$HAS_CUDA_TORCH" = 1 ] && drop='^(dask|distributed|tensorflow-cpu|torch)=='
    grep -v -E "$drop" "$ROOT/.ci/constraints.txt" > "$CONS"
    {
      test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
      if [ "$HAS_CUDA_TORCH" = 1 ]; then
        # reuse the machine's CUDA torch: its site-packages after the venv's own (a .pth file;
        # --system-site-packages would not see them when $PY is itself a venv's python)
        parent=$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' | sort -u)
        sp=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$parent" > "$sp/zz_machine_site.pth"
      fi
      "$VENV/bin/python" -m pip install -q --upgrade pip
    } >>"$LOG" 2>&1
    (cd "$ROOT" && timeout 420 "$VENV/bin/python" -m pip install -q -c "$CONS" -e '.[gpu,torch,baselines,bench]') \
      >>"$LOG" 2>&1 || rc=$?
    if [ "$WITH_TF" = 1 ] && [ "$rc" = 0 ]; then
      timeout 600 "$VENV/bin/python" -m pip install -q -c "$CONS" 'tensorflow[and-cuda]==2.21.0' \
        'stardist==0.9.2' 'csbdeep==0.8.2' >>"$LOG" 2>&1 || rc=$?
    fi
    RUNPY=$VENV/bin/python
    ;;
  none) ;;
esac
INSTALL_S=$(elapsed)
printf '{"mode": "%s", "rc": %d, "seconds": %d, "python": "%s", "wheels": "%s", "with_tf": %d, "machine_cuda_torch": %d}\n' \
  "$MODE" "$rc" "$INSTALL_S" "$RUNPY" "$WHEELS" "$WITH_TF" "$HAS_CUDA_TORCH" > "$INSTALL_JSON"
echo "[gpu_check.sh] install: rc $rc in ${INSTALL_S} s"
[ "$rc" = 0 ] || { echo "[gpu_check.sh] install failed (tail of $LOG):"; tail -n 15 "$LOG"; \
                   echo "[gpu_check.sh] running the check anyway: phases that need what is missing fail and say so"; }

LEFT=$(( BUDGET - INSTALL_S - 20 ))
[ "$LEFT" -lt 60 ] && LEFT=60
export PYTHONUNBUFFERED=1
timeout --kill-after=15 $(( LEFT + 15 )) "$RUNPY" "$ROOT/benchmarks/gpu_check.py" --out "$JSON" \
  --budget "$LEFT" --install-json "$INSTALL_JSON" ${PASS[@]+"${PASS[@]}"}
crc=$?
if [ ! -s "$JSON" ]; then  # the driver could not even start: leave an honest JSON anyway
  printf '{"ok": false, "error": "gpu_check.py exited %d before writing its JSON (see gpu_check.log)", "install": %s}\n' \
    "$crc" "$(cat "$INSTALL_JSON")" > "$JSON"
fi
rm -f "$INSTALL_JSON"
echo "[gpu_check.sh] done in $(elapsed) s (check exit $crc): $JSON"
exit "$crc"
