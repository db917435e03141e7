"""`saw-kvcache bench`: end-to-end generate() speed, memory and capacity of SawInt4Cache against transformers'
caches, on a model shape with random weights. `run_bench(...)` is the whole command as one function."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence

import torch
import transformers

from .measure import bytes_per_token, estimate_capacity, memory_budget, run_case, search_capacity
from .methods import DEFAULT_METHODS, all_methods, saw_config_for
from .models import SHAPES, build_model, model_config, shape_of
from .report import markdown, write_outputs

DEFAULT_CASES = ((1, 8192), (16, 8192), (64, 8192), (1, 32768), (1, 65536))

__all__ = ["DEFAULT_CASES", "DEFAULT_METHODS", "SHAPES", "markdown", "run_bench", "write_outputs"]


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)
        except ImportError:
            pass
    return _SimpleProgress(total, enabled)


class _SimpleProgress:
    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled

    def set_description(self, text):
        self.text = text

    def update(self, n=1):
        self.done += n
        if self.enabled:
            print(f"[{self.done}/{self.total}] {getattr(self, 'text', '')}", file=sys.stderr, flush=True)

    def close(self):
        pass


def _commit() -> Optional[str]:
    """The git commit of this source tree (with "+uncommitted" if it has changes), or $SAW_COMMIT when set: a copy
    of the tree whose git metadata is not its own (a GPU machine's copy, say) names its commit there."""
    if os.environ.get("SAW_COMMIT"):
        return os.environ["SAW_COMMIT"]
    try:
        folder = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def run_bench(
    model: str = "llama3-8b",
    cases: Sequence[tuple[int, int]] = DEFAULT_CASES,
    methods: Sequence[str] = DEFAULT_METHODS,
    new_tokens: int = 32,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    layers: Optional[int] = None,
    saw_fields: Optional[dict] = None,
    warm: bool = True,
    capacity_context: Optional[int] = 32768,
    capacity_mode: str = "auto",
    capacity_memory_gb: Optional[float] = None,
    compile_mode: str = "reduce-overhead",
    compile_backend: str = "inductor",
    prefill_chunk: Optional[int] = None,
    fill_prompt: bool = False,
    out_dir: Optional[str] = None,
    name: str = "bench",
    progress: bool = True,
    command: Optional[str] = None,
) -> dict:
    """Measure every method on every (batch, context) case, then the capacity at `capacity_context`.

    model: a name from SHAPES (random weights), a config.json or a folder with one. dtype: "bfloat16" (default
    on CUDA), "float16" or "float32" (default on the CPU). capacity_mode: "search" tries batches (a cache filled
    with random keys/values, then real decode steps; CUDA only), "estimate" divides the free memory by the
    measured KV bytes per token, "auto" is search on CUDA and estimate elsewhere; capacity_context=None skips it.
    prefill_chunk: generate()'s prefill_chunk_size (the prompt in forwards of that many tokens per sequence, for
    cases whose one-forward prefill does not fit in memory); None: the whole prompt in one forward.
    fill_prompt: fill each cache with the prompt's tokens as random keys and values instead of a prefill (no
    prefill time; decode steps as usual), for cases that no prefill reaches (see run_case).
    Returns {"meta", "cases", "rows", "ratios", "capacity", "skipped", "outputs"}.
    """
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
    if fill_prompt and prefill_chunk is not None:
        raise ValueError("fill_prompt replaces the prefill, so prefill_chunk has nothing to do; pass one of them")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    unknown = [m for m in methods if m not in all_methods({})]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(DEFAULT_METHODS)}")
    if capacity_mode not in ("auto", "search", "estimate"):
        raise ValueError(f"capacity_mode must be auto, search or estimate, got {capacity_mode!r}")
    if capacity_mode == "search" and dev.type != "cuda":
        raise ValueError("capacity_mode='search' allocates until memory runs out, which needs a CUDA device; use 'estimate'")
    cases = [(int(b), int(c)) for b, c in cases]
    config = model_config(model, layers)
    net = build_model(config, torch_dtype, dev)
    saw_fields = dict(saw_fields or {})
    registry = all_methods(saw_fields)
    chosen = [registry[m] for m in methods]
    runnable = [m for m in chosen if m.missing is None]
    skipped = [dict(method=m.key, label=m.label, reason=m.missing) for m in chosen if m.missing is not None]
    passes = ("first", "warm") if warm else ("first",)
    with_capacity = capacity_context is not None
    bar = _progress(len(runnable) * (len(cases) * len(passes) + with_capacity), progress)
    rows: list[dict] = []
    for method in runnable:
        if method.compiled:  # a clean start, so that "first" includes the compilation a user's first call pays
            torch._dynamo.reset()
            if hasattr(net, "_compiled_call"):
                del net._compiled_call
        failed = None
        for which in passes:
            for batch, context in cases:
                bar.set_description(f"{method.key} {which} {batch}x{context}")
                if failed is not None:
                    row = dict(method=method.key, label=method.label, batch=batch, context=context,
                               new_tokens=new_tokens, status="skipped", note=f"after: {failed}")
                else:
                    row = run_case(net, method, batch, context, new_tokens, dev, compile_mode, compile_backend,
                                   prefill_chunk, fill_prompt)
                    if row["status"] == "unsupported":
                        failed = row["note"]
                rows.append(dict(row, **{"pass": which}))
                bar.update(1)
    capacity = None
    if with_capacity:
        capacity = _capacity(net, runnable, rows, capacity_context, capacity_mode, capacity_memory_gb, dev, bar)
    bar.close()
    result = dict(
        meta=dict(
            model=model, shape=shape_of(net), dtype=str(torch_dtype).replace("torch.", ""), device=str(dev),
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
            torch=torch.__version__, transformers=transformers.__version__, saw_kvcache=_version(), commit=_commit(),
            new_tokens=new_tokens, saw_config=saw_config_for(net, saw_fields).to_dict(),
            compile=dict(mode=compile_mode, backend=compile_backend), prefill_chunk=prefill_chunk,
            fill_prompt=fill_prompt, command=command or "run_bench(...)",
        ),
        cases=cases, rows=rows, ratios=_ratios(rows, runnable, cases), capacity=capacity, skipped=skipped,
    )
    del net
    result["outputs"] = write_outputs(result, out_dir, name) if out_dir else {}
    return result


