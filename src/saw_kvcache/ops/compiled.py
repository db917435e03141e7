"""A static cache's per-layer decode work as torch custom ops, for torch.compile and CUDA graphs.

torch.compile sees each op as one opaque node (it does not trace the launchers' host code, so nothing breaks the
graph), and a CUDA graph replays the kernels inside at any length: the lengths are read on the device from
`state` (int32 [length, num_paged, 0]), never passed as Python numbers. The ops run the chosen backend's
`append_from_state` and `paged_attention(..., state=...)`; `backend` is "torch" or "triton". A decode step runs
`append_attention_from_state`: the append and the attention in one op (one kernel launch on the Triton backend).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import TORCH_BACKEND, _triton_backend
from .reference import PagedKV

Tensor = torch.Tensor


def _backend(name: str):
    return TORCH_BACKEND if name == "torch" else _triton_backend()


@torch.library.custom_op(
    "saw_kvcache::append_from_state",
    mutates_args=("k_codes", "k_meta", "v_codes", "v_meta", "state", "window_key", "window_value"),
)
def append_from_state(
    backend: str, k_codes: Tensor, k_meta: Tensor, v_codes: Tensor, v_meta: Tensor, block_table: Tensor,
    state: Tensor, window_key: Optional[Tensor], window_value: Optional[Tensor], key: Tensor, value: Tensor,
    key_mean: Optional[Tensor], value_mean: Optional[Tensor], hadamard_block: int, rotate_values: bool,
) -> None:
    _backend(backend).append_from_state(
        PagedKV(k_codes, k_meta, v_codes, v_meta), block_table, state, window_key, window_value, key, value,
        key_mean, value_mean, hadamard_block, rotate_values,
    )


@append_from_state.register_fake
def _(backend, k_codes, k_meta, v_codes, v_meta, block_table, state, window_key, window_value, key, value,
      key_mean, value_mean, hadamard_block, rotate_values) -> None:
    return None


@torch.library.custom_op("saw_kvcache::attention_from_state", mutates_args=())
def attention_from_state(
    backend: str, query: Tensor, k_codes: Tensor, k_meta: Tensor, v_codes: Tensor, v_meta: Tensor,
    block_table: Tensor, state: Tensor, max_paged: int, window_key: Optional[Tensor],
    window_value: Optional[Tensor], chunk_key: Tensor, chunk_value: Tensor, mask: Optional[Tensor],
    scaling: float, softcap: Optional[float], sinks: Optional[Tensor], key_mean: Optional[Tensor],
    value_mean: Optional[Tensor], hadamard_block: int, rotate_values: bool,
) -> Tensor:
    return _backend(backend).paged_attention(
        query, PagedKV(k_codes, k_meta, v_codes, v_meta), block_table, max_paged, window_key, window_value,
        chunk_key, chunk_value, mask, scaling, softcap, sinks, key_mean, value_mean, hadamard_block, rotate_values,
        state=state,
    )


@torch.library.custom_op(
    "saw_kvcache::append_attention_from_state",
    mutates_args=("k_codes", "k_meta", "v_codes", "v_meta", "state", "window_key", "window_value"),
)
def append_attention_from_state(
    backend: str, query: Tensor, k_codes: Tensor, k_meta: Tensor, v_codes: Tensor, v_meta: Tensor,
    block_table: Tensor, state: Tensor, max_paged: int, window_key: Optional[Tensor],
    window_value: Optional[Tensor], chunk_key: Tensor, chunk_value: Tensor, mask: Optional[Tensor],
    scaling: float, softcap: Optional[float], sinks: Optional[Tensor], key_mean: Optional[Tensor],
    value_mean: Optional[Tensor], hadamard_block: int, rotate_values: bool,
) -> Tensor:
    """append_from_state of the chunk, then attention_from_state."""
    return _backend(backend).paged_attention(
        query, PagedKV(k_codes, k_meta, v_codes, v_meta), block_table, max_paged, window_key, window_value,
        chunk_key, chunk_value, mask, scaling, softcap, sinks, key_mean, value_mean, hadamard_block, rotate_values,
        state=state, append=True,
    )


def _output_like(backend, query, *args):
    """The attention ops' output under torch.compile's tracing: [B, nq, Hq, D] of the query's dtype."""
    b, hq, nq, d = query.shape
    return query.new_empty(b, nq, hq, d)


attention_from_state.register_fake(_output_like)
append_attention_from_state.register_fake(_output_like)
