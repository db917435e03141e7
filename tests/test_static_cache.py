"""Static-capacity mode: SawInt4Cache(max_batch_size=..., max_cache_len=...).

The oracle is the dynamic mode (the same tokens through the same code, pages allocated as needed): a static cache
must store and return exactly the same values, and generate exactly the same tokens. On top of that: capacity
errors that name the limit and the fix, no allocation after the first update (the pool, block table and window
keep their addresses through reset, crop and beam reorders), and the Cache API generate() reads.
Every configuration is passed explicitly (the defaults may change).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import pytest
import torch

import saw_kvcache  # noqa: F401  (registers attn_implementation="saw_int4")
from saw_kvcache import SawInt4Cache, SawInt4Config
from saw_kvcache.integration.compat import cache_kwargs
from saw_kvcache.paged import PagedKVStore
from tiny_models import tiny_model

PAGE = 16

# The Triton backend on the CPU tensors of these tests runs under Triton's interpreter (CI); on a GPU machine, run with
# TRITON_INTERPRET=0, its kernels are covered by test_triton_kernels.py and the GPU tests below instead.
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
TRITON_ON_CPU = pytest.param("triton", marks=needs_interpreter)


pytestmark = pytest.mark.usefixtures("one_thread")


def config(residual_length=0, block=16, center_keys="auto"):
    return SawInt4Config(
        hadamard_block=block, rotate_values=True, center_keys=center_keys, center_values=False,
        residual_length=residual_length, page_size=PAGE, backend="torch",
    )


def store_pair(residual_length, max_batch_size=4, max_cache_len=100, block=64):
    cfg = config(residual_length, block=block)
    return PagedKVStore(cfg, 0), PagedKVStore(cfg, 0, max_batch_size=max_batch_size, max_cache_len=max_cache_len)


def kv(b, n, h=2, d=64, dtype=torch.bfloat16):
    offset = torch.randn(h, d) * 3
    return (torch.randn(b, h, n, d) + offset[None, :, None, :]).to(dtype), torch.randn(b, h, n, d).to(dtype)


def feed(stores, keys, values, pieces):
    start = 0
    for size in pieces:
        for store in stores:
            store.append(keys[:, :, start : start + size], values[:, :, start : start + size])
        start += size


def buffers(store: PagedKVStore) -> list[int]:
    """Addresses of everything a static store allocates."""
    tensors = list(store.pool) + [store._static_table, store._static_table_host]
    tensors += list(store._static_window or ())
    return [t.data_ptr() for t in tensors]


def assert_same_content(a: PagedKVStore, b: PagedKVStore):
    assert (a.length, a.num_paged) == (b.length, b.num_paged)
    ka, va = a.dequantize()
    kb, vb = b.dequantize()
    assert torch.equal(ka, kb) and torch.equal(va, vb)


# ------------------------------------------------------------------------------------------------ the store


@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
def test_static_store_holds_and_attends_exactly_like_the_dynamic_store(residual_length):
    dynamic, static = store_pair(residual_length)
    keys, values = kv(3, 90)
    feed([dynamic, static], keys, values, [37] + [1] * 20 + [13] + [1] * 20)  # the window wraps; pages fill
    assert_same_content(dynamic, static)
    q, ck, cv = torch.randn(3, 4, 1, 64), *kv(3, 1)
    for store in (dynamic, static):
        store.append(ck, cv)
    outs = [s.attend(q, ck, cv, 90, None, 0.125) for s in (dynamic, static)]
    assert torch.equal(outs[0], outs[1])
    # Exactly the capacity: 4 sequences x ceil(100 / 16) pages, allocated once.
    assert static.pool.k_codes.shape[0] == 4 * math.ceil(100 / PAGE)


def test_static_store_fills_to_exactly_max_cache_len_without_growing():
    _, static = store_pair(0, max_batch_size=2, max_cache_len=40)
    keys, values = kv(2, 40)
    static.append(keys[:, :, :1], values[:, :, :1])
    before = buffers(static)
    feed([static], keys[:, :, 1:], values[:, :, 1:], [20] + [1] * 19)
    assert static.length == 40 and buffers(static) == before
    with pytest.raises(ValueError, match=r"40 cached \+ 1 new tokens = 41 tokens exceed .*max_cache_len=40"):
        static.append(*kv(2, 1))


def test_batch_larger_than_max_batch_size_raises_naming_the_limit_and_the_fix():
    _, static = store_pair(0, max_batch_size=2, max_cache_len=64)
    with pytest.raises(ValueError, match=r"batch of 3 sequences .*max_batch_size=2.*Fix: SawInt4Cache\(max_batch_size=3"):
        static.append(*kv(3, 10))
    assert static.batch_size is None and static.length == 0  # nothing was written
    static.append(*kv(2, 10))  # a batch that fits works afterwards
    assert static.length == 10


def test_length_beyond_max_cache_len_raises_before_writing_and_the_cache_stays_usable():
    dynamic, static = store_pair(5, max_batch_size=2, max_cache_len=50)
    keys, values = kv(2, 60)
    feed([dynamic, static], keys, values, [45])
    with pytest.raises(ValueError, match=r"45 cached \+ 10 new tokens = 55 tokens exceed .*max_cache_len=50.*Fix"):
        static.append(keys[:, :, 45:55], values[:, :, 45:55])
    assert static.length == 45
    assert_same_content(dynamic, static)  # untouched
    feed([dynamic, static], keys[:, :, 45:], values[:, :, 45:], [5])
    assert_same_content(dynamic, static)


@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
def test_reset_reuses_every_buffer_and_a_smaller_batch_fits(residual_length):
    dynamic, static = store_pair(residual_length, max_batch_size=3, max_cache_len=80)
    keys, values = kv(3, 70)
    feed([static], keys, values, [50] + [1] * 20)
    before = buffers(static)
    static.reset()
    assert static.length == 0 and static.memory_footprint() == 0 and buffers(static) == before
    keys, values = kv(2, 75)  # another batch size, up to the capacity
    feed([dynamic, static], keys, values, [30, 1, 1, 43])
    assert buffers(static) == before
    assert static.block_table.data_ptr() == static._static_table.data_ptr()  # a view of the fixed table
    assert_same_content(dynamic, static)


@pytest.mark.parametrize("crop_to", [0, 37, 48, 62], ids=lambda n: f"crop{n}")
@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
def test_crop_then_append_equals_the_dynamic_store_without_reallocating(crop_to, residual_length):
    dynamic, static = store_pair(residual_length, max_batch_size=2, max_cache_len=96)
    keys, values = kv(2, 64)
    feed([dynamic, static], keys, values, [50] + [1] * 14)
    before = buffers(static)
    for store in (dynamic, static):
        store.crop(crop_to)
    assert static.length == crop_to
    new_k, new_v = kv(2, 30)
    feed([dynamic, static], new_k, new_v, [10] + [1] * 20)
    assert_same_content(dynamic, static)
    assert buffers(static) == before


def feed_on_device(store, keys, values, pieces):
    start = 0
    for size in pieces:
        store.append_on_device(keys[:, :, start : start + size], values[:, :, start : start + size])
        start += size


@pytest.mark.parametrize("backend", ["torch", TRITON_ON_CPU])
@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
def test_appends_with_lengths_on_the_device_equal_the_host_bookkeeping(residual_length, backend):
    """append_on_device/attend_on_device (what a compiled decode step runs: the lengths never leave the device)
    against the dynamic store's host-side bookkeeping: the same codes, window and lengths, the same attention, also
    with chunks longer than the window and after a crop. "triton" runs the kernels (Triton's interpreter here)."""
    dynamic = PagedKVStore(config(residual_length, block=64), 0)
    static = PagedKVStore(dataclasses.replace(config(residual_length, block=64), backend=backend), 0,
                          max_batch_size=3, max_cache_len=120)
    keys, values = kv(3, 100)
    feed([dynamic, static], keys, values, [20])
    feed([dynamic], keys[:, :, 20:60], values[:, :, 20:60], [1, 2, 7, 1, 1, 9, 19])
    feed_on_device(static, keys[:, :, 20:60], values[:, :, 20:60], [1, 2, 7, 1, 1, 9, 19])
    static._host_stale = True  # as after compiled steps: the host numbers are read back from the device
    assert_same_content(dynamic, static)
    q, ck, cv = torch.randn(3, 4, 2, 64), *kv(3, 2)
    dynamic.append(ck, cv)
    static.append_on_device(ck, cv)
    expected = dynamic.attend(q, ck, cv, 60, None, 0.125)
    got = static.attend_on_device(q, ck, cv, torch.ones(3, 1, 2, 120, dtype=torch.bool).tril(60), 0.125)
    torch.testing.assert_close(got, expected, rtol=0, atol=0 if backend == "torch" else 2e-5)
    for store in (dynamic, static):
        store.crop(43)
    feed([dynamic], keys[:, :, 60:], values[:, :, 60:], [1, 6, 1, 32])
    feed_on_device(static, keys[:, :, 60:], values[:, :, 60:], [1, 6, 1, 32])
    assert_same_content(dynamic, static)


@pytest.mark.parametrize("indices", [[2, 2, 0], [1, 0, 2], [0, 0, 1, 1]], ids=["repeat", "permute", "expand"])
@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
def test_select_copies_pages_and_equals_the_dynamic_store(indices, residual_length):
    dynamic, static = store_pair(residual_length, max_batch_size=4, max_cache_len=96)
    keys, values = kv(3, 70)
    feed([dynamic, static], keys, values, [61, 1, 1])  # the last page is partial
    before = buffers(static)
    table = static._static_table.clone()
    for store in (dynamic, static):
        store.select(torch.tensor(indices))
    assert static.batch_size == len(indices) and not static.may_share
    new_k, new_v = kv(len(indices), 9)
    feed([dynamic, static], new_k, new_v, [1, 1, 7])
    assert_same_content(dynamic, static)
    assert buffers(static) == before and torch.equal(static._static_table, table)


def test_select_beyond_max_batch_size_raises():
    _, static = store_pair(0, max_batch_size=2, max_cache_len=32)
    static.append(*kv(2, 5))
    with pytest.raises(ValueError, match=r"batch of 4 sequences .*max_batch_size=2"):
        static.select(torch.tensor([0, 0, 1, 1]))


def test_a_static_cache_is_not_reallocated_for_another_model_shape():
    _, static = store_pair(0, max_batch_size=2, max_cache_len=32)
    static.append(*kv(2, 5))
    static.reset()
    with pytest.raises(ValueError, match=r"allocated for 2 KV heads of dim 64 .*new SawInt4Cache\(max_batch_size"):
        static.append(*kv(2, 5, h=4))


# ------------------------------------------------------------------------------------------------ the Cache API


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_cache_len=64), "needs both max_batch_size and max_cache_len; max_cache_len was given but not max_batch_size"),
        (dict(max_batch_size=2), "max_batch_size was given but not max_cache_len"),
        (dict(max_batch_size=0, max_cache_len=64), "max_batch_size must be a positive integer"),
        (dict(max_batch_size=2, max_cache_len=1.5), "max_cache_len must be a positive integer"),
    ],
)
def test_constructor_rejects_half_or_invalid_capacity(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SawInt4Cache(**kwargs)


def test_static_cache_reports_its_capacity_before_any_update_and_is_compileable():
    cache = SawInt4Cache(config(), max_batch_size=3, max_cache_len=200)
    # generate() asks before the first forward (True: it compiles the decode step on CUDA).
    assert cache.is_static and cache.is_compileable
    assert (cache.max_cache_len, cache.max_batch_size, cache.get_max_length(), cache.get_max_cache_shape()) == (200, 3, 200, 200)
    assert "max_cache_len=200" in repr(cache)
    dynamic = SawInt4Cache(config())
    assert not dynamic.is_static and not dynamic.is_compileable
    assert (dynamic.max_cache_len, dynamic.get_max_length(), dynamic.max_batch_size) == (-1, -1, -1)
    # Existing constructor spellings keep working next to the new arguments.
    assert SawInt4Cache(config=config(7), max_batch_size=1, max_cache_len=8).config.residual_length == 7
    with pytest.raises(TypeError, match="max_batch_size"):
        SawInt4Cache(max_batchsize=3)


# ------------------------------------------------------------------------------------------------ in a model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def generate(model, cache, input_ids, attn="saw_int4", **kwargs):
    model.set_attn_implementation(attn)
    with torch.no_grad():
        return model.generate(input_ids, **cache_kwargs(cache), do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("residual_length", [0, 8], ids=lambda r: f"window{r}")
def test_greedy_generate_static_equals_dynamic_and_reuses_buffers_after_reset(llama, residual_length):
    ids = torch.randint(3, 160, (2, 21))
    ids[1, :4] = 0  # left padding
    mask = (ids != 0).long()
    dynamic = generate(llama, SawInt4Cache(config(residual_length)), ids, attention_mask=mask, max_new_tokens=20)
    cache = SawInt4Cache(config(residual_length), max_batch_size=2, max_cache_len=48)
    static = generate(llama, cache, ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(static, dynamic)
    before = [buffers(layer.store) for layer in cache.layers]
    cache.reset()
    again = generate(llama, cache, ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(again, dynamic)
    assert [buffers(layer.store) for layer in cache.layers] == before
    # After the first forward the saw_int4 attention reads the pages, and masks span the whole capacity.
    assert cache.layers[0].get_mask_sizes(1) == (48, 0)


def test_static_cache_read_through_sdpa_equals_saw_int4(llama):
    ids = torch.randint(3, 160, (1, 19))
    expected = generate(llama, SawInt4Cache(config(4), max_batch_size=1, max_cache_len=40), ids, max_new_tokens=12)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SawInt4Cache is read by an attention implementation")
        fallback = generate(llama, SawInt4Cache(config(4), max_batch_size=1, max_cache_len=40), ids, "sdpa", max_new_tokens=12)
    llama.set_attn_implementation("saw_int4")
    assert torch.equal(fallback, expected)


def test_beam_search_static_equals_dynamic(llama):
    ids = torch.randint(3, 160, (1, 18))
    kwargs = dict(num_beams=3, max_new_tokens=10, early_stopping=True)
    dynamic = generate(llama, SawInt4Cache(config(0)), ids, **kwargs)
    static = generate(llama, SawInt4Cache(config(0), max_batch_size=3, max_cache_len=28), ids, **kwargs)
    assert torch.equal(static, dynamic)


def test_generate_checks_the_capacity_before_the_prefill(llama):
    ids = torch.randint(3, 160, (2, 20))
    cache = SawInt4Cache(config(0), max_batch_size=2, max_cache_len=30)
    with pytest.raises(ValueError, match=r"may store 34 tokens .*max_cache_len=30.*Fix: SawInt4Cache\(max_batch_size=2, max_cache_len=34\)"):
        generate(llama, cache, ids, max_new_tokens=15)
    with pytest.raises(ValueError, match=r"will run 4 sequences .*max_batch_size=2"):
        generate(llama, cache, ids, max_new_tokens=5, num_beams=2)
    assert cache.get_seq_length() == 0  # nothing ran
    generate(llama, cache, ids, max_new_tokens=11, min_new_tokens=11)  # 20 + 11 - 1 = 30 tokens: fits exactly
    assert cache.get_seq_length() == 30


def test_crop_through_the_cache_api_then_continue_equals_an_uncropped_run(llama):
    """cache.crop(-n) (what assisted decoding calls) in static mode, then other tokens: the logits equal those of a
    fresh static cache that never saw the cropped tokens."""
    llama.set_attn_implementation("saw_int4")
    ids, wrong, right = torch.randint(3, 160, (1, 30)), torch.randint(3, 160, (1, 5)), torch.randint(3, 160, (1, 5))
    cache = SawInt4Cache(config(8), max_batch_size=1, max_cache_len=40)
    fresh = SawInt4Cache(config(8), max_batch_size=1, max_cache_len=40)
    with torch.no_grad():
        llama(ids, **cache_kwargs(cache), use_cache=True)
        llama(wrong, **cache_kwargs(cache), use_cache=True)
        before = [buffers(layer.store) for layer in cache.layers]
        cache.crop(-5)
        assert cache.get_seq_length() == 30
        got = llama(right, **cache_kwargs(cache), use_cache=True).logits
        llama(ids, **cache_kwargs(fresh), use_cache=True)
        expected = llama(right, **cache_kwargs(fresh), use_cache=True).logits
    assert torch.equal(got, expected)
    assert [buffers(layer.store) for layer in cache.layers] == before


@pytest.mark.parametrize("backend", ["torch", TRITON_ON_CPU])
def test_compiled_generate_is_one_graph_without_breaks_and_equals_eager(backend, monkeypatch):
    """transformers' compiled generation (a compile config; on CUDA generate() compiles a static cache's decode step
    by itself): the whole decode step is one graph (fullgraph=True fails on any break), compiled once, and the
    tokens equal eager decoding. Between steps nothing reads the lengths back from the device (each read waits for
    the GPU). aot_eager on the CPU; the GPU check runs inductor with CUDA graphs."""
    from transformers import CompileConfig

    model = tiny_model("llama", head_dim=32)
    model.set_attn_implementation("saw_int4")
    cfg = SawInt4Config(hadamard_block=32, residual_length=8, page_size=PAGE, backend=backend)
    ids = torch.randint(3, 160, (2, 13))
    ids[1, :3] = 0
    kwargs = dict(attention_mask=(ids != 0).long(), max_new_tokens=20 if backend == "torch" else 10,
                  min_new_tokens=20 if backend == "torch" else 10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, **cache_kwargs(SawInt4Cache(cfg, max_batch_size=2, max_cache_len=40)), **kwargs)
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True  # generate() compiles only on CUDA otherwise
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cache = SawInt4Cache(cfg, max_batch_size=2, max_cache_len=40)
    reads = []
    pull = PagedKVStore._pull_state
    monkeypatch.setattr(PagedKVStore, "_pull_state", lambda store: reads.append(store.layer_idx) or pull(store))
    with torch.no_grad():
        compiled = model.generate(ids, **cache_kwargs(cache), compile_config=compile_config, **kwargs)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert reads == []
    assert cache.get_seq_length() == 13 + kwargs["max_new_tokens"] - 1  # read back from the device


@needs_interpreter
def test_triton_backend_static_equals_dynamic_with_capacity_wide_masks():
    """The Triton attention takes masks exactly as wide as the tokens; static mode's max_cache_len-wide masks are
    cut to them first (CPU: Triton's interpreter, head dim 32)."""
    model = tiny_model("llama", head_dim=32)
    cfg = SawInt4Config(hadamard_block=32, residual_length=0, page_size=PAGE, backend="triton")
    ids = torch.randint(3, 160, (1, 17))
    dynamic = generate(model, SawInt4Cache(cfg), ids, max_new_tokens=4)
    cache = SawInt4Cache(cfg, max_batch_size=1, max_cache_len=64)
    static = generate(model, cache, ids, max_new_tokens=4)
    assert torch.equal(static, dynamic)
    assert cache.layers[0].get_mask_sizes(1) == (64, 0)


def test_appends_with_lengths_on_the_device_reject_mismatched_states():
    _, static = store_pair(0, max_batch_size=2, max_cache_len=64)
    static.append(*kv(2, 10))
    with pytest.raises(ValueError, match=r"batch size changed from 2 to 1"):
        static.append_on_device(*kv(1, 1))
    with pytest.raises(ValueError, match=r"do not match the cached"):
        static.append_on_device(*kv(2, 1, h=3))
    key, value = kv(2, 1)
    with pytest.raises(ValueError, match=r"keys .* and values .* must have the same shape"):
        static.append_on_device(key, value[:, :1])
    with pytest.raises(ValueError, match=r"exceed this static cache's max_cache_len=64"):
        static.append_on_device(*kv(2, 60))
    assert static.length == 10


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_compiled_generate_of_sliding_window_models_equals_eager(family):
    """Models with sliding-window layers build their masks (both kinds) from the query offset, which between compiled
    steps is the device copy of the length: the compiled tokens equal eager decoding's."""
    from transformers import CompileConfig

    model = tiny_model(family)
    cfg = SawInt4Config(hadamard_block=16, residual_length=4, page_size=PAGE, backend="torch")
    ids = torch.randint(3, 160, (2, 13))
    ids[1, :3] = 0
    kwargs = dict(attention_mask=(ids != 0).long(), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                  pad_token_id=0)
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(ids, **cache_kwargs(SawInt4Cache(cfg, max_batch_size=2, max_cache_len=40)),
                               disable_compile=True, **kwargs)
        compiled = model.generate(ids, **cache_kwargs(SawInt4Cache(cfg, max_batch_size=2, max_cache_len=40)),
                                  compile_config=compile_config, **kwargs)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("backend", ["torch", TRITON_ON_CPU])
def test_compiled_generate_with_chunked_prefill_equals_eager(backend):
    """generate(prefill_chunk_size=...) also compiles the prefill chunks of a compileable cache: the first chunk
    (which allocates the static buffers) runs outside the graph, later chunks and decode steps inside it."""
    from transformers import CompileConfig

    model = tiny_model("llama", head_dim=32)
    model.set_attn_implementation("saw_int4")
    cfg = SawInt4Config(hadamard_block=32, residual_length=8, page_size=PAGE, backend=backend)
    ids = torch.randint(3, 160, (2, 37))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, prefill_chunk_size=16)
    with torch.no_grad():
        eager = model.generate(ids, **cache_kwargs(SawInt4Cache(cfg, max_batch_size=2, max_cache_len=48)),
                               disable_compile=True, **kwargs)
    compile_config = CompileConfig(backend="aot_eager")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = model.generate(ids, **cache_kwargs(SawInt4Cache(cfg, max_batch_size=2, max_cache_len=48)),
                                  compile_config=compile_config, **kwargs)
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_op_under_cuda_graph_trees_with_a_split_sequence_equals_eager_on_gpu():
    """The static cache's attention op compiled with mode="reduce-overhead" (inductor's CUDA-graph trees) over a
    capacity of many attention steps, so that the sequence is split and merged: the graph trees accept the op (no
    tensor of the call may outlive it in their memory pool) and replays give the eager output exactly."""
    from saw_kvcache.ops import compiled  # noqa: F401  (registers torch.ops.saw_kvcache)
    from saw_kvcache.ops import reference

    b, h, g, d, pages = 2, 2, 4, 64, 64
    pool = reference.allocate_pool(b * pages + 1, h, PAGE, d, torch.bfloat16, "cuda")
    for codes in (pool.k_codes, pool.v_codes):
        codes.random_(0, 256)
    for meta in (pool.k_meta, pool.v_meta):
        meta.uniform_(0.0, 0.05)
    table = torch.randperm(b * pages, device="cuda").view(b, pages).int()
    max_paged = pages * PAGE
    state = torch.tensor([max_paged - 20, max_paged - 21], dtype=torch.int32, device="cuda")  # [length, paged]
    query = torch.randn(b, h * g, 1, d, device="cuda", dtype=torch.bfloat16)
    chunk = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)

    def attend(query):
        return torch.ops.saw_kvcache.attention_from_state(
            "triton", query, pool.k_codes, pool.k_meta, pool.v_codes, pool.v_meta, table, state, max_paged, None,
            None, chunk, chunk, None, d**-0.5, None, None, None, None, 64, True)

    eager = attend(query).clone()
    step = torch.compile(attend, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, recording, replay
        out = step(query).clone()
    assert torch.equal(out, eager)
