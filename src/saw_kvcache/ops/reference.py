"""Pure-PyTorch reference implementation of every SAW-INT4 operation.

These functions are the specification: the torch backend runs them on any device, and the Triton kernels are
tested against them. Shapes use B (batch), H (KV heads), Hq (query heads), D (head dim), P (page size).

Storage format, per token and per KV head:
  * optional centering: subtract a per-head mean vector (fp32) before rotating;
  * optional block-diagonal normalized Hadamard rotation (Sylvester H_b / sqrt(b) on blocks of b channels),
    rounded back to the model dtype;
  * asymmetric min-max INT4 over the whole head dim: code = floor((x - offset) / scale + 1/2) clamped to [0, 15],
    offset = min(x), scale = (max(x) - min(x)) / 15 rounded up to the model dtype, so that dequantized values
    never leave [min, max + scale/2]; two codes per byte, even channel in the low nibble.
  * scale and offset are stored in the model dtype: 4 bytes per token-head for bf16/fp16 (68 bytes at D=128),
    8 for fp32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

# Tokens of cache read per step of the chunked attention: bounds the extra memory of the torch path.
ATTENTION_CHUNK_TOKENS = 1024
QUERY_BLOCK = 1024


class PagedKV(NamedTuple):
    """One layer's page pool, meta [N, H, P, 2] (scale, offset) in the model dtype. Key codes are uint8
    [N, H, P, D/2], byte i of a token holding dims 2i (low nibble) and 2i + 1. Value codes are stored token-major,
    uint8 [N, H, D, P/2], byte j of a dim holding tokens 2j (low nibble) and 2j + 1: p @ V reduces over tokens, and
    int8 tensor-core operands need the reduction dim contiguous (docs/design.md)."""

    k_codes: torch.Tensor
    k_meta: torch.Tensor
    v_codes: torch.Tensor
    v_meta: torch.Tensor


def page_layout(heads: int, page_size: int, head_dim: int, dtype: torch.dtype) -> tuple:
    """(shape, dtype) of one page of each of (k_codes, k_meta, v_codes, v_meta), as PagedKV describes them."""
    meta = ((heads, page_size, 2), dtype)
    key_codes = ((heads, page_size, head_dim // 2), torch.uint8)
    value_codes = ((heads, head_dim, page_size // 2), torch.uint8)
    return key_codes, meta, value_codes, meta


def allocate_pool(num_pages: int, heads: int, page_size: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu", code_fill: Optional[int] = None,
                  meta_fill: Optional[float] = None) -> PagedKV:
    """A page pool of the shapes PagedKV describes: uninitialized, or filled with code_fill / meta_fill."""
    def make(shape, tensor_dtype, fill):
        if fill is None:
            return torch.empty((num_pages, *shape), dtype=tensor_dtype, device=device)
        return torch.full((num_pages, *shape), fill, dtype=tensor_dtype, device=device)

    return PagedKV(*(make(shape, tensor_dtype, fill) for (shape, tensor_dtype), fill in zip(
        page_layout(heads, page_size, head_dim, dtype), (code_fill, meta_fill) * 2)))


# --------------------------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(block)).to(torch.float32)


def hadamard_matrix(block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix H_b / sqrt(b), float32: symmetric, orthogonal and its own inverse.
    One shared (read-only) tensor per block and device: copied to a GPU once, not at every call."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"hadamard block must be a power of two, got {block}")
    return _hadamard_on(block, torch.device(device))


@functools.lru_cache(maxsize=None)
def _hadamard_on(block: int, device: torch.device) -> torch.Tensor:
    return _hadamard_cpu(block).to(device)


@functools.lru_cache(maxsize=None)
def hadamard_scale(block: int) -> float:
    """1/sqrt(block) rounded to float32: the normalization every implementation multiplies by last."""
    return torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32).item()


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal normalized Hadamard rotation of the last dim, in float32: x @ blockdiag(H_b / sqrt(b)).

    Computed as the fast Walsh-Hadamard butterfly (log2(b) rounds of (a + b, a - b) on channel pairs h apart,
    h = 1, 2, ..., b/2), then one multiplication by hadamard_scale(b). The kernels do the same operations in the
    same order, so both give bit-identical results. It is an involution: rotate(rotate(x)) == x up to rounding.
    """
    x = x.float()
    if block == 0:
        return x
    shape, d = x.shape, x.shape[-1]
    h = 1
    while h < block:
        y = x.reshape(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        x = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return x.reshape(shape) * hadamard_scale(block)


# --------------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------------


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max INT4 over the last dim. Returns (codes uint8 [..., D/2], meta [..., 2] in x.dtype)."""
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim must be even to pack two INT4 codes per byte, got {x.shape[-1]}")
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)  # exact in x.dtype: it is one of x's values
    hi = xf.amax(-1, keepdim=True)
    scale_exact = (hi - lo) / 15.0
    scale = scale_exact.to(x.dtype)
    # Round the scale up so that the largest value needs no clamping.
    too_small = scale.float() < scale_exact
    scale = torch.where(too_small, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale_f = scale.float()
    inv_scale = torch.where(scale_f > 0, 1.0 / scale_f, torch.zeros_like(scale_f))
    q = torch.floor((xf - lo) * inv_scale + 0.5).clamp_(0, 15).to(torch.uint8)
    codes = q[..., 0::2] | (q[..., 1::2] << 4)
    meta = torch.cat([scale, lo.to(x.dtype)], dim=-1)
    return codes, meta


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D/2] -> uint8 codes [..., D]."""
    return torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)


