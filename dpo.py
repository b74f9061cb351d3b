"""Stage 5: DPO fine-tuning. The chat model learns to prefer the answers the
ranking chose, with the plain default system prompt: the character is
trained in, not prompted in.

Reads:  data/preferences.jsonl (from rank.py): one pair per line,
          {"id", "query_id", "prompt": [user message], "chosen": [assistant message],
           "rejected": [assistant message], "trait", "score_chosen", "score_rejected",
           "margin", "judge", "traits_sha"}
Writes: out/dpo/  a Hugging Face folder (config.json, model.safetensors,
          tokenizer.json, tokenizer_config.json) that model.py and transformers
          load; metrics.jsonl (every logged step); training.json (settings,
          held-out results, time, peak memory); reference_logprobs.json;
          with --export-gguf also model.gguf (llama.cpp-based tools load it).
        While it runs: out/dpo/checkpoint/ (removed when it finishes).

Direct Preference Optimization (Rafailov et al. 2023). For a prompt x, a
chosen answer y_c and a rejected answer y_r, with log pi(y|x) the summed
log-probability of the answer tokens under the model being trained (the
policy) and log pi_ref(y|x) the same under the frozen starting model:

    h    = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))
    loss = -log sigmoid(beta * h)

beta * (log pi(y|x) - log pi_ref(y|x)) is the answer's implicit reward; the loss
is the Bradley-Terry loss on it, so minimising it fits a reward model and the
policy that is optimal for it (under a KL penalty of strength beta) at once,
without sampling. At step 0 the policy is the reference, h = 0 and the loss
is exactly ln 2 = 0.693.

Options (--loss-type, --label-smoothing, --nll-weight):
- label smoothing eps (conservative DPO: each label is wrong with probability eps):
      loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
- IPO (Azar et al. 2023), a squared loss that does not push h to infinity;
  as in TRL, on the per-token mean log-probabilities:  loss = (h - 1/(2 beta))^2
- an NLL term on the chosen answer (as in RPO): + w * (-log pi(y_c|x) / |y_c|);
  w = 0.1 by default: it keeps the chosen answers likely (RESULTS.md,
  "Recipes tried"); what stopped the loops was rejecting looping answers
  in rank.py (RESULTS.md, "Loops");
- sft: the NLL term alone, i.e. supervised fine-tuning on the chosen answers,
  a possible first stage (`dpo.py --loss-type sft --out out/sft`, then
  `dpo.py --model out/sft`, whose reference is then the SFT model).

Implementation:
- The reference log-probabilities are computed once, before training, with
  the same model, and cached in <out>/reference_logprobs.json (a resume does
  not recompute them). Only one model is ever in memory.
- Only the answer tokens count: the prompt (system, user, the assistant
  header) is masked out, and only answer positions go through the output
  layer (49152 x 576, the largest matrix of the small model).
- Chosen and rejected answers of a micro batch are one padded batch, one
  forward pass. Right padding needs no attention mask with a causal model.
- The top --train-layers blocks train; the rest (and the embedding, tied to
  the output layer) stay frozen and cost only their forward pass.

Logged (per pair, means over the log window): loss (what is minimised);
dpo_loss (its DPO part, ln 2 at step 0) and nll_chosen (-log pi(y_c|x) / |y_c|,
the NLL term before its weight); accuracy (the share of pairs whose chosen
implicit reward beats the rejected one); margin (chosen minus rejected
implicit reward); chosen_reward, rejected_reward; logp_chosen, logp_rejected
(policy, summed over the answer); kl, an estimate of KL(pi || pi_ref) per
answer: the mean of log pi(y|x) - log pi_ref(y|x) over the chosen and
rejected answers. (An exact estimate needs answers sampled from
pi; on the fixed preference answers it is only indicative, and it goes
negative when the policy makes the rejected answers much less likely.)

Run it:
    python dpo.py                                   # the embedded model, data/preferences.jsonl
    python dpo.py --beta 0.2 --nll-weight 0.1 --export-gguf
    python dpo.py --smoke                           # 2 steps, short sequences (CI)
    torchrun --nproc_per_node=2 dpo.py              # two processes (DDP)

What it simplifies: offline DPO on a fixed set of pairs (nothing is sampled
from the model while it trains), every block trained, the embeddings
frozen; the loop itself is train_loop.py's.
Read next: train_loop.py, then sample.py.
"""
import hashlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import model as M
import weights as W
import train_loop as T

