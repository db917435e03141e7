"""Fused Triton kernels for SAW-INT4 paged storage. Each public function has the signature of its twin in
`reference.py`, which is its specification and test oracle.

  * write_pages: center, Hadamard-rotate, quantize, pack and scatter new tokens into pages (keys and values in
    one launch); bit-identical to the twin (same float32 operations in the same order, no FMA contraction).
    append_with_window / append_from_state: the same for the tokens leaving the window, and the window's update,
    in that one launch for decode steps.
  * paged_attention: decode and chunked-prefill attention over INT4 pages + full-precision window + exact chunk.
    All query heads of one KV head share one program (GQA), queries are rotated in-kernel, q·mean is added to
    the scores and the value rotation and mean are undone before the full-precision part. The sequence is split
    over programs (flash-decoding) when queries alone do not fill the GPU; the last split to finish merges the
    splits (a second kernel does under CUDA-graph capture).
    Values are never dequantized element by element: p @ V = (p * scale) @ codes + p · offset. In decode neither
    are keys: scores = scale * (q · codes) + sum(q) * offset, the codes go to int8 tensor-core dots as they are,
    and the rotated query and p * scale as int8 pieces (exact int32 products, 2^-16 of each row's range). In
    prefill, where the elementwise work per score dominates, the dots are float16: each step's keys are
    dequantized to float16 in registers (a thread holds few tokens of K's tile), so that a score is one dot
    times one number per step, and the value codes are exact float16.
  * dequantize_pages: pages back to the model frame (fallbacks, export, debugging).

No launcher synchronizes with the GPU or reads GPU values on the host; grids depend on host integers only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import PagedKV, check_state, hadamard_scale

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ROUND_BF16_ON_BITS = tl.constexpr(INTERPRET)
_PTX = tl.constexpr(not INTERPRET)


class _Tuning(dict):
    """A dict that counts its changes: launch site keys (below) hold the count, so that a benchmark's sweep, which
    changes the settings between launches, never reuses a kernel compiled for other settings."""

    version = 0

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.version += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        self.version += 1

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self.version += 1


# Launch settings, chosen by `benchmarks/bench_kernels.py --sweep` on an H200 (docs/kernel_notes.md).
TUNING = _Tuning({
    "decode": {"num_warps": 4, "num_stages": 2},
    "prefill": {"num_warps": 4, "num_stages": 2},
    "decode_max_queries": 16,  # up to this many queries per sequence use the decode settings
    "decode_block_n": 256,  # tokens of INT4 pages per step of the decode loop (may span several pages)
    "decode_residual_dots": True,  # float32-accurate products with the full-precision window in decode
    "int8_pieces": 2,  # int8 parts of the query and of p in the decode dots (16-bit models; float32 models use 4)
    "nibble_asm": True,  # split the codes by inline PTX (the CPU interpreter cannot run it: plain ops there)
    "raw_block_n": 64,  # tokens per step of the loop over the full-precision window and chunk
    # Decode calls with at least `from_programs` (sequence, KV head) programs before splitting: programs of one
    # warp (no barrier between warps in the page loop) and more of them per SM, with the window loop's tiles
    # narrowed to fit 8 per SM. On an H200 (`bench_kernels.py --sweep narrow`): 8 x 8k 44.4 -> 38.0 us at 64
    # pairs; 1 x 32k (8 pairs) keeps 4 warps (27.2-27.5 against 28.5-28.6 us). docs/kernel_notes.md.
    "narrow": {"from_programs": 64, "num_warps": 1, "block_n": 64, "programs_per_sm": 8, "raw_block_n": 16},
    "prefill_block_n": 128,  # the sweep's best on an H200 (docs/kernel_notes.md)
    "prefill_rows": 64,  # query rows (heads x positions) per program when queries are many
    "programs_per_sm": 2,  # the sequence is split until about this many programs per SM are running
    "fused_merge": True,  # the last split merges the splits' results (no second kernel) outside CUDA-graph capture
    "write": {"num_warps": 4},
    "write_tokens": 32,  # tokens per program of the write kernel
    # One-token appends (decode steps): a tile of 2 tokens (the pair that shares a value byte), not 32 rows of which
    # 31 are masked out (`bench_kernels.py --sweep append`, 1 x 8k / 16 x 8k on an H200: 3.4 / 4.2 us against 4.7 /
    # 7.3). The attention kernel's own append (eager steps) uses the same tile.
    "write_decode": {"tokens": 2, "num_warps": 4},
    "write_butterfly": "gather",  # "gather" (partners in other threads by tl.gather) or "reshape" (split/join)
})


# float32 models: two pipeline stages, or the float32 window tiles take ~216 KB of shared memory (no GPU before
# Hopper has that much).
FLOAT32_LAUNCH = {"num_warps": 4, "num_stages": 2}


# Host-side helpers in plain Python: triton.cdiv and triton.next_power_of_2 are jit functions, ~8 us per call
# from Python, and the launchers call them several times per layer and step.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _log2(block: int) -> int:
    return int(math.log2(block)) if block else 0


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 2  # the CPU interpreter: pretend 2
    return TUNING["programs_per_sm"] * sms


# ------------------------------------------------------------------------------------------------------------------
# launches
# ------------------------------------------------------------------------------------------------------------------
# kernel[grid](...) binds and specializes every argument and looks the kernel up by a string key at each call: on an
# H200's host, 38-77 us per attention launch against 14-24 us through the compiled kernel's own launcher
# (benchmarks/layer_host_time.py). Eager decoding pays that per layer and step, so after the first launch of a
# specialization the compiled kernel is launched directly. The key holds everything Triton specializes on: each
# tensor's dtype and 16-byte alignment, each integer's "== 1", "divisible by 16" and 32-bit range, the constexprs.
_COMPILED: dict = {}
_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)
FAST_LAUNCH = not INTERPRET and _RUNTIME_KNOBS is not None and torch.cuda.is_available()


def _hooks_active() -> bool:
    hooks = (_RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


def _specialization(args: tuple) -> tuple:
    """What Triton compiles a separate kernel for, per runtime argument (finer where it is cheaper: an integer's
    class even where Triton ignores it)."""
    # One class test per argument, tensors last (the launchers pass tensors, ints, floats, bools and None): this
    # runs at every eager launch.
    key = []
    for a in args:
        kind = a.__class__
        if kind is int:
            key.append((a == 1, a % 16 == 0, a >> 31))
        elif kind is float:  # not specialized
            key.append(kind)
        elif kind is bool or a is None:
            key.append(a)
        else:
            key.append((a.dtype, a.data_ptr() % 16 == 0))
    return tuple(key)


# A launcher may also name its launch by a cheap `site` key of its own, derived from the inputs that decide its
# constexprs and what Triton specializes its arguments on (shapes, strides, dtypes, flags), valid while every tensor
# argument is 16-byte aligned. Eager decoding repeats the same few sites at every layer and step; with the key, the
# constexprs are not even built and the arguments not classified one by one. Tests set CHECK_SITE_KEYS (the
# environment's SAW_KVCACHE_CHECK_SITE_KEYS=1), which checks at every launch that a site never stands for two
# different full keys.
_SITES: dict = {}
CHECK_SITE_KEYS = os.environ.get("SAW_KVCACHE_CHECK_SITE_KEYS") == "1"
_SITE_FULL_KEYS: dict = {}


# Per kernel: the positions of the arguments Triton does not specialize on (do_not_specialize), which the check of
# site keys leaves out.
_PER_CALL_POSITIONS: dict = {}


def _jit_per_call(*names):
    """triton.jit with do_not_specialize=names: integers that change at every decode step."""
    def wrap(fn):
        kernel = triton.jit(do_not_specialize=list(names))(fn)
        _PER_CALL_POSITIONS[kernel] = frozenset(kernel.arg_names.index(name) for name in names)
        return kernel
    return wrap


def _aligned(*tensors) -> bool:
    """Every tensor's data 16-byte aligned (one test over all their addresses)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return not bits & 15


def _launch(kernel, grid: tuple, args: tuple, constexprs, site=None) -> None:
    """kernel[grid](*args, **constexprs()), through the compiled kernel's launcher once that specialization exists.
    `constexprs` is the dict of constexprs, or a function returning it (called only when the launch is not cached);
    `site` (optional) a key of the caller's that determines the constexprs and the specialization (see above)."""
    global FAST_LAUNCH
    if isinstance(constexprs, dict):
        constexprs = constexprs.copy
    if CHECK_SITE_KEYS and site is not None:
        per_call = _PER_CALL_POSITIONS.get(kernel, ())
        full = (tuple(constexprs().items()),
                tuple(x for i, x in enumerate(_specialization(args)) if i not in per_call))
        seen = _SITE_FULL_KEYS.setdefault((kernel, site), full)
        if seen != full:
            raise AssertionError(f"launch site key {site} of {kernel} stands for two specializations: {seen} and {full}")
    if not FAST_LAUNCH or _hooks_active():
        kernel[grid](*args, **constexprs())
        return
    device = torch.cuda.current_device()
    entry = _SITES.get((kernel, device, site)) if site is not None else None
    if entry is None:
        values = constexprs()
        key = (kernel, device, tuple(values.items()), _specialization(args))
        entry = _COMPILED.get(key)
        if entry is None:
            compiled = kernel[grid](*args, **values)
            names = getattr(kernel, "arg_names", None)
            if names is not None and hasattr(compiled, "packed_metadata"):
                _COMPILED[key] = (compiled, tuple(values[name] for name in names[len(args):]))
            return
        if site is not None:
            _SITES[(kernel, device, site)] = entry
    compiled, tail = entry
    grid = tuple(grid) + (1,) * (3 - len(grid))
    try:
        compiled.run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)
    except TypeError:  # another Triton's launcher signature: its arguments are checked before anything launches
        FAST_LAUNCH = False
        kernel[grid](*args, **constexprs())


@triton.jit
def _mul_rn(a, b):
    """a * b rounded once and never contracted into a fused multiply-add with a later addition (the twin rounds
    the product): the write's arithmetic then gives the same bits in kernels compiled with FMA contraction on."""
    if _PTX:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return a * b


