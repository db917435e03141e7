"""Another revision's attention kernel against this tree's, timed in one run on one GPU.

    git show REV:src/saw_kvcache/ops/triton_kernels.py > /tmp/baseline_kernels.py
    python benchmarks/kernels_ab.py --baseline /tmp/baseline_kernels.py [--cases prefill,decode]

The host and the GPU's clocks drift between calls of the device tool, so a change to a kernel is judged against
the kernel before it in the same process: the baseline file is imported as a module of `saw_kvcache.ops` (it
imports that package's `reference`, so it must be a revision whose kernels use the same reference API), and each
case is timed by `bench_kernels.py`'s functions (CUDA graphs over distinct per-layer buffers) four times,
alternating baseline and current. Prints each timing, then a table of the medians and their ratio.
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

CASES = {
    "prefill": [("prefill 4096 over 28672", lambda: bench_kernels.prefill_us(4096, 28672, baseline=False,
                                                                            repeats=3)[0])],
    "decode": [(f"decode {b} x {c}", lambda b=b, c=c: bench_kernels.int4_decode_us(b, c))
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
        for label, measure in CASES[group]:
            for name in ("baseline", "current", "baseline", "current"):
                bench_kernels.triton_kernels = kernels[name]
                us = measure()
                times.setdefault(label, {}).setdefault(name, []).append(us)
                print(f"{label}, {name}: {us:.1f} us", flush=True)
    bench_kernels.triton_kernels = triton_kernels
    print("\n| case | baseline us | current us | current / baseline |\n|---|---:|---:|---:|")
    for label, by_name in times.items():
        old, new = (statistics.median(by_name[name]) for name in ("baseline", "current"))
        print(f"| {label} | {old:.1f} | {new:.1f} | {new / old:.3f} |")


if __name__ == "__main__":
    main()