def dequantize_int4(codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_int4, in float32: offset + code * scale."""
    meta = meta.float()
    return meta[..., 1:2] + unpack_int4(codes).float() * meta[..., 0:1]


def encode(x: torch.Tensor, mean: Optional[torch.Tensor], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Center (x - mean, mean [H, D]), rotate, round to x.dtype and quantize. x: [B, H, n, D]."""
    y = x.float()
    if mean is not None:
        y = y - mean[None, :, None, :]
    y = rotate(y, block).to(x.dtype)
    return quantize_int4(y)


def decode(codes: torch.Tensor, meta: torch.Tensor, mean: Optional[torch.Tensor], block: int) -> torch.Tensor:
    """Inverse of encode in float32 (up to quantization error). codes [B, H, n, D/2]."""
    y = rotate(dequantize_int4(codes, meta), block)
    if mean is not None:
        y = y + mean[None, :, None, :]
    return y


# --------------------------------------------------------------------------------------------------------------
# Paged operations (the twins of the Triton kernels)
# --------------------------------------------------------------------------------------------------------------


def transpose_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., R, C/2] of 4-bit codes packed along C (low nibble first) -> [..., C, R/2] packed along R: the
    page layout of values from token rows and back (the operation is its own inverse)."""
    nibbles = torch.stack((codes & 15, codes >> 4), -1).flatten(-2).transpose(-1, -2)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _page_slots(block_table: torch.Tensor, start: int, count: int, page_size: int):
    positions = torch.arange(start, start + count, device=block_table.device)
    pages = block_table[:, positions // page_size].long()  # [B, n]
    return pages, positions % page_size  # slots [n]


def write_pages(
    pool: PagedKV,
    block_table: torch.Tensor,
    start: int,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mean: Optional[torch.Tensor],
    value_mean: Optional[torch.Tensor],
    hadamard_block: int,
    rotate_values: bool,
) -> None:
    """Encode key/value [B, H, n, D] and store them at positions [start, start + n) of each sequence.

    block_table [B, >= ceil((start + n) / P)] int32 holds the page of each sequence's position // P.
    """
    n = key.shape[2]
    if n == 0:
        return
    page_size = pool.k_codes.shape[2]
    pages, slots = _page_slots(block_table, start, n, page_size)
    v_block = hadamard_block if rotate_values else 0
    for codes_pool, meta_pool, x, mean, block, values in (
        (pool.k_codes, pool.k_meta, key, key_mean, hadamard_block, False),
        (pool.v_codes, pool.v_meta, value, value_mean, v_block, True),
    ):
        codes, meta = encode(x, mean, block)
        # Advanced indices around a slice put their dims first: the target is [B, n, H, ...].
        meta_pool[pages, :, slots] = meta.transpose(1, 2).to(meta_pool.dtype)
        if not values:
            codes_pool[pages, :, slots] = codes.transpose(1, 2)
            continue
        # Values: the touched pages as token rows, the new rows written, the pages stored back token-major.
        touched = torch.unique(pages)
        rows = transpose_nibbles(codes_pool[touched])
        rows[torch.searchsorted(touched, pages), :, slots] = codes.transpose(1, 2)
        codes_pool[touched] = transpose_nibbles(rows)


# -------------------------------------------------------------------------------------------------------------
# Lengths on the device (static caches under torch.compile / CUDA graphs)
# -------------------------------------------------------------------------------------------------------------
# A static cache keeps `state` = int32 [length, num_paged, 0] on its device, so that a decode step needs no Python
# number that changes from step to step: the Triton kernels read it, and this reference reads it with .tolist().
# The last element is scratch for the Triton write kernel (zero between calls; attention_lengths ignores it).


def check_state(state: Optional[torch.Tensor], caller: str) -> None:
    """`state` must be the lengths on the device, int32 [length, num_paged, 0]."""
    if state is None or state.shape != (3,):
        raise ValueError(f"{caller}: `state` must be int32 [length, num_paged, 0] (the lengths on the device; the last "
                         "is scratch for the Triton kernels' count of programs), got "
                         f"{None if state is None else tuple(state.shape)}; with lengths on the host, use "
                         "append_with_window or paged_attention(append_from=...)")


def attention_lengths(state: torch.Tensor, chunk_tokens: int, ring: int) -> tuple[int, int, int]:
    """(num_paged, window_start, window_length) of an attention whose chunk of `chunk_tokens` tokens was already
    appended (state counts it): pages hold [0, min(num_paged, past)), the window the rest of the past."""
    length, paged = state[:2].tolist()
    past = length - chunk_tokens
    num_paged = min(paged, past)
    return num_paged, num_paged % ring if ring else 0, past - num_paged


def ring_tokens(window: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Positions [start, stop) of a window ring buffer [B, H, R, D] (slot = position % R), in position order: one
    slice, or two and a cat where the range wraps around."""
    ring, first, count = window.shape[2], start % window.shape[2], stop - start
    if first + count <= ring:
        return window[:, :, first : first + count]
    return torch.cat([window[:, :, first:], window[:, :, : count - (ring - first)]], 2)


