#!/usr/bin/env bash
# The GPU machine's one command (see benchmarks/README.md, "GPU run"): install the carried wheels,
# run the CUDA tests, run benchmarks/gpu.py, and copy its result and both logs to $OUT.
# About 9 minutes at most: tests 150 s, benchmark 420 s of budget (hard stop at 480 s).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
t0=$SECONDS
if [ -d .whl ]; then  # packages the machine's image lacks (soundfile, jiwer, soxr and their needs)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia_smi.csv" 2>&1

tests=$(grep -l "pytest.mark.cuda" tests/test_*.py)
timeout -k 10 150 python3 -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors $tests > "$OUT/pytest_cuda.log" 2>&1
echo "pytest -m cuda: exit $? ($(tail -n 1 "$OUT/pytest_cuda.log"))"

rm -f benchmarks/results/gpu.json  # a result from an older run must not pass for this one
timeout -k 20 -s INT 480 python3 benchmarks/gpu.py --budget 420 "$@" > "$OUT/gpu_run.log" 2>&1
echo "benchmarks/gpu.py: exit $?"
cp benchmarks/results/gpu.json "$OUT/gpu.json" 2>/dev/null || echo "no benchmarks/results/gpu.json written"
grep -E "^\[|^wrote|^problem" "$OUT/gpu_run.log" | cut -c1-400
echo "run_gpu.sh: $((SECONDS - t0)) s"
