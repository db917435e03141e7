"""Host time of one layer's cache work in an eager decode step, piece by piece (GPU).

    python benchmarks/layer_host_time.py [--context 8192] [--batch 1] [--calls 400]

Eager decoding is bound by host work (docs/performance.md: the GPU is busy ~7 ms of a 22-32 ms step of the
Llama-3-8B shape), so what matters there is how long the host takes to issue each layer's cache work. For one
layer of that shape (8 KV heads, 32 query heads, head dim 128, bfloat16) after `context` cached tokens, this times
`--calls` back-to-back calls of each piece without a sync inside the loop (the time until the last call has been
issued, over the calls: host time, as long as the GPU keeps up) and with a sync at the end ("with GPU").

Rows: DynamicCache.update + transformers' sdpa attention (what SawInt4Cache is compared with; every call is a
new length, so cuDNN builds a plan each time), its update alone and its attention alone at a fixed length (plan
built: the warm case); SawInt4Cache's update + saw_int4 attention (one launch: the attention appends the token),
also with the splits merged by a second kernel
and then with every launch through `kernel[grid]` as well (TUNING["fused_merge"] and triton_kernels.FAST_LAUNCH
off: the state before they existed); its parts; the Triton launches alone, through `kernel[grid](...)` and through
the compiled kernel's own launcher (`compiled[grid](...)`, which skips Triton's argument binding and cache
lookup); an empty one-argument kernel (the floor of a Triton launch).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
import triton
import triton.language as tl
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from saw_kvcache import SawInt4Cache
from saw_kvcache.integration.attention import saw_int4_attention_forward
from saw_kvcache.ops import triton_kernels

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128


@triton.jit
def _empty_kernel(X):
    pass


class _Recorder:
    """Stands in for a Triton kernel: launches it and keeps the last launch (grid, arguments, compiled kernel)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.arg_names = kernel.arg_names  # lets the launcher cache the compiled kernel, as for the kernel itself
        self.last = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel[grid](*args, **kwargs)
            self.last = (grid, args, kwargs, compiled)
            return compiled
        return launch

    def replays(self):
        """(launch through kernel[grid], launch through compiled[grid]) of the last recorded call."""
        grid, args, kwargs, compiled = self.last
        names = self.kernel.arg_names
        ordered = list(args) + [kwargs[n] for n in names[len(args):]]
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        return (lambda: self.kernel[grid](*args, **kwargs)), (lambda: compiled[grid3](*ordered))


class _Module:
    num_key_value_groups = GROUP
    is_causal = True
    training = False


