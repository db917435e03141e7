"""Save a SawInt4Cache to one safetensors file and load it back, on the same or another device or machine.

    cache.save("prompt.safetensors")                                  # after prefilling a prompt
    cache = SawInt4Cache.load("prompt.safetensors", model=model)      # later, elsewhere; model= checks the shape

The file holds the cache in its 4-bit form: only the pages in use, their scales and offsets, the centering
vectors, the full-precision window, the sequence lengths, the configuration, the format version, a fingerprint of
the model's shape and a checksum. Format version 2 (docs/serialization.md; version 1 stored value codes like key
codes, and is refused):

tensors, for each layer i (``layers.{i}.``):
    k_codes             uint8        [B, C, H, P, D/2]  the C = ceil(num_paged / P) pages of each sequence, in
                                                       block-table order; slots at or after num_paged are zero
    v_codes             uint8        [B, C, H, D, P/2]  the same pages, token-major: byte j of a dim holds tokens
                                                       2j (low nibble) and 2j + 1
    k_meta, v_meta      model dtype  [B, C, H, P, 2]    scale and offset of each token and head
    window_key/_value   model dtype  [B, H, length - num_paged, D]  positions [num_paged, length) in order;
                                                       present exactly when residual_length > 0
    key_mean/value_mean float32      [H, D]             present when the layer centers keys/values
metadata (strings):
    format              "saw_kvcache.SawInt4Cache"
    format_version      "2"
    config              SawInt4Config as JSON
    fingerprint         JSON {num_layers, kv_heads, head_dim, dtype} (kv_heads/head_dim: a list if layers differ)
    layers              JSON list of {length, num_paged, batch, device}, one per layer
    saw_kvcache_version the writer's package version (informational)
    checksum            "sha256:<hex>" over the other metadata and every tensor's name, dtype, shape and bytes

Loading checks everything before it builds anything: safetensors' own header checks (truncation included), the
format name and version, the checksum, the configuration (unknown or missing fields, invalid values, a backend
that cannot run on the target device), the fingerprint, and every tensor's presence, dtype and shape against the
fingerprint, the configuration and the per-layer scalars. A file that fails any check raises CacheFileError and
returns nothing; a fingerprint that does not match a given model raises CacheMismatchError.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import SawInt4Config
from .ops import PagedKV, get_backend, reference
from .paged import SUPPORTED_DTYPES

FORMAT_NAME = "saw_kvcache.SawInt4Cache"
FORMAT_VERSION = 2
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in SUPPORTED_DTYPES}
_FINGERPRINT_KEYS = ("num_layers", "kv_heads", "head_dim", "dtype")
_LAYER_KEYS = ("length", "num_paged", "batch", "device")

PathLike = Union[str, "os.PathLike[str]"]


class CacheFileError(ValueError):
    """The file cannot be loaded: not a safetensors file, truncated or corrupted, another format or format
    version, a configuration this code cannot honour, or contents that contradict its own description."""


class CacheMismatchError(ValueError):
    """A saved cache and a model have different shapes (layers, KV heads, head dim or dtype)."""


# ------------------------------------------------------------------------------------------------ fingerprints


def _uniform(values: list):
    return values[0] if len(set(values)) == 1 else values


def cache_fingerprint(cache) -> dict:
    """{num_layers, kv_heads, head_dim, dtype} of a SawInt4Cache whose layers all hold tokens."""
    stores = [layer.store for layer in cache.layers]
    if not stores:
        raise ValueError("the SawInt4Cache has no layers yet (run a forward pass, e.g. prefill a prompt, first).")
    empty = [s.layer_idx for s in stores if s.batch_size is None]
    if empty:
        raise ValueError(
            f"SawInt4Cache layers {empty} hold no tokens (never used, or reset); prefill the cache before saving it."
        )
    dtypes = {str(s.dtype).removeprefix("torch.") for s in stores}
    if len(dtypes) != 1:
        raise ValueError(f"the SawInt4Cache's layers have different dtypes {sorted(dtypes)}; one model dtype is expected.")
    return dict(
        num_layers=len(stores),
        kv_heads=_uniform([s.num_heads for s in stores]),
        head_dim=_uniform([s.head_dim for s in stores]),
        dtype=dtypes.pop(),
    )


def model_fingerprint(model) -> dict:
    """{num_layers, kv_heads, head_dim, dtype} that a model's key/value states have (from its config and dtype)."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    # Models whose last layers reuse earlier layers' keys and values (e.g. Gemma3n) cache fewer layers.
    layers = text.num_hidden_layers - (getattr(text, "num_kv_shared_layers", 0) or 0)
    return dict(num_layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype=str(model.dtype).removeprefix("torch."))


