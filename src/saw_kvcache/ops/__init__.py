"""The backend seam: each cache operation is looked up here per backend.

A backend provides the same three functions with the same signatures as ``reference``:
``write_pages``, ``paged_attention`` and ``dequantize_pages``. The cache calls them only through ``get_backend``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import reference
from .reference import PagedKV

TORCH_BACKEND = SimpleNamespace(
    name="torch",
    write_pages=reference.write_pages,
    paged_attention=reference.paged_attention,
    dequantize_pages=reference.dequantize_pages,
)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why backend="triton" cannot run on this device, or None if it can."""
    return (
        "this version of saw_kvcache has no fused Triton kernels yet (they are planned); "
        "use backend='torch' or 'auto'"
    )


def get_backend(name: str, device: torch.device) -> SimpleNamespace:
    """Resolve "auto", "torch" or "triton" for tensors on `device`."""
    if name == "torch":
        return TORCH_BACKEND
    reason = triton_unavailable_reason(device)
    if name == "triton":
        if reason is not None:
            raise RuntimeError(f"SawInt4Cache(backend='triton') cannot run on {device}: {reason}.")
    if name == "auto":
        return TORCH_BACKEND
    raise ValueError(f"unknown backend {name!r}; expected 'auto', 'torch' or 'triton'")


__all__ = ["PagedKV", "get_backend", "reference", "TORCH_BACKEND"]
