"""Check that SawInt4Cache gives the same greedy tokens on one GPU, split over GPUs by accelerate
(device_map="auto") and under transformers tensor parallelism (tp_plan="auto", launched with torchrun).

    python benchmarks/multi_gpu_check.py --out DIR          # needs 2 or more GPUs; runs torchrun itself

A small Llama of a real layout (8 query heads, 4 KV heads, head dim 64) with random weights (seed 0), float32,
is saved to DIR/model; each mode writes its tokens to DIR/<mode>.json; the last line says whether they agree.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends), as the machines here require.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import saw_kvcache  # noqa: E402,F401
from saw_kvcache import SawInt4Cache  # noqa: E402
from saw_kvcache.integration.compat import cache_kwarg_name  # noqa: E402

NEW_TOKENS = 24


def prepare(folder: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(folder)


def prompt(device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 4096, (2, 300), generator=generator).to(device)


def greedy(model, device) -> list:
    cache = SawInt4Cache()
    ids = prompt(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         **{cache_kwarg_name(): cache})
    devices = sorted({str(layer.store.pool.k_codes.device) for layer in cache.layers})
    return out[:, -NEW_TOKENS:].tolist(), devices, cache.layers[0].store.backend.name


def run_mode(mode: str, folder: str, out: str) -> None:
    kw = dict(dtype=torch.float32, attn_implementation="saw_int4")
    if mode == "single":
        model = AutoModelForCausalLM.from_pretrained(folder, **kw).to("cuda:0")
        device = "cuda:0"
    elif mode == "device_map":
        count = torch.cuda.device_count()
        model = AutoModelForCausalLM.from_pretrained(
            folder, device_map="auto", max_memory={i: "48MiB" for i in range(count)} | {"cpu": "0GiB"}, **kw
        )
        device = "cuda:0"
    else:  # tensor parallel, one process per GPU under torchrun
        model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", **kw)
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    tokens, devices, backend = greedy(model.eval(), device)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, f"{mode}.json"), "w") as f:
            json.dump({"tokens": tokens, "pool_devices": devices, "backend": backend}, f)
    print(mode, "pool devices", devices, "backend", backend, "tokens", tokens[0][:8], flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "multi_gpu"))
    parser.add_argument("--mode", choices=["single", "device_map", "tp"], help="internal: run one mode")
    args = parser.parse_args()
    folder = os.path.join(args.out, "model")
    if args.mode:
        return run_mode(args.mode, folder, args.out)
    os.makedirs(args.out, exist_ok=True)
    prepare(folder)
    run_mode("single", folder, args.out)
    run_mode("device_map", folder, args.out)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--out", args.out,
                "--mode", "tp"]
    subprocess.run(torchrun, check=True)
    results = {m: json.load(open(os.path.join(args.out, f"{m}.json"))) for m in ("single", "device_map", "tp")}
    for mode in ("device_map", "tp"):
        same = results[mode]["tokens"] == results["single"]["tokens"]
        print(f"{mode}: pools on {results[mode]['pool_devices']}; greedy tokens equal single GPU: {same}")


if __name__ == "__main__":
    main()
