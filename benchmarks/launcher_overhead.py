"""Host time of the Triton launchers per call, with the kernels themselves stubbed out (CPU, no GPU needed).

    python benchmarks/launcher_overhead.py [--calls 2000]

In eager decoding every layer calls write_pages and paged_attention once per step, so their Python work (shape
logic, launch planning, argument lists) is paid 2 x layers times per token before any kernel runs. This times
that work alone: the Triton kernels are replaced by no-ops (Triton's own launch cost is not included), on CPU
tensors of a decode step of the Llama-3-8B shape (8 KV heads, 32 query heads, head dim 128, 4,000 paged tokens,
a 64-token window ring). Reports the median of 5 runs of `--calls` calls, in microseconds per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.pop("TRITON_INTERPRET", None)  # the launchers' GPU path, not the interpreter's

import torch  # noqa: E402

from saw_kvcache.ops import reference, triton_kernels  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    for name in ("_attention_kernel", "_merge_splits_kernel", "_write_kernel"):
        setattr(triton_kernels, name, _NoLaunch())
    triton_kernels._programs_wanted = lambda device: 2 * 132  # plan as on an H200
    h, g, d, pages = 8, 4, 128, 70
    pool = reference.allocate_pool(pages, h, 64, d, torch.bfloat16, code_fill=0, meta_fill=1.0)
    table = torch.arange(64, dtype=torch.int32).view(1, 64)
    query = torch.randn(1, h * g, 1, d).to(torch.bfloat16)
    ring = torch.randn(1, h, 64, d).to(torch.bfloat16)
    token = torch.randn(1, h, 1, d).to(torch.bfloat16)
    window = {"window_start": 17, "window_length": 63} if "window_start" in \
        triton_kernels._paged_attention.__code__.co_varnames else {}
    calls = {
        "paged_attention (decode, 4,000 paged + 63 window tokens)": lambda: triton_kernels.paged_attention(
            query, pool, table, 4000, ring[:, :, :63] if not window else ring, ring[:, :, :63] if not window else ring,
            token, token, None, 0.1, None, None, None, None, 64, True, **window),
        "write_pages (1 token)": lambda: triton_kernels.write_pages(pool, table, 4000, token, token, None, None, 64,
                                                                    True),
    }
    print("| launcher | host us per call |\n|---|---:|")
    for label, call in calls.items():
        for _ in range(100):
            call()
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            runs.append((time.perf_counter() - start) / args.calls * 1e6)
        print(f"| {label} | {statistics.median(runs):.1f} |")


if __name__ == "__main__":
    main()
