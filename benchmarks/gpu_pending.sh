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
# Greedy paths in bfloat16 against two full-precision attentions (did not finish in 120 s).
step greedy_divergence 400 python benchmarks/greedy_divergence.py --tokens 64
# Compiled SawInt4Cache against warm eager DynamicCache at 1 x 8k in one run (the 3x goal); StaticCache compiled too.
step bench_1x8k 500 python -m saw_kvcache.cli bench --model llama3-8b --cases 1x8192,16x8192 --new-tokens 16 \
    --methods saw-compiled,static-compiled,saw-eager,dynamic --capacity-context 0 --out "$OUT/bench_8k" --no-progress