def _describe(fp: dict) -> str:
    return f"{fp['num_layers']} layers, {fp['kv_heads']} KV heads, head dim {fp['head_dim']}, {fp['dtype']}"


def check_compatible(cache_or_fingerprint, model) -> None:
    """Raise CacheMismatchError unless a SawInt4Cache (or a fingerprint dict, e.g. read from a file) has the
    shape of `model`'s keys and values: number of layers, KV heads, head dim and dtype.

    Models of the same shape but different weights cannot be told apart: loading a cache into one of those runs,
    and produces meaningless output."""
    fp = dict(cache_or_fingerprint) if isinstance(cache_or_fingerprint, dict) else cache_fingerprint(cache_or_fingerprint)
    expected = model_fingerprint(model)
    diffs = [f"{key}: cache {fp.get(key)!r}, model {expected[key]!r}" for key in _FINGERPRINT_KEYS if fp.get(key) != expected[key]]
    if diffs:
        hint = ""
        if fp.get("dtype") != expected["dtype"] and len(diffs) == 1:
            hint = f" Convert the model with model.to(torch.{fp.get('dtype')}) to use this cache."
        raise CacheMismatchError(
            f"this SawInt4Cache was made by a model of another shape ({_describe(fp)}) than this model "
            f"({_describe(expected)}); differences: {'; '.join(diffs)}.{hint}"
        )


# ------------------------------------------------------------------------------------------------ checksum


