"""Benchmark: batched generation, new tokens per second, against `transformers`
and against model.py's plain path (fast.py's shortcuts off).

    python bench/generate_speed.py                      # batch 1, 16, 64; fp32 and bf16
    python bench/generate_speed.py --batch 16 --dtype fp32
    python bench/generate_speed.py --device cuda        # on a GPU

Both sides run in this process on the same weights (the embedded model, saved
once as a Hugging Face folder that `transformers` loads), the same prompts,
the same sampling (temperature 0.7, no top-p) and exactly --new-tokens new
tokens per sequence (end of turn is ignored, so both do the same work).
Prints a markdown table with the ratio ours / transformers in each setting,
and our speed with `fast.ENABLED = False` (--no-plain skips it).
`transformers` is optional: without it only our figures are printed.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fast  # noqa: E402
import model as M  # noqa: E402
import weights as W  # noqa: E402

PROMPTS = [
    "Tell me a story about a dragon who learns to cook.",
    "What is the capital of France?",
    "Explain, step by step, how a bill becomes a law in the United States, and what can stop it.",
    "Write a short poem about the sea.",
    "Why is the sky blue?",
    "Give me three tips for learning a new language quickly and say which one matters most.",
    "What do you think about cats?",
    "How do I make a cup of tea?",
]


def prompts_for(tokenizer, batch):
    return [tokenizer.prompt(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]


def synchronize(device):
    """A GPU runs ahead of Python: wait for it before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(model, prompts, new_tokens, repeats, device):
    best = float("inf")
    for r in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = M.generate(model, prompts, max_new_tokens=new_tokens, temperature=0.7, seed=r, stop_ids=[])
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        assert all(len(o) == new_tokens for o in out)
    return len(prompts) * new_tokens / best


def time_transformers(hf_model, prompts, pad_id, new_tokens, repeats, device):
    ids, real, _ = M.left_pad(prompts, pad_id, device)
    best = float("inf")
    for r in range(repeats):
        torch.manual_seed(r)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=real.long(), do_sample=True, temperature=0.7,
                                    top_p=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    pad_token_id=pad_id)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        assert out.shape[1] - ids.shape[1] == new_tokens
    return len(prompts) * new_tokens / best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["auto", "fp32", "bf16"],
                   help="auto: what the stages' --dtype auto picks on this CPU (measured)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    p.add_argument("--model", default=None)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-plain", action="store_true", help="do not time the plain path (fast.py off)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    args = p.parse_args()
    device = M.pick_device(args.device)
    try:
        import transformers
    except ImportError:
        transformers = None
    if args.no_transformers:
        transformers = None
    auto = "bf16" if M.pick_dtype(device, "auto", quiet=True) == torch.bfloat16 else "fp32"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__ if transformers else '(not installed)'}, --dtype auto: {auto}"
          + (f" (bf16 decoding measured {fast.cpu_bf16_speedup('decoding'):.2f}x fp32)" if device.type == "cpu" else ""),
          file=sys.stderr)
    machine = fast.cpu_kind() if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} (CPU: {fast.cpu_kind()})"
    print(f"device: {machine}", file=sys.stderr)
    base = M.load_model(args.model, "cpu")
    tmp = tempfile.mkdtemp()
    if transformers:
        W.save_model(base, os.path.join(tmp, "hf"))
    rows = []
    for dtype_name in args.dtype:
        dtype = M.pick_dtype(device, dtype_name, quiet=True)
        dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
        ours = M.load_model(args.model, device, dtype)
        hf = None
        if transformers:
            hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype).eval().to(device)
        for batch in args.batch:
            prompts = prompts_for(ours.tokenizer, batch)
            M.generate(ours, prompts[:2], max_new_tokens=4, stop_ids=[])          # warm-up
            a = time_ours(ours, prompts, args.new_tokens, args.repeats, device)
            plain = None
            if not args.no_plain:
                fast.ENABLED = False
                try:
                    plain = time_ours(ours, prompts, args.new_tokens, args.repeats, device)
                finally:
                    fast.ENABLED = True
            b = time_transformers(hf, prompts, ours.tokenizer.pad_id, args.new_tokens, args.repeats, device) if hf else None
            rows.append((batch, dtype_name, a, plain, b))
            print(f"batch {batch:3d} {dtype_name}: ours {a:7.1f} tok/s" + (f", plain path {plain:7.1f} tok/s" if plain else "")
                  + (f", transformers {b:7.1f} tok/s, ratio {a / b:.2f}x" if b else ""), file=sys.stderr)
    print(f"\n{'CPU' if device.type == 'cpu' else 'device'}: {machine}\n\n"
          "| batch | dtype | ours (tok/s) | plain path (tok/s) | transformers (tok/s) | ours / transformers |\n|---:|---|---:|---:|---:|---:|")
    for batch, dtype_name, a, plain, b in rows:
        print(f"| {batch} | {dtype_name} | {a:.1f} | {f'{plain:.1f}' if plain else '-'} | {f'{b:.1f}' if b else '-'} | {f'{a / b:.2f}x' if b else '-'} |")


if __name__ == "__main__":
    main()
