"""The evaluation's outputs: a markdown table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import os


def _fields_text(fields) -> str:
    if fields is None:
        return "DynamicCache, sdpa"
    return ", ".join(f"{k}={v}" for k, v in fields.items()) or "(defaults)"


def markdown(result: dict) -> str:
    meta = result["meta"]
    rows = result["rows"]
    full = rows[0]
    mem_dtype = meta["memory_dtype"]
    lines = [
        f"Model `{meta['model']}`{' + ' + meta['model_note'] if meta.get('model_note') else ''}, {meta['dtype']} "
        f"({meta['dtype_note']}); text: {', '.join(os.path.basename(t) for t in meta['text'])}; "
        f"{meta['tokens']} tokens, prefill {meta['prefill']}, then chunks of {meta['chunk']} through the cache "
        f"({meta['scored']} scored tokens). KL and top-1 are against the full-precision row. Memory: K and V, "
        f"all layers, scale/offset and window in {mem_dtype}; \"fixed\" is per sequence (window, centering vectors); "
        f"\"x {mem_dtype} @{meta['tokens']}\" is the cache at {meta['tokens']} tokens over a {mem_dtype} cache.",
        "",
        f"| configuration | fields | bits/elem | bytes/token | fixed bytes | x {mem_dtype} @{meta['tokens']} | ppl | Δppl | KL | top-1 |"
        + (" passkey |" if result.get("passkey") else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if result.get("passkey") else ""),
    ]
    passkey = {p["name"]: p for p in result.get("passkey") or []}
    for row in rows:
        mem = row["memory"]
        cells = [
            row["name"], _fields_text(row["fields"]), f"{mem['bits_per_element']:.2f}", f"{mem['bytes_per_token']:,}",
            f"{mem['fixed_bytes']:,}", f"{mem['ratio_at']:.3f}", f"{row['ppl']:.3f}", f"{row['ppl'] - full['ppl']:+.3f}",
            f"{row['kl']:.4f}", f"{row['top1']:.3f}",
        ]
        if passkey:
            p = passkey.get(row["name"])
            cells.append(f"{p['accuracy']:.2f}" if p else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if passkey:
        lengths = list(next(iter(passkey.values()))["by_length"])
        depths = meta["passkey_depths"]
        lines += [
            "",
            f"Passkey retrieval: accuracy per prompt length (tokens), {len(depths)} depths each "
            f"({', '.join(str(d) for d in depths)}); the prompt is prefilled, the answer tokens read the cache.",
            "",
            "| configuration | " + " | ".join(lengths) + " | all |",
            "|---|" + "---:|" * (len(lengths) + 1),
        ]
        for name, p in passkey.items():
            lines.append(
                f"| {name} | " + " | ".join(f"{p['by_length'][n]:.1f}" for n in lengths) + f" | {p['accuracy']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str, name: str = "eval") -> dict:
    """Write NAME.md, NAME.json and (when matplotlib is installed) NAME.png into out_dir. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, f"{name}.md"), "json": os.path.join(out_dir, f"{name}.json")}
    with open(paths["markdown"], "w") as f:
        f.write(markdown(result))
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.join(out_dir, f"{name}.png")
    if plot(result, png):
        paths["png"] = png
    return paths


def plot(result: dict, path: str) -> bool:
    """KL per configuration (bars, log scale) and KL against the bits per element the cache costs at the
    evaluated length. False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    meta, rows = result["meta"], result["rows"]
    quant = rows[1:]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.32 * len(quant) + 3.2), gridspec_kw={"width_ratios": [1, 1]})
    names = [f"{i}. {r['name']}" for i, r in enumerate(quant, 1)][::-1]
    kls = [max(r["kl"], 1e-6) for r in quant][::-1]
    ax1.barh(names, kls, color="tab:blue")
    ax1.set_xscale("log")
    ax1.set_xlabel("mean KL(full precision || cache), nats per token (log)")
    ax1.set_title("Distance from the full-precision cache")
    for y, kl in enumerate(kls):
        ax1.text(kl, y, f" {kl:.4f}", va="center", fontsize=8)
    full_bits = rows[0]["memory"]["bits_per_element"]
    for i, r in enumerate(quant, 1):
        bits = r["memory"]["ratio_at"] * full_bits
        ax2.scatter(bits, max(r["kl"], 1e-6), color="tab:red", zorder=3)
        ax2.annotate(str(i), (bits, max(r["kl"], 1e-6)), fontsize=8, xytext=(4, 2 + 7 * (i % 3)), textcoords="offset points")
    ax2.set_yscale("log")
    ax2.set_xlabel(f"bits per element at {meta['tokens']} tokens ({meta['memory_dtype']}: {full_bits:g})")
    ax2.set_ylabel("mean KL (log)")
    ax2.set_title("Quality against memory (numbers: rows on the left)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{meta['model']}{' + ' + meta['model_note'] if meta.get('model_note') else ''}: {meta['tokens']} tokens, chunks of {meta['chunk']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