@triton.jit
def _fwht(x, ROWS: tl.constexpr, D: tl.constexpr, LOG_BLOCK: tl.constexpr, SCALE: tl.constexpr,
          GATHER_FROM: tl.constexpr = 64):
    """Block-diagonal Hadamard rotation of the rows of a [ROWS, D] float32 tile (butterfly, then * SCALE).
    Stages below GATHER_FROM pair elements by reshaping the tile, which costs nothing while the pairs lie in one
    thread's registers (the first log2(elements per 16-byte load) stages) and a shared-memory round trip otherwise;
    later stages fetch each partner by tl.gather (a warp shuffle). Every stage does the same float32 operations."""
    col = tl.broadcast_to(tl.arange(0, D)[None, :], (ROWS, D))
    for i in tl.static_range(LOG_BLOCK):
        if i < GATHER_FROM:
            y = tl.permute(tl.reshape(x, (ROWS, D // (2 << i), 2, 1 << i)), (0, 1, 3, 2))
            a, b = tl.split(y)
            x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (ROWS, D))
        else:
            # (a + b, a - b) as one fused multiply-add with a sign: x * 1 and x * -1 are exact, so each result is
            # the same single rounding as the twin's sum or difference.
            partner = tl.gather(x, col ^ (1 << i), 1)
            x = tl.fma(x, tl.where((col & (1 << i)) == 0, 1.0, -1.0), partner)
    if LOG_BLOCK > 0:
        x = _mul_rn(x, tl.full([ROWS, D], SCALE, tl.float32))
    return x


@triton.jit
def _round_to(x, ty: tl.constexpr):
    """float32 -> ty with round-to-nearest-even. For bfloat16 under the CPU interpreter it is done on the bits,
    because the interpreter truncates instead (the GPU's conversion rounds to nearest even, as this does)."""
    if ty == tl.bfloat16 and _ROUND_BF16_ON_BITS:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ty)


# ------------------------------------------------------------------------------------------------------------------
# write
# ------------------------------------------------------------------------------------------------------------------


# Arguments that change at every decode step are not specialized (Triton would otherwise compile a kernel for each
# of "divisible by 16", "equal to 1" and "other", so the first decode steps of a user's first call each compiled).
@_jit_per_call("start", "length")
def _write_kernel(
    XK, s_kb, s_kh, s_kn, KMEAN, KC, KM, WK,
    XV, s_vb, s_vh, s_vn, VMEAN, VC, VM, WV,
    s_wb, s_wh, s_wn, STATE,
    BT, stride_btb, start, length, n, H,
    HAS_KMEAN: tl.constexpr, HAS_VMEAN: tl.constexpr, D: tl.constexpr, P: tl.constexpr, T: tl.constexpr,
    LOG_BLOCK_K: tl.constexpr, SCALE_K: tl.constexpr, LOG_BLOCK_V: tl.constexpr, SCALE_V: tl.constexpr,
    GATHER_FROM: tl.constexpr, EVICT: tl.constexpr, LENGTHS_ON_DEVICE: tl.constexpr, RING_WRITE: tl.constexpr,
    R: tl.constexpr, ADVANCE: tl.constexpr,
):
    """Keys (program_id(2) == 0) and values (== 1) in one launch: one launch fewer per layer and step.

    Without EVICT: the n tokens of X go to positions [start, start + n).
    EVICT: appending the n tokens of X to a cache of `length` tokens whose pages hold [0, start) (with
    LENGTHS_ON_DEVICE both read from STATE = [length, num_paged]), the tokens leaving the window go to the pages:
    positions [start, max(start, length + n - R)), from the window ring W (positions < length), then from X.
    RING_WRITE (one-token chunks, so one tile): the same program then puts X's newest token into its ring slot,
    after its own reads of the slot it replaces.
    ADVANCE (with LENGTHS_ON_DEVICE, when no other kernel of the append reads STATE): the last program to finish
    moves STATE on to [length + n, max(num_paged, length + n - R)], as _advance_state_kernel would, with one launch
    fewer per layer and step. Programs count themselves in STATE[2] (zero between launches, and put back to zero)."""
    if tl.program_id(2) == 0:
        _write_tile(XK, s_kb, s_kh, s_kn, KMEAN, KC, KM, WK, s_wb, s_wh, s_wn, STATE, BT, stride_btb, start, length,
                    n, H, HAS_KMEAN, D, P, T, LOG_BLOCK_K, SCALE_K, GATHER_FROM, EVICT, LENGTHS_ON_DEVICE, RING_WRITE,
                    R, False)
    else:
        _write_tile(XV, s_vb, s_vh, s_vn, VMEAN, VC, VM, WV, s_wb, s_wh, s_wn, STATE, BT, stride_btb, start, length,
                    n, H, HAS_VMEAN, D, P, T, LOG_BLOCK_V, SCALE_V, GATHER_FROM, EVICT, LENGTHS_ON_DEVICE, RING_WRITE,
                    R, True)
    if ADVANCE:
        _advance_after_last_program(STATE, n, R)


@triton.jit
def _advance_after_last_program(STATE, n, R: tl.constexpr):
    """Each program of the launch takes a ticket in STATE[2] after its reads of STATE; the last one moves STATE on to
    [length + n, max(num_paged, length + n - R), 0], as _advance_state_kernel would, with no launch of its own."""
    tl.debug_barrier()  # every thread's reads of STATE come before this program's ticket
    programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    if tl.atomic_add(STATE + 2, 1, sem="acq_rel") == programs - 1:  # every other program has read STATE
        new_length = tl.load(STATE, volatile=True) + n
        tl.store(STATE + 1, tl.maximum(tl.load(STATE + 1, volatile=True), new_length - R))
        tl.store(STATE, new_length)
        tl.store(STATE + 2, 0)


@triton.jit
def _write_tile(
    X, stride_xb, stride_xh, stride_xn,
    MEAN, CODES, META, W, stride_wb, stride_wh, stride_wn, STATE, BT, stride_btb,
    start, length, n, H,
    HAS_MEAN: tl.constexpr, D: tl.constexpr, P: tl.constexpr, T: tl.constexpr,
    LOG_BLOCK: tl.constexpr, SCALE: tl.constexpr, GATHER_FROM: tl.constexpr, EVICT: tl.constexpr,
    LENGTHS_ON_DEVICE: tl.constexpr, RING_WRITE: tl.constexpr, R: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
):
    """TOKEN_MAJOR: the codes go to value pages, [D, P/2] bytes per page and head, byte j of a dimension holding
    tokens 2j (low nibble) and 2j + 1 (see reference.PagedKV)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if EVICT and LENGTHS_ON_DEVICE:
        length = tl.load(STATE)
        start = tl.load(STATE + 1)
    # Tiles of T tokens at absolute positions that are multiples of T (T divides P): a value byte holds two
    # neighbouring tokens, and no byte is written by two programs.
    t = pid_t * T + tl.arange(0, T) - start % T
    d = tl.arange(0, D)
    n_chunk = n
    if EVICT:
        n = tl.maximum(length + n - R, start) - start
        t_ok = (t >= 0) & (t < n)
        from_x = (start + t >= length)[:, None] & t_ok[:, None]
        x = tl.load(X + b * stride_xb + h * stride_xh + (start + t - length)[:, None] * stride_xn + d[None, :],
                    mask=from_x, other=0.0)
        if R > 0:
            from_w = (start + t < length)[:, None] & t_ok[:, None]
            w = tl.load(W + b * stride_wb + h * stride_wh + ((start + t) % R)[:, None] * stride_wn + d[None, :],
                        mask=from_w, other=0.0)
            x = x + w
    else:
        t_ok = (t >= 0) & (t < n)
        x = tl.load(X + b * stride_xb + h * stride_xh + t[:, None] * stride_xn + d[None, :], mask=t_ok[:, None],
                    other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        x = x - tl.load(MEAN + h * D + d)[None, :]
    x = _fwht(x, T, D, LOG_BLOCK, SCALE, GATHER_FROM)
    meta_ty = META.dtype.element_ty
    x = _round_to(x, meta_ty).to(tl.float32)
    lo = tl.min(x, axis=1)
    hi = tl.max(x, axis=1)
    scale_exact = tl.fdiv(hi - lo, 15.0, ieee_rounding=True)
    scale = _round_to(scale_exact, meta_ty)
    # Round the scale up to the next representable value when rounding went down (as torch.nextafter).
    if meta_ty == tl.float32:
        bits = scale.to(tl.int32, bitcast=True)
        scale = tl.where(scale.to(tl.float32) < scale_exact, bits + 1, bits).to(tl.float32, bitcast=True)
    elif meta_ty == tl.bfloat16:
        bits = scale.to(tl.int16, bitcast=True)
        scale = tl.where(scale.to(tl.float32) < scale_exact, bits + 1, bits).to(tl.bfloat16, bitcast=True)
    else:
        bits = scale.to(tl.int16, bitcast=True)
        scale = tl.where(scale.to(tl.float32) < scale_exact, bits + 1, bits).to(tl.float16, bitcast=True)
    scale_f = scale.to(tl.float32)
    nonzero = tl.where(scale_f > 0, scale_f, 1.0)
    inv = tl.where(scale_f > 0, tl.fdiv(tl.full(scale_f.shape, 1.0, tl.float32), nonzero, ieee_rounding=True), 0.0)
    q = tl.floor(_mul_rn(x - lo[:, None], tl.broadcast_to(inv[:, None], (T, D))) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), 15.0).to(tl.uint8)
    pos = start + t
    page = tl.load(BT + b * stride_btb + pos // P, mask=t_ok, other=0)
    row = (page.to(tl.int64) * H + h) * P + pos % P
    if TOKEN_MAJOR:
        # [D, T/2] bytes of the tile's page; where only one token of a pair is written, the other one's nibble
        # (written by an earlier launch, or never) is kept.
        q_even, q_odd = tl.split(tl.permute(tl.reshape(q, (T // 2, 2, D)), (2, 0, 1)))
        first = start - start % T + pid_t * T
        used = tl.max(t_ok.to(tl.int32), axis=0) > 0
        tile_page = tl.load(BT + b * stride_btb + first // P, mask=used, other=0).to(tl.int64)
        j = tl.multiple_of((first % P) // 2, T // 2) + tl.arange(0, T // 2)
        at = CODES + ((tile_page * H + h) * D + d[:, None]) * (P // 2) + j[None, :]
        if pid_t * T >= start % T and pid_t * T - start % T + T <= n:  # every token: whole rows, no mask
            tl.store(at, q_even | (q_odd << 4))
        else:
            ok_even, ok_odd = tl.split(tl.reshape(t_ok, (T // 2, 2)))
            old = tl.load(at, mask=((ok_even != ok_odd))[None, :], other=0)
            byte = tl.where(ok_even[None, :], q_even, old & 15) | (tl.where(ok_odd[None, :], q_odd, old >> 4) << 4)
            tl.store(at, byte, mask=(ok_even | ok_odd)[None, :])
    else:
        even, odd = tl.split(tl.reshape(q, (T, D // 2, 2)))
        tl.store(CODES + row[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], even | (odd << 4),
                 mask=t_ok[:, None])
    tl.store(META + (row * 2)[:, None] + tl.arange(0, 2)[None, :], tl.join(scale, _round_to(lo, meta_ty)),
             mask=t_ok[:, None])
    if RING_WRITE:
        tl.debug_barrier()  # every thread's reads of the evicted ring slots come before the slots are overwritten
        kept = tl.minimum(n_chunk, R)
        j = n_chunk - kept + tl.arange(0, T)
        ok = (j < n_chunk)[:, None]
        src = X + b * stride_xb + h * stride_xh + j[:, None] * stride_xn + d[None, :]
        dst = W + b * stride_wb + h * stride_wh + ((length + j) % R)[:, None] * stride_wn + d[None, :]
        tl.store(dst, tl.load(src, mask=ok), mask=ok)


_SAME_DEVICE = contextlib.nullcontext()


def _on_device(tensor: torch.Tensor):
    """Kernels launch on the current CUDA device: make it the device of the data (layers split over GPUs)."""
    if tensor.is_cuda and tensor.get_device() != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return _SAME_DEVICE


def _write_pages(
    pool: PagedKV,
    block_table: torch.Tensor,
    start: int,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mean: Optional[torch.Tensor],
    value_mean: Optional[torch.Tensor],
    hadamard_block: int,
    rotate_values: bool,
    state: Optional[torch.Tensor] = None,
    window_key: Optional[torch.Tensor] = None,
    window_value: Optional[torch.Tensor] = None,
    length: Optional[int] = None,
    ring_write: bool = False,
    advance: bool = False,
) -> None:
    """Same contract as reference.write_pages. With `length` (or `state` = [length, num_paged, 0] on the device),
    the eviction step of appending key/value to a cache of `length` tokens whose pages hold [0, start) (see
    _write_kernel's EVICT); with ring_write (one token) the window ring update too; with advance (and `state`),
    the lengths' update too."""
    b, h, n, d = key.shape
    page_size = pool.k_codes.shape[2]
    decode = n == 1
    # tiles are aligned to multiples of `tokens` (_write_tile)
    tokens = min(TUNING["write_decode"]["tokens"] if decode else TUNING["write_tokens"], page_size)
    ring = window_key.shape[2] if window_key is not None else 0
    if state is not None:
        tiles = _cdiv(n - 1, tokens) + 1  # at most n evictions from any position; the kernel reads which
    elif length is not None:
        tiles = max(_cdiv(start % tokens + max(start, length + n - ring) - start, tokens), int(ring_write))
    else:
        tiles = _cdiv(start % tokens + n, tokens) if n else 0
    if tiles == 0:
        return
    ks, vs = key.stride(), value.stride()
    if ks[-1] != 1:
        key = key.contiguous()
        ks = key.stride()
    if vs[-1] != 1:
        value = value.contiguous()
        vs = value.stride()
    v_block = hadamard_block if rotate_values else 0
    wk, wv = (key, value) if window_key is None else (window_key, window_value)
    ws = wk.stride()
    bt_stride = block_table.stride(0)
    k_mean = key_mean if key_mean is not None else pool.k_meta
    v_mean = value_mean if value_mean is not None else pool.v_meta
    table = state if state is not None else block_table
    args = (
        key, ks[0], ks[1], ks[2], k_mean, pool.k_codes, pool.k_meta, wk,
        value, vs[0], vs[1], vs[2], v_mean, pool.v_codes, pool.v_meta, wv, ws[0], ws[1], ws[2], table,
        block_table, bt_stride, start, length or 0, n, h,
    )
    site = None
    if _aligned(key, k_mean, pool.k_codes, pool.k_meta, wk, value, v_mean, pool.v_codes, pool.v_meta, wv, table,
                block_table):
        site = (TUNING.version, key.dtype, value.dtype, wk.dtype, wv.dtype, k_mean.dtype, v_mean.dtype,
                pool.k_codes.dtype, pool.k_meta.dtype, pool.v_codes.dtype, pool.v_meta.dtype, table.dtype,
                block_table.dtype, ks, vs, ws, bt_stride, n, h, d, page_size, hadamard_block, v_block,
                key_mean is None, value_mean is None, state is None, length is None, ring_write, ring, advance)
    _launch(_write_kernel, (tiles, b * h, 2), args, lambda: dict(
        HAS_KMEAN=key_mean is not None, HAS_VMEAN=value_mean is not None, D=d, P=page_size, T=tokens,
        LOG_BLOCK_K=_log2(hadamard_block), SCALE_K=hadamard_scale(hadamard_block) if hadamard_block else 1.0,
        LOG_BLOCK_V=_log2(v_block), SCALE_V=hadamard_scale(v_block) if v_block else 1.0,
        # the first log2(elements per 16-byte load) butterfly stages pair elements inside one thread
        GATHER_FROM=_log2(16 // key.element_size()) if TUNING["write_butterfly"] == "gather" else 64,
        EVICT=state is not None or length is not None,
        LENGTHS_ON_DEVICE=state is not None, RING_WRITE=ring_write, R=ring, ADVANCE=advance, enable_fp_fusion=False,
        **({"num_warps": TUNING["write_decode"]["num_warps"]} if decode else TUNING["write"]),
    ), site)


# ------------------------------------------------------------------------------------------------------------------
# dequantize
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_kernel(
    CODES, META, BT, stride_btb, MEAN, OUT, stride_ob, stride_oh, stride_on,
    num_tokens, H,
    HAS_MEAN: tl.constexpr, D: tl.constexpr, P: tl.constexpr, LOG_BLOCK: tl.constexpr, SCALE: tl.constexpr,
    TOKEN_MAJOR: tl.constexpr,
):
    """TOKEN_MAJOR: value pages, [D, P/2] bytes (reference.PagedKV)."""
    col = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    slot = tl.arange(0, P)
    pos = col * P + slot
    ok = pos < num_tokens
    page = tl.load(BT + b * stride_btb + col).to(tl.int64)
    row = (page * H + h) * P + slot
    if TOKEN_MAJOR:
        d_rows = (page * H + h) * D + tl.arange(0, D)
        codes = tl.load(CODES + d_rows[:, None] * (P // 2) + tl.arange(0, P // 2)[None, :])  # [D, P/2]
        q = tl.trans(tl.reshape(tl.join((codes & 15).to(tl.float32), (codes >> 4).to(tl.float32)), (D, P)))
        q = tl.where(ok[:, None], q, 0.0)
    else:
        codes = tl.load(CODES + row[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], mask=ok[:, None], other=0)
        q = tl.reshape(tl.join((codes & 15).to(tl.float32), (codes >> 4).to(tl.float32)), (P, D))
    scale = tl.load(META + row * 2, mask=ok, other=0.0).to(tl.float32)
    offset = tl.load(META + row * 2 + 1, mask=ok, other=0.0).to(tl.float32)
    x = offset[:, None] + q * scale[:, None]
    x = _fwht(x, P, D, LOG_BLOCK, SCALE)
    d = tl.arange(0, D)
    if HAS_MEAN:
        x = x + tl.load(MEAN + h * D + d)[None, :]
    out = OUT + b * stride_ob + h * stride_oh + pos[:, None] * stride_on + d[None, :]
    tl.store(out, _round_to(x, OUT.dtype.element_ty), mask=ok[:, None])


def _dequantize_pages(
    pool: PagedKV,
    block_table: torch.Tensor,
    num_tokens: int,
    key_mean: Optional[torch.Tensor],
    value_mean: Optional[torch.Tensor],
    hadamard_block: int,
    rotate_values: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as reference.dequantize_pages."""
    b = block_table.shape[0]
    _, h, page_size, half = pool.k_codes.shape
    d = 2 * half
    outs = []
    for codes, meta, mean, block, token_major in (
        (pool.k_codes, pool.k_meta, key_mean, hadamard_block, False),
        (pool.v_codes, pool.v_meta, value_mean, hadamard_block if rotate_values else 0, True),
    ):
        out = torch.empty(b, h, num_tokens, d, dtype=dtype, device=codes.device)
        if num_tokens:
            _dequantize_kernel[(_cdiv(num_tokens, page_size), b * h)](
                codes, meta, block_table, block_table.stride(0), mean if mean is not None else meta,
                out, out.stride(0), out.stride(1), out.stride(2), num_tokens, h,
                HAS_MEAN=mean is not None, D=d, P=page_size,
                LOG_BLOCK=_log2(block), SCALE=hadamard_scale(block) if block else 1.0, TOKEN_MAJOR=token_major,
                enable_fp_fusion=False,
            )
        outs.append(out)
    return outs[0], outs[1]


# ------------------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _nibbles(codes, ASM: tl.constexpr):
    """(low, high) 4-bit halves of uint8 codes as int8. With ASM, on 4 bytes per 32-bit register at once (three
    instructions for 8 codes; Triton's own lowering extracts and repacks every byte)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "and.b32 $0, $2, 0x0F0F0F0F;\n\tshr.b32 $1, $2, 4;\n\tand.b32 $1, $1, 0x0F0F0F0F;",
            "=r,=r,r", [codes], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    return (codes & 15).to(tl.int8), (codes >> 4).to(tl.int8)


@triton.jit
def _pow2_exponent(x, TOP: tl.constexpr):
    """e such that x * 2^-e lies in [2^TOP, 2^(TOP+1)) for finite x > 0, read from the float32 bits (exact);
    clamped so that 2^-e and 2^e stay normal floats."""
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 255) - 127 - TOP
    return tl.minimum(tl.maximum(e, -100), 100)


@triton.jit
def _exp2i(e):
    """2^e as float32 for integer e in [-126, 127], built from bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _nibbles_plus_1024(codes, ASM: tl.constexpr):
    """(low, high) 4-bit halves of uint8 codes as the exact float16 values 1024 + n, assembled from bits (1024 is
    0x6400, and n fills the low mantissa bits); subtracting 1024 afterwards is exact too. With ASM, 4 bytes per
    32-bit register: each pair of bytes spread into the two halves of a register by one prmt, then one lop3 per
    nibble pair ((x & 0x000F000F) | 0x64006400) makes two float16 at once."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{\n\t.reg .b32 t;\n\t"
            "prmt.b32 t, $4, 0, 0x4140;\n\t"
            "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA;\n\t"
            "shr.b32 t, t, 4;\n\t"
            "lop3.b32 $2, t, 0x000F000F, 0x64006400, 0xEA;\n\t"
            "prmt.b32 t, $4, 0, 0x4342;\n\t"
            "lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xEA;\n\t"
            "shr.b32 t, t, 4;\n\t"
            "lop3.b32 $3, t, 0x000F000F, 0x64006400, 0xEA;\n\t}",
            "=r,=r,=r,=r,r", [codes], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    lo = ((codes & 15).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
    hi = ((codes >> 4).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _nibbles_f16(codes, ASM: tl.constexpr):
    """(low, high) 4-bit halves of uint8 codes as exact float16. With ASM as _nibbles_plus_1024, except that the
    high nibbles are masked in place, 1024 + 16 n, and one f16x2 subtraction (low) or fused multiply-add by 1/16 and
    -64 (high) per register leaves n: 10 instructions per 8 codes instead of 12 with the subtractions."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{\n\t.reg .b32 t, c1024, c16th, cm64;\n\t"
            "mov.b32 c1024, 0x64006400;\n\tmov.b32 c16th, 0x2C002C00;\n\tmov.b32 cm64, 0xD400D400;\n\t"
            "prmt.b32 t, $4, 0, 0x4140;\n\t"
            "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA;\n\t"
            "sub.rn.f16x2 $0, $0, c1024;\n\t"
            "lop3.b32 $2, t, 0x00F000F0, 0x64006400, 0xEA;\n\t"
            "fma.rn.f16x2 $2, $2, c16th, cm64;\n\t"
            "prmt.b32 t, $4, 0, 0x4342;\n\t"
            "lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xEA;\n\t"
            "sub.rn.f16x2 $1, $1, c1024;\n\t"
            "lop3.b32 $3, t, 0x00F000F0, 0x64006400, 0xEA;\n\t"
            "fma.rn.f16x2 $3, $3, c16th, cm64;\n\t}",
            "=r,=r,=r,=r,r", [codes], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    return (codes & 15).to(tl.float16), (codes >> 4).to(tl.float16)


@triton.jit
def _piece_rows(x, PIECES: tl.constexpr):
    """x [R, C] repeated PIECES times along the rows, [PIECES * R, C], and each row's piece index [PIECES * R, 1].
    A broadcast rather than tl.join keeps each thread's columns contiguous in registers, so that the pieces go to
    shared memory (and from there to the dot) row-major, in 16-byte accesses instead of single bytes."""
    rows: tl.constexpr = x.shape[0]
    cols: tl.constexpr = x.shape[1]
    copies = tl.reshape(tl.broadcast_to(x[None, :, :], (PIECES, rows, cols)), (PIECES * rows, cols))
    return copies, (tl.arange(0, PIECES * rows) // rows)[:, None]


@triton.jit
def _int8_pieces(x, PIECES: tl.constexpr):
    """x [R, C] with |x| <= 127 as PIECES int8 tiles stacked along the rows, [PIECES * R, C]:
    x = x_0 + x_1 / 254 + x_2 / 254^2 + ..., each x_i in [-127, 127], error at most 0.5 / 254^(PIECES-1)."""
    r, piece = _piece_rows(x, PIECES)
    out = tl.zeros(r.shape, tl.float32)
    for i in tl.static_range(PIECES):
        xi = tl.floor(r + 0.5)
        out = tl.where(piece == i, xi, out)
        r = (r - xi) * 254.0
    return out.to(tl.int8)


@triton.jit
def _sum_pieces(y, ROWS: tl.constexpr, COLS: tl.constexpr, PIECES: tl.constexpr):
    """Inverse of _int8_pieces after a product: y [PIECES * ROWS, COLS] int32 -> sum_i y_i / 254^i, float32."""
    y = tl.reshape(y.to(tl.float32), (PIECES, ROWS, COLS))
    i = tl.arange(0, PIECES)
    weight = tl.where(i == 0, 1.0, tl.where(i == 1, 1.0 / 254, tl.where(i == 2, 1.0 / 64516, 1.0 / 16387064)))
    return tl.sum(y * weight[:, None, None], axis=0)


@triton.jit
def _stack_rounded(x, ty: tl.constexpr, PIECES: tl.constexpr):
    """x [R, C] float32 as ty; for PIECES == 2, [x_hi; x_lo] [2R, C] with x_hi = ty(x), x_lo = ty(x - x_hi)."""
    if PIECES == 2:
        x, piece = _piece_rows(x, 2)
        hi = x.to(ty)
        return tl.where(piece == 0, hi, (x - hi.to(tl.float32)).to(ty))
    return x.to(ty)


# The attention kernel keeps scores, and the running maxima of the online softmax, in log2 units (natural-log
# logits times log2(e)): exp2 is one instruction, exp a multiplication more.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp2(x):
    """2^x in float32; on the GPU one ex2.approx.ftz (Triton's exp2 adds a range check for subnormal results,
    which softmax weights below 2^-126 do not need)."""
    if _PTX:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return tl.exp2(x)


@triton.jit
def _online_softmax_step(scores, m_i, l_i, factor=1.0):
    """Returns (p, alpha, m_new, l_new, p_max) for scores * factor [M, N] in log2 units (factor > 0, one number)
    with -inf for masked entries; p_max is each row's largest p (2^(the step's max minus the running max)). The
    factor costs nothing per score: it joins the subtraction of the maximum in one fused multiply-add."""
    m_step = tl.max(scores, axis=1) * factor
    m_new = tl.maximum(m_i, m_step)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp2(m_i - m_safe)
    p = _exp2(scores * factor - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1), _exp2(m_step - m_safe)


@triton.jit
def _cap(scores, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1), stable at both ends
        scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
    return scores


@triton.jit
def _log2_scores(scores, scaling, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw dot products to scores in log2 units: scaled, capped (in natural units), times log2(e)."""
    if HAS_SOFTCAP:
        return _cap(scores * scaling, softcap, True) * LOG2E
    return scores * (scaling * LOG2E)


@triton.jit
def _tile_pages(BT, b, s_bt, tile, stop, cols, BLOCK_N: tl.constexpr, P: tl.constexpr):
    """Page number of every token of step `tile` (0 for positions from `stop` on)."""
    pos = tile * BLOCK_N + cols
    return tl.load(BT + b * s_bt + pos // P, mask=pos < stop, other=0).to(tl.int64)


@triton.jit
def _tile_loads(KC, KM, VM, page, tile, stop, cols, h, H, D: tl.constexpr, BLOCK_N: tl.constexpr,
                P: tl.constexpr, CODE_ALIGN: tl.constexpr, META_ALIGN: tl.constexpr):
    """K's codes [BLOCK_N, D/2] and the (scale, offset) [BLOCK_N, 2] of K and V for step `tile`, all requested
    together. Slots from position `stop` on (past the sequence or this split) read as code 0, scale 0, offset 0,
    whatever the pool holds there, NaN included, and cost no memory traffic. Each token's row starts 16-byte
    aligned (codes) and 4-byte aligned (meta) when the pools do, which the launcher checks: the hints make every
    row one or a few wide loads instead of one load per byte."""
    pos = tile * BLOCK_N + cols
    ok = (pos < stop)[:, None]
    row = (page * H + h) * P + pos % P
    half = tl.arange(0, D // 2)
    pair = tl.arange(0, 2)
    k_row = tl.multiple_of(KC + row * (D // 2), CODE_ALIGN)
    k_codes = tl.load(k_row[:, None] + half[None, :], mask=ok, other=0)
    k_meta = tl.load(tl.multiple_of(KM + row * 2, META_ALIGN)[:, None] + pair[None, :], mask=ok, other=0.0)
    v_meta = tl.load(tl.multiple_of(VM + row * 2, META_ALIGN)[:, None] + pair[None, :], mask=ok, other=0.0)
    return k_codes, k_meta, v_meta


@triton.jit
def _value_codes(VC, BT, b, s_bt, tile, stop, h, H, D: tl.constexpr, BLOCK_N: tl.constexpr, P: tl.constexpr):
    """V's codes of step `tile` as they are stored, token-major: [D, BLOCK_N / 2] bytes, byte j of a dimension
    holding the step's tokens 2j and 2j + 1. Pages from position `stop` on read as 0; slots past `stop` inside a
    page are read as they are: any code times their p * scale, which is 0, adds 0."""
    GROUP: tl.constexpr = BLOCK_N if BLOCK_N < P else P  # tokens of the step that share a page
    first = tile * BLOCK_N + tl.arange(0, BLOCK_N // GROUP) * GROUP
    page = tl.load(BT + b * s_bt + first // P, mask=first < stop, other=0).to(tl.int64)
    d = tl.arange(0, D)
    i = tl.arange(0, GROUP // 2)
    base = ((page * H + h) * D)[None, :, None] + d[:, None, None]
    in_page = tl.multiple_of((first % P) // 2, GROUP // 2)  # GROUP divides P and BLOCK_N: rows start aligned
    offs = base * (P // 2) + in_page[None, :, None] + i[None, None, :]
    codes = tl.load(VC + offs, mask=(first < stop)[None, :, None], other=0)
    return tl.reshape(codes, (D, BLOCK_N // 2))


@_jit_per_call("win_start", "n_win", "sm_b", "sm_q", "num_paged", "n_raw", "total", "tiles_per_split",
               "append_from")
def _attention_kernel(
    Q, sq_b, sq_h, sq_n,
    KC, KM, VC, VM, BT, s_bt,
    KMEAN, VMEAN,
    WK, WV, RK, RV, sw_b, sw_h, sw_n, win_start, ring, n_win,
    CK, CV, sc_b, sc_h, sc_n,
    MASK, sm_b, sm_q,
    SINKS,
    OUT, so_b, so_n, so_h,
    PART_M, PART_L, PART_ACC, STATE, TICKETS,
    num_paged, n_raw, nq, total, tiles_per_split, H, num_splits, num_q_blocks, append_from,
    scaling, softcap,
    G: tl.constexpr, BLOCK_Q: tl.constexpr, M: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    BLOCK_N: tl.constexpr, RAW_BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, SCALE: tl.constexpr, ROTATE_VALUES: tl.constexpr,
    PIECES: tl.constexpr, ASM: tl.constexpr, CODE_ALIGN: tl.constexpr, META_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RAW_PIECES: tl.constexpr,
    HAS_KMEAN: tl.constexpr, HAS_VMEAN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, SINGLE_SPLIT: tl.constexpr, STATE_ON_DEVICE: tl.constexpr,
    FUSED_MERGE: tl.constexpr, MERGE_CHUNK: tl.constexpr,
    APPEND: tl.constexpr, W_T: tl.constexpr, W_GATHER_FROM: tl.constexpr, W_R: tl.constexpr,
    W_LOG_BLOCK_V: tl.constexpr, W_SCALE_V: tl.constexpr,
):
    """FUSED_MERGE: the splits of one (sequence, KV head, query block) take a ticket from TICKETS (int32, zero)
    after storing their partial results; the last one merges them, writes the output and puts the ticket back to
    zero, so that no second kernel is launched.

    APPEND (one-token chunks, one query block): the chunk's token is first appended to the cache as
    _write_kernel's EVICT + RING_WRITE would (the pages held [0, append_from) before; the ring RK/RV, W_R slots, is
    the window's own buffer, which WK/WV may be a float32 copy of under the CPU interpreter), by the program that
    reads the last page tile, before it reads anything: a token leaving the window lands in that tile (position
    num_paged - 1), which no other program reads, and the new token takes the ring slot of the token that left,
    which the window's range [num_paged, total - 1) excludes. One launch per layer and decode step. With
    STATE_ON_DEVICE, STATE does not count the token yet: the lengths come from it before the append, and the last
    program to finish advances it (_advance_after_last_program)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    s = tl.program_id(2)
    if STATE_ON_DEVICE:  # lengths from STATE = [length, num_paged]: the chunk (n_raw tokens) counted, unless APPEND
        n_new = n_raw
        length = tl.load(STATE)
        append_from = tl.load(STATE + 1)
        num_paged = append_from
        if APPEND:  # the lengths after this launch's append
            length += n_new
            num_paged = tl.maximum(num_paged, length - W_R)
        past = length - n_new
        num_paged = tl.minimum(num_paged, past)
        n_win = past - num_paged
        win_start = num_paged % ring
        n_raw = n_win + n_new
        total = length
        tiles_per_split = tl.cdiv(tl.cdiv(num_paged, BLOCK_N), num_splits)
    else:
        n_new = n_raw - n_win  # the chunk's tokens
    b = bh // H
    h = bh % H
    if APPEND:
        last_tile = tl.cdiv(num_paged, BLOCK_N) - 1
        if s == tl.where(last_tile >= 0, last_tile // tl.maximum(tiles_per_split, 1), num_splits - 1):
            _write_tile(CK, sc_b, sc_h, sc_n, KMEAN, KC, KM, RK, sw_b, sw_h, sw_n, STATE, BT, s_bt, append_from,
                        total - n_new, n_new, H, HAS_KMEAN, D, P, W_T, LOG_BLOCK, SCALE, W_GATHER_FROM, True, False,
                        W_R > 0, W_R, False)
            _write_tile(CV, sc_b, sc_h, sc_n, VMEAN, VC, VM, RV, sw_b, sw_h, sw_n, STATE, BT, s_bt, append_from,
                        total - n_new, n_new, H, HAS_VMEAN, D, P, W_T, W_LOG_BLOCK_V, W_SCALE_V, W_GATHER_FROM, True,
                        False, W_R > 0, W_R, True)
            tl.debug_barrier()  # the written page rows are read below by other threads of this program
    rows = tl.arange(0, M)
    g = rows // BLOCK_Q
    qi = qb * BLOCK_Q + rows % BLOCK_Q
    row_ok = (g < G) & (qi < nq)
    q_pos = total - nq + qi
    d = tl.arange(0, D)
    q = tl.load(
        Q + b * sq_b + (h * G + g)[:, None] * sq_h + qi[:, None] * sq_n + d[None, :], mask=row_ok[:, None], other=0.0
    ).to(tl.float32)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)

    # INT4 pages, in the rotated (and centered) frame, BLOCK_N tokens (one or more pages) per step.
    n_tiles = tl.cdiv(num_paged, BLOCK_N)
    t0 = s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    if t1 > t0:
        # The rotations of the query and of the output by butterfly in registers: a rotation by tl.dot (float32
        # accuracy takes three) held up to ~115 KB of shared memory, one prefill program per SM.
        q_rot = _fwht(q, M, D, LOG_BLOCK, SCALE)
        if HAS_KMEAN:
            q_bias = tl.sum(q * tl.load(KMEAN + h * D + d)[None, :], axis=1)
        else:
            q_bias = tl.zeros([M], tl.float32)
        # Scores in log2 units (exp2 below): the query carries scaling * log2(e) (natural units with a softcap,
        # which is applied before the conversion). q . mean is the same for every key of a row, which softmax
        # ignores: it is left out of the scores and added to the row's maximum after the loop (not with a softcap,
        # which is not a shift).
        unit = scaling if HAS_SOFTCAP else scaling * LOG2E
        q_bias = q_bias * unit
        q_amax = tl.max(tl.abs(q_rot), axis=1)
        if PIECES == 0:
            # Float16 dots (prefill, where the elementwise work per score dominates): the query brought near 2^13 by
            # one power of two for all rows (float16 keeps each row's relative precision), each step's keys
            # dequantized to float16 near 2^14 by one power of two per step (a thread holds few tokens of K's tile,
            # so the scales cost little there), so that a score is the dot times one number per step.
            q_step = _exp2i(_pow2_exponent(tl.max(q_amax, axis=0) * unit, 13))
            q_a, q_b = tl.split(tl.reshape((q_rot * (unit / q_step)).to(tl.float16), (M, D // 2, 2)))
        else:
            # Integer dots: the 4-bit codes are exact int8, and the rotated query, scaled so that each row's largest
            # entry is 127, is split into PIECES int8 parts stacked along the rows (error <= 2^-16 of the row's
            # largest entry for 2 pieces), so one int8 dot per operand gives exact int32 sums of every part. Each
            # score is q_step * k_scale * dot + q_sum * k_off: the per-row factors carry the unit.
            q_step = tl.where(q_amax > 0, q_amax / 127.0, 1.0)
            q8 = _int8_pieces(q_rot * (1.0 / q_step)[:, None], PIECES)
            q_a, q_b = tl.split(tl.reshape(q8, (PIECES * M, D // 2, 2)))
            q_step = q_step * unit
            q_sum = tl.sum(q_rot, axis=1) * unit
        acc = tl.zeros([M, D], tl.float32)
        acc_unit = tl.full([], 1.0, tl.float32)  # float16 dots: acc holds multiples of this power of two
        off_acc = tl.zeros([M], tl.float32)
        cols = tl.arange(0, BLOCK_N)
        stop = tl.minimum(num_paged, t1 * BLOCK_N)  # this split's last position + 1
        for tile in range(t0, t1):
            pos = tile * BLOCK_N + cols
            kv_ok = pos < num_paged
            page = _tile_pages(BT, b, s_bt, tile, stop, cols, BLOCK_N, P)
            k_codes, k_meta, v_meta = _tile_loads(KC, KM, VM, page, tile, stop, cols, h, H, D, BLOCK_N, P,
                                                  CODE_ALIGN, META_ALIGN)
            v_codes = _value_codes(VC, BT, b, s_bt, tile, stop, h, H, D, BLOCK_N, P)
            k_scale, k_off = tl.split(k_meta.to(tl.float32))
            v_scale, v_off = tl.split(v_meta.to(tl.float32))
            if PIECES == 0:
                # The step's largest |key| (|offset| + 15 * scale; slots past `stop` read 0) and value scale.
                k_top, v_top = tl.split(tl.max(tl.join(tl.abs(k_off) + 15.0 * k_scale, v_scale), axis=0))
                k_pow = _exp2i(_pow2_exponent(k_top, 14))
                v_pow = _exp2i(_pow2_exponent(v_top, 14))
                k_lo, k_hi = _nibbles_f16(k_codes, ASM)
                k_scale16 = (k_scale * (1.0 / k_pow)).to(tl.float16)[:, None]
                k_off16 = (k_off * (1.0 / k_pow)).to(tl.float16)[:, None]
                sc = tl.dot(q_a, tl.trans(k_lo * k_scale16 + k_off16))
                sc = tl.dot(q_b, tl.trans(k_hi * k_scale16 + k_off16), sc)
                factor = tl.maximum(q_step * k_pow, 1e-30)  # > 0 (-inf * 0 is NaN), even for a zero query and keys
            else:
                k_lo, k_hi = _nibbles(k_codes, ASM)
                sc = tl.dot(q_a, tl.trans(k_lo), out_dtype=tl.int32)
                sc = _sum_pieces(tl.dot(q_b, tl.trans(k_hi), sc, out_dtype=tl.int32), M, BLOCK_N, PIECES)
                sc = sc * q_step[:, None] * k_scale[None, :] + q_sum[:, None] * k_off[None, :]
                factor = 1.0
            if HAS_SOFTCAP:
                sc = _cap(sc * factor + q_bias[:, None], softcap, True) * LOG2E
                factor = 1.0
            if HAS_MASK:
                ok = kv_ok[None, :] & row_ok[:, None]
                ok = ok & (tl.load(MASK + b * sm_b + qi[:, None] * sm_q + pos[None, :], mask=ok, other=0) != 0)
                sc = tl.where(ok, sc, float("-inf"))
            elif (tile + 1) * BLOCK_N > num_paged:  # only the last tile holds positions past the pages. (Rows
                sc = tl.where(kv_ok[None, :], sc, float("-inf"))  # past the queries have q = 0: finite scores.)
            p, alpha, m_i, l_i, p_max = _online_softmax_step(sc, m_i, l_i, factor)
            # p @ V = (p * scale) @ codes + p . offset. (V's tile holds few dimensions of many tokens per thread,
            # p's many tokens of few rows: the scales are cheaper to apply to p.)
            if PIECES == 0:
                # V's even and odd tokens interleaved back into token order ([D, BLOCK_N], in registers): p (the
                # larger tile here) goes to the dot whole, p * scale as float16 near 2^14 by one power of two per
                # step. acc is kept in multiples of that power of two (rescaled exactly), so the dot accumulates
                # into it.
                # (Subtracting 1024 after the reshape, not in _nibbles_f16: Triton 3.6 fails to compile a join,
                # reshape and transpose straight into a dot on 16-token pages.)
                v_even, v_odd = _nibbles_plus_1024(v_codes, ASM)
                v16 = tl.reshape(tl.join(v_even, v_odd), (D, BLOCK_N)) - 1024.0
                acc = tl.dot((p * (v_scale * (1.0 / v_pow))[None, :]).to(tl.float16), tl.trans(v16),
                             acc * (alpha * (acc_unit / v_pow))[:, None])
                acc_unit = v_pow
            else:  # over the step's even tokens and its odd tokens (V's bytes hold token pairs), p * scale as int8
                # pieces too: p * scale <= p_max * max(scale)
                p_top = p_max * tl.max(v_scale, axis=0)
                p_even, p_odd = tl.split(tl.reshape(
                    p * v_scale[None, :] * (127.0 / tl.where(p_top > 0, p_top, 1.0))[:, None], (M, BLOCK_N // 2, 2)))
                v_even, v_odd = _nibbles(v_codes, ASM)
                pv = tl.dot(_int8_pieces(p_even, PIECES), tl.trans(v_even), out_dtype=tl.int32)
                pv = tl.dot(_int8_pieces(p_odd, PIECES), tl.trans(v_odd), pv, out_dtype=tl.int32)
                pv = _sum_pieces(pv, M, D, PIECES) * (p_top * (1.0 / 127.0))[:, None]
                acc = acc * alpha[:, None] + pv
            off_acc = off_acc * alpha + tl.sum(p * v_off[None, :], axis=1)
        acc = acc * acc_unit + off_acc[:, None]
        if not HAS_SOFTCAP:
            m_i = m_i + q_bias
        # Back to the model's frame: sum p (H v + mean) = H (sum p v) + (sum p) mean.
        if ROTATE_VALUES:
            acc = _fwht(acc, M, D, LOG_BLOCK, SCALE)
        if HAS_VMEAN:
            acc += l_i[:, None] * tl.load(VMEAN + h * D + d)[None, :]

    # Full-precision window and current chunk (the last split), in the model's frame, at the model's dtype.
    if s == num_splits - 1:
        raw_ty = WK.dtype.element_ty
        # RAW_PIECES == 2: the query and p as (hi, lo) pairs of raw_ty stacked along the rows, so the products
        # are float32-accurate in one dot (and M may be 8, under tl.dot's 16 rows).
        q_dot = _stack_rounded(q, raw_ty, RAW_PIECES)
        cols = tl.arange(0, RAW_BLOCK_N)
        raw_start = total - n_raw
        raw_stop = n_raw
        if not HAS_MASK:  # causal: no query of this block sees keys after its last position
            raw_stop = tl.minimum(n_raw, total - nq + (qb + 1) * BLOCK_Q - raw_start)
        for n0 in range(0, raw_stop, RAW_BLOCK_N):
            j = n0 + cols
            j_ok = j < n_raw
            # Window tokens from their ring slots, then the chunk's; each load reads only its own rows.
            in_win = (j < n_win)[:, None]
            in_chunk = (j >= n_win)[:, None] & j_ok[:, None]
            w_offs = b * sw_b + h * sw_h + ((win_start + j) % ring)[:, None] * sw_n + d[None, :]
            c_offs = b * sc_b + h * sc_h + (j - n_win)[:, None] * sc_n + d[None, :]
            k = tl.load(WK + w_offs, mask=in_win, other=0.0) + tl.load(CK + c_offs, mask=in_chunk, other=0.0)
            sc = tl.dot(q_dot, tl.trans(k), input_precision=DOT_PRECISION)
            if RAW_PIECES == 2:
                sc = tl.sum(tl.reshape(sc, (2, M, RAW_BLOCK_N)), axis=0)
            sc = _log2_scores(sc, scaling, softcap, HAS_SOFTCAP)
            pos = raw_start + j
            ok = j_ok[None, :] & row_ok[:, None]
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * sm_b + qi[:, None] * sm_q + pos[None, :], mask=ok, other=0) != 0)
            else:
                ok = ok & (pos[None, :] <= q_pos[:, None])
            sc = tl.where(ok, sc, float("-inf"))
            p, alpha, m_i, l_i, _ = _online_softmax_step(sc, m_i, l_i)
            v = tl.load(WV + w_offs, mask=in_win, other=0.0) + tl.load(CV + c_offs, mask=in_chunk, other=0.0)
            pv = tl.dot(_stack_rounded(p, raw_ty, RAW_PIECES), v, input_precision=DOT_PRECISION)
            if RAW_PIECES == 2:
                pv = tl.sum(tl.reshape(pv, (2, M, D)), axis=0)
            acc = acc * alpha[:, None] + pv

    if SINGLE_SPLIT:
        _finish_and_store(acc, m_i, l_i, SINKS, OUT, b, h, g, qi, row_ok, so_b, so_n, so_h, G, D, HAS_SINKS)
    else:
        first = (bh * num_q_blocks + qb) * num_splits
        part = (first + s) * M + rows
        tl.store(PART_M + part, m_i)
        tl.store(PART_L + part, l_i)
        tl.store(PART_ACC + part[:, None] * D + d[None, :], acc)
        if FUSED_MERGE:
            tl.debug_barrier()  # all of this program's partial results are stored before its ticket is taken
            ticket = tl.atomic_add(TICKETS + bh * num_q_blocks + qb, 1, sem="acq_rel")
            if ticket == num_splits - 1:  # every other split has stored its results
                tl.debug_barrier()
                acc, m_i, l_i = _merge_partials(PART_M, PART_L, PART_ACC, first, num_splits, rows, M, D,
                                                MERGE_CHUNK)
                _finish_and_store(acc, m_i, l_i, SINKS, OUT, b, h, g, qi, row_ok, so_b, so_n, so_h, G, D,
                                  HAS_SINKS)
                tl.store(TICKETS + bh * num_q_blocks + qb, 0)
    if APPEND and STATE_ON_DEVICE:
        _advance_after_last_program(STATE, n_new, W_R)


@triton.jit
def _merge_partials(PART_M, PART_L, PART_ACC, first, num_splits, rows, M: tl.constexpr, D: tl.constexpr,
                    CHUNK: tl.constexpr):
    """(output, max, sum) of the given rows (of M per split) merged over splits [0, num_splits), CHUNK splits per
    load; the loads skip the SM's L1 (in the attention kernel, other SMs wrote the results during the kernel)."""
    d = tl.arange(0, D)
    m_i = tl.full(rows.shape, float("-inf"), tl.float32)
    l_i = tl.zeros(rows.shape, tl.float32)
    acc = tl.zeros([rows.shape[0], D], tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        s_ok = (s < num_splits)[:, None]
        part = (first + s)[:, None] * M + rows[None, :]
        m_s = tl.load(PART_M + part, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        m_new = tl.maximum(m_i, tl.max(m_s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp2(m_i - m_safe)
        beta = _exp2(m_s - m_safe[None, :])
        l_i = l_i * alpha + tl.sum(tl.load(PART_L + part, mask=s_ok, other=0.0, cache_modifier=".cg") * beta, axis=0)
        part_acc = tl.load(PART_ACC + part[:, :, None] * D + d[None, None, :], mask=s_ok[:, :, None], other=0.0,
                           cache_modifier=".cg")
        acc = acc * alpha[:, None] + tl.sum(part_acc * beta[:, :, None], axis=0)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _finish_and_store(acc, m_i, l_i, SINKS, OUT, b, h, g, qi, row_ok, so_b, so_n, so_h, G, D: tl.constexpr,
                      HAS_SINKS: tl.constexpr):
    if HAS_SINKS:
        sink = tl.load(SINKS + h * G + g, mask=row_ok, other=0.0).to(tl.float32) * LOG2E  # m_i: log2 units
        m_new = tl.maximum(m_i, sink)
        alpha = _exp2(m_i - m_new)
        l_i = l_i * alpha + _exp2(sink - m_new)
        acc = acc * alpha[:, None]
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    d = tl.arange(0, D)
    ptr = OUT + b * so_b + qi[:, None] * so_n + (h * G + g)[:, None] * so_h + d[None, :]
    tl.store(ptr, _round_to(out, OUT.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(
    PART_M, PART_L, PART_ACC, SINKS, OUT, so_b, so_n, so_h,
    nq, H, num_splits, num_q_blocks,
    G: tl.constexpr, BLOCK_Q: tl.constexpr, M: tl.constexpr, D: tl.constexpr, HAS_SINKS: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    """One program per query row: merges the row's partial (max, sum, output) of every split, SPLIT_BLOCK
    splits per load, so that many splits cost wide loads rather than a long chain of small ones."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    row = tl.program_id(2)
    if (row // BLOCK_Q < G) & (qb * BLOCK_Q + row % BLOCK_Q < nq):
        rows = row + tl.arange(0, 1)
        acc, m_i, l_i = _merge_partials(PART_M, PART_L, PART_ACC, (bh * num_q_blocks + qb) * num_splits, num_splits,
                                        rows, M, D, SPLIT_BLOCK)
        _finish_and_store(acc, m_i, l_i, SINKS, OUT, bh // H, bh % H, rows // BLOCK_Q,
                          qb * BLOCK_Q + rows % BLOCK_Q, rows < M, so_b, so_n, so_h, G, D, HAS_SINKS)


# Per (device, stream): the last split attention's buffers for its partial results and merge tickets, reused by the
# next call on that stream with the same sizes. In stream order, a call has merged the results before the next
# call's attention writes them again, and every ticket is back at zero.
_SPLIT_BUFFERS: dict = {}


def _split_buffers(device: torch.device, rows: int, d: int, tickets: int, reuse: bool):
    """(maxima [rows], sums [rows], outputs [rows, d]) float32 for the split attention's partial results, and
    int32 zero tickets for the merge fused into the attention kernel (None: merge in a second kernel). With
    `reuse`, no allocation in most eager decode steps (the sizes change only when the number of splits does).
    Without it (the static cache's op, which torch.compile's CUDA graphs run: their memory pool refuses tensors
    that outlive a call) and during CUDA-graph capture, they are allocated as usual and the merge is a second
    kernel, so that no ticket outlives the graph's memory."""
    if not reuse or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        part_m = torch.empty(rows, dtype=torch.float32, device=device)
        return part_m, torch.empty_like(part_m), torch.empty(rows, d, dtype=torch.float32, device=device), None
    # CPU tensors (the interpreter runs programs in order) reuse theirs too, so the CPU tests exercise the reuse.
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index)) if device.type == "cuda" else device.type
    last = _SPLIT_BUFFERS.get(key)
    if last is not None and last[0] == (rows, d, tickets):
        return last[1]
    part_m = torch.empty(rows, dtype=torch.float32, device=device)
    buffers = (part_m, torch.empty_like(part_m), torch.empty(rows, d, dtype=torch.float32, device=device),
               torch.zeros(tickets, dtype=torch.int32, device=device))
    _SPLIT_BUFFERS[key] = ((rows, d, tickets), buffers)
    return buffers


# The largest BLOCK_N whose tiles fitted the shared memory of a GPU, per (device, head dim, rows, pieces, dtype):
# a launch that does not fit is retried with half the tokens per step, and the answer kept.
_BLOCK_N_FITS: dict = {}


@functools.lru_cache(maxsize=1024)
def _attention_shape(b: int, h: int, g: int, nq: int, pieces: int, programs_wanted: int, block_n_cap: int,
                     appends: bool, tuning_version: int):
    """The part of _attention_plan that does not depend on the sequence length; is_narrow: launch with
    TUNING["narrow"]'s settings."""
    block_q = max(1, min(_next_pow2(nq), max(1, TUNING["prefill_rows"] // _next_pow2(g))))
    m = max(8, _next_pow2(g) * block_q)  # 8 rows: stacked in pieces, dots see at least 16
    q_blocks = _cdiv(nq, block_q)
    decode = nq <= TUNING["decode_max_queries"]
    narrow = TUNING["narrow"]
    # Not for eager steps that append their token: one warp writes it slowly (16 x 8k on an H200: 162.8 us per
    # call against 86.7 for the append and the attention launched apart; benchmarks/eager_attention_launches.py).
    is_narrow = (decode and not appends and pieces > 0 and m * pieces <= 16
                 and b * h * q_blocks >= narrow["from_programs"])
    if is_narrow:
        block_n = narrow["block_n"]
        programs_wanted = programs_wanted * narrow["programs_per_sm"] // TUNING["programs_per_sm"]
    else:
        block_n = TUNING["decode_block_n" if decode else "prefill_block_n"]
    if m * max(pieces, 1) > 16:  # more than 16 stacked rows: 256-token steps overran shared memory on an H200
        block_n = min(block_n, 128)
    block_n = min(block_n, block_n_cap)
    # Rounded down: rounding up launched a partial second wave (8 x 8k on an H200: 320 programs for 264 slots).
    most_splits = max(1, programs_wanted // (b * h * q_blocks))
    return block_q, m, q_blocks, block_n, most_splits, is_narrow


def _attention_plan(b: int, h: int, g: int, nq: int, num_paged: int, pieces: int, device: torch.device,
                    block_n_cap: int, appends: bool = False):
    """(BLOCK_Q, M, number of query blocks, BLOCK_N, splits, tiles per split, narrow) for one call."""
    block_q, m, q_blocks, block_n, most_splits, narrow = _attention_shape(
        b, h, g, nq, pieces, _programs_wanted(device), block_n_cap, appends, TUNING.version)
    n_tiles = _cdiv(num_paged, block_n)
    if n_tiles == 0:
        return block_q, m, q_blocks, block_n, 1, 1, narrow
    splits = min(n_tiles, most_splits)
    tiles_per_split = _cdiv(n_tiles, splits)
    return block_q, m, q_blocks, block_n, _cdiv(n_tiles, tiles_per_split), tiles_per_split, narrow


def _launch_settings(narrow: bool, decode: bool) -> dict:
    if narrow:
        return {"num_warps": TUNING["narrow"]["num_warps"], "num_stages": TUNING["decode"]["num_stages"]}
    return TUNING["decode" if decode else "prefill"]


def _same_strides(key: Optional[torch.Tensor], value: Optional[torch.Tensor]):
    """The kernels index keys and values with one set of strides, the last one 1: copies where that fails."""
    if key is None:
        return None, None
    strides = key.stride()
    if strides[-1] != 1 or strides != value.stride():
        return key.contiguous(), value.contiguous()
    return key, value


def _paged_attention(
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
    """Same contract as reference.paged_attention (boolean or no mask). The window's ring buffer and the chunk
    are read where they are (no concatenated copy). With `state`, the kernel reads the lengths from it and the
    grid depends only on the upper bound num_paged (CUDA-graph replays at any length). With `append_from` (or
    `append` and `state`), a one-token chunk is appended by the attention's own launch (see _attention_kernel's
    APPEND), except where the call would launch one-warp programs, which write a token slowly."""
    b, hq, nq, d = query.shape
    if append_from is not None and state is not None:
        raise ValueError("paged_attention: append_from is for lengths on the host; with `state`, pass append=True")
    if append:
        check_state(state, "paged_attention(append=True)")
    ring_key, ring_value = window_key, window_value
    wk, wv = _same_strides(window_key, window_value)
    ck, cv = _same_strides(chunk_key, chunk_value)
    chunk_dtype = ck.dtype if ck is not None else query.dtype
    ring = wk.shape[2] if wk is not None else 1
    n_win = 0 if wk is None else ring if window_length is None else window_length
    n_chunk = ck.shape[2] if ck is not None else 0
    h = wk.shape[1] if wk is not None else ck.shape[1] if ck is not None else pool.k_codes.shape[1]
    n_raw = n_win + n_chunk
    g = hq // h
    total = num_paged + n_raw
    page_size = pool.k_codes.shape[2] if pool is not None else 16
    sixteen_bit = query.dtype != torch.float32
    decode = nq <= TUNING["decode_max_queries"]
    # int8 pieces (exact products) in decode; float16 dots in prefill (the CPU interpreter multiplies float16 in
    # float32, as the GPU does; its bfloat16 dots are what is wrong); 4 pieces (31 bits) for float32 models.
    pieces = (TUNING["int8_pieces"] if decode else 0) if sixteen_bit else 4
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty(b, nq, hq, d, dtype=query.dtype, device=query.device)
    real_pool = pool
    if pool is None:  # no pages yet: nothing is read, but the kernel is typed by uint8 codes and 16-bit meta
        codes = query.view(torch.uint8)
        pool = PagedKV(codes, query, codes, query)
        block_table = query
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError("the Triton attention takes boolean masks (transformers' sdpa masks); got " + str(mask.dtype))
        mask = mask.expand(b, 1, nq, total if state is None else mask.shape[-1])
        mask_u8 = mask.view(torch.uint8)
    if INTERPRET:  # the CPU interpreter computes bfloat16 dots wrongly: window and chunk dots run in float32
        query = query.float()
        wk, wv, ck, cv = (None if t is None else t.float() for t in (wk, wv, ck, cv))
        sixteen_bit = False
    # A decode step's append goes into the attention's own launch (its ring is the window's buffer, which the
    # kernel indexes with the strides of the window it reads); otherwise it is launched first. Either way the
    # attention sees the cache after the append (the window range it reads is not the ring slot the append fills).
    appends = append_from is not None or append
    fuse_append = (appends and n_chunk == 1 and nq == 1 and real_pool is not None
                   and (wk is None or wk.stride() == ring_key.stride()))
    fit_key = (query.device, d, g, nq, pieces, query.dtype)
    if fuse_append and append:  # lengths on the device: not if the call would launch one-warp programs
        fuse_append = not _attention_plan(b, h, g, nq, num_paged, pieces, query.device,
                                          _BLOCK_N_FITS.get(fit_key, 1 << 30))[-1]
    if appends and not fuse_append:
        _append(real_pool, block_table, state, num_paged + n_win, append_from or 0, ring_key, ring_value, chunk_key,
                chunk_value, key_mean, value_mean, hadamard_block, rotate_values)
    if wk is None:
        wk = wv = query
    if ck is None:
        ck = cv = query
    rk, rv = (ring_key, ring_value) if fuse_append and ring_key is not None else (wk, wv)
    while True:
        block_q, m, q_blocks, block_n, splits, tiles_per_split, narrow = _attention_plan(
            b, h, g, nq, num_paged, pieces, query.device, _BLOCK_N_FITS.get(fit_key, 1 << 30), fuse_append)
        fused = False
        if splits > 1:
            part_m, part_l, part_acc, tickets = _split_buffers(query.device, b * h * q_blocks * splits * m, d,
                                                               b * h * q_blocks, reuse=state is None)
            fused = tickets is not None and TUNING["fused_merge"]
        else:
            part_m = part_l = part_acc = out
        try:
            qs, ws, cs, os_, bt_stride = query.stride(), wk.stride(), ck.stride(), out.stride(), block_table.stride(0)
            k_mean = key_mean if key_mean is not None else query
            v_mean = value_mean if value_mean is not None else query
            mask_arg = mask_u8 if mask is not None else query
            sinks_arg = sinks if sinks is not None else query
            state_arg = state if state is not None else part_m
            tickets_arg = tickets if fused else part_m
            tensors = (query, pool.k_codes, pool.k_meta, pool.v_codes, pool.v_meta, block_table, k_mean, v_mean, wk,
                       wv, rk, rv, ck, cv, mask_arg, sinks_arg, out, part_m, part_l, part_acc, state_arg, tickets_arg)
            site = None
            if _aligned(*tensors):
                site = (TUNING.version, tuple([t.dtype for t in tensors]), qs, ws, cs, os_, bt_stride, ring,
                        nq, h, g, d, page_size, block_n, splits, q_blocks, hadamard_block, rotate_values,
                        key_mean is None, value_mean is None, mask is None, sinks is None, bool(softcap),
                        state is None, fused, fuse_append, chunk_dtype, ring_key is None, narrow)
            elif num_paged and not _aligned(*pool):
                name = next(name for name, t in zip(PagedKV._fields, pool) if t.data_ptr() % 16)
                raise ValueError(f"the Triton attention needs 16-byte aligned pools; pool.{name} is not (allocate it "
                                 "with torch.empty, or pass a .clone())")
            _launch(_attention_kernel, (q_blocks, b * h, splits), (
                query, qs[0], qs[1], qs[2],
                pool.k_codes, pool.k_meta, pool.v_codes, pool.v_meta, block_table, bt_stride,
                k_mean, v_mean, wk, wv, rk, rv, ws[0], ws[1], ws[2], window_start, ring, n_win,
                ck, cv, cs[0], cs[1], cs[2],
                mask_arg, mask.stride(0) if mask is not None else 0, mask.stride(2) if mask is not None else 0,
                sinks_arg, out, os_[0], os_[1], os_[2],
                part_m, part_l, part_acc, state_arg, tickets_arg,
                num_paged, n_raw if state is None else n_chunk, nq, total, tiles_per_split, h, splits, q_blocks,
                append_from or 0, scaling, softcap or 0.0,
            ), lambda: dict(
                G=g, BLOCK_Q=block_q, M=m, D=d, P=page_size, BLOCK_N=block_n,
                RAW_BLOCK_N=TUNING["narrow"]["raw_block_n"] if narrow else TUNING["raw_block_n"],
                BLOCK=hadamard_block, LOG_BLOCK=_log2(hadamard_block),
                SCALE=hadamard_scale(hadamard_block) if hadamard_block else 1.0,
                ROTATE_VALUES=bool(rotate_values and hadamard_block),
                PIECES=pieces, ASM=TUNING["nibble_asm"] and not INTERPRET, CODE_ALIGN=math.gcd(16, d // 2),
                META_ALIGN=2 * pool.k_meta.element_size(),
                DOT_PRECISION="tf32" if sixteen_bit else "ieee",
                RAW_PIECES=2 if m < 16 or (sixteen_bit and decode and TUNING["decode_residual_dots"]) else 1,
                HAS_KMEAN=key_mean is not None, HAS_VMEAN=value_mean is not None, HAS_MASK=mask is not None,
                HAS_SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None, SINGLE_SPLIT=splits == 1,
                STATE_ON_DEVICE=state is not None, FUSED_MERGE=fused, MERGE_CHUNK=4,
                APPEND=fuse_append, W_T=min(TUNING["write_decode"]["tokens"], page_size),
                W_GATHER_FROM=_log2(16 // chunk_dtype.itemsize) if TUNING["write_butterfly"] == "gather" else 64,
                W_R=ring_key.shape[2] if fuse_append and ring_key is not None else 0,
                W_LOG_BLOCK_V=_log2(hadamard_block) if rotate_values else 0,
                W_SCALE_V=hadamard_scale(hadamard_block) if rotate_values and hadamard_block else 1.0,
                **(_launch_settings(narrow, decode) if sixteen_bit else FLOAT32_LAUNCH),
            ), site)
            break
        except triton.runtime.errors.OutOfResources:
            # p @ V reduces over the step's even (or odd) tokens: BLOCK_N / 2 >= 32 for int8 dots, >= 16 for float16
            if block_n // 2 <= (32 if pieces else 16):
                raise
            _BLOCK_N_FITS[fit_key] = block_n // 2  # before any work was queued: retry with smaller tiles
    if splits > 1 and not fused:
        os_ = out.stride()
        _launch(_merge_splits_kernel, (q_blocks, b * h, m), (
            part_m, part_l, part_acc, sinks if sinks is not None else query, out, os_[0], os_[1], os_[2],
            nq, h, splits, q_blocks,
        ), dict(G=g, BLOCK_Q=block_q, M=m, D=d, HAS_SINKS=sinks is not None, SPLIT_BLOCK=min(32, _next_pow2(splits))))
    return out


def write_pages(pool, block_table, start, key, value, key_mean, value_mean, hadamard_block, rotate_values):
    """Same contract as reference.write_pages."""
    with _on_device(key):
        return _write_pages(pool, block_table, start, key, value, key_mean, value_mean, hadamard_block, rotate_values)


@_jit_per_call("length")
def _ring_write_kernel(XK, s_kb, s_kh, s_kn, XV, s_vb, s_vh, s_vn, WK, WV, s_wb, s_wh, s_wn, STATE, length, n, kept,
                       H, R: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, LENGTHS_ON_DEVICE: tl.constexpr):
    """The newest `kept` = min(n, R) chunk tokens of one (sequence, head) into their window ring slots
    (length + j) % R, program_id(1) 0 for keys, 1 for values. With LENGTHS_ON_DEVICE, length is read from STATE,
    which _advance_state_kernel changes only after this launch."""
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    i = tl.arange(0, BLOCK)
    j = n - kept + i
    d = tl.arange(0, D)
    ok = (i < kept)[:, None]
    if LENGTHS_ON_DEVICE:
        length = tl.load(STATE)
    dst = b * s_wb + h * s_wh + ((length + j) % R)[:, None] * s_wn + d[None, :]
    if tl.program_id(1) == 0:
        tl.store(WK + dst, tl.load(XK + b * s_kb + h * s_kh + j[:, None] * s_kn + d[None, :], mask=ok), mask=ok)
    else:
        tl.store(WV + dst, tl.load(XV + b * s_vb + h * s_vh + j[:, None] * s_vn + d[None, :], mask=ok), mask=ok)


@triton.jit
def _advance_state_kernel(STATE, n, R: tl.constexpr):
    length = tl.load(STATE) + n
    tl.store(STATE + 1, tl.maximum(tl.load(STATE + 1), length - R))
    tl.store(STATE, length)


def _append(pool, block_table, state, length, num_paged, window_key, window_value, key, value, key_mean,
            value_mean, hadamard_block, rotate_values) -> None:
    """The evictions and the window ring update of an append, lengths from `state` (then advanced too) or the host
    integers: one launch for one-token chunks (decode steps) and for appends without a window, else the write and
    the ring kernel (and, with `state`, the kernel that advances it)."""
    if window_key is not None:
        strides = window_key.stride()
        if strides != window_value.stride() or strides[-1] != 1:
            raise ValueError("append: the key and value windows need the same strides, the last one 1")
    b, h, n, d = key.shape
    ring = window_key.shape[2] if window_key is not None else 0
    if n == 0:
        return
    # One program must do both (its evictions read the ring slots it then overwrites): one token, one tile.
    fused = bool(ring) and n == 1 and pool is not None
    # The write advances the lengths itself when no ring kernel reads them after it.
    advance = state is not None and pool is not None and (fused or not ring)
    if pool is not None:
        _write_pages(pool, block_table, num_paged, key, value, key_mean, value_mean, hadamard_block, rotate_values,
                     state, window_key, window_value, length if state is None else None, ring_write=fused,
                     advance=advance)
    if ring and not fused:
        key = key if key.stride(-1) == 1 else key.contiguous()
        value = value if value.stride(-1) == 1 else value.contiguous()
        kept = min(n, ring)
        ks, vs, ws = key.stride(), value.stride(), window_key.stride()
        _launch(_ring_write_kernel, (b * h, 2), (
            key, ks[0], ks[1], ks[2], value, vs[0], vs[1], vs[2], window_key, window_value, ws[0], ws[1], ws[2],
            state if state is not None else key, length, n, kept, h,
        ), dict(R=ring, BLOCK=_next_pow2(kept), D=d, LENGTHS_ON_DEVICE=state is not None))
    if state is not None and not advance:
        _launch(_advance_state_kernel, (1,), (state, n), dict(R=ring))


def append_with_window(pool, block_table, length, num_paged, window_key, window_value, key, value, key_mean,
                       value_mean, hadamard_block, rotate_values) -> None:
    """Same contract as reference.append_with_window."""
    with _on_device(key):
        _append(pool, block_table, None, length, num_paged, window_key, window_value, key, value, key_mean,
                value_mean, hadamard_block, rotate_values)


def append_from_state(pool, block_table, state, window_key, window_value, key, value, key_mean, value_mean,
                      hadamard_block, rotate_values) -> None:
    """Same contract as reference.append_from_state: the evictions, the window ring and the lengths in one launch
    for decode steps (more for longer chunks). The write kernel counts its programs in state[2]."""
    check_state(state, "append_from_state")
    with _on_device(key):
        _append(pool, block_table, state, 0, 0, window_key, window_value, key, value, key_mean, value_mean,
                hadamard_block, rotate_values)


def dequantize_pages(pool, block_table, num_tokens, key_mean, value_mean, hadamard_block, rotate_values, dtype):
    """Same contract as reference.dequantize_pages."""
    with _on_device(block_table):
        return _dequantize_pages(pool, block_table, num_tokens, key_mean, value_mean, hadamard_block,
                                 rotate_values, dtype)


def paged_attention(query, *args, **kwargs):
    """Same contract as reference.paged_attention (boolean or no mask); a one-token append (`append_from`) runs
    in the attention's launch."""
    with _on_device(query):
        return _paged_attention(query, *args, **kwargs)
