"""The specification of model.py: the network, the tokenizer and chat template,
generation, log-probabilities, loading and saving."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_tiny
import fast
import model as M
import weights as W

GOLDEN = json.load(open(os.path.join(ROOT, "tests", "golden", "smollm2_135m.json")))


# ---- the real model against golden values recorded from transformers ----------

def test_logits_equal_transformers_golden_values(real_model):
    """fp32 logits of a chat prompt equal those transformers computed on the same GGUF (1e-3)."""
    ids = torch.tensor([GOLDEN["ids"][0]])
    with torch.no_grad():
        logits = real_model.logits(real_model(ids))[0]
    expected = torch.tensor(GOLDEN["logits_at_probe_ids"])
    got = logits[:, GOLDEN["probe_ids"]]
    assert (got - expected).abs().max().item() < 1e-3
    assert logits[-1].topk(10).indices.tolist() == GOLDEN["last_top_ids"]
    assert torch.allclose(logits[-1].topk(10).values, torch.tensor(GOLDEN["last_top_logits"]), atol=1e-3)


def test_chat_prompt_token_ids_equal_golden_ids(tokenizer):
    """The chat template and tokenizer give the reference ids, special tokens and default system message included."""
    for conversation, expected in zip(GOLDEN["conversations"], GOLDEN["ids"]):
        assert tokenizer.chat(conversation, add_generation_prompt=True)[0] == expected
    # the plain prompt carries the model's own default system message
    assert tokenizer.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert tokenizer.decode(tokenizer.prompt("Hi")) == "system\n" + tokenizer.default_system + "\nuser\nHi\nassistant\n"


@pytest.mark.parametrize("text", [
    "Café naïve résumé, Ångström — déjà vu.",
    "Emoji: 😀👍🏽🇺🇸 and ❤️",
    "def f(x):\n\treturn x ** 2  # code, with  two spaces\n",
    "你好，世界！这是一个测试。",
    "Numbers 12345 and 3.14159, mixed: héllo 世界 🙂 <b>tags</b>",
])
def test_decode_of_encode_is_the_identity(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_answer_mask_covers_exactly_the_assistant_tokens_and_end_of_turn(tokenizer):
    conversation = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How are you?"},
                    {"role": "user", "content": "Fine."}, {"role": "assistant", "content": " Good, 42."}]
    ids, mask = tokenizer.chat(conversation)
    assert len(ids) == len(mask)
    answer_ids = [i for i, m in zip(ids, mask) if m]
    expected = (tokenizer.encode("Hello! How are you?") + [tokenizer.end_id]
                + tokenizer.encode(" Good, 42.") + [tokenizer.end_id])
    assert answer_ids == expected
    # and the masked-out part is exactly the prompt the model sees before each answer
    first_answer = mask.index(True)
    assert ids[:first_answer] == tokenizer.chat(conversation[:1], add_generation_prompt=True)[0]


def test_readme_example_answers_the_capital_of_france(real_model):
    answer = M.chat(real_model, "What is the capital of France?", temperature=0, max_new_tokens=20)
    assert "Paris" in answer


# ---- generation ----------------------------------------------------------------

def greedy_without_cache(model, prompt, n):
    """Reference decoding: recompute the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model.logits(model(torch.tensor([ids]))[:, -1])
            ids.append(int(logits.argmax(-1)))
    return ids[len(prompt):]


def test_cached_greedy_generation_equals_uncached_decoding(tiny_model, tokenizer):
    prompt = tokenizer.prompt("Tell me about the sea.")
    cached = M.generate(tiny_model, [prompt], max_new_tokens=24, temperature=0, stop_ids=[])[0]
    assert cached == greedy_without_cache(tiny_model, prompt, 24)


def test_cached_greedy_generation_equals_uncached_on_the_real_model(real_model, tokenizer):
    prompt = tokenizer.prompt("Name a colour.")
    cached = M.generate(real_model, [prompt], max_new_tokens=8, temperature=0, stop_ids=[])[0]
    assert cached == greedy_without_cache(real_model, prompt, 8)


