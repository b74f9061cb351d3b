"""Stage 4: a reward model trained on the ranked preference pairs.

Reads:  data/preferences.jsonl (from rank.py), format in train_loop.read_preferences.
Writes: out/reward_model/  config.json (architectures LlamaForSequenceClassification,
          num_labels 1), model.safetensors (the network as "model.*" and the head
          as "score.weight", the layout transformers' sequence classifiers use),
          tokenizer files, metrics.jsonl, eval.json (held-out accuracy and
          margin), training.json.
        While it runs: out/reward_model/checkpoint/ (removed when it finishes).

The reward model is the chat model's network with a scalar head: r(x, y) is
a linear function of the last layer's hidden state at the last token of the
answer (its end-of-turn token, which has attended to the whole prompt and
answer):

    r(x, y) = w . h_last(x, y)          w: (width,), initialised to 0

It is trained with the Bradley-Terry model of preferences,
P(y_c preferred to y_r | x) = sigmoid(r(x, y_c) - r(x, y_r)) for a chosen
answer y_c and a rejected one y_r, by minimising

    loss = -log sigmoid(r(x, y_c) - r(x, y_r) - m)

where m = 0, or with --margin-weight a > 0, m = a * (the judge's score
difference): pairs the judge found clear must be separated by more (the
margin loss of Llama 2). Only differences of rewards matter, so the head
needs no bias, and its zero start gives the loss ln 2 at step 0.

The split into training and held-out pairs is by message (query_id), never
by pair: pairs of one message share the prompt and often an answer, so a
split by pair would test on near-copies of training pairs. Reported: the
held-out accuracy (share of pairs with r(chosen) > r(rejected)) and the mean
margin r(chosen) - r(rejected).

The prompt gets the plain default system prompt (any system message in the
file is dropped), as in dpo.py. The top --train-layers blocks and the head
train; the rest of the network stays frozen (see train_loop.py).

Later stages import it:
    from reward_model import load_reward_model, score
    rm = load_reward_model("out/reward_model")
    score(rm, [[{"role": "user", "content": "Hi"}]], ["Hello! How can I help?"])  # -> [0.42]

transformers loads the folder too (AutoModelForSequenceClassification); its
config's pad_token_id is <|endoftext|> so that transformers pools the same
token, given the conversation rendered up to the answer's <|im_end|>.

Run it:
    python reward_model.py                      # the embedded model, data/preferences.jsonl
    python reward_model.py --margin-weight 1.0
    python reward_model.py --smoke              # 2 steps, short sequences (CI)
    torchrun --nproc_per_node=2 reward_model.py

What it simplifies: a linear head on the last token, trained on the very
pairs DPO learns; it never trains the chat model (there is no PPO here), it
is the training's own view in sample.py's report.
Read next: dpo.py.
"""
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
import weights as W
import train_loop as T

PROG = "reward_model.py"

SMOKE = dict(max_pairs=6, max_steps=2, batch_size=2, micro_batch=2, max_length=128, train_layers=2)


# ----------------------------------------------------------------------------
# The model: network + scalar head
# ----------------------------------------------------------------------------

def add_score_head(model):
    """Give the chat model its scalar head (zero: every reward starts at 0)."""
    p = model.embed_tokens.weight
    model.score_head = nn.Linear(model.cfg.dim, 1, bias=False, device=p.device, dtype=p.dtype)
    nn.init.zeros_(model.score_head.weight)
    return model


def rewards(model, ids, answer_mask):
    """r(x, y) for each row: the head on the hidden state of the row's last
    answer token. Right padding comes after it, so it needs no attention mask."""
    hidden = model(ids)
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(answer_mask, positions, -1).amax(dim=1)         # index of the last answer token
    h = hidden[torch.arange(ids.shape[0], device=ids.device), last]
    return model.score_head(h).squeeze(-1).float()


def pair_rewards(model, batch, device):
    """Rewards of the chosen and rejected answers of a batch: one forward pass."""
    n = len(batch)
    sequences = [e["chosen"][0] for e in batch] + [e["rejected"][0] for e in batch]
    masks = [e["chosen"][1] for e in batch] + [e["rejected"][1] for e in batch]
    ids, mask = T.to_device(device, *M.right_pad(sequences, masks, model.tokenizer.pad_id, "cpu"))
    r = rewards(model, ids, mask)
    return r[:n], r[n:]