def _evicted(window: Optional[torch.Tensor], chunk: torch.Tensor, length: int, paged: int, stop: int):
    """Positions [paged, stop) in order: from the window's ring (positions < length) or from the chunk."""
    parts = [ring_tokens(window, paged, min(stop, length))] if paged < length else []
    if stop > length:
        parts.append(chunk[:, :, max(paged - length, 0) : stop - length])
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def append_with_window(pool, block_table, length: int, num_paged: int, window_key, window_value, key, value,
                       key_mean, value_mean, hadamard_block, rotate_values) -> None:
    """Append key/value [B, H, n, D] to a cache of `length` tokens whose pages hold positions [0, num_paged) and
    whose window (ring buffer [B, H, R, D], slot = position % R; or None) holds the rest: the tokens leaving the
    window are encoded into the pages (positions [num_paged, max(num_paged, length + n - R))), then the chunk's
    newest min(n, R) tokens enter their ring slots. The caller gives pages for the new positions."""
    n = key.shape[2]
    ring = window_key.shape[2] if window_key is not None else 0
    stop = max(num_paged, length + n - ring)
    if stop > num_paged:
        write_pages(pool, block_table, num_paged, _evicted(window_key, key, length, num_paged, stop),
                    _evicted(window_value, value, length, num_paged, stop), key_mean, value_mean, hadamard_block,
                    rotate_values)
    if ring and n:
        kept = min(n, ring)
        for window, x in ((window_key, key), (window_value, value)):
            # Slots (length + j) % R of the newest tokens j: one slice, or two where they wrap around the ring.
            first = (length + n - kept) % ring
            head = min(kept, ring - first)
            window[:, :, first : first + head] = x[:, :, n - kept : n - kept + head]
            window[:, :, : kept - head] = x[:, :, n - kept + head :]


