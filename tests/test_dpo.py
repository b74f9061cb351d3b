"""Stage 5 (dpo.py): the loss against hand-computed values, the masking and
padding of log-probabilities, the plain system prompt, a run end to end with
both exports (Hugging Face folder and GGUF) loading back with identical logits."""
import json
import math
import os

import pytest
import torch

import dpo
import model as M
import weights as W
import train_loop as T
from test_train_loop import run_stage, write_pairs


def test_dpo_loss_equals_hand_computed_values():
    # policy chosen -10, rejected -12; reference -11 for both; beta 0.1:
    # h = (-10 + 11) - (-12 + 11) = 2, loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    loss, r_chosen, r_rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert r_chosen.item() == pytest.approx(0.1) and r_rejected.item() == pytest.approx(-0.1)
    # conservative DPO, eps 0.2: 0.8 * log(1 + e^-0.2) + 0.2 * log(1 + e^0.2) = 0.478511 + 0.159627
    loss, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.638139, abs=1e-6)
    # IPO: (h - 1 / (2 beta))^2 = (2 - 5)^2 = 9
    loss, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(9.0)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    logp = torch.tensor([-3.0, -50.0, -7.5])
    loss, _, _ = dpo.dpo_loss(logp, logp - 1, logp, logp - 1, beta=0.5, label_smoothing=0.1)
    assert torch.allclose(loss, torch.full((3,), math.log(2)))


def examples_for(tokenizer, tmp_path, n=3, max_length=384):
    pairs = T.read_preferences(write_pairs(tmp_path / "p.jsonl", n_messages=n, pairs_per_message=1))
    examples, skipped = T.tokenize_pairs(pairs, tokenizer, max_length)
    assert skipped == 0
    return pairs, examples


def test_prompt_tokens_are_masked_out_and_only_answer_tokens_are_scored(tiny_model, tokenizer, tmp_path):
    pairs, examples = examples_for(tokenizer, tmp_path, n=1)
    ids, mask = examples[0]["chosen"]
    prompt_ids = tokenizer.chat(pairs[0]["prompt"], add_generation_prompt=True)[0]
    assert ids[:len(prompt_ids)] == prompt_ids and not any(mask[:len(prompt_ids)])     # prompt: never scored
    assert all(mask[len(prompt_ids):])                                                   # answer + <|im_end|>
    assert tokenizer.decode(ids[len(prompt_ids):]) == pairs[0]["chosen"][0]["content"]
    assert ids[-1] == tokenizer.end_id
    # The summed log-probability is exactly the sum over the answer positions of the full distribution.
    chosen, _, n_chosen, _ = dpo.answer_logprobs(tiny_model, examples, "cpu")
    with torch.no_grad():
        logits = tiny_model.logits(tiny_model(torch.tensor([ids])))[0]
    logp = torch.log_softmax(logits.float(), -1)
    by_hand = sum(logp[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids)))
    assert chosen.item() == pytest.approx(by_hand.item(), abs=1e-4)
    assert n_chosen.item() == len(ids) - len(prompt_ids)


def test_earlier_assistant_turns_of_a_multi_turn_prompt_are_not_scored(tokenizer):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "And now?"}]
    ids, mask = T.tokenize_answer(tokenizer, prompt, [{"role": "assistant", "content": "Now this."}], 384)
    scored = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(scored) == "Now this." and scored[-1] == tokenizer.end_id


def test_padding_does_not_change_log_probabilities(tiny_model, tokenizer, tmp_path):
    _, examples = examples_for(tokenizer, tmp_path, n=4)
    long = dict(examples[0], chosen=(examples[0]["chosen"][0] * 3, [False] * len(examples[0]["chosen"][0]) * 2 + examples[0]["chosen"][1]))
    with torch.no_grad():
        alone = [dpo.answer_logprobs(tiny_model, [e], "cpu") for e in examples]
        batched = dpo.answer_logprobs(tiny_model, [long] + examples, "cpu")     # padded to the long row
    for i, (c, r, _, _) in enumerate(alone):
        assert batched[0][i + 1].item() == pytest.approx(c.item(), abs=1e-4)
        assert batched[1][i + 1].item() == pytest.approx(r.item(), abs=1e-4)


def test_prompts_get_the_plain_default_system_prompt_never_the_traits(tokenizer, tmp_path):
    pairs = T.read_preferences(write_pairs(tmp_path / "p.jsonl", 1, 1, extra={
        "prompt": [{"role": "system", "content": "You are a pirate. Traits: ..."},
                   {"role": "user", "content": "Hello?"}]}))
    examples, _ = T.tokenize_pairs(pairs, tokenizer, 384)
    text = tokenizer.tok.decode(examples[0]["chosen"][0], skip_special_tokens=False)
    assert text.startswith(f"<|im_start|>system\n{tokenizer.default_system}<|im_end|>\n<|im_start|>user\nHello?")
    assert "pirate" not in text


def test_long_answers_are_cut_and_prompts_never(tokenizer, tmp_path):
    pairs = T.read_preferences(write_pairs(tmp_path / "p.jsonl", 1, 1))
    prompt_ids = tokenizer.chat(pairs[0]["prompt"], add_generation_prompt=True)[0]
    limit = len(prompt_ids) + 10
    (example,), skipped = T.tokenize_pairs(pairs, tokenizer, limit)
    ids, mask = example["chosen"]
    assert skipped == 0 and len(ids) == limit and ids[:len(prompt_ids)] == prompt_ids and sum(mask) == 10
    assert T.tokenize_pairs(pairs, tokenizer, len(prompt_ids) + 4)[1] == 1        # no room for an answer: skipped


