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
# The end-to-end tables predate the decode kernel of 8767ac8 (10-19% faster per layer): all four methods at 8k in
# one run. Then the SmolLM2 GPU tests (last run at d714974) and the variant comparison script, which was written
# after the run it reproduces (docs/performance.md).
step bench_8k 500 python -m saw_kvcache.cli bench --model llama3-8b --cases 1x8192,16x8192 --new-tokens 16 \
    --methods saw-compiled,static-compiled,saw-eager,dynamic --capacity-context 0 --out "$OUT/bench_8k" --no-progress
step smollm2_gpu 300 python -m pytest -q tests/test_smollm2.py -k gpu
step decode_variants 300 python benchmarks/decode_variants.py --commit d714974 \
    --patch benchmarks/experiments/value_codes_by_token.patch
