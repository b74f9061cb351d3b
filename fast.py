"""Fast paths: the same results as model.py's plain code, sooner.

model.py is written to be read: plain matrix products, the textbook
attention, a generation loop with the key/value cache in plain sight. The
stages spend most of their time in two places, and this module holds the
shortcuts for them, each switched on where it is faster and each tested to
give what the plain code gives (tests/test_model.py): the same greedy
answers and scores; the products round differently in the last bits, so a
sampled token can, rarely, differ, and a run keeps the same path throughout
so that a seed gives the same answers every time:

- Decoding on a CPU (`generate`, one new token per sequence per step). A
  step multiplies a few rows by every weight matrix, so its time is mostly
  reading the weights:
  - `packed_for_decoding` reorders every matrix once per `generate` call
    into the blocked layout oneDNN's product reads fastest, where this CPU's
    oneDNN can (`cpu_can_pack`; not for one fp32 row on an AMX CPU,
    `cpu_has_amx`), and `linear` multiplies by that copy; W_q, W_k, W_v are
    stacked into one matrix and W_g, W_u into another (`stacked_linear`);
  - in bf16 without a packed copy, `linear` takes the product as (W x^T)^T;
  - `one_token_attention` takes the new token's attention as two batched
    products, without the fused kernel's fixed cost (where that wins:
    `one_token_attention_wins`).
- Prompts and answers that share a beginning:
  - `shared_prompt_pass`: the prompt pass of `generate` runs once per
    distinct prompt (a message answered several times is computed once), in
    groups of similar length, so a short prompt is not padded to a long one;
  - `shared_prefix_batches` and `logprobs_after_prefix`: several answers to
    one prompt are scored after a single pass over the prompt (rank.py's
    judge scores 4+ answers per message; most of each sequence is prompt).

`ENABLED = False` switches every one of them off, and model.py then runs
its plain code alone: the tests compare the two, and a student can time
both (`bench/generate_speed.py` prints the two side by side).

Last, the CPU itself: `cpu_bf16_speedup` measures whether bf16 runs faster
than fp32 here (for `--dtype auto`, `model.pick_dtype`), and `cpu_kind`
names the CPU beside every benchmark figure.

The figures, per CPU kind: PERFORMANCE.md, Speed.
Read next: nothing new; back to model.py.
"""
import contextlib
import functools
import math

import torch
import torch.nn.functional as F

ENABLED = True      # False: model.py's plain path only (tests, benchmarks)

DECODE_ROWS = 64     # at most this many rows (one per sequence) take the decoding shortcuts of `linear`
PRODUCTS_ATTENTION_MIN_BATCH = 8     # fp32 decoding attention by products from this many sequences


