"""KV memory per token computed from the storage format (the same arithmetic as the page layout)."""

from __future__ import annotations

import torch

from ..config import SawInt4Config


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def kv_memory(config: SawInt4Config | None, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, tokens: int) -> dict:
    """Bytes of one sequence's KV cache, K and V, all layers.

    INT4 tokens: head_dim / 2 bytes of codes + scale and offset in `dtype`, per token, KV head, K and V.
    Fixed per sequence: the full-precision window (residual_length tokens in `dtype`) and the float32 centering
    vectors ([kv_heads, head_dim] per layer for K and for V when centering is on; "auto" may zero some heads but
    still stores the vector). config None is the full-precision cache (DynamicCache) in `dtype`.

    Returns bits_per_element (asymptotic: INT4 tokens), bytes_per_token (asymptotic, all layers), fixed_bytes,
    bytes_at (total at `tokens`: the newest residual_length tokens in the window, the rest in INT4; what
    SawInt4Cache.memory_footprint() reports when tokens - residual_length fills whole pages) and ratio_at (bytes_at / the same cache in `dtype` at full precision).
    """
    el = dtype_bytes(dtype)
    elements_per_token = 2 * layers * kv_heads * head_dim  # K and V
    full_per_token = elements_per_token * el
    if config is None:
        return {
            "bits_per_element": 8.0 * el, "bytes_per_token": full_per_token, "fixed_bytes": 0,
            "bytes_at": full_per_token * tokens, "ratio_at": 1.0,
        }
    per_token_head = head_dim // 2 + 2 * el
    per_token = 2 * layers * kv_heads * per_token_head
    window = min(config.residual_length, tokens)  # the window buffer holds residual_length slots from the start
    centering = sum(1 for c in (config.center_keys, config.center_values) if c is not False) * layers * kv_heads * head_dim * 4
    fixed = config.residual_length * full_per_token + centering
    at = (tokens - window) * per_token + fixed
    return {
        "bits_per_element": 8.0 * per_token_head / head_dim,
        "bytes_per_token": per_token,
        "fixed_bytes": fixed,
        "bytes_at": at,
        "ratio_at": at / (full_per_token * tokens),
    }
