"""The `saw_int4` attention implementation: reads a SawInt4Cache's INT4 pages directly."""

from __future__ import annotations

from typing import Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

from ..ops import reference

ATTN_IMPLEMENTATION = "saw_int4"


def saw_int4_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
) -> Optional[torch.Tensor]:
    """transformers mask interface: the boolean mask of `sdpa_mask`, [batch, 1, q_length, kv_length], True = attend.

    The plain causal mask that may not be skipped (generate() builds one before every decode step of a compiled
    cache, outside the compiled graph, where the GPU waits for it) is built here in a few tensor operations: the
    causal comparison and the 2D padding mask, the same values as `sdpa_mask`'s composed mask functions in a
    fraction of the host time. Everything else goes to `sdpa_mask`."""
    if allow_is_causal_skip or use_vmap or mask_function is not causal_mask_function:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, device=device, **kwargs)
    kv_positions = torch.arange(kv_offset, kv_offset + kv_length, device=device)
    q_positions = torch.arange(q_length, device=device) + q_offset
    mask = kv_positions <= q_positions[:, None]  # [q_length, kv_length]
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        mask = mask & padding[:, None, None, kv_offset : kv_offset + kv_length].to(torch.bool)
    return mask.expand(batch_size, 1, q_length, kv_length)


def saw_int4_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    softcap: Optional[float] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface. query [B, Hq, nq, D]; key/value as returned by the cache's update.

    With a SawInt4Cache, attention runs over its INT4 pages, its full-precision window and the exact current
    chunk. With any other cache, or none, it is exact attention over the given key/value.
    Returns ([B, nq, Hq, D], None).
    """
    if dropout and module.training:
        raise ValueError("attn_implementation='saw_int4' is for inference; train with attn_implementation='sdpa'.")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    view = getattr(key, "_saw_view", None)
    if view is None:
        if softcap is None and s_aux is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        out = reference.paged_attention(
            query, None, None, 0, None, None, key, value, attention_mask, scaling, softcap, s_aux
        )
        return out, None
    layer = view.layer
    layer.read_by_saw_attention = True
    layer.awaiting_saw_attention = False
    if view.chunk_key is not None and value is view.returned_values:
        chunk_key, chunk_value = view.chunk_key, view.chunk_value
    elif view.chunk_start == 0:  # only the chunk was returned (every decode step): no slicing per layer and step
        chunk_key, chunk_value = key, value
    else:
        chunk_key, chunk_value = key[:, :, view.chunk_start :], value[:, :, view.chunk_start :]
    if view.past_length is None:
        out = layer.store.attend_on_device(query, chunk_key, chunk_value, attention_mask, scaling, softcap, s_aux)
    elif view.past_length == 0 and softcap is None and s_aux is None:
        # Nothing cached yet (a prompt's first forward): exact attention over the chunk alone, exactly as
        # attn_implementation="sdpa" computes it (flash attention on CUDA), not the paged kernel's raw-token loop.
        mask = attention_mask[..., : chunk_key.shape[2]] if attention_mask is not None else None
        return sdpa_attention_forward(module, query, chunk_key, chunk_value, mask, scaling=scaling, **kwargs)
    else:
        out = layer.store.attend(query, chunk_key, chunk_value, view.past_length, attention_mask, scaling, softcap,
                                 s_aux)
    return out, None
