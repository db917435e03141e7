"""What a decode attention call costs when there is almost nothing to read (on a CUDA GPU).

    python benchmarks/decode_fixed_cost.py [--tuning JSON]

Times the INT4 decode kernel and SDPA on BF16 as bench_kernels.py does (CUDA graphs, distinct per-layer buffers)
at short contexts, where the bytes are negligible and what remains is each call's chain of latencies.
"""

from __future__ import annotations

import argparse
import json

from bench_kernels import int4_decode_us, sdpa_decode_us
from saw_kvcache.ops import triton_kernels

SHAPES = ((1, 256), (8, 256), (64, 256), (1, 1024), (8, 1024), (1, 4096))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tuning", help="JSON object of TUNING overrides")
    args = parser.parse_args()
    if args.tuning:
        triton_kernels.TUNING.update(json.loads(args.tuning))
    print("| batch x context | SAW-INT4 decode us/layer | SDPA BF16 us/layer |\n|---|---:|---:|")
    for batch, context in SHAPES:
        sdpa = min(v for v in sdpa_decode_us(batch, context).values() if v is not None)
        print(f"| {batch} x {context} | {int4_decode_us(batch, context):.1f} | {sdpa:.1f} |", flush=True)


if __name__ == "__main__":
    main()
