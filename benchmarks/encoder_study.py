"""Would a mean-squared-error encoder beat min-max INT4? Decode-style scoring on SmolLM2, CPU.

    python benchmarks/encoder_study.py [--tokens 2048] [--text FILE]

The cache's encoder is asymmetric min-max (`reference.quantize_int4`). This swaps in, for both naive INT4 and
SAW rotation (hadamard_block 64, no centering, window 0), encoders that lower the reconstruction error of each
token-head row: a least-squares refit of scale and offset for the min-max codes ("lsq"), the best of 5 clipped
ranges (1.0 to 0.8 of the range, by squared error; "clip"), and both ("clip+lsq"). Same protocol as
`saw-kvcache eval` (prefill tokens/4, then chunks of 16, float32, torch backend); prints perplexity, KL from full
precision and top-1 agreement per row.
"""

from __future__ import annotations

import argparse

import torch

from saw_kvcache import SawInt4Cache, SawInt4Config
from saw_kvcache.eval.models import load_model, smollm2_location
from saw_kvcache.eval.scoring import set_attention
from saw_kvcache.evaluation import compare_to_reference, perplexity, teacher_forced_logits
from saw_kvcache.ops import reference

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)


def mse_encoder(ratios, refit: bool):
    def quantize(x: torch.Tensor):
        xf = x.float()
        lo0, hi0 = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        mid = (lo0 + hi0) / 2
        best = None
        for r in ratios:
            lo, hi = mid - (mid - lo0) * r, mid + (hi0 - mid) * r
            scale = (hi - lo) / 15.0
            q = torch.floor((xf - lo) * torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale)) + 0.5).clamp(0, 15)
            s, o = scale, lo
            if refit:  # least squares x ~ s * q + o for these codes
                mq, mx = q.mean(-1, keepdim=True), xf.mean(-1, keepdim=True)
                var = ((q - mq) ** 2).mean(-1, keepdim=True)
                s = torch.where(var > 0, ((q - mq) * (xf - mx)).mean(-1, keepdim=True) / var.clamp_min(1e-30), scale)
                o = mx - s * mq
            s, o = s.to(x.dtype).float(), o.to(x.dtype).float()
            row = (err := ((o + q * s - xf) ** 2).sum(-1, keepdim=True), q, s, o)
            best = row if best is None else tuple(torch.where(err < best[0], a, b) for a, b in zip(row, best))
        q = best[1].to(torch.uint8)
        return q[..., 0::2] | (q[..., 1::2] << 4), torch.cat([best[2], best[3]], -1).to(x.dtype)
    return quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoders", default="min-max,lsq,clip,clip+lsq", help="comma-separated subset")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(*smollm2_location())
    ids = tokenizer(open(args.text).read(), return_tensors="pt").input_ids[:, : args.tokens]
    prefill = ids.shape[1] // 4
    set_attention(model, reference=True)
    ref = teacher_forced_logits(model, ids, None, prefill, 16)
    print(f"{ids.shape[1]} tokens of {args.text}; full precision perplexity {perplexity(ref, ids[:, prefill:]):.3f}")
    set_attention(model, reference=False)
    rows = {"naive INT4": dict(hadamard_block=0, rotate_values=False, center_keys=False, residual_length=0),
            "rot64, window 0": dict(hadamard_block=64, center_keys=False, residual_length=0)}
    encoders = {"min-max": reference.quantize_int4, "lsq": mse_encoder((1.0,), True),
                "clip": mse_encoder(CLIP_RATIOS, False), "clip+lsq": mse_encoder(CLIP_RATIOS, True)}
    encoders = {name: encoders[name] for name in args.encoders.split(",")}
    minmax = reference.quantize_int4
    print("| encoder | configuration | ppl | KL | top-1 |\n|---|---|---:|---:|---:|")
    try:
        for encoder_name, encoder in encoders.items():
            reference.quantize_int4 = encoder
            for row_name, fields in rows.items():
                cache = SawInt4Cache(SawInt4Config(backend="torch", **fields))
                logits = teacher_forced_logits(model, ids, cache, prefill, 16)
                cmp = compare_to_reference(logits, ref)
                print(f"| {encoder_name} | {row_name} | {perplexity(logits, ids[:, prefill:]):.3f} | {cmp['kl']:.4f} | "
                      f"{cmp['top1']:.3f} |", flush=True)
    finally:
        reference.quantize_int4 = minmax


if __name__ == "__main__":
    main()
