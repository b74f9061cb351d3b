"""The training loop shared by reward_model.py (stage 4) and dpo.py (stage 5),
written by hand in plain PyTorch, plus the preference data both stages read.

Reads:  data/preferences.jsonl for both stages (read_preferences, below).
Writes: <out>/metrics.jsonl (a line per logged step; the held-out evaluations
        as lines with "heldout") and, while it runs, <out>/checkpoint/.

A stage gives the loop a model, a list of examples and a loss function; the
loop does everything else:

    start = resume_or_start(...)                 the checkpoint's step, or 0
    for step in range(start, total):
        lr = peak * schedule(step)               linear warmup, then cosine decay
        train_step:
          for each micro batch of this step:     gradient accumulation
              loss_sum = loss_fn(model, examples)  summed over the micro batch
              backward(loss_sum * world / B)     B = global batch: the mean over B
          clip the gradient norm; AdamW step
        every --log-every steps:  close_window: metrics -> tqdm and metrics.jsonl
        every --save-every steps: save_checkpoint (atomic)
        every --eval-every steps: evaluate_heldout

Global batch and data order. One optimizer step always sees --batch-size
examples (the global batch), whatever the number of processes: each of the N
processes takes its 1/N share and splits it into micro batches of
--micro-batch. The data is an endless stream of shuffled epochs, and step s
takes examples s*B .. s*B+B-1 of the stream; the shuffle of epoch e is drawn
from a generator seeded with (seed, e). So the data order is a pure function
of (seed, step): a resume needs to know only the step.

Precision. Weights, gradients and optimizer state stay in fp32; the forward
and backward run under bf16 autocast where it is faster (a GPU with bf16; a
CPU where a start-up measurement says so: `model.pick_dtype`), else in fp32.
Frozen matrices (a frozen tied output layer included) are cast to bf16 once
for the run, not by autocast in every forward, and put back in fp32 before
saving (`cast_frozen_matrices`).

No host synchronisation per step. Reading a number from the GPU (`.item()`,
`float()`, `if tensor:`) stalls the CPU until the GPU catches up. Metrics are
kept as tensors and read only at log steps; so is the check for a NaN or
infinite loss (a step-tagged flag, updated without reading it). A checkpoint
is written only after that check, so the last checkpoint is always good.

Checkpoint and exact resume. `<out>/checkpoint/` holds the trainable weights,
the AdamW moments and the random-number-generator states (safetensors), and
state.json: the step, the elapsed time and the run's settings (a resume with
other settings is refused). The learning rate and the data order are
functions of the step. Written to a temporary folder and renamed, so a kill
leaves either the old or the new checkpoint, never half of one. On resume
the metrics file is cut back to the checkpoint's step, so no line is
duplicated. Nothing is unpickled.

Several processes: `torchrun --nproc_per_node=N stage.py ...` sets WORLD_SIZE;
the loop then joins the process group (NCCL on GPUs, gloo on CPUs), runs the
loss inside DistributedDataParallel (which averages the gradients across
processes during the backward pass) and gives each process its share of
every batch. Process 0 logs, evaluates and writes files.

--compile compiles each block with torch.compile (all blocks share the code,
so it compiles once); it pays off on GPUs and on long runs.

What it simplifies: one optimizer (AdamW), a cosine schedule, data-parallel
only (no model or pipeline parallelism, no ZeRO sharding).
Read next: sample.py.
"""
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import model as M


class DataError(Exception):
    """Input that cannot be used; the stages print it as one line and exit 1."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; training stopped, last checkpoint intact."""


# ----------------------------------------------------------------------------
# Preference data (the format rank.py writes)
# ----------------------------------------------------------------------------

PAIR_FIELDS = ("id", "query_id", "prompt", "chosen", "rejected")


