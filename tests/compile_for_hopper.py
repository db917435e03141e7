"""Compile every Triton kernel launch of a set of real calls for an H100/H200 (sm_90) without a GPU.

The interpreter never compiles, so compiler-only failures (shape checks of tl.dot, code after an early return,
layouts) would first show on a GPU. This script runs the launchers on CPU tensors with every kernel replaced by
a recorder, then compiles each recorded launch with Triton's bundled ptxas. Run by tests/test_triton_kernels.py
in a subprocess (TRITON_INTERPRET must be unset when triton is imported); prints one line per launch.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from saw_kvcache.ops import reference, triton_kernels  # noqa: E402

OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")
TYPES = {torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float32: "fp32", torch.bool: "i1"}
launches = []
HOPPER_SHARED_MEMORY = 232448  # per block, opt-in (227 KiB) on the H100 and H200


class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            launches.append((self.kernel, args, kwargs))
        return record


def compile_launch(kernel, args, kwargs):
    """Specialized as a GPU launch would be: pointers 16-byte aligned and integers divisible by 16 carry
    tt.divisibility 16, integers equal to 1 become constants (except do_not_specialize arguments)."""
    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    unspecialized = {names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in unspecialized:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0 and name not in unspecialized:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in kwargs.items():
        if name not in OPTIONS:
            signature[name] = "constexpr"
            constexprs[(names.index(name),)] = value
    options = {k: v for k, v in kwargs.items() if k in OPTIONS}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def pool(pages, heads, page_size, head_dim, dtype):
    return reference.allocate_pool(pages, heads, page_size, head_dim, dtype, code_fill=0, meta_fill=1.0)


def calls():
    """(label, function) pairs covering the launch variants: decode, speculative decode, prefill, no pages yet,
    no rotation, float32 models, masks and softcap, lengths on the device, every write butterfly, dequantize."""
    for dtype, d, g, nq, block, paged in ((torch.bfloat16, 128, 4, 1, 64, 4096), (torch.float16, 64, 8, 4, 64, 512),
                                          (torch.bfloat16, 128, 4, 700, 64, 3000), (torch.bfloat16, 64, 2, 3, 0, 0),
                                          (torch.float32, 64, 1, 1, 32, 100), (torch.bfloat16, 256, 4, 1, 64, 1024),
                                          (torch.float16, 256, 4, 2, 64, 2000), (torch.bfloat16, 128, 8, 4, 64, 8192)):
        h, b = 2, 2
        kv = pool(b * triton.cdiv(paged, 64) + 1, h, 64, d, dtype) if paged else None
        table = torch.arange(b * triton.cdiv(paged, 64), dtype=torch.int32).view(b, -1) if paged else None
        query = torch.randn(b, h * g, nq, d).to(dtype)
        chunk = torch.randn(b, h, nq, d).to(dtype)
        mean = torch.zeros(h, d)
        for masked in (False, True):
            mask = torch.ones(b, 1, nq, paged + nq, dtype=torch.bool) if masked else None
            yield (f"attention {dtype} d{d} g{g} nq{nq} block{block} paged{paged} mask={masked}",
                   lambda: triton_kernels.paged_attention(query, kv, table, paged, None, None, chunk, chunk, mask,
                                                          0.1, 5.0 if masked else None, None, mean, None, block,
                                                          bool(block)))
    for d, nq in ((64, 37), (128, 700)):  # 16-token pages: steps span several pages (the GPU tests' page size)
        yield f"attention d{d} nq{nq} over 16-token pages", lambda d=d, nq=nq: triton_kernels.paged_attention(
            torch.randn(2, 8, nq, d).to(torch.bfloat16), pool(2 * 188 + 1, 2, 16, d, torch.bfloat16),
            torch.arange(2 * 188, dtype=torch.int32).view(2, 188), 3000, None, None,
            torch.randn(2, 2, nq, d).to(torch.bfloat16), torch.randn(2, 2, nq, d).to(torch.bfloat16), None, 0.1, None,
            None, None, None, 64, True)
    ring = torch.randn(2, 2, 64, 128).to(torch.bfloat16)
    yield "attention with a ring window", lambda: triton_kernels.paged_attention(
        torch.randn(2, 8, 1, 128).to(torch.bfloat16), pool(9, 2, 64, 128, torch.bfloat16),
        torch.arange(8, dtype=torch.int32).view(2, 4), 256, ring, ring, ring[:, :, :1], ring[:, :, :1], None, 0.1,
        None, None, None, None, 64, True, window_start=5, window_length=40)
    state = torch.tensor([300, 250, 0], dtype=torch.int32)
    yield "attention with lengths on the device", lambda: triton_kernels.paged_attention(
        torch.randn(2, 8, 1, 128).to(torch.bfloat16), pool(17, 2, 64, 128, torch.bfloat16),
        torch.arange(16, dtype=torch.int32).view(2, 8), 512, ring, ring, ring[:, :, :1], ring[:, :, :1],
        torch.ones(2, 1, 1, 512, dtype=torch.bool), 0.1, None, None, torch.zeros(2, 128), None, 64, True, state=state)
    for dtype, d, r in ((torch.bfloat16, 128, 64), (torch.bfloat16, 128, 0), (torch.float32, 64, 64),
                        (torch.float16, 256, 16)):  # a decode step's append in the attention's launch
        def append_and_attend(dtype=dtype, d=d, r=r):
            window = torch.randn(2, 2, r, d).to(dtype) if r else None
            pages_end = 300 - r + 1 if r else 300
            triton_kernels.paged_attention(
                torch.randn(2, 8, 1, d).to(dtype), pool(17, 2, 64, d, dtype), torch.arange(16, dtype=torch.int32).view(2, 8),
                pages_end, window, window, torch.randn(2, 2, 1, d).to(dtype), torch.randn(2, 2, 1, d).to(dtype), None,
                0.1, None, None, torch.zeros(2, d), None, 64, True, window_start=pages_end % r if r else 0,
                window_length=300 - pages_end, append_from=pages_end - 1 if r else 300)
        yield f"decode attention appending its token, {dtype} d{d} window {r}", append_and_attend

    def unfused(call):
        def run():
            triton_kernels.TUNING["fused_merge"] = False
            try:
                call()
            finally:
                triton_kernels.TUNING["fused_merge"] = True
        return run

    def smallest_step():  # the smallest step a launch refused for shared memory is retried with (int8 dots)
        triton_kernels.TUNING["decode_block_n"], before = 64, triton_kernels.TUNING["decode_block_n"]
        try:
            triton_kernels.paged_attention(
                torch.randn(2, 8, 1, 128).to(torch.bfloat16), pool(9, 2, 64, 128, torch.bfloat16),
                torch.arange(8, dtype=torch.int32).view(2, 4), 256, None, None, ring[:, :, :1], ring[:, :, :1], None,
                0.1, None, None, None, None, 64, True)
        finally:
            triton_kernels.TUNING["decode_block_n"] = before

    yield "decode with 64-token steps", smallest_step

    def narrow(call):  # one-warp programs, as decode calls with many (sequence, KV head) pairs launch
        def run():
            before = triton_kernels.TUNING["narrow"]
            triton_kernels.TUNING.update(narrow={**before, "from_programs": 1})
            try:
                call()
            finally:
                triton_kernels.TUNING.update(narrow=before)
        return run

    for dtype, d, r in ((torch.bfloat16, 128, 64), (torch.float16, 256, 16)):  # eager steps that append do not
        yield f"one-warp decode, {dtype} d{d} window {r}", narrow(
            lambda dtype=dtype, d=d, r=r: triton_kernels.paged_attention(
                torch.randn(2, 8, 1, d).to(dtype), pool(17, 2, 64, d, dtype),
                torch.arange(16, dtype=torch.int32).view(2, 8), 300 - r, torch.randn(2, 2, r, d).to(dtype),
                torch.randn(2, 2, r, d).to(dtype), torch.randn(2, 2, 1, d).to(dtype), torch.randn(2, 2, 1, d).to(dtype),
                None, 0.1, None, None, torch.zeros(2, d), None, 64, True, window_start=(300 - r) % r))
    yield "one-warp decode with lengths on the device, merge kernel", narrow(unfused(
        lambda: triton_kernels.paged_attention(
            torch.randn(2, 8, 1, 128).to(torch.bfloat16), pool(17, 2, 64, 128, torch.bfloat16),
            torch.arange(16, dtype=torch.int32).view(2, 8), 512, ring, ring, ring[:, :, :1], ring[:, :, :1],
            torch.ones(2, 1, 1, 512, dtype=torch.bool), 0.1, None, None, torch.zeros(2, 128), None, 64, True,
            state=state)))
    yield "attention with lengths on the device, merge kernel (as under CUDA-graph capture)", unfused(
        lambda: triton_kernels.paged_attention(
            torch.randn(2, 8, 1, 128).to(torch.bfloat16), pool(17, 2, 64, 128, torch.bfloat16),
            torch.arange(16, dtype=torch.int32).view(2, 8), 512, ring, ring, ring[:, :, :1], ring[:, :, :1],
            torch.ones(2, 1, 1, 512, dtype=torch.bool), 0.1, None, None, torch.zeros(2, 128), None, 64, True,
            state=state))
    for r in (64, 0):  # a static cache's decode step: the append in the attention's launch, lengths on the device
        yield f"attention appending its token with lengths on the device, window {r}", unfused(
            lambda r=r: triton_kernels.paged_attention(
                torch.randn(2, 8, 1, 128).to(torch.bfloat16), pool(17, 2, 64, 128, torch.bfloat16),
                torch.arange(16, dtype=torch.int32).view(2, 8), 512, ring if r else None, ring if r else None,
                ring[:, :, :1], ring[:, :, :1], torch.ones(2, 1, 1, 512, dtype=torch.bool), 0.1, None, None,
                torch.zeros(2, 128), None, 64, True, state=torch.tensor([300, 250 if r else 300, 0], dtype=torch.int32),
                append=True))
    yield "append with lengths on the device", lambda: triton_kernels.append_from_state(
        pool(17, 2, 64, 128, torch.bfloat16), torch.arange(16, dtype=torch.int32).view(2, 8), state, ring, ring,
        ring[:, :, :1], ring[:, :, :1], torch.zeros(2, 128), None, 64, True)
    # the write, the ring kernel and the kernel that advances the lengths; and the write alone (no window)
    yield "append of 40 tokens with lengths on the device", lambda: triton_kernels.append_from_state(
        pool(17, 2, 64, 128, torch.bfloat16), torch.arange(16, dtype=torch.int32).view(2, 8),
        torch.tensor([200, 150, 0], dtype=torch.int32), ring, ring, ring[:, :, :40], ring[:, :, :40],
        torch.zeros(2, 128), None, 64, True)
    yield "append without a window with lengths on the device", lambda: triton_kernels.append_from_state(
        pool(17, 2, 64, 128, torch.bfloat16), torch.arange(16, dtype=torch.int32).view(2, 8),
        torch.tensor([200, 200, 0], dtype=torch.int32), None, None, ring[:, :, :1], ring[:, :, :1],
        torch.zeros(2, 128), None, 64, True)
    for n in (1, 40):  # the decode step's single launch, and a chunk longer than one write tile
        yield f"append of {n} tokens with host lengths", lambda n=n: triton_kernels.append_with_window(
            pool(17, 2, 64, 128, torch.bfloat16), torch.arange(16, dtype=torch.int32).view(2, 8), 300, 250, ring,
            ring, torch.randn(2, 2, n, 128).to(torch.bfloat16), torch.randn(2, 2, n, 128).to(torch.bfloat16),
            torch.zeros(2, 128), None, 64, True)
    for butterfly in ("gather", "reshape"):
        def write(butterfly=butterfly):
            triton_kernels.TUNING["write_butterfly"] = butterfly
            kv = pool(3, 2, 64, 128, torch.bfloat16)
            x = torch.randn(1, 2, 70, 128, dtype=torch.bfloat16)
            triton_kernels.write_pages(kv, torch.arange(3, dtype=torch.int32).view(1, 3), 0, x, x, None, None, 64, True)
        yield f"write {butterfly}", write
    yield "dequantize", lambda: triton_kernels.dequantize_pages(
        pool(3, 2, 64, 128, torch.bfloat16), torch.arange(3, dtype=torch.int32).view(1, 3), 150, None, None, 64, True,
        torch.bfloat16)


def main(only: str = "") -> int:
    """Compiles every call's launches, or those of the calls whose label contains `only`."""
    triton_kernels._programs_wanted = lambda device: 2 * 132  # split like on an H200, so the merge kernel runs
    for name in ("_attention_kernel", "_merge_splits_kernel", "_write_kernel", "_dequantize_kernel",
                 "_ring_write_kernel", "_advance_state_kernel"):
        setattr(triton_kernels, name, Recorder(getattr(triton_kernels, name)))
    failures = 0
    for label, call in calls():
        if only not in label:
            continue
        launches.clear()
        call()
        for kernel, args, kwargs in launches:
            try:
                compiled = compile_launch(kernel, args, kwargs)
                if compiled.metadata.shared > HOPPER_SHARED_MEMORY:
                    raise RuntimeError(f"{compiled.metadata.shared} B of shared memory, more than sm_90's "
                                       f"{HOPPER_SHARED_MEMORY} B (the GPU would raise OutOfResources)")
                print(f"ok    {label}: {kernel.__name__}, {compiled.metadata.shared} B shared memory", flush=True)
            except Exception as error:  # report every failing launch, not only the first
                failures += 1
                print(f"FAIL  {label}: {kernel.__name__}: {type(error).__name__}: {error}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
