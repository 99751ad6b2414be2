#!/usr/bin/env bash
# The one script to run on a GPU machine (no network needed; torch and triton preinstalled).
#
#   benchmarks/gpu_check.sh OUTDIR
#
# In at most ~8 minutes it runs, each step under its own `timeout` so one hang cannot eat the
# budget, and writes everything under OUTDIR:
#   1. env        the GPU, driver and versions                      -> OUTDIR/env.txt
#   2. tests      the never-GPU-run Hopper paths first, then the suite, on CUDA
#                                                                   -> OUTDIR/tests/junit{-hopper,}.xml
#   3. check      every op at benchmark sizes vs torch and float64  -> OUTDIR/check/check.{json,csv}
#   4. bench-*    the core suites (JSON + CSV per step)             -> OUTDIR/results/*.{json,csv}
#   5. report     README table and plots from all the JSON          -> OUTDIR/results/README.md, plot-*.png
#   6. host-overhead, train-steps: host cost per call vs torch eager;
#                 training steps/s eager vs CUDA graphs vs compile  -> OUTDIR/results/{host_overhead,train_steps}.*
# Logs of every step are in OUTDIR/logs/, and OUTDIR/summary.txt has one line per step.
# The exit code is 0 only if every step passed. Results are written as they are measured,
# so a step cut by its timeout still leaves the rows it finished.
#
# Environment knobs: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 460, the whole run),
# GPU_CHECK_MAXFAIL (default 10 failing tests before pytest stops).
# The steps' own budgets add up to more than the whole run's: a step gets its budget or the time
# left, whichever is less. REPORT_RESERVE_S of the run is kept back for the report (step 5) until
# it has run, so slow earlier steps cut the bench steps, never the report.
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
MAXFAIL=${GPU_CHECK_MAXFAIL:-10}
REPORT_RESERVE_S=30
START=$(date +%s)
FAILED=0

mkdir -p "$OUT/logs" "$OUT/tests" "$OUT/check" "$OUT/results" || exit 2
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# Run from the checkout without installing (pip install --no-deps --no-build-isolation -e . also works).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TKERNELS_GIT_COMMIT=${TKERNELS_GIT_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export TRITON_CACHE_AUTOTUNING=1   # tests, check and bench reuse each other's autotuning (triton >= 3.4)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$REPO" || exit 2

# step NAME BUDGET_S COMMAND...: run COMMAND with a timeout of min(BUDGET_S, time left), log it.
step() {
    local name=$1 budget=$2
    shift 2
    local now left limit t0 rc status
    now=$(date +%s)
    left=$((START + BUDGET_S - REPORT_RESERVE_S - now))
    limit=$((budget < left ? budget : left))
    if [ "$limit" -lt 15 ]; then
        printf '%-7s %-16s %s\n' "SKIP" "$name" "no time left in the ${BUDGET_S}s budget" | tee -a "$SUMMARY"
        FAILED=1
        return 1
    fi
    echo "== $(date +%T) $name (timeout ${limit}s): $*" | tee -a "$OUT/logs/steps.log"
    t0=$(date +%s)
    # SIGINT, not timeout's default SIGTERM: pytest then still prints its failures and writes
    # junit.xml for the tests that ran, and Python steps stop with a traceback saying where
    timeout -s INT -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    [ "$rc" -eq 0 ] || FAILED=1
    printf '%-7s %-16s rc=%-4s %4ss  logs/%s.log\n' "$status" "$name" "$rc" "$(($(date +%s) - t0))" "$name" \
        | tee -a "$SUMMARY"
    tail -n 3 "$OUT/logs/$name.log" | sed 's/^/        /'
    return "$rc"
}

BENCH=("$PY" -m tkernels bench --warmup 10 --rep 50 --no-progress)

# 1. Environment: stop here without a usable GPU (nothing below would mean anything).
# shellcheck disable=SC2329  # (invoked indirectly: exported, then run by `bash -c env_probe`)
env_probe() {
    nvidia-smi || echo "(nvidia-smi not found)"
    "$PY" - "$OUT/gpu_name.txt" <<'EOF'
import platform, sys, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch sees no CUDA device"
p = torch.cuda.get_device_properties(0)
print("gpu", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
      round(p.total_memory / 2**30, 1), "GiB")
open(sys.argv[1], "w").write(torch.cuda.get_device_name(0).replace(" ", "-") + "\n")
EOF
}
export -f env_probe
export PY OUT
if ! step env 60 bash -c env_probe; then
    cp "$OUT/logs/env.log" "$OUT/env.txt" 2>/dev/null
    echo "no usable CUDA device; see $OUT/logs/env.log" | tee -a "$SUMMARY"
    exit 1
fi
cp "$OUT/logs/env.log" "$OUT/env.txt"

# 2. The test suite on CUDA (tests/conftest.py reads TKERNELS_TEST_DEVICE and skips the interpreter).
#    First the tests of the paths that have never run on a GPU before (sm_90 TMA matmul and conv
#    tiles, Philox x4 dropout, single-launch batch norm): a cold machine compiles thousands of
#    specialisations, so the whole suite may not finish in its step, and these must not be the ones cut.
# With pytest-xdist installed, 8 worker processes compile in parallel: a cold machine compiles and
# tunes about 1,300 kernel specialisations for the suite, one at a time per process.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n 8)
fi
if "$PY" -c "import pytest" 2>/dev/null; then
    step tests-hopper 90 env TKERNELS_TEST_DEVICE=cuda "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/test_matmul_tma.py tests/test_conv.py::test_tma_operand_tiles \
        tests/test_conv.py::test_tma_tiles_stay_in_their_group tests/test_conv.py::test_tma_split_weight_grad \
        tests/test_dropout.py::test_mask_uses_all_four_philox_outputs_per_counter \
        tests/test_batch_norm.py::test_single_launch_odd_shapes tests/test_batch_norm.py::test_single_launch_matches_split_path \
        --maxfail="$MAXFAIL" --junitxml="$OUT/tests/junit-hopper.xml"