def read_preferences(path, max_pairs=None):
    """One preference pair per line of a JSONL file:
        {"id", "query_id", "trait", "prompt": [{"role": "user", "content": ...}],
         "chosen": [{"role": "assistant", "content": ...}], "rejected": [...],
         "score_chosen", "score_rejected", "margin", "judge", "traits_sha"}
    Only the fields the training needs are required; a problem raises DataError
    with the line number. max_pairs: keep only the first N (quick runs)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (run rank.py first, or pass --preferences)")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(pair, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            missing = [k for k in PAIR_FIELDS if k not in pair]
            if missing:
                raise DataError(f"{path}:{number}: missing field {', '.join(missing)}")
            for key in ("prompt", "chosen", "rejected"):
                messages = pair[key]
                if (not isinstance(messages, list) or not messages or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
                        for m in messages)):
                    raise DataError(f"{path}:{number}: {key!r} must be a non-empty list of "
                                    '{"role": ..., "content": ...} messages')
            if pair["chosen"][-1]["role"] != "assistant" or pair["rejected"][-1]["role"] != "assistant":
                raise DataError(f"{path}:{number}: 'chosen' and 'rejected' must end with an assistant message")
            pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: empty file, no preference pairs")
    return pairs[:max_pairs] if max_pairs else pairs


def check_traits(pairs, traits_path, path):
    """Refuse pairs made from another traits file than `traits_path` ("" = skip)."""
    if not traits_path:
        return
    from character import InputError, parse_traits, traits_sha
    try:
        sha = traits_sha(parse_traits(traits_path))
    except InputError as e:
        raise DataError(str(e)) from None
    for number, pair in enumerate(pairs, 1):
        if pair.get("traits_sha") != sha:
            raise DataError(f"{path}: pair {number} ({pair['id']}) was made from a different traits file than "
                            f"{traits_path} (traits_sha {str(pair.get('traits_sha'))[:12]}... != {sha[:12]}...); "
                            "rerun generate.py and rank.py, or pass --traits ''")


def split_by_query(pairs, heldout_fraction, seed):
    """(train, heldout): whole messages (query_id) go to one side, so no
    message is seen in training and then tested on (several pairs of one
    message are alike: a split by pair would overstate held-out accuracy)."""
    queries = sorted({p["query_id"] for p in pairs})
    g = torch.Generator().manual_seed(seed)
    order = [queries[i] for i in torch.randperm(len(queries), generator=g).tolist()]
    n_held = round(len(queries) * heldout_fraction)
    if heldout_fraction > 0 and len(queries) >= 2:
        n_held = min(max(n_held, 1), len(queries) - 1)
    held = set(order[:n_held])
    return [p for p in pairs if p["query_id"] not in held], [p for p in pairs if p["query_id"] in held]


def without_system(messages):
    """The prompt without any system message: the chat template then inserts the
    model's plain default one. Training prompts never carry the traits."""
    return [m for m in messages if m["role"] != "system"]


def tokenize_answer(tok, prompt, answer, max_length):
    """Token ids of prompt + answer as the chat template renders them, cut after
    the answer's end-of-turn token, and the mask of the answer tokens (content
    and end-of-turn). If too long, the answer is cut (never the prompt); None
    if the prompt alone leaves fewer than 8 answer tokens.

    An answer generate.py cut at its token limit (nearly all of them) keeps
    its end-of-turn token too. That teaches the model to stop early, and
    answers shorten; trained without it, the tuned model never stopped and
    looped in every answer let run past 64 tokens (RESULTS.md, "Recipes tried")."""
    ids, mask = tok.chat(list(prompt) + list(answer))
    # Only the final answer counts: earlier assistant turns of a multi-turn prompt are prompt.
    prompt_len = len(tok.chat(list(prompt), add_generation_prompt=True)[0])
    mask = [m and i >= prompt_len for i, m in enumerate(mask)]
    last = max(i for i, m in enumerate(mask) if m)
    ids, mask = ids[:last + 1], mask[:last + 1]
    if len(ids) > max_length:
        if max_length - prompt_len < 8:
            return None
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def tokenize_pairs(pairs, tok, max_length):
    """Each pair as token ids and answer masks of its chosen and rejected
    conversations, with the plain default system prompt (the traits are never
    in the prompt: the character is trained in, not prompted in). Returns the
    examples (dicts) and the number of pairs skipped (prompt too long)."""
    examples, skipped = [], 0
    for pair in pairs:
        prompt = without_system(pair["prompt"])
        chosen = tokenize_answer(tok, prompt, pair["chosen"], max_length)
        rejected = tokenize_answer(tok, prompt, pair["rejected"], max_length)
        if chosen is None or rejected is None:
            skipped += 1
            continue
        examples.append({"id": pair["id"], "chosen": chosen, "rejected": rejected,
                         "judge_margin": float(pair.get("margin") or 0.0),
                         "length": len(chosen[0]) + len(rejected[0])})
    return examples, skipped


