"""Per-step Python overhead of one decode step: SawInt4Cache against DynamicCache, on the CPU.

    python benchmarks/step_overhead.py [--steps 200] [--contexts 64,1024] [--profile]

A 2-layer Llama with hidden size 64 (head dim 16, 2 KV heads) in float32, one CPU thread, batch 1: the tensors
are so small that a step's time is Python and dispatcher overhead, which is what this measures. Two tables:

* "model step": one decode forward of the whole model (embedding, 2 layers, LM head): the mean over `--steps`
  steps after a prefill of `context` tokens, best of `--repeats` (other processes only ever add time);
* "cache + attention": only what differs between the caches, per layer: `cache.update(k, v, layer)` followed by
  the attention call (sdpa for DynamicCache, saw_int4 for SawInt4Cache), on the same shapes;
* "bookkeeping only": the same with the math taken out, to isolate the cache's own Python work: for
  SawInt4Cache the backend's write_pages/paged_attention are replaced by stubs (paged.py, cache.py and the
  attention glue still run in full); for DynamicCache only `cache.update` runs (its torch.cat stays: that is
  its bookkeeping).

Rows: DynamicCache with sdpa; SawInt4Cache (backend="torch", attn_implementation="saw_int4") in eager dynamic
mode, with and without a 64-token full-precision window; and the static mode (max_batch_size/max_cache_len)
when this version of the package has it. `--profile` prints the cProfile top functions of each cache's steps.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import transformers
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import saw_kvcache  # noqa: F401  (registers attn_implementation="saw_int4")
from saw_kvcache import SawInt4Cache
from saw_kvcache.integration.attention import saw_int4_attention_forward
from saw_kvcache.integration.compat import cache_kwarg_name

KW = cache_kwarg_name()
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=8192, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def static_supported() -> bool:
    try:
        SawInt4Cache(max_batch_size=1, max_cache_len=16)
        return True
    except TypeError:
        return False


def cases(max_len: int):
    """(name, attn_implementation, cache factory)."""
    rows = [
        ("DynamicCache (sdpa)", "sdpa", lambda: DynamicCache()),
        ("SawInt4Cache eager", "saw_int4", lambda: SawInt4Cache(backend="torch", hadamard_block=16, residual_length=0)),
        ("SawInt4Cache eager, R=64", "saw_int4", lambda: SawInt4Cache(backend="torch", hadamard_block=16, residual_length=64)),
    ]
    if static_supported():
        rows.append((
            "SawInt4Cache static", "saw_int4",
            lambda: SawInt4Cache(backend="torch", hadamard_block=16, residual_length=0, max_batch_size=1, max_cache_len=max_len),
        ))
    return rows


def time_model_steps(model, attn, make_cache, context: int, steps: int, repeats: int, profiler=None) -> float:
    """Microseconds of one decode forward after a prefill of `context` tokens (best of `repeats`)."""
    model.set_attn_implementation(attn)
    prompt = torch.randint(3, 160, (1, context))
    token = torch.randint(3, 160, (1, 1))
    per_step = []
    with torch.no_grad():
        for _ in range(repeats):
            cache = make_cache()
            model(prompt, **{KW: cache}, use_cache=True)
            for _ in range(3):  # warm-up steps (the saw_int4 attention switches to reading pages after one)
                model(token, **{KW: cache}, use_cache=True)
            gc.collect()
            if profiler:
                profiler.enable()
            start = time.perf_counter()
            for _ in range(steps):
                model(token, **{KW: cache}, use_cache=True)
            per_step.append((time.perf_counter() - start) / steps * 1e6)
            if profiler:
                profiler.disable()
    return min(per_step)


class _Module:
    """What the attention functions read from the attention module."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True
    training = False


def _stub_paged_attention(query, *args, **kwargs):
    b, hq, nq, d = query.shape
    return torch.empty(b, nq, hq, d, dtype=query.dtype, device=query.device)


STUB_BACKEND = SimpleNamespace(
    name="stub", write_pages=lambda *args, **kwargs: None, append_with_window=lambda *args, **kwargs: None,
    append_from_state=lambda *args, **kwargs: None,
    paged_attention=_stub_paged_attention, dequantize_pages=None,
)


def time_cache_steps(attn, make_cache, context: int, steps: int, repeats: int, layers: int = 2,
                     bookkeeping_only: bool = False) -> float:
    """Microseconds of `layers` x (cache.update + attention) for one new token after `context` tokens (best of
    `repeats`).
    With bookkeeping_only, SawInt4Cache's backend math is stubbed out and DynamicCache skips the attention."""
    attention = sdpa_attention_forward if attn == "sdpa" else saw_int4_attention_forward
    if bookkeeping_only and attn == "sdpa":
        attention = lambda *args, **kwargs: None  # noqa: E731
    module = _Module()
    k0 = torch.randn(1, KV_HEADS, context, HEAD_DIM)
    k1 = torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    q1 = torch.randn(1, HEADS, 1, HEAD_DIM)
    per_step = []
    with torch.no_grad():
        for _ in range(repeats):
            cache = make_cache()
            for layer in range(layers):  # prefill, then one step so that saw_int4 reads the pages from then on
                keys, values = cache.update(k0, k0, layer)
                attention(module, torch.randn(1, HEADS, context, HEAD_DIM), keys, values, None, scaling=0.25)
            for _ in range(2):
                for layer in range(layers):
                    keys, values = cache.update(k1, k1, layer)
                    attention(module, q1, keys, values, None, scaling=0.25)
            if bookkeeping_only and isinstance(cache, SawInt4Cache):
                for layer in cache.layers:
                    layer.store.backend = STUB_BACKEND
            gc.collect()
            start = time.perf_counter()
            for _ in range(steps):
                for layer in range(layers):
                    keys, values = cache.update(k1, k1, layer)
                    attention(module, q1, keys, values, None, scaling=0.25)
            per_step.append((time.perf_counter() - start) / steps * 1e6)
    return min(per_step)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps per timing (default 200)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per case; the best is reported")
    parser.add_argument("--contexts", default="64,1024", help="comma-separated prefill lengths (default 64,1024)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions per cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    max_len = max(contexts) + args.steps + 8
    model = tiny_llama()
    rows = cases(max_len)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 1 CPU thread, batch 1, float32")
    print(f"2-layer Llama, hidden 64, 4 query / 2 KV heads, head dim 16; {args.steps} steps x {args.repeats} repeats\n")
    tables = (("model step", "model"), ("cache + attention (2 layers)", "cache"), ("bookkeeping only (2 layers)", "book"))
    for title, kind in tables:
        header = f"| {title} | " + " | ".join(f"us/step @ {c}" for c in contexts) + " | vs DynamicCache |"
        print(header)
        print("|" + "---|" * (len(contexts) + 2))
        base = None
        for name, attn, make in rows:
            if kind == "model":
                values = [time_model_steps(model, attn, make, c, args.steps, args.repeats) for c in contexts]
            else:
                values = [time_cache_steps(attn, make, c, args.steps, args.repeats, bookkeeping_only=kind == "book")
                          for c in contexts]
            base = base or values
            ratio = " / ".join(f"{v / b:.2f}x" for v, b in zip(values, base))
            print(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in values) + f" | {ratio} |")
        print()
    if args.profile:
        for name, attn, make in rows:
            profiler = cProfile.Profile()
            time_model_steps(model, attn, make, contexts[-1], args.steps, 1, profiler)
            print(f"=== {name}: cProfile of {args.steps} steps at context {contexts[-1]}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
