"""Saving a SawInt4Cache to a safetensors file and loading it back (src/saw_kvcache/serialization.py).

The oracle of a round trip is the cache that was saved: the reloaded cache must give bit-identical logits and
tokens when both continue with the same input. Bad files must raise CacheFileError naming the problem.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from saw_kvcache import SawInt4Cache
from saw_kvcache.integration.compat import cache_kwarg_name
from saw_kvcache.serialization import (
    FORMAT_VERSION,
    CacheFileError,
    CacheMismatchError,
    _checksum,
    cache_fingerprint,
    check_compatible,
)

from conftest import english_text
from tiny_models import tiny_model

KW = cache_kwarg_name()  # "cache" on transformers >= 5.24, "past_key_values" before
PROMPT = 200


def forward(model, ids, cache):
    with torch.no_grad():  # not inference_mode: generate() later writes into the same cache outside it
        return model(ids, **{KW: cache}).logits


def generate(model, ids, cache, new_tokens=8):
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **{KW: cache})
    return out[:, ids.shape[1]:]


def stored(cache):
    """Each layer's tokens as the cache holds them (dequantized pages + window), for exact comparisons."""
    return [layer.store.dequantize() for layer in cache.layers]


def assert_same_contents(a, b):
    for (ka, va), (kb, vb) in zip(stored(a), stored(b), strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.fixture(scope="module")
def text_ids(smollm2):
    _, tokenizer = smollm2
    return tokenizer(english_text(), return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.parametrize(
    "settings",
    [
        dict(residual_length=0),  # center_keys="auto"
        dict(residual_length=16, center_keys=True, center_values=True),
    ],
    ids=["window0", "window16-centered"],
)
def test_reloaded_cache_continues_with_identical_logits_and_tokens_on_smollm2(smollm2, text_ids, tmp_path, settings):
    model, _ = smollm2
    prompt, following = text_ids[:, :PROMPT], text_ids[:, PROMPT : PROMPT + 5]
    original = SawInt4Cache(**settings)
    forward(model, prompt, original)
    if settings.get("center_values"):
        assert all(layer.store.key_mean is not None and layer.store.value_mean is not None for layer in original.layers)
    path = tmp_path / "prompt.safetensors"
    original.save(path)
    reloaded = SawInt4Cache.load(path)
    assert reloaded.get_seq_length() == PROMPT and reloaded.config == original.config
    assert_same_contents(original, reloaded)

    # The same next tokens through both caches: bit-identical logits.
    expected, got = forward(model, following, original), forward(model, following, reloaded)
    assert torch.equal(expected, got)
    assert_same_contents(original, reloaded)

    # Then greedy generation from both (205 tokens cached, one more prompt token): identical tokens.
    ids = text_ids[:, : PROMPT + 6]
    assert torch.equal(generate(model, ids, original), generate(model, ids, reloaded))


def test_file_holds_only_the_pages_in_use_not_the_pool(smollm2, text_ids, tmp_path):
    model, _ = smollm2
    cache = SawInt4Cache(residual_length=16)
    forward(model, text_ids[:, :PROMPT], cache)
    cache.crop(40 - PROMPT)  # 40 tokens left, all in the first page; the other 2 pages of the pool are free
    forward(model, text_ids[:, 40:50], cache)  # 50 tokens: 40 in the page, 10 in the window (of 16)
    store = cache.layers[0].store
    assert (store.num_paged, store.pages_in_use(), store.pool.k_codes.shape[0]) == (40, 1, 3)
    path = tmp_path / "cropped.safetensors"
    cache.save(path)

    page_bytes = sum(layer.store.page_bytes() for layer in cache.layers)  # one page per layer
    window_bytes = 2 * len(cache.layers) * 3 * 10 * 64 * 4  # K+V, KV heads, tokens, head dim, float32
    means_bytes = sum(
        t.nbytes for layer in cache.layers for t in (layer.store.key_mean, layer.store.value_mean) if t is not None
    )
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert os.path.getsize(path) - header == page_bytes + window_bytes + means_bytes
    reserved = sum(layer.store.reserved_bytes() for layer in cache.layers)
    assert os.path.getsize(path) < 0.5 * reserved  # the pool has 3 pages per layer, the file 1

    reloaded = SawInt4Cache.load(path)
    assert_same_contents(cache, reloaded)
    following = text_ids[:, 50:54]
    assert torch.equal(forward(model, following, cache), forward(model, following, reloaded))


def test_file_is_under_03x_of_a_bfloat16_dynamic_cache(smollm2, text_ids, tmp_path):
    model, _ = smollm2
    ids = text_ids[:, :512]
    saw = SawInt4Cache(residual_length=0)
    forward(copy.deepcopy(model).to(torch.bfloat16), ids, saw)  # bfloat16 scales and offsets
    # The BF16 DynamicCache of the same tokens (run in float32, which is fast on the CPU, and counted in bfloat16).
    model.set_attn_implementation("sdpa")
    try:
        dynamic = DynamicCache()
        forward(model, ids, dynamic)
    finally:
        model.set_attn_implementation("saw_int4")
    bf16_bytes = sum(layer.keys.to(torch.bfloat16).nbytes + layer.values.to(torch.bfloat16).nbytes for layer in dynamic.layers)
    assert bf16_bytes == 30 * 2 * 3 * 512 * 64 * 2  # layers, K+V, KV heads, tokens, head dim, bytes
    path = tmp_path / "bf16.safetensors"
    saw.save(path)
    ratio = os.path.getsize(path) / bf16_bytes
    assert ratio < 0.3, ratio  # 36 / 128 = 0.281 for the pages, plus centering vectors and the header


def test_fingerprint_mismatch_with_another_model_is_a_clear_error(smollm2, text_ids, tmp_path):
    model, _ = smollm2
    cache = SawInt4Cache(residual_length=0)
    forward(model, text_ids[:, :40], cache)
    path = tmp_path / "smollm2.safetensors"
    cache.save(path)
    other = tiny_model("llama", head_dim=64)  # 2 layers, 2 KV heads, head dim 64, float32
    check_compatible(cache, model)
    assert SawInt4Cache.load(path, model=model).get_seq_length() == 40
    with pytest.raises(CacheMismatchError, match=r"num_layers: cache 30, model 2; kv_heads: cache 3, model 2"):
        SawInt4Cache.load(path, model=other)
    with pytest.raises(CacheMismatchError, match="num_layers"):
        check_compatible(cache, other)
    # Loaded without model=..., the first update of the wrong model says where the cache came from.
    loaded = SawInt4Cache.load(path)
    with pytest.raises(ValueError, match=r"do not match the cached .*loaded from .*smollm2\.safetensors"):
        forward(other, torch.tensor([[5, 6, 7]]), loaded)
    with pytest.raises(CacheMismatchError, match=r"dtype: cache 'float32', model 'bfloat16'.*model\.to\(torch\.float32\)"):
        check_compatible(cache, copy.deepcopy(model).to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------ tiny model


def tiny_cache(**settings):
    """A tiny Llama (2 layers, 2 KV heads, head dim 16) and a SawInt4Cache prefilled with 40 tokens."""
    model = tiny_model("llama")
    settings = {**dict(residual_length=8, page_size=16, hadamard_block=16), **settings}
    cache = SawInt4Cache(**settings)
    ids = torch.randint(3, 160, (2, 40))
    forward(model, ids, cache)
    return model, cache


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small valid file (tiny Llama, batch 2, 40 tokens: pages, window and key means) and its bytes."""
    torch.manual_seed(0)
    model, cache = tiny_cache(center_keys=True)
    path = tmp_path_factory.mktemp("saved") / "tiny.safetensors"
    cache.save(path)
    with open(path, "rb") as f:
        data = f.read()
    return model, cache, path, data


def write(tmp_path, data: bytes, name="bad.safetensors"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rewritten(tmp_path, path, metadata_edit=None, tensors_edit=None, checksum=True):
    """A copy of a saved file with edited metadata/tensors, its checksum recomputed (a consistent file whose
    contents say something else): tests the checks behind the checksum."""
    with safe_open(path, framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if metadata_edit:
        metadata_edit(metadata)
    if tensors_edit:
        tensors_edit(tensors)
    if checksum:
        metadata["checksum"] = _checksum(metadata, tensors)
    out = tmp_path / "rewritten.safetensors"
    save_file(tensors, out, metadata=metadata)
    return out


def edit_json(key, change):
    def edit(metadata):
        value = json.loads(metadata[key])
        change(value)
        metadata[key] = json.dumps(value)
    return edit


def test_tiny_round_trip_with_window_and_means(saved, tmp_path):
    model, cache, path, _ = saved
    loaded = SawInt4Cache.load(path, device="cpu", model=model)
    assert_same_contents(cache, loaded)
    assert all(layer.store.key_mean is not None for layer in loaded.layers)
    assert loaded.loaded_from == str(path)
    # An unchanged rewrite loads: the helper itself makes valid files.
    assert SawInt4Cache.load(rewritten(tmp_path, path)).get_seq_length() == 40


def test_truncated_file_is_rejected(saved, tmp_path):
    *_, data = saved
    for size in (0, 5, 8, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(CacheFileError, match="truncated or corrupted"):
            SawInt4Cache.load(write(tmp_path, data[:size]))
    with pytest.raises(CacheFileError, match="truncated or corrupted"):
        SawInt4Cache.load(write(tmp_path, data + b"\0"))


def test_flipped_byte_in_tensor_data_fails_the_checksum(saved, tmp_path):
    *_, data = saved
    start = 8 + int.from_bytes(data[:8], "little")
    for position in torch.linspace(start, len(data) - 1, 40).long().tolist():
        corrupted = bytearray(data)
        corrupted[position] ^= 0x10
        with pytest.raises(CacheFileError, match="checksum mismatch"):
            SawInt4Cache.load(write(tmp_path, bytes(corrupted)))


def test_flipped_byte_anywhere_in_the_header_is_rejected(saved, tmp_path):
    *_, data = saved
    header_end = 8 + int.from_bytes(data[:8], "little")
    path = tmp_path / "flipped.safetensors"
    for position in range(header_end):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x01
        path.write_bytes(bytes(corrupted))
        with pytest.raises(CacheFileError):
            SawInt4Cache.load(path)


def test_newer_format_version_is_rejected(saved, tmp_path):
    path = saved[2]
    bumped = rewritten(tmp_path, path, lambda m: m.update(format_version=str(FORMAT_VERSION + 1)))
    with pytest.raises(CacheFileError, match=rf"format version '{FORMAT_VERSION + 1}'.*reads version "
                                             rf"{FORMAT_VERSION} only.*newer saw_kvcache"):
        SawInt4Cache.load(bumped)


def test_version_1_files_are_refused(saved, tmp_path):
    """Version 1 stored value codes like key codes: read as version 2 they would decode to other values."""
    old = rewritten(tmp_path, saved[2], lambda m: m.update(format_version="1"))
    with pytest.raises(CacheFileError, match=rf"format version '1', but this saw_kvcache reads version {FORMAT_VERSION}"):
        SawInt4Cache.load(old)


def test_other_safetensors_file_is_not_a_cache(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CacheFileError, match="not a saved SawInt4Cache"):
        SawInt4Cache.load(path)
    with pytest.raises(FileNotFoundError):
        SawInt4Cache.load(tmp_path / "missing.safetensors")


def test_unknown_or_missing_config_field_is_rejected(saved, tmp_path):
    path = saved[2]
    newer = rewritten(tmp_path, path, edit_json("config", lambda c: c.update(bits=3)))
    with pytest.raises(CacheFileError, match=r"fields \['bits'\] that this saw_kvcache does not know"):
        SawInt4Cache.load(newer)
    older = rewritten(tmp_path, path, edit_json("config", lambda c: c.pop("page_size")))
    with pytest.raises(CacheFileError, match=r"lacks the fields \['page_size'\]"):
        SawInt4Cache.load(older)


def test_invalid_config_value_is_rejected(saved, tmp_path):
    path = saved[2]
    bad = rewritten(tmp_path, path, edit_json("config", lambda c: c.update(page_size=48)))
    with pytest.raises(CacheFileError, match=r"configuration is invalid: SawInt4Config.page_size must be a power of two"):
        SawInt4Cache.load(bad)


def test_config_that_cannot_run_here_is_rejected_unless_overridden(saved, tmp_path):
    path = saved[2]
    triton = rewritten(tmp_path, path, edit_json("config", lambda c: c.update(backend="triton")))
    with pytest.raises(CacheFileError, match=r"cannot run here: .*head dim .*16.*backend='torch'"):
        SawInt4Cache.load(triton)
    assert SawInt4Cache.load(triton, backend="torch").config.backend == "torch"


def test_contents_that_contradict_the_description_are_rejected(saved, tmp_path):
    path = saved[2]
    cases = {
        r"tensor layers\.0\.k_codes is \(2, 2, 2, 16, 8\) torch.uint8, expected \(2, 2, 3, 16, 8\)":
            edit_json("fingerprint", lambda fp: fp.update(kv_heads=3)),
        r"'layers' must list 3 layers": edit_json("fingerprint", lambda fp: fp.update(num_layers=3)),
        r"layer 1 has 20 tokens outside the pages, more than residual_length=8":
            edit_json("layers", lambda layers: layers[1].update(num_paged=20)),
        r"layer 0 needs batch >= 1 and 0 <= num_paged <= length":
            edit_json("layers", lambda layers: layers[0].update(num_paged=41)),
        r"fingerprint's dtype must be one of": edit_json("fingerprint", lambda fp: fp.update(dtype="int8")),
        r"not valid JSON": lambda m: m.update(config="{"),
    }
    for message, edit in cases.items():
        with pytest.raises(CacheFileError, match=message):
            SawInt4Cache.load(rewritten(tmp_path, path, edit))
    missing = rewritten(tmp_path, path, tensors_edit=lambda t: t.pop("layers.1.window_value"))
    with pytest.raises(CacheFileError, match=r"missing \['layers.1.window_value'\]"):
        SawInt4Cache.load(missing)
    extra = rewritten(tmp_path, path, tensors_edit=lambda t: t.update({"layers.1.value_mean": torch.zeros(2, 16)}))
    with pytest.raises(CacheFileError, match=r"unexpected \['layers.1.value_mean'\]"):  # center_values=False
        SawInt4Cache.load(extra)


def test_model_with_more_layers_fails_at_the_first_extra_layer(saved):
    _, _, path, _ = saved
    loaded = SawInt4Cache.load(path)
    deeper = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"wrote layer 2, but this cache was loaded from .* holds 2 layers"):
        forward(deeper, torch.randint(3, 160, (2, 3)), loaded)


def test_saving_an_empty_cache_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no layers yet"):
        SawInt4Cache().save(tmp_path / "empty.safetensors")
    _, cache = tiny_cache()
    cache.reset()
    with pytest.raises(ValueError, match=r"layers \[0, 1\] hold no tokens"):
        cache.save(tmp_path / "empty.safetensors")
    assert not os.path.exists(tmp_path / "empty.safetensors")


@pytest.mark.parametrize("residual_length", [0, 8])
def test_shared_pages_after_reorder_and_a_crop_survive_the_round_trip(tmp_path, residual_length):
    model, cache = tiny_cache(residual_length=residual_length)
    cache.reorder_cache(torch.tensor([1, 1]))  # both sequences share sequence 1's pages
    cache.crop(-10)  # 30 tokens: a partly written page (14 of 16 slots) whose tail must not matter
    path = tmp_path / "shared.safetensors"
    cache.save(path)
    loaded = SawInt4Cache.load(path)
    assert loaded.get_seq_length() == 30
    assert_same_contents(cache, loaded)
    with safe_open(path, framework="pt") as f:  # slots past the stored tokens are written as zeros
        codes = f.get_tensor("layers.0.k_codes")
        assert codes.shape[1] == 2 and not codes[:, -1, :, 14:].any() and codes[:, -1, :, :14].any()
    ids = torch.randint(3, 160, (2, 4))
    assert torch.equal(forward(model, ids, cache), forward(model, ids, loaded))
    ids = torch.randint(3, 160, (2, 36))  # 34 cached: generate feeds the last 2
    assert torch.equal(generate(model, ids, cache, 6), generate(model, ids, loaded, 6))


def test_unavailable_device_is_a_clear_error(saved):
    path = saved[2]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            SawInt4Cache.load(path, device="cuda")
    with pytest.raises(ValueError, match="not available"):
        SawInt4Cache.load(path, device="cuda:99")


def test_fingerprint_of_a_cache(saved):
    _, cache, _, _ = saved
    assert cache_fingerprint(cache) == dict(num_layers=2, kv_heads=2, head_dim=16, dtype="float32")


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_saved_on_gpu_loaded_on_cpu_and_back_continues_identically(tmp_path):
    """Tiny Llama at head dim 64 in bfloat16 (so backend="auto" is Triton on the GPU, torch on the CPU)."""
    torch.manual_seed(0)
    model = tiny_model("llama", head_dim=64, dtype=torch.bfloat16).to("cuda")
    ids = torch.randint(3, 160, (2, 150), device="cuda")
    original = SawInt4Cache(residual_length=16)
    forward(model, ids[:, :140], original)
    assert original.layers[0].store.backend.name == "triton"
    on_gpu = tmp_path / "gpu.safetensors"
    original.save(on_gpu)

    on_cpu = SawInt4Cache.load(on_gpu, device="cpu")
    assert on_cpu.layers[0].store.device.type == "cpu" and on_cpu.layers[0].store.backend.name == "torch"
    for a, b in zip(original.layers, on_cpu.layers):
        for name, x in a.store.export_state().items():
            y = b.store.export_state()[name]
            if isinstance(x, torch.Tensor):
                assert torch.equal(x.cpu(), y)
            elif isinstance(x, tuple):
                assert all(torch.equal(u.cpu(), v) for u, v in zip(x, y))
    # The CPU copy runs on the CPU.
    cpu_logits = forward(copy.deepcopy(model).to("cpu"), ids[:, 140:145].cpu(), on_cpu)
    assert torch.isfinite(cpu_logits).all()

    back = tmp_path / "back.safetensors"
    SawInt4Cache.load(on_gpu, device="cpu").save(back)
    on_gpu_again = SawInt4Cache.load(back, device="cuda")
    by_default = SawInt4Cache.load(on_gpu)  # where it was saved
    assert by_default.layers[0].store.device.type == "cuda"
    expected = forward(model, ids[:, 140:145], original)
    assert torch.equal(forward(model, ids[:, 140:145], on_gpu_again), expected)
    assert torch.equal(forward(model, ids[:, 140:145], by_default), expected)
    assert torch.equal(generate(model, ids, original), generate(model, ids, on_gpu_again))
