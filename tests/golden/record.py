"""Record the golden values that tests/test_model.py checks model.py against.

    pip install transformers     # an optional extra, only for this script
    python tests/golden/record.py

`transformers` loads the same embedded GGUF file with its own code (its own
dequantisation, its own undoing of llama.cpp's q/k permutation, its own
tokenizer conversion), so agreement is evidence that model.py is right, not
that it agrees with itself. Writes tests/golden/smollm2_135m.json: token ids
of a few chat prompts, and fp32 logits of one prompt at every position for a
fixed set of token ids, plus the top-10 at the last position.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import model as M  # noqa: E402  (only to find the embedded file)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate. Answer like one."},
     {"role": "user", "content": "How old is the Earth? Give a number like 4,540,000,000 years."},
     {"role": "assistant", "content": "Arr, about 4.54 billion years, matey!"},
     {"role": "user", "content": "  Café, naïve — 你好 😀\n\tdef f(x): return x**2  "}],
]


def main():
    path = M.default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with torch.no_grad():
        logits = hf(torch.tensor([ids[0]])).logits[0]
    probe_ids = list(range(0, 49152, 1031))               # 48 fixed vocabulary entries
    top = logits[-1].topk(10)
    golden = {
        "recorded_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                          "model": name},
        "conversations": CONVERSATIONS,
        "prompt_texts": prompts,
        "ids": ids,
        "probe_ids": probe_ids,
        "logits_at_probe_ids": logits[:, probe_ids].tolist(),   # (positions, 48) for conversation 0
        "last_top_ids": top.indices.tolist(),
        "last_top_logits": top.values.tolist(),
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_135m.json")
    with open(out, "w") as f:
        json.dump(golden, f)
    print(f"wrote {out}: {len(ids[0])} positions, ids of {len(ids)} prompts")


if __name__ == "__main__":
    main()
