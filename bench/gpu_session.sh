#!/usr/bin/env bash
# One GPU session in one call: device facts, the GPU test suite, the GPU codec benchmark.
#
#   bash bench/gpu_session.sh            # from the repository root, on a machine with a GPU
#
# Made for the device tool's single 10-minute call (docs/gpu.md, "Running on a GPU"):
# no network, the image's own python3 (CuPy, numba, pytest already there), every step
# under its own timeout inside an overall budget (SESSION_BUDGET_S, default 510 s), and
# every step runs even when an earlier one failed.  Files written to $OUT (default: a
# fresh directory under /tmp, printed first):
#
#   session.log             everything printed below
#   nvidia-smi.txt          nvidia-smi and its one-line query
#   info.json               python3 -m sparcomm info --json
#   pytest.log, junit.xml   python3 -m pytest tests/gpu tests/test_nvcc_compile.py
#   bench_codecs_gpu.json   sparcomm bench codecs --device gpu --sizes 20 24 26
#   summary.txt             each step's exit status and seconds
#
# The exit status is 0 only when every step passed.  Environment knobs: PYTHON (default
# python3), SESSION_BUDGET_S, PYTEST_ARGS (extra pytest arguments), BENCH_SIZES.

set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$(mktemp -d /tmp/sparcomm-gpu-session.XXXXXX)}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
BUDGET="${SESSION_BUDGET_S:-510}"
BENCH_SIZES="${BENCH_SIZES:-20 24 26}"
STARTED=$(date +%s)
: >"$OUT/summary.txt"
export OUT PYTHON ROOT

elapsed() { echo $(($(date +%s) - STARTED)); }

# Seconds a step may take: at most CAP, leaving RESERVE seconds of the budget for the
# steps after it, and never less than 10.
allowance() {
    local cap=$1 reserve=$2 left
    left=$((BUDGET - $(elapsed) - reserve))
    ((left > cap)) && left=$cap
    ((left < 10)) && left=10
    echo "$left"
}

# step NAME CAP RESERVE COMMAND...: run COMMAND under a timeout; one line in summary.txt.
step() {
    local name=$1 cap=$2 reserve=$3 limit status began
    shift 3
    limit=$(allowance "$cap" "$reserve")
    began=$(date +%s)
    echo
    echo "=== [$(elapsed) s] $name (timeout ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@"
    status=$?
    ((status == 124 || status == 137)) && echo "=== $name: TIMED OUT after ${limit} s"
    printf '%-10s %4d %5d s  %s\n' "$name" "$status" $(($(date +%s) - began)) "$*" \
        >>"$OUT/summary.txt"
    return "$status"
}

device_facts() {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv
}

# Where sparcomm and sparcomm.kernels are imported from; fails unless both are in ROOT.
# Runs in ROOT, as the later steps do: there ./sparcomm (without kernels/) is on sys.path.
import_check() {
    (cd "$ROOT" && "$PYTHON" -c '
import sys
from pathlib import Path

import sparcomm
import sparcomm.kernels.cpu
import sparcomm.kernels.reference

root = Path(sys.argv[1]).resolve()
for module in (sparcomm, sparcomm.kernels):
    path = Path(module.__file__).resolve()
    print(module.__name__, "->", path)
    assert root in path.parents, f"{module.__name__} comes from {path}, not from {root}"
' "$ROOT")
}

info_json() {
    "$PYTHON" -m sparcomm info --json >"$OUT/info.json"
    local status=$?
    cat "$OUT/info.json"
    return "$status"
}

export -f device_facts import_check info_json

# sparcomm maps kernels/ to sparcomm.kernels (pyproject package-dir), so PYTHONPATH=.
# alone does not import it.  An editable install needs no network with --no-index,
# --no-deps and --no-build-isolation (the image has setuptools); should it fail, a shim
# package of symbolic links gives the same layout on PYTHONPATH.
make_importable() {
    step install 90 400 "$PYTHON" -m pip install -q --no-index --no-deps \
        --no-build-isolation -e "$ROOT" && step import 30 390 bash -c import_check && return 0
    local shim
    shim=$(mktemp -d /tmp/sparcomm-shim.XXXXXX)
    mkdir "$shim/sparcomm"
    ln -s "$ROOT"/sparcomm/* "$shim/sparcomm/"
    ln -s "$ROOT/kernels" "$shim/sparcomm/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    # Python >= 3.11: no cwd on sys.path, or ./sparcomm would shadow the shim's package.
    export PYTHONSAFEPATH=1
    echo "=== the editable install failed: importing through the shim $shim (PYTHONPATH)"
    step shim 30 390 bash -c import_check
}

session() {
    echo "sparcomm GPU session: $ROOT -> $OUT, budget ${BUDGET} s, $(date -u +%FT%TZ)"
    echo "git: $(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo 'no git')"
    step nvidia-smi 30 470 bash -c device_facts 2>&1 | tee "$OUT/nvidia-smi.txt"
    step python 20 460 bash -c \
        '"$PYTHON" -VV; uname -m; nproc; if command -v nvcc; then nvcc --version; fi'
    if ! make_importable; then
        echo "=== sparcomm is not importable: the steps that need it are skipped"
        return
    fi
    step info 60 380 bash -c info_json

    local timeout_flag=()
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && timeout_flag=(--timeout=240)
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
    step pytest 300 170 "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider "${timeout_flag[@]}" \
        --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:-} tests/gpu tests/test_nvcc_compile.py \
        2>&1 | tee "$OUT/pytest.log"

    # shellcheck disable=SC2086  # BENCH_SIZES is a list of words on purpose
    step bench 240 10 "$PYTHON" -m sparcomm bench codecs --device gpu --sizes $BENCH_SIZES \
        --output "$OUT/bench_codecs_gpu.json"
}

session 2>&1 | tee "$OUT/session.log"
{
    echo
    echo "=== summary: $(elapsed) s of ${BUDGET} s; files in $OUT"
    echo "step       exit  time  command"
    cat "$OUT/summary.txt"
} | tee -a "$OUT/session.log"
# Every step must have exited 0, except an editable install that the shim stood in for.
awk '$1 != "install" && $2 != 0 { bad = 1 } END { exit bad }' "$OUT/summary.txt" &&
    grep -qE '^(import|shim) +0 ' "$OUT/summary.txt"
