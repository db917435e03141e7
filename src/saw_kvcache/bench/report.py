"""`saw-kvcache bench` outputs: NAME.md, NAME.json and (with matplotlib) NAME_throughput.png, NAME_capacity.png."""

from __future__ import annotations

import json
import os


def _num(value, fmt="{:,.1f}"):
    return "" if value is None else fmt.format(value)


def _gib(value):
    return "" if value is None else f"{value / 2**30:,.2f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# saw-kvcache bench: {meta['model']}",
        "",
        f"{meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, saw_kvcache "
        f"{meta['saw_kvcache']} ({meta.get('commit') or 'no git commit'}); {meta['dtype']}; "
        f"{meta['shape']['layers']} layers, {meta['shape']['kv_heads']} KV heads of dim {meta['shape']['head_dim']}; "
        f"{meta['new_tokens']} new tokens per case; SawInt4Config {meta['saw_config']}.",
        "",
        f"`{meta['command']}`",
        "",
        "\"first\" is each method's first pass over the cases, as a user's first call runs (compilation, kernel "
        "autotuning and cuDNN plans included); \"warm\" repeats the same cases after it. Decode ms/step is the "
        "median step after the first; tokens/s = batch / that.",
        "",
        "| method | pass | batch | context | status | prefill s | decode ms/step | decode tok/s | first step ms | "
        "peak GiB | KV GiB | KV B/token | note |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['pass']} | {r['batch']} | {r['context']:,} | {r['status']} | "
            f"{_num(r.get('prefill_s'), '{:,.3f}')} | {_num(r.get('decode_ms_per_step'), '{:,.2f}')} | "
            f"{_num(r.get('decode_tokens_per_s'))} | {_num(r.get('first_decode_step_ms'), '{:,.1f}')} | "
            f"{_gib(r.get('peak_memory_bytes'))} | {_gib(r.get('kv_bytes'))} | "
            f"{_num(r.get('kv_bytes_per_token'), '{:,.0f}')} | {r.get('note', '')} |"
        )
    ratios = result.get("ratios") or []
    if ratios:
        which = ratios[0].get("passes", "warm")
        lines += ["", f"Decode tokens/s ({which} pass) relative to DynamicCache (sdpa) on the same case:", "",
                  "| method | " + " | ".join(f"{b}x{c:,}" for b, c in result["cases"]) + " |",
                  "|---|" + "---:|" * len(result["cases"])]
        for entry in ratios:
            lines.append(f"| {entry['label']} | " + " | ".join(_num(v, "{:.2f}x") for v in entry["ratios"]) + " |")
    if result.get("capacity"):
        cap = result["capacity"]
        lines += [
            "",
            f"## Capacity at {cap['context']:,} tokens of context",
            "",
            f"Budget {_gib(cap.get('budget_bytes'))} GiB free for KV after loading the model. {cap['how']}",
            "",
            "| method | largest batch | KV B/token | mode | note |",
            "|---|---:|---:|---|---|",
        ]
        for r in cap["rows"]:
            lines.append(
                f"| {r['label']} | {'' if r.get('batch') is None else r['batch']} | "
                f"{_num(r.get('kv_bytes_per_token'), '{:,.0f}')} | {r.get('mode', '')} | {r.get('note', '')} |"
            )
    if result.get("skipped"):
        lines += ["", "Not run: " + "; ".join(f"{s['label']}: {s['reason']}" for s in result["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str, name: str = "bench") -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"md": os.path.join(out_dir, f"{name}.md"), "json": os.path.join(out_dir, f"{name}.json")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(result))
    paths.update(plot(result, out_dir, name))
    return paths


def plot(result: dict, out_dir: str, name: str) -> dict:
    """Decode tokens/s against context (one panel per batch size, warm pass) and capacity bars. {} without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    written = {}
    rows = [r for r in result["rows"] if r["pass"] == "warm" and r.get("status") == "ok"] or [
        r for r in result["rows"] if r.get("status") == "ok"
    ]
    batches = sorted({r["batch"] for r in rows})
    if batches:
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
        for ax, batch in zip(axes[0], batches):
            for label in dict.fromkeys(r["label"] for r in rows):
                points = sorted((r["context"], r["decode_tokens_per_s"]) for r in rows if r["label"] == label and r["batch"] == batch)
                if points:
                    ax.plot(*zip(*points), marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"batch {batch}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{result['meta']['model']} on {result['meta']['device_name']}")
        fig.tight_layout()
        written["png_throughput"] = os.path.join(out_dir, f"{name}_throughput.png")
        fig.savefig(written["png_throughput"], dpi=120)
        plt.close(fig)
    cap = result.get("capacity")
    if cap and any(r.get("batch") for r in cap["rows"]):
        bars = [(r["label"], r["batch"]) for r in cap["rows"] if r.get("batch") is not None]
        fig, ax = plt.subplots(figsize=(1.6 * len(bars) + 2, 4))
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
        for i, (_, value) in enumerate(bars):
            ax.text(i, value, str(value), ha="center", va="bottom")
        ax.set_ylabel(f"largest batch at {cap['context']:,} tokens")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        fig.tight_layout()
        written["png_capacity"] = os.path.join(out_dir, f"{name}_capacity.png")
        fig.savefig(written["png_capacity"], dpi=120)
        plt.close(fig)
    return written
