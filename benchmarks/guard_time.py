"""How long torch.compile's guard check of a decode step takes with a static SawInt4Cache and with StaticCache (CPU).

    python benchmarks/guard_time.py [--layers 32] [--window 64] [--calls 2000]

Before every replay of a compiled step, dynamo checks its guards: the types, shapes, strides and dtypes of every
tensor the step reads (the cache's buffers included) and the Python values it depends on. That check is host time
between two decode steps. This compiles the decode step of a tiny Llama with `--layers` layers (backend "eager":
guards are the same whatever the backend), then times the compiled entry's guard check directly
(`guard_manager.check`, the median of 5 timings of `--calls` checks, in the step's grad mode). The cache's share grows with its buffers per
layer: a static SawInt4Cache layer reads 8 (4 pool tensors, block table, lengths, 2 window buffers; `--window 0`
drops the window's), a StaticCache layer 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny_models import tiny_model  # noqa: E402

from saw_kvcache import SawInt4Cache, SawInt4Config  # noqa: E402
from saw_kvcache.integration.compat import cache_kwarg_name  # noqa: E402


def guard_check_us(model, make_cache, attn: str, calls: int) -> float:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model.set_attn_implementation(attn)
    torch._dynamo.reset()
    kwarg = cache_kwarg_name()

    def step(input_ids, cache, cache_position, position_ids):
        return model(input_ids=input_ids, cache_position=cache_position, position_ids=position_ids, use_cache=True,
                     **{kwarg: cache})

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    cache = make_cache()
    prompt = torch.randint(3, 160, (1, 13))
    with torch.no_grad():
        model(prompt, use_cache=True, **{kwarg: cache})
        token = prompt[:, -1:]
        for position in (13, 14, 15):
            where = torch.tensor([position])
            compiled(token, cache, where, where[None])
        entries = _debug_get_cache_entry_list(step.__code__)
        where = torch.tensor([16])
        # the frame of `step`: its arguments and the variables it closes over
        frame = dict(input_ids=token, cache=cache, cache_position=where, position_ids=where[None], model=model,
                     kwarg=kwarg)
        passing = [entry.guard_manager for entry in entries if entry.guard_manager.check(frame)]
        if not passing:
            raise RuntimeError("no compiled entry's guards pass on the next step's inputs: it would recompile")
        guards = passing[0]
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                guards.check(frame)
            times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--window", type=int, default=64, help="SawInt4Cache residual_length (0: no window buffers)")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    from transformers import StaticCache

    torch.set_num_threads(1)
    model = tiny_model("llama", head_dim=32, num_hidden_layers=args.layers)
    config = SawInt4Config(hadamard_block=32, residual_length=args.window, page_size=16, backend="torch")
    rows = [
        (f"SawInt4Cache static (window {args.window})",
         guard_check_us(model, lambda: SawInt4Cache(config, max_batch_size=1, max_cache_len=64), "saw_int4",
                        args.calls)),
        ("StaticCache", guard_check_us(model, lambda: StaticCache(config=model.config, max_cache_len=64), "sdpa",
                                       args.calls)),
    ]
    print(f"tiny Llama, {args.layers} layers, torch {torch.__version__}: guard check per decode step")
    print("| cache | us |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
