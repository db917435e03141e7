"""Passkey retrieval: a random 5-digit number hidden at several depths of generated filler text."""

from __future__ import annotations

import random
import re
from typing import Callable, Optional

import torch

from ..integration import compat
from .configs import NamedConfig
from .scoring import cache_for, set_attention

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids [1, ~length]: intro, filler with the needle after a fraction `depth` of it, the question."""
    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    fixed = count(INTRO + NEEDLE.format(key=key) + QUESTION)
    per_filler = count(FILLER * 8) / 8
    repeats = max(1, round((length - fixed) / per_filler))
    before = round(repeats * depth)
    text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (repeats - before) + QUESTION
    return tokenizer(text, return_tensors="pt").input_ids


def passkey_cases(tokenizer, lengths, depths=DEPTHS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            cases.append({"length": length, "depth": depth, "key": key, "ids": passkey_prompt(tokenizer, length, depth, key)})
    return cases


@torch.inference_mode()
def passkey_eval(
    model,
    tokenizer,
    rows: list[NamedConfig],
    lengths,
    depths=DEPTHS,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: Optional[Callable[[str, int], None]] = None,
) -> list[dict]:
    """For each row: greedy answers to every (length, depth) case; correct when the first number generated is
    the key. The prompt is prefilled in one forward (exact attention within it); the answer tokens attend to the
    cache, so a SAW row reads the key from INT4. Returns per row {"name", "accuracy", "by_length", "cases"}."""
    cases = passkey_cases(tokenizer, lengths, depths, seed)
    kwarg = compat.cache_kwarg_name()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_rows = []
    for row in rows:
        set_attention(model, row.is_reference)
        results = []
        for done, case in enumerate(cases, 1):
            ids = case["ids"].to(model.device)
            cache = cache_for(row, model)
            extra = {kwarg: cache} if cache is not None else {}
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, **extra,
            )
            answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            found = re.search(r"\d+", answer)
            results.append({
                "length": case["length"], "tokens": ids.shape[1], "depth": case["depth"], "key": case["key"],
                "answer": answer.strip(), "correct": bool(found and found.group(0) == case["key"]),
            })
            if progress is not None:
                progress(row.name, done)
        by_length = {}
        for length in lengths:
            hits = [r["correct"] for r in results if r["length"] == length]
            by_length[str(length)] = sum(hits) / len(hits)
        out_rows.append({
            "name": row.name,
            "accuracy": sum(r["correct"] for r in results) / len(results),
            "by_length": by_length,
            "cases": results,
        })
    set_attention(model, False)
    return out_rows
