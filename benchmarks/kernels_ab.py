"""Another revision's attention kernel against this tree's, timed in one run on one GPU.

    git show REV:src/saw_kvcache/ops/triton_kernels.py > /tmp/baseline_kernels.py
    python benchmarks/kernels_ab.py --baseline /tmp/baseline_kernels.py [--cases prefill,decode]

The host and the GPU's clocks drift between calls of the device tool, so a change to a kernel is judged against
the kernel before it in the same process: the baseline file is imported as a module of `saw_kvcache.ops` (it
imports that package's `reference`, so it must be a revision whose kernels use the same reference API), and each
case is timed by `bench_kernels.py`'s functions (CUDA graphs over distinct per-layer buffers) twice, in turn
with the baseline and with torch SDPA on BF16 for the same shape (the fastest SDPA backend for decode). Prints
each timing, then a table of the medians of two and their ratios (SDPA / current above 1: faster than SDPA).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
import bench_kernels  # noqa: E402

from saw_kvcache.ops import triton_kernels  # noqa: E402

# Each case with its torch SDPA (BF16) reference, timed twice in the same run (the fastest SDPA backend for decode).
CASES = {
    "prefill": [("prefill 4096 over 28672", lambda: bench_kernels.int4_prefill_us(4096, 28672, repeats=3),
                 lambda: bench_kernels.sdpa_prefill_us(4096, 28672))],
    "decode": [(f"decode {b} x {c}", lambda b=b, c=c: bench_kernels.int4_decode_us(b, c),
                lambda b=b, c=c: min(us for us in bench_kernels.sdpa_decode_us(b, c).values() if us is not None))
               for b, c in ((1, 32768), (8, 8192), (32, 8192))],
}


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("saw_kvcache.ops._baseline_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a triton_kernels.py of another revision")
    parser.add_argument("--cases", default="prefill,decode", help="comma-separated: " + ", ".join(CASES))
    args = parser.parse_args()
    kernels = {"baseline": load_baseline(args.baseline), "current": triton_kernels}
    times = {}
    for group in args.cases.split(","):
        for label, measure, reference in CASES[group]:
            for name in ("baseline", "current", "SDPA", "baseline", "current", "SDPA"):
                bench_kernels.triton_kernels = kernels.get(name, triton_kernels)
                us = reference() if name == "SDPA" else measure()
                times.setdefault(label, {}).setdefault(name, []).append(us)
                print(f"{label}, {name}: {us:.1f} us", flush=True)
    bench_kernels.triton_kernels = triton_kernels
    print("\n| case | baseline us | current us | SDPA us | current / baseline | SDPA / current |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, by_name in times.items():
        old, new, sdpa = (statistics.median(by_name[name]) for name in ("baseline", "current", "SDPA"))
        print(f"| {label} | {old:.1f} | {new:.1f} | {sdpa:.1f} | {new / old:.3f} | {sdpa / new:.2f}x |")


if __name__ == "__main__":
    main()