# ----------------------------------------------------------------------------
# Matrix products of a decoding step
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cpu_can_pack(dtype):
    """Whether this CPU's oneDNN packs and multiplies `dtype` weights. Asked of
    the running CPU by trying it on a tiny matrix, never assumed from a flag:
    bf16 packing needs AVX-512 or AVX-NE-CONVERT and refuses on AVX2-only CPUs.

    Generation packs wherever this says it can (`packed_for_decoding`). A
    rule, not a timing taken at start-up: a timing flips under load (two
    processes on two cores, a busy laptop), and the packed and plain products
    round differently in the last bits, which can change a sampled token, so
    the same seed could give different answers in a resumed run or another
    process. Measured, whole generation against the plain product: fp32 on an
    AVX2-only AMD EPYC 1.35x at batch 1 (17.1 -> 23.0 tok/s), one 3072 x 576
    product 1.67x at 16 rows, 1.40x at 64; on an Intel Xeon with AMX 1.15x at
    16 rows; bf16 1.3-1.7x on an EPYC with AVX-512-BF16, the same speed on
    the Xeon."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.ones(8, 16, dtype=dtype), torch.ones(2, 16, dtype=dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
        return bool((y.float() == 16).all())
    except (RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_has_amx():
    """Whether this CPU has AMX tile units for bf16 (Intel Xeon since Sapphire
    Rapids): the `amx_bf16` flag Linux lists in /proc/cpuinfo (False where
    there is no such file). A rule measured on the project's three kinds of
    CPU, not a speed probe (see `cpu_can_pack` for why): with AMX, PyTorch's
    fused attention kernel runs bf16 on the tiles and beats
    `one_token_attention` (2026-12-05, generation 1.17-1.23x at batch 1, 16
    and 64), and one fp32 row is faster by MKL's matrix-vector product than by
    a packed weight (batch 1: 26.3 -> 31.9 tok/s); on an AMD EPYC with
    AVX-512-BF16 and no AMX the same kernel is ten times slower than the
    products in bf16, and on an AVX2-only EPYC packing one fp32 row is 1.35x."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def pack_weight(weight):
    """W reordered once into the blocked layout oneDNN's product reads (an
    opaque tensor), or None where this CPU cannot (`linear` then multiplies W)."""
    if weight.device.type != "cpu" or not cpu_can_pack(weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def linear(x, weight, bias=None, packed=None):
    """x W^T + b, as F.linear computes it, with two shortcuts for a decoding
    step on a CPU (a few rows: one per sequence), where the plain product
    reorders W into oneDNN's blocked layout in every call:
    - up to 64 rows with `packed` (W reordered once per `generate` call, where
      this CPU's oneDNN can: `packed_for_decoding`): multiply by it;
    - bf16, up to 64 rows, no packed copy: take the product as (W x^T)^T (or
      W x for one row), which streams W as it lies. The result is then a
      transposed view; a caller that reads it many times (attention,
      sampling) makes it contiguous, the others need not pay for a copy.
    Each is 1.1-1.8x faster per product than the plain one on this project's
    machines (`bench/generate_speed.py`; PERFORMANCE.md, Speed)."""
    rows = x.numel() // x.shape[-1]
    if packed is not None and rows <= DECODE_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if rows <= DECODE_ROWS and x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu":
        x2 = x.reshape(rows, -1)
        y = torch.mv(weight, x2[0])[None] if rows == 1 else (weight @ x2.t()).t()
        y = y.view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


@contextlib.contextmanager
def packed_for_decoding(model, batch_size):
    """While generating on a CPU with a batch of up to 64 sequences, keep a
    copy of every weight matrix in the layout oneDNN's matrix product reads
    fastest (`linear`), wherever this CPU's oneDNN can (`cpu_can_pack`),
    except one fp32 row on an AMX CPU (`cpu_has_amx`). The products that read
    the same input are stacked into one matrix first (W_q, W_k, W_v; W_g, W_u:
    `stack_and_pack`), so a decoding step makes one product where the plain
    code makes three or two.
    Packing the 135M model takes ~0.1 s and holds a second copy of the
    weights during the call (PERFORMANCE.md, Speed)."""
    weight = model.embed_tokens.weight
    one_fp32_row_on_amx = batch_size == 1 and weight.dtype == torch.float32 and cpu_has_amx()   # MKL's mv is faster there
    pack = (ENABLED and weight.device.type == "cpu" and batch_size <= DECODE_ROWS and cpu_can_pack(weight.dtype)
            and not one_fp32_row_on_amx)
    attentions = [m for m in model.modules() if hasattr(m, "stacked_qkv")]
    mlps = [m for m in model.modules() if hasattr(m, "stacked_gate_up")]
    if pack:
        for m in attentions:
            m.stacked_qkv = stack_and_pack([m.q_proj, m.k_proj, m.v_proj])
            m.o_proj.packed = pack_weight(m.o_proj.weight)
        for m in mlps:
            m.stacked_gate_up = stack_and_pack([m.gate_proj, m.up_proj])
            m.down_proj.packed = pack_weight(m.down_proj.weight)
        model.packed_output = pack_weight(model.output_matrix())
    try:
        yield
    finally:
        for m in attentions:
            m.stacked_qkv, m.o_proj.packed = None, None
        for m in mlps:
            m.stacked_gate_up, m.down_proj.packed = None, None
        model.packed_output = None


def stack_and_pack(linears):
    """Several products of one input, x W_1^T, x W_2^T, ..., as one: the W_i
    stacked (and their biases) and packed (`pack_weight`). Returns what
    `stacked_linear` takes: (packed W, bias, the linears)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    return pack_weight(weight), bias, linears


def stacked_linear(x, stacked):
    """(x W_1^T + b_1, x W_2^T + b_2, ...) by one product with the stacked
    matrix for a decoding step (up to 64 rows); a longer input (the prompt
    pass of `generate`) takes the linears one by one, as the plain code does."""
    packed, bias, linears = stacked
    if x.numel() // x.shape[-1] > DECODE_ROWS:
        return [m(x) for m in linears]
    y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return y.split([m.out_features for m in linears], dim=-1)


# ----------------------------------------------------------------------------
# Attention of a decoding step
# ----------------------------------------------------------------------------

def one_token_attention_wins(q, attn_mask):
    """Whether `one_token_attention` beats the fused kernel for this step: a CPU
    decoding step (one query row per sequence), where the kernel's fixed cost
    can dominate. The two products win in bf16 without AMX (64 sequences:
    0.56 ms against 6.2 ms, AMD EPYC with AVX-512-BF16; with AMX the kernel
    wins, `cpu_has_amx`) and in fp32 from 8 sequences (1.3x
    there, 1.05-1.08x on an AVX2-only EPYC); for 1-4 fp32 sequences the
    kernel is 2-4x faster. A rule, not a timing, for the reason in
    `cpu_can_pack`."""
    if not (ENABLED and q.shape[2] == 1 and attn_mask is not None and q.device.type == "cpu"):
        return False
    if q.dtype == torch.bfloat16:
        return not cpu_has_amx()        # with AMX tiles the fused kernel is the faster (`cpu_has_amx`)
    return q.shape[0] >= PRODUCTS_ATTENTION_MIN_BATCH


def one_token_attention(q, k, v, additive_mask):
    """softmax(q k^T / sqrt(d) + mask) v for one new token per sequence, as two
    batched products: the query heads that share a key/value head are stacked
    as rows, so k and v are read once per group, never repeated.
    q (B, H, 1, d); k, v (B, KV, S, d); additive_mask (B, 1, 1, S)."""
    B, H, _, d = q.shape
    KV, S = k.shape[1], k.shape[2]
    scores = q.view(B, KV, H // KV, d) @ k.transpose(-1, -2) * d ** -0.5 + additive_mask.view(B, 1, 1, S)
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (weights @ v).view(B, H, 1, d)


# ----------------------------------------------------------------------------
# Prompts and answers that share a beginning
# ----------------------------------------------------------------------------

def shared_prompt_pass(model, prompts, cache, prompt_pass):
    """`model.prompt_pass` for a batch, run once per distinct prompt (the same
    prompt sampled several times is computed once), in groups of at most 16
    prompts whose longest is at most 1.25x the shortest (plus 8 tokens): each
    group is padded only to its own longest prompt, not the batch's (a short
    plain prompt beside a long system prompt would otherwise pay for the
    padding). Each group's keys and values are copied into `cache`, to every
    row with that prompt, right-aligned at T (the batch's longest prompt), as
    the plain pass leaves them. Returns each row's last hidden state."""
    device = cache[0][0].device
    T = max(len(p) for p in prompts)
    first_of = {}
    owner = torch.tensor([first_of.setdefault(tuple(p), len(first_of)) for p in prompts], device=device)
    distinct = list(first_of)
    last_hidden = torch.empty(len(prompts), model.cfg.dim, dtype=cache[0][0].dtype, device=device)
    groups = [[]]
    for u in sorted(range(len(distinct)), key=lambda u: len(distinct[u])):
        if groups[-1] and (len(groups[-1]) == 16 or len(distinct[u]) > 1.25 * len(distinct[groups[-1][0]]) + 8):
            groups.append([])
        groups[-1].append(u)
    for group in groups:
        group_prompts = [list(distinct[u]) for u in group]
        Tg = max(len(p) for p in group_prompts)
        small = model.new_cache(len(group), Tg)
        hidden = prompt_pass(model, group_prompts, small)
        local = torch.full((len(distinct),), -1, dtype=torch.long, device=device)
        local[torch.tensor(group, device=device)] = torch.arange(len(group), device=device)
        rows = (local[owner] >= 0).nonzero().squeeze(1)          # every batch row whose prompt is in this group
        src = local[owner[rows]]
        for (K, V), (k, v) in zip(cache, small):
            K[rows, :, T - Tg:T] = k[src]
            V[rows, :, T - Tg:T] = v[src]
        last_hidden[rows] = hidden[src]
    return last_hidden


def shared_prefix_batches(sequences, masks, batch_size):
    """The work of `answer_logprobs`: [(prefix or None, [sequence indices])].
    Sequences that agree on everything before their first scored token
    (several answers to one prompt) go together with that prompt as their
    prefix (`logprobs_after_prefix`); the others, sorted by length, in plain
    batches (prefix None), so little compute goes to padding."""
    by_prompt = {}
    for i, m in enumerate(masks):
        first = next((t for t, x in enumerate(m) if x), len(m))
        by_prompt.setdefault(tuple(sequences[i][:first]), []).append(i)
    alone = sorted((i for p, g in by_prompt.items() if len(g) == 1 or not p for i in g), key=lambda i: len(sequences[i]))
    work = [(None, alone[b:b + batch_size]) for b in range(0, len(alone), batch_size)]
    work += [(p, g[b:b + batch_size]) for p, g in by_prompt.items() if len(g) > 1 and p for b in range(0, len(g), batch_size)]
    return work


def logprobs_after_prefix(model, prefix, ids, score):
    """Summed log-probability and count of the scored tokens of each
    continuation, all after one shared prefix. `ids`, `score`: the
    continuations right-padded (K, L). The prefix runs once; its keys and
    values are copied to every row of the cache, and the continuations run
    together after it."""
    device = ids.device
    P, (K, L) = len(prefix), ids.shape
    small = model.new_cache(1, P)
    last = model(torch.tensor([prefix], device=device), cache=small)[:, -1:]          # predicts each first token
    cache = model.new_cache(K, P + L)
    for (Kc, Vc), (k, v) in zip(cache, small):
        Kc[:, :, :P], Vc[:, :, :P] = k, v
    # Continuation token t sees the whole prefix and continuation tokens 0..t: 0 where allowed, -inf elsewhere.
    allowed = torch.arange(P + L, device=device)[None, :] <= P + torch.arange(L, device=device)[:, None]
    mask = torch.zeros(allowed.shape, dtype=cache[0][0].dtype, device=device).masked_fill(~allowed, float("-inf"))
    hidden = model(ids, attn_mask=mask[None, None], cache=cache, start=P)
    inputs = torch.cat([last.expand(K, 1, -1), hidden[:, :-1]], dim=1)                 # the state before each token
    logp = torch.log_softmax(model.logits(inputs[score]).float(), dim=-1).gather(-1, ids[score][:, None]).squeeze(-1)
    row = torch.arange(K, device=device)[:, None].expand_as(score)[score]
    return torch.zeros(K, device=device).index_add(0, row, logp), score.sum(-1)


# ----------------------------------------------------------------------------
# The CPU: what it is, and whether bf16 is faster on it (`model.pick_dtype`)
# ----------------------------------------------------------------------------

def cpu_kind():
    """One line naming this CPU: model, cores torch uses, and its bf16/AVX flags
    (benchmarks print it beside every figure)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    kind = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx_ne_convert", "avx2") if f in flags]
    return f"{name}, {torch.get_num_threads()} threads, flags: {' '.join(kind) or 'none of amx/avx512/avx2'}"


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(work="decoding"):
    """How many times faster bf16 runs than fp32 on this CPU for `work`, measured
    once per process (0.3-1 s) on two blocks of SmolLM2-135M's shapes with
    random weights, best of 3 interleaved timings:
    - "decoding": `generate` itself, 16 prompts of ~60 tokens, 12 new tokens
      each (the prompt pass and the decoding steps, in the stages' proportion);
    - "scoring": a forward pass over 2 x 128 tokens, fp32 vs bf16 weights;
    - "training": forward and backward over 2 x 128 tokens, fp32 vs bf16 autocast.
    Measured, never read from a CPU flag: an AVX2-only CPU emulates bf16
    (several times slower); AMX and AVX-512-BF16 run bf16 about twice as fast,
    but only where the kernels use them (on an AMD EPYC with AVX-512-BF16 the
    fused attention kernel made bf16 decoding slower than fp32 until decoding
    switched to `one_token_attention`)."""
    import copy
    import time
    import model as M                                   # model.py imports this file
    cfg = M.Config(vocab_size=256, n_layers=2, max_seq_len=256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fp32 = M.ChatModel(cfg)
        for p in fp32.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    fp32.eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    prompts = [[1 + (7 * i + j) % 250 for j in range(64 - i % 8)] for i in range(16)]

    def decoding(m):
        m.tokenizer = M.Tokenizer.__new__(M.Tokenizer)         # generate reads only the two ids below
        m.tokenizer.stop_ids, m.tokenizer.pad_id = [], 0
        M.generate(m, prompts, max_new_tokens=12, temperature=0.7)

    def scoring(m):
        with torch.inference_mode():
            m(ids)

    def training(m):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=m is bf16):
            loss = fp32(ids).float().pow(2).mean()          # autocast: fp32 weights either way
        loss.backward()
        fp32.zero_grad(set_to_none=True)

    run = {"decoding": decoding, "scoring": scoring, "training": training}[work]
    best = {fp32: math.inf, bf16: math.inf}
    for m in best:                                          # warm up: oneDNN picks its kernels
        run(m)
    for _ in range(3):
        for m in best:
            t = time.perf_counter()
            run(m)
            best[m] = min(best[m], time.perf_counter() - t)
    return best[fp32] / best[bf16]