fi
#    Not the two files that use no GPU (CI's job): tests/test_inspect.py compiles for sm_80/sm_90, and
#    its 150 s compile budget would take most of this step; tests/test_gpu_check.py dry-runs this script.
if "$PY" -c "import pytest" 2>/dev/null; then
    step tests 180 env TKERNELS_TEST_DEVICE=cuda "$PY" -m pytest "${XDIST[@]}" tests -q -p no:cacheprovider \
        --ignore=tests/test_inspect.py --ignore=tests/test_gpu_check.py --maxfail="$MAXFAIL" --durations=15 \
        --junitxml="$OUT/tests/junit.xml"
else
    printf '%-7s %-16s %s\n' "SKIP" "tests" "pytest is not installed in $PY" | tee -a "$SUMMARY"
    FAILED=1
fi

# 3. Correctness of every op at benchmark sizes against torch (and a float64 reference).
step check 75 "${BENCH[@]}" --check --suite linear,resnet50-conv,resnet50-bn,pool,classifier,pointwise,optim \
    --dtype bf16,fp32 --json "$OUT/check/check.json" --csv "$OUT/check/check.csv"

# 4. The core suites. Each step writes its rows as it goes; bf16 comes first so a cut step still
#    leaves a complete bf16 table. torch.compile baselines where compiling is quick enough.
step bench-linear 60 "${BENCH[@]}" --suite linear --dtype bf16,fp16,fp32 --mode fwd,fwd+bwd \
    --baselines eager,compile --json "$OUT/results/linear.json" --csv "$OUT/results/linear.csv"
step bench-resnet50 50 "${BENCH[@]}" --suite resnet50-conv,resnet50-bn --dtype bf16 --mode fwd,fwd+bwd \
    --baselines eager --json "$OUT/results/resnet50.json" --csv "$OUT/results/resnet50.csv"
step bench-classifier 45 "${BENCH[@]}" --suite classifier,pool,pointwise --dtype bf16 --mode fwd,fwd+bwd \
    --baselines eager,compile --json "$OUT/results/classifier.json" --csv "$OUT/results/classifier.csv"
step bench-optim 25 "${BENCH[@]}" --suite optim --dtype fp32 --baselines eager,compile \
    --json "$OUT/results/optim.json" --csv "$OUT/results/optim.csv"
# Batch norm at batch 256 (100-400 MB per tensor, beyond L2), NCHW and channels_last: its "% roofline"
# column is GB/s against the device copy bandwidth measured by the same run (issue 13's >= 80% goal).
step bench-bn-large 40 "${BENCH[@]}" --suite resnet50-bn-large --dtype bf16 --mode fwd,fwd+bwd \
    --baselines eager --json "$OUT/results/bn_large.json" --csv "$OUT/results/bn_large.csv"

# 5. README table and plots from whatever JSON the bench steps left.
shopt -s nullglob
results=()
for f in "$OUT"/results/*.json; do
    case $(basename "$f") in host_overhead.json | train_steps.json) ;; *) results+=("$f") ;; esac
done
REPORT_RESERVE_S=0
# (--plot needs matplotlib, and without it the report refuses to run at all: plot only if it imports)
plot=(--plot "$OUT/results/plot.png")
if ! "$PY" -c "import matplotlib" 2>/dev/null; then
    plot=()
    echo "(report: matplotlib is not installed in $PY, so the report has tables but no plots)" | tee -a "$SUMMARY"
fi
if [ ${#results[@]} -gt 0 ]; then
    step report 30 "$PY" -m tkernels bench --load "${results[@]}" --markdown "$OUT/results/README.md" "${plot[@]}"
else
    printf '%-7s %-16s %s\n' "SKIP" "report" "no results to report" | tee -a "$SUMMARY"
    FAILED=1
fi

# 6. Host overhead (issue 12): per-call host cost vs torch eager (stubbed launches, interpreter, in a child)
#     plus real per-call CUDA wall times at tiny sizes; and training steps/s, eager vs CUDA graphs vs
#     torch.compile(mode="reduce-overhead"). Last, so a short budget cuts these and not the report.
step host-overhead 90 "$PY" -m tkernels bench --host-overhead Linear "Conv2d fwd" "BatchNorm2d train" \
    cross_entropy AdamW "LeNet train" --rep 100 \
    --json "$OUT/results/host_overhead.json" --csv "$OUT/results/host_overhead.csv"
step train-steps 60 "$PY" benchmarks/train_steps.py --model lenet --batch-size 64 --steps 200 \
    --json "$OUT/results/train_steps.json"

echo "total $(($(date +%s) - START))s; everything is under $OUT" | tee -a "$SUMMARY"
GPU=$(cat "$OUT/gpu_name.txt" 2>/dev/null || echo gpu)
echo "to publish: mkdir -p benchmarks/results/$GPU && cp $OUT/results/* $OUT/env.txt benchmarks/results/$GPU/" \
    | tee -a "$SUMMARY"
exit "$FAILED"
