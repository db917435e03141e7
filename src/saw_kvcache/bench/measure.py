"""One end-to-end generate() measurement, and the capacity (largest batch that fits at a context)."""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Optional

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..integration import SawInt4Cache, SawInt4Layer
from ..integration.compat import cache_kwargs
from .methods import Method, generate_kwargs, kv_bytes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class StepTimer(LogitsProcessor):
    """Called by generate() once per generated token, right after that step's forward: a timestamp each time.

    On CUDA the timestamps are events recorded on the stream, read after generate() returns: a sync here would
    make the host wait before it queues the step's token selection and stopping check, work that otherwise
    overlaps the forward on the GPU (generate() syncs once per step anyway, in its stopping check, after that
    work). `start()` marks time zero just before generate() is called; `times` are seconds from then."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        synchronize(self.device)
        self.marks = [self._mark()]

    def __call__(self, input_ids, scores):
        self.marks.append(self._mark())
        return scores

    @property
    def times(self) -> list[float]:
        """Seconds from start() to each call (syncs the device)."""
        first, rest = self.marks[0], self.marks[1:]
        if self.device.type == "cuda":
            synchronize(self.device)
            return [first.elapsed_time(mark) / 1e3 for mark in rest]
        return [mark - first for mark in rest]


def _dynamo_counts() -> tuple[int, int]:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return 0, 0
    return sum(counters["graph_break"].values()), int(counters["stats"]["unique_graphs"])


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def run_case(model, method: Method, batch: int, context: int, new_tokens: int, device: torch.device,
             compile_mode: str = "reduce-overhead", compile_backend: str = "inductor",
             prefill_chunk: Optional[int] = None, fill_prompt: bool = False) -> dict:
    """generate() `new_tokens` tokens after a random prompt of `context` tokens, for `batch` sequences (with
    `prefill_chunk`, generate() prefills that many tokens per forward; with `fill_prompt`, the cache is first
    filled with `context - 1` tokens of random keys and values, as the capacity search does, and generate() runs
    the prompt's last token and the decode steps: for cases whose prefill does not fit or cannot run; no prefill
    time then).

    Returns prefill seconds (generate() call to the first token's logits), decode milliseconds per step (median
    of the later steps), decode tokens/s (batch / that median), the first decode step (compilation shows up
    there), peak device memory, and the cache's KV bytes (allocated; in use where known) and bytes per token."""
    row = dict(method=method.key, label=method.label, batch=batch, context=context, new_tokens=new_tokens)
    model.set_attn_implementation(method.attn_implementation)
    generator = torch.Generator().manual_seed(batch * 1_000_003 + context)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator).to(device)
    timer = StepTimer(device)
    cache = None
    breaks0, graphs0 = _dynamo_counts()
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        cache = method.make_cache(model, batch, context + new_tokens)
        if fill_prompt:
            with torch.no_grad():
                _fill(cache, model, batch, context - 1, device)
        timer.start()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, logits_processor=LogitsProcessorList([timer]), **cache_kwargs(cache),
                **(dict(prefill_chunk_size=prefill_chunk) if prefill_chunk else {}),
                **generate_kwargs(method, device, compile_mode, compile_backend),
            )
        synchronize(device)
        end = time.perf_counter()
    except torch.OutOfMemoryError as e:
        cache = None
        release(device)
        return dict(row, status="oom", note=_short(e))
    except Exception as e:  # noqa: BLE001  (a compile failure is a result: reported, not raised)
        cache = None
        release(device)
        if method.compiled:
            return dict(row, status="unsupported", note=_short(e))
        raise
    times = timer.times
    steps = [b - a for a, b in zip(times, times[1:])]
    decode = statistics.median(steps[1:] or steps) if steps else float("nan")
    allocated, in_use = kv_bytes(cache)
    stored = batch * (context + new_tokens - 1)
    breaks1, graphs1 = _dynamo_counts()
    row.update(
        status="ok",
        prefill_s=None if fill_prompt else times[0],
        decode_ms_per_step=decode * 1e3,
        decode_tokens_per_s=batch / decode if decode == decode and decode > 0 else None,
        first_decode_step_ms=steps[0] * 1e3 if steps else None,
        total_s=end - start,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        kv_bytes=allocated,
        kv_bytes_in_use=in_use,
        kv_bytes_per_token=(in_use if in_use is not None else allocated) / stored,
    )
    notes = [f"cache filled with {context - 1} random tokens (no prefill)"] if fill_prompt else []
    if method.compiled:
        notes.append(f"dynamo: {graphs1 - graphs0} graphs, {breaks1 - breaks0} graph breaks")
    if notes:
        row["note"] = "; ".join(notes)
    del cache
    release(device)
    return row


