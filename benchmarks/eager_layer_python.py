"""Python host time of one layer's eager decode step on the Triton backend, measured on a CPU (no GPU needed).

    python benchmarks/eager_layer_python.py [--calls 500] [--batch 1] [--context 8192] [--profile]

SawInt4Cache.update followed by the saw_int4 attention, for one layer of the Llama-3-8B shape (8 KV heads, 32
query heads, head dim 128, bfloat16, the default 64-token window) after `--context` tokens, as an eager decode step
runs them. Every Triton kernel is replaced by a stand-in whose compiled form launches nothing, and the launchers
take their GPU path (`triton_kernels.FAST_LAUNCH`): the cache, the launchers and `_launch`'s lookups run their real
code; no kernel runs, and Triton's own launcher (7-13 us per launch on an H200's host,
benchmarks/layer_host_time.py) is not included. Prints the median and the minimum of 7 runs of `--calls` steps
(microseconds per step). Run it against another tree with PYTHONPATH=<tree>/src to compare two versions on one
machine; only runs of one machine compare.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # lets backend="triton" run on CPU tensors; the launch path below is the GPU's

import torch  # noqa: E402

from saw_kvcache import SawInt4Cache  # noqa: E402
from saw_kvcache.integration.attention import saw_int4_attention_forward  # noqa: E402
from saw_kvcache.ops import triton_kernels  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128


class _Compiled:
    """What `kernel[grid](...)` returns on a GPU; `_launch` then launches it through `.run`."""

    function = packed_metadata = None

    def run(self, *args):
        pass


class _Kernel:
    def __init__(self, kernel):
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _Compiled()


class _Module:
    num_key_value_groups = GROUP
    is_causal = True
    training = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions of the steps")
    args = parser.parse_args()
    # The GPU-side choices of the launchers (16-bit dots, no float32 copies), through the compiled launcher.
    triton_kernels.INTERPRET = False
    triton_kernels.FAST_LAUNCH = True
    torch.cuda.current_device = lambda: 0
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    triton_kernels._programs_wanted = lambda device: 2 * 132  # split as on an H200
    for name in dir(triton_kernels):
        kernel = getattr(triton_kernels, name)
        if name.endswith("_kernel") and hasattr(kernel, "arg_names"):
            setattr(triton_kernels, name, _Kernel(kernel))
    torch.manual_seed(0)
    b, dtype = args.batch, torch.bfloat16
    prompt = torch.randn(b, KV_HEADS, args.context, HEAD_DIM, dtype=dtype)
    k1, v1 = torch.randn(b, KV_HEADS, 1, HEAD_DIM, dtype=dtype), torch.randn(b, KV_HEADS, 1, HEAD_DIM, dtype=dtype)
    q1 = torch.randn(b, KV_HEADS * GROUP, 1, HEAD_DIM, dtype=dtype)
    module = _Module()
    cache = SawInt4Cache(backend="triton")

    def step():
        keys, values = cache.update(k1, v1, 0)
        saw_int4_attention_forward(module, q1, keys, values, None)

    with torch.no_grad():
        keys, values = cache.update(prompt, prompt, 0)
        saw_int4_attention_forward(module, q1, keys, values, None)  # the prompt's forward: sdpa over the chunk
        for _ in range(200):  # from the second step on the attention reads the pages; launches get cached
            step()
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(args.calls):
                step()
            runs.append((time.perf_counter() - start) / args.calls * 1e6)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                step()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(f"batch {b}, context {args.context}: {statistics.median(runs):.1f} us per layer and step (median of 7 "
          f"runs of {args.calls}), minimum {min(runs):.1f}")


if __name__ == "__main__":
    main()
