"""transformers glue: the cache class, the `saw_int4` attention and their registration."""

from __future__ import annotations

from ..config import SawInt4Config
from .attention import ATTN_IMPLEMENTATION, saw_int4_attention_forward, saw_int4_mask
from .cache import SawInt4Cache, SawInt4Layer
from . import compat


def _cache_for(model) -> SawInt4Cache:
    """The cache generate() builds for a model loaded with attn_implementation="saw_int4": the model's
    `saw_int4_config` attribute if set, else the defaults with the rotation block capped at the head dim."""
    config = getattr(model, "saw_int4_config", None)
    if config is not None:
        return SawInt4Cache(config=config)
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    block = SawInt4Config.hadamard_block
    while block > 1 and head_dim % block:
        block //= 2
    return SawInt4Cache(hadamard_block=block if block > 1 else 0)


def register() -> None:
    """Register attn_implementation="saw_int4" (attention and mask) and the automatic cache in generate()."""
    compat.register_attention(ATTN_IMPLEMENTATION, saw_int4_attention_forward, saw_int4_mask)
    compat.patch_generate_cache_creation(ATTN_IMPLEMENTATION, _cache_for)


__all__ = ["ATTN_IMPLEMENTATION", "SawInt4Cache", "SawInt4Layer", "register", "saw_int4_attention_forward",
           "saw_int4_mask"]