def append_from_state(pool, block_table, state, window_key, window_value, key, value, key_mean, value_mean,
                      hadamard_block, rotate_values) -> None:
    """append_with_window with the lengths read from `state` = [length, num_paged, 0] on the device, which then
    advances to [length + n, max(num_paged, length + n - R), 0]."""
    length, paged = state[:2].tolist()
    append_with_window(pool, block_table, length, paged, window_key, window_value, key, value, key_mean, value_mean,
                       hadamard_block, rotate_values)
    ring = window_key.shape[2] if window_key is not None else 0
    state[0] = length + key.shape[2]
    state[1] = max(paged, length + key.shape[2] - ring)


def _gather_pages(codes_pool, meta_pool, block_table, start: int, stop: int, values: bool = False):
    """Codes and meta of positions [start, stop) (start page-aligned): [B, H, stop - start, ...], the codes packed
    along the head dim (value pages, stored token-major, are transposed back)."""
    page_size = meta_pool.shape[2]
    first, last = start // page_size, (stop + page_size - 1) // page_size
    ids = block_table[:, first:last].long()
    b, n_pages = ids.shape
    pages = transpose_nibbles(codes_pool[ids]) if values else codes_pool[ids]
    codes = pages.permute(0, 2, 1, 3, 4).reshape(b, pages.shape[2], n_pages * page_size, pages.shape[4])
    meta = meta_pool[ids].permute(0, 2, 1, 3, 4).reshape(b, meta_pool.shape[1], n_pages * page_size, 2)
    count = stop - start
    return codes[:, :, :count], meta[:, :, :count]