def test_a_batch_of_mixed_lengths_gives_each_prompt_its_own_greedy_answer(tiny_model, tokenizer):
    prompts = [tokenizer.prompt(t) for t in ["Hi", "What is the capital of France? Please answer briefly.",
                                              "Why is the sky blue, and why are sunsets red instead?", "2+2?"]]
    batched = M.generate(tiny_model, prompts, max_new_tokens=16, temperature=0, stop_ids=[])
    alone = [M.generate(tiny_model, [p], max_new_tokens=16, temperature=0, stop_ids=[])[0] for p in prompts]
    assert batched == alone
    assert len({len(p) for p in prompts}) == len(prompts)     # the lengths really differ


def test_a_batch_larger_than_one_prompt_group_in_shuffled_length_order_matches_each_alone(tiny_model, tokenizer):
    # generate() runs the prompt pass in groups of 16 prompts sorted by length:
    # 22 prompts of shuffled lengths cross a group boundary and get reordered.
    # Two prompts repeat: their prompt pass runs once and is copied to both rows.
    texts = ["word " * n for n in (7, 1, 19, 3, 12, 0, 15, 5, 9, 2, 17, 4, 11, 6, 14, 8, 1, 13, 10, 16, 7, 18)]
    prompts = [tokenizer.prompt(t + "?") for t in texts]
    batched = M.generate(tiny_model, prompts, max_new_tokens=6, temperature=0, stop_ids=[])
    alone = [M.generate(tiny_model, [p], max_new_tokens=6, temperature=0, stop_ids=[])[0] for p in prompts]
    assert batched == alone


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(tiny_model, tokenizer):
    prompts = [tokenizer.prompt(t) for t in ["Hi", "Tell me a long story about the sea and its fish.", "2+2?"]]
    free = M.generate(tiny_model, prompts[:1], max_new_tokens=30, temperature=0, stop_ids=[])[0]
    stop = [free[2]]                                    # the first prompt's answer ends after 2 tokens
    alone = [M.generate(tiny_model, [p], max_new_tokens=30, temperature=0, stop_ids=stop)[0] for p in prompts]
    batched = M.generate(tiny_model, prompts, max_new_tokens=30, temperature=0, stop_ids=stop)
    assert batched == alone
    assert len(alone[0]) < 8 and max(len(a) for a in alone) > 8     # the batch did shrink mid-way