def _version() -> str:
    from .. import __version__

    return __version__


def _ratios(rows, methods, cases) -> list[dict]:
    """Decode tokens/s over DynamicCache's per case, from the warm pass (the first pass with --no-warm)."""
    which = "warm" if any(r["pass"] == "warm" for r in rows) else "first"

    def tps(method, batch, context):
        for r in rows:
            if (r["method"], r["batch"], r["context"], r["pass"]) == (method, batch, context, which) and r["status"] == "ok":
                return r["decode_tokens_per_s"]
        return None

    if not any(m.key == "dynamic" for m in methods):
        return []
    out = []
    for m in methods:
        values = []
        for b, c in cases:
            mine, base = tps(m.key, b, c), tps("dynamic", b, c)
            values.append(mine / base if mine and base else None)
        out.append(dict(method=m.key, label=m.label, ratios=values, passes=which))
    return out


def _capacity(net, methods, rows, context, mode, memory_gb, device, bar) -> dict:
    budget = memory_budget(device, memory_gb)
    search = mode == "search" or (mode == "auto" and device.type == "cuda" and memory_gb is None)
    how = (
        "Largest batch found by trying (a cache filled with random keys/values for every layer, then two real "
        "eager decode steps; bisection to 2%)." if search else
        "Estimate: 0.9 x budget / (measured KV bytes per token x context); activations are not counted."
    )
    out = []
    for method in methods:
        bar.set_description(f"capacity {method.key}")
        per_token = bytes_per_token(rows, method.key)
        row = dict(method=method.key, label=method.label, kv_bytes_per_token=per_token,
                   mode="search" if search else "estimate")
        if per_token is None or budget is None:
            row.update(batch=None, note="no successful run to measure bytes per token" if per_token is None
                       else "free memory unknown (pass --capacity-memory-gb)")
        else:
            guess = estimate_capacity(budget, per_token, context)
            row["estimate"] = guess
            if search:
                try:
                    row["batch"] = search_capacity(net, method, context, device, guess)
                except Exception as e:  # noqa: BLE001
                    row.update(batch=None, note=f"search failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                else:
                    row["note"] = f"estimate {guess}"
            else:
                row["batch"] = guess
        out.append(row)
        bar.update(1)
    return dict(context=context, budget_bytes=budget, how=how, rows=out)