def host_us(call, calls: int) -> tuple[float, float]:
    """(host us per call, us per call including the GPU) as the median of 5 runs."""
    for _ in range(min(20, calls)):
        call()
    torch.cuda.synchronize()
    host, total = [], []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        host.append((issued - start) / calls * 1e6)
        total.append((done - start) / calls * 1e6)
    return statistics.median(host), statistics.median(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions of the SawInt4Cache step")
    args = parser.parse_args()
    dev, dtype, b, n = "cuda", torch.bfloat16, args.batch, args.context
    torch.manual_seed(0)
    prompt_k = torch.randn(b, KV_HEADS, n, HEAD_DIM, device=dev, dtype=dtype)
    prompt_v = torch.randn_like(prompt_k)
    prompt_q = torch.randn(b, KV_HEADS * GROUP, n, HEAD_DIM, device=dev, dtype=dtype)
    k1 = torch.randn(b, KV_HEADS, 1, HEAD_DIM, device=dev, dtype=dtype)
    v1 = torch.randn_like(k1)
    q1 = torch.randn(b, KV_HEADS * GROUP, 1, HEAD_DIM, device=dev, dtype=dtype)
    module = _Module()
    rows = []

    def add(label, call, calls=args.calls):
        rows.append((label, *host_us(call, calls)))

    with torch.no_grad():
        dynamic = DynamicCache()
        dynamic.update(prompt_k, prompt_v, 0)

        def dynamic_step():
            keys, values = dynamic.update(k1, v1, 0)
            sdpa_attention_forward(module, q1, keys, values, None, scaling=HEAD_DIM ** -0.5)

        # ~40 ms per call (a cuDNN plan per new length): fewer calls, or this row alone takes over a minute.
        add("DynamicCache: update + sdpa attention", dynamic_step, calls=max(2, args.calls // 50))
        add("DynamicCache: update only", lambda: dynamic.update(k1, v1, 0))
        fixed_k, fixed_v = dynamic.layers[0].keys, dynamic.layers[0].values
        add("sdpa attention alone, fixed length (warm)", lambda: sdpa_attention_forward(
            module, q1, fixed_k, fixed_v, None, scaling=HEAD_DIM ** -0.5))

        recorders = {name: _Recorder(getattr(triton_kernels, name))
                     for name in ("_attention_kernel", "_merge_splits_kernel", "_write_kernel")}
        for name, recorder in recorders.items():
            setattr(triton_kernels, name, recorder)
        saw = SawInt4Cache(backend="triton")
        keys, values = saw.update(prompt_k, prompt_v, 0)
        saw_int4_attention_forward(module, prompt_q, keys, values, None)
        keys, values = saw.update(k1, v1, 0)
        saw_int4_attention_forward(module, q1, keys, values, None)  # from now on the pages are read in place

        def saw_step():
            keys, values = saw.update(k1, v1, 0)
            saw_int4_attention_forward(module, q1, keys, values, None)

        add("SawInt4Cache: update + saw_int4 attention", saw_step)
        triton_kernels.TUNING["fused_merge"] = False
        add("the same, splits merged by a second kernel", saw_step)
        if triton_kernels.FAST_LAUNCH:
            triton_kernels.FAST_LAUNCH = False
            add("the same, and every launch through kernel[grid](...)", saw_step)
            triton_kernels.FAST_LAUNCH = True
        triton_kernels.TUNING["fused_merge"] = True
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                saw_step()
            profiler.disable()
            torch.cuda.synchronize()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        store = saw.layers[0].store
        # Without the attention, each update's append is deferred and then launched by the next update.
        add("SawInt4Cache: update only (store.append + glue; the append as its own launch)",
            lambda: saw.update(k1, v1, 0) and setattr(saw.layers[0], "awaiting_saw_attention", False))
        past = store.length
        add("store.attend (decode, past fixed)", lambda: store.attend(q1, k1, v1, past, None, HEAD_DIM ** -0.5))
        for name, recorder in recorders.items():
            if recorder.last is None:
                continue
            through_jit, through_compiled = recorder.replays()
            add(f"{name}: kernel[grid](...)", through_jit)
            add(f"{name}: compiled[grid](...)", through_compiled)
        x = torch.empty(16, device=dev)
        add("empty kernel: kernel[grid](x)", lambda: _empty_kernel[(1,)](x))
        compiled = _empty_kernel[(1,)](x)
        add("empty kernel: compiled[grid](x)", lambda: compiled[(1, 1, 1)](x))
        window = torch.zeros(b, KV_HEADS, 64, HEAD_DIM, device=dev, dtype=dtype)

        def ring_copy():
            window[:, :, 5:6] = k1

        add("one window slot copy (slice assignment)", ring_copy)
        add("torch.empty (one allocation)", lambda: torch.empty(1024, device=dev))

    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
          f"batch {b}, context {n}, 8 KV heads, 32 query heads, head dim 128, bfloat16; {args.calls} calls\n")
    print("| piece (one layer, one decode step) | host us per call | us per call with GPU |\n|---|---:|---:|")
    for label, host, total in rows:
        print(f"| {label} | {host:.1f} | {total:.1f} |")


if __name__ == "__main__":
    main()
