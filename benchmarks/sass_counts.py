"""Instructions in the decode attention kernel's loops (or the whole write kernel), read from their SASS for sm_90,
on the CPU (no GPU).

    python benchmarks/sass_counts.py [--block-n 256] [--maxnreg N] [--merge in-kernel|kernel]
    python benchmarks/sass_counts.py --queries 512    # a chunked-prefill call (the prefill settings) instead
    python benchmarks/sass_counts.py --kernel write [--hadamard-block 64] [--butterfly gather]

Records the launch of one decode call (bfloat16, 32 query heads, 8 KV heads, head dim 128, 4,096 paged tokens,
hadamard_block 64) through the real launcher, compiles it for sm_90 with Triton's bundled ptxas
(tests/compile_for_hopper.py), disassembles it with the bundled nvdisasm, and prints, per loop of the kernel, the
instructions per warp per iteration and the most frequent opcodes, plus registers and stack. A loop is the range
from a label to a backward branch to it; the first one is the INT4 page loop. Integer arguments are compiled
without the divisibility-by-16 specialization a real launch gets, so the window loop's loads show up narrower
than on a GPU; the page loop's do not depend on it. `--kernel write` compiles the write of 16,384 tokens of the same
shape and counts the whole kernel (it has no loop).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import compile_for_hopper as hopper  # noqa: E402  (pops TRITON_INTERPRET before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402

from saw_kvcache.ops import triton_kernels  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def loops(cubin: str):
    text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    labels, instrs = {}, []
    for line in text.splitlines():
        if m := re.match(r"^\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(instrs)
        elif m := re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line):
            instrs.append(m.group(1))
    found = []
    for i, ins in enumerate(instrs):
        m = re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", ins)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = instrs[labels[m.group(1)] : i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
            found.append((len(body), ops))
    return found


def disassemble(compiled, tmp: str) -> tuple[str, str]:
    """(nvdisasm listing, cuobjdump resource usage) of a compiled kernel."""
    cubin = os.path.join(tmp, "k.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    return cubin, usage


def write_counts(hadamard_block: int, butterfly: str) -> None:
    triton_kernels.TUNING["write_butterfly"] = butterfly
    triton_kernels._write_kernel = hopper.Recorder(triton_kernels._write_kernel)
    h, d, tokens = 8, 128, 16384
    pool = hopper.pool(tokens // 64 + 1, h, 64, d, torch.bfloat16)
    x = torch.randn(1, h, tokens, d).to(torch.bfloat16)
    triton_kernels.write_pages(pool, torch.arange(tokens // 64, dtype=torch.int32).view(1, -1), 0, x, x, None, None,
                               hadamard_block, True)
    kernel, launch_args, kwargs = hopper.launches[0]
    compiled = hopper.compile_launch(kernel, launch_args, kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        cubin, usage = disassemble(compiled, tmp)
        text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    body = [m.group(1) for line in text.splitlines() if (m := re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line))]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    regs = re.search(r"REG:(\d+)", usage).group(1)
    global_memory = collections.Counter(op for t in body if (op := re.sub(r"^@!?U?P\w+\s+", "", t).split()[0])
                                        .startswith(("LDG", "STG")))
    print(f"write kernel, hadamard_block {hadamard_block}, butterfly {butterfly}, {kwargs['T']} tokens per program: "
          f"{len(body)} instructions per warp, {regs} registers; "
          + ", ".join(f"{k} {v}" for k, v in ops.most_common(10))
          + "; global loads and stores (both branches: keys and values): "
          + ", ".join(f"{k} {v}" for k, v in sorted(global_memory.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=["decode", "write"], default="decode")
    parser.add_argument("--hadamard-block", type=int, default=64, help="write kernel: rotation block (0: none)")
    parser.add_argument("--butterfly", default="gather", help="write kernel: TUNING['write_butterfly']")
    parser.add_argument("--block-n", type=int, default=None, help="TUNING['decode_block_n'] (default: as tuned)")
    parser.add_argument("--maxnreg", type=int, default=None, help="register cap per thread")
    parser.add_argument("--merge", choices=["in-kernel", "kernel"], default="in-kernel",
                        help="decode: the splits merged by the attention kernel's last split (eager) or by the merge "
                             "kernel (CUDA-graph capture)")
    parser.add_argument("--queries", type=int, default=1,
                        help="query tokens per sequence (more than TUNING['decode_max_queries']: a prefill chunk)")
    parser.add_argument("--append", action="store_true",
                        help="decode: the eager step's launch that also appends the token (append_from, no window)")
    parser.add_argument("--tuning", help="JSON object of TUNING overrides (e.g. '{\"decode\": {\"num_warps\": 2}}')")
    parser.add_argument("--dump", metavar="DIR", help="also write the attention kernel's TTGIR, PTX and SASS there")
    args = parser.parse_args()
    triton_kernels.TUNING["fused_merge"] = args.merge == "in-kernel"
    if args.tuning:
        triton_kernels.TUNING.update(json.loads(args.tuning))
    if args.kernel == "write":
        return write_counts(args.hadamard_block, args.butterfly)
    if args.block_n:
        triton_kernels.TUNING["decode_block_n"] = args.block_n
    if args.maxnreg:
        triton_kernels.TUNING["decode"] = {**triton_kernels.TUNING["decode"], "maxnreg": args.maxnreg}
    triton_kernels._programs_wanted = lambda device: 2 * 132
    triton_kernels._attention_kernel = hopper.Recorder(triton_kernels._attention_kernel)
    triton_kernels._merge_splits_kernel = hopper.Recorder(triton_kernels._merge_splits_kernel)
    h, g, d = 8, 4, 128
    pool = hopper.pool(64 + 1, h, 64, d, torch.bfloat16)
    table = torch.arange(64, dtype=torch.int32).view(1, 64)
    token = torch.randn(1, h, args.queries, d).to(torch.bfloat16)
    triton_kernels.paged_attention(torch.randn(1, h * g, args.queries, d).to(torch.bfloat16), pool, table,
                                   4096, None, None, token, token, None, 0.1, None, None, None,
                                   None, 64, True, append_from=4096 if args.append else None)
    kernel, launch_args, kwargs = next(l for l in hopper.launches if l[0].__name__ == "_attention_kernel")
    compiled = hopper.compile_launch(kernel, launch_args, kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        cubin, usage = disassemble(compiled, tmp)
        found = loops(cubin)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            for kind in ("ttgir", "ptx"):
                with open(os.path.join(args.dump, f"attention.{kind}"), "w") as f:
                    f.write(compiled.asm[kind])
            with open(os.path.join(args.dump, "attention.sass"), "w") as f:
                f.write(subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True,
                                       text=True).stdout)
    regs, stack = re.search(r"REG:(\d+)", usage).group(1), re.search(r"STACK:(\d+)", usage).group(1)
    print(f"attention kernel, {args.queries} queries, BLOCK_N {kwargs['BLOCK_N']}: {regs} registers, {stack} bytes of stack, "
          f"{compiled.metadata.shared} bytes of shared memory")
    for i, (size, ops) in enumerate(found):
        if size > 1:
            print(f"loop {i}: {size} instructions per warp per iteration; " +
                  ", ".join(f"{k} {v}" for k, v in ops.most_common(12)) + "; global loads, local (spill) traffic: " +
                  ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k.startswith(("LDG", "LDL", "STL"))))


if __name__ == "__main__":
    main()
