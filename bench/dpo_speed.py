"""Benchmark: DPO training speed, against TRL's DPOTrainer, and model FLOP
utilisation (MFU) against this machine's measured matmul peak.

    python bench/dpo_speed.py                           # the embedded model, 4 steps of 4 pairs
    python bench/dpo_speed.py --steps 6 --no-trl

Each configuration runs in its own process (so each has its own peak memory),
one after the other, on the same model (the embedded SmolLM2-135M-Instruct;
TRL loads it from a Hugging Face folder saved once), the same preference
pairs, the same global batch (--batch pairs, micro batches of --micro), the
same maximum length, beta and learning rate, fp32 (or bf16 autocast where
the hardware has fast bf16, on both sides):

  ours, full       dpo.py's loop with every parameter trained (TRL's default)
  ours, default    dpo.py's defaults: every block trains, the (tied) embedding
                   stays frozen (until 2026-12-03 the default was the top 6 blocks)
  TRL              DPOTrainer, full fine-tuning, its reference model computing
                   the reference log-probabilities at every step (its default)
  TRL, precomputed DPOTrainer with precompute_ref_log_probs=True (--trl-precompute)

Throughput is real tokens (prompt + answer of both answers, no padding) per
second over the training steps after the first (the first pays one-time
costs). Ours computes the reference log-probabilities once before training:
"with reference pass" spreads that one pass over one epoch of the pairs, and
over two (the stages' default); that is the figure to compare with TRL's
default, which pays for a reference forward at every step. The "vs TRL"
column gives the train-step ratio and, in brackets, those two.

MFU = (model FLOPs per second) / (peak matmul FLOP/s). The peak is measured
in this run by large square matmuls in fp32 and bf16, several times (before
each configuration); the highest is used, so contention from other processes
lowers MFU rather than flattering it. Model FLOPs per token of a training
step (the convention of "6 x parameters"): forward 2 x (matrix parameters of
the blocks) + attention 4 x (query width) x (mean causal context) per layer,
plus the output layer, 2 x vocabulary x width, on the answer tokens, which
are the only ones DPO needs; backward twice the forward of the parts that
train (and the output layer's input gradient). The same count is used for
TRL, which also computes the output layer on prompt tokens: that is work the
task does not need, so it is not credited.

Threads. Every configuration runs with OMP_WAIT_POLICY=PASSIVE unless
--omp-wait-policy says otherwise. By default OpenMP threads spin while they
wait for work; when other processes share the cores, a spinning thread holds
a core that the thread it waits for needs, and small operations (elementwise
ones, most of a backward pass) then take a scheduler time slice each: on this
2-core machine shared with another job, a training step was 2.5x slower.
Passive waiting costs little on an idle machine.

Peak memory is each process's maximum resident set (RSS), model loading
included. `trl` is an optional extra (pip install trl); without it only our
rows are printed. Figures taken while other processes share the CPU are
depressed; the ratios within one run are what count.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import dpo  # noqa: E402
import fast  # noqa: E402
import model as M  # noqa: E402
import weights as W  # noqa: E402
import train_loop as T  # noqa: E402

SAMPLE = os.path.join(ROOT, "tests", "data", "preferences_sample.jsonl")


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------

def matmul_peak(dtype, n, seconds=1.0):
    """FLOP/s of repeated n x n matmuls (2 n^3 FLOPs each), best of the runs."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b                                                   # warm-up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def flops_per_token(cfg, examples, trained_blocks, train_embeddings):
    """Model FLOPs of one training step per real token, averaged over the data
    (see the top of the file). trained_blocks: the top blocks that train."""
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    block = 2 * (cfg.dim * q + 2 * cfg.dim * kv + q * cfg.dim + 3 * cfg.dim * cfg.hidden_dim)   # forward, per token
    head = 2 * cfg.vocab_size * cfg.dim                                                          # forward, per answer token
    total = tokens = 0
    for e in examples:
        for ids, mask in (e["chosen"], e["rejected"]):
            n, answer = len(ids), sum(mask)
            attention = 2 * 2 * q * (n + 1) / 2                  # QK^T and AV over the mean causal context
            forward = n * cfg.n_layers * (block + attention) + answer * head
            backward = 2 * n * trained_blocks * (block + attention) + answer * head * (2 if train_embeddings else 1)
            total += forward + backward
            tokens += n
    return total / tokens


def peak_rss_gb():
    return T.peak_rss_gb()


# ----------------------------------------------------------------------------
# Workers: each configuration in its own process
# ----------------------------------------------------------------------------

