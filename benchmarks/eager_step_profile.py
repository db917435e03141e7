"""Where an eager decode step's time goes (GPU): host time by Python function, and the GPU's busy time.

    python benchmarks/eager_step_profile.py [--model llama3-8b] [--batch 1] [--context 8192] [--steps 20] [--warm]
        [--out DIR]

For DynamicCache (sdpa) and SawInt4Cache (saw_int4), after a prefill of `context` random tokens, runs decode
steps as generate() does (one token per forward, a device sync per step) and reports:
  * wall ms per step;
  * GPU busy ms per step: the summed duration of the step's kernels (torch.profiler);
  * host ms per step under cProfile (slower than unprofiled), and the functions with the most own time, written
    to DIR/profile_<method>.txt with the callers of the SawInt4Cache functions.
A step whose wall time is well above its GPU time is bound by host work (Python, launches). With --warm, every
measured pass repeats the lengths of a first, unmeasured one (the cache is cropped back after each pass), so that
DynamicCache's cuDNN plans are built before anything is timed: the warm steps that `eager_interleaved.py` compares.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

from saw_kvcache import SawInt4Cache
from saw_kvcache.bench.methods import saw_config_for
from saw_kvcache.bench.models import build_model, model_config
from saw_kvcache.integration.compat import cache_kwargs


def decode_steps(model, cache, token, position: int, steps: int) -> torch.Tensor:
    for i in range(steps):
        positions = torch.full((token.shape[0], 1), position + i, device=token.device)
        logits = model(token, position_ids=positions, use_cache=True, **cache_kwargs(cache)).logits
        token = logits[:, -1:].argmax(-1)
        if token.is_cuda:
            torch.cuda.synchronize()  # generate() syncs once per step (its stopping check)
    return token


def _pass_start(cache, position: int, warm: bool) -> float:
    """With `warm`, crop the cache back to `position` tokens, so that the next pass repeats the lengths."""
    extra = cache.get_seq_length() - position
    if warm and extra > 0:
        cache.crop(-extra)  # negative: tokens to remove (5.24 refuses the old absolute length)
    return time.perf_counter()


def profile_method(model, name: str, make_cache, attn: str, args, out: str) -> dict:
    model.set_attn_implementation(attn)
    device = model.device
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), device=device)
    cache = make_cache()
    with torch.no_grad():
        logits = model(ids, use_cache=True, **cache_kwargs(cache)).logits
        token = logits[:, -1:].argmax(-1)
        position = args.context
        token = decode_steps(model, cache, token, position, 3)  # warm: kernels compiled, cuDNN plans built
        position += 3
        if args.warm:
            decode_steps(model, cache, token, position, args.steps)
        start = _pass_start(cache, position, args.warm)
        token = decode_steps(model, cache, token, position, args.steps)
        wall = (time.perf_counter() - start) / args.steps
        position += 0 if args.warm else args.steps
        _pass_start(cache, position, args.warm)
        activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            token = decode_steps(model, cache, token, position, args.steps)
        position += 0 if args.warm else args.steps
        gpu_us = sum(e.device_time_total for e in prof.key_averages()) / args.steps  # 0 on the CPU
        profiler = cProfile.Profile()
        start = _pass_start(cache, position, args.warm)
        profiler.enable()
        token = decode_steps(model, cache, token, position, args.steps)
        profiler.disable()
        profiled = (time.perf_counter() - start) / args.steps
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(60)
    stats.sort_stats("cumulative").print_stats("saw_kvcache|triton", 40)
    with open(os.path.join(out, f"profile_{name}.txt"), "w") as f:
        f.write(f"{name}: wall {wall * 1e3:.2f} ms/step, GPU busy {gpu_us / 1e3:.2f} ms/step, "
                f"under cProfile {profiled * 1e3:.2f} ms/step\n\n")
        f.write(prof.key_averages().table(sort_by="device_time_total", row_limit=25))
        f.write("\n\n" + text.getvalue())
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(method=name, wall_ms=wall * 1e3, gpu_ms=gpu_us / 1e3, profiled_ms=profiled * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warm", action="store_true", help="every measured pass repeats lengths already seen")
    parser.add_argument("--out", default="profile_out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only for a smoke run
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(model_config(args.model, args.layers), dtype, device)
    from transformers import DynamicCache

    rows = [
        profile_method(model, "dynamic", DynamicCache, "sdpa", args, args.out),
        profile_method(model, "saw", lambda: SawInt4Cache(config=saw_config_for(model, {})), "saw_int4", args, args.out),
    ]
    print(f"\n{args.model}, batch {args.batch}, context {args.context}, {args.steps} steps"
          f"{', warm (lengths repeated)' if args.warm else ''}; torch {torch.__version__}")
    print("| cache | wall ms/step | GPU busy ms/step | ms/step under cProfile |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['wall_ms']:.2f} | {r['gpu_ms']:.2f} | {r['profiled_ms']:.2f} |")


if __name__ == "__main__":
    main()
