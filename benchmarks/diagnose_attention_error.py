"""Which part of the attention kernel's arithmetic carries its error: rerun the attention tests' bf16 cases with
the fast nibble path and the rotation precision switched one at a time, printing kernel error / error budget."""

import itertools
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import pytest  # noqa: E402

from saw_kvcache.ops import triton_kernels  # noqa: E402

for fast, precision in itertools.product((True, False), ("tf32", "ieee")):
    triton_kernels.TUNING["fast_nibbles"], triton_kernels.TUNING["rotation_precision"] = fast, precision
    code = pytest.main([os.path.join(os.path.dirname(__file__), "..", "tests", "test_triton_kernels.py"),
                        "-q", "-p", "no:warnings", "-k", "attention and bfloat16", "--no-header", "-rN"])
    print(f"fast_nibbles={fast} rotation_precision={precision}: pytest exit {code}", flush=True)