# ----------------------------------------------------------------------------
# Data and loss
# ----------------------------------------------------------------------------

def bradley_terry_loss(r_chosen, r_rejected, margin=None):
    """-log sigmoid(r_w - r_l - m), per pair."""
    diff = r_chosen - r_rejected
    return -F.logsigmoid(diff if margin is None else diff - margin)


def make_loss_fn(args, device):
    def loss_fn(model, batch):
        r_chosen, r_rejected = pair_rewards(model, batch, device)
        margin = None
        if args.margin_weight:
            margin = args.margin_weight * T.to_device(device, torch.tensor([e["judge_margin"] for e in batch]))[0]
        losses = bradley_terry_loss(r_chosen, r_rejected, margin)
        diff = (r_chosen - r_rejected).detach()
        return losses.sum(), {"accuracy": (diff > 0).float().sum(), "margin": diff.sum(),
                              "reward_chosen": r_chosen.detach().sum(), "reward_rejected": r_rejected.detach().sum()}
    return loss_fn


# ----------------------------------------------------------------------------
# Saving, loading, scoring (what later stages import)
# ----------------------------------------------------------------------------

def save_reward_model(model, folder, max_length):
    """A Hugging Face folder in the layout of transformers' sequence classifiers."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("score_head.")}
    state["score.weight"] = model.score_head.weight
    end_of_text = model.tokenizer.tok.token_to_id("<|endoftext|>")
    arch = "Qwen2ForSequenceClassification" if model.cfg.arch == "qwen2" else "LlamaForSequenceClassification"
    extra = {"architectures": [arch], "num_labels": 1, "id2label": {"0": "reward"}, "label2id": {"reward": 0},
             "reward_model": {"pooling": "hidden state of the answer's last token (its end-of-turn token)",
                              "max_length": max_length}}
    if end_of_text is not None:
        extra["pad_token_id"] = end_of_text
    W.save_model(model, folder, extra_config=extra, state_dict=state)


def load_reward_model(folder="out/reward_model", device="auto", dtype=torch.float32):
    """The reward model that reward_model.py saved: a ChatModel with .score_head."""
    cfg, state, tok, template = W.read_hf_folder(folder)
    head = state.pop("score.weight", None)
    if head is None:
        raise M.ModelError(f"{folder}: not a reward model (no score.weight); run reward_model.py")
    model = add_score_head(M.build_model(cfg, state, tok, template))
    with torch.no_grad():
        model.score_head.weight.copy_(head.reshape(1, -1))
    with open(os.path.join(folder, "config.json")) as f:
        model.max_length = json.load(f).get("reward_model", {}).get("max_length", 384)
    return model.to(device=M.pick_device(device), dtype=dtype).eval()


@torch.inference_mode()
def score(reward_model, prompts, answers, batch_size=8):
    """r(x, y) for each (prompt, answer): prompts are message lists (the user
    turn; a system message is dropped, as in training), answers are strings or
    [{"role": "assistant", "content": ...}]. Returns a list of floats."""
    tok = reward_model.tokenizer
    device = reward_model.embed_tokens.weight.device
    max_length = getattr(reward_model, "max_length", 384)
    items = []
    for prompt, answer in zip(prompts, answers):
        answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
        ids_mask = T.tokenize_answer(tok, T.without_system(prompt), answer, max_length)
        if ids_mask is None:                        # prompt too long: keep its end
            ids, mask = tok.chat(T.without_system(prompt) + answer)
            last = max(i for i, m in enumerate(mask) if m)
            ids_mask = (ids[:last + 1][-max_length:], mask[:last + 1][-max_length:])
        items.append(ids_mask)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out = [0.0] * len(items)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask = M.right_pad([items[i][0] for i in idx], [items[i][1] for i in idx], tok.pad_id, device)
        for i, r in zip(idx, rewards(reward_model, ids, mask).tolist()):
            out[i] = r
    return out


# ----------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------

def build_parser():
    p = M.ArgumentParser(prog=PROG, description="Stage 4: a Bradley-Terry reward model on the preference pairs.")
    p.add_argument("--preferences", default="data/preferences.jsonl", help="input: preference pairs from rank.py (default: %(default)s)")
    p.add_argument("--traits", default="traits.txt", help="the traits file the pairs must come from ('' = do not check) (default: %(default)s)")
    p.add_argument("--out", default="out/reward_model", help="output folder (default: %(default)s)")
    p.add_argument("--heldout-fraction", type=M.number(float, above=0, below=1), default=0.2, help="share of messages (never of pairs) held out (default: %(default)s)")
    p.add_argument("--margin-weight", type=M.number(float, at_least=0), default=0.0,
                   help="require r_w - r_l > weight * the judge's margin (0 = plain Bradley-Terry) (default: %(default)s)")
    p.add_argument("--head-lr-scale", type=M.number(float, above=0), default=100.0,
                   help="the head's learning rate / --lr (it starts from zero, the network does not) (default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny sizes for a quick end-to-end run ({', '.join(f'{k}={v}' for k, v in SMOKE.items())})")
    M.add_model_args(p)
    T.add_train_args(p, lr=1e-5, batch_size=4, micro_batch=2, epochs=3.0, train_layers=6)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
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
    if not held_pairs:
        raise T.DataError(f"{args.preferences}: pairs of only one message; need at least two messages for a held-out split")
    model = M.load_model(args.model, d.device, torch.float32)
    dtype = M.pick_dtype(d.device, args.dtype, "training")        # autocast's; the weights stay fp32
    tok = model.tokenizer
    train_examples, skipped = T.tokenize_pairs(train_pairs, tok, args.max_length)
    held_examples, held_skipped = T.tokenize_pairs(held_pairs, tok, args.max_length)
    if not train_examples or not held_examples:
        raise T.DataError(f"{args.preferences}: too few pairs fit in --max-length {args.max_length}")
    k = T.freeze_for_training(model, args.train_layers, args.train_embeddings)
    add_score_head(model)
    torch.manual_seed(args.seed)
    total, trainable = T.count_parameters(model)
    if d.main:
        print(f"{PROG}: {len(train_examples)} training pairs, {len(held_examples)} held-out pairs "
              f"({len({p['query_id'] for p in held_pairs})} messages); training the top {k} of {model.cfg.n_layers} "
              f"blocks and the head: {trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters; {dtype}; "
              f"{d.world} process(es) on {d.device}", file=sys.stderr)
    fingerprint = {k_: getattr(args, k_) for k_ in (
        "preferences", "max_pairs", "model", "heldout_fraction", "margin_weight", "head_lr_scale", "epochs", "max_steps", "lr",
        "warmup", "min_lr_ratio", "weight_decay", "batch_size", "grad_clip", "train_layers", "train_embeddings",
        "max_length", "seed")}
    fingerprint["pairs"] = [e["id"] for e in train_examples]
    loss_fn = make_loss_fn(args, d.device)
    last = T.train(model, train_examples, [e["length"] for e in train_examples], loss_fn,
                   args, d, args.out, dtype, fingerprint, lr_scales={"score_head": args.head_lr_scale},
                   evaluate=T.heldout_evaluation(loss_fn, held_examples, args.micro_batch))
    if d.main:
        heldout = last.pop("heldout")
        result = {"heldout_accuracy": heldout["accuracy"], "heldout_margin": heldout["margin"],
                  "heldout_loss": heldout["loss"], "heldout_pairs": len(held_examples),
                  "heldout_messages": len({p["query_id"] for p in held_pairs}), "train_pairs": len(train_examples),
                  "train_last_logged": last}
        summary = {"settings": {k_: v for k_, v in vars(args).items() if k_ != "kill_at_step"},
                   "trained_blocks": k, "trainable_parameters": trainable, "dtype": str(dtype), "processes": d.world,
                   "skipped_pairs": skipped + held_skipped, "wall_seconds": round(time.time() - started, 1),
                   "peak_rss_gb": round(T.peak_rss_gb(), 2)}

        def write(folder):
            save_reward_model(model, folder, args.max_length)
            for name, content in (("eval.json", result), ("training.json", summary)):
                with open(os.path.join(folder, name), "w") as f:
                    json.dump(content, f, indent=2)
        T.publish(args.out, write)
        print(f"{PROG}: wrote {args.out}/ in {summary['wall_seconds']:.0f} s (peak memory {summary['peak_rss_gb']} GB); "
              f"held-out accuracy {result['heldout_accuracy']:.3f} on {len(held_examples)} pairs, "
              f"mean margin {result['heldout_margin']:.3f}", file=sys.stderr)
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
