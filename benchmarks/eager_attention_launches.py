"""GPU time of one eager decode step's attention launch, by variant (on a CUDA GPU).

    python benchmarks/eager_attention_launches.py [--shapes 1x8192,16x8192] [--calls 50]

Eager decode steps launch the attention kernel with the splits merged by the last split's program (tickets) and
with the step's token appended by the same launch (`append_from`); CUDA-graph capture (bench_kernels.py, compiled
decoding) launches the merge kernel and the write separately. This times the kernels of each variant, launched
eagerly as a decode step does (a 64-token window ring, key centering, rotation), by torch.profiler's kernel
durations (host launch time excluded): the sum per call of every kernel the variant launches.
"""

from __future__ import annotations

import argparse
import collections

import torch

from bench_kernels import D, DTYPE, HKV, HQ, random_pool
from saw_kvcache.ops import triton_kernels

RING = 64


def kernel_us(call, calls: int) -> dict:
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    out = collections.Counter()
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.key] += e.device_time_total / calls
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1x8192,16x8192")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        batch, ctx = (int(x) for x in shape.split("x"))
        pages_end = ctx - RING + 1  # as a decode step after ctx tokens: the window holds RING - 1, the token comes
        pool, table = random_pool(batch, ctx + 64)
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=DTYPE)
        token = [torch.randn(batch, HKV, 1, D, device="cuda", dtype=DTYPE) for _ in range(2)]
        ring = [torch.randn(batch, HKV, RING, D, device="cuda", dtype=DTYPE) for _ in range(2)]
        mean = torch.randn(HKV, D, device="cuda")

        def attend(append: bool):
            return triton_kernels.paged_attention(
                q, pool, table, pages_end, *ring, *token, None, D**-0.5, None, None, mean, None, 64, True,
                window_start=pages_end % RING, window_length=RING - 1,
                append_from=pages_end - 1 if append else None)

        def separate():
            triton_kernels.append_with_window(pool, table, ctx, pages_end - 1, *ring, *token, mean, None, 64, True)
            return attend(False)

        for label, fused, call in (("attention, merge kernel", False, lambda: attend(False)),
                                   ("attention, merge in kernel", True, lambda: attend(False)),
                                   ("append + attention, merge kernel", False, separate),
                                   ("append in attention, merge in kernel (eager step)", True, lambda: attend(True))):
            triton_kernels.TUNING.update(fused_merge=fused)
            times = kernel_us(call, args.calls)
            detail = ", ".join(f"{k} {v:.1f}" for k, v in times.most_common())
            rows.append((shape, label, sum(times.values()), detail))
            print(rows[-1], flush=True)
    print("\n| batch x context | variant | GPU us per call | kernels (us) |\n|---|---|---:|---|")
    for shape, label, total, detail in rows:
        print(f"| {shape} | {label} | {total:.1f} | {detail} |")


if __name__ == "__main__":
    main()
