"""Teacher-forced scoring through a cache, the way tokens are seen during decoding."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .integration import compat


@torch.inference_mode()
def teacher_forced_logits(model, input_ids: torch.Tensor, cache, prefill: int, chunk: int = 1) -> torch.Tensor:
    """Logits [B, T - prefill, V]: row i predicts input_ids[:, prefill + i].

    The first `prefill` tokens go through one forward; the rest in forwards of `chunk` tokens, each attending to
    what the cache stored for earlier forwards (quantized, for a quantized cache) and exactly to its own chunk.
    Pass cache=None for the model's own full-precision DynamicCache.
    """
    if not 0 < prefill < input_ids.shape[1]:
        raise ValueError(f"prefill must be in [1, {input_ids.shape[1] - 1}], got {prefill}")
    kwarg = compat.cache_kwarg_name()
    out = model(input_ids[:, :prefill], use_cache=True, **{kwarg: cache})
    cache = getattr(out, kwarg, None) or out.past_key_values
    logits = [out.logits[:, -1:].float()]
    for start in range(prefill, input_ids.shape[1] - 1, chunk):
        piece = input_ids[:, start : min(start + chunk, input_ids.shape[1] - 1)]
        out = model(piece, use_cache=True, **{kwarg: cache})
        logits.append(out.logits.float())
    return torch.cat(logits, 1)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of targets [B, n] under logits [B, n, V]."""
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="mean")
    return math.exp(nll.item())


def compare_to_reference(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean KL(reference || logits) per token and top-1 agreement with the reference's argmax."""
    ref_logp = torch.log_softmax(reference, -1)
    logp = torch.log_softmax(logits, -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"kl": kl, "top1": top1}
