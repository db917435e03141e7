"""The caches `saw-kvcache bench` compares, each with the attention and generate() settings it runs with."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, Optional

import torch
import transformers
from transformers import DynamicCache, StaticCache

from ..config import SawInt4Config
from ..integration import SawInt4Cache


@dataclasses.dataclass
class Method:
    key: str
    label: str
    attn_implementation: str
    make_cache: Callable  # (model, batch, max_len) -> Cache
    compiled: bool = False
    missing: Optional[str] = None  # why it cannot run here (a package is not installed)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def saw_config_for(model, fields: dict) -> SawInt4Config:
    """The package defaults with the rotation block capped at the head dim, then `fields`."""
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    block = SawInt4Config.hadamard_block
    while block > 1 and head_dim % block:
        block //= 2
    return dataclasses.replace(SawInt4Config(hadamard_block=block if block > 1 else 0), **fields)


def _quantized(backend: str):
    def make(model, batch, max_len):
        return transformers.QuantizedCache(backend=backend, config=model.config, nbits=4)
    return make


def all_methods(saw_fields: dict) -> dict[str, Method]:
    quanto_missing = None if _has_module("optimum.quanto") else "optimum-quanto is not installed (pip install optimum-quanto)"
    hqq_missing = None if _has_module("hqq") else "hqq is not installed (pip install hqq)"
    methods = [
        Method("saw-eager", "SawInt4Cache eager", "saw_int4",
               lambda model, batch, max_len: SawInt4Cache(config=saw_config_for(model, saw_fields))),
        Method("saw-compiled", "SawInt4Cache static + compiled", "saw_int4",
               lambda model, batch, max_len: SawInt4Cache(
                   config=saw_config_for(model, saw_fields), max_batch_size=batch, max_cache_len=max_len),
               compiled=True),
        Method("dynamic", "DynamicCache (sdpa)", "sdpa", lambda model, batch, max_len: DynamicCache()),
        Method("static-compiled", "StaticCache (sdpa) compiled", "sdpa",
               lambda model, batch, max_len: StaticCache(config=model.config, max_cache_len=max_len), compiled=True),
        Method("quanto", "QuantizedCache quanto int4", "sdpa", _quantized("quanto"), missing=quanto_missing),
        Method("hqq", "QuantizedCache HQQ int4", "sdpa", _quantized("hqq"), missing=hqq_missing),
    ]
    return {m.key: m for m in methods}


DEFAULT_METHODS = ("saw-eager", "saw-compiled", "dynamic", "static-compiled", "quanto", "hqq")


def generate_kwargs(method: Method, device: torch.device, compile_mode: str, compile_backend: str) -> dict:
    """Eager methods never compile; compiled ones pass a CompileConfig (generate() compiles the decode step of a
    cache that reports is_compileable; on the CPU only when asked to, through `_compile_all_devices`)."""
    if not method.compiled:
        return dict(disable_compile=True)
    config = transformers.CompileConfig(fullgraph=False, mode=compile_mode, backend=compile_backend)
    if device.type != "cuda":
        config._compile_all_devices = True
    return dict(compile_config=config)


def kv_bytes(cache) -> tuple[int, Optional[int]]:
    """(bytes allocated for keys and values, bytes holding tokens now or None if unknown), summed over layers.

    SawInt4Cache reports its own (pool with free pages / pages in use). For other caches every tensor reachable
    from the layers' attributes is counted once (tensor subclasses such as quanto's through their inner tensors)."""
    if isinstance(cache, SawInt4Cache):
        return cache.reserved_bytes(), cache.memory_footprint()
    seen: set[int] = set()
    total = 0

    def visit(obj, depth=0):
        nonlocal total
        if depth > 6 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            inner = getattr(obj, "__tensor_flatten__", None)
            if inner is not None and type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
                names, _ = inner()
                for name in names:
                    visit(getattr(obj, name), depth + 1)
                return
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return
        if isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)) and depth < 3:
            for value in vars(obj).values():
                visit(value, depth + 1)

    for layer in getattr(cache, "layers", []):
        visit(layer)
    in_use = total if isinstance(cache, DynamicCache) else None
    return total, in_use
