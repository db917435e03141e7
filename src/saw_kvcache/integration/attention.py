"""The `saw_int4` attention implementation: reads a SawInt4Cache's INT4 pages directly."""

from __future__ import annotations

from typing import Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..ops import reference

ATTN_IMPLEMENTATION = "saw_int4"


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