def load_pairs(path, n):
    pairs = T.read_preferences(path)
    return (pairs * (n // len(pairs) + 1))[:n]          # repeat a small file up to n pairs


def step_times(metrics_path):
    """Per-step (seconds, tokens/s) from a metrics.jsonl."""
    out, previous = [], 0.0
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "heldout" in r:
                continue
            out.append((r["elapsed_s"] - previous, r["tokens_per_s"]))
            previous = r["elapsed_s"]
    return out


def worker_ours(cfg):
    full = cfg["mode"] == "full"
    model = M.load_model(cfg["model"], "cpu", torch.float32)
    dtype = M.pick_dtype("cpu", cfg["dtype"], "training", quiet=True)
    pairs = load_pairs(cfg["preferences"], cfg["pairs"])
    examples, _ = T.tokenize_pairs(pairs, model.tokenizer, cfg["max_length"])
    flags = ["--batch-size", str(cfg["batch"]), "--micro-batch", str(cfg["micro"]), "--max-steps", str(cfg["steps"]),
             "--lr", str(cfg["lr"]), "--beta", str(cfg["beta"]), "--max-length", str(cfg["max_length"]),
             "--save-every", "100000", "--warmup", "0"]
    if full:
        flags += ["--train-layers", "0", "--train-embeddings"]
    args = dpo.parse_args(flags)
    d = T.Dist()
    out = tempfile.mkdtemp()
    t0 = time.perf_counter()
    dpo.reference_logprobs(model, examples, d, dtype, args.ref_batch, os.path.join(out, "ref.json"), "bench")
    ref_seconds = time.perf_counter() - t0
    k = T.freeze_for_training(model, args.train_layers, args.train_embeddings)
    T.train(model, examples, [e["length"] for e in examples], dpo.make_loss_fn(args, d.device), args, d, out, dtype, {})
    times = step_times(os.path.join(out, "metrics.jsonl"))[1:]
    tokens = sum(s * tps for s, tps in times)
    seconds = sum(s for s, _ in times)
    epoch_tokens = sum(e["length"] for e in examples)
    return {"tokens_per_s": tokens / seconds, "epoch_tokens": epoch_tokens,
            "ref_seconds": ref_seconds, "step_seconds": seconds / len(times),
            "flops_per_token": flops_per_token(model.cfg, examples, k, args.train_embeddings),
            "peak_rss_gb": peak_rss_gb()}


def worker_trl(cfg):
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer
    dtype = M.pick_dtype("cpu", cfg["dtype"], "training", quiet=True)
    pairs = load_pairs(cfg["preferences"], cfg["pairs"])
    data = datasets.Dataset.from_list([{"prompt": T.without_system(p["prompt"]), "chosen": p["chosen"],
                                        "rejected": p["rejected"]} for p in pairs])
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg["hf_folder"], dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg["hf_folder"])
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["micro"],
                       gradient_accumulation_steps=cfg["batch"] // cfg["micro"], max_steps=cfg["steps"],
                       learning_rate=cfg["lr"], beta=cfg["beta"], max_length=cfg["max_length"], lr_scheduler_type="constant",
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=dtype == torch.bfloat16,
                       dataloader_num_workers=0, seed=0, disable_tqdm=True,
                       precompute_ref_log_probs=cfg["mode"] == "precompute")
    times, tokens = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            tokens.append(0)
            times.append(-time.perf_counter())

        def on_step_end(self, *a, **k):
            times[-1] += time.perf_counter()

    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
    original = trainer.training_step

    def counted(model, inputs, *a, **k):                    # real (unpadded) tokens of each micro batch
        tokens[-1] += int(inputs["attention_mask"].sum())
        return original(model, inputs, *a, **k)
    trainer.training_step = counted
    trainer.train()
    seconds, n_tokens = sum(times[1:]), sum(tokens[1:])
    return {"tokens_per_s": n_tokens / seconds, "step_seconds": seconds / len(times[1:]), "peak_rss_gb": peak_rss_gb()}


def worker(kind, cfg):
    peaks = {"fp32": matmul_peak(torch.float32, cfg["peak_n"]), "bf16": matmul_peak(torch.bfloat16, cfg["peak_n_bf16"])}
    result = worker_ours(cfg) if kind == "ours" else worker_trl(cfg)
    result["peaks"] = peaks
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------

def with_reference(result, epochs):
    """Tokens/s of `epochs` passes over the pairs, the one reference pass included."""
    tokens = epochs * result["epoch_tokens"]
    return tokens / (result["ref_seconds"] + tokens / result["tokens_per_s"])


