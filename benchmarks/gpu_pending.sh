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
# At 0130675 decode calls with many (sequence, KV head) pairs launch one-warp programs; the commit after keeps
# eager steps that append their token on 4-warp programs, not timed since. What is left: that eager call's GPU time
# and the eager step at 16 x 8k with it, and the decode kernel has not been profiled since its layout changes.
step eager_launches 150 python benchmarks/eager_attention_launches.py --shapes 16x8192,1x8192
step interleaved_16 200 python benchmarks/eager_interleaved.py --batch 16 --rounds 40
step ncu_decode 200 ncu --clock-control none --section Occupancy --section WarpStateStats --section SchedulerStats \
    -k regex:_attention_kernel -s 2 -c 1 python benchmarks/ncu_target.py decode --batch 8 --context 8192