def _checksum(metadata: dict, tensors: dict) -> str:
    digest = hashlib.sha256()
    described = {key: value for key, value in metadata.items() if key != "checksum"}
    digest.update(json.dumps(described, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


# ------------------------------------------------------------------------------------------------ save


def save_cache(cache, path: PathLike) -> None:
    """Write a SawInt4Cache whose layers all hold tokens to one safetensors file at `path` (replaced atomically).

    Only the pages in use are written (compacted, in block-table order), with the window, the centering vectors,
    the lengths, the configuration, the format version, the model fingerprint and a checksum."""
    from .integration.cache import SawInt4Cache

    if not isinstance(cache, SawInt4Cache):
        raise TypeError(f"save_cache takes a SawInt4Cache, got {type(cache).__name__}.")
    fingerprint = cache_fingerprint(cache)
    tensors, layers = {}, []
    for i, layer in enumerate(cache.layers):
        state = layer.store.export_state()
        prefix = f"layers.{i}."
        for name, tensor in zip(("k_codes", "k_meta", "v_codes", "v_meta"), state["pages"]):
            tensors[prefix + name] = tensor
        for name in ("window_key", "window_value", "key_mean", "value_mean"):
            if state[name] is not None:
                tensors[prefix + name] = state[name]
        layers.append(dict(length=state["length"], num_paged=state["num_paged"], batch=state["batch_size"], device=str(state["device"])))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    from . import __version__

    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(cache.config.to_dict(), sort_keys=True),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "layers": json.dumps(layers),
        "saw_kvcache_version": __version__,
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    path = os.fspath(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# ------------------------------------------------------------------------------------------------ load


def _json(metadata: dict, key: str, where: str):
    if key not in metadata:
        raise CacheFileError(f"{where}: the metadata has no {key!r} entry.")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise CacheFileError(f"{where}: the metadata entry {key!r} is not valid JSON ({error}).") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_config(metadata: dict, where: str, backend: Optional[str]) -> SawInt4Config:
    raw = _json(metadata, "config", where)
    if not isinstance(raw, dict):
        raise CacheFileError(f"{where}: the configuration is not a JSON object: {raw!r}.")
    known = set(SawInt4Config.field_names())
    unknown, missing = sorted(set(raw) - known), sorted(known - set(raw))
    if unknown:
        raise CacheFileError(
            f"{where}: the configuration has fields {unknown} that this saw_kvcache does not know (was the file "
            f"written by a newer version?); known fields: {sorted(known)}."
        )
    if missing:
        raise CacheFileError(f"{where}: the configuration lacks the fields {missing}.")
    if backend is not None:
        raw = {**raw, "backend": backend}
    try:
        return SawInt4Config(**raw)
    except ValueError as error:
        raise CacheFileError(f"{where}: the file's configuration is invalid: {error}") from None


def _read_fingerprint(metadata: dict, where: str) -> dict:
    fp = _json(metadata, "fingerprint", where)
    if not isinstance(fp, dict) or sorted(fp) != sorted(_FINGERPRINT_KEYS):
        raise CacheFileError(f"{where}: the fingerprint must be a JSON object with keys {list(_FINGERPRINT_KEYS)}, got {fp!r}.")
    n = fp["num_layers"]
    if not _is_int(n) or n < 1:
        raise CacheFileError(f"{where}: the fingerprint's num_layers must be a positive integer, got {n!r}.")
    for key in ("kv_heads", "head_dim"):
        value = fp[key]
        values = value if isinstance(value, list) else [value]
        if (isinstance(value, list) and len(value) != n) or not all(_is_int(v) and v > 0 for v in values):
            raise CacheFileError(f"{where}: the fingerprint's {key} must be a positive integer (or one per layer), got {value!r}.")
    if fp["dtype"] not in _DTYPES:
        raise CacheFileError(f"{where}: the fingerprint's dtype must be one of {sorted(_DTYPES)}, got {fp['dtype']!r}.")
    return fp


def _read_layers(metadata: dict, where: str, num_layers: int) -> list[dict]:
    layers = _json(metadata, "layers", where)
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise CacheFileError(f"{where}: 'layers' must list {num_layers} layers (the fingerprint's count).")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or sorted(layer) != sorted(_LAYER_KEYS):
            raise CacheFileError(f"{where}: layer {i} must be a JSON object with keys {list(_LAYER_KEYS)}, got {layer!r}.")
        if not all(_is_int(layer[key]) for key in ("length", "num_paged", "batch")) or not isinstance(layer["device"], str):
            raise CacheFileError(f"{where}: layer {i} has non-integer lengths or batch: {layer!r}.")
        if layer["batch"] < 1 or not 0 <= layer["num_paged"] <= layer["length"]:
            raise CacheFileError(f"{where}: layer {i} needs batch >= 1 and 0 <= num_paged <= length, got {layer!r}.")
    return layers


def _expected_tensors(config: SawInt4Config, fp: dict, layers: list[dict], present: set) -> dict:
    """name -> (dtype, shape) of every tensor a consistent file holds."""
    expected = {}
    dtype, p, r = _DTYPES[fp["dtype"]], config.page_size, config.residual_length
    for i, layer in enumerate(layers):
        h = fp["kv_heads"][i] if isinstance(fp["kv_heads"], list) else fp["kv_heads"]
        d = fp["head_dim"][i] if isinstance(fp["head_dim"], list) else fp["head_dim"]
        b, length, num_paged, prefix = layer["batch"], layer["length"], layer["num_paged"], f"layers.{i}."
        columns = math.ceil(num_paged / p)
        for name, (shape, tensor_dtype) in zip(PagedKV._fields, reference.page_layout(h, p, d, dtype)):
            expected[prefix + name] = (tensor_dtype, (b, columns, *shape))
        if r:
            for name in ("window_key", "window_value"):
                expected[prefix + name] = (dtype, (b, h, length - num_paged, d))
        for name, centering in (("key_mean", config.center_keys), ("value_mean", config.center_values)):
            if centering is not False and prefix + name in present:  # optional: "auto" may center no head
                expected[prefix + name] = (torch.float32, (h, d))
    return expected


def _validate(config: SawInt4Config, fp: dict, layers: list[dict], tensors: dict, where: str) -> None:
    r = config.residual_length
    for i, layer in enumerate(layers):
        head_dim = fp["head_dim"][i] if isinstance(fp["head_dim"], list) else fp["head_dim"]
        if head_dim % 2 or (config.hadamard_block and head_dim % config.hadamard_block):
            raise CacheFileError(f"{where}: head dim {head_dim} does not fit hadamard_block={config.hadamard_block}.")
        in_window = layer["length"] - layer["num_paged"]
        if (r == 0 and in_window) or in_window > r:
            raise CacheFileError(
                f"{where}: layer {i} has {in_window} tokens outside the pages, more than residual_length={r}."
            )
    expected = _expected_tensors(config, fp, layers, set(tensors))
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CacheFileError(
            f"{where}: the tensors do not match the file's description: "
            + "; ".join(part for part in (missing and f"missing {missing[:6]}", extra and f"unexpected {extra[:6]}") if part)
        )
    for name, (dtype, shape) in expected.items():
        tensor = tensors[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CacheFileError(
                f"{where}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype} "
                "(from the fingerprint, the configuration and the layer's lengths)."
            )


def _usable(device: torch.device) -> Optional[torch.device]:
    """The device with its index filled in (cuda -> cuda:0), or None when it does not exist here."""
    try:
        return torch.empty(0, device=device).device
    except (RuntimeError, AssertionError, ValueError):
        return None


def _target_devices(device, layers: list[dict], where: str) -> list[torch.device]:
    if device is not None:
        try:
            requested = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"SawInt4Cache.load: invalid device {device!r} ({error}).") from None
        usable = _usable(requested)
        if usable is None:
            raise ValueError(f"SawInt4Cache.load: device {str(requested)!r} is not available on this machine.")
        return [usable] * len(layers)
    targets = []
    for layer in layers:
        try:
            saved = torch.device(layer["device"])
        except (RuntimeError, TypeError):
            raise CacheFileError(f"{where}: a layer names an invalid device {layer['device']!r}.") from None
        targets.append(_usable(saved) or torch.device("cpu"))
    return targets


def load_cache(path: PathLike, device=None, model=None, backend: Optional[str] = None):
    """Read a file written by save_cache and return a new SawInt4Cache holding the same tokens.

    Args:
        path: the safetensors file.
        device: where to put the cache; by default each layer goes where it was saved if that device exists
            here, else to the CPU.
        model: if given, the file's fingerprint must match this model (CacheMismatchError otherwise).
        backend: overrides the saved configuration's backend ("auto", "torch" or "triton").

    Nothing is built until every check has passed (CacheFileError names the problem)."""
    from .integration.cache import SawInt4Cache, SawInt4Layer

    path = os.fspath(path)
    where = f"SawInt4Cache.load({path!r})"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such file.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise CacheFileError(
                    f"{where}: not a saved SawInt4Cache (the safetensors metadata has format="
                    f"{metadata.get('format')!r}, expected {FORMAT_NAME!r})."
                )
            version = metadata.get("format_version")
            if version != str(FORMAT_VERSION):
                newer = version is not None and version.isdigit() and int(version) > FORMAT_VERSION
                raise CacheFileError(
                    f"{where}: format version {version!r}, but this saw_kvcache reads version {FORMAT_VERSION} only"
                    + (" (the file was written by a newer saw_kvcache; upgrade to read it)." if newer else ".")
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as error:
        raise CacheFileError(
            f"{where}: not a valid safetensors file, so truncated or corrupted ({error})."
        ) from None
    if metadata.get("checksum") != _checksum(metadata, tensors):
        raise CacheFileError(
            f"{where}: checksum mismatch: the file's contents are corrupted (or were edited after saving)."
        )
    config = _read_config(metadata, where, backend)
    fp = _read_fingerprint(metadata, where)
    layers = _read_layers(metadata, where, fp["num_layers"])
    _validate(config, fp, layers, tensors, where)
    if model is not None:
        check_compatible(fp, model)
    devices = _target_devices(device, layers, where)
    for i, target in enumerate(devices):
        head_dim = fp["head_dim"][i] if isinstance(fp["head_dim"], list) else fp["head_dim"]
        try:
            get_backend(config.backend, target, head_dim=head_dim)
        except RuntimeError as error:
            raise CacheFileError(
                f"{where}: the saved configuration cannot run here: {error} "
                "(SawInt4Cache.load(..., backend='torch') overrides it)."
            ) from None

    cache = SawInt4Cache(config=config)
    origin = f"loaded from {path} (saved from a model with {_describe(fp)})"
    for i, (layer, target) in enumerate(zip(layers, devices)):
        prefix = f"layers.{i}."
        state = dict(
            length=layer["length"], num_paged=layer["num_paged"], batch_size=layer["batch"],
            num_heads=fp["kv_heads"][i] if isinstance(fp["kv_heads"], list) else fp["kv_heads"],
            head_dim=fp["head_dim"][i] if isinstance(fp["head_dim"], list) else fp["head_dim"],
            dtype=_DTYPES[fp["dtype"]],
            pages=PagedKV(*(tensors[prefix + name] for name in ("k_codes", "k_meta", "v_codes", "v_meta"))),
            **{name: tensors.get(prefix + name) for name in ("window_key", "window_value", "key_mean", "value_mean")},
        )
        cache_layer = SawInt4Layer(config, i, cache)
        cache_layer.store.load_state(state, target, origin=origin)
        cache_layer.is_initialized = True
        cache_layer.device = target
        cache.layers.append(cache_layer)
    cache.loaded_from = path
    return cache


__all__ = [
    "CacheFileError",
    "CacheMismatchError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "cache_fingerprint",
    "check_compatible",
    "load_cache",
    "model_fingerprint",
    "save_cache",
]