def run_worker(kind, cfg, env):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], json.loads(sys.argv[3]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preferences", default=None,
                   help="pairs to train on (default: data/preferences.jsonl if it exists, else the hand-made sample)")
    p.add_argument("--pairs", type=int, default=16, help="pairs used (a small file is repeated)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (the first is not timed)")
    p.add_argument("--batch", type=int, default=4, help="global batch in pairs")
    p.add_argument("--micro", type=int, default=2, help="pairs per forward pass")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="as in the stages: auto = bf16 where fast")
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size for the fp32 peak")
    p.add_argument("--peak-n-bf16", type=int, default=1024, help="matrix size for the bf16 peak")
    p.add_argument("--no-trl", action="store_true", help="skip TRL even if installed")
    p.add_argument("--trl-precompute", action="store_true", help="also run TRL with precompute_ref_log_probs=True")
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "unset"],
                   help="OMP_WAIT_POLICY for every configuration (see the top of the file)")
    p.add_argument("--model", default=None, help="a .gguf file or a Hugging Face folder (default: the embedded model)")
    args = p.parse_args()
    env = dict(os.environ)
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    preferences = args.preferences or ("data/preferences.jsonl" if os.path.exists("data/preferences.jsonl") else SAMPLE)
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    cfg = {"model": args.model, "preferences": preferences, "pairs": args.pairs, "steps": args.steps, "batch": args.batch,
           "micro": args.micro, "max_length": args.max_length, "lr": args.lr, "beta": args.beta, "dtype": args.dtype,
           "peak_n": args.peak_n, "peak_n_bf16": args.peak_n_bf16}
    dtype = M.pick_dtype("cpu", args.dtype, "training")
    print(f"CPU: {fast.cpu_kind()}", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, trl {trl_version or '(not installed)'}, "
          f"compute dtype {dtype}; {args.pairs} pairs from {preferences}, {args.steps} steps of {args.batch} pairs "
          f"(micro batches of {args.micro}), max length {args.max_length}, OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY', 'unset')}",
          file=sys.stderr)
    runs = [("ours, full", "ours", "full"), ("ours, default (blocks, not embedding)", "ours", "default")]
    if trl_version and not args.no_trl:
        tmp = tempfile.mkdtemp()
        W.save_model(M.load_model(args.model, "cpu"), os.path.join(tmp, "hf"))
        cfg["hf_folder"] = os.path.join(tmp, "hf")
        runs.append(("TRL DPOTrainer, full", "trl", "default"))
        if args.trl_precompute:
            runs.append(("TRL DPOTrainer, full, precomputed ref", "trl", "precompute"))
    results = {}
    for name, kind, mode in runs:
        print(f"running {name} ...", file=sys.stderr)
        results[name] = run_worker(kind, {**cfg, "mode": mode}, env)
        print(f"  {results[name]}", file=sys.stderr)
    ok = {k: v for k, v in results.items() if "error" not in v}
    peak = {dt: max(r["peaks"][dt] for r in ok.values()) for dt in ("fp32", "bf16")} if ok else {}
    flops = {name: r.get("flops_per_token", ok.get("ours, full", {}).get("flops_per_token")) for name, r in ok.items()}
    trl_speed = ok.get("TRL DPOTrainer, full", {}).get("tokens_per_s")
    used = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"\nmeasured matmul peak (best of all measurements in this run): fp32 {peak.get('fp32', 0) / 1e9:.1f} GFLOP/s, "
          f"bf16 {peak.get('bf16', 0) / 1e9:.1f} GFLOP/s; training runs in {used}, so MFU is against the {used} peak"
          + ("" if used == "bf16" or peak.get("bf16", 0) < peak.get("fp32", 0) else
             f" (bf16 would be {peak['bf16'] / peak['fp32']:.1f}x faster: try --dtype bf16)") + "\n")
    print(f"CPU: {fast.cpu_kind()}\n")
    print("| configuration | tokens/s (train steps) | tokens/s with reference pass (1 / 2 epochs) | vs TRL | step (s) "
          f"| model GFLOP/token | MFU ({used}) | peak RSS (GB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        fpt = flops[name]
        speed = r["tokens_per_s"]
        with_ref = [with_reference(r, epochs) for epochs in (1, 2)] if "ref_seconds" in r else None
        ratio = "-"
        if trl_speed:
            ratio = f"{speed / trl_speed:.2f}x" + (" ({:.2f}x / {:.2f}x)".format(*(w / trl_speed for w in with_ref))
                                                   if with_ref else "")
        print(f"| {name} | {speed:.1f} | {'{:.1f} / {:.1f}'.format(*with_ref) if with_ref else '-'} | {ratio} "
              f"| {r['step_seconds']:.1f} | {fpt / 1e9:.3f} | {100 * speed * fpt / peak[used]:.0f}% | {r['peak_rss_gb']:.2f} |")
    if not trl_version:
        print("\nTRL is not installed (pip install trl): only our figures are shown.")


if __name__ == "__main__":
    main()
