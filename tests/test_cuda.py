"""The GPU path: the same properties as on the CPU, checked on CUDA.

Skipped where there is no CUDA device (CI has none). They run on a GPU
machine with `python -m pytest -q tests/test_cuda.py`; the stage scripts pick
CUDA and bf16 by themselves there (`--device auto`, `--dtype auto`)."""
import json
import math
import os

import pytest
import torch

from conftest import ROOT, make_tiny
from test_dpo import examples_for
from test_train_loop import run_stage, write_pairs
import dpo
import model as M
import train_loop as T

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GOLDEN = json.load(open(os.path.join(ROOT, "tests", "golden", "smollm2_135m.json")))
CUDA = torch.device("cuda")


def test_auto_picks_cuda_and_bf16_on_a_gpu_that_has_it():
    assert M.pick_device("auto").type == "cuda"
    for work in ("decoding", "scoring", "training"):
        assert M.pick_dtype(CUDA, "auto", work, quiet=True) == (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


@pytest.mark.real
def test_real_model_on_the_gpu_gives_the_golden_logits_in_fp32_and_the_same_top_token_in_bf16():
    ids = torch.tensor([GOLDEN["ids"][0]], device=CUDA)
    expected = torch.tensor(GOLDEN["logits_at_probe_ids"])
    fp32 = M.load_model(None, CUDA, torch.float32)
    with torch.no_grad():
        logits = fp32.logits(fp32(ids))[0].float().cpu()
    assert (logits[:, GOLDEN["probe_ids"]] - expected).abs().max().item() < 2e-3
    assert logits[-1].topk(10).indices.tolist() == GOLDEN["last_top_ids"]
    bf16 = M.load_model(None, CUDA, torch.bfloat16)
    with torch.no_grad():
        low = bf16.logits(bf16(ids))[0].float().cpu()
    assert low[-1].argmax().item() == GOLDEN["last_top_ids"][0]
    kl = torch.nn.functional.kl_div(low[-1].log_softmax(-1), logits[-1].log_softmax(-1), log_target=True, reduction="sum")
    assert kl.item() < 0.05


def test_cached_greedy_generation_equals_uncached_on_the_gpu(tokenizer):
    model = make_tiny(tokenizer).to(CUDA)
    prompt = tokenizer.prompt("Tell me about the sea.")
    cached = M.generate(model, [prompt], max_new_tokens=24, temperature=0, stop_ids=[])[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model.logits(model(torch.tensor([ids], device=CUDA))[:, -1]).argmax(-1)))
    assert cached == ids[len(prompt):]


def test_a_gpu_batch_of_mixed_lengths_gives_each_prompt_its_own_greedy_answer(tokenizer):
    model = make_tiny(tokenizer).to(CUDA)
    prompts = [tokenizer.prompt(t) for t in ["Hi", "What is the capital of France? Please answer briefly.", "Why?"]]
    together = M.generate(model, prompts, max_new_tokens=16, temperature=0, stop_ids=[])
    alone = [M.generate(model, [p], max_new_tokens=16, temperature=0, stop_ids=[])[0] for p in prompts]
    assert together == alone


def test_gpu_sampling_is_reproducible_with_a_seed(tokenizer):
    model = make_tiny(tokenizer).to(CUDA)
    prompts = [tokenizer.prompt("Tell me a story.")] * 4
    a = M.generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=3, stop_ids=[])
    b = M.generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=3, stop_ids=[])
    assert a == b and len({tuple(x) for x in a}) > 1


def test_dpo_step0_loss_is_ln2_on_the_gpu(tokenizer, tmp_path):
    model = make_tiny(tokenizer).to(CUDA)
    _, examples = examples_for(tokenizer, tmp_path, n=5)
    d = T.Dist(device=CUDA)
    dpo.reference_logprobs(model, examples, d, torch.float32, 2, str(tmp_path / "ref.json"), "fp")
    args = dpo.parse_args(["--beta", "0.3", "--nll-weight", "0"])
    loss, m = dpo.make_loss_fn(args, CUDA)(model, examples)
    assert loss.item() / len(examples) == pytest.approx(math.log(2), abs=1e-5)
    assert m["margin"].item() == pytest.approx(0.0, abs=1e-4)


def test_dpo_on_the_gpu_in_bf16_learns_and_saves_a_model_the_cpu_loads(tmp_path, tiny_model_dir, tokenizer):
    prefs = write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "dpo"
    result = run_stage("dpo.py", "--model", tiny_model_dir, "--preferences", prefs, "--traits", "", "--out", out,
                       "--max-steps", 6, "--lr", "1e-3", "--heldout-fraction", "0.25")
    assert "--dtype auto: bf16 for training" in result.stderr        # what --dtype auto picks on a GPU with bf16
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in steps if "heldout" not in r]
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=2e-3)   # bf16 autocast: close to ln 2
    assert steps[-1]["dpo_loss"] < steps[0]["dpo_loss"] and steps[-1]["margin"] > 0
    trained, start = M.load_model(str(out), "cpu"), M.load_model(tiny_model_dir, "cpu")
    ids = torch.tensor([tokenizer.prompt("What do you think of cats?")])
    with torch.no_grad():
        assert not torch.equal(trained.logits(trained(ids)), start.logits(start(ids)))
