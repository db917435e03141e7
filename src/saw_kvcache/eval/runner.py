"""run_eval: the whole evaluation of `saw-kvcache eval` as one function."""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

import torch

from .configs import NamedConfig, parse_config, preset, with_baselines
from .memory import kv_memory
from .models import head_dim_of, load_model, with_key_bias
from .passkey import DEPTHS, passkey_eval
from .report import write_outputs
from .scoring import forwards_per_row, score_configs


def read_text(paths: Sequence[str]) -> str:
    return "\n\n".join(open(p, encoding="utf-8", errors="replace").read() for p in paths)


def run_eval(
    model: str | torch.nn.Module,
    text: Sequence[str],
    tokens: int = 2048,
    configs: Sequence[str | NamedConfig] | None = None,
    preset_name: str = "quick",
    tokenizer=None,
    gguf_file: Optional[str] = None,
    dtype: Optional[str] = None,
    prefill: Optional[int] = None,
    chunk: int = 16,
    passkey_lengths: Sequence[int] = (256, 512, 1024, 2048),
    passkey_depths: Sequence[float] = DEPTHS,
    passkey_configs: Optional[Sequence[str]] = None,
    key_bias: float = 0.0,
    out_dir: Optional[str] = None,
    name: str = "eval",
    progress: bool = True,
    seed: int = 0,
    command: Optional[str] = None,
) -> dict:
    """Score full precision, naive INT4 and the given SAW configurations on the first `tokens` tokens of the
    text files, run passkey retrieval, and (with out_dir) write NAME.md, NAME.json and NAME.png.

    model: a folder or hub id (with gguf_file), "smollm2", or a loaded model (then pass its tokenizer).
    configs: "name=field=value,..." strings or NamedConfig; None runs `preset_name` ("quick" or "study").
    prefill: tokens of the first forward (default tokens // 4); then chunks of `chunk` tokens (1 = decode).
    passkey_configs: names of the rows that run passkey retrieval (default: all); passkey_lengths=() skips it.
    key_bias: rebuild a Llama model as Qwen2 with this k_proj bias in four channels per head (models.with_key_bias).
    Returns {"meta", "rows", "passkey", "outputs"}.
    """
    if isinstance(model, str):
        model_name = model
        model, tokenizer = load_model(model, gguf_file, dtype)
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a loaded model")
        model_name = getattr(model.config, "_name_or_path", type(model).__name__)
    model_note = ""
    if key_bias:
        model = with_key_bias(model, key_bias)
        model_note = f"k_proj bias {key_bias:g} in 4 channels per KV head (Qwen2 rebuilt from the weights)"
    rows = [c if isinstance(c, NamedConfig) else parse_config(c) for c in configs] if configs else preset(preset_name)
    rows = with_baselines(rows)

    ids = tokenizer(read_text(text), return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than tokens={tokens}")
    ids = ids[:, :tokens].to(model.device)
    prefill = prefill or tokens // 4
    if not 0 < prefill < tokens - 1:
        raise ValueError(f"prefill must be in [1, {tokens - 2}], got {prefill}")

    text_cfg = model.config.get_text_config(decoder=True)
    layers, kv_heads, head_dim = text_cfg.num_hidden_layers, text_cfg.num_key_value_heads, head_dim_of(model)
    run_dtype = model.dtype
    memory_dtype = run_dtype if run_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    dtype_note = (
        "the model's dtype" if dtype in (None, "auto") else "chosen with --dtype"
    ) + ("; float32 is fine on the CPU: scale and offset are then stored in float32, memory columns are for "
         "bfloat16" if run_dtype == torch.float32 else "")

    passkey_rows = [r for r in rows if passkey_configs is None or r.name in passkey_configs]
    if passkey_configs is not None:
        unknown = set(passkey_configs) - {r.name for r in rows}
        if unknown:
            raise ValueError(f"passkey_configs names no row: {sorted(unknown)}")
    num_cases = len(passkey_lengths) * len(passkey_depths)
    total = len(rows) * forwards_per_row(tokens, prefill, chunk) + len(passkey_rows) * num_cases
    bar = _bar(total, progress)

    def step(label):
        def advance(row_name, _done):
            bar.set_description(f"{label} {row_name}"[:60], refresh=False)
            bar.update(1)
        return advance

    started = time.time()
    attn_before = model.config._attn_implementation
    try:
        scored = score_configs(model, ids, rows, prefill, chunk, progress=step("scoring"))
        passkey = (
            passkey_eval(model, tokenizer, passkey_rows, list(passkey_lengths), list(passkey_depths), seed=seed,
                         progress=step("passkey"))
            if passkey_lengths and passkey_rows else []
        )
    finally:
        bar.close()
        model.set_attn_implementation(attn_before)
    for row, spec in zip(scored, rows):
        row["memory"] = kv_memory(spec.config(head_dim), layers, kv_heads, head_dim, memory_dtype, tokens)
        if spec.config(head_dim) is not None:
            row["config"] = spec.config(head_dim).to_dict()
    import transformers

    result = {
        "meta": {
            "model": model_name, "model_note": model_note, "dtype": str(run_dtype).replace("torch.", ""),
            "dtype_note": dtype_note, "memory_dtype": str(memory_dtype).replace("torch.", ""),
            "text": list(text), "tokens": tokens, "prefill": prefill, "chunk": chunk, "scored": tokens - prefill,
            "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "passkey_lengths": list(passkey_lengths), "passkey_depths": list(passkey_depths), "seed": seed,
            "transformers": transformers.__version__, "torch": torch.__version__, "seconds": time.time() - started,
            "command": command,
        },
        "rows": scored,
        "passkey": passkey,
    }
    if out_dir:
        result["outputs"] = write_outputs(result, out_dir, name)
    return result


def _bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers' huggingface_hub; never fail for a progress bar
        class _Null:
            def set_description(self, *a, **k): pass
            def update(self, *a): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="fwd", dynamic_ncols=True)
