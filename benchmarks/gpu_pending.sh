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
# The merge inside the attention kernel was timed once, with an unexplained warm 1 x 8k step (docs/performance.md):
# eager against warm DynamicCache again, with the host time per layer; then the kernel and SmolLM2 GPU tests (the
# last call's time limit cut the kernel tests after 45 of 56).
step bench_eager 300 python -m saw_kvcache.cli bench --model llama3-8b --cases 1x8192,16x8192 --new-tokens 16 \
    --methods saw-eager,dynamic --capacity-context 0 --out "$OUT/bench_eager" --no-progress
step layer_host_time 200 python benchmarks/layer_host_time.py --context 8192 --batch 1 --calls 300
step kernel_tests 400 python -m pytest -q tests/test_triton_kernels.py
step smollm2_gpu 300 python -m pytest -q tests/test_smollm2.py -k gpu
# Greedy paths in bfloat16 against two full-precision attentions (did not finish in 120 s).
step greedy_divergence 400 python benchmarks/greedy_divergence.py --tokens 64