# ----------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0           # this process's number
    world: int = 1          # number of processes
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device_name="auto"):
    """Join the process group if torchrun started us (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = M.pick_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def cleanup_distributed(d):
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """The model and the stage's loss function as one module. DDP wraps it,
    so DDP's forward covers the whole loss computation, whatever parts of the
    model the loss function calls."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def data_parallel(model, loss_fn, d):
    """(compute, no_sync): compute(batch) -> loss_fn(model, batch). With several
    processes it runs inside DistributedDataParallel, which averages the
    gradients across processes during the backward pass, except inside
    no_sync() (used for all but the last micro batch of a step)."""
    if d.world == 1:
        return (lambda batch: loss_fn(model, batch)), nullcontext
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(LossModule(model, loss_fn), device_ids=[d.device.index] if d.device.type == "cuda" else None,
              forward_sync_buffers=False)   # the only buffers are the fixed rotary tables
    return ddp, ddp.no_sync


def to_device(device, *tensors):
    """Move a batch built on the CPU to the device without waiting for it: a
    plain .to("cuda") of CPU memory makes the CPU wait until the GPU has
    finished all queued work; from pinned (page-locked) memory with
    non_blocking=True the copy is queued like a kernel."""
    if torch.device(device).type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


def autocast(device, dtype):
    """bf16 autocast where asked for; fp32 otherwise (weights stay fp32 either way)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ----------------------------------------------------------------------------
# Which parameters train
# ----------------------------------------------------------------------------

def freeze_for_training(model, train_layers, train_embeddings):
    """Train the top `train_layers` blocks (0 or >= n_layers: all of them) and
    the final norm; freeze the rest. Frozen bottom blocks cost only their
    forward: autograd records nothing until the first trainable block, so
    their activations are not kept and no gradient flows through them. The
    token embedding, tied to the output layer in small models, stays frozen
    unless train_embeddings (its gradient is a full vocabulary x width matrix)."""
    n = model.cfg.n_layers
    k = n if train_layers <= 0 or train_layers >= n else train_layers
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers[n - k:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    model.norm.weight.requires_grad_(True)
    if train_embeddings:
        model.embed_tokens.weight.requires_grad_(True)
        if model.lm_head is not None:
            model.lm_head.weight.requires_grad_(True)
    return k


def cast_frozen_matrices(model, dtype):
    """Frozen matrices never change, so cast them to the compute dtype once:
    under autocast every forward casts them again (on this project's CPU,
    casting once made a DPO step 7-14% faster). autocast rounds the same way,
    so the numbers do not change. Norm gains stay fp32, as autocast leaves
    them. A frozen tied embedding stays fp32 for its lookup (the residual
    stream starts there), and the output layer gets a bf16 copy of it
    (`model.output_weight`): another 5% of a default DPO step. Returns the
    fp32 originals for `restore_matrices`."""
    originals = {}
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad and module.weight.dtype == torch.float32:
                originals[module] = module.weight.data
                module.weight.data = module.weight.data.to(dtype)
        if model.lm_head is None and not model.embed_tokens.weight.requires_grad:
            model.output_weight = model.embed_tokens.weight.detach().to(dtype)
    return originals


def restore_matrices(model, originals):
    """Put the fp32 originals back, so that the saved model is exact."""
    for module, weight in originals.items():
        module.weight.data = weight
    model.output_weight = None


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ----------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay, lr_scales=None, device=torch.device("cpu")):
    """AdamW over the trainable parameters. Weight decay applies to matrices
    only (not to norms and biases). lr_scales: {name prefix: factor}, e.g. a
    larger rate for a freshly initialised head. Fused AdamW (one kernel for
    all parameters) where this PyTorch has it for the device."""
    lr_scales = lr_scales or {}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for prefix, s in lr_scales.items() if name.startswith(prefix)), 1.0)
        decay = weight_decay if p.dim() >= 2 else 0.0
        group = groups.setdefault((scale, decay), {"params": [], "names": [], "lr_scale": scale, "weight_decay": decay})
        group["params"].append(p)
        group["names"].append(name)
    param_groups = list(groups.values())
    try:
        return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step, total, warmup, peak, min_ratio=0.1):
    """Linear warmup from 0 over `warmup` steps, then cosine decay from peak to
    min_ratio * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------