def test_generation_stops_at_end_of_turn_without_returning_it(tiny_model, tokenizer):
    prompt = tokenizer.prompt("Hello")
    free = M.generate(tiny_model, [prompt], max_new_tokens=12, temperature=0, stop_ids=[])[0]
    stop = free[5]
    stopped = M.generate(tiny_model, [prompt], max_new_tokens=12, temperature=0, stop_ids=[stop])[0]
    assert stopped == free[:free.index(stop)]


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny_model, tokenizer):
    prompts = [tokenizer.prompt("Write a word.")] * 3
    a = M.generate(tiny_model, prompts, max_new_tokens=10, temperature=1.0, seed=7, stop_ids=[])
    b = M.generate(tiny_model, prompts, max_new_tokens=10, temperature=1.0, seed=7, stop_ids=[])
    c = M.generate(tiny_model, prompts, max_new_tokens=10, temperature=1.0, seed=8, stop_ids=[])
    assert a == b and a != c
    assert len({tuple(x) for x in a}) > 1        # rows of one batch draw independently


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(M.sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}                       # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are cut
    draws = {int(M.sample_next(logits, 1.0, 1.0, g)) for _ in range(2000)}
    assert draws == {0, 1, 2, 3}
    counts = torch.bincount(M.sample_next(logits.expand(4000, 4), 1.0, 1.0, g), minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def count_repeats(prompt, tokens):
    seen, repeats = set(prompt), 0
    for t in tokens:
        repeats += t in seen
        seen.add(t)
    return repeats


def test_repetition_penalty_discourages_tokens_already_in_the_sequence(real_model, tokenizer):
    prompt = tokenizer.prompt("Repeat after me ten times: the cat sat on the mat.")
    plain = M.generate(real_model, [prompt], max_new_tokens=30, temperature=0, stop_ids=[])[0]
    mild = M.generate(real_model, [prompt], max_new_tokens=30, temperature=0, repetition_penalty=1.3, stop_ids=[])[0]
    huge = M.generate(real_model, [prompt], max_new_tokens=30, temperature=0, repetition_penalty=1e6, stop_ids=[])[0]
    assert count_repeats(prompt, plain) > 10                     # it parrots the prompt
    assert count_repeats(prompt, mild) < count_repeats(prompt, plain) / 2
    assert count_repeats(prompt, huge) == 0                      # no token of the sequence comes back


# ---- log-probabilities ------------------------------------------------------------

def test_answer_logprobs_equal_a_direct_computation_and_ignore_padding(tiny_model, tokenizer):
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in [("Hi", "Hello there, friend."), ("What is two plus two, exactly?", "Four.")]]
    seqs, masks = zip(*[tokenizer.chat(c) for c in conversations])
    sums, means = M.answer_logprobs(tiny_model, list(seqs), list(masks), batch_size=2)   # padded together
    for seq, mask, s, m in zip(seqs, masks, sums, means):
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model.logits(tiny_model(torch.tensor([seq])))[0], -1)
        direct = sum(float(logp[t - 1, seq[t]]) for t in range(1, len(seq)) if mask[t])
        assert s == pytest.approx(direct, abs=1e-4)
        assert m == pytest.approx(direct / sum(mask), abs=1e-5)


def test_answers_sharing_a_prompt_score_as_if_each_ran_alone(tiny_model, tokenizer):
    # Three answers to one prompt share one pass over it (split over two chunks
    # by batch_size=2), beside a prompt with a single answer.
    def chat(q, a):
        return tokenizer.chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    pairs = [("Tell me about cats.", "Cats purr."), ("Tell me about cats.", "They are small, soft and proud animals."),
             ("Hi", "Hello."), ("Tell me about cats.", "No.")]
    seqs, masks = zip(*[chat(q, a) for q, a in pairs])
    sums, means = M.answer_logprobs(tiny_model, list(seqs), list(masks), batch_size=2)
    for seq, mask, s, m in zip(seqs, masks, sums, means):
        alone_sum, alone_mean = M.answer_logprobs(tiny_model, [seq], [mask])
        assert s == pytest.approx(alone_sum[0], abs=1e-4) and m == pytest.approx(alone_mean[0], abs=1e-5)
    assert len({tuple(s[:list(m).index(1)]) for s, m in zip(seqs, masks)}) == 2      # really one shared prompt

def test_save_then_load_round_trips_bit_for_bit(tmp_path, tokenizer):
    for bias in (False, True):      # llama, and Qwen2-style q/k/v biases
        tiny = make_tiny(tokenizer, qkv_bias=bias, arch="qwen2" if bias else "llama")
        W.save_model(tiny, str(tmp_path / f"m{bias}"))
        back = M.load_model(str(tmp_path / f"m{bias}"), "cpu")
        a, b = tiny.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ids = torch.tensor([tokenizer.prompt("Hi")])
        with torch.no_grad():
            assert torch.equal(tiny.logits(tiny(ids)), back.logits(back(ids)))
        assert back.tokenizer.chat_template == tokenizer.chat_template


