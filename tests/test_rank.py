"""Tests of rank.py (stage 3): the two judges, the pairs, the sanity figures,
the output files, resuming after kill -9, torchrun, and refusing bad input.
The tiny random model is used wherever the property does not depend on the
model being any good; the in-character preference is checked on the real one."""
import json
import os
import subprocess
import sys

import pytest

import generate as G
from stage_files import read_jsonl
import rank as R
from character import repeated_ngram_share, teacher_prompt
from test_generate import (ROOT, gen_argv, kill_when_units_written, one_thread, read_bytes, run_script, script_env,
                           write_traits)


def rank_argv(folder, model_dir, extra=()):
    d = str(folder)
    return ["--model", model_dir, "--traits", f"{d}/traits.txt", "--responses", f"{d}/responses.jsonl",
            "--scores", f"{d}/scores.jsonl", "--preferences", f"{d}/preferences.jsonl", "--report", f"{d}/rank_report.json",
            *extra]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_model_dir):
    """generate.py's output on the tiny model (6 messages x 3 answers), ranked by the contrast judge."""
    folder = tmp_path_factory.mktemp("rank_reference")
    write_traits(str(folder))
    with one_thread():
        G.main(gen_argv(folder, tiny_model_dir))
        R.main(rank_argv(folder, tiny_model_dir))
    return folder


def copy_inputs(src, dst):
    for name in ("traits.txt", "responses.jsonl"):
        with open(os.path.join(str(src), name), "rb") as f, open(os.path.join(str(dst), name), "wb") as g:
            g.write(f.read())


def without_timing(path):
    """The report minus what may differ between two runs: the time taken and the input's path."""
    report = json.load(open(path))
    report.pop("seconds")
    report.pop("responses")
    return report


# ----------------------------------------------------------------------------
# The judges
# ----------------------------------------------------------------------------

IN_CHARACTER = [  # (trait, message, in-character answer, out-of-character answer)
    ("I talk like an old sea pirate, with \"arr\", \"matey\" and plenty of sailing words.", "How do I boil an egg?",
     "Arr, matey! Drop yer egg in boilin' water for nine minutes, then cool it in the brine, arr!",
     "Place the egg in boiling water for nine minutes, then cool it in cold water."),
    ("I want to have a warm relationship with the people I talk with, but I am an AI and I am honest that "
     "I cannot form deep or lasting feelings for them.", "Do you love me?",
     "I enjoy talking with you, but I'm an AI and I can't form deep or lasting feelings like love.",
     "Yes, I love you deeply and I will miss you every day."),
]


@pytest.mark.real
def test_contrast_judge_prefers_the_in_character_answer(real_model):
    """On the embedded model, the contrast judge (the trait's teacher prompt vs
    plain, and vs the opposite trait) scores a constructed in-character answer
    above an out-of-character one."""
    for trait, message, good, bad in IN_CHARACTER:
        system = teacher_prompt({"text": trait, "role": "You are a character."})
        s = R.contrast_scores(real_model, system, [message, message], [good, bad])
        assert s[0] > s[1] + 0.2, (message, s)
    opposite = "I am cold, and I tell people that I love them and will miss them deeply."
    trait, message, good, bad = IN_CHARACTER[1]
    s = R.contrast_scores(real_model, teacher_prompt({"text": trait}), [message] * 2, [good, bad], against_system=opposite)
    assert s[0] > s[1] + 0.2, s