@lru_cache(maxsize=4)
def epoch_permutation(n, seed, epoch):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_examples(step, n, global_batch, seed):
    """Indices of the examples that optimizer step `step` uses: positions
    step*B .. step*B+B-1 of an endless stream of shuffled epochs."""
    out = []
    for position in range(step * global_batch, (step + 1) * global_batch):
        epoch, i = divmod(position, n)
        out.append(epoch_permutation(n, seed, epoch)[i])
    return out


def micro_batches(indices, lengths, rank, world, micro_batch):
    """This process's share of a step's examples, sorted by length (less
    padding) and cut into micro batches."""
    share = len(indices) // world
    mine = sorted(indices[rank * share:(rank + 1) * share], key=lambda i: lengths[i])
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


# ----------------------------------------------------------------------------
# Checkpoints and the metrics file
# ----------------------------------------------------------------------------

def replace_folder(tmp, folder):
    """Put the complete folder `tmp` in the place of `folder` (rename: atomic
    per step, so a kill leaves the old folder, the new one, or both)."""
    if os.path.exists(folder):
        old = folder.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def save_checkpoint(folder, model, optimizer, state):
    """Trainable weights, AdamW moments and step counts (safetensors), RNG
    states (safetensors), and `state` (JSON)."""
    from safetensors.torch import save_file
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    params = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(params, os.path.join(tmp, "trainable.safetensors"))
    moments = {}
    name_of = {id(p): n for n, p in model.named_parameters()}
    for p, s in optimizer.state.items():
        for key, value in s.items():            # exp_avg, exp_avg_sq, step
            moments[f"{name_of[id(p)]}/{key}"] = value.detach().reshape(value.shape).contiguous().cpu()
    save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=2)
    replace_folder(tmp, folder)


def load_checkpoint(folder, model, optimizer, device):
    """Restore what save_checkpoint wrote; returns the state dict (JSON)."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    params = dict(model.named_parameters())
    saved = load_file(os.path.join(folder, "trainable.safetensors"))
    if not saved.keys() <= params.keys():       # e.g. made before the network's tensors were renamed
        unknown = sorted(saved.keys() - params.keys())[0]
        raise DataError(f"{folder} holds {unknown!r}, which this network has not; pass --no-resume to start again")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    moments = load_file(os.path.join(folder, "optimizer.safetensors"))
    for key, value in moments.items():
        name, what = key.rsplit("/", 1)
        p = params[name]
        # Fused AdamW keeps its step count on the parameter's device; others on the CPU.
        on = p.device if what != "step" or optimizer.defaults.get("fused") else torch.device("cpu")
        optimizer.state[p][what] = value.to(on)
    rng = load_file(os.path.join(folder, "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return state


def checkpoint_state(folder):
    """The state.json of a checkpoint, or None if there is none."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def cut_metrics(path, last_step):
    """Keep the metrics lines up to `last_step` (all of them if None: none)."""
    kept = []
    if last_step is not None and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break                       # a line torn by a kill: stop there
                if record.get("step", 0) <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def append_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

