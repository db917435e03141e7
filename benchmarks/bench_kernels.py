"""Time the SAW-INT4 Triton kernels against torch SDPA on BF16, on a CUDA GPU.

    python benchmarks/bench_kernels.py [--out DIR] [--quick] [--sweep] [--tuning JSON]

Every kernel is timed with CUDA graphs over distinct per-layer buffers (enough layers that the data is several
times the L2 cache), with CUDA events around many graph replays; the median of several timings is reported.
Ideal bytes count every KV byte read once (plus queries and outputs); bandwidth is ideal bytes / time.
Decode and prefill shapes use 32 query heads, 8 KV heads, head dim 128, bfloat16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from saw_kvcache.ops import reference, triton_kernels

HQ, HKV, D, PAGE = 32, 8, 128, 64
DTYPE = torch.bfloat16
L2_BYTES = 60 * 2**20
DECODE_SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 8192), (32, 8192), (64, 4096)]


def layers_for(bytes_per_layer: int, cap: int = 64) -> int:
    return max(2, min(cap, math.ceil(4 * L2_BYTES / bytes_per_layer)))


def time_graph(fn, layers: int, repeats: int = 20, trials: int = 5) -> float:
    """Median microseconds per layer of fn(i) for i in range(layers), captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(layers):  # warm up: compile, autotune, allocate
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / (repeats * layers))
    return statistics.median(times)


def random_pool(batch: int, tokens: int, device="cuda"):
    pages_per_seq = math.ceil(tokens / PAGE)
    num_pages = batch * pages_per_seq
    pool = reference.allocate_pool(num_pages, HKV, PAGE, D, DTYPE, device)
    for codes in (pool.k_codes, pool.v_codes):
        codes.random_(0, 256)
    for meta in (pool.k_meta, pool.v_meta):
        meta.uniform_(0.0, 0.05)
    table = torch.randperm(num_pages, device=device).view(batch, pages_per_seq).int()
    return pool, table


