"""Teacher-forced, decode-style scoring of several cache configurations on the same tokens."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .. import SawInt4Cache
from ..evaluation import compare_to_reference, perplexity, teacher_forced_logits
from .configs import NamedConfig
from .models import head_dim_of


def set_attention(model, reference: bool) -> None:
    """The full-precision reference runs sdpa over a DynamicCache; SAW rows run the saw_int4 attention."""
    model.set_attn_implementation("sdpa" if reference else "saw_int4")


def cache_for(row: NamedConfig, model):
    config = row.config(head_dim_of(model))
    return None if config is None else SawInt4Cache(config=config)


@torch.inference_mode()
def score_configs(
    model,
    input_ids: torch.Tensor,
    rows: list[NamedConfig],
    prefill: int,
    chunk: int = 16,
    progress: Optional[Callable[[str, int], None]] = None,
) -> list[dict]:
    """Perplexity, mean KL(reference || row) and top-1 agreement with the full-precision reference for each row.

    Every row prefills input_ids[:, :prefill] in one forward, then feeds the rest in forwards of `chunk` tokens
    through its cache, so the scored tokens attend to what earlier forwards stored (INT4 for SAW rows) exactly as
    during decoding; `chunk=1` is token-by-token decoding. The reference (a DynamicCache with sdpa) runs first;
    its logits are kept, the other rows' are reduced to statistics as they finish.
    `progress(name, forwards_done)` is called after each forward.
    """
    targets = input_ids[:, prefill:]
    order = sorted(range(len(rows)), key=lambda i: not rows[i].is_reference)
    if not rows[order[0]].is_reference:
        raise ValueError("the rows must include the full-precision reference (fields=None)")
    results: dict[int, dict] = {}
    reference = None
    for i in order:
        row = rows[i]
        set_attention(model, row.is_reference)
        cache = cache_for(row, model)
        counter = _ProgressModel(model, row.name, progress)
        start = time.perf_counter()
        logits = teacher_forced_logits(counter, input_ids, cache, prefill, chunk)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = logits
        stats = compare_to_reference(logits, reference)
        results[i] = {
            "name": row.name,
            "fields": row.fields,
            "ppl": perplexity(logits, targets),
            "kl": stats["kl"],
            "top1": stats["top1"],
            "seconds": seconds,
            "cache_bytes": cache.memory_footprint() if cache is not None else None,
        }
        del logits
    set_attention(model, False)
    return [results[i] for i in range(len(rows))]


class _ProgressModel:
    """Calls the model and reports each forward (teacher_forced_logits only calls it)."""

    def __init__(self, model, name, progress):
        self.model, self.name, self.progress, self.done = model, name, progress, 0

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.done += 1
        if self.progress is not None:
            self.progress(self.name, self.done)
        return out


def forwards_per_row(num_tokens: int, prefill: int, chunk: int) -> int:
    return 1 + len(range(prefill, num_tokens - 1, chunk))
