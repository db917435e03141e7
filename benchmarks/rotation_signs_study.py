"""Does a randomized Hadamard rotation (random sign flips) beat the plain one? Decode-style scoring on SmolLM2, CPU.

    python benchmarks/rotation_signs_study.py [--tokens 2048] [--text FILE] [--seeds 0,1,2] [--auto]

The cache rotates each token-head row by the block-diagonal normalized Hadamard matrix H (`reference.rotate`, used
as its own inverse). This swaps in R = S H S per block, S = diag(s) with s a fixed random +-1 vector over the block
(torch.Generator().manual_seed(seed)), i.e. rotate_signed(x) = s * rotate(s * x). R is symmetric and R R = I, so
every call site (keys/values in `encode`, queries in `paged_attention`, `decode` and the attention output of rotated
values) stays exact; only the quantization error changes. Rows: naive INT4, rot64 K+V window 0 (no centering,
plain H, the cache's rotation), and the same with the signs of each seed. With --auto, also rot64 K+V with
center_keys="auto" (window 0), plain and per seed; the per-head centering decision (`reference.hadamard_matrix`,
used by paged._rotate_by_matmul) is then patched to S H S as well. Same protocol as `saw-kvcache eval` and
benchmarks/encoder_study.py (prefill tokens/4, then chunks of 16, float32, torch backend, min-max encoder); prints
perplexity, KL from full precision, top-1 agreement and the share of naive INT4's loss each row recovers,
(naive - row) / (naive - full precision), in perplexity and in KL (full precision has KL 0).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from saw_kvcache import SawInt4Cache, SawInt4Config
from saw_kvcache.eval.models import load_model, smollm2_location
from saw_kvcache.eval.scoring import set_attention
from saw_kvcache.evaluation import compare_to_reference, perplexity, teacher_forced_logits
from saw_kvcache.ops import reference

NAIVE = dict(hadamard_block=0, rotate_values=False, center_keys=False, residual_length=0)
ROT64 = dict(hadamard_block=64, center_keys=False, residual_length=0)
ROT64_AUTO = dict(hadamard_block=64, center_keys="auto", residual_length=0)


def signs(seed: int, block: int) -> torch.Tensor:
    """A fixed random +-1 vector of `block` entries (float32)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (block,), generator=g) * 2 - 1).to(torch.float32)


def signed_rotation(seed: int, plain_rotate, plain_matrix):
    """(rotate, hadamard_matrix) for R = S H S on every block: drop-in replacements of the reference functions."""
    def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
        if block == 0:
            return x.float()
        s = signs(seed, block).to(x.device).repeat(x.shape[-1] // block)
        return s * plain_rotate(s * x.float(), block)

    def hadamard_matrix(block: int, device="cpu") -> torch.Tensor:
        h = plain_matrix(block, device)
        s = signs(seed, block).to(h.device)
        return s[:, None] * h * s[None, :]

    return rotate, hadamard_matrix


def check(rotate, matrix, block: int = 64, d: int = 64) -> None:
    """Involution, score preservation and agreement with the matrix form, float32 random tensors."""
    g = torch.Generator().manual_seed(1234)
    x, q = torch.randn(2, 3, 40, d, generator=g), torch.randn(2, 3, 5, d, generator=g)
    inv = (rotate(rotate(x, block), block) - x).abs().max().item()
    scores = q @ x.transpose(-1, -2)
    rel = ((rotate(q, block) @ rotate(x, block).transpose(-1, -2) - scores).abs().max() / scores.abs().max()).item()
    r = matrix(block)
    mat = (rotate(x, block) - (x.reshape(*x.shape[:-1], -1, block) @ r).reshape(x.shape)).abs().max().item()
    assert inv < 1e-5 and rel < 1e-5 and mat < 1e-5 and torch.equal(r, r.T), (inv, rel, mat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated sign seeds ('' for none)")
    parser.add_argument("--auto", action="store_true", help='also rot64 K+V with center_keys="auto"')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    plain_rotate, plain_matrix = reference.rotate, reference.hadamard_matrix
    check(plain_rotate, plain_matrix)
    variants = {None: (plain_rotate, plain_matrix)}
    for seed in seeds:
        variants[seed] = signed_rotation(seed, plain_rotate, plain_matrix)
        check(*variants[seed])

    model, tokenizer = load_model(*smollm2_location())
    ids = tokenizer(open(args.text).read(), return_tensors="pt").input_ids[:, : args.tokens]
    prefill = ids.shape[1] // 4
    targets = ids[:, prefill:]
    set_attention(model, reference=True)
    ref = teacher_forced_logits(model, ids, None, prefill, 16)
    full = perplexity(ref, targets)
    print(f"{ids.shape[1]} tokens of {args.text}; full precision perplexity {full:.3f}; sign seeds {seeds}")
    set_attention(model, reference=False)

    rows = [("naive INT4", NAIVE, None), ("rot64, window 0", ROT64, None)]
    rows += [(f"rot64, window 0, signs seed {seed}", ROT64, seed) for seed in seeds]
    if args.auto:
        rows += [("rot64, auto centering, window 0", ROT64_AUTO, None)]
        rows += [(f"rot64, auto centering, window 0, signs seed {seed}", ROT64_AUTO, seed) for seed in seeds]
    print("| configuration | ppl | KL | top-1 | perplexity loss recovered | KL recovered |\n"
          "|---|---:|---:|---:|---:|---:|")
    print(f"| full precision | {full:.3f} | 0 | 1.000 | | |", flush=True)
    naive, notes = None, []
    try:
        for name, fields, seed in rows:
            reference.rotate, reference.hadamard_matrix = variants[seed]
            t0 = time.perf_counter()
            cache = SawInt4Cache(SawInt4Config(backend="torch", **fields))
            logits = teacher_forced_logits(model, ids, cache, prefill, 16)
            reference.rotate, reference.hadamard_matrix = plain_rotate, plain_matrix
            ppl, cmp = perplexity(logits, targets), compare_to_reference(logits, ref)
            if naive is None:
                naive = (ppl, cmp["kl"])
                recovered = ""
            else:
                recovered = (f"{100 * (naive[0] - ppl) / (naive[0] - full):.0f}% | "
                             f"{100 * (naive[1] - cmp['kl']) / naive[1]:.0f}%")
            print(f"| {name} | {ppl:.3f} | {cmp['kl']:.4f} | {cmp['top1']:.3f} | {recovered or ' | '} |", flush=True)
            print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if fields["center_keys"] == "auto":
                means = [layer.store.key_mean for layer in cache.layers]
                centered = sum(int((m != 0).any(-1).sum()) for m in means if m is not None)
                heads = sum(layer.store.num_heads for layer in cache.layers)
                notes.append(f"{name}: center_keys='auto' centered {centered} of {heads} KV heads")
    finally:
        reference.rotate, reference.hadamard_matrix = plain_rotate, plain_matrix
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