def add_train_args(parser, lr, batch_size, micro_batch, epochs, train_layers):
    """The training flags both stages share (each stage picks its defaults)."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=M.number(float, above=0), default=epochs, help="passes over the training pairs (default: %(default)s)")
    g.add_argument("--max-steps", type=M.number(int, at_least=1), default=None, help="stop after this many optimizer steps (default: from --epochs)")
    g.add_argument("--lr", type=M.number(float, above=0), default=lr, help="peak learning rate (default: %(default)s)")
    g.add_argument("--warmup", type=M.number(float, at_least=0, below=1), default=0.1, help="warmup steps as a fraction of all steps (default: %(default)s)")
    g.add_argument("--min-lr-ratio", type=M.number(float, at_least=0, at_most=1), default=0.1, help="final learning rate / peak, cosine decay (default: %(default)s)")
    g.add_argument("--weight-decay", type=M.number(float, at_least=0), default=0.0, help="AdamW weight decay on matrices (default: %(default)s)")
    g.add_argument("--batch-size", type=M.number(int, at_least=1), default=batch_size,
                   help="global batch in pairs per optimizer step, over all processes (default: %(default)s)")
    g.add_argument("--micro-batch", type=M.number(int, at_least=1), default=micro_batch,
                   help="pairs per forward pass in each process; gradients accumulate up to --batch-size (default: %(default)s)")
    g.add_argument("--grad-clip", type=M.number(float, above=0), default=1.0, help="clip the gradient norm to this (default: %(default)s)")
    g.add_argument("--train-layers", type=M.number(int, at_least=0), default=train_layers,
                   help="train the top N blocks and freeze the rest; 0 = all (full fine-tuning) (default: %(default)s)")
    g.add_argument("--train-embeddings", action="store_true", help="train the token embedding (tied output layer) too")
    g.add_argument("--max-pairs", type=M.number(int, at_least=1), default=None, help="use only the first N pairs of the file (quick runs; default: all)")
    g.add_argument("--max-length", type=M.number(int, at_least=8), default=384, help="tokens per prompt + answer; longer answers are cut (default: %(default)s)")
    g.add_argument("--seed", type=M.number(int, at_least=0), default=0, help="seed of the data order, split and initialisation (default: %(default)s)")
    g.add_argument("--log-every", type=M.number(int, at_least=1), default=1, help="steps between metric lines; each one reads the device (default: %(default)s)")
    g.add_argument("--save-every", type=M.number(int, at_least=1), default=25, help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--eval-every", type=M.number(int, at_least=0), default=25,
                   help="steps between held-out evaluations (a point of the report's held-out curve); 0 = only at the end (default: %(default)s)")
    g.add_argument("--no-resume", action="store_true", help="start again even if a checkpoint exists")
    g.add_argument("--compile", action="store_true", help="torch.compile each block (slow first steps, faster after)")
    g.add_argument("--kill-at-step", type=M.number(int, at_least=1), default=None,
                   help="testing aid: kill this process (SIGKILL, no clean-up) after step N, to try a resume")


def total_steps(args, n_examples):
    if args.max_steps is not None:
        return args.max_steps
    return max(1, math.ceil(args.epochs * n_examples / args.batch_size))


def check_batch(args, d):
    if args.batch_size % d.world:
        raise DataError(f"--batch-size {args.batch_size} is not a multiple of the {d.world} processes")
    if args.micro_batch < 1 or args.batch_size < 1:
        raise DataError("--batch-size and --micro-batch must be at least 1")


def resume_or_start(ckpt_dir, metrics_path, model, optimizer, fingerprint, args, d, total):
    """(first step, seconds trained so far). From the checkpoint in ckpt_dir if
    there is one made with the same settings (`fingerprint`): the weights, the
    optimizer's moments and the step come back, and metrics.jsonl is cut back
    to that step, so the resumed run writes what an unbroken one would. A
    checkpoint made with other settings is refused, never silently mixed in."""
    start, elapsed = 0, 0.0
    state = None if args.no_resume else checkpoint_state(ckpt_dir)
    if state is not None:
        changed = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:3])
            raise DataError(f"{ckpt_dir} was made with other settings ({what}); pass --no-resume to start again")
        state = load_checkpoint(ckpt_dir, model, optimizer, d.device)
        start, elapsed = state["step"], state["elapsed_s"]
    if d.main:
        cut_metrics(metrics_path, start if state is not None else None)
        if state is not None:
            print(f"resuming from {ckpt_dir} at step {start} of {total}", file=sys.stderr)
    if d.world > 1:
        dist.barrier()
    return start, elapsed


def train_step(compute, no_sync, optimizer, params, batch_examples, args, d, compute_dtype):
    """One optimizer step on one global batch, split into micro batches:
    forward and backward each (gradients add up), clip, step. Returns the
    summed loss and metrics of this process's examples and the gradient norm,
    as tensors on the device (reading them would wait for it)."""
    step_loss, metric_sums = torch.zeros((), device=d.device), {}
    for i, batch in enumerate(batch_examples):
        # With DDP, gradients are averaged across processes only at the last micro batch.
        with no_sync() if i < len(batch_examples) - 1 else nullcontext():
            with autocast(d.device, compute_dtype):
                loss_sum, metrics = compute(batch)
            # Sum over this micro batch * world / B: after DDP's average, the mean over the global batch.
            (loss_sum * (d.world / args.batch_size)).backward()
        step_loss += loss_sum.detach().float()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
    if args.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, metric_sums, grad_norm


def new_window():
    """The sums of the steps since the last log line."""
    return {"sums": {}, "grad_norm": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}


def close_window(window, done, lr, n_examples, args, d):
    """The log record of the steps in `window`: means per example of the loss
    and every metric, over all processes, the gradient norm and throughput.
    The one place the loop reads numbers from the device."""
    keys = sorted(window["sums"])
    values = torch.stack([window["sums"][k] for k in keys])
    if d.world > 1:
        dist.all_reduce(values)                              # sums over all processes
    n = window["steps"] * args.batch_size
    record = {"step": done, "epoch": round(done * args.batch_size / n_examples, 3), "lr": lr}
    record.update({k: v / n for k, v in zip(keys, values.tolist())})        # means per pair
    record["grad_norm"] = float(window["grad_norm"]) / window["steps"]     # before clipping
    record["tokens_per_s"] = window["tokens"] / max(time.perf_counter() - window["start"], 1e-9)
    return record


def stop_if_not_finite(first_bad, ckpt_dir, d):
    """Raise NonFiniteLoss if any process saw a NaN or infinite loss (first_bad >= 0)."""
    if d.world > 1:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
    bad = int(first_bad)
    if bad >= 0:
        last = checkpoint_state(ckpt_dir)
        where = (f"the last good checkpoint (step {last['step']}) in {ckpt_dir} is intact"
                 if last else "no checkpoint had been written")
        raise NonFiniteLoss(f"the loss became NaN or infinite at step {bad + 1}; training stopped "
                            f"and {where}. Try a lower --lr or check the data.")


def evaluate_heldout(model, evaluate, step, metrics_path, d, compute_dtype):
    """evaluate(model) on process 0, in eval mode and without gradients,
    logged as {"step", "heldout": {...}}; the other processes wait."""
    result = None
    if evaluate is not None and d.main:
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast(d.device, compute_dtype):
            result = evaluate(model)
        model.train(was_training)
        append_metrics(metrics_path, {"step": step, "heldout": result})
        tqdm.write("held-out at step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in result.items())))
    if d.world > 1:
        dist.barrier()
    return result


def heldout_evaluation(loss_fn, examples, micro_batch):
    """The `evaluate` that `train` takes: the training loss and metrics on
    held-out examples (messages training never saw), means per example."""
    def evaluate(model):
        if not examples:
            return {}
        totals = {}
        ordered = sorted(examples, key=lambda e: e["length"])
        for b in range(0, len(ordered), micro_batch):
            loss, metrics = loss_fn(model, ordered[b:b + micro_batch])
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {k: v / len(examples) for k, v in totals.items()}
    return evaluate


def train(model, examples, lengths, loss_fn, args, d, out_dir, compute_dtype, fingerprint,
          lr_scales=None, evaluate=None):
    """Train `model` in place; return the metrics of the last log step, with
    the final held-out evaluation under "heldout" (process 0).

    examples:  list of training examples (any objects), the same in every process
    lengths:   tokens per example (to sort micro batches and count throughput)
    loss_fn(model, batch) -> (loss_sum, {metric: sum over the batch}), tensors
    fingerprint: the settings a resume must match (dict, JSON)
    evaluate(model) -> {metric: float}: held-out evaluation, on process 0
    Writes <out_dir>/metrics.jsonl and <out_dir>/checkpoint/.

    Each step: set the learning rate, take the step's examples (a pure
    function of the seed and the step), `train_step`; every --log-every
    steps a log line (`close_window`), every --save-every a checkpoint,
    every --eval-every a held-out evaluation."""
    os.makedirs(out_dir, exist_ok=True)
    ckpt_dir = os.path.join(out_dir, "checkpoint")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    torch.manual_seed(args.seed)
    check_batch(args, d)
    total = total_steps(args, len(examples))
    warmup = round(args.warmup * total)
    if args.compile:
        for layer in model.layers:
            layer.compile()
    optimizer = make_optimizer(model, args.lr, args.weight_decay, lr_scales, d.device)
    compute, no_sync = data_parallel(model, loss_fn, d)
    originals = cast_frozen_matrices(model, compute_dtype)
    try:                    # put the fp32 originals back however training ends (NaN, resume error, Ctrl-C)
        fingerprint = json.loads(json.dumps({**fingerprint, "total_steps": total}))   # as it reads back from JSON
        start, elapsed = resume_or_start(ckpt_dir, metrics_path, model, optimizer, fingerprint, args, d, total)
        params = [p for p in model.parameters() if p.requires_grad]
        first_bad = torch.tensor(-1, device=d.device)      # first step with a non-finite loss (-1: none)
        window, last_record = new_window(), {}
        run_start = time.perf_counter()
        bar = tqdm(total=total, initial=start, disable=not d.main, desc=os.path.basename(out_dir.rstrip("/")), dynamic_ncols=True)
        model.train()
        for step in range(start, total):
            lr = lr_at(step, total, warmup, args.lr, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            indices = step_examples(step, len(examples), args.batch_size, args.seed)
            batches = [[examples[j] for j in batch] for batch in micro_batches(indices, lengths, d.rank, d.world, args.micro_batch)]
            step_loss, metric_sums, grad_norm = train_step(compute, no_sync, optimizer, params, batches, args, d, compute_dtype)
            # Remember the first step whose loss was NaN or inf, without reading it now.
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), step, first_bad)
            for k, v in {**metric_sums, "loss": step_loss}.items():
                window["sums"][k] = window["sums"].get(k, 0) + v
            window["grad_norm"] = window["grad_norm"] + grad_norm.detach().float()
            window["steps"] += 1
            window["tokens"] += sum(lengths[j] for j in indices)
            done = step + 1

            if done % args.log_every == 0 or done % args.save_every == 0 or done == total:
                try:
                    stop_if_not_finite(first_bad, ckpt_dir, d)
                except NonFiniteLoss:
                    bar.close()
                    raise
                last_record = close_window(window, done, lr, len(examples), args, d)
                last_record["elapsed_s"] = round(elapsed + time.perf_counter() - run_start, 2)
                if d.main:
                    append_metrics(metrics_path, last_record)
                    bar.set_postfix({k: f"{last_record[k]:.3g}" for k in ("loss", "accuracy", "margin") if k in last_record})
                window = new_window()
            bar.update(1)
            if done % args.save_every == 0 and done < total:
                if d.main:
                    save_checkpoint(ckpt_dir, model, optimizer, {
                        "step": done, "elapsed_s": elapsed + time.perf_counter() - run_start, "fingerprint": fingerprint})
                if d.world > 1:
                    dist.barrier()
                window["start"] = time.perf_counter()          # throughput counts training only
            if args.eval_every and done % args.eval_every == 0 and done < total:
                evaluate_heldout(model, evaluate, done, metrics_path, d, compute_dtype)
                window["start"] = time.perf_counter()
            if args.kill_at_step is not None and done == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)         # testing aid: die the way a crash does
        bar.close()
        model.eval()
        last_record["heldout"] = evaluate_heldout(model, evaluate, total, metrics_path, d, compute_dtype)
        last_record["elapsed_s"] = round(elapsed + time.perf_counter() - run_start, 2)
        return last_record
    finally:
        restore_matrices(model, originals)


def publish(out_dir, write_model, keep=("metrics.jsonl",)):
    """Make `out_dir` the finished stage output: write_model(folder) writes the
    model into a fresh folder, the files in `keep` are copied over from the
    work folder, and the new folder replaces the old one (which held the
    checkpoint: a finished run no longer needs it)."""
    final = out_dir.rstrip("/") + ".final"
    shutil.rmtree(final, ignore_errors=True)
    write_model(final)
    for name in keep:
        if os.path.exists(os.path.join(out_dir, name)):
            shutil.copy(os.path.join(out_dir, name), os.path.join(final, name))
    replace_folder(final, out_dir)


def peak_rss_gb():
    """The most memory this process has held (resident set), in GB."""
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1e6 if sys.platform != "darwin" else kb / 1e9
