"""Model shapes for `saw-kvcache bench`: random weights built with from_config (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import transformers

# Published shapes (config.json of the hub repos), Llama architecture.
SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "llama3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    # For tests and CPU smoke runs: head dim 32 so that the Triton kernels accept it too.
    "tiny": dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=65536, tie_word_embeddings=False,
    ),
}


def model_config(spec: str, layers: Optional[int] = None) -> transformers.PretrainedConfig:
    """A shape name from SHAPES, a config.json file, or a folder holding one. `layers` overrides the depth."""
    if spec in SHAPES:
        config = transformers.LlamaConfig(**SHAPES[spec], bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config._name_or_path = spec
    elif os.path.isdir(spec):
        config = transformers.AutoConfig.from_pretrained(spec)
    elif os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            fields = json.load(f)
        if "model_type" not in fields:
            raise ValueError(f"{spec}: a config.json needs a model_type field (e.g. \"llama\").")
        config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        config._name_or_path = spec
    else:
        raise ValueError(f"unknown model {spec!r}: use one of {sorted(SHAPES)}, a config.json file or a folder with one.")
    config = config.get_text_config(decoder=True)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def build_model(config, dtype: torch.dtype, device: torch.device):
    """Random weights (transformers' own initialization), in dtype, created directly on the device."""
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: always generate every requested token
    model.generation_config.pad_token_id = 0
    return model


def shape_of(model) -> dict:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return dict(
        layers=c.num_hidden_layers, hidden_size=c.hidden_size, heads=c.num_attention_heads, kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=c.vocab_size, weight_bytes=weights,
    )