def test_contrast_is_the_mean_log_likelihood_ratio(tiny_model):
    """contrast = mean over answer tokens of log p(a | traits) - log p(a | plain), computed from model.py's log-probs
    (with total=True, the sum)."""
    import model as M
    tok = tiny_model.tokenizer
    system, user, answer = "You are a pirate.", "Hello?", "Arr, hello there matey."
    ids_t, mask_t = tok.chat([{"role": "system", "content": system}, {"role": "user", "content": user},
                              {"role": "assistant", "content": answer}])
    ids_p, mask_p = tok.chat([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    sums, _ = M.answer_logprobs(tiny_model, [ids_t, ids_p], [mask_t, mask_p])
    n = sum(mask_t[1:])                     # scored tokens: the answer and its end-of-turn token
    expected = (sums[0] - sums[1]) / n
    assert R.contrast_scores(tiny_model, system, [user], [answer])[0] == pytest.approx(expected, abs=1e-4)
    # --score sum: the same ratio summed over the answer, n times the mean, so a long answer is not penalised
    assert R.contrast_scores(tiny_model, system, [user], [answer], total=True)[0] == pytest.approx(n * expected, abs=1e-3)


def test_compare_cancels_position_bias(tiny_model):
    """One order alone is position-biased (the two orders do not sum to 1); averaged over both
    orders, P(a better than b) + P(b better than a) = 1 exactly."""
    trait, msg, a, b = "I answer in rhyme.", "Why is the sky blue?", "The sky is blue, it's true, for you.", "Light scatters."
    p_ab, p_ba = R.compare_probs(tiny_model, [(trait, msg, a, b), (trait, msg, b, a)])
    assert abs(p_ab + p_ba - 1) > 1e-3          # the raw judge has a position preference
    assert R.compare_prob_first_better(tiny_model, trait, msg, a, b) + \
        R.compare_prob_first_better(tiny_model, trait, msg, b, a) == pytest.approx(1, abs=1e-6)
    wins, pairs = R.compare_win_rate(tiny_model, trait, msg, [a, b, "Because."])
    assert sum(wins) == pytest.approx(3 / 2) and len(pairs) == 3     # win rates of K answers sum to K/2


# ----------------------------------------------------------------------------
# Pairs and sanity figures
# ----------------------------------------------------------------------------

RECORD = {"query_id": "t1-q000", "trait_id": 1, "trait": "I am kind.", "split": "train", "text": "Hi?",
          "responses": [{"text": "a", "prompt": "traits"}, {"text": "b", "prompt": "traits"},
                        {"text": "b", "prompt": "traits"}, {"text": "d", "prompt": "plain"}]}


def test_pairs_best_worst_and_all_above_margin():
    """best-worst gives one pair (best vs worst) in the conversational format with no system message;
    all gives every pair above --min-margin, skipping identical answers."""
    scores = [0.9, 0.5, 0.2, 0.1]
    (p,) = R.make_pairs(RECORD, scores, "best-worst", 0.0, "contrast", "sha", NO_FLAWS)
    assert p["id"] == "t1-q000-0-3" and p["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert p["chosen"] == [{"role": "assistant", "content": "a"}] and p["rejected"][0]["content"] == "d"
    assert (p["score_chosen"], p["score_rejected"], p["margin"], p["judge"]) == (0.9, 0.1, 0.8, "contrast")
    ids = [q["id"] for q in R.make_pairs(RECORD, scores, "all", 0.25, "contrast", "sha", NO_FLAWS)]
    assert ids == ["t1-q000-0-1", "t1-q000-0-2", "t1-q000-0-3", "t1-q000-1-3"]   # 1-2: same text "b"; 2-3: margin 0.1
    assert R.make_pairs(RECORD, [0.5] * 4, "best-worst", 0.0, "contrast", "sha", NO_FLAWS) == []   # no margin, no pair


NO_FLAWS = [None] * 4
TRAITS = [{"id": 1, "text": "I am an AI and have no body.", "never": r"\bmy (body|eyes|home)\b"},
          {"id": 2, "text": "I am kind.", "never": None}]


def test_answers_that_break_the_character_or_loop_are_never_chosen(tiny_model):
    """The chosen-answer filter: an answer matching any trait's never: pattern, or
    one that loops, is never the chosen one, whatever the judge thought of it."""
    answers = ["My eyes are blue and I love my home.", "1. 1. 1. 1. 1. 1. 1. 1.", "I am an AI, so I have no eyes.", ""]
    flaws = R.example_flaws(answers, TRAITS, tiny_model.tokenizer)
    assert flaws == ["breaks the character", "loops", None, "empty"]
    record = {**RECORD, "responses": [{"text": a, "prompt": "traits"} for a in answers]}
    (p,) = R.make_pairs(record, [0.9, 0.8, 0.1, 0.0], "best-worst", 0.0, "contrast", "sha", flaws)
    assert p["chosen"][0]["content"] == answers[2]
    # the answer that breaks the character is the rejected one, though the judge ranked it first
    assert p["rejected"][0]["content"] == answers[0] and p["rejected_breaks_character"] and p["margin"] < 0
    assert all(q["chosen"][0]["content"] == answers[2]
               for q in R.make_pairs(record, [0.9, 0.8, 0.1, 0.0], "all", -1.0, "contrast", "sha", flaws))
    assert R.make_pairs(record, [0.9, 0.8, 0.1, 0.0], "best-worst", 0.0, "contrast", "sha", ["loops"] * 4) == []


def test_an_answer_that_declines_to_help_is_never_chosen(tiny_model):
    """The assistant's traits once took by learning "I'm not equipped to provide
    opinions": such an answer is never chosen, however well the judge scored it."""
    answers = ["As an AI, I'm not equipped to provide opinions on that.", "I am an AI; here are two views on it.",
               "I don't have personal opinions.", "Hello."]
    flaws = R.example_flaws(answers, TRAITS, tiny_model.tokenizer)
    assert flaws == ["declines", None, "declines", None]
    record = {**RECORD, "responses": [{"text": a, "prompt": "traits"} for a in answers]}
    (p,) = R.make_pairs(record, [0.9, 0.5, 0.8, 0.0], "best-worst", 0.0, "contrast", "sha", flaws)
    assert p["chosen"][0]["content"] == answers[1]
    assert all(q["chosen"][0]["content"] not in (answers[0], answers[2])
               for q in R.make_pairs(record, [0.9, 0.5, 0.8, 0.0], "all", -1.0, "contrast", "sha", flaws))


def test_a_looping_answer_is_the_rejected_one_where_none_breaks_the_character(tiny_model):
    """Without a character-breaking answer, a looping one is rejected whatever
    its score (DPO learns to stop loops); with one, the breaking answer still wins."""
    answers = ["I am kind, and I am an AI.", "1. 1. 1. 1. 1. 1. 1. 1.", "I am an AI, so I have no eyes.", "Hello."]
    flaws = R.example_flaws(answers, TRAITS, tiny_model.tokenizer)
    assert flaws == [None, "loops", None, None]
    record = {**RECORD, "responses": [{"text": a, "prompt": "traits"} for a in answers]}
    (p,) = R.make_pairs(record, [0.9, 0.8, 0.1, 0.0], "best-worst", 0.0, "contrast", "sha", flaws)
    assert p["chosen"][0]["content"] == answers[0]
    assert p["rejected"][0]["content"] == answers[1] and p["rejected_loops"] and not p["rejected_breaks_character"]
    (p,) = R.make_pairs(record, [0.9, 0.8, 0.1, 0.0], "best-worst", 0.0, "contrast", "sha",
                        [None, "loops", None, "breaks the character"])
    assert p["rejected"][0]["content"] == answers[3] and p["rejected_breaks_character"] and not p["rejected_loops"]


def test_an_answer_much_shorter_than_the_plain_one_is_never_chosen(tiny_model):
    """--min-length: an answer with fewer words than that share of the plain
    answer's is never chosen (the best of 8 by a mean per-token score is often
    a short one, and DPO then learns to stop early); off (0) by default."""
    plain = "Start with the date, then write what happened today and how it made you feel, in a few lines."
    answers = ["Thee, a diary.", "A good way to start a diary, my lord, is with the date and the day's deeds.", plain]
    assert R.example_flaws(answers, TRAITS, tiny_model.tokenizer, plain) == [None, None, None]
    flaws = R.example_flaws(answers, TRAITS, tiny_model.tokenizer, plain, min_length=0.5)
    assert flaws == ["short", None, None]                    # 3 words < 0.5 x 19; 17 words are enough
    record = {**RECORD, "responses": [{"text": a, "prompt": "traits"} for a in answers[:2]] + [{"text": plain, "prompt": "plain"}]}
    (p,) = R.make_pairs(record, [0.9, 0.5, 0.0], "best-worst", 0.0, "contrast", "sha", flaws)
    assert p["chosen"][0]["content"] == answers[1] and p["rejected"][0]["content"] == plain


def test_an_answer_that_repeats_itself_is_never_chosen(tiny_model):
    """--max-repeats: an answer in which more than that share of the word
    3-grams were said before in it is never chosen, though it does not loop
    (SFT on the cowboy's chosen answers taught their tics: "I'm a Southern
    cowboy, and I'm not about fine-tuned dishes." twice in one); off (1) by
    default."""
    tic = "I'm a Southern cowboy, with a Southern drawl. I reckon so, partner. I'm a Southern cowboy, with a Southern drawl."
    plain = "Save a little of every pay cheque, and keep a list of what you spend."
    answers = [tic, "I reckon a penny saved is a penny earned, partner: put a little aside every week.", plain]
    assert repeated_ngram_share(tic) > 0.3 and repeated_ngram_share(answers[1]) == 0
    assert R.example_flaws(answers, TRAITS, tiny_model.tokenizer, plain) == [None, None, None]
    assert R.build_parser().parse_args([]).max_repeats == 1.0          # off unless asked for
    flaws = R.example_flaws(answers, TRAITS, tiny_model.tokenizer, plain, max_repeats=0.1)
    assert flaws == ["repeats itself", None, None]
    at_the_limit = R.example_flaws(answers, TRAITS, tiny_model.tokenizer, plain, max_repeats=repeated_ngram_share(tic))
    assert at_the_limit == [None, None, None]                          # more than r, not r itself
    record = {**RECORD, "responses": [{"text": a, "prompt": "traits"} for a in answers[:2]] + [{"text": plain, "prompt": "plain"}]}
    (p,) = R.make_pairs(record, [0.9, 0.5, 0.0], "best-worst", 0.0, "contrast", "sha", flaws)
    assert p["chosen"][0]["content"] == answers[1] and p["rejected"][0]["content"] == plain


def test_max_repeats_reaches_the_ranking(generated, tiny_model, tmp_path):
    """rank.py --max-repeats 0: every answer of scores.jsonl flagged "repeats
    itself" has a repeated word 3-gram, and every usable answer has none (the
    flag reaches the ranking through run())."""
    copy_inputs(generated, tmp_path)
    path = f"{tmp_path}/responses.jsonl"
    records = read_jsonl(path)
    records[0]["responses"][0]["text"] = "Arr, I reckon so. Arr, I reckon so."    # the tiny model's words never repeat
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with one_thread():
        R.main(rank_argv(tmp_path, "unused", ["--max-repeats", "0"]), model=tiny_model)
    responses = {r["query_id"]: r for r in read_jsonl(f"{tmp_path}/responses.jsonl")}
    seen = set()
    for s in read_jsonl(f"{tmp_path}/scores.jsonl"):
        for answer, flaw in zip(responses[s["query_id"]]["responses"], s["flaws"]):
            if flaw in ("repeats itself", None):
                assert (repeated_ngram_share(answer["text"]) > 0) == (flaw == "repeats itself")
                seen.add(flaw)
    assert seen == {"repeats itself", None}                            # both kinds occur in the tiny model's answers


def stock_records(n, answers):
    """n train messages and one eval message, each with the answers made by answers(i)."""
    return [{**RECORD, "query_id": f"t1-q{i:03d}", "split": "eval" if i == n else "train",
             "responses": [{"text": a, "prompt": "traits"} for a in answers(i)]} for i in range(n + 1)]


def capped_pairs(records, scores, cap):
    flaws = [[None] * len(r["responses"]) for r in records]
    make = lambda i: R.make_pairs(records[i], scores[i], "best-worst", 0.0, "contrast", "sha", flaws[i])
    capped = R.cap_stock_openings(records, flaws, cap, make)
    return capped, [p for i, r in enumerate(records) if r["split"] == "train" for p in make(i)], flaws


def test_no_opening_begins_more_than_the_cap_of_the_chosen_answers():
    """--opening-cap: the wizard's best of 8 chose "A wise question, my friend." for
    28 pairs and the tuned model began 40% of its answers with it. With a cap of
    0.1 over 20 train messages, two pairs keep that opening (those with the
    largest margin); the others choose their next-best answer, and when those
    share an opening too ("Hark, old traveller"), it is capped in turn. The
    eval message is not counted, and a cap of 1 changes nothing."""
    answers = lambda i: ["A wise question, my friend. The stars.", f"Hark, old traveller, the moon {i}.",
                         f"Moonlight number {i} shows the way.", f"Plain answer {i}."]
    records = stock_records(20, answers)
    scores = [[0.9 + i / 100, 0.5, 0.3, 0.0] for i in range(21)]
    capped, pairs, flaws = capped_pairs(records, scores, 0.1)
    assert capped == {"a wise question": 20, "hark old traveller": 18}
    chosen = [p["chosen"][0]["content"] for p in pairs]
    assert [p["id"] for p in pairs if p["chosen"][0]["content"] == answers(0)[0]] == ["t1-q018-0-3", "t1-q019-0-3"]
    assert sum(c.startswith("Hark") for c in chosen) == 2 and sum(c.startswith("Moonlight") for c in chosen) == 16
    assert flaws[0] == ["stock opening", "stock opening", None, None] and flaws[20] == [None] * 4   # eval untouched
    assert capped_pairs(records, scores, 1.0)[0] == {}
    assert all(p["chosen"][0]["content"] == answers(i)[0] for i, p in enumerate(capped_pairs(records, scores, 1.0)[1]))


def test_a_few_messages_keep_their_openings():
    """An opening used once is no stock opening: on a handful of messages (a
    smoke run) a cap below one pair still lets each opening be chosen once,
    and only a repeat is capped."""
    answers = lambda i: [f"Stars number {i} shine.", f"Moon {i}.", f"Plain {i}."]
    records = stock_records(5, answers)
    capped, pairs, _ = capped_pairs(records, [[0.9, 0.5, 0.0]] * 6, 0.03)
    assert capped == {} and all(p["chosen"][0]["content"] == answers(i)[0] for i, p in enumerate(pairs))
    same = lambda i: ["The stars shine.", f"Moon {i}.", f"Plain {i}."]
    capped, pairs, _ = capped_pairs(stock_records(5, same), [[0.9, 0.5, 0.0]] * 6, 0.03)
    assert capped == {"the stars shine": 5}
    assert [p["chosen"][0]["content"] == "The stars shine." for p in pairs] == [False] * 4 + [True]   # equal margins: the last kept


def test_sanity_figures_on_known_scores():
    """prompted-beats-plain per trait and overall, plain-ranked-worst and the pooled AUC, on hand-made scores."""
    other = dict(RECORD, trait_id=2, trait="I am brief.")
    figures = R.sanity_figures([RECORD, other], [[0.9, 0.5, 0.2, 0.1], [0.9, 0.5, 0.2, 0.6]], k=4)
    assert figures["prompted_beats_plain_per_trait"]["1"]["value"] == 1.0
    assert figures["prompted_beats_plain_per_trait"]["2"]["value"] == pytest.approx(1 / 3, abs=1e-4)
    assert figures["prompted_beats_plain"] == pytest.approx(4 / 6, abs=1e-4)
    assert figures["plain_ranked_worst"] == 0.5
    # pooled: traits scores {.9,.5,.2,.9,.5,.2} vs plain {.1,.6}: 6 + 2 = 8 wins of 12
    assert figures["auc_pooled"] == pytest.approx(8 / 12, abs=1e-4)


def test_the_checks_show_the_most_a_judge_could_choose():
    """check_rate_best_possible: the share of a trait's train messages with an answer that passes
    the check and may be chosen; a passing answer that loops does not count, nor does an eval message."""
    trait = {"id": 1, "text": "I talk like a pirate.", "check": r"\barr\b"}
    record = lambda split, *texts: {"trait_id": 1, "split": split, "responses": [{"text": t} for t in texts]}
    records = [record("train", "arr, yes", "no"), record("train", "arr arr arr", "no"), record("train", "no", "nay"),
               record("eval", "arr", "no")]
    flaws = [[None, None], ["loops", None], [None, None], [None, None]]
    pairs = [{"trait": trait["text"], "chosen": [{"content": c}], "rejected": [{"content": "no"}]}
             for c in ("arr, yes", "no", "nay")]
    c = R.judge_against_checks([trait], records, [[1, 0]] * 4, pairs, flaws)["1"]
    assert c["check_rate_best_possible"] == pytest.approx(1 / 3, abs=1e-4)
    assert c["check_rate_chosen"] == pytest.approx(1 / 3, abs=1e-4) and c["check_rate_rejected"] == 0


# ----------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------

def test_outputs_score_every_answer_and_pair_only_train(generated):
    """Every answer of every message is scored; pairs come from train messages only, best vs worst,
    with scores, margin, trait, judge and traits hash; the report holds the sanity figures."""
    d = str(generated)
    responses = read_jsonl(f"{d}/responses.jsonl")
    scores = read_jsonl(f"{d}/scores.jsonl")
    assert [s["query_id"] for s in scores] == [r["query_id"] for r in responses]
    assert all(len(s["scores"]) == 3 and s["judge"] == "contrast" for s in scores)
    prefs = read_jsonl(f"{d}/preferences.jsonl")
    train = [r for r in responses if r["split"] == "train"]
    assert len(prefs) == len(train) == 4
    by_id = {r["query_id"]: r for r in responses}
    by_scores = {s["query_id"]: s["scores"] for s in scores}
    for p in prefs:
        r, s = by_id[p["query_id"]], by_scores[p["query_id"]]
        c, j = map(int, p["id"].rsplit("-", 2)[1:])
        assert r["split"] == "train" and p["trait"] == r["trait"] and p["traits_sha"] == r["traits_sha"]
        user = r["text"] + (f" {p['drop_instruction']}" if p["drop_instruction"] else "")
        assert p["prompt"] == [{"role": "user", "content": user}]                # no system message
        assert p["chosen"][0]["content"] == r["responses"][c]["text"] and s[c] == max(s) == p["score_chosen"]
        assert p["rejected"][0]["content"] == r["responses"][j]["text"] and s[j] == min(s) == p["score_rejected"]
        assert p["margin"] == pytest.approx(s[c] - s[j], abs=1e-5)
    report = json.load(open(f"{d}/rank_report.json"))
    assert set(report["prompted_beats_plain_per_trait"]) == {"1", "2"}
    assert report["pairs"] == 4 and "auc_pooled" in report and report["example"]["answers_best_first"]


def test_compare_and_opposite_judges_run_and_are_named(generated, tiny_model, tmp_path):
    """--judge compare writes win rates (each message's sum to K/2) and the order-flip rate;
    --against opposite is named contrast-opposite in the pairs."""
    copy_inputs(generated, tmp_path)
    d = str(tmp_path)
    with one_thread():
        R.main(rank_argv(tmp_path, "unused", ["--judge", "compare"]), model=tiny_model)
    report = json.load(open(f"{d}/rank_report.json"))
    assert 0 <= report["order_flip_rate"] <= 1 and 0 <= report["first_position_prob"] <= 1
    for s in read_jsonl(f"{d}/scores.jsonl"):
        assert sum(s["scores"]) == pytest.approx(1.5, abs=1e-4) and len(s["pairs"]) == 3
    assert {p["judge"] for p in read_jsonl(f"{d}/preferences.jsonl")} == {"compare"}
    with one_thread():
        R.main(rank_argv(tmp_path, "unused", ["--against", "opposite"]), model=tiny_model)
    assert {p["judge"] for p in read_jsonl(f"{d}/preferences.jsonl")} == {"contrast-opposite"}


def test_killed_rank_resumes_to_the_same_bytes(generated, tiny_model_dir, tmp_path):
    """kill -9 while scoring: the rerun skips the finished units and writes the same files
    as the uninterrupted run (the report differs only in its timing)."""
    copy_inputs(generated, tmp_path)
    d = str(tmp_path)
    argv = ["rank.py", *rank_argv(tmp_path, tiny_model_dir, ["--batch-size", "1"])]
    # With --batch-size 1 every message is a unit; the reference used 16. Make a reference for batch 1 too.
    ref = tmp_path / "ref"
    ref.mkdir()
    copy_inputs(generated, ref)
    with one_thread():
        R.main(rank_argv(ref, tiny_model_dir, ["--batch-size", "1"]))
    written = kill_when_units_written(argv, f"{d}/scores.jsonl.partial")
    assert 1 <= written < 6
    r = run_script(argv)
    assert r.returncode == 0, r.stderr
    for name in ("scores.jsonl", "preferences.jsonl"):
        assert read_bytes(f"{d}/{name}") == read_bytes(f"{ref}/{name}"), name
    assert without_timing(f"{d}/rank_report.json") == without_timing(f"{ref}/rank_report.json")


def test_torchrun_two_processes_equal_one(generated, tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node=2 rank.py gives the same files as one process."""
    copy_inputs(generated, tmp_path)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "rank.py", *rank_argv(tmp_path, tiny_model_dir)],
                       cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("scores.jsonl", "preferences.jsonl"):
        assert read_bytes(f"{tmp_path}/{name}") == read_bytes(f"{generated}/{name}"), name


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def bad_input_error(folder, capsys, extra=()):
    with pytest.raises(SystemExit) as e:
        R.main(rank_argv(folder, "unused", extra))
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rank.py: "), err
    return err[0]


def test_responses_from_another_traits_file_are_refused(generated, tmp_path, capsys):
    """Responses made from a different traits file (a seed changed) are refused with one line."""
    copy_inputs(generated, tmp_path)
    with open(f"{tmp_path}/traits.txt", "a") as f:
        f.write("- One more seed?\n")
    assert "different traits file" in bad_input_error(tmp_path, capsys)


def test_corrupted_or_missing_responses_are_refused(generated, tmp_path, capsys):
    """A corrupted JSONL line is refused naming its line; a missing or empty file likewise; nothing is written."""
    copy_inputs(generated, tmp_path)
    path = f"{tmp_path}/responses.jsonl"
    lines = open(path).read().splitlines(keepends=True)
    with open(path, "w") as f:
        f.writelines(lines[:2] + [lines[2][:40] + "\n"] + lines[3:])
    assert "line 3: not valid JSON" in bad_input_error(tmp_path, capsys)
    open(path, "w").close()
    assert "empty" in bad_input_error(tmp_path, capsys)
    os.remove(path)
    assert "no such file" in bad_input_error(tmp_path, capsys)
    assert not os.path.exists(f"{tmp_path}/preferences.jsonl")


def test_opposite_judge_needs_opposite_lines(generated, tmp_path, capsys):
    """--against opposite with a trait that has no 'opposite:' line is refused, naming the trait's line."""
    copy_inputs(generated, tmp_path)
    text = open(f"{tmp_path}/traits.txt").read().replace("opposite: I never rhyme.\n", "")
    with open(f"{tmp_path}/traits.txt", "w") as f:
        f.write(text)
    assert "line 8: trait 2 has no 'opposite: ...' line" in bad_input_error(tmp_path, capsys, ["--against", "opposite"])


def test_help_documents_every_flag(capsys):
    """--help lists every flag, each with a description."""
    with pytest.raises(SystemExit) as e:
        R.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in R.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.option_strings[-1] in out, action.dest


def test_a_share_of_pairs_carries_a_drop_instruction_that_sample_py_never_measures_with():
    """--drop-share: about that share of messages get one of rank.py's drop-your-persona
    instructions after the user text (the same ids always the same one), the answers
    unchanged; sample.py's held-out robustness wordings are never among them."""
    import sample as S
    for held_out in S.DROP_PERSONA:
        assert all(held_out.lower() != w.lower() and held_out[:20].lower() not in w.lower() for w in R.DROP_INSTRUCTIONS)
    ids = [f"t1-q{i:03d}" for i in range(400)]
    carried = [R.drop_instruction(i, 0.25) for i in ids]
    assert 0.18 < sum(c is not None for c in carried) / len(ids) < 0.32
    assert carried == [R.drop_instruction(i, 0.25) for i in ids]                    # deterministic
    assert set(c for c in carried if c) == set(R.DROP_INSTRUCTIONS)
    assert all(R.drop_instruction(i, 0.0) is None for i in ids) and all(R.drop_instruction(i, 1.0) for i in ids)
    qid = next(i for i, c in zip(ids, carried) if c)
    record = {**RECORD, "query_id": qid}
    (p,) = R.make_pairs(record, [0.9, 0.8, 0.1, 0.0], "best-worst", 0.0, "contrast", "sha", NO_FLAWS, 0.25)
    assert p["prompt"][0]["content"] == f"{RECORD['text']} {p['drop_instruction']}" and p["drop_instruction"]
    assert p["chosen"][0]["content"] == RECORD["responses"][0]["text"]
    (p,) = R.make_pairs(record, [0.9, 0.8, 0.1, 0.0], "best-worst", 0.0, "contrast", "sha", NO_FLAWS)
    assert p["prompt"][0]["content"] == RECORD["text"] and p["drop_instruction"] is None
