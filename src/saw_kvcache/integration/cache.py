"""SawInt4Cache: a transformers Cache whose layers keep keys and values as paged SAW-INT4."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..config import SawInt4Config
from ..paged import PagedKVStore
from . import compat


@dataclasses.dataclass
class SawView:
    """Attached to the key tensor that `update` returns: lets the saw_int4 attention read the pages.

    `chunk_start` is where the current chunk starts inside that key tensor (0 when only the chunk is returned,
    `past_length` when the dequantized past is returned in front of it). `past_length` is None when the lengths
    are on the device (a static cache's decode steps: PagedKVStore.append_on_device).
    """

    layer: "SawInt4Layer"
    past_length: Optional[int]
    chunk_start: int
    # When the dequantized past is returned in front of the chunk: the chunk's own tensors and the returned
    # values, so that the attention reads the very tensors (same strides, hence bit-identical results) that it
    # reads when only the chunk is returned.
    chunk_key: Optional[torch.Tensor] = None
    chunk_value: Optional[torch.Tensor] = None
    returned_values: Optional[torch.Tensor] = None


class SawInt4Layer(CacheLayerMixin):
    """One attention layer of a SawInt4Cache.

    `update` returns only the new tokens once the saw_int4 attention has shown that it reads this layer's pages;
    until then (and for any other attention implementation) it returns the full dequantized keys and values, so
    every attention implementation computes the right thing.

    In static mode (the cache was built with max_batch_size/max_cache_len) the layer is compileable and, once the
    saw_int4 attention reads its pages, asks transformers for masks spanning max_cache_len positions (as
    StaticCache does), so that decode steps see tensors of one shape.
    """

    is_sliding = False
    is_croppable = True
    supports_early_init = True

    def __init__(self, config: SawInt4Config, layer_idx: int, owner: "SawInt4Cache"):
        super().__init__()
        self.store = PagedKVStore(config, layer_idx, owner._max_batch_size, owner._max_cache_len)
        self.layer_idx = layer_idx
        self._owner = owner
        self._reset_reader_state()

    @property
    def is_compileable(self) -> bool:
        return self.store.static

    def _reset_reader_state(self) -> None:
        self.read_by_saw_attention = False  # the saw_int4 attention consumed a previous update
        self.awaiting_saw_attention = False  # the last update returned only the new tokens
        self.returned_full_states = False

    def __repr__(self):
        return f"SawInt4Layer(layer_idx={self.layer_idx}, tokens={self.store.length})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.store._check_input(key_states, value_states)
        if self.store.batch_size is None:
            self.store._start(key_states)
        self.is_initialized = True
        self.device = key_states.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.awaiting_saw_attention:
            raise RuntimeError(
                f"SawInt4Cache layer {self.layer_idx}: the previous forward's attention did not read the INT4 cache "
                "(was the attention implementation changed from 'saw_int4' mid-generation?). Its output was wrong. "
                "Call cache.reset() and keep one attention implementation per cache."
            )
        if self.store.static and self.read_by_saw_attention and self.store.batch_size is not None:
            # Static decode: lengths stay on the device, so a compiled step has no Python number that changes.
            self.store.append_on_device(key_states, value_states)
            self.awaiting_saw_attention = True
            key_states._saw_view = SawView(self, None, 0)
            return key_states, value_states
        if torch.compiler.is_compiling():
            # generate(prefill_chunk_size=...) compiles the prefill chunks of a compileable cache too: the first
            # chunk allocates the static buffers (fixed addresses) and estimates the means, outside the graph.
            return self._update_outside_graph(key_states, value_states)
        return self._update_on_host(key_states, value_states)

    def _update_on_host(self, key_states: torch.Tensor, value_states: torch.Tensor):
        # Once the saw_int4 attention reads this layer, a decode step's token is appended by the attention's launch.
        past = self.store.append(key_states, value_states, defer=self.read_by_saw_attention)
        self.is_initialized = True
        self.device = key_states.device
        if self.read_by_saw_attention:
            self.awaiting_saw_attention = True
            keys, values, chunk_start = key_states, value_states, 0
        else:
            if past and self.returned_full_states:
                self._owner._warn_dequantized_fallback()
            self.returned_full_states = True
            if past:
                old_keys, old_values = self.store.dequantize(past)
                keys, values = torch.cat([old_keys, key_states], 2), torch.cat([old_values, value_states], 2)
                keys._saw_view = SawView(self, past, past, key_states, value_states, values)
                return keys, values
            keys, values, chunk_start = key_states, value_states, 0
        keys._saw_view = SawView(self, past, chunk_start)
        return keys, values

    _update_outside_graph = torch.compiler.disable(_update_on_host)

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older signature: cache_position
            query_length = query_length.shape[0]
        if self.store.static and self.read_by_saw_attention:
            # Fixed-shape masks, as StaticCache's (positions past the tokens are masked out, and the saw_int4
            # attention cuts the mask to them). Other attention implementations get the dequantized past instead,
            # which is only as long as the tokens: they keep masks of that length.
            return self.store.max_cache_len, 0
        return self.store.length + query_length, 0

    def get_seq_length(self) -> int:
        if self.store.static and self.store._state is not None and torch.compiler.is_compiling():
            # As StaticCache: a tensor inside compiled code, where a Python number would change at every step.
            return self.store._state[0]
        return self.store.length

    def get_max_length(self) -> int:
        return self.store.max_cache_len if self.store.static else -1

    def reset(self) -> None:
        self.store.reset()
        self._reset_reader_state()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        self.store.crop(compat.crop_target_length(tokens_to_remove, self.store.length))
        self.awaiting_saw_attention = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store.batch_size is not None:
            self.store.select(torch.arange(self.store.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store.batch_size is not None:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self.store.select(indices)

    def offload(self):
        raise RuntimeError("SawInt4Cache does not support CPU offloading; its pages already take ~3.8x less memory.")

    def prefetch(self):
        pass


class SawInt4Cache(Cache):
    """A 4-bit KV cache for transformers (SAW-INT4: Hadamard-rotated asymmetric INT4 in pages).

    Examples:
        >>> cache = SawInt4Cache()                                    # defaults
        >>> cache = SawInt4Cache(hadamard_block=64, residual_length=64)
        >>> cache = SawInt4Cache(config=SawInt4Config(page_size=128))
        >>> model.generate(input_ids, past_key_values=cache)         # `cache=` on transformers >= 5.24

        >>> cache = SawInt4Cache(max_batch_size=8, max_cache_len=4096)  # static: preallocated, compileable

    Args:
        config: a SawInt4Config; keyword arguments override its fields (see SawInt4Config for their meaning).
        max_batch_size, max_cache_len: give both for the static mode: each layer allocates its pages, block table
            and window for this capacity on its first update (when its device and dtype are known) and never
            allocates again, through `reset()` and `crop()` too. A batch or a length
            beyond the capacity raises ValueError. Without them (the default) pages are allocated as needed.
    """

    def __init__(
        self,
        config: Optional[SawInt4Config] = None,
        *,
        max_batch_size: Optional[int] = None,
        max_cache_len: Optional[int] = None,
        **overrides,
    ):
        if config is not None and not isinstance(config, SawInt4Config):
            raise TypeError(
                f"SawInt4Cache(config=...) takes a SawInt4Config, got {type(config).__name__}. "
                "(A model config is not needed: layers are created on first use.)"
            )
        unknown = set(overrides) - set(SawInt4Config.field_names())
        if unknown:
            valid = list(SawInt4Config.field_names()) + ["max_batch_size", "max_cache_len"]
            raise TypeError(f"SawInt4Cache got unknown arguments {sorted(unknown)}; valid ones are {valid}.")
        self._max_batch_size, self._max_cache_len = _check_capacity(max_batch_size, max_cache_len)
        self.config = dataclasses.replace(config or SawInt4Config(), **overrides)
        super().__init__(layers=[])
        self._warned_fallback = False
        self.loaded_from: Optional[str] = None  # the file of SawInt4Cache.load

    def __repr__(self):
        capacity = f", max_batch_size={self._max_batch_size}, max_cache_len={self._max_cache_len}" if self.is_static else ""
        return f"SawInt4Cache({self.config}{capacity}, layers={len(self.layers)})"

    # ------------------------------------------------------------------------------------------------ capacity
    # The same answers on every supported transformers release: 5.17's Cache still has deprecated (warning)
    # `max_cache_len`, `max_batch_size` and `get_max_cache_shape`, newer ones only `get_max_length`; these
    # overrides give all four, without warnings (compat.STATIC_CACHE_API).

    @property
    def is_static(self) -> bool:
        """True when built with max_batch_size/max_cache_len (preallocated, fixed capacity)."""
        return self._max_cache_len is not None

    @property
    def is_compileable(self) -> bool:
        """True in static mode: decode steps keep the lengths on the device and run the kernels as custom ops, so
        torch.compile (and generate()'s automatic compilation on CUDA) captures a whole step with no graph break."""
        return self.is_static

    @property
    def max_cache_len(self) -> int:
        """Tokens per sequence the cache can hold: the static capacity, or -1 (no limit) in dynamic mode."""
        return self.get_max_length()

    @property
    def max_batch_size(self) -> int:
        """The static capacity in sequences; in dynamic mode the current batch size (-1 before the first update),
        as transformers 5.17's `Cache.max_batch_size` alias of `batch_size`."""
        return self._max_batch_size if self.is_static else self.batch_size

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """The static max_cache_len, or -1 (no maximum) in dynamic mode; the same for every layer."""
        return self._max_cache_len if self.is_static else -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """Alias of `get_max_length` (StaticCache's older name for it)."""
        return self.get_max_length(layer_idx)

    def check_generate_capacity(self, sequences: int, tokens: int) -> None:
        """Raise ValueError if `sequences` sequences of `tokens` tokens do not fit this static cache (generate()
        calls it before the prefill, so that a too-small cache fails before any work rather than mid-way)."""
        if not self.is_static:
            return
        mb, ml = self._max_batch_size, self._max_cache_len
        if sequences > mb:
            raise ValueError(
                f"SawInt4Cache: generate() will run {sequences} sequences (prompts x max(num_beams, "
                f"num_return_sequences)), more than this static cache's max_batch_size={mb}. "
                f"Fix: SawInt4Cache(max_batch_size={sequences}, max_cache_len={ml}) or larger, or fewer prompts/beams."
            )
        if tokens > ml:
            raise ValueError(
                f"SawInt4Cache: generate() may store {tokens} tokens per sequence (prompt + max_new_tokens - 1), "
                f"more than this static cache's max_cache_len={ml}. Fix: SawInt4Cache(max_batch_size={mb}, "
                f"max_cache_len={tokens}) or larger, or a shorter prompt / smaller max_new_tokens."
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers) and self.layers and self.layers[0].store.origin:
            raise ValueError(
                f"SawInt4Cache: the model wrote layer {layer_idx}, but this cache was {self.layers[0].store.origin} "
                f"and holds {len(self.layers)} layers: the model is not the one the cache was saved from. "
                "saw_kvcache.serialization.check_compatible(cache, model) compares the two."
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(SawInt4Layer(self.config, len(self.layers), self))
        return self.layers[layer_idx].update(key_states, value_states)

    def _warn_dequantized_fallback(self) -> None:
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(
                "SawInt4Cache is read by an attention implementation other than 'saw_int4', so every step "
                "dequantizes the whole cache (correct, but slow and memory-hungry). Load the model with "
                "attn_implementation='saw_int4' (after `import saw_kvcache`) to read the INT4 pages directly.",
                stacklevel=4,
            )

    def get_query_offset(self, layer_idx: int = 0):
        """The position of the first query (transformers' mask creation). Between compiled decode steps, which
        advance only the device copy of the lengths, it is that copy (a tensor, as StaticCache's): generate() builds
        each step's mask outside the compiled step, and reading the length back would wait for the GPU there."""
        if layer_idx < len(self.layers) and self.layers[layer_idx].store._host_stale:
            return self.layers[layer_idx].store._state[0]
        return super().get_query_offset(layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def save(self, path) -> None:
        """Write the cache in its 4-bit form to one safetensors file (only the pages in use, the window, the
        centering vectors, the lengths, the configuration and a fingerprint of the model's shape).
        See `saw_kvcache.serialization` and docs/serialization.md."""
        from ..serialization import save_cache

        save_cache(self, path)

    @classmethod
    def load(cls, path, device=None, model=None, *, backend: Optional[str] = None) -> "SawInt4Cache":
        """A new cache holding what `save` wrote to `path`, ready to continue generating.

        Args:
            device: where to put it (default: the device it was saved from if it exists here, else the CPU).
            model: if given, raise CacheMismatchError unless the file was saved from a model of this shape
                (layers, KV heads, head dim, dtype).
            backend: overrides the saved configuration's backend.

        A truncated, corrupted or otherwise unloadable file raises CacheFileError (a ValueError) naming the problem,
        before anything is built."""
        from ..serialization import load_cache

        return load_cache(path, device=device, model=model, backend=backend)

    def memory_footprint(self) -> int:
        """Bytes of KV storage the cache holds now: INT4 pages in use (with their scales and offsets), the
        full-precision window and the centering vectors, summed over layers."""
        return sum(layer.store.memory_footprint() for layer in self.layers)

    def reserved_bytes(self) -> int:
        """Bytes allocated for KV storage, free pages of the pools included."""
        return sum(layer.store.reserved_bytes() for layer in self.layers)

    @property
    def batch_size(self) -> int:
        sizes = {layer.store.batch_size for layer in self.layers if layer.store.batch_size is not None}
        return sizes.pop() if len(sizes) == 1 else -1


def _check_capacity(max_batch_size, max_cache_len) -> tuple[Optional[int], Optional[int]]:
    if max_batch_size is None and max_cache_len is None:
        return None, None
    for name, value in (("max_batch_size", max_batch_size), ("max_cache_len", max_cache_len)):
        if value is None:
            other = "max_cache_len" if name == "max_batch_size" else "max_batch_size"
            raise ValueError(
                f"SawInt4Cache: the static mode needs both max_batch_size and max_cache_len; {other} was given "
                f"but not {name}. Fix: SawInt4Cache(max_batch_size=..., max_cache_len=...), or neither for the "
                "dynamic mode."
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SawInt4Cache: {name} must be a positive integer, got {value!r}.")
    return max_batch_size, max_cache_len