def int4_kv_bytes(batch, tokens):
    return batch * tokens * HKV * 2 * (D // 2 + 4)


def bf16_kv_bytes(batch, tokens):
    return batch * tokens * HKV * 2 * D * 2


def sdpa_decode_us(batch, ctx, q_len=1):
    layers = layers_for(bf16_kv_bytes(batch, ctx))
    ks = [torch.randn(batch, HKV, ctx, D, device="cuda", dtype=DTYPE) for _ in range(layers)]
    vs = [torch.randn(batch, HKV, ctx, D, device="cuda", dtype=DTYPE) for _ in range(layers)]
    q = torch.randn(batch, HQ, q_len, D, device="cuda", dtype=DTYPE)
    results = {}
    for name, backends in (("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION])):
        def run(i):
            if backends is None:
                return torch.nn.functional.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)
            with sdpa_kernel(backends):
                return torch.nn.functional.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)
        try:
            results[name] = time_graph(run, layers)
        except Exception as error:  # a backend that refuses this shape is not a baseline
            results[name] = None
            print(f"  sdpa {name} failed for batch {batch}, context {ctx}: {type(error).__name__}: {str(error)[:120]}")
    del ks, vs
    torch.cuda.empty_cache()
    return results


def int4_decode_us(batch, ctx, q_len=1):
    layers = layers_for(int4_kv_bytes(batch, ctx))
    pools = [random_pool(batch, ctx - q_len) for _ in range(layers)]
    q = torch.randn(batch, HQ, q_len, D, device="cuda", dtype=DTYPE)
    ck = torch.randn(batch, HKV, q_len, D, device="cuda", dtype=DTYPE)
    cv = torch.randn(batch, HKV, q_len, D, device="cuda", dtype=DTYPE)
    mean = torch.randn(HKV, D, device="cuda")

    def run(i):
        pool, table = pools[i]
        return triton_kernels.paged_attention(
            q, pool, table, ctx - q_len, None, None, ck, cv, None, D**-0.5, None, None, mean, None, 64, True
        )

    us = time_graph(run, layers)
    del pools
    torch.cuda.empty_cache()
    return us


def write_us(tokens, block):
    layers = layers_for(bf16_kv_bytes(1, tokens), cap=16)
    pools = [random_pool(1, tokens) for _ in range(layers)]
    ks = [torch.randn(1, HKV, tokens, D, device="cuda", dtype=DTYPE) for _ in range(layers)]
    vs = [torch.randn(1, HKV, tokens, D, device="cuda", dtype=DTYPE) for _ in range(layers)]
    mean = torch.randn(HKV, D, device="cuda")

    def run(i):
        pool, table = pools[i]
        triton_kernels.write_pages(pool, table, 0, ks[i], vs[i], mean, None, block, True)

    us = time_graph(run, layers)
    del pools, ks, vs
    torch.cuda.empty_cache()
    return us


def int4_prefill_us(chunk, ctx, repeats=5):
    """A chunk of `chunk` new tokens (causal among themselves) over `ctx` earlier tokens in INT4 pages."""
    q = torch.randn(1, HQ, chunk, D, device="cuda", dtype=DTYPE)
    ck = torch.randn(1, HKV, chunk, D, device="cuda", dtype=DTYPE)
    cv = torch.randn(1, HKV, chunk, D, device="cuda", dtype=DTYPE)
    layers = layers_for(int4_kv_bytes(1, ctx), cap=8)
    pools = [random_pool(1, ctx) for _ in range(layers)]
    mean = torch.randn(HKV, D, device="cuda")

    def run_int4(i):
        pool, table = pools[i]
        return triton_kernels.paged_attention(
            q, pool, table, ctx, None, None, ck, cv, None, D**-0.5, None, None, mean, None, 64, True
        )

    int4 = time_graph(run_int4, layers, repeats=repeats, trials=3 if repeats < 5 else 5)
    del pools
    torch.cuda.empty_cache()
    return int4


def sdpa_prefill_us(chunk, ctx):
    """The same chunk by torch SDPA on BF16 over ctx + chunk tokens (causal, lower right)."""
    q = torch.randn(1, HQ, chunk, D, device="cuda", dtype=DTYPE)
    layers = layers_for(bf16_kv_bytes(1, ctx + chunk), cap=8)
    ks = [torch.randn(1, HKV, ctx + chunk, D, device="cuda", dtype=DTYPE) for _ in range(layers)]
    vs = [torch.randn(1, HKV, ctx + chunk, D, device="cuda", dtype=DTYPE) for _ in range(layers)]
    bias = causal_lower_right(chunk, ctx + chunk)

    def run_sdpa_gqa(i):
        return torch.nn.functional.scaled_dot_product_attention(q, ks[i], vs[i], attn_mask=bias, enable_gqa=True)

    try:
        return time_graph(run_sdpa_gqa, layers, repeats=5)
    except Exception as error:
        print(f"  prefill sdpa with enable_gqa failed ({type(error).__name__}: {str(error)[:100]}); expanding heads")
    # Heads expanded before timing, so the baseline is not charged for the copy.
    ks = [k.repeat_interleave(HQ // HKV, 1) for k in ks]
    vs = [v.repeat_interleave(HQ // HKV, 1) for v in vs]

    def run_sdpa(i):
        return torch.nn.functional.scaled_dot_product_attention(q, ks[i], vs[i], attn_mask=bias)

    return time_graph(run_sdpa, layers, repeats=5)


def _best(label, candidates, measure):
    """Time measure() under each candidate dict of TUNING updates; keep the fastest in TUNING; return all."""
    tuning = triton_kernels.TUNING
    results = []
    for update in candidates:
        tuning.update(update)
        try:
            us = measure()
        except Exception as error:  # a setting that does not compile (e.g. out of shared memory) is skipped
            print(f"  {label} {update}: failed ({type(error).__name__}: {str(error)[:100]})", flush=True)
            continue
        results.append((us, update))
        print(f"  {label} {update}: {us:.1f} us", flush=True)
    best = min(results, key=lambda r: r[0])
    tuning.update(best[1])
    print(f"{label}: best {best[1]} at {best[0]:.1f} us", flush=True)
    return [{"us": us, **update} for us, update in results]


SWEEPS = ("decode", "programs", "write", "append", "prefill")
# Not in the default sweep: programs of 1 or 2 warps (no barrier between warps in the page loop), with the window
# loop's tiles narrowed so that enough such programs fit an SM's shared memory.
WARPS_SWEEP = [
    {"decode_block_n": n, "programs_per_sm": p, "raw_block_n": r, "decode": {"num_warps": w, "num_stages": 2}}
    for w, n, r, p in ((4, 256, 64, 2), (1, 64, 16, 4), (1, 64, 16, 6), (1, 64, 16, 8), (1, 64, 32, 6),
                       (1, 128, 16, 4), (2, 64, 16, 3), (2, 64, 16, 4), (2, 128, 32, 3), (2, 128, 32, 4),
                       (4, 256, 16, 2), (4, 128, 64, 2))
]


def sweep(kernels=SWEEPS):
    """Launch settings of each kernel, chosen by time on this GPU (sum over a few representative shapes)."""
    def decode_total(shapes=((1, 32768), (8, 8192), (32, 8192))):
        times = [int4_decode_us(b, c) for b, c in shapes]
        print("    " + " / ".join(f"{b}x{c} {t:.1f}" for (b, c), t in zip(shapes, times)), flush=True)
        return sum(times)

    log = {}
    if "warps" in kernels:
        log["warps"] = _best("decode warps", WARPS_SWEEP, decode_total)
    if "narrow" in kernels:
        # From how many (sequence, KV head) pairs decode switches to one-warp programs (8 x 8k has 64, batch 1 has
        # 8), how many per SM, and their step.
        narrow = dict(triton_kernels.TUNING["narrow"])
        log["narrow"] = _best("decode narrow from", [
            {"narrow": {**narrow, "from_programs": f, "programs_per_sm": p, "block_n": n}}
            for f, p, n in ((64, 8, 64), (128, 8, 64), (8, 8, 64), (64, 6, 128))
        ], lambda: decode_total(((1, 32768), (1, 131072), (8, 8192), (32, 8192))))
    if "decode" in kernels:
        # Jointly: capping registers (maxnreg) lets more programs share an SM, which only pays with more programs
        # per SM. At 4 warps the kernel takes 208 registers otherwise (2 programs per SM); capped at 168 (72 bytes
        # of stack, none used in the page loop; SASS compiled on the CPU) 3 fit, at 128 4 fit (some spills in the
        # loop). 4 stages were slower in every earlier sweep.
        log["decode"] = _best("decode", [
            {"decode_block_n": n, "programs_per_sm": p,
             "decode": {"num_warps": 4, "num_stages": 2, **({"maxnreg": r} if r else {})}}
            for n in (128, 256) for r in (None, 168, 128) for p in (2, 3, 4)
        ], decode_total)
    if "programs" in kernels:
        log["decode_programs"] = _best("decode programs/SM", [{"programs_per_sm": k} for k in (1, 2, 4)], decode_total)
    if "write" in kernels:
        log["write"] = _best("write", [
            {"write_butterfly": bf, "write_tokens": t, "write": {"num_warps": w}}
            for bf in ("reshape", "gather") for t in (16, 32, 64) for w in (4, 8)
        ], lambda: write_us(16384, 64))
    if "append" in kernels:
        def append_total():
            times = [append_step_us(b, 8192) for b in (1, 16)]
            print(f"    1x8192 {times[0]:.1f} / 16x8192 {times[1]:.1f}", flush=True)
            return sum(times)
        log["append"] = _best("decode append", [
            {"write_decode": {"tokens": t, "num_warps": w}} for t, w in ((2, 1), (2, 4), (16, 1), (32, 4))
        ], append_total)
    if "prefill" in kernels:
        log["prefill"] = _best("prefill", [
            {"prefill_block_n": n, "prefill_rows": r, "prefill": {"num_warps": w, "num_stages": st}}
            for n in (64, 128) for r in (64, 128) for w in (4, 8) for st in (2, 3)
        ], lambda: int4_prefill_us(4096, 28672, repeats=2))
    return log


def append_step_us(batch, ctx):
    """One decode step's append as a compiled static cache runs it (append_from_state: the window's oldest token
    into the pages, the new one into the window, the lengths advanced on the device), per layer. Each layer's cache
    holds `ctx` tokens and room for every replay's token (the lengths advance at each replay)."""
    window = 64
    replays = 128  # warm-up and capture, then trials x repeats of time_graph
    layers = layers_for(int4_kv_bytes(batch, ctx), cap=32)
    caches = []
    for _ in range(layers):
        pool, table = random_pool(batch, ctx + replays)
        wk, wv = (torch.randn(batch, HKV, window, D, device="cuda", dtype=DTYPE) for _ in "kv")
        state = torch.tensor([ctx, ctx - window, 0], dtype=torch.int32, device="cuda")
        caches.append((pool, table, wk, wv, state))
    key, value = (torch.randn(batch, HKV, 1, D, device="cuda", dtype=DTYPE) for _ in "kv")
    mean = torch.randn(HKV, D, device="cuda")

    def run(i):
        pool, table, wk, wv, state = caches[i]
        triton_kernels.append_from_state(pool, table, state, wk, wv, key, value, mean, None, 64, True)

    us = time_graph(run, layers)
    del caches
    torch.cuda.empty_cache()
    return us


def environment():
    commit = os.environ.get("SAW_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit or "unknown",
        "python": platform.python_version(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="two decode shapes only")
    parser.add_argument("--sweep", nargs="?", const=",".join(SWEEPS), default="", metavar="KERNELS",
                        help="first time each kernel over its launch settings and keep the fastest for the table "
                        "(decode, programs, write, prefill; also 'warps': decode programs of 1, 2 or 4 warps, and "
                        "'narrow': from how many programs decode uses programs of one warp)")
    parser.add_argument("--tuning", help="JSON object of TUNING overrides, applied before everything else")
    args = parser.parse_args()
    env = environment()
    rows = []
    shapes = DECODE_SHAPES[:2] if args.quick else DECODE_SHAPES
    if args.tuning:
        triton_kernels.TUNING.update(json.loads(args.tuning))
    if args.sweep:
        env["sweep"] = sweep(args.sweep.split(","))
        print("tuning after sweep:", json.dumps(triton_kernels.TUNING), flush=True)
    env["tuning"] = dict(triton_kernels.TUNING)
    for batch, ctx in shapes:
        int4 = int4_decode_us(batch, ctx)
        sdpa = sdpa_decode_us(batch, ctx)
        best = min(v for v in sdpa.values() if v is not None)
        ideal = int4_kv_bytes(batch, ctx) + 2 * batch * HQ * D * 2
        rows.append({
            "kernel": "decode", "shape": f"batch {batch}, context {ctx}", "int4_us": int4,
            "int4_TBps": ideal / int4 / 1e6, "sdpa_bf16_us": best, "sdpa_default_us": sdpa["default"],
            "sdpa_cudnn_us": sdpa["cudnn"], "sdpa_TBps": (bf16_kv_bytes(batch, ctx)) / best / 1e6,
            "speedup": best / int4,
        })
        print(rows[-1], flush=True)
    tokens = 16384
    plain, rotated64, rotated128 = write_us(tokens, 0), write_us(tokens, 64), write_us(tokens, 128)
    write_bytes = bf16_kv_bytes(1, tokens) + int4_kv_bytes(1, tokens)
    for name, us in (("write, no rotation", plain), ("write, hadamard_block 64", rotated64),
                     ("write, hadamard_block 128", rotated128)):
        rows.append({"kernel": name, "shape": f"{tokens} tokens", "int4_us": us, "int4_TBps": write_bytes / us / 1e6,
                     "sdpa_bf16_us": None, "speedup": None, "rotation_overhead": us / plain - 1})
        print(rows[-1], flush=True)
    for batch in (1, 16):
        us = append_step_us(batch, 8192)
        # per K and V: the new token read and put in the window, the evicted one read, in BF16; one INT4 row written
        write_bytes = batch * HKV * 2 * (3 * D * 2 + D // 2 + 4)
        rows.append({"kernel": "decode step's append", "shape": f"batch {batch}, context 8192", "int4_us": us,
                     "int4_TBps": write_bytes / us / 1e6, "sdpa_bf16_us": None, "speedup": None})
        print(rows[-1], flush=True)
    int4, sdpa = int4_prefill_us(4096, 28672), sdpa_prefill_us(4096, 28672)
    ideal = int4_kv_bytes(1, 28672) + 4 * 4096 * HKV * D * 2
    rows.append({"kernel": "chunked prefill", "shape": "chunk 4096 over 28672", "int4_us": int4,
                 "int4_TBps": ideal / int4 / 1e6, "sdpa_bf16_us": sdpa,
                 "speedup": sdpa / int4 if sdpa else None})
    print(rows[-1], flush=True)

    lines = [
        f"GPU: {env['gpu']}; torch {env['torch']}; triton {env['triton']}; commit {env['commit']}",
        "",
        "| kernel | shape | SAW-INT4 us/layer | TB/s (ideal bytes) | SDPA BF16 us/layer | SAW-INT4 speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        sdpa = f"{r['sdpa_bf16_us']:.1f}" if r.get("sdpa_bf16_us") else "-"
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else (
            f"rotation +{100 * r['rotation_overhead']:.1f}%" if "rotation_overhead" in r else "-")
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['int4_us']:.1f} | {r['int4_TBps']:.2f} | {sdpa} | {speed} |")
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