PROG = "dpo.py"

# --smoke: the smallest run that still goes through every step (CI, a first try).
SMOKE = dict(max_pairs=6, max_steps=2, batch_size=2, micro_batch=2, max_length=128, train_layers=2, heldout_fraction=0.0)


# ----------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------

def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0, loss_type="sigmoid"):
    """Per-pair DPO loss (see the top of the file) and the implicit rewards
    beta * (log pi - log pi_ref) of the chosen and rejected answers. All inputs
    are (n,) tensors of answer log-probabilities."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ----------------------------------------------------------------------------
# Log-probabilities of the answers, and the reference pass
# ----------------------------------------------------------------------------

def answer_logprobs(model, batch, device):
    """Summed log-probabilities of the chosen and rejected answers of a batch
    of examples, and their token counts: one forward pass over 2n rows."""
    n = len(batch)
    sequences = [e["chosen"][0] for e in batch] + [e["rejected"][0] for e in batch]
    masks = [e["chosen"][1] for e in batch] + [e["rejected"][1] for e in batch]
    ids, score = T.to_device(device, *M.right_pad(sequences, masks, model.tokenizer.pad_id, "cpu"))
    logp, count = M.token_logprobs(model, ids, score)
    return logp[:n], logp[n:], count[:n].float(), count[n:].float()


def data_fingerprint(examples, model_path, max_length):
    """What the reference log-probabilities depend on: the model and the tokens."""
    h = hashlib.sha256()
    path = model_path or W.default_model_path()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    h.update(json.dumps([os.path.abspath(path), max_length] +
                        [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files]).encode())
    for e in examples:
        h.update(json.dumps([e["id"], e["chosen"][0], e["rejected"][0]]).encode())
    return h.hexdigest()


def reference_logprobs(model, examples, d, dtype, batch_size, cache_path, fingerprint):
    """log pi_ref(y_c|x) and log pi_ref(y_r|x) for every example, computed once with
    the starting model, before any update (cached in cache_path). With several
    processes each computes a share and the shares are summed across them."""
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
        if cache.get("fingerprint") == fingerprint:
            for e, c, r in zip(examples, cache["chosen"], cache["rejected"]):
                e["ref_chosen"], e["ref_rejected"] = c, r
            return False
    values = torch.zeros(len(examples), 2, dtype=torch.float64, device=d.device)
    mine = [i for i in range(len(examples)) if i % d.world == d.rank]
    mine.sort(key=lambda i: examples[i]["length"])            # similar lengths together: less padding
    with torch.inference_mode(), T.autocast(d.device, dtype):
        for b in range(0, len(mine), batch_size):
            idx = mine[b:b + batch_size]
            chosen, rejected, _, _ = answer_logprobs(model, [examples[i] for i in idx], d.device)
            values[idx] = torch.stack([chosen, rejected], dim=1).double()
    if d.world > 1:
        torch.distributed.all_reduce(values)
    values = values.tolist()
    for e, (c, r) in zip(examples, values):
        e["ref_chosen"], e["ref_rejected"] = c, r
    if d.main:
        tmp = cache_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"fingerprint": fingerprint, "ids": [e["id"] for e in examples],
                       "chosen": [c for c, _ in values], "rejected": [r for _, r in values]}, f)
        os.replace(tmp, cache_path)
    return True


def make_loss_fn(args, device):
    """The loss the training loop calls: sums over the micro batch, and the
    metrics (sums too; the loop averages them per pair)."""
    def loss_fn(model, batch):
        policy_chosen, policy_rejected, n_chosen, n_rejected = answer_logprobs(model, batch, device)
        ref, = T.to_device(device, torch.tensor([[e["ref_chosen"], e["ref_rejected"]] for e in batch]))
        ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        if args.loss_type == "sft":   # supervised: only the NLL of the chosen answer
            losses = torch.zeros_like(policy_chosen)
        elif args.loss_type == "ipo":   # IPO compares per-token means
            losses, _, _ = dpo_loss(policy_chosen / n_chosen, policy_rejected / n_rejected,
                                    ref_chosen / n_chosen, ref_rejected / n_rejected, args.beta, 0.0, "ipo")
        else:
            losses, _, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                    args.beta, args.label_smoothing, "sigmoid")
        # Reported for every loss type on summed log-probs (IPO's own rewards are per token, sft has none).
        chosen_reward = args.beta * (policy_chosen - ref_chosen).detach()
        rejected_reward = args.beta * (policy_rejected - ref_rejected).detach()
        nll = -policy_chosen / n_chosen
        loss = losses.sum() + (1.0 if args.loss_type == "sft" else args.nll_weight) * nll.sum()
        metrics = {
            "dpo_loss": losses.detach().sum(),
            "accuracy": (chosen_reward > rejected_reward).float().sum(),
            "margin": (chosen_reward - rejected_reward).sum(),
            "chosen_reward": chosen_reward.sum(),
            "rejected_reward": rejected_reward.sum(),
            "logp_chosen": policy_chosen.detach().sum(),
            "logp_rejected": policy_rejected.detach().sum(),
            "nll_chosen": nll.detach().sum(),
            "kl": 0.5 * ((policy_chosen - ref_chosen) + (policy_rejected - ref_rejected)).detach().sum(),
        }
        return loss, metrics
    return loss_fn


# ----------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------

def build_parser():
    p = M.ArgumentParser(prog=PROG, description="Stage 5: DPO fine-tuning on the ranked preference pairs.")
    p.add_argument("--preferences", default="data/preferences.jsonl", help="input: preference pairs from rank.py (default: %(default)s)")
    p.add_argument("--traits", default="traits.txt",
                   help="the traits file the pairs must come from ('' = do not check) (default: %(default)s)")
    p.add_argument("--out", default="out/dpo", help="output folder (Hugging Face format) (default: %(default)s)")
    p.add_argument("--beta", type=M.number(float, above=0), default=0.1, help="strength of the KL penalty: larger stays closer to the start (default: %(default)s)")
    p.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo", "sft"],
                   help="DPO (sigmoid), IPO (squared), or sft: supervised fine-tuning on the chosen answers alone "
                        "(per-token NLL; no reference pass), a first stage before DPO (default: %(default)s)")
    p.add_argument("--label-smoothing", type=M.number(float, at_least=0, below=0.5), default=0.0,
                   help="conservative DPO: assumed probability that a label is wrong (sigmoid loss only) (default: %(default)s)")
    p.add_argument("--nll-weight", type=M.number(float, at_least=0), default=0.1,
                   help="weight of an NLL term on the chosen answers (per token); 0 = off (default: %(default)s)")
    p.add_argument("--heldout-fraction", type=M.number(float, at_least=0, below=1), default=0.1,
                   help="share of messages (never of pairs) held out to measure the loss and accuracy on (default: %(default)s)")
    p.add_argument("--ref-batch", type=M.number(int, at_least=1), default=8, help="pairs per forward pass when computing the reference log-probs (default: %(default)s)")
    p.add_argument("--export-gguf", action="store_true", help="also write <out>/model.gguf for llama.cpp-based tools")
    p.add_argument("--gguf-dtype", default="f32", choices=["f32", "f16"], help="GGUF tensor type (f32 is exact) (default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny sizes for a quick end-to-end run ({', '.join(f'{k}={v}' for k, v in SMOKE.items())})")
    M.add_model_args(p)
    # Every block at lr 6e-5 for 2 epochs, with the NLL term and the drop pairs
    # of rank.py. The top 6 blocks at lr 1e-4 for 4 epochs, without them,
    # reached the pirate at 46% but 64% of its answers looped. On the AMX
    # Xeon's three pipeline seeds: 2e-5 sound but 0.9x its ceiling in one;
    # 6e-5 0.97-1.11x, sound, 85-97% kept under drop; 8e-5 looped in seed 0
    # (RESULTS.md, "A stronger learning rate").
    T.add_train_args(p, lr=6e-5, batch_size=4, micro_batch=2, epochs=2.0, train_layers=0)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:                          # smoke sizes become the defaults; explicit flags still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return args


def run(args):
    d = T.setup_distributed(args.device)
    if args.dtype == "fp16":
        raise T.DataError("fp16 training needs loss scaling; use --dtype bf16 or fp32")
    started = time.time()
    pairs = T.read_preferences(args.preferences, args.max_pairs)
    T.check_traits(pairs, args.traits, args.preferences)
    train_pairs, held_pairs = T.split_by_query(pairs, args.heldout_fraction, args.seed)
    model = M.load_model(args.model, d.device, torch.float32)
    dtype = M.pick_dtype(d.device, args.dtype, "training")        # autocast's; the weights stay fp32
    tok = model.tokenizer
    train_examples, skipped = T.tokenize_pairs(train_pairs, tok, args.max_length)
    held_examples, held_skipped = T.tokenize_pairs(held_pairs, tok, args.max_length)
    if not train_examples:
        raise T.DataError(f"{args.preferences}: no pair fits in --max-length {args.max_length}")
    if d.main:
        print(f"{PROG}: {len(train_examples)} training pairs, {len(held_examples)} held-out pairs "
              f"({len({p['query_id'] for p in held_pairs})} messages)"
              + (f", {skipped + held_skipped} skipped (prompt longer than --max-length)" if skipped + held_skipped else ""),
              file=sys.stderr)

    # 1. Reference log-probabilities, once, with the untouched model.
    os.makedirs(args.out, exist_ok=True)
    everything = train_examples + held_examples
    t0 = time.time()
    data_hash = data_fingerprint(everything, args.model, args.max_length)
    if args.loss_type == "sft":                 # SFT needs no reference model
        computed = None
        for e in everything:
            e["ref_chosen"] = e["ref_rejected"] = 0.0
    else:
        computed = reference_logprobs(model, everything, d, dtype, args.ref_batch,
                                      os.path.join(args.out, "reference_logprobs.json"), data_hash)
    ref_seconds = time.time() - t0
    if d.main and computed is not None:
        print(f"{PROG}: reference log-probabilities {'computed' if computed else 'read from the cache'} "
              f"in {ref_seconds:.0f} s", file=sys.stderr)

    # 2. Train.
    k = T.freeze_for_training(model, args.train_layers, args.train_embeddings)
    total, trainable = T.count_parameters(model)
    if d.main:
        print(f"{PROG}: training the top {k} of {model.cfg.n_layers} blocks: {trainable / 1e6:.1f}M of "
              f"{total / 1e6:.1f}M parameters; {dtype}; {d.world} process(es) on {d.device}", file=sys.stderr)
    fingerprint = {k_: getattr(args, k_) for k_ in (
        "preferences", "max_pairs", "model", "beta", "loss_type", "label_smoothing", "nll_weight", "heldout_fraction", "epochs",
        "max_steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "batch_size", "grad_clip", "train_layers",
        "train_embeddings", "max_length", "seed")}
    fingerprint["data"] = data_hash
    loss_fn = make_loss_fn(args, d.device)
    evaluate = T.heldout_evaluation(loss_fn, held_examples, args.micro_batch) if held_examples else None
    last = T.train(model, train_examples, [e["length"] for e in train_examples], loss_fn,
                   args, d, args.out, dtype, fingerprint, evaluate=evaluate)

    # 3. Save: a Hugging Face folder (and a GGUF file), replacing the work folder.
    if d.main:
        heldout = last.pop("heldout", None)
        summary = {"settings": {k_: v for k_, v in vars(args).items() if k_ != "kill_at_step"},
                   "pairs": {"train": len(train_examples), "heldout": len(held_examples), "skipped": skipped + held_skipped},
                   "trained_blocks": k, "trainable_parameters": trainable, "dtype": str(dtype), "processes": d.world,
                   "last_logged": last, "heldout": heldout, "reference_seconds": round(ref_seconds, 1),
                   "wall_seconds": round(time.time() - started, 1), "peak_rss_gb": round(T.peak_rss_gb(), 2)}

        def write(folder):
            W.save_model(model, folder)
            if args.export_gguf:
                W.save_gguf(model, os.path.join(folder, "model.gguf"), args.gguf_dtype)
            with open(os.path.join(folder, "training.json"), "w") as f:
                json.dump(summary, f, indent=2)
        T.publish(args.out, write, keep=("metrics.jsonl", "reference_logprobs.json"))
        print(f"{PROG}: wrote {args.out}/ in {summary['wall_seconds']:.0f} s (peak memory {summary['peak_rss_gb']} GB); "
              f"last step: loss {last.get('loss', float('nan')):.4f}, accuracy {last.get('accuracy', float('nan')):.2f}, "
              f"margin {last.get('margin', float('nan')):.3f}"
              + (f"; held-out: loss {heldout['loss']:.4f}, accuracy {heldout['accuracy']:.2f}, margin {heldout['margin']:.3f}"
                 if heldout else ""), file=sys.stderr)
    T.cleanup_distributed(d)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (T.DataError, T.NonFiniteLoss, M.ModelError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
