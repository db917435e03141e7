"""Paged INT4 storage of one attention layer, independent of transformers.

Every sequence of the batch has the same length (transformers pads on the left), so one length and one count of
quantized tokens serve the whole batch. Position p of sequence b lives:
  * in the INT4 pages when p < num_paged: page block_table[b, p // P], slot p % P;
  * otherwise in the full-precision window (the newest `residual_length` tokens), ring slot p % residual_length.
Pages come from a per-layer pool on the layer's device that grows in chunks; a page freed by crop, reset or a
beam reorder goes back to the free list. Sequences may share pages after a beam reorder; a shared page is copied
before anything is written into it.

Static mode (`max_batch_size` and `max_cache_len` given): the first append allocates the pool for exactly that
capacity (ceil(max_cache_len / P) pages per sequence), a fixed block table (sequence b owns pages
b * pages_per_sequence + j, in order) and the window; nothing is allocated, grown or re-pointed afterwards. A batch
smaller than max_batch_size uses the first rows. A beam reorder copies page contents instead of sharing pages, so
the block table never changes. Appending beyond the capacity raises before anything is written.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import SawInt4Config
from .ops import PagedKV, get_backend, reference
from .ops import compiled as _custom_ops  # noqa: F401  (registers torch.ops.saw_kvcache.*)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The pool grows by at least this fraction of its size, so growth copies are rare (amortized O(1) per token).
POOL_GROWTH = 0.5


# center_keys="auto" decides per head from at most this many tokens of the first forward.
AUTO_SAMPLE_TOKENS = 4096


def _rotate_by_matmul(x: torch.Tensor, block: int) -> torch.Tensor:
    """reference.rotate up to rounding, as one matmul per block (for decisions, not for stored values)."""
    if not block:
        return x
    return (x.reshape(*x.shape[:-1], -1, block) @ reference.hadamard_matrix(block, x.device)).reshape(x.shape)


class PagedKVStore:
    def __init__(
        self, config: SawInt4Config, layer_idx: int, max_batch_size: Optional[int] = None,
        max_cache_len: Optional[int] = None,
    ):
        self.config = config
        self.layer_idx = layer_idx
        if (max_batch_size is None) != (max_cache_len is None):
            raise ValueError("PagedKVStore: give both max_batch_size and max_cache_len (static mode) or neither.")
        self.max_batch_size, self.max_cache_len = max_batch_size, max_cache_len
        self.static = max_cache_len is not None
        self.pages_per_sequence = math.ceil(max_cache_len / config.page_size) if self.static else None
        self.pool: Optional[PagedKV] = None
        self.free_pages: list[int] = []
        # Static mode: the full-capacity block table (host and device) and window buffers, allocated once.
        self._static_table_host: Optional[torch.Tensor] = None
        self._static_table: Optional[torch.Tensor] = None
        self._static_window: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # Static mode: [length, num_paged, 0] on the device (the last: scratch of the Triton write kernel), mirrored
        # by the host numbers below; a decode step under torch.compile advances only the device copy and marks the
        # host copy stale (read back when next needed).
        self._state: Optional[torch.Tensor] = None
        self._host_stale = False
        self._length = self._num_paged = 0
        self._pending = None
        self.reset()

    # ---------------------------------------------------------------------------------------------- bookkeeping

    def reset(self) -> None:
        """Forget every token; the pool stays allocated and all its pages become free."""
        self._host_stale = False  # everything is forgotten: nothing to read back
        self._pending = None
        self.length = 0
        self.num_paged = 0
        self.batch_size: Optional[int] = None
        self.block_table_host = torch.zeros(0, 0, dtype=torch.int32)
        self.block_table: Optional[torch.Tensor] = None
        self.window_key = self.window_value = None
        self.key_mean = self.value_mean = None
        self.may_share = False
        self.origin: Optional[str] = None  # "loaded from <file>" for a cache rebuilt by load_state
        if self.pool is not None and not self.static:
            self.free_pages = list(range(self.pool.k_codes.shape[0] - 1, -1, -1))

    def _pull_state(self) -> None:
        self._write_pending()  # a deferred append on the device advances the lengths there
        self._length, self._num_paged = self._state[:2].tolist()
        self._host_stale = False

    def _mirrored(index: int, attribute: str, doc: str):  # noqa: N805  (builds the two properties below)
        """A number kept on the host and, in static mode, in `_state[index]` on the device: setting it sets both;
        reading it after compiled steps (which advance only the device copy) reads the device once."""

        def get(store: "PagedKVStore") -> int:
            if store._host_stale:
                store._pull_state()
            return getattr(store, attribute)

        def set_(store: "PagedKVStore", value: int) -> None:
            if store._host_stale:
                store._pull_state()
            setattr(store, attribute, value)
            if store._state is not None:
                store._state[index].fill_(value)

        return property(get, set_, doc=doc)

    length = _mirrored(0, "_length", "Tokens per sequence.")
    num_paged = _mirrored(1, "_num_paged", "Positions [0, num_paged) of every sequence are in the INT4 pages, the rest "
                                           "in the window.")
    del _mirrored

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def columns_used(self) -> int:
        return math.ceil(self.num_paged / self.page_size)

    def _check_input(self, key: torch.Tensor, value: torch.Tensor) -> None:
        if (
            self.batch_size is not None
            and key.dim() == 4
            and key.shape == value.shape
            and key.shape[0] == self.batch_size
            and key.shape[1] == self.num_heads
            and key.shape[3] == self.head_dim
            and key.dtype == self.dtype
            and value.dtype == self.dtype
            and key.device == self.device
        ):  # the decode-step fast path: same shapes as the cached tokens, which were already validated
            if self.static and self.length + key.shape[2] > self.max_cache_len:
                self._raise_capacity(key.shape[0], key.shape[2])
            return
        where = f"SawInt4Cache layer {self.layer_idx}"
        if key.dim() != 4 or value.dim() != 4:
            raise ValueError(f"{where}: expected key/value states [batch, kv_heads, tokens, head_dim], got {tuple(key.shape)}")
        if key.shape != value.shape:
            raise ValueError(
                f"{where}: keys {tuple(key.shape)} and values {tuple(value.shape)} must have the same shape "
                "(models whose value head dim differs from the key head dim are not supported)."
            )
        if key.dtype not in SUPPORTED_DTYPES or value.dtype != key.dtype:
            raise ValueError(f"{where}: key/value dtype must be one of float32, float16, bfloat16 (and equal), got {key.dtype}/{value.dtype}.")
        if self.batch_size is not None:
            loaded = (
                f" This cache was {self.origin}; is this the model (and device) it was saved from? "
                "saw_kvcache.serialization.check_compatible(cache, model) compares the two."
                if self.origin else ""
            )
            if key.shape[0] != self.batch_size:
                raise ValueError(
                    f"{where}: batch size changed from {self.batch_size} to {key.shape[0]} on a non-empty cache. "
                    "Call cache.reset() (or use a new SawInt4Cache) before running a different batch." + loaded
                )
            if key.device != self.device:
                raise ValueError(
                    f"{where}: the cache holds tensors on {self.device} but got states on {key.device}. "
                    + ("Load it with SawInt4Cache.load(path, device=...) on the model's device." + loaded if self.origin
                       else "Call cache.reset() before moving the model to another device.")
                )
            if key.dtype != self.dtype or key.shape[1] != self.num_heads or key.shape[3] != self.head_dim:
                raise ValueError(
                    f"{where}: states {tuple(key.shape)} {key.dtype} do not match the cached "
                    f"[{self.batch_size}, {self.num_heads}, *, {self.head_dim}] {self.dtype}. "
                    + (loaded.strip() if self.origin else "Call cache.reset() first.")
                )
        d, block = key.shape[-1], self.config.hadamard_block
        if d % 2:
            raise ValueError(f"{where}: head dim {d} is odd; INT4 packs two values per byte. This model needs an even head dim.")
        if block and d % block:
            divisors = [b for b in (2, 4, 8, 16, 32, 64, 128, 256) if d % b == 0 and b <= d]
            raise ValueError(
                f"{where}: head dim {d} is not divisible by hadamard_block={block}. "
                f"Fix: SawInt4Cache(hadamard_block=...) with one of {divisors}, or 0 for no rotation."
            )
        if self.static and (key.shape[0] > self.max_batch_size or self.length + key.shape[2] > self.max_cache_len):
            self._raise_capacity(key.shape[0], key.shape[2])

    def _raise_capacity(self, batch: int, new_tokens: int) -> None:
        where = f"SawInt4Cache layer {self.layer_idx}"
        mb, ml = self.max_batch_size, self.max_cache_len
        if batch > mb:
            raise ValueError(
                f"{where}: a batch of {batch} sequences does not fit this static cache (max_batch_size={mb}). "
                f"Fix: SawInt4Cache(max_batch_size={batch}, max_cache_len={ml}) or larger (generate() runs "
                "prompts x num_beams x num_return_sequences sequences), or a smaller batch."
            )
        total = self.length + new_tokens
        raise ValueError(
            f"{where}: {self.length} cached + {new_tokens} new tokens = {total} tokens exceed this static cache's "
            f"max_cache_len={ml}. Fix: SawInt4Cache(max_batch_size={mb}, max_cache_len={total}) or larger "
            "(generate() needs prompt length + max_new_tokens), or a shorter prompt / fewer new tokens, "
            "or crop the cache first."
        )

    def _start(self, key: torch.Tensor) -> None:
        b, h, _, d = key.shape
        if self.static:
            self._start_static(key)
        self.batch_size, self.num_heads, self.head_dim = b, h, d
        self.device, self.dtype = key.device, key.dtype
        self.backend = get_backend(self.config.backend, key.device, head_dim=d)
        if self.static:
            self._use_static_rows(b)
            return
        pool = self.pool
        if pool is not None and (
            pool.k_codes.device != key.device
            or pool.k_meta.dtype != key.dtype
            or pool.k_codes.shape[1] != h
            or pool.k_codes.shape[3] * 2 != d
        ):
            self.pool, self.free_pages = None, []
        self.block_table_host = torch.zeros(b, 0, dtype=torch.int32)
        self.block_table = torch.zeros(b, 0, dtype=torch.int32, device=key.device)
        r = self.config.residual_length
        if r:
            self.window_key = torch.zeros(b, h, r, d, dtype=key.dtype, device=key.device)
            self.window_value = torch.zeros_like(self.window_key)

    def _start_static(self, key: torch.Tensor) -> None:
        """Allocate the whole capacity on the first use; afterwards only check that the model still matches."""
        _, h, _, d = key.shape
        if self.pool is not None:
            pool = self.pool
            if pool.k_codes.device != key.device or pool.k_meta.dtype != key.dtype or pool.k_codes.shape[1] != h or pool.k_codes.shape[3] * 2 != d:
                raise ValueError(
                    f"SawInt4Cache layer {self.layer_idx}: this static cache was allocated for {pool.k_codes.shape[1]} "
                    f"KV heads of dim {pool.k_codes.shape[3] * 2} in {pool.k_meta.dtype} on {pool.k_codes.device}, "
                    f"but got states of {h} heads of dim {d} in {key.dtype} on {key.device}. A static cache never "
                    "reallocates: use a new SawInt4Cache(max_batch_size=..., max_cache_len=...) for this model/device."
                )
            return
        mb, pps, p = self.max_batch_size, self.pages_per_sequence, self.page_size
        kw = dict(device=key.device)
        n = mb * pps
        self.pool = reference.allocate_pool(n, h, p, d, key.dtype, key.device)
        self.free_pages = []
        self._static_table_host = torch.arange(n, dtype=torch.int32).view(mb, pps)
        self._static_table = self._static_table_host.to(key.device)
        r = self.config.residual_length
        if r:
            window = torch.zeros(mb, h, r, d, dtype=key.dtype, **kw)
            self._static_window = (window, torch.zeros_like(window))
        self._state = torch.tensor([self._length, self._num_paged, 0], dtype=torch.int32, device=key.device)
        # Fixed addresses: CUDA graphs (torch.compile "reduce-overhead") read and update these in place instead of
        # copying them into graph-owned buffers at every replay.
        for tensor in (*self.pool, self._static_table, *(self._static_window or ()), self._state):
            torch._dynamo.mark_static_address(tensor)

    def _select_static(self, indices: torch.Tensor) -> None:
        """Beam reorder / repeat / select in static mode: copy the used pages and the window rows in place (the
        block table stays fixed). No host sync: the indices stay on the device."""
        new_b = indices.numel()
        if new_b > self.max_batch_size:
            self._raise_capacity(new_b, 0)
        idx = indices.detach().to(self.device, torch.long)
        old_b, columns = self.batch_size, self.columns_used
        if columns:
            for t in self.pool:
                per_sequence = t.view(self.max_batch_size, self.pages_per_sequence, *t.shape[1:])
                per_sequence[:new_b, :columns] = per_sequence[:old_b, :columns].index_select(0, idx)
        if self._static_window is not None:
            for w in self._static_window:
                w[:new_b] = w[:old_b].index_select(0, idx)
        self.batch_size = new_b
        self._use_static_rows(new_b)

    def _use_static_rows(self, batch: int) -> None:
        """The first `batch` rows of the static block table and window; the views are marked as fixed addresses
        too (CUDA graphs check the tensors a step reads, views included, not the buffers they view)."""
        self.block_table_host = self._static_table_host[:batch]
        self.block_table = self._static_table[:batch]
        views = [self.block_table]
        if self._static_window is not None:
            self.window_key, self.window_value = (w[:batch] for w in self._static_window)
            views += [self.window_key, self.window_value]
        for view in views:
            torch._dynamo.mark_static_address(view)

    def _grow_pool(self, needed: int) -> None:
        h, p, d = self.num_heads, self.page_size, self.head_dim
        # The smallest buffer: after a growth that ran out of memory part-way, the others are already larger.
        old = min(t.shape[0] for t in self.pool) if self.pool is not None else 0
        new = old + max(needed - len(self.free_pages), int(old * POOL_GROWTH), 1)
        parts = list(self.pool) if self.pool is not None else [None] * 4
        self.pool = None
        try:
            # One buffer at a time, each old one released as soon as it is copied: the growth's peak is the old
            # pool plus one new buffer, not the old pool plus the whole new one (more sequences fit in memory).
            for i, (shape, dtype) in enumerate(reference.page_layout(h, p, d, self.dtype)):
                grown = torch.empty(new, *shape, dtype=dtype, device=self.device)
                if old:
                    grown[:old].copy_(parts[i][:old])
                parts[i] = grown
        finally:  # after an out-of-memory error the pages [0, old) stay valid in every buffer
            if all(part is not None for part in parts):
                self.pool = PagedKV(*parts)
        self.free_pages = list(range(new - 1, old - 1, -1)) + self.free_pages

    def _take_pages(self, count: int) -> list[int]:
        if len(self.free_pages) < count:
            self._grow_pool(count)
        taken = self.free_pages[-count:]
        del self.free_pages[-count:]
        return taken

    def _set_columns(self, first: int, columns: torch.Tensor) -> None:
        """Write host block-table columns [first, first + k) and mirror them on the device."""
        stop = first + columns.shape[1]
        if stop > self.block_table_host.shape[1]:
            cap = max(stop, int(self.block_table_host.shape[1] * (1 + POOL_GROWTH)))
            grown = torch.zeros(self.batch_size, cap, dtype=torch.int32)
            grown[:, : self.block_table_host.shape[1]] = self.block_table_host
            self.block_table_host = grown
            self.block_table = self._to_device(grown)
        self.block_table_host[:, first:stop] = columns
        self.block_table[:, first:stop].copy_(self._staged(columns), non_blocking=True)

    def _staged(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor ready for a copy to the device that does not wait for the GPU: a pinned copy on CUDA
        (a pageable copy makes the host wait until the GPU has finished all queued work)."""
        return host.pin_memory() if self.device.type == "cuda" else host

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return self._staged(host).to(self.device, non_blocking=True)

    def _reserve(self, paged: int, num_tokens: int) -> None:
        """Pages hold [0, paged): give every sequence pages for positions [0, num_tokens), and make the page written
        next private (after a beam reorder)."""
        have, need = -(-paged // self.page_size), -(-num_tokens // self.page_size)
        if self.static or not (need > have or self.may_share):  # static: assigned up front, never shared
            return
        if self.may_share and paged % self.page_size:
            self._unshare_column(have - 1)
        if need > have:
            ids = self._take_pages(self.batch_size * (need - have))
            self._set_columns(have, torch.tensor(ids, dtype=torch.int32).view(self.batch_size, need - have))

    def _unshare_column(self, column: int) -> None:
        ids = self.block_table_host[:, column]
        if torch.unique(ids).numel() == ids.numel():
            return
        seen: set[int] = set()
        new_ids = ids.clone()
        for row, page in enumerate(ids.tolist()):
            if page in seen:
                (fresh,) = self._take_pages(1)
                for tensor in self.pool:
                    tensor[fresh].copy_(tensor[page])
                new_ids[row] = fresh
            seen.add(page)
        self._set_columns(column, new_ids[:, None])

    def _release_columns(self, first: int) -> None:
        if self.static:  # pages stay with their sequence; later appends overwrite them
            return
        used = self.block_table_host[:, first : self.columns_used]
        if used.numel():
            self.free_pages.extend(torch.unique(used).tolist())

    # ---------------------------------------------------------------------------------------------- centering

    def _estimate_means(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key_mean = self._mean_for(key, self.config.center_keys, self.config.hadamard_block)
        v_block = self.config.hadamard_block if self.config.rotate_values else 0
        self.value_mean = self._mean_for(value, self.config.center_values, v_block)
        if self.static:
            for mean in (self.key_mean, self.value_mean):
                if mean is not None:
                    torch._dynamo.mark_static_address(mean)

    @staticmethod
    def _mean_for(x: torch.Tensor, mode, block: int) -> Optional[torch.Tensor]:
        """Per-KV-head mean [H, D] of the first forward's tokens; with "auto", zero for the heads where centering
        does not at least halve the mean per-token range of the rotated vectors (ranges averaged over at most
        AUTO_SAMPLE_TOKENS evenly spaced tokens)."""
        if mode is False:
            return None
        xf = x.float()
        mean = xf.mean(dim=(0, 2))
        if mode == "auto":
            # A long prompt's first forward would otherwise spend more time here than in its write kernel: the
            # ranges come from a sample of tokens, rotated by one matmul (centered = rotated - rotated mean).
            step = -(-x.shape[2] // AUTO_SAMPLE_TOKENS)
            rotated = _rotate_by_matmul(xf[:, :, ::step], block)
            centered = rotated - _rotate_by_matmul(mean, block)[None, :, None, :]
            span = lambda y: (y.amax(-1) - y.amin(-1)).mean(dim=(0, 2))  # noqa: E731
            keep = span(centered) <= 0.5 * span(rotated)
            if not bool(keep.any()):
                return None
            mean = mean * keep[:, None]
        return mean

    # ---------------------------------------------------------------------------------------------- tokens

    def append(self, key: torch.Tensor, value: torch.Tensor, defer: bool = False) -> int:
        """Store key/value [B, H, n, D] after the cached tokens. Returns the length before the call.

        defer: the next call is `attend` of this chunk (the saw_int4 attention of a decode step): a one-token
        append is then done by the attention's launch (one kernel per layer and step on the Triton backend). The
        lengths count the token at once; anything else that reads or changes the storage first writes it."""
        self._write_pending()
        self._check_input(key, value)
        if self.batch_size is None:
            self._start(key)
        n = key.shape[2]
        past = self.length
        if n == 0:
            return past
        if self.key_mean is None and self.value_mean is None and past == 0 and self.num_paged == 0:
            self._estimate_means(key, value)
        new_length = past + n
        paged = self.num_paged
        new_paged = max(paged, new_length - self.config.residual_length)
        if new_paged > paged:
            self._reserve(paged, new_paged)
        self._pending = (key, value, paged, past)
        if not (defer and n == 1 and past):
            self._write_pending()
        self.num_paged = new_paged
        self.length = new_length
        return past

    def _write_pending(self) -> None:
        """The deferred append (see `append`), if any, as its own launch: tokens leaving the window (or, without
        one, all of them) go to the pages, the newest into the window's ring (one launch for a decode step on the
        Triton backend)."""
        if self._pending is None:
            return
        (key, value, paged, length), self._pending = self._pending, None
        if paged is None:
            self._write_pending_on_device(key, value)
            return
        self.backend.append_with_window(
            self.pool, self.block_table, length, paged, self.window_key, self.window_value, key, value,
            self.key_mean, self.value_mean, self.config.hadamard_block, self.config.rotate_values,
        )

    # ---------------------------------------------------------------------------------- static decode, on the device
    # The same results as append/attend, with the lengths read on the device (`_state`): what a decode step under
    # torch.compile runs (custom ops, no Python number that changes between steps), and eager static steps too.

    def append_on_device(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """append() for a static store that already holds this batch's tokens. The next call is attend_on_device
        of this chunk (the layer's saw_int4 attention), whose launch does the append: it is deferred to that call
        (anything else that reads or changes the storage first writes it)."""
        self._write_pending()
        n = key.shape[2]
        if (key.shape != (self.batch_size, self.num_heads, n, self.head_dim) or key.dtype != self.dtype
                or key.device != self.device or value.shape != key.shape or value.dtype != key.dtype
                or value.device != key.device):
            self._check_input(key, value)  # raises with the reason, except for the last one:
            raise ValueError(f"SawInt4Cache layer {self.layer_idx}: keys on {key.device} but values on {value.device}")
        if torch.compiler.is_compiling():
            # No host check of the capacity without a sync: a device-side assert instead (generate() checks first).
            torch._assert_async(self._state[0] <= self.max_cache_len - n)
            self._host_stale = True
        else:
            if self.length + n > self.max_cache_len:
                self._raise_capacity(key.shape[0], n)
            self._length += n
            self._num_paged = max(self._num_paged, self._length - self.config.residual_length)
        self._pending = (key, value, None, None)  # no host lengths: `state` on the device does not count it yet

    def _write_pending_on_device(self, key: torch.Tensor, value: torch.Tensor) -> None:
        rest = (self.block_table, self._state, self.window_key, self.window_value, key, value, self.key_mean,
                self.value_mean, self.config.hadamard_block, self.config.rotate_values)
        if torch.compiler.is_compiling():
            torch.ops.saw_kvcache.append_from_state(self.backend.name, *self.pool, *rest)
        else:
            self.backend.append_from_state(self.pool, *rest)

    def attend_on_device(self, query, chunk_key, chunk_value, mask, scaling, softcap=None, sinks=None):
        """attend() right after append_on_device of this chunk: the append and the attention in one call."""
        pending = self._pending
        append = pending is not None and pending[2] is None and pending[0] is chunk_key and pending[1] is chunk_value
        if append:
            self._pending = None
        else:
            self._write_pending()
        cached = (self.window_key, self.window_value, chunk_key, chunk_value, mask, scaling, softcap, sinks,
                  self.key_mean, self.value_mean, self.config.hadamard_block, self.config.rotate_values)
        if torch.compiler.is_compiling():
            op = torch.ops.saw_kvcache.append_attention_from_state if append else torch.ops.saw_kvcache.attention_from_state
            return op(self.backend.name, query, *self.pool, self.block_table, self._state, self.max_cache_len, *cached)
        return self.backend.paged_attention(query, self.pool, self.block_table, self.max_cache_len, *cached,
                                            state=self._state, append=append)

    def _window(self, start: int, stop: int):
        """Full-precision keys/values of positions [start, stop) (all in the window), in position order."""
        if stop <= start:
            return None
        return tuple(reference.ring_tokens(window, start, stop) for window in (self.window_key, self.window_value))

    def attend(self, query, chunk_key, chunk_value, past_length: int, mask, scaling, softcap=None, sinks=None):
        """Attention of query [B, Hq, nq, D] over the tokens cached before position `past_length` plus the
        full-precision current chunk (positions [past_length, past_length + n)). Returns [B, nq, Hq, D]."""
        pending, append_from = self._pending, None
        if pending is not None:
            if pending[0] is chunk_key and pending[1] is chunk_value and pending[3] == past_length:
                self._pending, append_from = None, pending[2]  # the attention's launch appends it
            else:
                self._write_pending()
        pages_end = min(self.num_paged, past_length)
        r = self.config.residual_length
        in_window = past_length - pages_end
        total = past_length + chunk_key.shape[2]
        if mask is not None and mask.shape[-1] > total:  # static mode: masks span max_cache_len positions
            mask = mask[..., :total]
        # The window goes as its ring buffer (slot = position % r), read in place: no reordered copy per step.
        window = in_window or append_from is not None
        return self.backend.paged_attention(
            query, self.pool, self.block_table, pages_end,
            self.window_key if window else None, self.window_value if window else None,
            chunk_key, chunk_value, mask, scaling, softcap, sinks, self.key_mean, self.value_mean,
            self.config.hadamard_block, self.config.rotate_values,
            window_start=pages_end % r if r else 0, window_length=in_window, append_from=append_from,
        )

    def dequantize(self, stop: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, stop) in the model's frame and dtype: [B, H, stop, D]."""
        self._write_pending()
        stop = self.length if stop is None else stop
        pages_end = min(self.num_paged, stop)
        keys, values = self.backend.dequantize_pages(
            self.pool, self.block_table, pages_end, self.key_mean, self.value_mean,
            self.config.hadamard_block, self.config.rotate_values, self.dtype,
        ) if pages_end else (None, None)
        window = self._window(pages_end, stop)
        parts = [p for p in ((keys, values), window) if p is not None and p[0] is not None]
        if not parts:
            empty = torch.empty(self.batch_size, self.num_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
            return empty, empty
        return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)

    # ---------------------------------------------------------------------------------------------- edits

    def crop(self, new_length: int) -> None:
        """Keep positions [0, new_length)."""
        self._write_pending()
        if new_length >= self.length:
            return
        new_length = max(new_length, 0)
        if new_length < self.num_paged:
            keep_columns = math.ceil(new_length / self.page_size)
            self._release_columns(keep_columns)
            self.num_paged = new_length
        self.length = new_length

    def select(self, indices: torch.Tensor) -> None:
        """Make sequence i a copy of old sequence indices[i] (beam reorder, repeat, select). Pages are shared."""
        self._write_pending()
        if self.batch_size is None:
            return
        if self.static:
            self._select_static(indices)
            return
        idx = indices.detach().to("cpu", torch.long)
        used = self.block_table_host[:, : self.columns_used]
        new = used[idx]
        if used.numel():
            old_pages = torch.unique(used)
            self.free_pages.extend(old_pages[~torch.isin(old_pages, new)].tolist())
        self.batch_size = idx.numel()
        self.block_table_host = torch.zeros(self.batch_size, 0, dtype=torch.int32)
        self.block_table = torch.zeros(self.batch_size, 0, dtype=torch.int32, device=self.device)
        if new.numel():
            self._set_columns(0, new)
        if self.window_key is not None:
            dev_idx = idx.to(self.device)
            self.window_key = self.window_key.index_select(0, dev_idx)
            self.window_value = self.window_value.index_select(0, dev_idx)
        self.may_share = True

    # ---------------------------------------------------------------------------------------------- state

    def export_state(self) -> dict:
        """The stored tokens, independent of how the pool numbers its pages (for saving to a file).

        Returns a dict, tensors on the store's device:
          * scalars ``length``, ``num_paged``, ``batch_size``, ``num_heads``, ``head_dim``, ``dtype``, ``device``;
          * ``pages``: a PagedKV of the pages in use in block-table order, key codes [B, n_columns, H, P, D/2],
            value codes [B, n_columns, H, D, P/2] (token-major) and meta [B, n_columns, H, P, 2]; a page shared by
            several sequences (after a beam reorder) appears once per sequence; slots at or after ``num_paged``
            (stale or never written) are zero;
          * ``window_key``/``window_value``: positions [num_paged, length) in position order, [B, H, n, D]
            (None when residual_length is 0);
          * ``key_mean``/``value_mean``: [H, D] float32 or None.
        """
        if self.batch_size is None:
            raise ValueError(f"SawInt4Cache layer {self.layer_idx} holds no tokens (never used, or reset).")
        self._write_pending()
        columns = self.columns_used
        pages = None
        if columns:
            ids = self.block_table_host[:, :columns].long().to(self.device)
            pages = PagedKV(*(t[ids] for t in self.pool))  # advanced indexing copies
            tail = self.num_paged - (columns - 1) * self.page_size
            if tail < self.page_size:
                for t in (pages.k_codes, pages.k_meta, pages.v_meta):
                    t[:, -1, :, tail:] = 0
                rows = reference.transpose_nibbles(pages.v_codes[:, -1])  # token-major values as token rows
                rows[:, :, tail:] = 0
                pages.v_codes[:, -1] = reference.transpose_nibbles(rows)
        else:
            empty = reference.allocate_pool(0, self.num_heads, self.page_size, self.head_dim, self.dtype, self.device)
            pages = PagedKV(*(t.view(self.batch_size, 0, *t.shape[1:]) for t in empty))
        window = None
        if self.config.residual_length:
            window = self._window(self.num_paged, self.length)
            if window is None:
                empty = torch.zeros(self.batch_size, self.num_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
                window = (empty, empty.clone())
            window = (window[0].clone(), window[1].clone())
        return dict(
            length=self.length, num_paged=self.num_paged, batch_size=self.batch_size, num_heads=self.num_heads,
            head_dim=self.head_dim, dtype=self.dtype, device=self.device, pages=pages,
            window_key=None if window is None else window[0], window_value=None if window is None else window[1],
            key_mean=self.key_mean, value_mean=self.value_mean,
        )

    def load_state(self, state: dict, device: torch.device, origin: Optional[str] = None) -> None:
        """Fill this (empty) store from `export_state`'s dict, moving every tensor to `device`: a fresh pool holding
        exactly the saved pages (block table = arange), the window ring refilled so that slot = position % R, the
        centering vectors. The caller validates shapes first. `origin` ("loaded from <file>") goes into the
        messages of later shape errors."""
        if self.static:
            raise ValueError("PagedKVStore.load_state fills a dynamic store; SawInt4Cache.load builds one.")
        device = torch.device(device)
        b, h, d = state["batch_size"], state["num_heads"], state["head_dim"]
        length, num_paged = state["length"], state["num_paged"]
        dtype, p, r = state["dtype"], self.page_size, self.config.residual_length
        self.reset()
        self.pool, self.free_pages = None, []
        self.batch_size, self.num_heads, self.head_dim = b, h, d
        self.device, self.dtype = device, dtype
        self.backend = get_backend(self.config.backend, device, head_dim=d)
        self.block_table_host = torch.zeros(b, 0, dtype=torch.int32)
        self.block_table = torch.zeros(b, 0, dtype=torch.int32, device=device)
        pages = state["pages"]
        columns = pages.k_codes.shape[1]
        if columns:
            self.pool = PagedKV(*(t.to(device).reshape(b * columns, *t.shape[2:]).contiguous() for t in pages))
            self._set_columns(0, torch.arange(b * columns, dtype=torch.int32).view(b, columns))
        if r:
            self.window_key = torch.zeros(b, h, r, d, dtype=dtype, device=device)
            self.window_value = torch.zeros_like(self.window_key)
            if length > num_paged:
                slots = torch.arange(num_paged, length, device=device) % r
                self.window_key[:, :, slots] = state["window_key"].to(device)
                self.window_value[:, :, slots] = state["window_value"].to(device)
        mean = lambda t: None if t is None else t.to(device, torch.float32).contiguous()  # noqa: E731
        self.key_mean, self.value_mean = mean(state["key_mean"]), mean(state["value_mean"])
        self.length, self.num_paged = length, num_paged
        self.origin = origin

    # ---------------------------------------------------------------------------------------------- memory

    def page_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.pool) if self.pool is not None else 0

    def pages_in_use(self) -> int:
        used = self.block_table_host[:, : self.columns_used]
        return torch.unique(used).numel() if self.may_share else used.numel()

    def memory_footprint(self) -> int:
        """Bytes of the pages in use, the window and the centering vectors."""
        total = self.pages_in_use() * self.page_bytes()
        for t in (self.window_key, self.window_value, self.key_mean, self.value_mean):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def reserved_bytes(self) -> int:
        """Bytes of the whole pool, free pages included, plus the window."""
        pool = sum(t.numel() * t.element_size() for t in self.pool) if self.pool is not None else 0
        return pool + self.memory_footprint() - self.pages_in_use() * self.page_bytes()
