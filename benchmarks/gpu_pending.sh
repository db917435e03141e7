#!/usr/bin/env bash
# The GPU measurements the docs still lack, in one go (run on the GPU machine from the repository root, with
# SMOLLM2_DIR pointing at the folder of SmolLM2-135M-Instruct.Q4_1.gguf; logs and results under ${OUT:-out}).
# Each step has its own time limit so that one slow step does not lose the others' output.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run, keep the log, print the tail
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    grep -E "passed|failed|FAILED|^\|" "$OUT/$name.log" | tail -20
}
# Missing from the docs as of 2026-12-01 (fourth session): a full kernel table at the current commit from a call
# whose tree has no other variant (docs/performance.md has the one-warp-from-64-pairs table from a call that also
# carried a reverted prefill variant), and the eager gap's share in the attention modules on a quiet machine. The
# decode kernel's Nsight Compute profile (last run at 2984e38, docs/kernel_notes.md) is kept here to repeat after
# changes to the decode kernel.
step bench_kernels 300 python benchmarks/bench_kernels.py --out "$OUT"
step eager_interleaved 250 python benchmarks/eager_interleaved.py --batch 1 --rounds 24
step ncu_decode 200 ncu --clock-control none --section Occupancy --section WarpStateStats --section SchedulerStats \
    -k regex:_attention_kernel -s 2 -c 1 python benchmarks/ncu_target.py decode --batch 8 --context 8192
