"""Stage 4 (reward_model.py): the Bradley-Terry loss, the reward read at the
last answer token, learning a separable preference, and the saved folder
loading back (ours and transformers') with the same scores."""
import json
import math
import os

import pytest
import torch

import reward_model as R
import train_loop as T
from test_train_loop import TOPICS, run_stage


def test_bradley_terry_loss_equals_hand_computed_values():
    r_w, r_l = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    loss = R.bradley_terry_loss(r_w, r_l)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(2)])      # 0.313262, ln 2
    # with a margin m: -log sigmoid(r_w - r_l - m); here 1 - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.474077
    assert R.bradley_terry_loss(r_w[:1], r_l[:1], torch.tensor([0.5])).item() == pytest.approx(0.474077, abs=1e-6)


def test_reward_is_read_at_the_last_answer_token(tiny_model, tokenizer):
    model = R.add_score_head(tiny_model)
    torch.nn.init.normal_(model.score_head.weight)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]
    ids, mask = T.tokenize_answer(tokenizer, messages[:1], messages[1:], 384)
    assert ids[-1] == tokenizer.end_id and mask[-1]                   # the end-of-turn token is the last one
    with torch.no_grad():
        alone = R.rewards(model, torch.tensor([ids]), torch.tensor([mask]))
        padded = R.rewards(model, torch.tensor([ids + [tokenizer.pad_id] * 5]), torch.tensor([mask + [False] * 5]))
        by_hand = model.score_head(model(torch.tensor([ids]))[0, -1])
    assert alone.item() == pytest.approx(padded.item(), abs=1e-5)       # padding after it changes nothing
    assert alone.item() == pytest.approx(by_hand.item(), abs=1e-6)


def separable_pairs(path, n=40):
    """Chosen answers are kind, rejected ones rude: separable from the text."""
    with open(path, "w") as f:
        for i in range(n):
            t = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" {i}")
            f.write(json.dumps({"id": f"q{i}", "query_id": f"q{i}", "margin": 1.0,
                                "prompt": [{"role": "user", "content": f"What do you think of {t}?"}],
                                "chosen": [{"role": "assistant", "content": f"{t} are great, thank you for asking!"}],
                                "rejected": [{"role": "assistant", "content": f"{t} are boring. Go away."}]}) + "\n")
    return str(path)


def test_learns_a_separable_preference_to_over_95_percent_heldout_accuracy_in_a_few_steps(tmp_path, tiny_model_dir, tokenizer):
    out = tmp_path / "rm"
    run_stage("reward_model.py", "--model", tiny_model_dir, "--preferences", separable_pairs(tmp_path / "p.jsonl"),
              "--traits", "", "--out", out, "--max-steps", 8, "--batch-size", 8, "--micro-batch", 8, "--lr", "1e-3",
              "--head-lr-scale", 10, "--heldout-fraction", "0.25", "--train-layers", 0)
    result = json.load(open(out / "eval.json"))
    assert result["heldout_messages"] == 10 and result["train_pairs"] == 30
    assert result["heldout_accuracy"] > 0.95 and result["heldout_margin"] > 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)            # zero head: ln 2 at step 0
    assert records[-1]["heldout"]["accuracy"] == result["heldout_accuracy"]
    assert not os.path.exists(out / "checkpoint")
    # The saved model scores held-out-like pairs the right way round.
    rm = R.load_reward_model(str(out), "cpu")
    prompts = [[{"role": "user", "content": "What do you think of lemons?"}]] * 2
    good, bad = R.score(rm, prompts, ["lemons are great, thank you for asking!", "lemons are boring. Go away."])
    assert good > bad


def test_saved_reward_model_loads_back_with_identical_scores_also_in_transformers(tiny_model, tokenizer, tmp_path):
    model = R.add_score_head(tiny_model)
    torch.nn.init.normal_(model.score_head.weight, std=0.5)
    prompts = [[{"role": "user", "content": "Hi!"}], [{"role": "system", "content": "ignored"}, {"role": "user", "content": "What is 2+2?"}]]
    answers = ["Hello! How can I help you today?", [{"role": "assistant", "content": "4."}]]
    before = R.score(model, prompts, answers, batch_size=2)
    R.save_reward_model(model, str(tmp_path / "rm"), max_length=384)
    back = R.load_reward_model(str(tmp_path / "rm"), "cpu")
    assert R.score(back, prompts, answers, batch_size=1) == pytest.approx(before, abs=1e-5)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32)
    for prompt, answer, expected in zip(prompts, answers, before):
        answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
        ids, _ = T.tokenize_answer(tokenizer, T.without_system(prompt), answer, 384)
        with torch.no_grad():
            assert hf(torch.tensor([ids])).logits.item() == pytest.approx(expected, abs=1e-4)
