"""`saw-kvcache bench` smoke test: the tiny shape, two eager caches, two cases, on the CPU (a few seconds)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from saw_kvcache import cli
from saw_kvcache.bench.methods import all_methods, kv_bytes


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_command_writes_json_markdown_and_plots_with_consistent_numbers(tmp_path, capsys):
    argv = [
        "bench", "--model", "tiny", "--layers", "1", "--cases", "1x24,2x40", "--new-tokens", "3",
        "--methods", "saw-eager,dynamic,quanto", "--saw-config", "residual_length=0,page_size=16,backend=torch",
        "--capacity-context", "1024", "--capacity", "estimate", "--capacity-memory-gb", "0.5",
        "--out", str(tmp_path), "--name", "smoke", "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.load(open(tmp_path / "smoke.json"))
    assert os.path.exists(tmp_path / "smoke.md") and "| SawInt4Cache eager | warm | 2 | 40 | ok |" in printed
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2  # methods x cases x (first, warm)
    assert {(r["method"], r["batch"], r["context"], r["pass"]) for r in rows} == {
        (m, b, c, p) for m in ("saw-eager", "dynamic") for b, c in ((1, 24), (2, 40)) for p in ("first", "warm")
    }
    for r in rows:
        assert r["status"] == "ok" and r["new_tokens"] == 3
        assert r["prefill_s"] > 0 and r["decode_ms_per_step"] > 0
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] / (r["decode_ms_per_step"] / 1e3))
    by = {(r["method"], r["batch"], r["pass"]): r for r in rows}
    # DynamicCache in float32: 2 (K, V) x 2 KV heads x 32 dims x 4 bytes x 1 layer per token, exactly.
    assert by[("dynamic", 2, "warm")]["kv_bytes_per_token"] == 2 * 2 * 32 * 4
    # SawInt4Cache: 16 code bytes + 8 meta bytes (float32) per token-head for K and V, in whole pages of 16 slots.
    pages = 2 * -(-(40 + 3 - 1) // 16)
    assert by[("saw-eager", 2, "warm")]["kv_bytes_in_use"] == pages * 16 * 2 * 2 * (16 + 8)
    assert result["skipped"][0]["method"] == "quanto" or result["skipped"] == []
    capacity = {r["method"]: r for r in result["capacity"]["rows"]}
    assert capacity["dynamic"]["batch"] == int(0.9 * 0.5 * 2**30 // (512 * 1024))
    assert capacity["saw-eager"]["batch"] > 2 * capacity["dynamic"]["batch"]
    ratios = {r["method"]: r["ratios"] for r in result["ratios"]}
    assert ratios["dynamic"] == [1.0, 1.0]
    if "no plots" not in printed:  # matplotlib installed
        assert os.path.getsize(tmp_path / "smoke_throughput.png") > 0
        assert os.path.getsize(tmp_path / "smoke_capacity.png") > 0


def test_bench_rejects_unknown_model_and_bad_cases(capsys):
    assert cli.main(["bench", "--model", "no-such-shape", "--cases", "1x8", "--no-progress"]) == 2
    assert "unknown model 'no-such-shape'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--cases", "8192"])
    assert cli._cases("1x8k, 16x8192") == [(1, 8192), (16, 8192)]


def test_kv_bytes_counts_each_storage_once():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 8)
    cache.update(k, k.clone(), 0)
    assert kv_bytes(cache) == (2 * 5 * 8 * 4 * 2, 2 * 5 * 8 * 4 * 2)
    assert set(all_methods({})) >= {"saw-eager", "saw-compiled", "dynamic", "static-compiled", "quanto", "hqq"}


def test_bench_prefills_in_chunks_of_prefill_chunk_tokens(monkeypatch):
    from saw_kvcache import bench

    lengths = []
    build = bench.build_model

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        model.model.register_forward_pre_hook(
            lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        return model

    monkeypatch.setattr(bench, "build_model", build_and_watch)
    result = bench.run_bench(
        "tiny", cases=[(2, 40)], methods=["saw-eager", "dynamic"], new_tokens=2, layers=1, warm=False,
        saw_fields=dict(residual_length=0, page_size=16, backend="torch"), capacity_context=None,
        prefill_chunk=16, progress=False,
    )
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]
    assert result["meta"]["prefill_chunk"] == 16
    per_method = len(lengths) // 2
    assert lengths[:per_method] == lengths[per_method:]
    prefill, decode = lengths[: per_method - 1], lengths[per_method - 1 : per_method]
    assert max(prefill) == 16 and sum(prefill) == 40 and decode == [1]
    with pytest.raises(ValueError, match="prefill_chunk"):
        bench.run_bench("tiny", prefill_chunk=0, progress=False)


def test_bench_fill_prompt_decodes_after_a_filled_cache(monkeypatch):
    """fill_prompt: no prefill forward; the cache holds the prompt's first tokens, so generate() runs the last
    prompt token and then one token per forward, at the positions after the prompt."""
    from saw_kvcache import bench

    calls = []
    build = bench.build_model

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        model.model.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(
                (kwargs["input_ids"].shape[1], kwargs["past_key_values" if "past_key_values" in kwargs else "cache"]
                 .get_seq_length())), with_kwargs=True)
        return model

    monkeypatch.setattr(bench, "build_model", build_and_watch)
    result = bench.run_bench(
        "tiny", cases=[(2, 40)], methods=["saw-eager", "dynamic"], new_tokens=3, layers=1, warm=False,
        saw_fields=dict(residual_length=4, page_size=16, backend="torch"), capacity_context=None,
        fill_prompt=True, progress=False,
    )
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]
    assert all(r["prefill_s"] is None and "random tokens" in r["note"] for r in result["rows"])
    assert result["meta"]["fill_prompt"] is True
    assert calls == [(1, 39), (1, 40), (1, 41)] * 2
    with pytest.raises(ValueError, match="fill_prompt"):
        bench.run_bench("tiny", fill_prompt=True, prefill_chunk=16, progress=False)


def test_the_recorded_commit_is_saw_commit_when_set(monkeypatch):
    """A copy of the tree whose .git is not its own (a GPU machine's) names its commit through $SAW_COMMIT."""
    from saw_kvcache.bench import _commit

    monkeypatch.setenv("SAW_COMMIT", "abc1234")
    assert _commit() == "abc1234"
    monkeypatch.delenv("SAW_COMMIT")
    assert _commit() != "abc1234"
