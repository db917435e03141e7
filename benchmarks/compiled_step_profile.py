"""Where a compiled decode step's time goes (GPU): wall time per step against the GPU's busy time.

    python benchmarks/compiled_step_profile.py [--model llama3-8b] [--batch 1] [--context 8192] [--steps 24]
        [--methods saw-compiled,static-compiled] [--out DIR]

For each method of `saw-kvcache bench` (default: the static SawInt4Cache and StaticCache, both through
generate()'s own compilation, "reduce-overhead"), fills the cache with `context - 1` random tokens (no prefill, as
`saw-kvcache bench --fill-prompt`), runs one generate() to compile, then a second one under torch.profiler, and
reports per decode step: the wall time (generate()'s step, the stopping check's device sync included), the GPU's
busy time (the summed duration of every kernel; CUDA-graph replays are seen kernel by kernel), and the host time
of the largest CPU-side operations. Writes the profiler's tables to DIR/compiled_profile_<method>.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import LogitsProcessorList

from saw_kvcache.bench.measure import StepTimer, _fill, release
from saw_kvcache.bench.methods import all_methods, generate_kwargs
from saw_kvcache.bench.models import build_model, model_config
from saw_kvcache.integration.compat import cache_kwargs


class HostTimer:
    """Wraps a callable; adds up the host time its calls take (they queue GPU work and return)."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def host_split(model, method, args, ids) -> tuple[float, float]:
    """Host ms per decode step in generate()'s input preparation (the step's mask included) and in the compiled
    call (torch.compile's guard check and the CUDA graph's replay launch), with no profiler attached."""
    prepare = HostTimer(model.prepare_inputs_for_generation)
    call = HostTimer(model._compiled_call)
    model.prepare_inputs_for_generation, model._compiled_call = prepare, call
    try:
        run(model, method, args, ids, args.steps, profile=False)
    finally:
        del model.prepare_inputs_for_generation
        model._compiled_call = call.fn
    return prepare.seconds / prepare.calls * 1e3, call.seconds / call.calls * 1e3


def run(model, method, args, ids, tokens: int, profile: bool):
    cache = method.make_cache(model, args.batch, args.context + tokens)
    timer = StepTimer(model.device)
    with torch.no_grad():
        _fill(cache, model, args.batch, args.context - 1, model.device)
        timer.start()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) if profile else _Nothing() as prof:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, logits_processor=LogitsProcessorList([timer]), **cache_kwargs(cache),
                           **generate_kwargs(method, model.device, "reduce-overhead", "inductor"))
    del cache
    release(model.device)
    times = timer.times
    steps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(steps[1:]), prof


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--methods", default="saw-compiled,static-compiled")
    parser.add_argument("--out", default="profile_out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = build_model(model_config(args.model, None), torch.bfloat16, torch.device("cuda"))
    registry = all_methods({})
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), device="cuda")
    rows = []
    for key in args.methods.split(","):
        method = registry[key]
        model.set_attn_implementation(method.attn_implementation)
        torch._dynamo.reset()
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
        run(model, method, args, ids, 8, profile=False)  # compiles, captures the CUDA graphs
        unprofiled, _ = run(model, method, args, ids, args.steps, profile=False)
        prepare_ms, call_ms = host_split(model, method, args, ids)
        profiled, prof = run(model, method, args, ids, args.steps, profile=True)
        events = prof.key_averages()
        gpu = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        steps = args.steps  # the profiled call's forwards: the prompt's last token and steps - 1 decode steps
        with open(os.path.join(args.out, f"compiled_profile_{key}.txt"), "w") as f:
            f.write(events.table(sort_by="device_time_total", row_limit=30))
            f.write("\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=30))
        rows.append((method.label, unprofiled * 1e3, profiled * 1e3, gpu / steps / 1e3, kernels / steps, prepare_ms,
                     call_ms))
    print(f"\n{args.model}, batch {args.batch}, context {args.context}; torch {torch.__version__}")
    print("| method | wall ms/step | wall ms/step, profiled | GPU busy ms/step | kernels/step | host ms/step: inputs "
          "| host ms/step: compiled call |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, wall, wall_p, gpu, k, prepare_ms, call_ms in rows:
        print(f"| {label} | {wall:.2f} | {wall_p:.2f} | {gpu:.2f} | {k:.0f} | {prepare_ms:.3f} | {call_ms:.3f} |")


if __name__ == "__main__":
    main()