# ---------------------------------------------------------------------------------------------------- capacity


def memory_budget(device: torch.device, override_gb: Optional[float]) -> Optional[int]:
    """Bytes free for KV now (the model already loaded): CUDA free memory, the CPU's available memory, or the
    override."""
    if override_gb is not None:
        return int(override_gb * 2**30)
    release(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_capacity(budget: int, bytes_per_token: float, context: int, margin: float = 0.9) -> int:
    """Largest batch whose KV at `context` tokens fits in margin x budget (the rest: activations, fragmentation)."""
    return max(int(margin * budget // (bytes_per_token * context)), 0)


def _fill(cache, model, batch: int, tokens: int, device, chunk: int = 2048) -> None:
    """Put `tokens` random tokens per sequence into every layer of the cache without running the model (a prefill
    of batch x tokens through an 8B model would take minutes at the batches that matter)."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    step = max(1, min(tokens, chunk * 8 // max(batch, 1)))
    for layer_idx in range(c.num_hidden_layers):
        if isinstance(cache, SawInt4Cache):
            while len(cache.layers) <= layer_idx:
                cache.layers.append(SawInt4Layer(cache.config, len(cache.layers), cache))
            layer = cache.layers[layer_idx]
        for start in range(0, tokens, step):
            n = min(step, tokens - start)
            k = torch.randn(batch, heads, n, head_dim, dtype=model.dtype, device=device)
            if isinstance(cache, SawInt4Cache):
                layer.store.append(k, k)  # the pages directly: no dequantized copy is returned
            else:
                cache.update(k, k, layer_idx)
            del k
        if isinstance(cache, SawInt4Cache):  # as after a saw_int4 prefill: the next update returns the new token only
            layer.read_by_saw_attention = True
            layer.is_initialized = True


def fits(model, method: Method, batch: int, context: int, device: torch.device, decode_steps: int = 2) -> bool:
    """Try it: a cache of `batch` sequences holding `context` tokens, then `decode_steps` real decode forwards."""
    cache = None
    release(device)
    try:
        model.set_attn_implementation(method.attn_implementation)
        cache = method.make_cache(model, batch, context + decode_steps)
        with torch.no_grad():
            _fill(cache, model, batch, context, device)
            token = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
            for i in range(decode_steps):
                positions = torch.full((batch, 1), context + i, device=device)
                model(token, position_ids=positions, use_cache=True, **cache_kwargs(cache))
        synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        cache = None
        release(device)


def search_capacity(model, method: Method, context: int, device: torch.device, guess: int) -> int:
    """Largest batch for which `fits` holds, searched around `guess` (doubling/halving, then bisection)."""
    guess = max(guess, 1)
    if fits(model, method, guess, context, device):
        low, high = guess, None
        while high is None:
            probe = low * 2 if low < 4096 else None
            if probe is None:
                return low
            if fits(model, method, probe, context, device):
                low = probe
            else:
                high = probe
    else:
        high, low = guess, 0
        while low == 0:
            probe = high // 2
            if probe == 0:
                return 0
            if fits(model, method, probe, context, device):
                low = probe
            else:
                high = probe
    while high - low > 1 and (high - low) / low > 0.02:
        mid = (low + high) // 2
        if fits(model, method, mid, context, device):
            low = mid
        else:
            high = mid
    return low


def bytes_per_token(rows: list[dict], method: str) -> Optional[float]:
    """The method's KV bytes per token per sequence, from its measured run with the most tokens."""
    done = [r for r in rows if r["method"] == method and r.get("status") == "ok" and r.get("kv_bytes_per_token")]
    if not done:
        return None
    best = max(done, key=lambda r: r["batch"] * r["context"])
    return best["kv_bytes_per_token"]
