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
step smollm2_gpu_tests 300 python -m pytest -q -p no:cacheprovider tests/test_smollm2.py -k gpu
step greedy_divergence 300 python benchmarks/greedy_divergence.py --tokens 64
step bench_decode 590 python -m saw_kvcache.cli bench --model llama3-8b --cases 1x8192,16x8192,64x8192 \
    --new-tokens 16 --methods saw-compiled,static-compiled,saw-eager,dynamic --no-warm --capacity-context 0 \
    --out "$OUT/bench_decode" --no-progress
# Prefill of a 16k prompt, and the largest batch at 32k tokens of context.
step bench_prefill_capacity 590 python -m saw_kvcache.cli bench --model llama3-8b --cases 1x16384 --new-tokens 4 \
    --methods saw-eager,saw-compiled,dynamic --capacity-context 32768 --capacity search --out "$OUT/bench_capacity" --no-progress