def dequantize_pages(
    pool: PagedKV,
    block_table: torch.Tensor,
    num_tokens: int,
    key_mean: Optional[torch.Tensor],
    value_mean: Optional[torch.Tensor],
    hadamard_block: int,
    rotate_values: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions [0, num_tokens), back in the model's frame: [B, H, num_tokens, D] in dtype."""
    k_codes, k_meta = _gather_pages(pool.k_codes, pool.k_meta, block_table, 0, num_tokens)
    v_codes, v_meta = _gather_pages(pool.v_codes, pool.v_meta, block_table, 0, num_tokens, values=True)
    keys = decode(k_codes, k_meta, key_mean, hadamard_block)
    values = decode(v_codes, v_meta, value_mean, hadamard_block if rotate_values else 0)
    return keys.to(dtype), values.to(dtype)


class _OnlineSoftmax:
    """Running max, denominator and weighted sum of values for queries [B, H, G, nq]."""

    def __init__(self, shape, head_dim, device):
        self.m = torch.full(shape, float("-inf"), device=device)
        self.l = torch.zeros(shape, device=device)
        self.acc = torch.zeros(*shape, head_dim, device=device)

    def add(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """scores [B, H, G, nq, C] (masked entries -inf), values [B, H, C, D]."""
        m_new = torch.maximum(self.m, scores.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(self.m - m_safe)
        p = torch.exp(scores - m_safe[..., None])
        self.l = self.l * alpha + p.sum(-1)
        b, h, g, nq, c = p.shape
        pv = (p.reshape(b, h, g * nq, c) @ values).reshape(b, h, g, nq, -1)
        self.acc = self.acc * alpha[..., None] + pv
        self.m = m_new

    def add_sink(self, sink_logits: torch.Tensor) -> None:
        """A learned extra logit per query head [H, G] that takes weight but contributes no value."""
        s = sink_logits[None, :, :, None].float()
        m_new = torch.maximum(self.m, s)
        alpha = torch.exp(self.m - m_new)
        self.l = self.l * alpha + torch.exp(s - m_new)
        self.acc = self.acc * alpha[..., None]
        self.m = m_new

    def result(self) -> torch.Tensor:
        l = torch.where(self.l > 0, self.l, torch.ones_like(self.l))
        return self.acc / l[..., None]


def _scores(q, k, scaling, softcap, bias=None):
    """q [B, H, G, nq, D], k [B, H, C, D] -> [B, H, G, nq, C]; bias [B, H, G, nq] is added before scaling."""
    b, h, g, nq, d = q.shape
    s = (q.reshape(b, h, g * nq, d) @ k.transpose(-1, -2)).reshape(b, h, g, nq, -1)
    if bias is not None:
        s = s + bias[..., None]
    s = s * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s


def _apply_mask(scores, mask, q_positions, k_start, k_stop):
    """Mask scores [B, H, G, nq, C] for key positions [k_start, k_stop).

    mask: None (causal, queries at q_positions), bool [B, 1, nq, total] (True = attend) or additive float.
    """
    if mask is None:
        k_positions = torch.arange(k_start, k_stop, device=scores.device)
        allowed = k_positions[None, :] <= q_positions[:, None]
        return scores.masked_fill(~allowed, float("-inf"))
    m = mask[:, :, :, k_start:k_stop].unsqueeze(1)  # [B, 1, 1, nq, C]
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m.float()


def paged_attention(
    query: torch.Tensor,
    pool: Optional[PagedKV],
    block_table: Optional[torch.Tensor],
    num_paged: int,
    window_key: Optional[torch.Tensor],
    window_value: Optional[torch.Tensor],
    chunk_key: Optional[torch.Tensor],
    chunk_value: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    scaling: float,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    key_mean: Optional[torch.Tensor] = None,
    value_mean: Optional[torch.Tensor] = None,
    hadamard_block: int = 0,
    rotate_values: bool = False,
    window_start: int = 0,
    window_length: Optional[int] = None,
    state: Optional[torch.Tensor] = None,
    append_from: Optional[int] = None,
    append: bool = False,
) -> torch.Tensor:
    """Attention of query [B, Hq, nq, D] over, in position order: the INT4 pages (positions [0, num_paged)), the
    full-precision window and the current chunk [B, H, n, D]. Returns [B, nq, Hq, D] in query.dtype.

    With `append_from` (lengths on the host only), the chunk is first appended to the cache, as
    append_with_window(pool, block_table, L, append_from, window_key, window_value, chunk_key, chunk_value, ...)
    with L = num_paged + window_length: the pages held [0, append_from) before the call, and the window is the
    cache's whole ring (slot = position % R). num_paged and the window range describe the cache after the append.
    The Triton backend does a one-token append in the attention's own launch.

    The window [B, H, R, D] may be a ring buffer: its tokens, in position order, are slots (window_start + i) % R
    for i < window_length (default: all R slots from slot 0), so a cache passes its ring as it is.

    With `state` (int32 [length, num_paged, 0] on the device, the chunk already counted; see append_from_state)
    num_paged, window_start and window_length come from it, num_paged given here is only an upper bound (the
    Triton launcher sizes its grid by it), and the mask may be longer than the tokens (a static cache's). With
    `append` too, `state` does not count the chunk yet: it is first appended as append_from_state(pool,
    block_table, state, window_key, window_value, chunk_key, chunk_value, ...) would (the window is the cache's
    whole ring); the Triton backend does a one-token append in the attention's own launch.

    The queries sit at the last nq positions. mask is None (causal) or covers all num_paged + w + n positions.
    Pages are read ATTENTION_CHUNK_TOKENS at a time with an online softmax, so no full-precision copy of the cache
    is ever built. Scores use q·k = rot(q)·rot(k - mean) + q·mean, exactly the model's q·k up to quantization.
    """
    b, hq, nq, d = query.shape
    if append:
        check_state(state, "paged_attention(append=True)")
        append_from_state(pool, block_table, state, window_key, window_value, chunk_key, chunk_value, key_mean,
                          value_mean, hadamard_block, rotate_values)
    if append_from is not None:
        if state is not None:
            raise ValueError("paged_attention: append_from is for lengths on the host; with `state`, pass append=True")
        length = num_paged
        if window_key is not None:
            length += window_key.shape[2] if window_length is None else window_length
        append_with_window(pool, block_table, length, append_from, window_key, window_value, chunk_key, chunk_value,
                           key_mean, value_mean, hadamard_block, rotate_values)
    if state is not None:
        ring = window_key.shape[2] if window_key is not None else 0
        num_paged, window_start, window_length = attention_lengths(state, chunk_key.shape[2], ring)
        if mask is not None:
            mask = mask[..., : num_paged + window_length + chunk_key.shape[2]]
        if not window_length:
            window_key = window_value = None
    if window_key is not None and (window_start or window_length not in (None, window_key.shape[2])):
        ring = window_key.shape[2]
        slots = (window_start + torch.arange(window_length, device=window_key.device)) % ring
        window_key, window_value = window_key[:, :, slots], window_value[:, :, slots]
    parts = [(window_key, window_value), (chunk_key, chunk_value)]
    h = next((k.shape[1] for k, _ in parts if k is not None), None) or pool.k_codes.shape[1]
    g = hq // h
    total = num_paged + sum(k.shape[2] for k, _ in parts if k is not None)
    out = torch.empty(b, nq, hq, d, dtype=query.dtype, device=query.device)
    v_block = hadamard_block if rotate_values else 0
    for q0 in range(0, nq, QUERY_BLOCK):
        q1 = min(nq, q0 + QUERY_BLOCK)
        q = query[:, :, q0:q1].float().reshape(b, h, g, q1 - q0, d)
        q_positions = torch.arange(total - nq + q0, total - nq + q1, device=query.device)
        qmask = None if mask is None else mask[:, :, q0:q1]
        state = _OnlineSoftmax((b, h, g, q1 - q0), d, query.device)
        if num_paged:
            q_rot = rotate(q, hadamard_block)
            bias = None if key_mean is None else torch.einsum("bhgqd,hd->bhgq", q, key_mean.float())
            chunk = max(ATTENTION_CHUNK_TOKENS // pool.k_codes.shape[2], 1) * pool.k_codes.shape[2]
            for start in range(0, num_paged, chunk):
                stop = min(num_paged, start + chunk)
                k_codes, k_meta = _gather_pages(pool.k_codes, pool.k_meta, block_table, start, stop)
                v_codes, v_meta = _gather_pages(pool.v_codes, pool.v_meta, block_table, start, stop, values=True)
                scores = _scores(q_rot, dequantize_int4(k_codes, k_meta), scaling, softcap, bias)
                state.add(_apply_mask(scores, qmask, q_positions, start, stop), dequantize_int4(v_codes, v_meta))
            # Back to the model's frame: sum p (H v + mean) = H (sum p v) + (sum p) mean.
            state.acc = rotate(state.acc, v_block)
            if value_mean is not None:
                state.acc = state.acc + state.l[..., None] * value_mean.float()[None, :, None, None, :]
        start = num_paged
        for keys, values in parts:
            if keys is None or keys.shape[2] == 0:
                continue
            stop = start + keys.shape[2]
            scores = _scores(q, keys.float(), scaling, softcap)
            state.add(_apply_mask(scores, qmask, q_positions, start, stop), values.float())
            start = stop
        if sinks is not None:
            state.add_sink(sinks.reshape(h, g))
        out[:, q0:q1] = state.result().reshape(b, hq, q1 - q0, d).transpose(1, 2).to(query.dtype)
    return out
