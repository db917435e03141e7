"""A few eager launches of one kernel at one shape, for Nsight Compute to profile (on a CUDA GPU):

    ncu --clock-control none -k regex:_attention_kernel -s 2 -c 1 --section WarpStateStats \
        python benchmarks/ncu_target.py decode --batch 8 --context 8192

`decode`: the decode attention (one query per sequence) over random INT4 pages, shapes of bench_kernels.py;
`write`: the write of --context tokens (--hadamard-block 0 for no rotation). Launches 4 times, so that `-s 2`
skips the compiling launches.
"""

from __future__ import annotations

import argparse

import torch

from bench_kernels import D, DTYPE, HKV, HQ, random_pool
from saw_kvcache.ops import triton_kernels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kernel", choices=["decode", "write"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--hadamard-block", type=int, default=64)
    parser.add_argument("--tuning", default="{}", help="JSON object of TUNING overrides")
    args = parser.parse_args()
    import json

    triton_kernels.TUNING.update(json.loads(args.tuning))
    mean = torch.randn(HKV, D, device="cuda")
    if args.kernel == "decode":
        pool, table = random_pool(args.batch, args.context - 1)
        q = torch.randn(args.batch, HQ, 1, D, device="cuda", dtype=DTYPE)
        ck = torch.randn(args.batch, HKV, 1, D, device="cuda", dtype=DTYPE)
        cv = torch.randn(args.batch, HKV, 1, D, device="cuda", dtype=DTYPE)
        for _ in range(4):
            triton_kernels.paged_attention(q, pool, table, args.context - 1, None, None, ck, cv, None, D**-0.5, None,
                                           None, mean, None, args.hadamard_block, True)
    else:
        pool, table = random_pool(1, args.context)
        k = torch.randn(1, HKV, args.context, D, device="cuda", dtype=DTYPE)
        v = torch.randn(1, HKV, args.context, D, device="cuda", dtype=DTYPE)
        for _ in range(4):
            triton_kernels.write_pages(pool, table, 0, k, v, mean, None, args.hadamard_block, True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
