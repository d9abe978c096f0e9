"""LoRA (peft) on the attention and shared experts of a 2-bit MoE model; save, reload, check.

    python examples/finetune_lora.py                          # RTN of the shipped tiny model, 60 steps
    python examples/finetune_lora.py --model path/to/humming-checkpoint --out adapter --max-steps 200

The 2-bit routed experts stay frozen (peft refuses adapters on them with a clear error); gradients flow
through them to the adapters. The adapter is saved with peft and loaded back onto a fresh copy of the
2-bit model, which must give the same logits. ``--merge-to`` merges it into the BF16 layers and
saves a Humming checkpoint.
"""

import argparse
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import gsq_torch
from gsq_torch.evaluation import evaluate_perplexity
from gsq_torch.models import calibration_text, tiny_moe_path
from gsq_torch.training import lora_target_modules


def load(source, quantize: bool, dtype, device):
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    return gsq_torch.replace_experts(model) if quantize else model  # RTN 2-bit experts for a BF16 source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Humming checkpoint (default: RTN of the shipped model)")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--out", default=None, help="adapter directory (default: a temporary one)")
    p.add_argument("--merge-to", default=None, help="also save the merged model here (Humming checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="3 short steps (a smoke test)")
    args = p.parse_args()
    if args.quick:
        args.max_steps, args.batch_size, args.seq_len, args.eval_tokens = 3, 2, 64, 256
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32  # fp32: fast CPU matmuls
    source = args.model or tiny_moe_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = load(source, args.model is None, dtype, args.device)
    before = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens, seq_len=args.seq_len)

    targets = lora_target_modules(model)  # attention (full and linear) and shared-expert projections
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    ids = torch.tensor(tokenizer(calibration_text(), add_special_tokens=False, verbose=False)["input_ids"])
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for step in range(args.max_steps):
        starts = torch.randint(0, len(ids) - args.seq_len, (args.batch_size,), generator=g).tolist()
        x = torch.stack([ids[s : s + args.seq_len] for s in starts]).to(args.device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step:4d}  loss {losses[-1]:.4f}")
    model.eval()
    after = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens, seq_len=args.seq_len)
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    print(f"train loss, mean of the first / last 5 steps: {first:.4f} -> {last:.4f}")
    ppl = f"{before.perplexity:.3f} -> {after.perplexity:.3f}"
    print(f"held-out perplexity ({before.scored_tokens} tokens): {ppl}")

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = args.out or tmp.name
    model.save_pretrained(out)  # the adapter only: the 2-bit base is unchanged
    fresh = PeftModel.from_pretrained(load(source, args.model is None, dtype, args.device), out).eval()
    with torch.no_grad():
        same = torch.allclose(model(input_ids=x).logits, fresh(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    print(f"adapter saved to {out}; reloaded onto a fresh 2-bit model: same logits: {same}")
    if args.merge_to:
        merged = model.merge_and_unload()  # LoRA folded into the BF16 layers; experts stay 2-bit
        merged.save_pretrained(args.merge_to)
        tokenizer.save_pretrained(args.merge_to)
        print(f"merged model saved to {args.merge_to}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
