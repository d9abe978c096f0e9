"""The ``gsq-torch`` command line: one small function per subcommand, each calling the library.

To add a subcommand, write ``_add_<name>(subparsers)`` that registers its arguments and sets
``func`` to a function taking the parsed ``argparse.Namespace``, and list it in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a compressed-tensors pack-quantized 2-bit checkpoint into a Humming checkpoint",
        description="Convert a compressed-tensors pack-quantized checkpoint (native int2, or GSQ's 4-bit "
        "container) into a Humming uint2 checkpoint, one shard at a time.",
    )
    p.add_argument("src", help="compressed-tensors checkpoint directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from .checkpoint import convert_checkpoint

        out = convert_checkpoint(args.src, args.dst, progress=not args.no_progress)
        print(f"wrote Humming checkpoint to {out}")
        return 0

    p.set_defaults(func=run)


def _add_quantize(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a transformers MoE model's routed experts to 2 bits (GSQ, GPTQ or RTN)",
        description="Quantize the routed experts of a transformers MoE model layer by layer and save a Humming "
        "checkpoint. Progress is kept in --work-dir; rerunning the same command resumes.",
    )
    p.add_argument("model", help="model name or local path (loaded on the CPU; one layer at a time goes to --device)")
    p.add_argument("--out", required=True, help="output directory of the Humming checkpoint")
    p.add_argument("--method", choices=["gsq", "gptq", "rtn"], default="gsq")
    p.add_argument("--calibration", required=True,
                   help="datasets name, saved dataset directory, or .json/.jsonl/.txt/.csv/.parquet file")
    p.add_argument("--text-column", default=None, help="column with plain text (default: text/content/prompt)")
    p.add_argument("--messages-column", default=None, help="column with chat messages, rendered by the chat template")
    p.add_argument("--split", default="train")
    p.add_argument("--dataset-config", default=None, help="datasets configuration name")
    p.add_argument("--samples", type=int, default=512, help="training sequences (also the GPTQ Hessians)")
    p.add_argument("--val-samples", type=int, default=32, help="held-out sequences (safeguard and logged objective)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=10, help="GSQ epochs per layer")
    p.add_argument("--batch-tokens", type=int, default=4096, help="GSQ calibration tokens per optimizer step")
    p.add_argument("--lr-logits", type=float, default=2e-4)
    p.add_argument("--lr-scales", type=float, default=1e-4)
    p.add_argument("--act-order", action="store_true", help="GPTQ with act-order (static groups)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    p.add_argument("--work-dir", default=None, help="progress folder (default: <out>.work)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --work-dir holds progress")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        import logging

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .quantizers.calibration import load_calibration
        from .quantizers.gsq import GSQConfig
        from .quantizers.pipeline import quantize_model

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        samples = load_calibration(
            args.calibration, tokenizer, args.samples + args.val_samples, args.seq_len, text_column=args.text_column,
            messages_column=args.messages_column, split=args.split, dataset_config=args.dataset_config, seed=args.seed,
        )
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        gsq = GSQConfig(epochs=args.epochs, batch_tokens=args.batch_tokens, lr_logits=args.lr_logits,
                        lr_scales=args.lr_scales)
        logs = quantize_model(
            model, samples, args.method, tokenizer=tokenizer, num_samples=args.samples, val_samples=args.val_samples,
            seq_len=args.seq_len, gsq=gsq, act_order=args.act_order, device=args.device,
            work_dir=args.work_dir or args.out.rstrip("/\\") + ".work", resume=not args.no_resume,
            seed=args.seed, out_dir=args.out, progress=not args.no_progress,
        )
        methods = [m for m in ("rtn", "gptq", "gsq", "final") if logs and m in logs[0]]
        print("layer  " + "  ".join(f"{m:>10s}" for m in methods))
        for entry in logs:
            print(f"{entry['layer']:5d}  " + "  ".join(f"{entry[m]:10.4g}" for m in methods))
        print(f"wrote Humming checkpoint to {args.out}")
        return 0

    p.set_defaults(func=run)



def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity (sliding window), tokens/s and peak memory of a model on a text",
        description="Evaluate a causal LM (a Humming checkpoint, a BF16 model, or 'tiny-moe', the model shipped with "
        "gsq-torch) on a local text file or a datasets dataset; without --text/--dataset, on the shipped held-out text.",
    )
    p.add_argument("model", help="checkpoint directory, hub name, or 'tiny-moe'")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", default=None, help=".txt file, or .json/.jsonl/.csv/.parquet with a text column")
    src.add_argument("--dataset", default=None, help="datasets name or save_to_disk directory, e.g. wikitext")
    p.add_argument("--dataset-config", default=None, help="e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="test")
    p.add_argument("--text-column", default=None, help="default: text/content/document")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    p.add_argument("--stride", type=int, default=None, help="step between windows (default: --seq-len)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rtn", action="store_true", help="quantize a BF16 model's routed experts to 2 bits (RTN) first")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")

    def run(args: argparse.Namespace) -> int:
        import json
        import os
        from pathlib import Path

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .evaluation import evaluate_perplexity
        from .models import tiny_moe_path
        from .nn import replace_experts

        path = tiny_moe_path() if args.model == "tiny-moe" and not os.path.exists(args.model) else args.model
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device)
        if args.rtn:
            replace_experts(model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        text = Path(args.text) if args.text else None  # a path, never taken as the text itself
        result = evaluate_perplexity(
            model, tokenizer, text, dataset=args.dataset, dataset_config=args.dataset_config, split=args.split,
            text_column=args.text_column, seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
            batch_size=args.batch_size,
        )
        print(result.summary())
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": str(path), "rtn": args.rtn, "dtype": args.dtype, **result.to_dict()}, f, indent=1)
        return 0

    p.set_defaults(func=run)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the shipped tiny MoE model: RTN vs GPTQ vs GSQ perplexity, a Humming checkpoint, reload, generate",
        description="Quantize the routed experts of the tiny MoE model shipped with gsq-torch with RTN, GPTQ and GSQ; "
        "print held-out perplexity, bits per weight and sizes; save the GSQ model as a Humming checkpoint, load it "
        "back with from_pretrained and generate from it. About 10 minutes on 2 CPU cores (--quick: about a minute).",
    )
    p.add_argument("--out", default="gsq-demo", help="output directory (checkpoint in <out>/tiny-moe-gsq, demo.json)")
    p.add_argument("--quick", action="store_true", help="short run on a slice of the data (CI smoke test)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from .demo import run_demo

        result = run_demo(args.out, device=args.device, quick=args.quick, seed=args.seed, threads=args.threads,
                          progress=not args.no_progress)
        print(result.report())
        return 0 if result.reload_matches else 1

    p.set_defaults(func=run)


# Other subcommands (quantize, eval, demo) register themselves here.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_convert, _add_quantize, _add_eval, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsq-torch", description="2-bit GSQ (Humming uint2) MoE models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gsq-torch`` console script; returns the exit status.

    Errors a user can fix (a bad checkpoint, a missing file) print one line, not a traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"gsq-torch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
