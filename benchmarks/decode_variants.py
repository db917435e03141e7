"""Decode attention of other versions of the kernels against this tree's, in one run, on a CUDA GPU:

    python benchmarks/decode_variants.py [--commit REV ...] [--patch FILE ...]

Each --commit takes the package of that git revision (`git archive`); each --patch applies a patch to a copy of
this tree's package (`patch -p1` in a copy of src/). Every variant times the decode shapes of bench_kernels.py
the same way (CUDA graphs over distinct per-layer buffers, random pools), then SDPA on BF16 once; the table
gives microseconds per layer and the speedup over SDPA. A patched variant that changes a data format reads the
random pools in its own way: its times are valid, its outputs are not.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def package_of_commit(rev: str, into: str) -> str:
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "src/saw_kvcache"], capture_output=True, check=True)
    os.makedirs(into)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return os.path.join(into, "src")


def package_with_patch(patch: str, into: str) -> str:
    src = os.path.join(into, "src")
    shutil.copytree(os.path.join(ROOT, "src", "saw_kvcache"), os.path.join(src, "saw_kvcache"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(patch, "rb") as f:
        subprocess.run(["patch", "-p1", "-s", "-d", src], stdin=f, check=True)
    return src


def load_kernels(path: str):
    """saw_kvcache.ops.triton_kernels imported from the package under `path` (earlier imports dropped)."""
    for name in [m for m in sys.modules if m == "saw_kvcache" or m.startswith("saw_kvcache.")]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        module = importlib.import_module("saw_kvcache.ops.triton_kernels")
    finally:
        sys.path.remove(path)
    if not os.path.abspath(module.__file__).startswith(os.path.abspath(path)):
        raise RuntimeError(f"imported {module.__file__}, not the variant under {path}")
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", action="append", default=[], help="a git revision to compare (repeatable)")
    parser.add_argument("--patch", action="append", default=[], help="a patch of this tree's package (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("this tree", os.path.join(ROOT, "src"))]
        for rev in args.commit:
            variants.insert(0, (rev, package_of_commit(rev, os.path.join(tmp, f"commit-{rev}"))))
        for i, patch in enumerate(args.patch):
            variants.append((f"+ {os.path.basename(patch)}", package_with_patch(patch, os.path.join(tmp, f"p{i}"))))
        import bench_kernels as bench  # after the variants are ready: imports this tree's package for the pools

        rows = {shape: {} for shape in bench.DECODE_SHAPES}
        for name, path in variants:
            bench.triton_kernels = load_kernels(path)
            for batch, context in bench.DECODE_SHAPES:
                rows[(batch, context)][name] = bench.int4_decode_us(batch, context)
                print(f"{name}: batch {batch}, context {context}: {rows[(batch, context)][name]:.1f} us", flush=True)
        for batch, context in bench.DECODE_SHAPES:
            rows[(batch, context)]["sdpa"] = min(v for v in bench.sdpa_decode_us(batch, context).values() if v)
    names = [name for name, _ in variants]
    print("\n| batch x context | " + " | ".join(f"{n} us" for n in names) + " | SDPA BF16 us | "
          + " | ".join(f"{n} vs SDPA" for n in names) + " |")
    print("|---" * (2 * len(names) + 2) + "|")
    for (batch, context), r in rows.items():
        print(f"| {batch} x {context} | " + " | ".join(f"{r[n]:.1f}" for n in names) + f" | {r['sdpa']:.1f} | "
              + " | ".join(f"{r['sdpa'] / r[n]:.2f}x" for n in names) + " |")


if __name__ == "__main__":
    main()
