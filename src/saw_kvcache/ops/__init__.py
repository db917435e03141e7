"""The backend seam: each cache operation is looked up here per backend.

A backend provides the same five functions with the same signatures as ``reference``: ``write_pages``,
``append_with_window``, ``append_from_state``, ``paged_attention`` and ``dequantize_pages``. The cache calls them
only through ``get_backend``.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

from . import reference
from .reference import PagedKV

TORCH_BACKEND = SimpleNamespace(
    name="torch",
    write_pages=reference.write_pages,
    append_with_window=reference.append_with_window,
    append_from_state=reference.append_from_state,
    paged_attention=reference.paged_attention,
    dequantize_pages=reference.dequantize_pages,
)


@functools.lru_cache(maxsize=None)
def _triton_backend() -> SimpleNamespace:
    from . import triton_kernels

    return SimpleNamespace(
        name="triton",
        write_pages=triton_kernels.write_pages,
        append_with_window=triton_kernels.append_with_window,
        append_from_state=triton_kernels.append_from_state,
        paged_attention=triton_kernels.paged_attention,
        dequantize_pages=triton_kernels.dequantize_pages,
    )


def triton_unavailable_reason(device: torch.device, head_dim: int | None = None) -> str | None:
    """Why backend="triton" cannot run on this device (and head dim), or None if it can."""
    if head_dim is not None and (head_dim < 32 or head_dim > 256 or head_dim & (head_dim - 1)):
        return f"the kernels need a power-of-two head dim from 32 to 256, and this model's is {head_dim}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        if interpret:
            return "TRITON_INTERPRET=1 is set, which runs kernels on the CPU only; unset it to use the GPU"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "the kernels need a GPU of compute capability 8.0 or newer (bfloat16 tensor cores)"
        return None
    if device.type == "cpu" and interpret:
        return None
    return (
        f"the Triton kernels run on CUDA GPUs (or on the CPU under TRITON_INTERPRET=1, set before triton is "
        f"imported), not on {device.type}"
    )


def get_backend(name: str, device: torch.device, head_dim: int | None = None) -> SimpleNamespace:
    """Resolve "auto", "torch" or "triton" for tensors on `device`. "auto" is Triton on CUDA where the kernels
    support the head dim, else torch."""
    if name == "torch":
        return TORCH_BACKEND
    if name == "triton":
        reason = triton_unavailable_reason(device, head_dim)
        if reason is not None:
            raise RuntimeError(f"SawInt4Cache(backend='triton') cannot run on {device}: {reason}. Use backend='torch'.")
        return _triton_backend()
    if name == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device, head_dim) is None:
            return _triton_backend()
        return TORCH_BACKEND
    raise ValueError(f"unknown backend {name!r}; expected 'auto', 'torch' or 'triton'")


__all__ = ["PagedKV", "get_backend", "reference", "TORCH_BACKEND", "triton_unavailable_reason"]
