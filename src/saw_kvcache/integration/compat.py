"""Everything that differs between the supported transformers releases (5.17 to the newest) lives here."""

from __future__ import annotations

import functools
import inspect

import transformers
from transformers.generation.utils import GenerationMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TRANSFORMERS_VERSION = transformers.__version__


@functools.lru_cache(maxsize=None)
def cache_kwarg_name() -> str:
    """The name under which forward/generate take the cache: `cache` from 5.24, `past_key_values` before."""
    params = inspect.signature(transformers.LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(cache) -> dict:
    """`{"cache": cache}` on 5.24 and newer, `{"past_key_values": cache}` before: for forward() and generate()."""
    return {cache_kwarg_name(): cache}


# What generate() and users read to size a static cache. transformers 5.17's Cache has `max_cache_len`,
# `max_batch_size` and `get_max_cache_shape` as deprecated aliases (they log a warning, then return
# `get_max_length()` / `batch_size`); 5.24 removed them and keeps `get_max_length()` (layers: `max_cache_len`).
# Both versions' generate() read only `is_compileable` (fixed-shape 4D masks in prepare_inputs_for_generation,
# and auto-compilation of the decode step on CUDA) and the layers' `get_mask_sizes`. SawInt4Cache defines all of
# these itself, so they answer the same, without warnings, on every supported release.
STATIC_CACHE_API = ("is_compileable", "get_max_length", "get_max_cache_shape", "max_cache_len", "max_batch_size")


def crop_target_length(tokens_to_remove: int, length: int) -> int:
    """`crop(n)`: n <= 0 removes -n tokens; n > 0 is the legacy absolute length (5.17 still accepts it)."""
    tokens_to_remove = int(tokens_to_remove)  # 5.17's assisted decoding passes a 0-dim tensor
    if tokens_to_remove > 0:
        return min(tokens_to_remove, length)
    return max(length + tokens_to_remove, 0)


def register_attention(name: str, attention_fn, mask_fn) -> None:
    """Register an attention function and, under the same name, the function that builds the mask it reads."""
    ALL_ATTENTION_FUNCTIONS.register(name, attention_fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)


def patch_generate_cache_creation(attn_implementation: str, make_cache) -> None:
    """Make generate() build `make_cache(model)` instead of a DynamicCache for models using `attn_implementation`,
    when the caller passed no cache and asked for no other cache_implementation. Idempotent."""
    original = GenerationMixin._prepare_cache_for_generation
    if getattr(original, "_saw_kvcache_patched", False):
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def prepare_cache(self, generation_config, model_kwargs, *args, **kwargs):
        user_passed_cache = any(model_kwargs.get(key) is not None for key in ("cache", "past_key_values"))
        if user_passed_cache:
            _check_static_capacity(signature, self, generation_config, model_kwargs, args, kwargs)
        result = original(self, generation_config, model_kwargs, *args, **kwargs)
        if user_passed_cache or getattr(self.config, "_attn_implementation", None) != attn_implementation:
            return result
        if generation_config.cache_implementation not in (None, "dynamic"):
            return result
        for key in ("cache", "past_key_values"):
            created = model_kwargs.get(key)
            if created is not None and type(created) is transformers.DynamicCache:
                model_kwargs[key] = make_cache(self)
        return result

    prepare_cache._saw_kvcache_patched = True
    GenerationMixin._prepare_cache_for_generation = prepare_cache


def _check_static_capacity(signature, model, generation_config, model_kwargs, args, kwargs) -> None:
    """Before generate() does any work: a user's static SawInt4Cache must hold what this call needs, sized the
    way generate() sizes a StaticCache (max(num_beams, num_return_sequences) x batch, max_length - 1 tokens)."""
    cache = next((model_kwargs[k] for k in ("cache", "past_key_values") if model_kwargs.get(k) is not None), None)
    check = getattr(cache, "check_generate_capacity", None)
    if check is None:
        return
    try:
        bound = signature.bind(model, generation_config, model_kwargs, *args, **kwargs).arguments
    except TypeError:
        return
    batch, length = bound.get("batch_size"), bound.get("max_cache_length")
    if isinstance(batch, int) and isinstance(length, int):
        beams = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        check(batch * beams, length)