def test_step0_loss_is_ln2_with_cached_reference(tiny_model, tokenizer, tmp_path):
    _, examples = examples_for(tokenizer, tmp_path, n=5)
    d = T.Dist()
    dpo.reference_logprobs(tiny_model, examples, d, torch.float32, 2, str(tmp_path / "ref.json"), "fp")
    args = dpo.parse_args(["--beta", "0.3", "--nll-weight", "0"])
    loss, m = dpo.make_loss_fn(args, "cpu")(tiny_model, examples)
    assert loss.item() / len(examples) == pytest.approx(math.log(2), abs=1e-5)
    with_nll, m = dpo.make_loss_fn(dpo.parse_args(["--beta", "0.3"]), "cpu")(tiny_model, examples)   # default NLL weight 0.1
    assert with_nll.item() == pytest.approx(loss.item() + 0.1 * m["nll_chosen"].item(), abs=1e-4)
    assert m["margin"].item() == pytest.approx(0.0, abs=1e-4)
    cached = json.load(open(tmp_path / "ref.json"))
    assert cached["fingerprint"] == "fp" and len(cached["chosen"]) == 5
    for e in examples:
        e.pop("ref_chosen")
    assert dpo.reference_logprobs(tiny_model, examples, d, torch.float32, 2, str(tmp_path / "ref.json"), "fp") is False
    assert all("ref_chosen" in e for e in examples)                         # read back from the cache


def test_dpo_run_learns_and_exports_hf_and_gguf_that_load_back_with_identical_logits(tmp_path, tiny_model_dir, tokenizer):
    prefs = write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "dpo"
    result = run_stage("dpo.py", "--model", tiny_model_dir, "--preferences", prefs, "--traits", "", "--out", out,
                       "--max-steps", 6, "--lr", "1e-3", "--heldout-fraction", "0.25", "--export-gguf")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in records if "heldout" not in r]
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)             # step 0: policy = reference
    assert steps[-1]["dpo_loss"] < 0.5 and steps[-1]["accuracy"] == 1.0 and steps[-1]["margin"] > 0
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward", "logp_chosen", "logp_rejected", "kl", "lr"):
        assert key in steps[-1]
    assert records[-1]["heldout"]["accuracy"] == 1.0                                # learned, not memorised
    summary = json.load(open(out / "training.json"))
    assert summary["pairs"] == {"train": 18, "heldout": 6, "skipped": 0}
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "model.gguf", "model.safetensors",
                                       "reference_logprobs.json", "tokenizer.json", "tokenizer_config.json", "training.json"]
    hf, gg, start = M.load_model(str(out), "cpu"), M.load_model(str(out / "model.gguf"), "cpu"), M.load_model(tiny_model_dir, "cpu")
    ids = torch.tensor([tokenizer.prompt("What do you think of cats?")])
    with torch.no_grad():
        a, b, c = (m.logits(m(ids)) for m in (hf, gg, start))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)                                                     # it did train
    assert "wrote" in result.stderr


def test_save_gguf_round_trip_exact_in_f32_and_close_in_f16(tiny_model, tmp_path, tokenizer):
    ids = torch.tensor([tokenizer.prompt("Tell me a story about 3 dragons.")])
    with torch.no_grad():
        reference = tiny_model.logits(tiny_model(ids))
        for dtype, tol in (("f32", 0.0), ("f16", 0.05)):
            path = str(tmp_path / f"m_{dtype}.gguf")
            W.save_gguf(tiny_model, path, dtype)
            back = M.load_model(path, "cpu")
            torch.testing.assert_close(back.logits(back(ids)), reference, rtol=0, atol=tol)
            assert back.tokenizer.chat([{"role": "user", "content": "Hi 42"}]) == tokenizer.chat([{"role": "user", "content": "Hi 42"}])
            assert back.tokenizer.chat_template == tokenizer.chat_template


def test_gguf_export_loads_in_transformers_with_identical_logits(tiny_model, tmp_path, tokenizer):
    """transformers' GGUF loader follows llama.cpp's conventions (metadata
    names, q/k permutation, tokenizer): a second, independent reader."""
    transformers = pytest.importorskip("transformers")
    W.save_gguf(tiny_model, str(tmp_path / "m.gguf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    ids = tokenizer.chat(messages, add_generation_prompt=True)[0]
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert list(theirs if isinstance(theirs, list) else theirs["input_ids"]) == ids
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, tiny_model.logits(tiny_model(torch.tensor([ids]))),
                                   rtol=1e-4, atol=1e-4)


def test_sft_is_the_mean_nll_of_the_chosen_answers_and_needs_no_reference(tiny_model, tokenizer, tmp_path):
    """--loss-type sft: loss = per-token NLL of the chosen answer, summed over pairs; the rejected answer
    and the reference play no part."""
    _, examples = examples_for(tokenizer, tmp_path, n=3)
    for e in examples:
        e["ref_chosen"] = e["ref_rejected"] = 0.0
    loss, m = dpo.make_loss_fn(dpo.parse_args(["--loss-type", "sft"]), "cpu")(tiny_model, examples)
    chosen, _, n_chosen, _ = dpo.answer_logprobs(tiny_model, examples, "cpu")
    assert loss.item() == pytest.approx((-chosen / n_chosen).sum().item(), rel=1e-5)
    assert m["dpo_loss"].item() == 0.0
