"""Quantize the routed experts of a MoE model to 2 bits (GSQ, GPTQ or RTN) and save a Humming checkpoint.

    python examples/quantize.py --out tiny-moe-2bit                 # GSQ on the shipped tiny model
    python examples/quantize.py --out tiny-moe-2bit --method rtn --quick

By default it quantizes the model shipped with gsq-torch (``gsq_torch.models``) on its calibration
text, on the GPU if there is one, and prints the held-out perplexity before and after.
"""

import argparse
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gsq_torch.evaluation import evaluate_perplexity
from gsq_torch.models import calibration_text, tiny_moe_path
from gsq_torch.quantizers.gsq import GSQConfig
from gsq_torch.quantizers.pipeline import quantize_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(tiny_moe_path()), help="BF16 MoE model (directory or hub name)")
    p.add_argument("--out", required=True, help="where to write the Humming checkpoint")
    p.add_argument("--method", choices=["gsq", "gptq", "rtn"], default="gsq")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--epochs", type=int, default=10, help="GSQ epochs per layer")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the perplexity check")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument(
        "--quick", action="store_true", help="a few samples, 1 epoch, short evaluation (a smoke test)"
    )
    args = p.parse_args()
    if args.quick:
        args.samples, args.seq_len, args.epochs, args.eval_tokens = 8, 256, 1, 512
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # fp32 on the CPU (bf16 matmuls are slow there); bf16 on the GPU.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    before = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens, seq_len=args.seq_len)

    # The shipped calibration text: documents separated by <|endoftext|> lines.
    docs = [d.strip() for d in calibration_text().split("<|endoftext|>") if d.strip()]
    logs = quantize_model(
        model,
        docs,
        args.method,
        tokenizer=tokenizer,
        num_samples=args.samples,
        val_samples=max(2, args.samples // 8),
        seq_len=args.seq_len,
        gsq=GSQConfig(epochs=args.epochs, batch_tokens=2048),
        device=args.device,
        out_dir=args.out,
        progress=False,
    )
    for entry in logs:
        print(
            f"layer {entry['layer']}: held-out expert MSE "
            + ", ".join(f"{m} {entry[m]:.3g}" for m in ("rtn", "gptq", "gsq", "final") if m in entry)
        )

    after = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens, seq_len=args.seq_len)
    print(
        f"perplexity on {before.scored_tokens} held-out tokens: BF16 {before.perplexity:.2f} -> "
        f"2-bit {args.method.upper()} {after.perplexity:.2f}"
    )
    print(f"saved to {args.out} (load it with AutoModelForCausalLM.from_pretrained after `import gsq_torch`)")


if __name__ == "__main__":
    main()
