"""Perplexity, speed and memory of a BF16 model against its 2-bit version, on held-out text.

    python examples/evaluate.py                                  # shipped tiny model: BF16 vs RTN 2-bit
    python examples/evaluate.py --quantized path/to/humming-checkpoint --text my.txt --stride 256

The same measurement as ``gsq-torch eval MODEL``; see gsq_torch.evaluation.evaluate_perplexity.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import gsq_torch
from gsq_torch.evaluation import evaluate_perplexity
from gsq_torch.models import tiny_moe_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bf16", default=str(tiny_moe_path()), help="the BF16 model (directory or hub name)")
    p.add_argument(
        "--quantized", default=None, help="its Humming checkpoint (default: RTN of --bf16, made here)"
    )
    p.add_argument("--text", default=None, help="text file (default: the shipped held-out text)")
    p.add_argument(
        "--dataset", default=None, help="or a datasets name, e.g. wikitext (with --dataset-config)"
    )
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="default: --seq-len (no overlap)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens only")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="first 1024 tokens only (a smoke test)")
    args = p.parse_args()
    if args.quick:
        args.max_tokens = 1024
    # bf16 on the GPU; fp32 on the CPU (bf16 matmuls are slow there; fp32 holds bf16 weights exactly).
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.bf16)
    text = {
        "text": Path(args.text) if args.text else None,  # a path, never the text itself
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
    }
    opts = {
        "seq_len": args.seq_len,
        "stride": args.stride,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
    }

    rows = []
    model = AutoModelForCausalLM.from_pretrained(args.bf16, dtype=dtype).to(args.device)
    rows.append(("BF16", evaluate_perplexity(model, tokenizer, **text, **opts)))
    if args.quantized is None:
        gsq_torch.replace_experts(model)  # round-to-nearest 2-bit experts, in place
        label = "RTN 2-bit"
    else:
        del model
        model = AutoModelForCausalLM.from_pretrained(args.quantized, dtype=dtype).to(args.device)
        label = "2-bit checkpoint"
    rows.append((label, evaluate_perplexity(model, tokenizer, **text, **opts)))

    r0 = rows[0][1]
    print(f"{r0.scored_tokens} tokens, windows of {r0.seq_len} every {r0.stride}, on {r0.device}")
    print(f"{'model':18s} {'perplexity':>10s} {'tokens/s':>9s} {'model MiB':>9s} {'peak MiB':>9s}")
    for name, r in rows:
        print(
            f"{name:18s} {r.perplexity:10.3f} {r.tokens_per_second:9.0f} {r.model_bytes / 2**20:9.1f} "
            f"{r.peak_memory_bytes / 2**20:9.0f}"
        )
    print(f"(peak memory: {r0.memory_kind}; on the CPU the process's peak resident size so far)")


if __name__ == "__main__":
    main()
