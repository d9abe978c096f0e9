"""Load a Humming 2-bit checkpoint and generate, eagerly and with torch.compile + a static cache.

    python examples/generate.py --model path/to/humming-checkpoint --prompt "The os module"
    python examples/generate.py                 # makes an RTN checkpoint of the shipped tiny model first

``import gsq_torch`` registers the ``quant_method: "humming"`` quantizer, so ``from_pretrained`` loads
the packed experts straight into GSQFusedMoE modules. With ``--compile``, ``generate`` compiles the
decode step (``cache_implementation="static"``); on a GPU that runs as CUDA graphs.
"""

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

import gsq_torch
from gsq_torch.models import tiny_moe_path


def make_checkpoint(path: str) -> None:
    """Round-to-nearest 2-bit experts of the shipped BF16 model, saved as a Humming checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_path(), dtype=torch.bfloat16)
    gsq_torch.replace_experts(model)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_moe_path()).save_pretrained(path)


def timed_generate(model, inputs, **kwargs):
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(**inputs, do_sample=False, **kwargs)
    sync()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="Humming checkpoint (default: RTN of the shipped tiny model)"
    )
    p.add_argument("--prompt", default="The os module provides")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--compile", action="store_true", help="also generate with torch.compile and a static cache"
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (tests use aot_eager)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="8 new tokens (a smoke test)")
    args = p.parse_args()
    if args.quick:
        args.max_new_tokens = 8

    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory()
        make_checkpoint(tmp.name)
        args.model = tmp.name
    # bf16 on the GPU; fp32 on the CPU, where bf16 matmuls are slow (the 2-bit experts keep bf16 scales).
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    experts = [n for n, m in model.named_modules() if isinstance(m, gsq_torch.GSQFusedMoE)]
    print(f"loaded {args.model}: {len(experts)} layers of 2-bit experts ({type(model).__name__})")
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)

    eager, seconds = timed_generate(model, inputs, max_new_tokens=args.max_new_tokens)
    new = eager.shape[1] - inputs["input_ids"].shape[1]
    print(f"eager: {new / seconds:.1f} tokens/s\n{tokenizer.decode(eager[0])}\n")

    if args.compile:
        config = CompileConfig(backend=args.compile_backend, fullgraph=True)
        if args.compile_backend != "inductor":
            config.mode = None  # a mode is an inductor option
        config._compile_all_devices = (
            True  # transformers compiles on CUDA only unless asked (CPU: for trying it)
        )
        kwargs = {
            "max_new_tokens": args.max_new_tokens,
            "cache_implementation": "static",
            "compile_config": config,
        }
        _, first = timed_generate(model, inputs, **kwargs)  # compiles (and captures CUDA graphs)
        static, seconds = timed_generate(model, inputs, **kwargs)
        print(
            f"compiled + static cache: first call {first:.1f} s (compiling), then {new / seconds:.1f} tok/s; "
            f"same tokens as eager: {torch.equal(static, eager)}"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
