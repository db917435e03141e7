"""Paged INT4 storage: write_pages / dequantize_pages / paged_attention (ops/reference.py) and PagedKVStore."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch

from saw_kvcache.config import SawInt4Config
from saw_kvcache.ops import PagedKV
from saw_kvcache.ops import reference as R
from saw_kvcache.paged import PagedKVStore

# ------------------------------------------------------------------------------------------------------ helpers


def empty_pool(num_pages: int, heads: int, page_size: int, head_dim: int, dtype, poison: bool) -> PagedKV:
    """A page pool; with poison, every code byte is 255 and every scale/offset NaN until written."""
    return R.allocate_pool(num_pages, heads, page_size, head_dim, dtype, code_fill=255 if poison else 0,
                           meta_fill=float("nan") if poison else 0.0)


def random_block_table(batch: int, columns: int, num_pages: int) -> torch.Tensor:
    return torch.randperm(num_pages)[: batch * columns].view(batch, columns).to(torch.int32)


def round_trip(x, mean, block, dtype):
    """What the pages should hold, back in the model frame and dtype: decode(encode(x))."""
    return R.decode(*R.encode(x, mean, block), mean, block).to(dtype)


def sylvester64(block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(block)


def rotate64(x: torch.Tensor, block: int) -> torch.Tensor:
    x = x.double()
    if block == 0:
        return x
    return (x.reshape(*x.shape[:-1], x.shape[-1] // block, block) @ sylvester64(block)).reshape(x.shape)


def decode64(codes, meta, mean, block):
    """An independent float64 decode: offset + code * scale, rotated back, mean added."""
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2).double()
    meta = meta.double()
    y = rotate64(meta[..., 1:2] + q * meta[..., 0:1], block)
    return y if mean is None else y + mean.double()[None, :, None, :]


def plain_attention(q, keys, values, mask, scaling, softcap, sinks, dtype):
    """Softmax attention in `dtype` over all positions. q [B, Hq, nq, D]; keys/values [B, H, T, D];
    mask None (causal, queries at the last nq positions), bool [B, 1, nq, T] or additive float. -> [B, nq, Hq, D]."""
    b, hq, nq, d = q.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
    keys = keys.repeat_interleave(g, dim=1)
    values = values.repeat_interleave(g, dim=1)
    s = (q @ keys.transpose(-1, -2)) * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is None:
        allowed = torch.arange(t)[None, :] <= torch.arange(t - nq, t)[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    else:
        s = s + mask.to(dtype)
    if sinks is not None:
        s = torch.cat([s, sinks.to(dtype)[None, :, None, None].expand(b, hq, nq, 1)], dim=-1)
        values = torch.cat([values, torch.zeros_like(values[:, :, :1])], dim=2)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return (p @ values).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- write/dequant

SHAPE = dict(batch=3, heads=2, head_dim=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("length", [1, 17, 64, 100], ids=lambda n: f"len{n}")
@pytest.mark.parametrize("page_size", [16, 64], ids=lambda p: f"page{p}")
def test_write_pages_then_dequantize_pages_equals_dense_round_trip_bit_exact(page_size, length, dtype):
    b, h, d = SHAPE["batch"], SHAPE["heads"], SHAPE["head_dim"]
    block = 64
    keys = (torch.randn(b, h, length, d) + 2).to(dtype)
    values = torch.randn(b, h, length, d).to(dtype)
    key_mean, value_mean = torch.randn(h, d), torch.randn(h, d) * 0.1
    columns = math.ceil(length / page_size)
    num_pages = 3 * b * columns
    table = random_block_table(b, columns, num_pages)
    clean = empty_pool(num_pages, h, page_size, d, dtype, poison=False)
    poisoned = empty_pool(num_pages, h, page_size, d, dtype, poison=True)
    split = length // 3  # two writes, the second at an unaligned start
    for pool in (clean, poisoned):
        for s0, s1 in ((0, split), (split, length)):
            R.write_pages(pool, table, s0, keys[:, :, s0:s1], values[:, :, s0:s1], key_mean, value_mean, block, True)
    for pool in (clean, poisoned):
        k, v = R.dequantize_pages(pool, table, length, key_mean, value_mean, block, True, dtype)
        assert k.dtype == dtype and k.shape == (b, h, length, d)
        assert torch.equal(k, round_trip(keys, key_mean, block, dtype))
        assert torch.equal(v, round_trip(values, value_mean, block, dtype))
    # Only the pages of the block table were written.
    unused = torch.ones(num_pages, dtype=torch.bool)
    unused[table.flatten().long()] = False
    assert torch.isnan(poisoned.k_meta[unused].float()).all() and (poisoned.v_codes[unused] == 255).all()


@pytest.mark.parametrize("columns", [0, 2], ids=["empty-table", "two-columns"])
def test_dequantize_pages_of_zero_tokens_is_empty_not_an_error(columns):
    pool = empty_pool(6, 2, 16, 64, torch.bfloat16, poison=True)
    table = random_block_table(3, columns, 6)
    k, v = R.dequantize_pages(pool, table, 0, None, None, 64, True, torch.bfloat16)
    assert k.shape == v.shape == (3, 2, 0, 64) and k.dtype == torch.bfloat16


def test_write_pages_stores_each_token_at_its_page_and_slot():
    b, h, d, p = 2, 2, 8, 16
    keys = torch.randn(b, h, 40, d)
    table = torch.tensor([[5, 0, 3], [1, 4, 2]], dtype=torch.int32)
    pool = empty_pool(6, h, p, d, torch.float32, poison=True)
    R.write_pages(pool, table, 0, keys, keys, None, None, 0, False)
    codes, meta = R.encode(keys, None, 0)
    for row in range(b):
        for pos in (0, 15, 16, 31, 39):
            page = table[row, pos // p]
            assert torch.equal(pool.k_codes[page, :, pos % p], codes[row, :, pos])
            assert torch.equal(pool.k_meta[page, :, pos % p], meta[row, :, pos])


@dataclasses.dataclass
class Case:
    name: str
    groups: int = 1
    nq: int = 5
    num_paged: int = 70
    window: int = 3
    mask: str = "none"  # none | left_pad | additive | fully_masked
    softcap: Optional[float] = None
    sinks: bool = False
    key_mean: bool = False
    value_mean: bool = False
    block: int = 64
    rotate_values: bool = True
    dtype: torch.dtype = torch.float32

    def __str__(self):
        return self.name


CASES = [
    *[Case(f"gqa{g}-nq{n}", groups=g, nq=n) for g in (1, 4, 8) for n in (1, 5, 37)],
    Case("left-pad-bool-mask-nq5", mask="left_pad", groups=4),
    Case("left-pad-bool-mask-nq37", mask="left_pad", nq=37, groups=2),
    Case("additive-float-mask", mask="additive", nq=37, groups=4),
    Case("additive-float-mask-nq1", mask="additive", nq=1),
    Case("softcap30", softcap=30.0, groups=4, nq=5),
    Case("softcap30-additive", softcap=30.0, mask="additive", nq=5),
    Case("sinks", sinks=True, groups=4, nq=5),
    Case("sinks-left-pad-softcap", sinks=True, mask="left_pad", softcap=30.0, groups=2, nq=37),
    Case("centered-keys-values-rotate-values", key_mean=True, value_mean=True, rotate_values=True, groups=4),
    Case("centered-keys-values-unrotated-values", key_mean=True, value_mean=True, rotate_values=False, groups=4),
    Case("centered-keys-only-block16", key_mean=True, block=16, nq=37),
    Case("centered-values-only-no-rotation", value_mean=True, block=0, rotate_values=False),
    Case("no-window", window=0, key_mean=True, nq=5),
    Case("no-pages", num_paged=0, window=6, nq=5, groups=2),
    Case("page-multiple", num_paged=64, window=0, nq=1, key_mean=True, value_mean=True),
    Case("bf16-query", dtype=torch.bfloat16, key_mean=True, groups=4, nq=5),
    Case("everything", groups=8, nq=37, mask="left_pad", softcap=30.0, sinks=True, key_mean=True, value_mean=True),
]


def build_inputs(case: Case, page_size: int = 16, batch: int = 3, heads: int = 2, head_dim: int = 64, poison: bool = True):
    b, h, d, dtype = batch, heads, head_dim, case.dtype
    hq = h * case.groups
    total = case.num_paged + case.window + case.nq
    offset = torch.randn(h, d) * 2  # keys with a per-channel offset, as real keys have
    keys = (torch.randn(b, h, total, d) + offset[None, :, None, :]).to(dtype)
    values = (torch.randn(b, h, total, d) + 0.5).to(dtype)
    query = (torch.randn(b, hq, case.nq, d) * 1.5).to(dtype)
    key_mean = keys.float().mean(dim=(0, 2)) if case.key_mean else None
    value_mean = values.float().mean(dim=(0, 2)) if case.value_mean else None
    v_block = case.block if case.rotate_values else 0
    columns = max(math.ceil(case.num_paged / page_size), 1)
    num_pages = 3 * b * columns
    table = random_block_table(b, columns, num_pages)
    pool = empty_pool(num_pages, h, page_size, d, dtype, poison=poison)
    n = case.num_paged
    R.write_pages(pool, table, 0, keys[:, :, :n], values[:, :, :n], key_mean, value_mean, case.block, case.rotate_values)
    # The oracle's view of the paged tokens: decoded in float64 from their own encoding.
    k_paged = decode64(*R.encode(keys[:, :, :n], key_mean, case.block), key_mean, case.block)
    v_paged = decode64(*R.encode(values[:, :, :n], value_mean, v_block), value_mean, v_block)
    all_keys = torch.cat([k_paged, keys[:, :, n:].double()], 2)
    all_values = torch.cat([v_paged, values[:, :, n:].double()], 2)

    mask = None
    if case.mask in ("left_pad", "fully_masked"):
        causal = torch.arange(total)[None, :] <= torch.arange(total - case.nq, total)[:, None]
        pads = [0, 9, 23][:b]
        mask = causal[None, None].repeat(b, 1, 1, 1)
        for row, pad in enumerate(pads):
            mask[row, :, :, :pad] = False
        if case.mask == "fully_masked":
            mask[1, :, 0] = False
            mask[2, :, -1] = False
    elif case.mask == "additive":
        causal = torch.arange(total)[None, :] <= torch.arange(total - case.nq, total)[:, None]
        mask = torch.rand(b, 1, case.nq, total) * 4 - 2
        mask = mask.masked_fill(~causal, torch.finfo(torch.float32).min)
        mask[0, :, :, :11] = torch.finfo(torch.float32).min  # left padding in the additive form too
    sinks = torch.randn(hq) if case.sinks else None
    w0, w1 = n, n + case.window
    args = dict(
        query=query, pool=pool, block_table=table, num_paged=n,
        window_key=keys[:, :, w0:w1] if case.window else None, window_value=values[:, :, w0:w1] if case.window else None,
        chunk_key=keys[:, :, w1:], chunk_value=values[:, :, w1:], mask=mask, scaling=1 / math.sqrt(d),
        softcap=case.softcap, sinks=sinks, key_mean=key_mean, value_mean=value_mean,
        hadamard_block=case.block, rotate_values=case.rotate_values,
    )
    oracle_in = dict(q=query, keys=all_keys, values=all_values, mask=mask, scaling=1 / math.sqrt(d), softcap=case.softcap, sinks=sinks)
    return args, oracle_in


@pytest.fixture
def small_chunks(monkeypatch):
    """Read the pages 32 tokens (2 pages of 16) at a time and the queries 16 at a time: several of each."""
    monkeypatch.setattr(R, "ATTENTION_CHUNK_TOKENS", 32)
    monkeypatch.setattr(R, "QUERY_BLOCK", 16)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_paged_attention_matches_float64_oracle_within_float32_error(case, small_chunks):
    args, oracle_in = build_inputs(case)
    out = R.paged_attention(**args)
    b, hq, nq, d = args["query"].shape
    assert out.shape == (b, nq, hq, d) and out.dtype == case.dtype
    assert torch.isfinite(out).all()
    oracle = plain_attention(**oracle_in, dtype=torch.float64)
    fp32 = plain_attention(**oracle_in, dtype=torch.float32)
    err = (out.double() - oracle).abs().max().item()
    err32 = (fp32.double() - oracle).abs().max().item()
    if case.dtype == torch.float32:
        assert err <= 2 * err32 + 1e-5, (err, err32)
    else:  # the output is rounded to the query dtype: half an ulp of the largest output on top
        assert err <= 2 * err32 + 1e-5 + oracle.abs().max().item() * torch.finfo(case.dtype).eps, (err, err32)


@pytest.mark.parametrize("chunk_tokens", [16, 32, 48, 4096], ids=lambda c: f"chunk{c}")
def test_paged_attention_does_not_depend_on_the_page_chunk_size(chunk_tokens, monkeypatch):
    case = Case("x", groups=2, nq=5, num_paged=100, key_mean=True, value_mean=True, mask="left_pad", sinks=True)
    args, oracle_in = build_inputs(case)
    monkeypatch.setattr(R, "ATTENTION_CHUNK_TOKENS", 1024)
    expected = R.paged_attention(**args)
    monkeypatch.setattr(R, "ATTENTION_CHUNK_TOKENS", chunk_tokens)
    assert torch.allclose(R.paged_attention(**args), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
def test_paged_attention_fully_masked_query_rows_give_zeros_not_nan(sinks, small_chunks):
    case = Case("fully-masked", mask="fully_masked", groups=4, nq=5, sinks=sinks, key_mean=True, value_mean=True)
    args, oracle_in = build_inputs(case)
    out = R.paged_attention(**args)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
    assert torch.equal(out[2, -1], torch.zeros_like(out[2, -1]))
    assert out[0].abs().amax(-1).min() > 0  # rows that attend to something are not zero
    oracle = plain_attention(**oracle_in, dtype=torch.float64)
    assert (out.double() - oracle).abs().max() < 1e-5


def test_paged_attention_and_dequantize_ignore_poisoned_unwritten_slots(small_chunks):
    """Pages and slots that hold no token (NaN meta, 255 codes) never reach the output."""
    case = Case("poison", groups=4, nq=5, num_paged=70, key_mean=True, value_mean=True, mask="left_pad", sinks=True)
    torch.manual_seed(1)
    args, _ = build_inputs(case)
    torch.manual_seed(1)
    clean_args, _ = build_inputs(case, poison=False)  # the same tokens, zeros wherever nothing was written
    clean = clean_args["pool"]
    assert torch.equal(clean_args["block_table"], args["block_table"])
    # Sanity: the poisoned pool really has NaN meta in unwritten slots of used pages (70 = 4 pages + 6 slots).
    last_pages = args["block_table"][:, 4].long()
    assert torch.isnan(args["pool"].k_meta[last_pages, :, 6:].float()).all()
    out = R.paged_attention(**args)
    clean_out = R.paged_attention(**{**args, "pool": clean})
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean_out)
    extra = (args["key_mean"], args["value_mean"], case.block, case.rotate_values, torch.float32)
    k, v = R.dequantize_pages(args["pool"], args["block_table"], 70, *extra)
    k2, v2 = R.dequantize_pages(clean, args["block_table"], 70, *extra)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    assert torch.equal(k, k2) and torch.equal(v, v2)


# ------------------------------------------------------------------------------------------- centering exact


@pytest.mark.parametrize("block", [0, 2, 16, 64], ids=lambda b: f"block{b}")
def test_centering_identity_rot_q_dot_rot_k_minus_mu_plus_q_dot_mu_equals_q_dot_k(block):
    d = 64
    q, k, mu = torch.randn(7, d, dtype=torch.float64), torch.randn(11, d, dtype=torch.float64) + 3, torch.randn(d, dtype=torch.float64)
    exact = q @ k.T
    centered = rotate64(q, block) @ rotate64(k - mu, block).T + (q @ mu)[:, None]
    assert torch.allclose(centered, exact, atol=1e-12, rtol=0)
    # The float32 rotation of the implementation satisfies it too, to float32 accuracy.
    impl = R.rotate(q, block) @ R.rotate(k - mu, block).T + (q.float() @ mu.float())[:, None]
    assert torch.allclose(impl.double(), exact, atol=1e-4, rtol=0)


@pytest.mark.parametrize("block,rotate_values", [(0, False), (16, True), (64, True), (64, False)], ids=["block0", "block16", "block64", "block64-unrotated-values"])
def test_paged_attention_with_and_without_centering_agree_on_exactly_representable_data(block, rotate_values):
    """Keys/values constant per token and constant means: INT4 is (nearly) exact with or without centering, so the
    two must agree and match attention on the raw data."""
    b, h, g, n, d, p = 2, 2, 4, 50, 64, 16
    c_k = torch.randint(-16, 16, (b, h, n, 1)).float() / 4
    c_v = torch.randint(-16, 16, (b, h, n, 1)).float() / 8
    keys, values = c_k.expand(b, h, n, d).contiguous(), c_v.expand(b, h, n, d).contiguous()
    query = torch.randn(b, h * g, 3, d)
    chunk_k, chunk_v = torch.randn(b, h, 3, d), torch.randn(b, h, 3, d)
    results = []
    for key_mean, value_mean in ((None, None), (torch.full((h, d), 1.25), torch.full((h, d), -0.5))):
        table = random_block_table(b, math.ceil(n / p), 3 * b * math.ceil(n / p))
        pool = empty_pool(table.numel() * 3, h, p, d, torch.float32, poison=True)
        R.write_pages(pool, table, 0, keys, values, key_mean, value_mean, block, rotate_values)
        results.append(R.paged_attention(
            query, pool, table, n, None, None, chunk_k, chunk_v, None, 1 / math.sqrt(d),
            key_mean=key_mean, value_mean=value_mean, hadamard_block=block, rotate_values=rotate_values,
        ))
    exact = plain_attention(query, torch.cat([keys, chunk_k], 2), torch.cat([values, chunk_v], 2), None,
                            1 / math.sqrt(d), None, None, torch.float64)
    assert torch.allclose(results[0].double(), exact, atol=1e-5, rtol=0)
    assert torch.allclose(results[1].double(), exact, atol=1e-5, rtol=0)
    assert torch.allclose(results[0], results[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- PagedKVStore


def make_store(residual_length=0, page_size=16, center_keys="auto", center_values=False, block=64, layer_idx=0, rotate_values=True):
    config = SawInt4Config(
        hadamard_block=block, rotate_values=rotate_values, center_keys=center_keys, center_values=center_values,
        residual_length=residual_length, page_size=page_size, backend="torch",
    )
    return PagedKVStore(config, layer_idx)


def expected_content(store: PagedKVStore, keys, values):
    """What store.dequantize() must return for these inputs: round trip for the paged part, exact window."""
    n = store.num_paged
    block = store.config.hadamard_block
    v_block = block if store.config.rotate_values else 0
    k = torch.cat([round_trip(keys[:, :, :n], store.key_mean, block, keys.dtype), keys[:, :, n:]], 2)
    v = torch.cat([round_trip(values[:, :, :n], store.value_mean, v_block, keys.dtype), values[:, :, n:]], 2)
    return k, v


def kv(b, h, n, d=64, dtype=torch.bfloat16):
    offset = torch.randn(h, d) * 3
    return (torch.randn(b, h, n, d) + offset[None, :, None, :]).to(dtype), torch.randn(b, h, n, d).to(dtype)


def feed(store, keys, values, pieces):
    start, before = 0, store.length
    for size in pieces:
        past = store.append(keys[:, :, start : start + size], values[:, :, start : start + size])
        assert past == before + start
        start += size
    assert start == keys.shape[2]


@pytest.mark.parametrize("residual_length", [0, 5, 64], ids=lambda r: f"window{r}")
@pytest.mark.parametrize("centering", [(False, False), ("auto", False), (True, True)], ids=["uncentered", "auto-keys", "centered-kv"])
def test_store_prefill_then_steps_dequantizes_to_window_exact_and_pages_round_trip(residual_length, centering):
    b, h, total = 2, 2, 90
    store = make_store(residual_length, center_keys=centering[0], center_values=centering[1])
    keys, values = kv(b, h, total)
    feed(store, keys, values, [70] + [1] * 20)
    assert store.length == total and store.num_paged == total - residual_length
    if centering[0] is True:
        assert store.key_mean is not None and store.value_mean is not None
    k, v = store.dequantize()
    assert k.dtype == torch.bfloat16 and k.shape == keys.shape
    r = residual_length
    if r:
        assert torch.equal(k[:, :, -r:], keys[:, :, -r:]) and torch.equal(v[:, :, -r:], values[:, :, -r:])
    ek, ev = expected_content(store, keys, values)
    assert torch.equal(k, ek) and torch.equal(v, ev)
    # Paged tokens really are quantized (not stored exactly).
    assert not torch.equal(k[:, :, : total - r], keys[:, :, : total - r])
    # A prefix of the cache can be read too.
    k40, _ = store.dequantize(40)
    assert torch.equal(k40, ek[:, :, :40])


@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
@pytest.mark.parametrize("chunk", [1, 3, 12], ids=lambda n: f"chunk{n}")
def test_store_append_then_attend_matches_attention_over_dequantized_past_and_raw_chunk(residual_length, chunk):
    """The model's flow: append the chunk, then attend with past_length = the length before it. Even when the
    chunk pushed window tokens (or itself) into the pages, the past is read as stored and the chunk exactly.
    (Chunk 12 > window 5: part of the chunk is already in the pages and must not be read from there.)"""
    store = make_store(residual_length=residual_length, center_keys=True, center_values=True)
    keys, values = kv(2, 2, 53 + chunk, dtype=torch.float32)
    feed(store, keys[:, :, :53], values[:, :, :53], [50, 1, 1, 1])
    ck, cv = keys[:, :, 53:], values[:, :, 53:]
    past = store.append(ck, cv)
    assert past == 53
    past_k, past_v = store.dequantize(past)  # the past as stored now (window tokens the chunk evicted: quantized)
    if residual_length > chunk:
        assert torch.equal(past_k[:, :, -1], keys[:, :, 52])  # the newest past token is still exact
    q = torch.randn(2, 8, chunk, 64)
    out = store.attend(q, ck, cv, past, None, 0.125)
    oracle = plain_attention(q, torch.cat([past_k, ck], 2).double(), torch.cat([past_v, cv], 2).double(), None, 0.125, None, None, torch.float64)
    assert torch.allclose(out.double(), oracle, atol=1e-5, rtol=0)


@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
@pytest.mark.parametrize("then", ["attend", "attend another chunk", "dequantize", "crop", "select", "export",
                                  "append"])
def test_a_deferred_decode_append_is_written_before_anything_reads_the_store(residual_length, then):
    """append(defer=True) of a decode step's token leaves the write to the next attend of that very chunk (one
    launch on the Triton backend); any other use of the store first writes it. Either way the store ends up as
    one that appended at once."""
    keys, values = kv(2, 2, 60)
    stores = [make_store(residual_length=residual_length, center_keys=True) for _ in range(2)]
    for store in stores:
        feed(store, keys[:, :, :57], values[:, :, :57], [50, 3, 1, 1, 1, 1])
    token_k, token_v = keys[:, :, 57:58], values[:, :, 57:58]
    deferred, direct = stores
    assert deferred.append(token_k, token_v, defer=True) == direct.append(token_k, token_v) == 57
    assert deferred.length == 58 and deferred.num_paged == direct.num_paged
    q = torch.randn(2, 8, 1, 64).to(torch.bfloat16)
    for store in stores:
        same = then != "attend another chunk" or store is direct
        chunk = (token_k, token_v) if same else (token_k.clone(), token_v.clone())
        if then.startswith("attend"):
            store.outputs = store.attend(q, *chunk, 57, None, 0.125)
        elif then == "dequantize":
            store.outputs = store.dequantize()[1]
        elif then == "crop":
            store.crop(55)
        elif then == "select":
            store.select(torch.tensor([1, 0]))
        elif then == "export":
            store.outputs = store.export_state()["pages"].k_codes
        elif then == "append":
            store.append(keys[:, :, 58:], values[:, :, 58:])
    assert deferred._pending is None
    if then.startswith("attend") or then in ("dequantize", "export"):
        assert torch.equal(deferred.outputs, direct.outputs)
    for a, b in zip(deferred.dequantize(), direct.dequantize()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("crop_to", [37, 48, 0], ids=lambda n: f"crop{n}")
def test_store_crop_then_append_equals_fresh_store_and_frees_pages(crop_to):
    b, h = 2, 2
    keys, values = kv(b, h, 80)
    new_k, new_v = kv(b, h, 20)
    store = make_store(0, center_keys=False)
    feed(store, keys, values, [70] + [1] * 10)
    free_before = len(store.free_pages)
    in_use_before = store.pages_in_use()
    store.crop(crop_to)
    assert store.length == crop_to
    freed = b * (math.ceil(80 / 16) - math.ceil(crop_to / 16))
    assert len(store.free_pages) == free_before + freed and freed > 0
    assert store.pages_in_use() == in_use_before - freed
    feed(store, new_k, new_v, [5] + [1] * 15) if crop_to else store.append(new_k, new_v)
    fresh = make_store(0, center_keys=False)
    if crop_to:
        fresh.append(keys[:, :, :crop_to], values[:, :, :crop_to])
    fresh.append(new_k, new_v)
    k, v = store.dequantize()
    fk, fv = fresh.dequantize()
    assert k.shape == (b, h, crop_to + 20, 64)
    assert torch.equal(k, fk) and torch.equal(v, fv)


@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
def test_store_crop_with_centering_keeps_means_and_content(residual_length):
    keys, values = kv(2, 2, 80)
    store = make_store(residual_length, center_keys=True, center_values=True)
    feed(store, keys, values, [70] + [1] * 10)
    means = store.key_mean.clone(), store.value_mean.clone()
    store.crop(41)
    new_k, new_v = kv(2, 2, 12)
    feed(store, new_k, new_v, [4] + [1] * 8)
    assert torch.equal(store.key_mean, means[0]) and torch.equal(store.value_mean, means[1])
    full_k, full_v = torch.cat([keys[:, :, :41], new_k], 2), torch.cat([values[:, :, :41], new_v], 2)
    k, v = store.dequantize()
    ek, ev = expected_content(store, full_k, full_v)
    assert torch.equal(k, ek) and torch.equal(v, ev)


@pytest.mark.parametrize("residual_length", [0, 5], ids=lambda r: f"window{r}")
def test_store_select_with_repeated_rows_copies_shared_partial_page_on_write(residual_length):
    b, h = 3, 2
    keys, values = kv(b, h, 70)
    store = make_store(residual_length, center_keys=True)
    store.append(keys, values)
    assert store.num_paged % 16  # the last page is partial, so the next write goes into it
    in_use = store.pages_in_use()
    free_before = len(store.free_pages)
    indices = torch.tensor([0, 0, 2])
    store.select(indices)
    cols = math.ceil(store.num_paged / 16)
    assert store.pages_in_use() == in_use - cols  # row 1's pages were freed ...
    assert len(store.free_pages) == free_before + cols  # ... into the free list
    new_k, new_v = kv(b, h, 3)
    feed(store, new_k, new_v, [1, 1, 1])
    assert math.ceil(store.num_paged / 16) == cols  # the new tokens fit in the shared partial page ...
    assert store.pages_in_use() == in_use - cols + 1  # ... which row 1 got a private copy of
    # Expected: every row is its source row followed by its own new tokens.
    exp_k = torch.cat([keys[indices], new_k], 2)
    exp_v = torch.cat([values[indices], new_v], 2)
    k, v = store.dequantize()
    ek, ev = expected_content(store, exp_k, exp_v)
    assert torch.equal(k, ek) and torch.equal(v, ev)
    # Rows 0 and 1 share the past but diverge in the new tokens.
    assert torch.equal(k[0, :, :60], k[1, :, :60]) and not torch.equal(k[0, :, -3:], k[1, :, -3:])


def test_store_select_reorder_then_crop_into_shared_page_then_append():
    keys, values = kv(3, 2, 70)
    store = make_store(0, center_keys=False)
    store.append(keys, values)
    indices = torch.tensor([2, 2, 0])
    store.select(indices)
    store.crop(40)  # mid-page of a page rows 0 and 1 share
    new_k, new_v = kv(3, 2, 9)
    feed(store, new_k, new_v, [2, 7])
    k, v = store.dequantize()
    ek, ev = expected_content(store, torch.cat([keys[indices, :, :40], new_k], 2), torch.cat([values[indices, :, :40], new_v], 2))
    assert torch.equal(k, ek) and torch.equal(v, ev)


def test_store_reset_frees_every_page_and_memory_footprint_is_zero():
    store = make_store(residual_length=5, center_keys=True)
    keys, values = kv(2, 2, 60)
    feed(store, keys, values, [50, 10])
    assert store.memory_footprint() > 0
    pool_pages = store.pool.k_codes.shape[0]
    store.reset()
    assert sorted(store.free_pages) == list(range(pool_pages))
    assert store.memory_footprint() == 0 and store.length == 0
    # The store is usable again (and reuses its pool) after a reset, even with another batch size.
    keys, values = kv(1, 2, 30)
    store.append(keys, values)
    assert store.pool.k_codes.shape[0] == pool_pages
    k, v = store.dequantize()
    ek, ev = expected_content(store, keys, values)
    assert torch.equal(k, ek) and torch.equal(v, ev)


def test_store_pool_growth_keeps_old_pages_intact():
    b, h, total = 4, 2, 400
    keys, values = kv(b, h, total)
    store = make_store(0, center_keys=True)
    sizes, start = [], 0
    while start < total:
        n = min(7 if start else 20, total - start)
        store.append(keys[:, :, start : start + n], values[:, :, start : start + n])
        start += n
        sizes.append(store.pool.k_codes.shape[0])
    assert len(set(sizes)) >= 4, sizes  # the pool grew several times
    k, v = store.dequantize()
    ek, ev = expected_content(store, keys, values)
    assert torch.equal(k, ek) and torch.equal(v, ev)


def test_a_pool_growth_that_runs_out_of_memory_keeps_the_cache_readable_and_growable(monkeypatch):
    keys, values = kv(2, 2, 120)
    store = make_store(0, center_keys=True)
    store.append(keys[:, :, :20], values[:, :, :20])
    real_empty, calls = torch.empty, []

    def empty_failing_third(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("out of memory (test)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty_failing_third)
    with pytest.raises(torch.OutOfMemoryError):
        store.append(keys[:, :, 20:100], values[:, :, 20:100])
    monkeypatch.undo()
    assert len({t.shape[0] for t in store.pool}) == 2  # failed after two of the four buffers had grown
    assert store.length == 20
    k, v = store.dequantize()
    ek, ev = expected_content(store, keys[:, :, :20], values[:, :, :20])
    assert torch.equal(k, ek) and torch.equal(v, ev)
    store.append(keys[:, :, 20:], values[:, :, 20:])  # grows again from the pages that are valid everywhere
    k, v = store.dequantize()
    ek, ev = expected_content(store, keys, values)
    assert torch.equal(k, ek) and torch.equal(v, ev)


@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 4)], ids=["b1h1", "b2h4"])
def test_store_memory_footprint_is_pages_times_page_bytes_and_under_029_of_bf16(batch, heads):
    t, d, p = 2048, 64, 64
    store = make_store(0, page_size=p, center_keys=False, center_values=False)
    keys, values = kv(batch, heads, t, d)
    feed(store, keys, values, [1000, 1000, 48])
    page_bytes = heads * p * (d // 2 + 2 * 2) * 2  # codes + bf16 (scale, offset), keys and values
    pages = batch * math.ceil(t / p)
    assert store.page_bytes() == page_bytes
    assert store.memory_footprint() == pages * page_bytes
    bf16_bytes = 2 * batch * heads * t * d * 2
    assert store.memory_footprint() <= 0.29 * bf16_bytes
    # With centering and a window, those are counted too.
    store2 = make_store(16, page_size=p, center_keys=True, center_values=True)
    feed(store2, keys, values, [2048])
    extra = 2 * heads * d * 4 + 2 * batch * heads * 16 * d * 2
    assert store2.memory_footprint() == batch * math.ceil((t - 16) / p) * page_bytes + extra


# ---------------------------------------------------------------------------------------------- bad input


def test_store_rejects_odd_head_dim():
    store = make_store(layer_idx=3, block=0)
    x = torch.randn(1, 2, 4, 63)
    with pytest.raises(ValueError, match=r"layer 3.*head dim 63 is odd"):
        store.append(x, x)


def test_store_rejects_head_dim_not_divisible_by_hadamard_block():
    store = make_store(layer_idx=7, block=64)
    x = torch.randn(1, 2, 4, 48)
    with pytest.raises(ValueError, match=r"layer 7.*head dim 48.*hadamard_block=64"):
        store.append(x, x)


def test_store_rejects_batch_size_change_on_non_empty_store():
    store = make_store(layer_idx=2)
    store.append(*kv(2, 2, 5))
    with pytest.raises(ValueError, match=r"layer 2.*batch size changed from 2 to 3.*reset\(\)"):
        store.append(*kv(3, 2, 1))


def test_store_rejects_dtype_change():
    store = make_store(layer_idx=1)
    store.append(*kv(2, 2, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"layer 1.*float16.*bfloat16.*reset\(\)"):
        store.append(*kv(2, 2, 1, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float64], ids=["int32", "int8", "fp64"])
def test_store_rejects_unsupported_dtype(dtype):
    store = make_store(layer_idx=4)
    x = torch.ones(1, 2, 3, 64, dtype=dtype)
    with pytest.raises(ValueError, match=r"layer 4.*dtype must be one of float32, float16, bfloat16"):
        store.append(x, x)


# ------------------------------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(hadamard_block=3), "hadamard_block"),
        (dict(hadamard_block=-1), "hadamard_block"),
        (dict(hadamard_block=True), "hadamard_block"),
        (dict(hadamard_block=1), "hadamard_block"),
        (dict(page_size=8), "page_size"),
        (dict(page_size=100), "page_size"),
        (dict(residual_length=-1), "residual_length"),
        (dict(center_keys="yes"), "center_keys"),
        (dict(center_values=1), "center_values"),
        (dict(rotate_values="no"), "rotate_values"),
        (dict(backend="cuda"), "backend"),
    ],
    ids=lambda v: "-".join(f"{k}={val!r}" for k, val in v.items()) if isinstance(v, dict) else None,
)
def test_config_rejects_invalid_field_value_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SawInt4Config\.{field}"):
        SawInt4Config(**kwargs)


def test_config_accepts_valid_values():
    config = SawInt4Config(hadamard_block=0, center_keys="auto", center_values=True, residual_length=0, page_size=16, backend="torch")
    assert config.to_dict()["page_size"] == 16
    assert SawInt4Config(hadamard_block=128, page_size=256).hadamard_block == 128
