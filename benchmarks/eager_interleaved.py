"""Warm eager decode steps of SawInt4Cache and DynamicCache, interleaved in one process (GPU).

    python benchmarks/eager_interleaved.py [--model llama3-8b] [--batch 1] [--context 8192] [--steps 8] [--rounds 12]

The host's speed drifts during a run (`saw-kvcache bench` saw DynamicCache's warm 1 x 8k step at 22.3 to 30.8 ms
in four calls), and the bench times one method after the other. Here both caches hold the same prompt and take
turns: each round runs `--steps` decode steps of one cache (one token per forward, a device sync per step, as
generate() does), then crops that cache back by as many tokens, then the same for the other cache, so every round
repeats the same lengths (DynamicCache's cuDNN plans are built in the first round, which is not counted). The
caches take the first turn in alternate rounds, so that neither always follows the other. Prints
each cache's median step over the later rounds, their ratio, the spread of the per-round medians, and the ratio
of the two caches' medians in each round (neighbours in time). Each step is also split, per cache (medians over
the counted steps): the host's time inside the decoder layers' forwards (hooks on each layer) and, of that, inside
their attention modules, the time the final device sync waits for the GPU, and the rest (embedding, final norm,
lm_head, mask, argmax and what lies between); and the garbage collector's runs and their time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from transformers import DynamicCache

from saw_kvcache import SawInt4Cache
from saw_kvcache.bench.methods import saw_config_for
from saw_kvcache.bench.models import build_model, model_config
from saw_kvcache.integration.compat import cache_kwargs


class HostTime:
    """Forward hooks on modules: adds up the host's time inside their forwards into `seconds`."""

    def __init__(self, modules):
        self.seconds, self._entered = 0.0, 0.0
        self._handles = [h for module in modules for h in (module.register_forward_pre_hook(self._enter),
                                                           module.register_forward_hook(self._leave))]

    def _enter(self, module, args):
        self._entered = time.perf_counter()

    def _leave(self, module, args, output):
        self.seconds += time.perf_counter() - self._entered

    def remove(self):
        for handle in self._handles:
            handle.remove()


class GarbageCollections:
    """Counts the garbage collector's runs and the host time they take (gc.callbacks) into `runs` and `seconds`."""

    def __init__(self):
        self.runs, self.seconds, self._started = 0, 0.0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.runs += 1
            self.seconds += time.perf_counter() - self._started

    def remove(self):
        gc.callbacks.remove(self._callback)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model(model_config(args.model, args.layers), torch.bfloat16, device)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), device=device)
    caches = {
        "DynamicCache (sdpa)": (DynamicCache(), "sdpa"),
        "SawInt4Cache (saw_int4)": (SawInt4Cache(config=saw_config_for(model, {})), "saw_int4"),
    }
    first = {}
    with torch.no_grad():
        for name, (cache, attn) in caches.items():
            model.set_attn_implementation(attn)
            first[name] = model(ids, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        steps = {name: [] for name in caches}
        round_medians = {name: [] for name in caches}
        parts = {name: {"layers": [], "attention modules": [], "sync wait": [], "gc": []} for name in caches}
        gc_runs = {name: 0 for name in caches}
        in_layers = HostTime(model.model.layers)
        in_attention = HostTime(layer.self_attn for layer in model.model.layers)
        collections = GarbageCollections()
        for round_index in range(args.rounds + 1):
            order = list(caches.items())
            for name, (cache, attn) in order if round_index % 2 else order[::-1]:
                model.set_attn_implementation(attn)
                token, times, layers, attention, waits, gc_times = first[name], [], [], [], [], []
                runs_before = collections.runs
                for i in range(args.steps):
                    torch.cuda.synchronize()
                    in_layers.seconds = in_attention.seconds = collections.seconds = 0.0
                    start = time.perf_counter()
                    positions = torch.full((args.batch, 1), args.context + i, device=device)
                    logits = model(token, position_ids=positions, use_cache=True, **cache_kwargs(cache)).logits
                    token = logits[:, -1:].argmax(-1)
                    issued = time.perf_counter()
                    torch.cuda.synchronize()
                    end = time.perf_counter()
                    times.append(end - start)
                    layers.append(in_layers.seconds)
                    attention.append(in_attention.seconds)
                    waits.append(end - issued)
                    gc_times.append(collections.seconds)
                cache.crop(-args.steps)  # negative: tokens to remove (5.24 refuses the old absolute length)
                if round_index:  # the first round builds DynamicCache's cuDNN plans and compiles the kernels
                    steps[name] += times
                    round_medians[name].append(statistics.median(times) * 1e3)
                    parts[name]["layers"] += layers
                    parts[name]["attention modules"] += attention
                    parts[name]["sync wait"] += waits
                    parts[name]["gc"] += gc_times
                    gc_runs[name] += collections.runs - runs_before
        in_layers.remove()
        in_attention.remove()
        collections.remove()
    print(f"{args.model}, batch {args.batch}, context {args.context}: {args.rounds} rounds of {args.steps} steps per "
          f"cache, interleaved; {torch.cuda.get_device_name()}; torch {torch.__version__}\n")
    print("| cache | median ms/step | per-round medians, min - max |\n|---|---:|---:|")
    medians = {}
    for name in caches:
        medians[name] = statistics.median(steps[name]) * 1e3
        print(f"| {name} | {medians[name]:.2f} | {min(round_medians[name]):.2f} - {max(round_medians[name]):.2f} |")
    print("\n| cache | host in the layers | of which in self_attn | sync wait | the rest | garbage collector "
          "(runs over all counted steps) |\n|---|---:|---:|---:|---:|---:|")
    for name in caches:
        layers_ms, attention_ms, wait_ms = (statistics.median(parts[name][k]) * 1e3
                                            for k in ("layers", "attention modules", "sync wait"))
        rest = statistics.median([t - a - w for t, a, w in zip(steps[name], parts[name]["layers"],
                                                                parts[name]["sync wait"])]) * 1e3
        gc_ms = sum(parts[name]["gc"]) * 1e3 / len(steps[name])
        print(f"| {name} | {layers_ms:.2f} | {attention_ms:.2f} | {wait_ms:.2f} | {rest:.2f} | "
              f"{gc_ms:.3f} ({gc_runs[name]}) |")
    print("(ms per step, medians over the counted steps; the garbage collector's column is a mean)")
    dynamic, saw = medians.values()
    # Rounds next to each other in time share the host's speed: the ratio of each round's two medians.
    per_round = [d / s for d, s in zip(*round_medians.values())]
    print(f"\nSawInt4Cache tokens/s over DynamicCache's: {dynamic / saw:.2f}x (medians of all steps); per round "
          f"{statistics.median(per_round):.2f}x (median), {min(per_round):.2f}x - {max(per_round):.2f}x")


if __name__ == "__main__":
    main()