def test_transformers_loads_a_saved_folder_with_the_same_logits(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    for bias in (False, True):
        tiny = make_tiny(tokenizer, qkv_bias=bias, arch="qwen2" if bias else "llama", tie_embeddings=not bias)
        W.save_model(tiny, str(tmp_path / "m"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
        ids = torch.tensor([tokenizer.prompt("Hi, how are you today?")])
        with torch.no_grad():
            assert torch.allclose(hf(ids).logits, tiny.logits(tiny(ids)), atol=1e-4)


def test_gguf_query_key_permutation_is_undone_exactly():
    w = torch.randn(9 * 64, 576)
    assert torch.equal(W._unpermute(W._permute(w, 9), 9), w)
    assert not torch.equal(W._permute(w, 9), w)


def test_missing_path_not_a_model_and_unsupported_architecture_fail_clearly(tmp_path):
    with pytest.raises(M.ModelError, match="no model at"):
        M.load_model(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello, I am not a model")
    with pytest.raises(M.ModelError, match="is not a model"):
        M.load_model(str(junk))
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(M.ModelError, match="unsupported architecture 'gpt2'"):
        M.load_model(str(folder))


def test_the_command_line_reports_a_bad_model_in_one_line(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "--model", str(junk)],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and "is not a model" in run.stderr


def test_device_and_dtype_are_chosen_and_overridable():
    assert M.pick_device("cpu").type == "cpu"
    assert M.pick_dtype("cpu", "fp32") == torch.float32 and M.pick_dtype("cpu", "bf16") == torch.bfloat16
    for work in ("decoding", "scoring", "training"):
        measured = fast.cpu_bf16_speedup(work)
        assert measured > 0 and measured == fast.cpu_bf16_speedup(work)          # measured once per process
        assert M.pick_dtype("cpu", "auto", work) == (torch.bfloat16 if measured >= M.BF16_MIN_SPEEDUP else torch.float32)


@pytest.mark.parametrize("speedup, expected", [(2.5, torch.bfloat16), (1.0, torch.float32), (0.2, torch.float32)])
def test_auto_dtype_follows_the_measured_speed_not_a_cpu_flag(monkeypatch, capsys, speedup, expected):
    """AMX (bf16 ~2x faster) -> bf16; AVX-512-BF16 EPYC decoding (slower in bf16)
    and AVX2 (emulated) -> fp32, whatever the flags say; the choice and its
    reason are printed in one line."""
    monkeypatch.setattr(fast, "cpu_bf16_speedup", lambda work: speedup)
    monkeypatch.setattr(M, "_say_once", lambda line: print(line, file=sys.stderr))
    assert M.pick_dtype("cpu", "auto", "training") == expected
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and f"{speedup:.2f}x" in line and "training" in line
    assert line.startswith(f"--dtype auto: {'bf16' if expected == torch.bfloat16 else 'fp32'}")


def test_a_model_loaded_with_dtype_auto_gets_the_measured_choice(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(fast, "cpu_bf16_speedup", lambda work: {"decoding": 0.7, "scoring": 1.6}[work])
    assert M.load_model(tiny_model_dir, "cpu", "auto", "decoding").embed_tokens.weight.dtype == torch.float32
    assert M.load_model(tiny_model_dir, "cpu", "auto", "scoring").embed_tokens.weight.dtype == torch.bfloat16


def test_bf16_weights_give_nearly_the_same_next_token_distribution(tiny_model_dir, tokenizer):
    fp32 = M.load_model(tiny_model_dir, "cpu", torch.float32)
    bf16 = M.load_model(tiny_model_dir, "cpu", torch.bfloat16)
    ids = torch.tensor([tokenizer.prompt("Hello")])
    with torch.no_grad():
        p = torch.softmax(fp32.logits(fp32(ids))[0, -1], -1)
        q = torch.softmax(bf16.logits(bf16(ids))[0, -1].float(), -1)
    assert 0.5 * (p - q).abs().sum() < 0.1          # total variation distance


def test_the_network_keeps_the_files_names_and_shapes(tokenizer):
    """W_q, W_k, W_v, W_g and W_u are separate matrices in the network, named as
    in a Hugging Face file: nothing is stacked or split on load or save."""
    model = make_tiny(tokenizer, qkv_bias=True)
    names = set(model.state_dict())
    assert {"layers.0.self_attn.q_proj.bias", "layers.0.self_attn.v_proj.weight", "layers.1.mlp.up_proj.weight",
            "layers.1.mlp.gate_proj.weight"} <= names
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in names)
    assert model.state_dict()["layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)   # 2 key/value heads of 16


@pytest.mark.parametrize("rows", [1, 5, 64, 65])
def test_the_stacked_products_of_a_decoding_step_equal_the_separate_ones(tokenizer, rows):
    """fast.stacked_linear (W_q, W_k, W_v stacked and packed; W_g, W_u) gives the
    three (two) separate products, biases included, from one row to past the
    64 of a decoding step. Only where this CPU's oneDNN packs fp32 (it does on
    all three of the project's CPU kinds)."""
    if not fast.cpu_can_pack(torch.float32):
        pytest.skip("this CPU's oneDNN does not pack fp32 weights")
    model = make_tiny(tokenizer, qkv_bias=True)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    x = torch.randn(rows, 1, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    for linears in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
        with torch.no_grad():
            got = fast.stacked_linear(x, fast.stack_and_pack(linears))
            expected = [m(x) for m in linears]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_stacked_matrices_are_made_for_generate_and_dropped_after(tiny_model):
    """packed_for_decoding stacks W_q, W_k, W_v and W_g, W_u where it packs, and
    leaves nothing behind: training and scoring never see a stale copy."""
    attn, mlp = tiny_model.layers[0].self_attn, tiny_model.layers[0].mlp
    with fast.packed_for_decoding(tiny_model, 16):
        assert (attn.stacked_qkv is not None) == (mlp.stacked_gate_up is not None) == fast.cpu_can_pack(torch.float32)
    for layer in tiny_model.layers:                                       # every copy, in every block
        assert layer.self_attn.stacked_qkv is None and layer.self_attn.o_proj.packed is None
        assert layer.mlp.stacked_gate_up is None and layer.mlp.down_proj.packed is None
    assert tiny_model.packed_output is None


@pytest.mark.parametrize("can_pack", [True, False], ids=["packed-if-this-cpu-can", "fallback-forced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64, 65])
def test_the_decoding_shortcuts_of_linear_equal_nn_linear(monkeypatch, rows, dtype, can_pack):
    """fp32: the product by weights packed for oneDNN where this CPU packs them;
    bf16: (W x^T)^T. With packing refused (the probe patched, as on a CPU
    without it) every path falls back to a plain product, compared the same way
    on every machine. All against the exact fp32 product of the same (rounded)
    inputs. Without a bias, bf16 may be off by one rounding (0.4%), not more;
    with one, the bias is added after that rounding, so near-cancelling sums get 2e-2."""
    if not can_pack:
        monkeypatch.setattr(fast, "cpu_can_pack", lambda dtype: False)
    torch.manual_seed(0)
    x, w, b = (t.to(dtype) for t in (torch.randn(rows, 1, 96), torch.randn(80, 96) / 10, torch.randn(80)))
    packed = fast.pack_weight(w)
    assert (packed is not None) == (can_pack and fast.cpu_can_pack(dtype))
    for bias, tol in [(None, 4e-3), (b, 2e-2)]:
        expected = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        got = fast.linear(x, w, bias, packed=packed)
        assert got.shape == expected.shape and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else tol
        torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_the_pack_probe_asks_the_running_cpu(monkeypatch):
    """cpu_can_pack tries oneDNN on a tiny matrix; a refusal (as on AVX2 for bf16) is a False, not a crash."""
    def refuse(*a, **k):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")
    fast.cpu_can_pack.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    try:
        assert fast.cpu_can_pack(torch.float32) is False and fast.pack_weight(torch.ones(4, 4)) is None
    finally:
        fast.cpu_can_pack.cache_clear()


@pytest.mark.parametrize("batch", [1, 2])
def test_generation_with_packing_refused_equals_generation_with_it(monkeypatch, tiny_model, tokenizer, batch):
    """packed_for_decoding packs where the CPU can, and
    falls back to the plain product where it cannot: the same tokens either way."""
    prompts = [tokenizer.prompt("Hello"), tokenizer.prompt("What is two plus two?")][:batch]
    packed = M.generate(tiny_model, prompts, max_new_tokens=8, temperature=0)
    monkeypatch.setattr(fast, "cpu_can_pack", lambda dtype: False)
    plain = M.generate(tiny_model, prompts, max_new_tokens=8, temperature=0)
    assert packed == plain


def test_packing_is_a_rule_that_takes_no_timing(monkeypatch, tiny_model):
    """Generation packs wherever oneDNN can, at any batch up to 64, never by a
    timing: a timing flips under load, and the packed and plain products round
    differently, so the same seed could give different answers."""
    import time
    monkeypatch.setattr(time, "perf_counter", lambda: (_ for _ in ()).throw(AssertionError("timed")))
    for batch in (1, 16, 64):
        with fast.packed_for_decoding(tiny_model, batch):
            expected = fast.cpu_can_pack(torch.float32) and not (batch == 1 and fast.cpu_has_amx())
            assert (tiny_model.layers[0].mlp.down_proj.packed is not None) == expected
    with fast.packed_for_decoding(tiny_model, 65):
        assert tiny_model.layers[0].mlp.down_proj.packed is None         # past 64 rows: the plain product


def test_packing_is_refused_where_the_cpu_cannot_and_dropped_after_the_call(monkeypatch, tiny_model):
    can_pack = fast.cpu_can_pack(torch.float32)                                      # this CPU's answer
    for refused in (False, True):
        monkeypatch.setattr(fast, "cpu_can_pack", lambda dtype, _r=refused: can_pack and not _r)
        with fast.packed_for_decoding(tiny_model, 16):
            assert (tiny_model.layers[0].mlp.down_proj.packed is not None) == (can_pack and not refused)
        assert tiny_model.layers[0].mlp.down_proj.packed is None                   # dropped after the call


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
def test_the_decoding_shortcuts_follow_the_cpu_rule(monkeypatch, tiny_model, amx):
    """With AMX (the probe patched, so both branches run on every machine) bf16
    attention takes the fused kernel and one fp32 row is not packed; without
    it bf16 attention takes the two products. fp32 attention takes them from
    8 sequences either way, and prompts (more than one query row) never."""
    monkeypatch.setattr(fast, "cpu_has_amx", lambda: amx)
    mask = torch.zeros(16, 1, 1, 5)
    step = lambda batch, dtype, rows=1: fast.one_token_attention_wins(torch.zeros(batch, 9, rows, 64, dtype=dtype), mask[:batch])
    assert step(1, torch.bfloat16) == step(16, torch.bfloat16) == (not amx)
    assert step(16, torch.float32) and not step(4, torch.float32) and not step(16, torch.bfloat16, rows=3)
    can_pack = fast.cpu_can_pack(torch.float32)
    for batch, expected in [(1, can_pack and not amx), (16, can_pack)]:
        with fast.packed_for_decoding(tiny_model, batch):
            assert (tiny_model.layers[0].mlp.down_proj.packed is not None) == expected


@pytest.mark.parametrize("cpuinfo, has_amx", [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n", False),  # AMD EPYC Zen 4
    ("processor\t: 0\nflags\t\t: fpu sse avx2\n", False),  # AVX2 only
    (None, False),  # no /proc/cpuinfo (macOS, Windows): False, not a crash
])
def test_the_amx_probe_reads_the_cpu_flags(monkeypatch, cpuinfo, has_amx):
    """cpu_has_amx is True exactly when /proc/cpuinfo's flags list amx_bf16."""
    import builtins
    import io

    def fake_open(*args, **kwargs):
        if cpuinfo is None:
            raise OSError("no /proc/cpuinfo")
        return io.StringIO(cpuinfo)
    fast.cpu_has_amx.cache_clear()
    monkeypatch.setattr(builtins, "open", fake_open)
    try:
        assert fast.cpu_has_amx() is has_amx
    finally:
        monkeypatch.undo()
        fast.cpu_has_amx.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_attention_equals_scaled_dot_product_attention(dtype):
    """The decoding step's attention by two batched products (query heads of a
    group stacked as rows) gives what SDPA gives, masked key positions included."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 9, 1, 64, generator=g).to(dtype)
    k, v = (torch.randn(5, 3, 40, 64, generator=g).to(dtype) for _ in range(2))
    allowed = torch.rand(5, 1, 1, 40, generator=g) > 0.3
    allowed[..., -1] = True                                      # the new token always sees itself
    mask = M.additive_mask(allowed, dtype)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(),
                                                                enable_gqa=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.one_token_attention(q, k, v, mask).float(), expected, rtol=tol, atol=tol)


def test_greedy_generation_is_the_same_with_the_fused_attention_kernel(monkeypatch, tiny_model, tokenizer):
    """A CPU decoding step of 8+ sequences takes its attention as two products
    (one_token_attention); with scaled_dot_product_attention in its place the
    answers are the same."""
    prompts = [tokenizer.prompt(t) for t in ["Hello", "What is two plus two?", "Why?", "Name a colour.",
                                             "Tell me about the sea.", "Hi there, how are you today?", "Count to 3.", "Ok"]]
    by_products = M.generate(tiny_model, prompts, max_new_tokens=8, temperature=0)
    calls = []

    def fused(q, k, v, mask):
        calls.append(1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    monkeypatch.setattr(fast, "one_token_attention", fused)
    assert M.generate(tiny_model, prompts, max_new_tokens=8, temperature=0) == by_products
    assert calls                                                          # the decoding steps did go through it


# ---- fast.py: every shortcut gives what model.py's plain path gives ---------------

def plain_and_fast(monkeypatch, run):
    """run() with fast.py's shortcuts on (the default), then with them off."""
    with_fast = run()
    monkeypatch.setattr(fast, "ENABLED", False)
    return run(), with_fast


def test_fast_generation_gives_the_plain_generations_greedy_tokens(monkeypatch, tiny_model, tokenizer):
    """The shared prompt pass (repeated prompts run once, groups of similar
    length), packed weights and the two-product attention change no greedy
    token in a batch of 20 that crosses a prompt group. (They round in other
    last bits, so a sampled token of this random model's flat distributions
    can differ, about one in a few hundred: the next test bounds the
    difference itself.)"""
    texts = ["word " * n for n in (7, 1, 19, 3, 12, 0, 15, 5, 9, 2, 17, 4, 11, 6, 14, 8, 1, 13, 7, 16)]
    prompts = [tokenizer.prompt(t + "?") for t in texts]
    plain, quick = plain_and_fast(monkeypatch, lambda: M.generate(tiny_model, prompts, max_new_tokens=12,
                                                                  temperature=0, stop_ids=[]))
    assert quick == plain


def test_the_shared_prompt_pass_leaves_the_plain_passs_cache_and_states(tiny_model, tokenizer):
    """Keys and values at every real prompt position, and each prompt's last
    hidden state, equal the plain pass's to rounding (padding slots may differ:
    they are masked)."""
    prompts = [tokenizer.prompt("word " * n + "?") for n in (7, 1, 19, 3, 12, 0, 15, 5, 9, 2, 17, 4, 11, 6, 14, 8, 1, 13, 7, 16)]
    T = max(len(p) for p in prompts)
    caches = [tiny_model.new_cache(len(prompts), T) for _ in range(2)]
    with torch.inference_mode():
        quick = fast.shared_prompt_pass(tiny_model, prompts, caches[0], M.prompt_pass)
        plain = M.prompt_pass(tiny_model, prompts, caches[1])
    torch.testing.assert_close(quick, plain, rtol=1e-4, atol=1e-4)
    real = torch.tensor([[t >= T - len(p) for t in range(T)] for p in prompts])
    for (k1, v1), (k2, v2) in zip(*caches):
        torch.testing.assert_close(k1.transpose(1, 2)[real], k2.transpose(1, 2)[real], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v1.transpose(1, 2)[real], v2.transpose(1, 2)[real], rtol=1e-4, atol=1e-4)


def test_fast_generation_gives_the_plain_generations_tokens_on_the_real_model(monkeypatch, real_model, tokenizer):
    prompts = [tokenizer.prompt(t) for t in ["Name a colour.", "Name a colour.", "What is the capital of France?"]]
    plain, quick = plain_and_fast(monkeypatch, lambda: M.generate(real_model, prompts, max_new_tokens=10, temperature=0))
    assert quick == plain and quick[0] == quick[1]


def test_the_plain_path_takes_no_shortcut(monkeypatch, tiny_model, tokenizer):
    """With fast.ENABLED off nothing is packed, the fused attention kernel is
    used, and prompts are not shared: the plain path really is plain."""
    monkeypatch.setattr(fast, "ENABLED", False)
    for name in ("pack_weight", "one_token_attention", "shared_prompt_pass", "linear", "logprobs_after_prefix"):
        monkeypatch.setattr(fast, name, lambda *a, _n=name, **k: pytest.fail(f"fast.{_n} called"))
    prompts = [tokenizer.prompt("Hi")] * 9                       # 9 rows: two-product attention's batch size
    M.generate(tiny_model, prompts, max_new_tokens=4, temperature=0)
    seqs, masks = zip(*[tokenizer.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a}])
                        for a in ("Hello.", "Hi there.")])
    M.answer_logprobs(tiny_model, list(seqs), list(masks))


def test_answers_scored_after_a_shared_prompt_equal_the_plain_scores(monkeypatch, tiny_model, tokenizer):
    pairs = [("Tell me about cats.", "Cats purr."), ("Tell me about cats.", "They are small, soft and proud animals."),
             ("Hi", "Hello."), ("Tell me about cats.", "No."), ("Hi", "Good day to you.")]
    seqs, masks = zip(*[tokenizer.chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                        for q, a in pairs])
    assert any(p is not None for p, _ in fast.shared_prefix_batches(seqs, masks, 2))    # the shortcut is taken
    (plain_sums, plain_means), (sums, means) = plain_and_fast(
        monkeypatch, lambda: M.answer_logprobs(tiny_model, list(seqs), list(masks), batch_size=2))
    assert sums == pytest.approx(plain_sums, abs=1e-4) and means == pytest.approx(plain_means, abs=1e-5)


def test_textbook_rope_rotates_each_pair_by_its_angle(tokenizer):
    """apply_rope turns each pair (x_i, x_{i+d/2}) as the complex number
    x_i + i x_{i+d/2} multiplied by e^{i a}: lengths kept, angle a added."""
    cfg = make_tiny(tokenizer).cfg
    cos, sin = M.rope_tables(cfg)
    x = torch.randn(cfg.head_dim, generator=torch.Generator().manual_seed(0))
    half = cfg.head_dim // 2
    for position in (0, 1, 37):
        angle = position * cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        z = torch.complex(x[:half], x[half:]) * torch.polar(torch.ones(half), angle)
        got = M.apply_rope(x, cos[position], sin[position])
        torch.testing.assert_close(got, torch.cat([z.real, z.imag]), rtol=1e-5, atol=1e-5)
