"""Fine-tune the group scales of a 2-bit model's experts (frozen codes; PV-Tuning / EfficientQAT style).

    python examples/finetune_scales.py                       # RTN of the shipped tiny model, 60 steps
    python examples/finetune_scales.py --model path/to/humming-checkpoint --max-steps 200 --out tuned

Only the scales train (fp32 master copies; see gsq_torch.training), on next-token loss over the shipped
calibration text; the held-out perplexity is measured before and after. ``--out`` saves a Humming
checkpoint (bf16 scales, plain layout).
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import gsq_torch
from gsq_torch.evaluation import evaluate_perplexity
from gsq_torch.models import calibration_text, tiny_moe_path
from gsq_torch.training import scale_parameters, set_trainable_scales


def token_batches(tokenizer, seq_len: int, batch_size: int, seed: int = 0):
    """Endless random batches ``[batch_size, seq_len]`` of the calibration text's tokens."""
    ids = torch.tensor(tokenizer(calibration_text(), add_special_tokens=False, verbose=False)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=g)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="Humming checkpoint (default: RTN of the shipped tiny model)"
    )
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--out", default=None, help="save the tuned model here (Humming checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--quick", action="store_true", help="3 steps, short batches and evaluation (a smoke test)"
    )
    args = p.parse_args()
    if args.quick:
        args.max_steps, args.batch_size, args.seq_len, args.eval_tokens = 3, 2, 64, 256
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32  # fp32: fast CPU matmuls
    source = args.model or tiny_moe_path()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if args.model is None:
        gsq_torch.replace_experts(model)  # round-to-nearest 2-bit experts

    model.requires_grad_(False)  # everything BF16 stays as it is...
    names = set_trainable_scales(model)  # ...and only the experts' scales train (after requires_grad_)
    params = scale_parameters(model)
    print(f"training {len(names)} scale tensors, {sum(p.numel() for p in params)} scales")
    before = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens, seq_len=args.seq_len)

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.max_steps, eta_min=args.lr / 10)
    model.train()
    batches = token_batches(tokenizer, args.seq_len, args.batch_size)
    losses = []
    for step in range(args.max_steps):
        x = next(batches).to(args.device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step:4d}  loss {losses[-1]:.4f}")
    model.eval()

    after = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens, seq_len=args.seq_len)
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    print(f"train loss, mean of the first / last 5 steps: {first:.4f} -> {last:.4f}")
    ppl = f"{before.perplexity:.3f} -> {after.perplexity:.3f}"
    print(f"held-out perplexity ({before.scored_tokens} tokens): {ppl}")
    if args.out:
        model.save_pretrained(args.out)  # scales written as bf16, per expert, as in the published layout
        tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
